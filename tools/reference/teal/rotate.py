#!/usr/bin/env python3
"""Rotated residual stream for activation sparsity (experiment; after LaRoSA, arXiv 2507.01299).

TEAL zeroes small entries of each projection's input in the model's own basis. An orthogonal
change of basis of the residual stream leaves the dense model's function unchanged (RMSNorm
only sees the mean square, which a rotation keeps) but changes which entries are small. In the
principal axes of the normalized hidden states (the eigenvectors of their second moment, largest
first), most of each token's energy sits in fewer coordinates, so zeroing the same share of
coordinates drops less of it.

This script writes a rotated copy of a Llama GGUF, all F32, that any engine loads unchanged:

  u = x / rms(x)   the normalized residual at the attention and MLP inputs of every layer
  C = sum u u^T     over the calibration tokens (float64), Q = its eigenvectors, largest first
  token_embd  E  -> E Q                 (each token's row rotated)
  output      W  -> W diag(g_out) Q     (the head, untied from the embedding)
  attn_q/k/v, ffn_gate/up  W -> W diag(g) Q   (the norm weight g folded in; the norms become 1)
  attn_output, ffn_down    W -> Q^T W   (their outputs are written to the rotated stream)

Usage:
    python3 rotate.py MODEL.gguf OUT.gguf --tokens IDS.json [--windows 4 --len 2048]

IDS.json: a JSON list of token ids (e.g. `teal tokenize --json` of the calibration text).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "llamacpp"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import gguf  # noqa: E402
from gguf import GGUFReader, GGUFWriter  # noqa: E402

from dequantize_gguf import raw_value, arch_of, dequantize_tensor  # noqa: E402
from teal_reference import Model, log  # noqa: E402


def second_moments(m: Model, ids, n_windows, win):
    """The second moment of x / rms(x) over every norm input of every layer (float64)."""
    c_res = np.zeros((m.d, m.d), dtype=np.float64)
    for i in range(n_windows):
        x = m.emb[np.asarray(ids[i * win:(i + 1) * win])]
        for l in range(m.n_layer):
            seen = {}

            def collect(site, a, seen=seen):
                seen[site] = a

            x = m.layer(l, x, sp=None, collect=collect)
            L = m.layers[l]
            if not (np.all(L["attn_norm"] != 0) and np.all(L["ffn_norm"] != 0)):
                raise SystemExit(f"layer {l}: a norm weight is 0; x / rms(x) cannot be recovered")
            for site, norm in (("qkv", L["attn_norm"]), ("gateup", L["ffn_norm"])):
                u = (seen[site] / norm).astype(np.float64)
                c_res += u.T @ u
        log(f"window {i + 1}/{n_windows}")
    return c_res


def eig_desc(c):
    w, v = np.linalg.eigh(c)
    order = np.argsort(w)[::-1]
    return w[order], v[:, order]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("output")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--len", type=int, default=2048)
    args = ap.parse_args()

    ids = json.load(open(args.tokens))
    if isinstance(ids, dict):
        ids = ids["tokens"]
    need = args.windows * args.len
    if len(ids) < need:
        raise SystemExit(f"{args.tokens}: {len(ids)} tokens, need {need}")
    m = Model(args.model)
    if m.arch != "llama":
        raise SystemExit("only llama GGUFs (q/k row order of convert_hf_to_gguf) are handled")
    t0 = time.time()
    c_res = second_moments(m, ids, args.windows, args.len)
    lam, Q = eig_desc(c_res)
    Q = Q.astype(np.float32)
    share = np.cumsum(lam) / lam.sum()
    log(f"second moments in {time.time() - t0:.0f}s; energy in the first 10/25/50 % of axes: "
        + " / ".join(f"{share[int(f * m.d) - 1]:.3f}" for f in (0.1, 0.25, 0.5)))

    reader = GGUFReader(args.model)
    writer = GGUFWriter(args.output, arch_of(reader))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        val, vtype, sub = raw_value(field)
        if field.name == gguf.Keys.General.FILE_TYPE:
            val = int(gguf.LlamaFileType.ALL_F32)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(val)
        writer.add_key_value(field.name, val, vtype, sub_type=sub)
    raw = {t.name: dequantize_tensor(t) for t in reader.tensors}
    out = {}
    g_out = raw["output_norm.weight"]
    head = raw.get("output.weight", raw["token_embd.weight"])
    out["token_embd.weight"] = raw["token_embd.weight"] @ Q
    out["output_norm.weight"] = np.ones_like(g_out)
    out["output.weight"] = (head * g_out[None, :]) @ Q
    for l in range(m.n_layer):
        p = f"blk.{l}."
        ga, gf = raw[p + "attn_norm.weight"], raw[p + "ffn_norm.weight"]
        out[p + "attn_norm.weight"] = np.ones_like(ga)
        out[p + "ffn_norm.weight"] = np.ones_like(gf)
        for name, gw in (("attn_q", ga), ("attn_k", ga), ("attn_v", ga), ("ffn_gate", gf), ("ffn_up", gf)):
            out[p + name + ".weight"] = (raw[p + name + ".weight"] * gw[None, :]) @ Q
        out[p + "attn_output.weight"] = Q.T @ raw[p + "attn_output.weight"]
        out[p + "ffn_down.weight"] = Q.T @ raw[p + "ffn_down.weight"]
    names = [t.name for t in reader.tensors]
    if "output.weight" not in names:
        names.append("output.weight")
    for n in names:
        if n not in out:
            raise SystemExit(f"tensor {n} not handled")
        writer.add_tensor(n, np.ascontiguousarray(out[n].astype(np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
