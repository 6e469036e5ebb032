//! Activation statistics that turn calibration activations into TEAL thresholds.
//!
//! Two ways to get the threshold `t` of one (layer, site) for a target sparsity `s`
//! (the rule is strict: `x -> x * [|x| > t]`, so the zeroed fraction is `P(|x| <= t)`):
//!
//! * [`TealHistogram::threshold`]: TEAL's method, reproduced exactly (below), named `signed`
//!   elsewhere: a 10,000-bin histogram of the *signed* values read at the signed quantile
//!   `icdf(0.5 + s/2)`. It assumes a symmetric, zero-centred distribution; on a shifted or skewed
//!   site it misses the target (a test below shows by how much).
//! * [`abs_quantiles`]: the exact `|x|` quantile, computed from all values (radix selection,
//!   two passes over the data, no copy), named `abs`. It zeroes `s` up to the granularity `1/n`
//!   (and up to ties).
//!
//! # What TEAL does (FasterDecoding/TEAL, commit 5baaec8, read for this module)
//!
//! **Collection** (`teal/grab_acts.py`, `teal/mlp.py::_mlp_forward`,
//! `teal/self_attn.py`, `utils/utils.py::ActivationModule.grab_activations`): on prefill only
//! (`seq_len > 1`), every value of the four sites of a layer (`self_attn` `h1` = post-norm
//! attention input, `h2` = attention output before `o_proj`; `mlp` `h1` = post-norm MLP input,
//! `h2` = `act(gate) * up`) is cast to float32 and concatenated over the calibration batch
//! (10 x 2048 tokens of Alpaca).
//!
//! **Histogram** (`utils/utils.py::ActivationModule.find_histogram(num_bins=10000,
//! outlier_threshold=0.01)`), per site, on the flattened float32 values of length `n`:
//! 1. `acts = torch.sort(acts)[0]` (ascending);
//! 2. `lower_bound = acts[int(0.01 * n)]`, `upper_bound = acts[-int(0.01 * n)]`, i.e. with
//!    `k = int(0.01 * n)` (double product, truncated) the order statistics of 0-based ranks `k`
//!    and `n - k` (note the asymmetry: `k` values lie below `lower_bound`, `k - 1` above
//!    `upper_bound`);
//! 3. `main_bins = torch.linspace(lower_bound, upper_bound, num_bins - 1)`: 9,999 float32 edges,
//!    computed by ATen's CPU `linspace_kernel` as `step = (end - start) / (steps - 1)` and
//!    `start + step * i` for `i < steps / 2`, `end - step * (steps - 1 - i)` otherwise, all in
//!    float32 ([`TealHistogram::edges`] reproduces this);
//! 4. `bins = cat([acts[0]], main_bins, [acts[-1]])`: 10,001 edges, so **10,000 bins in total:
//!    9,998 uniform bins between the 1% and 99% points plus one outlier bin at each end**
//!    (`[min, lower_bound)` and `[upper_bound, max]`);
//! 5. `counts = torch.histogram(acts, bins=bins)`: ATen's CPU `histogramdd` with explicit edges
//!    uses `BINARY_SEARCH`: bin = `std::upper_bound(edges, x) - 1`, the last bin also takes
//!    `x == max`, values outside `[edges[0], edges[-1]]` and NaN are skipped; counts are float32;
//! 6. saved: `counts` and `bin_centers = (bins[:-1] + bins[1:]) / 2` (float32).
//!
//! **Threshold** (`utils/utils.py::Distribution.icdf`, identical in
//! `gpt-fast/distribution.py::Distribution.icdf`; called as `icdf(0.5 + s/2)` by
//! `utils/utils.py::SparsifyFn.set_threshold`, which returns `0.0` for `s == 0`, and by
//! `gpt-fast/generate.py`):
//! `cum = cumsum(counts)` (CPU cumsum accumulates in double, stores float32),
//! `total = counts.sum()`, `target = q * total` (float32),
//! `idx = searchsorted(cum, target)` (left: first `idx` with `cum[idx] >= target`);
//! `idx == 0` returns `centers[0]`, `idx == len` returns `centers[-1]`, otherwise it
//! interpolates linearly **between bin centres**, treating `cum[i]` as the CDF *at centre `i`*:
//! `centers[idx-1] + (target - cum[idx-1]) / (cum[idx] - cum[idx-1]) * (centers[idx] -
//! centers[idx-1])`, in float32. (`cum[i]` is really the CDF at the bin's right edge, so inside
//! the uniform range TEAL's reading sits half a bin, about `2.3e-4` standard deviations for a
//! Gaussian site, below the histogram's own quantile; in the outlier bins the interpolation is
//! between the last uniform centre and the outlier bin's centre `(hi + max) / 2`.)
//! `gpt-fast/distribution.py` also has an `abs_icdf` (folded histogram) that nothing calls.
//!
//! **Our reproduction** mirrors steps 2-6 and `icdf` bit for bit in float32 arithmetic, with
//! these documented differences:
//! * for `n < 100`, `k = 0` and TEAL's `acts[-0]` is `acts[0]`, the *minimum* (a degenerate
//!   histogram); we use the maximum (rank `n - 1`) instead;
//! * `total` is the exact count rounded to float32 (torch's float32 `sum` may differ by an ulp
//!   above 2^24 values); float32 count saturation above 2^24 values in one bin per thread, which
//!   torch would suffer, does not happen here (counts are `u64`);
//! * if the float32 edges were ever not monotone (they are for finite inputs) the literal
//!   `std::upper_bound` probe sequence is used, as in torch.
//!
//! `tools/reference/teal_hist_check.py` re-implements TEAL's torch code in numpy on the same
//! synthetic data; two of its numbers are checked in the tests below.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// TEAL's signed histogram of one site (see the module docs for the exact layout).
///
/// Edges (10,001): `min`, then 9,999 float32 points from `lo` to `hi` as `torch.linspace`
/// computes them, then `max`. `counts[0]` is the lower outlier bin `[min, lo)`,
/// `counts[1..=9_998]` the uniform bins, `counts[9_999]` the upper outlier bin `[hi, max]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TealHistogram {
    /// The 1% point: order statistic of rank `int(0.01 n)`.
    pub lo: f32,
    /// The 99% point: order statistic of rank `n - int(0.01 n)` (`n - 1` when `n < 100`).
    pub hi: f32,
    /// Smallest value (left edge of the lower outlier bin).
    pub min: f32,
    /// Largest value (right edge of the upper outlier bin).
    pub max: f32,
    /// `BINS` counts: `[min, lo)`, `INNER_BINS` uniform bins, `[hi, max]`.
    pub counts: Vec<u64>,
    /// Sum of `counts` (values that are NaN, or outside `[min, max]`, are not counted).
    pub total: u64,
}

impl TealHistogram {
    /// TEAL's `num_bins`: the total number of bins, the two outlier bins included.
    pub const BINS: usize = 10_000;
    /// Uniform bins between `lo` and `hi` (`linspace(lo, hi, BINS - 1)` gives `BINS - 2` bins).
    pub const INNER_BINS: usize = Self::BINS - 2;
    /// TEAL's `outlier_threshold`.
    pub const OUTLIER_FRACTION: f64 = 0.01;

    /// Builds TEAL's histogram: bounds and binning exactly as `find_histogram` (module docs).
    ///
    /// O(n), parallel, no copy of `values`. Never panics; with NaN/Inf in `values` the result is
    /// meaningless (call [`check_finite`] first). Empty input gives an all-zero histogram.
    pub fn build(values: &[f32]) -> TealHistogram {
        let n = values.len();
        if n == 0 {
            return TealHistogram {
                lo: 0.0,
                hi: 0.0,
                min: 0.0,
                max: 0.0,
                counts: vec![0; Self::BINS],
                total: 0,
            };
        }
        let (lo_rank, hi_rank) = teal_bound_ranks(n);
        let keys = select_ranks(values, signed_key, &[0, lo_rank, hi_rank, n - 1]);
        let [min, lo, hi, max] = [keys[0], keys[1], keys[2], keys[3]].map(from_signed_key);
        let edges = teal_edges(min, lo, hi, max);
        let counts = bin_counts(values, &edges, lo, hi);
        let total = counts.iter().sum();
        TealHistogram {
            lo,
            hi,
            min,
            max,
            counts,
            total,
        }
    }

    /// The 10,001 float32 bin edges, as TEAL's `bins` tensor.
    pub fn edges(&self) -> Vec<f32> {
        teal_edges(self.min, self.lo, self.hi, self.max)
    }

    /// The 10,000 float32 bin centres, as TEAL's `bin_centers = (bins[:-1] + bins[1:]) / 2`.
    pub fn centers(&self) -> Vec<f32> {
        self.edges()
            .windows(2)
            .map(|w| (w[0] + w[1]) / 2.0)
            .collect()
    }

    /// TEAL's threshold for sparsity `s` in `[0, 1)`: `icdf(0.5 + s/2)`, read as TEAL reads it
    /// (`SparsifyFn.set_threshold`: `0.0` for `s == 0`).
    pub fn threshold(&self, s: f64) -> f32 {
        if s == 0.0 {
            return 0.0;
        }
        self.icdf(0.5 + s / 2.0)
    }

    /// TEAL's `Distribution.icdf(q)`, in float32 as torch computes it (module docs).
    pub fn icdf(&self, q: f64) -> f32 {
        let centers = self.centers();
        let mut running = 0u64;
        let cum: Vec<f32> = self
            .counts
            .iter()
            .map(|&c| {
                running += c;
                running as f32
            })
            .collect();
        let target = (q as f32) * (self.total as f32);
        let idx = cum.partition_point(|&c| c < target);
        if idx == 0 {
            centers[0]
        } else if idx == cum.len() {
            centers[cum.len() - 1]
        } else {
            let (lower_count, upper_count) = (cum[idx - 1], cum[idx]);
            let (lower_value, upper_value) = (centers[idx - 1], centers[idx]);
            let fraction = (target - lower_count) / (upper_count - lower_count);
            lower_value + fraction * (upper_value - lower_value)
        }
    }
}

/// 0-based ranks of TEAL's lower and upper bounds for `n >= 1` values.
fn teal_bound_ranks(n: usize) -> (usize, usize) {
    // Python: int(0.01 * len(acts)); a double product truncated toward zero.
    let k = (TealHistogram::OUTLIER_FRACTION * n as f64) as usize;
    // acts[-k] is rank n - k; for k == 0 TEAL's acts[-0] is the minimum (degenerate); use max.
    let hi = if k == 0 { n - 1 } else { n - k };
    (k, hi)
}

/// TEAL's edges: `[min] ++ torch.linspace(lo, hi, BINS - 1) ++ [max]`, float32 arithmetic of
/// ATen's CPU `linspace_kernel` (no FMA: Rust does not contract `a + b * c`).
fn teal_edges(min: f32, lo: f32, hi: f32, max: f32) -> Vec<f32> {
    let steps = TealHistogram::BINS - 1;
    let step = (hi - lo) / (steps - 1) as f32;
    let halfway = steps / 2;
    let mut edges = Vec::with_capacity(TealHistogram::BINS + 1);
    edges.push(min);
    for i in 0..steps {
        edges.push(if i < halfway {
            lo + step * i as f32
        } else {
            hi - step * (steps - 1 - i) as f32
        });
    }
    edges.push(max);
    edges
}

/// libstdc++'s `std::upper_bound` probe sequence: first index with `x < a[i]`.
fn upper_bound(a: &[f32], x: f32) -> usize {
    let (mut first, mut len) = (0usize, a.len());
    while len > 0 {
        let half = len >> 1;
        let mid = first + half;
        if x < a[mid] {
            len = half;
        } else {
            first = mid + 1;
            len -= half + 1;
        }
    }
    first
}

/// Histogram counts with torch.histogram's BINARY_SEARCH semantics, computed with a
/// direct-index guess verified against the edges (identical result when edges are sorted).
fn bin_counts(values: &[f32], edges: &[f32], lo: f32, hi: f32) -> Vec<u64> {
    let nb = edges.len() - 1;
    let last = edges.len() - 1;
    let (left, right) = (edges[0], edges[last]);
    let sorted = edges.windows(2).all(|w| w[0] <= w[1]);
    // Guess only (verified against the edges below), so float32 is enough.
    let inv_step = TealHistogram::INNER_BINS as f32 / (hi - lo);
    let bin_of = |x: f32| -> Option<usize> {
        if !(x >= left && x <= right) {
            return None;
        }
        let mut pos = usize::MAX;
        if sorted {
            let g = if x < lo {
                0
            } else {
                // x - lo >= 0: truncation is floor; the cast saturates (inf) and maps NaN
                // (0 * inf when hi == lo) to 0.
                (((x - lo) * inv_step) as usize).saturating_add(1).min(last)
            };
            // For sorted edges, upper_bound(x) - 1 is the unique p with
            // edges[p] <= x and (p == last or x < edges[p + 1]).
            let ok = |p: usize| edges[p] <= x && (p == last || x < edges[p + 1]);
            if ok(g) {
                pos = g;
            } else if g > 0 && ok(g - 1) {
                pos = g - 1;
            } else if g < last && ok(g + 1) {
                pos = g + 1;
            }
        }
        if pos == usize::MAX {
            pos = upper_bound(edges, x).saturating_sub(1);
        }
        // The rightmost bin includes its right edge.
        Some(pos.min(nb - 1))
    };
    values
        .par_chunks(chunk_len(values.len()))
        .map(|chunk| {
            let mut h = counters::<u64>(nb);
            for &x in chunk {
                if let Some(b) = bin_of(x) {
                    h[b] += 1;
                }
            }
            h
        })
        .reduce(|| counters(nb), add_into)
}

fn add_into(mut a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

/// Chunk length for parallel passes: a few chunks per thread, each under 2^31 values (so
/// `u32` local counters cannot overflow).
fn chunk_len(n: usize) -> usize {
    let chunks = 2 * rayon::current_num_threads().max(1);
    n.div_ceil(chunks).clamp(1 << 16, 1 << 31)
}

/// Exact `|x|` quantiles. For each `s` in `levels` (in `[0, 1)`; any order), the smallest `t`
/// such that the fraction of values with `|x| <= t` is at least `s`: `t = sorted_abs[m - 1]`
/// with `m` the smallest integer such that `m as f64 / n as f64 >= s` (computed so that float
/// rounding of `s * n` cannot move it; this is `ceil(s * n)` in exact arithmetic). For `s <= 0`
/// (or NaN) it returns `-1.0`: nothing is zeroed under the strict rule `|x| > t`. Empty input:
/// all `-1.0`. Levels `>= 1` give the largest `|x|`.
///
/// Exact radix selection on the bit patterns: three parallel passes over the data whatever the
/// number of levels, no copy.
/// Never panics; NaNs order above +Inf (call [`check_finite`] first).
pub fn abs_quantiles(values: &[f32], levels: &[f64]) -> Vec<f32> {
    let n = values.len();
    let ranks: Vec<Option<usize>> = levels.iter().map(|&s| abs_rank(s, n)).collect();
    let wanted: Vec<usize> = ranks.iter().flatten().copied().collect();
    let keys = select_ranks(values, abs_key, &wanted);
    let mut it = keys.into_iter();
    ranks
        .iter()
        .map(|r| match r {
            Some(_) => f32::from_bits(it.next().expect("one key per rank")),
            None => -1.0,
        })
        .collect()
}

/// 0-based rank in sorted `|x|` of the exact quantile for level `s` (`None`: nothing zeroed).
fn abs_rank(s: f64, n: usize) -> Option<usize> {
    if n == 0 || s.is_nan() || s <= 0.0 {
        return None;
    }
    let nf = n as f64;
    let mut m = (s * nf).ceil().clamp(1.0, nf) as usize;
    while m > 1 && (m - 1) as f64 / nf >= s {
        m -= 1;
    }
    while m < n && (m as f64 / nf) < s {
        m += 1;
    }
    Some(m - 1)
}

/// Fraction of values that the strict rule `x * [|x| > t]` zeroes: `!(|x| > t)`, i.e.
/// `|x| <= t` for every non-NaN value (a NaN value counts as zeroed: its test is false).
/// Empty input: 0.
pub fn zeroed_fraction(values: &[f32], t: f32) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let zeroed: usize = values
        .par_chunks(chunk_len(values.len()))
        .map(|c| {
            c.iter()
                .filter(|x| x.abs().partial_cmp(&t) != Some(std::cmp::Ordering::Greater))
                .count()
        })
        .sum();
    zeroed as f64 / values.len() as f64
}

/// Index of the first NaN or infinite value, so the caller can report a clear error.
pub fn check_finite(values: &[f32]) -> Result<(), usize> {
    let chunk = chunk_len(values.len());
    let first_bad = values
        .par_chunks(chunk)
        .enumerate()
        .filter_map(|(ci, c)| {
            // Branch-free scan first (vectorises); locate only in a chunk that has a bad value.
            let any_bad = c.iter().fold(false, |acc, x| acc | !x.is_finite());
            any_bad.then(|| ci * chunk + c.iter().position(|x| !x.is_finite()).unwrap_or(0))
        })
        .min();
    match first_bad {
        Some(i) => Err(i),
        None => Ok(()),
    }
}

/// Gaussian fit: (mean, standard deviation), the maximum-likelihood (population, `1/n`)
/// estimates, accumulated in f64. Empty input: (NaN, NaN).
pub fn fit_gaussian(values: &[f32]) -> (f64, f64) {
    let n = values.len() as f64;
    let chunk = chunk_len(values.len());
    let sum: f64 = values
        .par_chunks(chunk)
        .map(|c| c.iter().map(|&x| x as f64).sum::<f64>())
        .sum();
    let mean = sum / n;
    let ss: f64 = values
        .par_chunks(chunk)
        .map(|c| c.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>())
        .sum();
    (mean, (ss / n).sqrt())
}

/// Laplace fit: (location = median, scale `b` = mean `|x - median|`), the maximum-likelihood
/// estimates. The median of an even count is the mean of the two middle values.
/// Empty input: (NaN, NaN).
pub fn fit_laplace(values: &[f32]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        from_signed_key(select_ranks(values, signed_key, &[n / 2])[0]) as f64
    } else {
        let k = select_ranks(values, signed_key, &[n / 2 - 1, n / 2]);
        (from_signed_key(k[0]) as f64 + from_signed_key(k[1]) as f64) / 2.0
    };
    let dev: f64 = values
        .par_chunks(chunk_len(n))
        .map(|c| c.iter().map(|&x| (x as f64 - median).abs()).sum::<f64>())
        .sum();
    (median, dev / n as f64)
}

/// Density histogram for plots: `bins` uniform bins on `[lo, hi]`, as (bin centre, density)
/// with density = count / (n * bin width), `n` = all values (so the bars integrate to the
/// fraction of values inside `[lo, hi]` and overlay a pdf directly). Values outside the range
/// or NaN are not counted; `hi` goes to the last bin. Empty when `bins == 0`, `values` is empty,
/// a bound is not finite, or `hi <= lo`. For the `|x|` density use [`abs_density`].
pub fn density(values: &[f32], bins: usize, lo: f32, hi: f32) -> Vec<(f32, f64)> {
    density_of(values, bins, lo, hi, |x| x)
}

/// [`density`] of `|x|` on `[0, hi]`.
pub fn abs_density(values: &[f32], bins: usize, hi: f32) -> Vec<(f32, f64)> {
    density_of(values, bins, 0.0, hi, f32::abs)
}

fn density_of(
    values: &[f32],
    bins: usize,
    lo: f32,
    hi: f32,
    map: impl Fn(f32) -> f32 + Sync,
) -> Vec<(f32, f64)> {
    if bins == 0 || values.is_empty() || !lo.is_finite() || !hi.is_finite() || hi <= lo {
        return Vec::new();
    }
    let (lo64, hi64) = (lo as f64, hi as f64);
    let width = (hi64 - lo64) / bins as f64;
    let counts = values
        .par_chunks(chunk_len(values.len()))
        .map(|c| {
            let mut h = counters::<u64>(bins);
            for &x in c {
                let v = map(x);
                if v >= lo && v <= hi {
                    let b = (((v as f64 - lo64) / width) as usize).min(bins - 1);
                    h[b] += 1;
                }
            }
            h
        })
        .reduce(|| counters(bins), add_into);
    let norm = values.len() as f64 * width;
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| ((lo64 + (i as f64 + 0.5) * width) as f32, c as f64 / norm))
        .collect()
}

/// Gaussian pdf, for overlaying [`fit_gaussian`] on a [`density`] plot.
pub fn gaussian_pdf(x: f64, mean: f64, std: f64) -> f64 {
    let z = (x - mean) / std;
    (-0.5 * z * z).exp() / (std * (2.0 * std::f64::consts::PI).sqrt())
}

/// Laplace pdf, for overlaying [`fit_laplace`] on a [`density`] plot.
pub fn laplace_pdf(x: f64, loc: f64, b: f64) -> f64 {
    (-(x - loc).abs() / b).exp() / (2.0 * b)
}

// ---------------------------------------------------------------------------------------------
// Exact selection of order statistics by radix on order-preserving u32 keys.

/// Order-preserving key of a float under signed order (-0.0 just below +0.0; negative NaNs
/// below -Inf, positive NaNs above +Inf, like `f32::total_cmp`).
fn signed_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn from_signed_key(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// Order-preserving key of `|x|` (both zeros map to 0; NaNs above +Inf).
fn abs_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Counters of the first selection pass (the high 16 bits of a key).
const RADIX: usize = 1 << 16;
/// Counters per prefix in the second and third passes (8 bits each).
const SUB: usize = 1 << 8;

/// `n` zero counters, written rather than allocated zeroed: a zeroed allocation maps the
/// shared zero page, and each counter page's first increment (a read, then a write) then
/// takes a copy-on-write fault whose TLB flush interrupts every thread of the process. With
/// fresh counters per chunk and pass, that was most of a calibration's time.
fn counters<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, T::default());
    v
}

/// Counts, over `values` in parallel, the counter `slot(key(x))` of every value (`None`: not
/// counted) in `n` counters.
fn count_keys<K, S>(values: &[f32], key: &K, n: usize, slot: S) -> Vec<u64>
where
    K: Fn(f32) -> u32 + Sync,
    S: Fn(u32) -> Option<usize> + Sync,
{
    values
        .par_chunks(chunk_len(values.len()))
        .map(|c| {
            let mut h = counters::<u32>(n);
            for &x in c {
                if let Some(i) = slot(key(x)) {
                    h[i] += 1;
                }
            }
            h.into_iter().map(u64::from).collect::<Vec<u64>>()
        })
        .reduce(|| counters(n), add_into)
}

/// Numbers the distinct values of `prefixes` (each `< len`) in order of first appearance: a
/// table from prefix to its row of counters (`u32::MAX`: none), and the number of rows.
fn number_rows(prefixes: impl Iterator<Item = usize>, len: usize) -> (Vec<u32>, usize) {
    let mut table = vec![u32::MAX; len];
    let mut rows = 0usize;
    for p in prefixes {
        if table[p] == u32::MAX {
            table[p] = rows as u32;
            rows += 1;
        }
    }
    (table, rows)
}

/// The row of `prefix` in a [`number_rows`] table.
fn row_of(table: &[u32], prefix: usize) -> Option<usize> {
    match table[prefix] {
        u32::MAX => None,
        r => Some(r as usize),
    }
}

/// The index `i` of the counter in `counts` where the running sum first exceeds `within`, and
/// `within` less the counts before it.
fn locate(counts: &[u64], within: u64) -> (usize, u64) {
    let mut before = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if before + c > within {
            return (i, within - before);
        }
        before += c;
    }
    unreachable!("rank inside its prefix")
}

/// For each 0-based rank in `ranks` (each `< values.len()`), the key of the value of that rank
/// in ascending key order. Three passes over the data whatever the number of ranks: the first
/// counts the high 16 bits of every key, the second the next 8 bits of the keys under a high
/// prefix that holds a wanted rank, the third the low 8 bits under a 24-bit prefix that does.
fn select_ranks<K: Fn(f32) -> u32 + Sync>(values: &[f32], key: K, ranks: &[usize]) -> Vec<u32> {
    if ranks.is_empty() {
        return Vec::new();
    }
    let n = values.len();
    assert!(ranks.iter().all(|&r| r < n), "rank out of range");
    // Pass 1: the high 16 bits. Each rank gets its bucket and its rank within it.
    let high = count_keys(values, &key, RADIX, |k| Some((k >> 16) as usize));
    let mut ends = high.clone();
    for i in 1..RADIX {
        ends[i] += ends[i - 1];
    }
    let first: Vec<(usize, u64)> = ranks
        .iter()
        .map(|&r| {
            let b = ends.partition_point(|&e| e <= r as u64);
            (b, r as u64 - (ends[b] - high[b]))
        })
        .collect();
    // Pass 2: the next 8 bits under each wanted bucket (slot1: bucket -> its row of counters).
    let (slot1, rows1) = number_rows(first.iter().map(|&(b, _)| b), RADIX);
    let row1 = |k: u32| row_of(&slot1, (k >> 16) as usize);
    let mid = count_keys(values, &key, rows1 * SUB, |k| {
        row1(k).map(|r| r * SUB + ((k >> 8) as usize & (SUB - 1)))
    });
    let second: Vec<(usize, u64)> = first
        .iter()
        .map(|&(b, within)| {
            let r = slot1[b] as usize;
            let (m, w) = locate(&mid[r * SUB..(r + 1) * SUB], within);
            (r * SUB + m, w)
        })
        .collect();
    // Pass 3: the low 8 bits under each wanted 24-bit prefix (slot2: pass-2 counter -> row).
    let (slot2, rows2) = number_rows(second.iter().map(|&(p, _)| p), rows1 * SUB);
    let low = count_keys(values, &key, rows2 * SUB, |k| {
        let p = row1(k)? * SUB + ((k >> 8) as usize & (SUB - 1));
        row_of(&slot2, p).map(|r| r * SUB + (k as usize & (SUB - 1)))
    });
    first
        .iter()
        .zip(&second)
        .map(|(&(b, _), &(p, within))| {
            let r = slot2[p] as usize;
            let (l, _) = locate(&low[r * SUB..(r + 1) * SUB], within);
            ((b as u32) << 16) | (((p % SUB) as u32) << 8) | l as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64, counter form: the i-th output of a generator seeded with `seed`
    /// (mirrored in tools/reference/teal_hist_check.py).
    fn splitmix(seed: u64, i: u64) -> u64 {
        let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): 53 random bits, offset by half an ulp.
    fn unif(seed: u64, i: u64) -> f64 {
        ((splitmix(seed, i) >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Box-Muller (cosine branch only): N(mean, std^2), as f32.
    fn gaussian(n: usize, seed: u64, mean: f64, std: f64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let (u1, u2) = (unif(seed, 2 * i), unif(seed, 2 * i + 1));
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (mean + std * z) as f32
            })
            .collect()
    }

    /// Inverse CDF: Laplace(loc, b), as f32.
    fn laplace(n: usize, seed: u64, loc: f64, b: f64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let d = unif(seed, i) - 0.5;
                (loc - b * d.signum() * (1.0 - 2.0 * d.abs()).ln()) as f32
            })
            .collect()
    }

    const LEVELS: [f64; 6] = [0.25, 0.4, 0.5, 0.65, 0.75, 0.9];

    fn check_both_methods(values: &[f32], what: &str) {
        let exact = abs_quantiles(values, &LEVELS);
        let h = TealHistogram::build(values);
        for (&s, &t) in LEVELS.iter().zip(&exact) {
            let z_abs = zeroed_fraction(values, t);
            let z_teal = zeroed_fraction(values, h.threshold(s));
            assert!((z_abs - s).abs() <= 0.001, "{what} abs s={s}: {z_abs}");
            assert!(z_abs >= s, "{what} abs s={s}: {z_abs} below target");
            assert!((z_teal - s).abs() <= 0.005, "{what} teal s={s}: {z_teal}");
        }
    }

    #[test]
    fn gaussian_both_methods_hit_targets() {
        check_both_methods(&gaussian(1_000_000, 1, 0.0, 1.0), "gaussian");
    }

    #[test]
    fn laplace_both_methods_hit_targets() {
        check_both_methods(&laplace(1_000_000, 2, 0.0, 0.7), "laplace");
    }

    /// The reason for `--quantile abs`: on a shifted site TEAL's signed-quantile reading misses.
    #[test]
    fn shifted_gaussian_signed_reading_misses_exact_hits() {
        let v = gaussian(1_000_000, 3, 0.3, 1.0);
        let h = TealHistogram::build(&v);
        let exact = abs_quantiles(&v, &LEVELS);
        for (&s, &t) in LEVELS.iter().zip(&exact) {
            let err_abs = (zeroed_fraction(&v, t) - s).abs();
            let err_teal = (zeroed_fraction(&v, h.threshold(s)) - s).abs();
            assert!(err_abs <= 0.001, "s={s}: exact misses by {err_abs}");
            // e.g. s = 0.5: TEAL zeroes Phi(0.674) - Phi(-1.274) = 0.649.
            assert!(err_teal > 0.02, "s={s}: teal misses by only {err_teal}");
            assert!(err_teal > 10.0 * err_abs);
        }
    }

    /// Same data and numbers as tools/reference/teal_hist_check.py, which mirrors TEAL's torch
    /// code (find_histogram + Distribution.icdf) in numpy float32.
    #[test]
    fn matches_python_reference() {
        // The script prints (n = 1_000_003, seeds 11 and 12). Data are generated bit-identically
        // (integer PRNG, glibc ln/cos, cast to f32), and the histogram arithmetic is the same
        // float32 sequence, so the numbers agree exactly on this machine. Tolerance 1e-6 leaves
        // room for a last-ulp libm difference elsewhere and is ~1/400 of a bin width (4.6e-4 for
        // N(0,1)), so a half-bin shift or a wrong bound rank would fail.
        let g = gaussian(1_000_003, 11, 0.0, 1.0);
        let hg = TealHistogram::build(&g);
        let l = laplace(1_000_003, 12, 0.0, 1.0);
        let hl = TealHistogram::build(&l);
        let close = |got: f32, want: f32| (got - want).abs() <= 1e-6;
        assert!(
            close(hg.lo, -2.319_584_8) && close(hg.hi, 2.328_145),
            "{hg:?}"
        );
        assert!(close(hl.min, -14.580_065) && close(hl.max, 15.169_753));
        assert_eq!(
            (hg.counts[0], hg.counts[TealHistogram::BINS - 1]),
            (10_000, 10_000)
        );
        let cases: [(&TealHistogram, f64, f32); 4] = [
            (&hg, 0.5, 0.675_617_75),
            (&hg, 0.9, 1.648_300_6),
            (&hl, 0.25, 0.286_884_6),
            (&hl, 0.75, 1.388_687_6),
        ];
        for (h, s, want) in cases {
            let got = h.threshold(s);
            assert!(close(got, want), "s={s}: {got} vs python {want}");
        }
        assert!(close(abs_quantiles(&g, &[0.5])[0], 0.675_303_9));
    }

    /// Straightforward reference: full sort, torch's upper_bound binning, for comparison.
    fn naive_build(values: &[f32]) -> TealHistogram {
        let mut s = values.to_vec();
        s.sort_by(f32::total_cmp);
        let n = s.len();
        let (lr, hr) = teal_bound_ranks(n);
        let (min, lo, hi, max) = (s[0], s[lr], s[hr], s[n - 1]);
        let edges = teal_edges(min, lo, hi, max);
        let mut counts = vec![0u64; TealHistogram::BINS];
        for &x in values {
            let p = upper_bound(&edges, x) - 1;
            counts[p.min(TealHistogram::BINS - 1)] += 1;
        }
        TealHistogram {
            lo,
            hi,
            min,
            max,
            counts,
            total: n as u64,
        }
    }

    #[test]
    fn build_matches_naive_reference() {
        let g = gaussian(200_000, 5, 0.1, 2.0);
        assert_eq!(TealHistogram::build(&g), naive_build(&g));
        // Coarsely quantised values sit exactly on many edges and repeat the bounds.
        let q: Vec<f32> = g.iter().map(|x| (x * 64.0).round() / 64.0).collect();
        assert_eq!(TealHistogram::build(&q), naive_build(&q));
        // fp16-like grid, as TEAL's fp16 activations.
        let q: Vec<f32> = g.iter().map(|x| (x * 1024.0).round() / 1024.0).collect();
        assert_eq!(TealHistogram::build(&q), naive_build(&q));
        for n in [1, 2, 3, 99, 100, 101, 257] {
            let v = gaussian(n, 6, 0.0, 1.0);
            assert_eq!(TealHistogram::build(&v), naive_build(&v), "n={n}");
        }
    }

    #[test]
    fn teal_layout() {
        let v = gaussian(100_000, 7, 0.0, 1.0);
        let h = TealHistogram::build(&v);
        assert_eq!(h.counts.len(), TealHistogram::BINS);
        assert_eq!(h.edges().len(), TealHistogram::BINS + 1);
        assert_eq!(h.total, 100_000);
        // k = 1000 values below lo, k - 1 = 999 above hi (TEAL's asymmetric ranks).
        assert_eq!(h.counts[0], 1000);
        assert_eq!(h.counts[TealHistogram::BINS - 1], 1000); // [hi, max] includes hi itself
        let e = h.edges();
        assert_eq!((e[0], e[1], e[9999], e[10000]), (h.min, h.lo, h.hi, h.max));
        let mut s = v.clone();
        s.sort_by(f32::total_cmp);
        assert_eq!((h.lo, h.hi), (s[1000], s[99_000]));
        // TEAL reads cum[i] at centre i: half a bin below the histogram's own quantile.
        let q = h.icdf(0.5);
        let mut run = 0u64;
        let i = h.counts.iter().position(|&c| {
            run += c;
            run >= 50_000
        });
        let (i, c) = (i.unwrap(), h.centers());
        assert!(
            q >= c[i - 1] && q <= c[i],
            "{q} not in [{}, {}]",
            c[i - 1],
            c[i]
        );
        assert!(q < e[i + 1]);
    }

    #[test]
    fn exact_quantile_definition() {
        // |x| sorted: 0, 0, 1, 2, 3, 4, 5, 6, 7, 8 (with a negative zero).
        let v = [3.0, -0.0, 0.0, -1.0, 2.0, -4.0, 5.0, 6.0, -7.0, 8.0f32];
        let t = abs_quantiles(&v, &[0.0, 0.1, 0.2, 0.3, 0.25, 0.5, 0.99, 0.999_999]);
        assert_eq!(t, vec![-1.0, 0.0, 0.0, 1.0, 1.0, 3.0, 8.0, 8.0]);
        assert!(t[1].is_sign_positive());
        assert_eq!(zeroed_fraction(&v, t[3]), 0.3);
        assert_eq!(zeroed_fraction(&v, -1.0), 0.0);
        assert_eq!(zeroed_fraction(&v, 0.0), 0.2);
        // 0.3 * 10 = 3.0000000000000004 in f64: the rank must still be 3, not 4.
        assert_eq!(abs_rank(0.3, 10), Some(2));
        assert_eq!(abs_rank(0.7, 10), Some(6));
        for n in 1..200usize {
            for s in [0.01, 0.1, 0.25, 0.3, 0.5, 0.65, 0.7, 0.9, 0.99] {
                let m = abs_rank(s, n).unwrap() + 1;
                assert!(m as f64 / n as f64 >= s && (m == 1 || ((m - 1) as f64 / n as f64) < s));
            }
        }
    }

    #[test]
    fn selection_matches_sort() {
        let mut seed = 0;
        for n in [1usize, 2, 3, 10, 1000, 70_000] {
            for dup in [false, true] {
                seed += 1;
                let mut v = gaussian(n, seed, 0.0, 1e-3);
                if dup {
                    for (i, x) in v.iter_mut().enumerate() {
                        *x = [(*x * 3000.0).round(), -0.0, 0.0][i % 3];
                    }
                }
                let mut s = v.clone();
                s.sort_by(f32::total_cmp);
                let ranks: Vec<usize> = (0..n).step_by((n / 37).max(1)).chain([n - 1]).collect();
                let got = select_ranks(&v, signed_key, &ranks);
                for (&r, &k) in ranks.iter().zip(&got) {
                    assert_eq!(k, signed_key(s[r]), "n={n} r={r}");
                }
                let mut a: Vec<u32> = v.iter().map(|&x| abs_key(x)).collect();
                a.sort_unstable();
                let got = select_ranks(&v, abs_key, &ranks);
                for (&r, &k) in ranks.iter().zip(&got) {
                    assert_eq!(k, a[r]);
                }
            }
        }
        // Many distinct buckets in one call.
        let v = gaussian(50_000, 99, 0.0, 10.0);
        let levels: Vec<f64> = (1..100).map(|i| i as f64 / 100.0).collect();
        let t = abs_quantiles(&v, &levels);
        let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        a.sort_by(f32::total_cmp);
        for (s, t) in levels.iter().zip(t) {
            assert_eq!(t, a[(s * 50_000.0).round() as usize - 1]);
        }
    }

    #[test]
    fn edge_cases() {
        // All equal.
        let v = vec![0.25f32; 1000];
        let h = TealHistogram::build(&v);
        assert_eq!((h.lo, h.hi, h.total), (0.25, 0.25, 1000));
        for s in [0.0, 0.5, 0.99] {
            let t = h.threshold(s);
            assert!(t.is_finite());
        }
        assert_eq!(h.threshold(0.5), 0.25);
        assert_eq!(abs_quantiles(&v, &[0.0, 0.5]), vec![-1.0, 0.25]);
        assert_eq!(zeroed_fraction(&v, 0.25), 1.0);
        // Tiny inputs.
        for v in [vec![1.5f32], vec![-2.0, 1.0], vec![0.5, -3.0, 2.0]] {
            let h = TealHistogram::build(&v);
            assert_eq!(h.total, v.len() as u64);
            let mut s = v.clone();
            s.sort_by(f32::total_cmp);
            assert_eq!(
                (h.min, h.lo, h.hi, h.max),
                (s[0], s[0], s[v.len() - 1], s[v.len() - 1])
            );
            for s in [0.0, 0.25, 0.5, 0.9, 0.999] {
                assert!(h.threshold(s).is_finite());
            }
            let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            a.sort_by(f32::total_cmp);
            assert_eq!(abs_quantiles(&v, &[0.999])[0], a[v.len() - 1]);
            assert_eq!(abs_quantiles(&v, &[1e-9])[0], a[0]);
        }
        // Empty.
        assert_eq!(abs_quantiles(&[], &[0.0, 0.5]), vec![-1.0, -1.0]);
        assert_eq!(TealHistogram::build(&[]).threshold(0.5), 0.0);
        assert_eq!(zeroed_fraction(&[], 1.0), 0.0);
        assert!(density(&[], 10, 0.0, 1.0).is_empty());
        // s = 0 and s close to 1.
        let g = gaussian(100_000, 8, 0.0, 1.0);
        let h = TealHistogram::build(&g);
        assert_eq!(h.threshold(0.0), 0.0);
        assert_eq!(abs_quantiles(&g, &[0.0])[0], -1.0);
        let t = abs_quantiles(&g, &[0.999_99])[0];
        assert!(zeroed_fraction(&g, t) >= 0.999_99);
        let ht = h.threshold(0.999_99);
        assert!(ht > 3.0 && ht <= h.max, "{ht}");
        // Negative zeros: |-0| = 0, zeroed by any t >= 0.
        let z = [-0.0f32, -0.0, 0.0, 1.0];
        assert_eq!(abs_quantiles(&z, &[0.5, 0.75]), vec![0.0, 0.0]);
        assert_eq!(zeroed_fraction(&z, 0.0), 0.75);
        let h = TealHistogram::build(&z);
        assert_eq!(h.total, 4);
        // NaN / Inf: reported, and nothing panics.
        let mut bad = g.clone();
        bad[12_345] = f32::NAN;
        bad[20_000] = f32::INFINITY;
        assert_eq!(check_finite(&bad), Err(12_345));
        assert_eq!(check_finite(&g), Ok(()));
        assert_eq!(check_finite(&[f32::NEG_INFINITY]), Err(0));
        let _ = TealHistogram::build(&bad).threshold(0.5);
        let _ = abs_quantiles(&bad, &LEVELS);
        let _ = TealHistogram::build(&[f32::NAN, f32::NAN]).threshold(0.5);
        let _ = abs_quantiles(&[f32::NAN], &[0.5]);
    }

    #[test]
    fn fits_recover_parameters() {
        let g = gaussian(1_000_000, 9, 0.5, 2.0);
        let (m, s) = fit_gaussian(&g);
        assert!(
            (m - 0.5).abs() < 0.01 && (s / 2.0 - 1.0).abs() < 0.01,
            "{m} {s}"
        );
        let l = laplace(1_000_000, 10, -0.2, 0.8);
        let (loc, b) = fit_laplace(&l);
        assert!(
            (loc + 0.2).abs() < 0.01 && (b / 0.8 - 1.0).abs() < 0.01,
            "{loc} {b}"
        );
        // Laplace std is b * sqrt(2).
        let (_, s) = fit_gaussian(&l);
        assert!((s / (0.8 * 2f64.sqrt()) - 1.0).abs() < 0.02);
        assert_eq!(fit_laplace(&[1.0, 3.0, 10.0, 2.0]), (2.5, 2.5));
    }

    #[test]
    fn densities_match_pdfs() {
        let g = gaussian(1_000_000, 13, 0.0, 1.0);
        let d = density(&g, 80, -4.0, 4.0);
        assert_eq!(d.len(), 80);
        let area: f64 = d.iter().map(|&(_, y)| y * 0.1).sum();
        assert!((area - 1.0).abs() < 1e-3);
        for &(x, y) in &d {
            assert!(
                (y - gaussian_pdf(x as f64, 0.0, 1.0)).abs() < 0.01,
                "{x} {y}"
            );
        }
        let a = abs_density(&g, 40, 4.0);
        for &(x, y) in &a {
            assert!(
                (y - 2.0 * gaussian_pdf(x as f64, 0.0, 1.0)).abs() < 0.02,
                "{x} {y}"
            );
        }
        let l = laplace(1_000_000, 14, 0.0, 1.0);
        for &(x, y) in &density(&l, 60, -3.0, 3.0) {
            assert!(
                (y - laplace_pdf(x as f64, 0.0, 1.0)).abs() < 0.01,
                "{x} {y}"
            );
        }
    }

    #[test]
    fn serde_roundtrip() {
        let h = TealHistogram::build(&gaussian(10_000, 15, 0.0, 1.0));
        let s = serde_json::to_string(&h).unwrap();
        let back: TealHistogram = serde_json::from_str(&s).unwrap();
        assert_eq!(h, back);
    }

    /// `cargo test --release -- --ignored perf --nocapture`: timings on 100M values.
    #[test]
    #[ignore]
    fn perf_100m() {
        let v = gaussian(100_000_000, 16, 0.0, 1.0);
        let t0 = std::time::Instant::now();
        let h = TealHistogram::build(&v);
        let t1 = t0.elapsed();
        let q = abs_quantiles(&v, &(1..20).map(|i| i as f64 * 0.05).collect::<Vec<_>>());
        let t2 = t0.elapsed() - t1;
        let z = zeroed_fraction(&v, q[9]);
        let t3 = t0.elapsed() - t1 - t2;
        check_finite(&v).unwrap();
        let t4 = t0.elapsed() - t1 - t2 - t3;
        eprintln!(
            "build {t1:?}, abs_quantiles(19 levels) {t2:?}, zeroed_fraction {t3:?}, \
             check_finite {t4:?}; t50={} z={z} teal t50={}",
            q[9],
            h.threshold(0.5)
        );
    }
}
