"""Independent PyTorch reference of TEAL's uniform method: transformers + torch from PyPI.

The model is Hugging Face's own LlamaForCausalLM, loaded by transformers from the same GGUF the
engine reads (transformers dequantizes it and un-permutes q/k itself); nothing here is shared
with the engine or with teal_reference.py (the numpy reference). TEAL's method as its code does
it (FasterDecoding/TEAL, read at 5baaec8, not copied; see README.md "What is mirrored"):

- activations grabbed by forward pre-hooks on q_proj (the q|k|v input), o_proj, gate_proj (the
  gate|up input) and down_proj of every layer, over the whole calibration windows;
- `find_histogram`: sorted values, 1 % order statistics as the inner range, 9,999 linspace
  edges plus min and max, `torch.histogram`, bin centers;
- `Distribution.icdf` on the cumulative counts, `t = icdf(0.5 + s / 2)`;
- `SparsifyFn`: `x * (x.abs() > t)` on the input of each of the seven projections (q, k, v from
  the q|k|v site's threshold, gate and up from gate|up's), every position (mode `all`).

Quality: protocol P512 (32 windows of 512 WikiText-2 tokens from llama.cpp's tokenizer, tokens
1..511 scored), dense and sparse on the same tokens: PPL, ratio, KL(dense || sparse), top-1
agreement, realized sparsity (exact zeros at each projection's input, parameter-weighted).

    pip install torch transformers accelerate gguf==0.19.0
    node tokenize.mjs ... (README.md)                  # out/smollm2/{c4,wikitext}.npy
    python3 teal_torch.py --model ~/.cache/teal/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tokens out/smollm2 --out results_torch_smollm2.json --compare results_smollm2.json
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

SITES = ("qkv", "o", "gateup", "down")
# projection -> (module path inside a decoder layer, site of its input)
PROJ = {
    "q": ("self_attn.q_proj", "qkv"),
    "k": ("self_attn.k_proj", "qkv"),
    "v": ("self_attn.v_proj", "qkv"),
    "o": ("self_attn.o_proj", "o"),
    "gate": ("mlp.gate_proj", "gateup"),
    "up": ("mlp.up_proj", "gateup"),
    "down": ("mlp.down_proj", "down"),
}
# site -> the module whose input is grabbed for it (the first projection reading the site)
SITE_MODULE = {}
for _path, _site in PROJ.values():
    SITE_MODULE.setdefault(_site, _path)


def find_histogram(acts, num_bins=10000, outlier_threshold=0.01):
    """TEAL's ActivationModule.find_histogram: counts and bin centers of the signed values."""
    acts = acts.flatten().sort().values
    n = acts.numel()
    lower = acts[int(outlier_threshold * n)]
    upper = acts[-int(outlier_threshold * n)]
    edges = torch.cat([acts[:1], torch.linspace(lower, upper, num_bins - 1), acts[-1:]])
    counts = torch.histogram(acts, bins=edges).hist
    centers = (edges[:-1] + edges[1:]) / 2
    return counts, centers


def icdf(counts, centers, q):
    """TEAL's Distribution.icdf: the value below which a fraction q of the mass lies."""
    cum = counts.cumsum(0)
    target = q * counts.sum()
    idx = int(torch.searchsorted(cum, target))
    if idx == 0:
        return float(centers[0])
    if idx == len(cum):
        return float(centers[-1])
    frac = (target - cum[idx - 1]) / (cum[idx] - cum[idx - 1])
    return float(centers[idx - 1] + frac * (centers[idx] - centers[idx - 1]))


def module(layer, path):
    m = layer
    for part in path.split("."):
        m = getattr(m, part)
    return m


def calibrate(model, tokens, samples, seq_len, sparsities, layers_per_pass):
    """Thresholds[s][site][layer] from the dense model's activations on the calibration windows."""
    layers = model.model.layers
    wins = [tokens[i * seq_len:(i + 1) * seq_len] for i in range(samples)]
    assert len(wins[-1]) == seq_len, "calibration text too short"
    out = {f"{s:.2f}": {site: [None] * len(layers) for site in SITES} for s in sparsities}
    for first in range(0, len(layers), layers_per_pass):
        group = range(first, min(first + layers_per_pass, len(layers)))
        grabbed = {(l, site): [] for l in group for site in SITES}
        hooks = []
        for l in group:
            for site in SITES:
                def grab(_m, args, key=(l, site)):
                    grabbed[key].append(args[0].detach().float().reshape(-1))
                hooks.append(module(layers[l], SITE_MODULE[site]).register_forward_pre_hook(grab))
        with torch.no_grad():
            for w in wins:
                model(torch.tensor(w, dtype=torch.long)[None])
        for h in hooks:
            h.remove()
        for (l, site), parts in grabbed.items():
            counts, centers = find_histogram(torch.cat(parts))
            for s in sparsities:
                out[f"{s:.2f}"][site][l] = icdf(counts, centers, 0.5 + s / 2) if s > 0 else 0.0
            parts.clear()
        print(f"[calib] layers {first}..{group[-1]} done", flush=True)
    return out


def evaluate(model, tokens, chunks, ctx, thresholds):
    """P512, dense and sparse logits of each window (thresholds[site][layer]; None: dense
    against itself). Returns the sums over scored tokens and the zero counts per projection."""
    layers = model.model.layers
    counts = {(l, p): [0, 0] for l in range(len(layers)) for p in PROJ}
    sparse = {"on": False}
    hooks = []
    if thresholds is not None:
        for l, layer in enumerate(layers):
            for p, (path, site) in PROJ.items():
                def sparsify(_m, args, t=thresholds[site][l], key=(l, p)):
                    if not sparse["on"]:
                        return None
                    x = args[0]
                    y = x * (x.abs() > t)
                    counts[key][0] += int((y == 0).sum())
                    counts[key][1] += y.numel()
                    return (y,) + args[1:]
                hooks.append(module(layer, path).register_forward_pre_hook(sparsify))
    nll, nll_d, kl, agree, scored = 0.0, 0.0, 0.0, 0, 0
    for i in range(chunks):
        w = torch.tensor(tokens[i * ctx:(i + 1) * ctx], dtype=torch.long)[None]
        sparse["on"] = False
        ld = model(w).logits[0, :-1].double().log_softmax(-1)
        sparse["on"] = thresholds is not None
        ls = model(w).logits[0, :-1].double().log_softmax(-1) if sparse["on"] else ld
        target = w[0, 1:]
        nll += float(-ls.gather(1, target[:, None]).sum())
        nll_d += float(-ld.gather(1, target[:, None]).sum())
        kl += float((ld.exp() * (ld - ls)).sum())
        agree += int((ld.argmax(-1) == ls.argmax(-1)).sum())
        scored += target.numel()
    for h in hooks:
        h.remove()
    return nll, nll_d, kl, agree, scored, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--tokens", required=True, help="directory of tokenize.mjs's c4.npy, wikitext.npy")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--sparsities", default="0.25,0.40,0.50,0.65")
    ap.add_argument("--layers-per-pass", type=int, default=10,
                    help="layers whose activations are held at once during calibration")
    ap.add_argument("--compare", help="teal_reference.py's results file: thresholds side by side")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.model)), gguf_file=os.path.basename(args.model),
        dtype=torch.float32)
    model.eval()
    cfg = model.config
    c4 = np.load(os.path.join(args.tokens, "c4.npy")).tolist()
    wiki = np.load(os.path.join(args.tokens, "wikitext.npy")).tolist()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    t1 = time.time()
    thr = calibrate(model, c4, args.samples, args.seq_len, sparsities, args.layers_per_pass)
    t2 = time.time()
    hd = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    d, f = cfg.hidden_size, cfg.intermediate_size
    params = {"q": d * d, "k": d * kv, "v": d * kv, "o": d * d, "gate": d * f, "up": d * f,
              "down": f * d}
    quality = []
    for s in [0.0] + sparsities:
        th = thr[f"{s:.2f}"] if s > 0 else None
        nll, nll_d, kl, agree, n, counts = evaluate(model, wiki, args.chunks, args.ctx, th)
        row = {"s": s, "ppl": math.exp(nll / n), "dense_ppl": math.exp(nll_d / n),
               "ppl_ratio": math.exp((nll - nll_d) / n), "kl": kl / n, "top1": agree / n,
               "tokens_scored": n}
        if th is not None:
            site = {p: sum(counts[(l, p)][0] for l in range(cfg.num_hidden_layers)) /
                    sum(counts[(l, p)][1] for l in range(cfg.num_hidden_layers)) for p in PROJ}
            row["site_sparsity"] = site
            row["model_sparsity"] = sum(site[p] * params[p] for p in PROJ) / sum(params.values())
        quality.append(row)
        print(f"[eval] s={s:.2f}: " + json.dumps({k: v for k, v in row.items()
                                                  if k != "site_sparsity"}), flush=True)
    result = {
        "generator": "tools/reference/teal/teal_torch.py",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": os.path.basename(args.model),
        "calibration": {"text": "c4.npy", "samples": args.samples, "seq_len": args.seq_len},
        "eval": {"text": "wikitext.npy", "chunks": args.chunks, "ctx": args.ctx, "mode": "all"},
        "thresholds": thr,
        "quality": quality,
        "timing_s": {"load": t1 - t0, "calibration": t2 - t1, "eval": time.time() - t2},
    }
    if args.compare:
        ref = json.load(open(args.compare))["thresholds"]["teal_icdf"]
        worst = max(abs(a - b) / max(abs(b), 1e-12)
                    for s in thr for site in SITES
                    for a, b in zip(thr[s][site], ref[s][site]))
        result["thresholds_max_rel_diff_vs_numpy_reference"] = worst
        print(f"[compare] thresholds vs {args.compare}: max relative difference {worst:.2e}")
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
