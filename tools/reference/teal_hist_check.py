#!/usr/bin/env python3
"""TEAL's histogram thresholds, re-implemented with numpy, for checking
crates/teal/src/sparsity/histogram.rs.

Mirrors FasterDecoding/TEAL (commit 5baaec8):
  utils/utils.py  ActivationModule.find_histogram(num_bins=10000, outlier_threshold=0.01)
  utils/utils.py  Distribution.icdf  (same as gpt-fast/distribution.py)
  utils/utils.py  SparsifyFn.set_threshold: icdf(0.5 + s/2), 0.0 for s == 0
with torch's CPU semantics written out in float32:
  torch.linspace (ATen linspace_kernel): step = (end - start) / (steps - 1);
      start + step * i for i < steps // 2, else end - step * (steps - 1 - i)
  torch.histogram(x, bins=tensor) (BINARY_SEARCH): bin = upper_bound(edges, x) - 1,
      the last bin includes the right edge
  torch.cumsum on CPU float32: accumulates in double, stores float32
The synthetic data are generated exactly as the Rust tests do (counter-based splitmix64,
Box-Muller cosine branch, inverse-CDF Laplace, cast to float32).

Usage: python3 tools/reference/teal_hist_check.py   (numpy only; ~2 s)
"""
import numpy as np

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix(seed, idx):
    """i-th output of splitmix64 seeded with `seed`, for an array of indices (uint64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unif(seed, idx):
    return ((splitmix(seed, idx) >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2.0**53)


def gaussian(n, seed, mean, std):
    i = np.arange(n, dtype=np.uint64)
    u1 = unif(seed, np.uint64(2) * i)
    u2 = unif(seed, np.uint64(2) * i + np.uint64(1))
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (mean + std * z).astype(np.float32)


def laplace(n, seed, loc, b):
    d = unif(seed, np.arange(n, dtype=np.uint64)) - 0.5
    return (loc - b * np.sign(d) * np.log(1.0 - 2.0 * np.abs(d))).astype(np.float32)


def torch_linspace_f32(start, end, steps):
    start, end = np.float32(start), np.float32(end)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps)
    half = steps // 2
    out = np.empty(steps, dtype=np.float32)
    out[:half] = start + step * i[:half].astype(np.float32)
    out[half:] = end - step * (steps - 1 - i[half:]).astype(np.float32)
    return out


def find_histogram(acts, num_bins=10000, outlier_threshold=0.01):
    """TEAL's find_histogram for one key: (counts float32, bin_centers float32)."""
    acts = np.sort(acts.astype(np.float32))
    n = len(acts)
    k = int(outlier_threshold * n)
    lower_bound = acts[k]
    upper_bound = acts[-k]  # TEAL: acts[-int(...)]; degenerate (acts[0]) when k == 0
    main_bins = torch_linspace_f32(lower_bound, upper_bound, num_bins - 1)
    bins = np.concatenate([[acts[0]], main_bins, [acts[-1]]]).astype(np.float32)
    pos = np.searchsorted(bins, acts, side="right") - 1  # std::upper_bound - 1
    pos = np.minimum(pos, len(bins) - 2)  # rightmost bin includes its right edge
    counts = np.bincount(pos, minlength=len(bins) - 1).astype(np.float32)
    centers = ((bins[:-1] + bins[1:]) / np.float32(2)).astype(np.float32)
    return counts, centers, (acts[0], lower_bound, upper_bound, acts[-1])


def icdf(counts, centers, q):
    """TEAL's Distribution.icdf in float32."""
    cum = np.cumsum(counts.astype(np.float64)).astype(np.float32)
    total = np.float32(counts.astype(np.float64).sum())
    target = np.float32(q) * total
    idx = int(np.searchsorted(cum, target, side="left"))
    if idx == 0:
        return centers[0]
    if idx == len(centers):
        return centers[-1]
    lower_count, upper_count = cum[idx - 1], cum[idx]
    lower_value, upper_value = centers[idx - 1], centers[idx]
    fraction = (target - lower_count) / (upper_count - lower_count)
    return np.float32(lower_value + fraction * (upper_value - lower_value))


def threshold(counts, centers, s):
    return np.float32(0.0) if s == 0.0 else icdf(counts, centers, 0.5 + s / 2)


def exact_abs(values, s):
    a = np.sort(np.abs(values))
    n = len(a)
    m = max(1, int(np.ceil(s * n)))
    while m > 1 and (m - 1) / n >= s:
        m -= 1
    while m < n and m / n < s:
        m += 1
    return a[m - 1]


def main():
    levels = [0.25, 0.4, 0.5, 0.65, 0.75, 0.9]
    n = 1_000_003
    for name, v in [
        ("gaussian(n=1000003, seed=11, 0, 1)", gaussian(n, 11, 0.0, 1.0)),
        ("laplace(n=1000003, seed=12, 0, 1)", laplace(n, 12, 0.0, 1.0)),
        ("gaussian(n=1000003, seed=17, 0.3, 1) [shifted]", gaussian(n, 17, 0.3, 1.0)),
    ]:
        counts, centers, (mn, lo, hi, mx) = find_histogram(v)
        print(f"{name}: min={mn!r} lo={lo!r} hi={hi!r} max={mx!r} "
              f"outlier bins={int(counts[0])},{int(counts[-1])}")
        for s in levels:
            t = threshold(counts, centers, s)
            e = exact_abs(v, s)
            zt = np.mean(np.abs(v) <= t)
            ze = np.mean(np.abs(v) <= e)
            print(f"  s={s:<5} teal t={float(t)!r:<22} zeroes {zt:.6f}   "
                  f"exact |x| t={float(e)!r:<22} zeroes {ze:.6f}")


if __name__ == "__main__":
    main()
