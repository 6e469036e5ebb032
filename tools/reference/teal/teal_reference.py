#!/usr/bin/env python3
"""Independent numpy (float32) reference of TEAL (arXiv 2408.14690, code FasterDecoding/TEAL).

Pipeline (see README.md in this folder for what is mirrored from TEAL's code and every deliberate
difference):

  1. load a Llama / Qwen2 GGUF and dequantize every tensor to float32 (gguf.quants.dequantize);
  2. greedy sanity check of the dense forward (optional, --greedy-expect);
  3. calibration: the first --calib-windows non-overlapping windows of --calib-len tokens of the
     tokenized calibration text, each run dense from position 0, layer by layer over all windows
     (as TEAL's grab_acts.py); every value at the four sites of every layer is collected:
        qkv    = post-RMSNorm attention input (input of q, k, v)
        o      = attention output, heads concatenated (input of o)
        gateup = post-RMSNorm MLP input (input of gate, up)
        down   = act(gate) * up (input of down)
     and TEAL's 10,000-bin histogram (1%/99% order statistics + two outlier bins) is built per
     (layer, site); thresholds t(s) = TEAL icdf(0.5 + s/2) and the exact |x| quantile
     sorted(|x|)[ceil(s n) - 1];
  4. quality: P512 on the tokenized evaluation text (first --windows non-overlapping windows of
     --ctx tokens, each from an empty cache, score tokens 1..ctx-1), dense and sparse (uniform s at
     the seven projections, rule x * (|x| > t)), PPL, ratio, KL(dense || sparse), top-1 agreement,
     realized sparsity per projection (exact zeros of the projection inputs) and the
     parameter-weighted model-wide sparsity. --mode half sparsifies only the last ctx // 2
     positions of each window (TEAL's rule) and then scores only the tokens they predict and counts
     zeros only at them, as TEAL's eval and the engine's `--mode half` do.

Token ids come from tokenize.mjs (llama.cpp's tokenizer via node-llama-cpp, no BOS, no special-token
parsing); run it first (the README has the commands).

    python3 teal_reference.py --model /root/.cache/teal/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --tokens out/smollm2 --out results_smollm2.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from fractions import Fraction

# One BLAS thread by default: on the shared 2-core machine OpenBLAS's two spinning threads ran at
# half the speed of one under load. Override with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

SITES = ("qkv", "o", "gateup", "down")
PROJS = ("q", "k", "v", "o", "gate", "up", "down")
PROJ_SITE = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gateup", "up": "gateup", "down": "down"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Model: GGUF -> float32, HF layout
# ---------------------------------------------------------------------------------------------
class Model:
    def __init__(self, path: str):
        from gguf import GGUFReader, GGMLQuantizationType
        from gguf.quants import dequantize

        r = GGUFReader(path)
        f = lambda k: r.fields[k].contents()  # noqa: E731
        self.arch = f("general.architecture")
        a = self.arch
        if a not in ("llama", "qwen2"):
            raise SystemExit(f"unsupported architecture {a}")
        self.n_layer = int(f(f"{a}.block_count"))
        self.d = int(f(f"{a}.embedding_length"))
        self.ffn = int(f(f"{a}.feed_forward_length"))
        self.n_head = int(f(f"{a}.attention.head_count"))
        self.n_kv = int(f(f"{a}.attention.head_count_kv"))
        self.eps = np.float32(f(f"{a}.attention.layer_norm_rms_epsilon"))
        self.theta = float(f(f"{a}.rope.freq_base"))
        self.hd = self.d // self.n_head
        w = {}
        for t in r.tensors:
            shape = tuple(reversed([int(x) for x in t.shape]))
            if t.tensor_type == GGMLQuantizationType.F32:
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w[t.name] = np.ascontiguousarray(arr.reshape(shape))
        self.emb = w.pop("token_embd.weight")
        self.lm_head = w.pop("output.weight", None)
        self.tied = self.lm_head is None
        if self.tied:
            self.lm_head = self.emb
        self.out_norm = w.pop("output_norm.weight")
        self.vocab = self.emb.shape[0]
        self.layers = []
        for l in range(self.n_layer):
            p = f"blk.{l}."
            L = {
                "attn_norm": w.pop(p + "attn_norm.weight"),
                "ffn_norm": w.pop(p + "ffn_norm.weight"),
                "q": w.pop(p + "attn_q.weight"),
                "k": w.pop(p + "attn_k.weight"),
                "v": w.pop(p + "attn_v.weight"),
                "o": w.pop(p + "attn_output.weight"),
                "gate": w.pop(p + "ffn_gate.weight"),
                "up": w.pop(p + "ffn_up.weight"),
                "down": w.pop(p + "ffn_down.weight"),
            }
            for b in ("q", "k", "v"):
                L["b" + b] = w.pop(p + f"attn_{b}.bias", None)
            if self.arch == "llama":
                # convert_hf_to_gguf permuted q/k rows for llama.cpp's interleaved RoPE:
                # GGUF row h*hd + 2k + i  <-  HF row h*hd + i*(hd/2) + k.  Undo it; use NeoX RoPE.
                L["q"] = self._unpermute(L["q"], self.n_head)
                L["k"] = self._unpermute(L["k"], self.n_kv)
            self.layers.append(L)
        if w:
            raise SystemExit(f"unused tensors: {sorted(w)[:8]}")
        # parameter counts (the weights of the model-wide sparsity)
        L0 = self.layers[0]
        self.params = {p: int(L0[p].size) for p in PROJS}
        inv = 1.0 / (self.theta ** (np.arange(0, self.hd, 2, dtype=np.float64) / self.hd))
        self._inv_freq = inv
        self._rope_cache = {}

    def _unpermute(self, W, nh):
        hd = self.hd
        return np.ascontiguousarray(
            W.reshape(nh, hd // 2, 2, W.shape[1]).transpose(0, 2, 1, 3).reshape(nh * hd, W.shape[1]))

    def config(self):
        return dict(arch=self.arch, n_layer=self.n_layer, d_model=self.d, d_ffn=self.ffn, n_head=self.n_head,
                    n_kv_head=self.n_kv, head_dim=self.hd, rope_theta=self.theta, rms_eps=float(self.eps),
                    vocab=self.vocab, tied_embeddings=self.tied, params_per_layer=self.params)

    def rope(self, T):
        if T not in self._rope_cache:
            ang = np.arange(T, dtype=np.float64)[:, None] * self._inv_freq[None, :]
            self._rope_cache[T] = (np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))
        return self._rope_cache[T]

    def rmsnorm(self, x, w):
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return (x * (np.float32(1.0) / np.sqrt(ms + self.eps))) * w

    def layer(self, l, x, sp=None, collect=None):
        """One block on x [T, d] (one sequence starting at position 0, causal).

        sp(l, proj, a) -> the input actually fed to projection proj (sparsifier), or None = dense.
        collect(site, a): called with the dense site tensors (calibration)."""
        L = self.layers[l]
        T = x.shape[0]
        H, KV, D = self.n_head, self.n_kv, self.hd
        h = self.rmsnorm(x, L["attn_norm"])
        if collect:
            collect("qkv", h)
        inp = (lambda p, a: a) if sp is None else (lambda p, a: sp(l, p, a))
        q = inp("q", h) @ L["q"].T
        k = inp("k", h) @ L["k"].T
        v = inp("v", h) @ L["v"].T
        if L["bq"] is not None:
            q += L["bq"]
            k += L["bk"]
            v += L["bv"]
        cos, sin = self.rope(T)
        cos, sin = cos[None], sin[None]

        def neox(t):  # t [n, T, D]; HF rotate_half convention
            t1, t2 = t[..., : D // 2], t[..., D // 2:]
            return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)

        q = neox(q.reshape(T, H, D).transpose(1, 0, 2))
        k = neox(k.reshape(T, KV, D).transpose(1, 0, 2))
        v = v.reshape(T, KV, D).transpose(1, 0, 2)
        g = H // KV  # query head h uses kv head h // g
        s = np.matmul(q.reshape(KV, g * T, D), k.transpose(0, 2, 1)).reshape(KV, g, T, T)
        s *= np.float32(1.0 / math.sqrt(D))
        s += np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        att = np.matmul(s.reshape(KV, g * T, T), v).reshape(H, T, D).transpose(1, 0, 2).reshape(T, H * D)
        del s
        if collect:
            collect("o", att)
        x = x + inp("o", att) @ L["o"].T
        h = self.rmsnorm(x, L["ffn_norm"])
        if collect:
            collect("gateup", h)
        gt = inp("gate", h) @ L["gate"].T
        up = inp("up", h) @ L["up"].T
        with np.errstate(over="ignore"):
            act = gt / (np.float32(1.0) + np.exp(-gt))  # SiLU
        m = act * up
        if collect:
            collect("down", m)
        return x + inp("down", m) @ L["down"].T

    def logits(self, x):
        return self.rmsnorm(x, self.out_norm) @ self.lm_head.T

    def forward(self, ids, sp=None):
        x = self.emb[np.asarray(ids)]
        for l in range(self.n_layer):
            x = self.layer(l, x, sp)
        return self.logits(x)


def log_softmax64(z):
    z = z.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


# ---------------------------------------------------------------------------------------------
# TEAL histogram + icdf (mirrors utils/utils.py: ActivationModule.find_histogram, Distribution.icdf)
# ---------------------------------------------------------------------------------------------
def teal_histogram(acts_sorted, num_bins=10000, outlier_threshold=0.01):
    """acts_sorted: 1-D float32, ascending. Returns (counts f32 [num_bins], edges f32 [num_bins+1],
    centers f32 [num_bins], bounds dict)."""
    n = acts_sorted.size
    k = int(outlier_threshold * n)
    lower = acts_sorted[k]
    upper = acts_sorted[-k]  # acts[n - k] (TEAL: acts[-int(0.01 * len)])
    main = np.linspace(np.float64(lower), np.float64(upper), num_bins - 1).astype(np.float32)
    edges = np.concatenate([acts_sorted[:1], main, acts_sorted[-1:]]).astype(np.float32)
    # torch.histogram with explicit edges: bin i = [e_i, e_{i+1}), the last bin closed.
    # The data are sorted, so counts come from searchsorted on the edges.
    left = np.searchsorted(acts_sorted, edges, side="left")
    left[-1] = np.searchsorted(acts_sorted, edges[-1], side="right")
    counts = np.diff(left).astype(np.float32)
    centers = ((edges[:-1] + edges[1:]) / np.float32(2)).astype(np.float32)
    bounds = dict(min=float(acts_sorted[0]), lo=float(lower), hi=float(upper), max=float(acts_sorted[-1]), n=int(n))
    return counts, edges, centers, bounds


class TealDistribution:
    """Distribution.icdf of TEAL, float32 like the torch tensors it works on (CPU)."""

    def __init__(self, counts, centers):
        self.centers = centers.astype(np.float32)
        self.total = np.float32(counts.astype(np.float32).sum(dtype=np.float32))
        # torch.cumsum on CPU accumulates float32 in double and stores float32
        self.cum = np.cumsum(counts.astype(np.float64)).astype(np.float32)

    def icdf(self, q):
        target = np.float32(np.float32(q) * self.total)
        idx = int(np.searchsorted(self.cum, target, side="left"))
        if idx == 0:
            return np.float32(self.centers[0])
        if idx == len(self.centers):
            return np.float32(self.centers[-1])
        lc, uc = self.cum[idx - 1], self.cum[idx]
        lv, uv = self.centers[idx - 1], self.centers[idx]
        frac = np.float32((target - lc) / (uc - lc))
        return np.float32(lv + frac * (uv - lv))

    def threshold(self, s):  # SparsifyFn.set_threshold
        return np.float32(0.0) if s == 0.0 else self.icdf(0.5 + s / 2)


def exact_abs_quantile(abs_sorted, s):
    """t = sorted(|x|)[ceil(s n) - 1]: the smallest t with #{|x| <= t} >= s n (s taken as the exact
    decimal, e.g. 0.65 = 13/20, so s*n is not perturbed by binary rounding)."""
    if s == 0.0:
        return np.float32(0.0)
    n = abs_sorted.size
    k = math.ceil(Fraction(str(s)) * n)
    return np.float32(abs_sorted[max(k, 1) - 1])


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------
def calibrate(m: Model, ids, n_windows, win, levels, exact_levels, hist_path=None):
    need = n_windows * win
    if len(ids) < need:
        raise SystemExit(f"calibration text has {len(ids)} tokens, need {need}")
    wins = [np.asarray(ids[i * win:(i + 1) * win]) for i in range(n_windows)]
    hs = [m.emb[w] for w in wins]
    levels_all = sorted(set(levels) | set(exact_levels))
    thr = {"teal_icdf": {s: {site: [] for site in SITES} for s in levels_all},
           "exact_abs_quantile": {s: {site: [] for site in SITES} for s in levels_all}}
    bounds = {site: [] for site in SITES}
    hist_counts = {site: [] for site in SITES}
    hist_edges = {site: [] for site in SITES}
    for l in range(m.n_layer):
        t0 = time.time()
        buf = {site: [] for site in SITES}
        collect = lambda site, a: buf[site].append(np.array(a, dtype=np.float32, copy=True))  # noqa: E731
        for i in range(n_windows):
            hs[i] = m.layer(l, hs[i], sp=None, collect=collect)
        t1 = time.time()
        for site in SITES:
            acts = np.concatenate(buf[site], axis=0).ravel()
            buf[site] = None
            acts.sort()
            counts, edges, centers, b = teal_histogram(acts)
            bounds[site].append(b)
            hist_counts[site].append(counts)
            hist_edges[site].append(edges)
            dist = TealDistribution(counts, centers)
            np.abs(acts, out=acts)
            acts.sort()
            for s in levels_all:
                thr["teal_icdf"][s][site].append(dist.threshold(s))
                thr["exact_abs_quantile"][s][site].append(exact_abs_quantile(acts, s))
            del acts
        log(f"calib layer {l:2d}: forward {t1 - t0:5.1f}s, histograms {time.time() - t1:5.1f}s; "
            + ", ".join(f"{site} t(0.5)={thr['teal_icdf'][levels_all[len(levels_all)//2]][site][-1]:.4g}" for site in SITES))
    if hist_path:
        np.savez_compressed(hist_path, **{f"{site}_counts": np.stack(hist_counts[site]) for site in SITES},
                            **{f"{site}_edges": np.stack(hist_edges[site]) for site in SITES})
    return thr, bounds


# ---------------------------------------------------------------------------------------------
# Quality (P512)
# ---------------------------------------------------------------------------------------------
class Sparsifier:
    """x * (|x| > t) on the input of each projection, with counts of exact zeros over the positions
    that are sparsified (every position in mode `all`; the last T // 2 in mode `half`, as TEAL's
    SparsifyFn.forward and the engine's eval). A dense Sparsifier (no thresholds) counts over the
    same positions."""

    def __init__(self, m: Model, thresholds, mode="all"):
        # thresholds: {site: [t per layer]} or None (dense; zeros are still counted)
        self.th = thresholds
        self.mode = mode
        self.zeros = np.zeros((m.n_layer, len(PROJS)), dtype=np.int64)
        self.total = np.zeros((m.n_layer, len(PROJS)), dtype=np.int64)

    @staticmethod
    def first_sparse(T, mode):
        """The first sparsified position of a T-token window: positions first.. run sparse."""
        if mode == "all":
            return 0
        if mode == "half":  # TEAL SparsifyFn.forward: the last T // 2 positions of the sequence
            return T - T // 2
        raise ValueError(mode)

    def __call__(self, l, proj, a):
        f = self.first_sparse(a.shape[0], self.mode)
        if self.th is not None:
            t = np.float32(self.th[PROJ_SITE[proj]][l])
            if f == 0:
                a = a * (np.abs(a) > t)
            else:
                a = np.concatenate([a[:f], a[f:] * (np.abs(a[f:]) > t)])
        j = PROJS.index(proj)
        self.zeros[l, j] += a[f:].size - np.count_nonzero(a[f:])
        self.total[l, j] += a[f:].size
        return a


def evaluate(m: Model, ids, n_windows, ctx, configs, mode, checkpoint=None):
    """configs: list of (label, method, s, thresholds-or-None); the first must be dense.
    checkpoint: file where the accumulated state is saved after every window and resumed from
    (only if it was written for the same configs, thresholds, mode and window length)."""
    import pickle
    need = n_windows * ctx
    if len(ids) < need:
        raise SystemExit(f"eval text has {len(ids)} tokens, need {need}")
    st = {c[0]: dict(nll=[], kl=0.0, top1=0, n=0, sp=Sparsifier(m, c[3], mode), secs=0.0) for c in configs}
    dense_label = configs[0][0]
    key = json.dumps([[c[0], c[3]] for c in configs] + [mode, ctx, hashlib.sha256(np.asarray(ids).tobytes()).hexdigest()])
    w0 = 0
    if checkpoint and os.path.exists(checkpoint):
        with open(checkpoint, "rb") as fh:
            saved = pickle.load(fh)
        if saved["key"] == key:
            w0 = min(saved["windows_done"], n_windows)
            for label, S in st.items():
                for f in ("nll", "kl", "top1", "n", "secs"):
                    S[f] = saved["st"][label][f]
                S["nll"] = S["nll"][:w0]
                S["sp"].zeros[:] = saved["st"][label]["zeros"]
                S["sp"].total[:] = saved["st"][label]["total"]
            if saved["windows_done"] > n_windows:
                raise SystemExit(f"{checkpoint} holds {saved['windows_done']} windows > --windows {n_windows}; remove it")
            log(f"resumed {w0} windows from {checkpoint}")
        else:
            log(f"{checkpoint} is for other settings; starting over")
    # Only the predictions made at sparsified positions are scored (mode `half`: those of the last
    # ctx // 2 positions, as TEAL's eval and the engine's): positions first..ctx-2 predict tokens
    # first+1..ctx-1. Every run, the dense one included, scores the same tokens.
    first = Sparsifier.first_sparse(ctx, mode)
    nsc = ctx - 1 - first
    if nsc <= 0:
        raise SystemExit(f"mode {mode} with windows of {ctx} tokens scores no token: a longer --ctx is needed")
    for w in range(w0, n_windows):
        ids_w = np.asarray(ids[w * ctx:(w + 1) * ctx])
        tgt = ids_w[first + 1:]
        lp_dense = None
        for label, method, s, th in configs:
            t0 = time.time()
            S = st[label]
            lg = m.forward(ids_w, sp=S["sp"])[first:-1]
            if lp_dense is None:
                lp_dense = log_softmax64(lg)
                p_dense = np.exp(lp_dense)
                am_dense = lp_dense.argmax(axis=-1)
                S["nll"].append(-lp_dense[np.arange(nsc), tgt])
                S["top1"] += nsc
            else:
                # row blocks keep the float64 temporaries small (vocab 152k for Qwen2)
                nll = np.empty(nsc)
                for i in range(0, nsc, 64):
                    j = min(i + 64, nsc)
                    lp = log_softmax64(lg[i:j])
                    nll[i:j] = -lp[np.arange(j - i), tgt[i:j]]
                    S["kl"] += float((p_dense[i:j] * (lp_dense[i:j] - lp)).sum())
                    S["top1"] += int((lp.argmax(axis=-1) == am_dense[i:j]).sum())
                S["nll"].append(nll)
            del lg
            S["n"] += nsc
            S["secs"] += time.time() - t0
        msg = ", ".join(f"{c[0]} {math.exp(np.concatenate(st[c[0]]['nll']).mean()):.4f}" for c in configs)
        log(f"window {w + 1}/{n_windows}: running PPL {msg}")
        del lp_dense, p_dense
        if checkpoint:
            saved = dict(key=key, windows_done=w + 1, st={
                label: dict(nll=S["nll"], kl=S["kl"], top1=S["top1"], n=S["n"], secs=S["secs"],
                            zeros=S["sp"].zeros, total=S["sp"].total) for label, S in st.items()})
            with open(checkpoint + ".tmp", "wb") as fh:
                pickle.dump(saved, fh)
            os.replace(checkpoint + ".tmp", checkpoint)
    dense_nll = np.concatenate(st[dense_label]["nll"])
    dense_ppl = math.exp(dense_nll.mean())
    total_params = sum(m.params.values())
    rows = []
    for label, method, s, th in configs:
        S = st[label]
        nll = np.concatenate(S["nll"])
        ppl = math.exp(nll.mean())
        zeros, total = S["sp"].zeros, S["sp"].total
        per_proj = {p: float(zeros[:, j].sum() / total[:, j].sum()) for j, p in enumerate(PROJS)}
        # parameter-weighted: every layer has the same shapes, so weight each projection's layer
        # average by its parameter count
        model_wide = sum(per_proj[p] * m.params[p] for p in PROJS) / total_params
        rows.append(dict(
            label=label, thresholds=method, s=s, mode=mode if th is not None else "dense",
            ppl=ppl, ppl_ratio=ppl / dense_ppl, mean_nll=float(nll.mean()),
            kl=S["kl"] / S["n"], top1=S["top1"] / S["n"], tokens_scored=int(S["n"]),
            realized_sparsity=per_proj, model_wide_sparsity=model_wide,
            realized_sparsity_per_layer={p: [float(x) for x in zeros[:, j] / total[:, j]] for j, p in enumerate(PROJS)},
            per_window_mean_nll=[float(x.mean()) for x in S["nll"]],
            seconds=S["secs"]))
    return rows


# ---------------------------------------------------------------------------------------------
def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32(x):
    return float(np.float32(x))


def markdown_table(rows):
    out = ["| run | thresholds | s | mode | PPL | ratio | KL | top-1 | " + " | ".join(PROJS) + " | model-wide |",
           "|" + "---|" * (9 + len(PROJS))]
    for r in rows:
        out.append(f"| {r['label']} | {r['thresholds'] or '-'} | {r['s']:.2f} | {r['mode']} | {r['ppl']:.4f} | "
                   f"{r['ppl_ratio']:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | "
                   + " | ".join(f"{r['realized_sparsity'][p]:.4f}" for p in PROJS)
                   + f" | {r['model_wide_sparsity']:.4f} |")
    return "\n".join(out)


def threshold_table(res, layers, s="0.50"):
    out = ["| layer | site | teal_icdf t | exact_abs_quantile t | hist lo (1%) | hist hi (99%) |",
           "|---|---|---|---|---|---|"]
    for l in layers:
        for site in SITES:
            b = res["histogram_bounds"][site][l]
            out.append(f"| {l} | {site} | {res['thresholds']['teal_icdf'][s][site][l]:.6g} | "
                       f"{res['thresholds']['exact_abs_quantile'][s][site][l]:.6g} | {b['lo']:.6g} | {b['hi']:.6g} |")
    return "\n".join(out)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        res = json.load(open(sys.argv[2]))
        print(markdown_table(res["quality"]))
        print()
        print(threshold_table(res, [0, res["model"]["n_layer"] // 2]))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file (llama or qwen2 architecture)")
    ap.add_argument("--tokens", required=True, help="folder with calib/eval .npy ids and tokens.json (from tokenize.mjs)")
    ap.add_argument("--calib-ids", default="c4.npy")
    ap.add_argument("--eval-ids", default="wikitext.npy")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--work", default=None, help="folder for large outputs (histograms, calibration cache); default: --tokens")
    ap.add_argument("--sparsities", default="0.25,0.40,0.50,0.65", help="s levels, TEAL icdf thresholds")
    ap.add_argument("--exact-sparsities", default="0.25,0.40,0.50,0.65", help="s levels evaluated with exact |x| quantile thresholds")
    ap.add_argument("--calib-windows", type=int, default=10)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=32, help="P512 windows")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--mode", default="all", choices=["all", "half"], help="which positions are sparsified in eval (half: the last ctx//2 of each window, which "
                    "alone are then scored and counted)")
    ap.add_argument("--greedy-expect", default=None, help="comma-separated ids the greedy continuation of tokens.json's prompt must give")
    ap.add_argument("--reuse-calib", action="store_true", help="reuse <work>/calib.json if present")
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()

    t_start = time.time()
    work = args.work or args.tokens
    os.makedirs(work, exist_ok=True)
    levels = [float(x) for x in args.sparsities.split(",") if x]
    exact_levels = [float(x) for x in args.exact_sparsities.split(",") if x]
    tokmeta = json.load(open(os.path.join(args.tokens, "tokens.json")))
    calib_ids = np.load(os.path.join(args.tokens, args.calib_ids))
    eval_ids = np.load(os.path.join(args.tokens, args.eval_ids))

    log(f"loading {args.model}")
    m = Model(args.model)
    log(f"config {m.config()}")
    t_load = time.time() - t_start

    greedy = None
    if "prompt" in tokmeta:
        ids = list(tokmeta["prompt"]["ids"])
        out = []
        for _ in range(12):
            nxt = int(np.argmax(m.forward(ids)[-1]))
            out.append(nxt)
            ids.append(nxt)
        greedy = dict(prompt=tokmeta["prompt"]["text"], prompt_ids=tokmeta["prompt"]["ids"], ids=out)
        if args.greedy_expect:
            exp = [int(x) for x in args.greedy_expect.split(",")]
            greedy["expected"] = exp
            greedy["match"] = out == exp
            log(f"greedy {out} {'MATCH' if out == exp else 'DIFFER from ' + str(exp)}")
            if out != exp:
                raise SystemExit("dense forward check failed")
        else:
            log(f"greedy {out}")

    calib_cache = os.path.join(work, "calib.json")
    t0 = time.time()
    if args.reuse_calib and os.path.exists(calib_cache):
        c = json.load(open(calib_cache))
        thr = {meth: {float(s): v for s, v in d.items()} for meth, d in c["thresholds"].items()}
        bounds = c["bounds"]
        log(f"reused calibration from {calib_cache}")
    else:
        thr, bounds = calibrate(m, calib_ids, args.calib_windows, args.calib_len, levels, exact_levels,
                                hist_path=os.path.join(work, "histograms.npz"))
        thr = {meth: {s: {site: [f32(x) for x in v] for site, v in d.items()} for s, d in dd.items()}
               for meth, dd in thr.items()}
        json.dump(dict(thresholds={meth: {str(s): v for s, v in d.items()} for meth, d in thr.items()}, bounds=bounds),
                  open(calib_cache, "w"))
    t_calib = time.time() - t0
    log(f"calibration {t_calib:.0f}s")

    rows = []
    t0 = time.time()
    if not args.skip_eval:
        configs = [("dense", None, 0.0, None)]
        configs += [(f"teal_icdf s={s:.2f}", "teal_icdf", s, thr["teal_icdf"][s]) for s in levels]
        configs += [(f"exact_abs_quantile s={s:.2f}", "exact_abs_quantile", s, thr["exact_abs_quantile"][s]) for s in exact_levels]
        rows = evaluate(m, eval_ids, args.windows, args.ctx, configs, args.mode,
                        checkpoint=os.path.join(work, f"eval_checkpoint_{args.mode}.pkl"))
    t_eval = time.time() - t0

    res = dict(
        generator="tools/reference/teal/teal_reference.py (numpy float32, independent of the Rust engine)",
        model=dict(path=args.model, file=os.path.basename(args.model), sha256=sha256_file(args.model), **m.config()),
        tokenizer=dict(call=tokmeta.get("call"), texts=tokmeta.get("texts")),
        greedy_check=greedy,
        protocol=dict(
            calibration=dict(text=args.calib_ids, windows=args.calib_windows, window_len=args.calib_len,
                             each_window="dense, from position 0 (no BOS)",
                             values_per_site={site: bounds[site][0]["n"] for site in SITES}),
            histogram="TEAL find_histogram: 10000 bins = outlier bin [min, acts[int(0.01n)]) + 9998 uniform bins "
                      "between acts[int(0.01n)] and acts[n-int(0.01n)] + outlier bin up to max (closed); "
                      "signed values, float32",
            thresholds=dict(teal_icdf="TEAL Distribution.icdf(0.5 + s/2) on the histogram (bin centers, linear "
                                      "interpolation of the cumulative counts)",
                            exact_abs_quantile="sorted(|x|)[ceil(s*n)-1] over the same values"),
            sites=dict(qkv="post-RMSNorm attention input -> q,k,v", o="attention output -> o",
                       gateup="post-RMSNorm MLP input -> gate,up", down="silu(gate)*up -> down"),
            rule="x * (|x| > t), per projection input, uniform s at all seven projections",
            eval=dict(text=args.eval_ids, protocol=f"P{args.ctx}", windows=args.windows, ctx=args.ctx,
                      scored=("tokens 1..ctx-1 of each window" if args.mode == "all" else
                              "tokens ctx-ctx//2+1..ctx-1 of each window (predicted by the sparsified "
                              "last ctx//2 positions)") + ", each window from an empty cache; the dense "
                             "run scores the same tokens",
                      sparsify_mode=args.mode,
                      kl="mean over scored positions of sum_v p_dense (log p_dense - log p_sparse)",
                      realized_sparsity="exact zeros / elements of each projection input, over the sparsified "
                                        "positions (all in mode all, the last ctx//2 in mode half) of all "
                                        "eval windows, all layers",
                      model_wide_sparsity="sum_p params_p * realized_p / sum_p params_p over q,k,v,o,gate,up,down"),
        ),
        thresholds={meth: {f"{s:.2f}": d for s, d in dd.items()} for meth, dd in thr.items()},
        histogram_bounds=bounds,
        quality=[{k: v for k, v in r.items() if k not in ("realized_sparsity_per_layer", "per_window_mean_nll")} for r in rows],
        dense_per_window_mean_nll=rows[0]["per_window_mean_nll"] if rows else None,
        timing_s=dict(load=round(t_load, 1), calibration=round(t_calib, 1), eval=round(t_eval, 1),
                      total=round(time.time() - t_start, 1)),
    )
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    if rows:
        with open(os.path.join(work, "quality_full.json"), "w") as fh:
            json.dump(rows, fh)
        print()
        print(markdown_table(rows))
    log(f"done in {time.time() - t_start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
