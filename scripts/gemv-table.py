#!/usr/bin/env python3
"""Summarize `cargo bench -p teal-kernels --bench gemv` results as a markdown table.

Usage: scripts/gemv-table.py [TARGET_DIR] [READ_GB_S]
Reads TARGET_DIR/criterion/<shape>/<dtype>/<case>/new/estimates.json (median times) and
prints, per shape and dtype, dense time, GB/s (and its ratio to READ_GB_S when given), and for
each sparsity the time ratio to dense next to the target 1.15 * (1 - s).
"""
import json
import os
import sys

root = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "target", "criterion")
bw = float(sys.argv[2]) if len(sys.argv) > 2 else None
rows = {}
for group in sorted(os.listdir(root)):
    gdir = os.path.join(root, group)
    if group == "report" or not os.path.isdir(gdir):
        continue
    model, _, shape = group.partition("_")  # criterion writes "8b/4096x4096" as "8b_4096x4096"
    for _ in [0]:
        for dtype in sorted(os.listdir(gdir)):
            ddir = os.path.join(gdir, dtype)
            if not os.path.isdir(ddir) or dtype == "report":
                continue
            for case in os.listdir(ddir):
                est = os.path.join(ddir, case, "new", "estimates.json")
                bench = os.path.join(ddir, case, "new", "benchmark.json")
                if not os.path.exists(est):
                    continue
                t = json.load(open(est))["median"]["point_estimate"] / 1e9
                thr = json.load(open(bench)).get("throughput") or {}
                rows.setdefault((model, shape, dtype), {})[case] = (t, thr.get("Bytes"))

print("| shape | dtype | dense ms | dense GB/s | of read bw | s=0 | s=0.5 (target 0.575) | s=0.75 (target 0.2875) |")
print("|---|---|---|---|---|---|---|---|")
for (model, shape, dtype), c in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], ["f32", "f16", "bf16", "q8", "q4"].index(kv[0][2]))):
    if "dense" not in c:
        continue
    td, b = c["dense"]
    gbs = b / td / 1e9 if b else float("nan")
    frac = f"{gbs / bw:.2f}" if bw else "-"
    r = lambda k: f"{c[k][0] / td:.3f}" if k in c else "-"
    print(f"| {model}/{shape} | {dtype} | {td * 1e3:.2f} | {gbs:.1f} | {frac} | {r('sparse0')} | {r('sparse0.5')} | {r('sparse0.75')} |")
