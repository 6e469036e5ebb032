#!/usr/bin/env python3
"""Aggregate decode speed of `teal serve --slots N` with N requests at once: for each binary
(alternating, so a noisy neighbour hits each alike), dtype and N, a server is started, warmed up
with one request, then sent N greedy requests of `--tokens` tokens each at the same time, twice;
prints the generated tokens per second of all of them together.

    scripts/bench-slots.py target/release/teal --dtypes q8,f16 --slots 1,2,4
    scripts/bench-slots.py OLD NEW --rounds 2          # A/B of two builds
"""
import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("binaries", nargs="+")
ap.add_argument("--model", help="model file (default: the binary's default model)")
ap.add_argument("--dtypes", default="q8")
ap.add_argument("--slots", default="1,2,4")
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--port", type=int, default=8200)
a = ap.parse_args()


def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{a.port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))


def measure(binary, dtype, n):
    cmd = [binary, "serve", "--slots", str(n), "--port", str(a.port), "--dtype", dtype, "-c", "1024"]
    if a.model:
        cmd += ["-m", a.model]
    # The server's stderr goes to a temporary file, shown if it exits before it is ready.
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(600):
            rc = server.poll()
            if rc is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace").splitlines()[-20:]
                sys.exit(f"{' '.join(cmd)}: the server exited with status {rc} before it was ready"
                         + "".join(f"\n  {l}" for l in tail))
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            sys.exit(f"{' '.join(cmd)}: the server did not answer /health on port {a.port}")
        body = lambda i: {"prompt": f"Story number {i}: once upon a time", "max_tokens": a.tokens,
                          "temperature": 0, "ignore_eos": True, "cache_prompt": False}
        post(body(0))
        rates = []
        for _ in range(2):
            out = {}
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, post(body(i)))) for i in range(n)]
            t0 = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates.append(sum(o["usage"]["completion_tokens"] for o in out.values()) / (time.time() - t0))
        return rates
    finally:
        server.terminate()
        server.wait()
        log.close()


for dtype in a.dtypes.split(","):
    for n in map(int, a.slots.split(",")):
        for _ in range(a.rounds):
            for b in a.binaries:
                rates = " ".join(f"{r:.1f}" for r in measure(b, dtype, n))
                print(f"{dtype} slots={n} {b}: {rates} tok/s together", flush=True)
