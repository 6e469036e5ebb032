#!/usr/bin/env python3
"""Cross-check of the llama.cpp reference with a plain numpy forward pass (float32, no cache tricks).

Reads an all-F32 Llama-architecture GGUF (e.g. the output of dequantize_gguf.py), runs window 0 of
the P512 protocol (token ids taken from results.json, as tokenized by llama.cpp) and compares the
per-token NLLs with the ones llama.cpp produced. It also checks the greedy continuation.

    cd tools/reference/llamacpp
    python3 dequantize_gguf.py "$(../../../scripts/fetch-assets.sh default)" out/smollm2-f32.gguf --verify
    python3 numpy_forward_check.py out/smollm2-f32.gguf [--results results.json] [--label f32]

Conventions (GGUF / llama.cpp "llama" arch): RMSNorm x * rsqrt(mean(x^2) + eps) * w; RoPE of type
NORM (rotates adjacent pairs (2i, 2i+1); convert_hf_to_gguf permutes q/k rows so this matches HF),
theta = rope.freq_base; GQA; causal softmax(q k^T / sqrt(d_head)); SwiGLU MLP
down(silu(gate(x)) * up(x)); output head = output.weight or, if absent, token_embd.weight (tied).
Matmuls are float32 (numpy BLAS); the final log-softmax is float64.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType


class Model:
    def __init__(self, path: str):
        r = GGUFReader(path)
        f = lambda k: r.fields[k].contents()  # noqa: E731
        arch = f("general.architecture")
        self.n_layer = f(f"{arch}.block_count")
        self.n_embd = f(f"{arch}.embedding_length")
        self.n_head = f(f"{arch}.attention.head_count")
        self.n_head_kv = f(f"{arch}.attention.head_count_kv")
        self.eps = np.float32(f(f"{arch}.attention.layer_norm_rms_epsilon"))
        self.theta = f(f"{arch}.rope.freq_base")
        self.d_head = self.n_embd // self.n_head
        self.w = {}
        for t in r.tensors:
            if t.tensor_type != GGMLQuantizationType.F32:
                raise SystemExit(f"{t.name} is {t.tensor_type.name}; run dequantize_gguf.py first")
            self.w[t.name] = np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])

    def rmsnorm(self, x, w):
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return (x / np.sqrt(ms + self.eps)).astype(np.float32) * w

    def rope(self, x, pos):
        # x: [T, H, D]; NORM rope: pairs (2i, 2i+1)
        d = self.d_head
        inv = self.theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = x0 * cos - x1 * sin
        y[..., 1::2] = x0 * sin + x1 * cos
        return y

    def logits(self, ids):
        T = len(ids)
        pos = np.arange(T)
        x = self.w["token_embd.weight"][np.asarray(ids)].copy()
        H, KV, D = self.n_head, self.n_head_kv, self.d_head
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rmsnorm(x, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(T, H, D)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(T, KV, D)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(T, KV, D)
            q, k = self.rope(q, pos), self.rope(k, pos)
            att = np.empty((T, H, D), dtype=np.float32)
            g = H // KV
            for hh in range(H):
                kv = hh // g
                s = (q[:, hh, :] @ k[:, kv, :].T) / np.float32(np.sqrt(D)) + mask
                s = s - s.max(axis=-1, keepdims=True)
                e = np.exp(s)
                att[:, hh, :] = (e / e.sum(axis=-1, keepdims=True)) @ v[:, kv, :]
            x = x + att.reshape(T, H * D) @ self.w[p + "attn_output.weight"].T
            h = self.rmsnorm(x, self.w[p + "ffn_norm.weight"])
            gt = h @ self.w[p + "ffn_gate.weight"].T
            up = h @ self.w[p + "ffn_up.weight"].T
            x = x + ((gt / (1 + np.exp(-gt))) * up) @ self.w[p + "ffn_down.weight"].T
        x = self.rmsnorm(x, self.w["output_norm.weight"])
        return x @ self.out.T


def log_softmax64(z):
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--results", default=os.path.join(here, "results.json"))
    ap.add_argument("--label", default="f32")
    ap.add_argument("--full", help="a --full-out JSON of reference.mjs: check --window N from it instead of window 0")
    ap.add_argument("--window", type=int, default=0)
    args = ap.parse_args()
    res = json.load(open(args.results))[args.label]
    m = Model(args.model)

    g = None if args.full else res.get("greedy")
    if g:
        ids = list(g["prompt_ids"])
        out = []
        for _ in range(g["n_predict"]):
            nxt = int(np.argmax(m.logits(ids)[-1]))
            out.append(nxt)
            ids.append(nxt)
        print(f"greedy numpy    {out}")
        print(f"greedy llama.cpp {g['ids']}  {'MATCH' if out == g['ids'] else 'DIFFER'}")

    p = res.get("ppl")
    if args.full:
        full = json.load(open(args.full))
        W = full["ppl"]["window"]
        p = {"window0_ids": full["text_ids_first_windows"][args.window * W:(args.window + 1) * W],
             "window0_nll": full["all_windows_nll"][args.window], "window0_argmax": None}
        res["greedy"] = None
    if p:
        ids = p["window0_ids"]
        lp = log_softmax64(m.logits(ids))
        nll = np.array([-lp[i - 1, ids[i]] for i in range(1, len(ids))])
        ref = np.array(p["window0_nll"])
        d = np.abs(nll - ref)
        argmax = lp[:-1].argmax(axis=-1)
        print(f"window {args.window}: numpy mean NLL {nll.mean():.8f}, llama.cpp {ref.mean():.8f}, "
              f"diff of means {nll.mean() - ref.mean():+.2e}")
        print(f"per-token |dNLL|: max {d.max():.2e} (token {int(d.argmax()) + 1}), mean {d.mean():.2e}, p99 {np.quantile(d, 0.99):.2e}")
        if p["window0_argmax"] is not None:
            print(f"argmax agreement with llama.cpp: {(argmax == np.array(p['window0_argmax'])).mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
