#!/usr/bin/env python3
"""Runs several builds of the `gemv_speed` example alternately and prints, per shape, format
and sparsity, the median GB/s of each build over the rounds (one process per build per round,
so a noisy neighbour hits every build alike).

    scripts/gemv-ab.py OLD_BINARY NEW_BINARY --dtypes f16,q8 --rounds 5
"""
import argparse
import collections
import re
import statistics
import subprocess

ap = argparse.ArgumentParser()
ap.add_argument("binaries", nargs="+")
ap.add_argument("--dtypes", default="f16")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--small", action="store_true", help="SmolLM2's shapes only")
a = ap.parse_args()
res = collections.defaultdict(list)
for _ in range(a.rounds):
    for b in a.binaries:
        out = subprocess.run([b] + a.dtypes.split(",") + (["--small"] if a.small else []), capture_output=True, text=True, check=True).stdout
        for m in re.finditer(r"(\d+x\d+) (\w+) s=([\d.]+): ([\d.]+) GB/s", out):
            res[(m.group(1), m.group(2), m.group(3), b)].append(float(m.group(4)))
for k in sorted({k[:3] for k in res}):
    cols = " ".join(f"{statistics.median(res[k + (b,)]):6.1f}" for b in a.binaries)
    print(f"{k[0]:>12} {k[1]:>4} s={k[2]:<4} {cols}")
