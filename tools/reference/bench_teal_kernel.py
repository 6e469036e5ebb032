#!/usr/bin/env python3
"""TEAL's own Triton sparse GEMV (FasterDecoding/TEAL, kernels/sparse_gemv.py), timed on one
Llama-3-8B block the way docs/perf-cuda.md times ours.

TEAL's code is not part of this repository: pass the root of a TEAL checkout (the folder that
holds kernels/sparse_gemv.py) with --teal. Its kernels are imported and called as its wrapper
calls them:
  splitk_sparse_gemv(x[1,1,in], W[out,in] stored input-major (W.T.contiguous().T), t, bin)
  qkv_gemv(x, Wqkv[6144,in] stored input-major, tq, tk, tv, bin, 1024)   (gpt-fast's q|k|v)
Each wrapper call = the autotuner's pre-hook (Y.zero_() on an f16 output), the Triton kernel
(masked row loads, f32 partial sums, f16 atomics into Y), and for a bf16 input the wrapper's
f16 -> bf16 cast of the output. The autotuner picks among TEAL's 16 configurations with its
own do_bench; its cache is cleared at each sparsity so every s is tuned for itself (TEAL's
benchmark_gemv.py keys the tuning on a sparsity bin for the same effect; gpt-fast passes bin 0
and tunes once). Its do_bench times single launches and is noisy at these sizes, so "best
config" also times every one of the 16 configurations through the wrapper with the graph method
below and keeps the fastest (an upper bound on what tuning can give TEAL's kernel).
"kernel only" launches the autotuned Triton kernel alone (no zeroing, no cast).

Method (as docs/perf-cuda.md, "What is measured, and how"):
  * BW: device-to-device copy of 2 GiB, bytes read + written, median of 10.
  * floor of one GEMV: (1 - s_real) * in * out * 2 / BW, s_real the realized sparsity.
  * every kernel timed as a CUDA graph of LAUNCHES launches rotating among weight copies
    totalling >= 256 MiB per shape (weights come from HBM), replayed REPS times, median per
    launch, CUDA events. The warm-up (and autotuning) runs before capture.
  * inputs: Gaussian activations rounded to the dtype, threshold = exact |x| quantile
    (k = ceil(s * n), t = k-th smallest |x|, kept where |x| > t).
  * cuBLAS: torch F.linear(x[1,in], W[out,in]) on the same values, 7 separate GEMVs.
  * per block = sum of the per-projection times (as in our table: 2 q/o + 2 k/v + 2 gate/up +
    down); a graph of whole blocks (7 launches each, rotating among weight copies) is timed too.
  * correctness: every output against float64 W @ x_masked; reported as
    max|y - ref| / max|ref| over the outputs.

Usage (on the GPU machine):
  python3 tools/reference/bench_teal_kernel.py --teal PATH/TO/TEAL [--json out.json]
"""
import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
import traceback
import types

ROTATE_BYTES = 256 << 20
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.75, 0.9]
HID, KV, MLP = 4096, 1024, 14336
# unique projection shapes of one Llama-3-8B block: name -> (in, out, how many per block)
SHAPES = {"q/o": (HID, HID, 2), "k/v": (HID, KV, 2), "gate/up": (HID, MLP, 2), "down": (MLP, HID, 1)}
# the 7 projections of a block, in order, and the shape each uses
BLOCK = [("q", "q/o"), ("k", "k/v"), ("v", "k/v"), ("o", "q/o"), ("gate", "gate/up"),
         ("up", "gate/up"), ("down", "down")]
SPLITK, QKV = "splitk_sparse_gemv_kernel", "qkv_kernel"


def import_teal(root):
    """Import TEAL's kernels/sparse_gemv.py from the checkout at `root`. Its import pulls in
    kernels/compile_wrapper.py, which needs `msgspec` for the torch.compile wrappers only (not
    used here); where msgspec is missing a stand-in `Struct` base class is provided."""
    try:
        import msgspec  # noqa: F401
    except ImportError:
        stub = types.ModuleType("msgspec")

        class Struct:
            pass

        stub.Struct = Struct
        sys.modules["msgspec"] = stub
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, "kernels", "sparse_gemv.py")):
        sys.exit(f"--teal {root}: no kernels/sparse_gemv.py there")
    sys.path.insert(0, root)
    import kernels.sparse_gemv as sg
    return sg


def unique_configs(kern):
    seen, out = set(), []
    for i, c in enumerate(kern.configs):
        if str(c) not in seen:
            seen.add(str(c))
            out.append(i)
    return out


def precompile_worker(root, jobs):
    """Compile (JIT warm-up, no launch) the given (kernel, dtype, config index) triples into
    Triton's on-disk cache, so the main process's autotuning loads them instead of compiling
    one by one. Arguments mirror the real calls' specializations (16-byte aligned pointers,
    integers divisible by 16)."""
    import torch
    sg = import_teal(root)
    for kname, dtname, ci in jobs:
        kern = getattr(sg, kname)
        dt = getattr(torch, dtname)
        y = torch.empty(64, device="cuda", dtype=torch.float16)
        a = torch.empty(64, device="cuda", dtype=dt)
        x = torch.empty(64, device="cuda", dtype=dt)
        if kname == SPLITK:
            args = (y, a, x, 0.5, HID, HID, HID // 16, HID // 16, 1, 0)
        else:
            n = HID + 2 * KV
            args = (y, a, x, 0.5, 0.5, 0.5, n, HID, KV, HID, n // 16, HID // 16, 1, 0)
        kern.fn.warmup(*args, grid=(1,), **kern.configs[ci].all_kwargs())
    return len(jobs)


def precompile(root, dtnames, jobs_n):
    import concurrent.futures as cf
    import multiprocessing as mp
    sg = sys.modules["kernels.sparse_gemv"]
    jobs = [(k, d, ci) for k in (SPLITK, QKV) for d in dtnames
            for ci in unique_configs(getattr(sg, k))]
    chunks = [jobs[i::jobs_n] for i in range(jobs_n)]
    t0 = time.time()
    with cf.ProcessPoolExecutor(jobs_n, mp_context=mp.get_context("spawn")) as ex:
        done = sum(f.result() for f in [ex.submit(precompile_worker, root, c) for c in chunks if c])
    print(f"precompiled {done} Triton kernels in {jobs_n} processes: {time.time() - t0:.1f} s",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teal", required=True, help="root of a FasterDecoding/TEAL checkout")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    ap.add_argument("--launches", type=int, default=40, help="launches per captured graph")
    ap.add_argument("--reps", type=int, default=7, help="graph replays (median)")
    ap.add_argument("--tune-warmup-ms", type=float, default=5.0,
                    help="warm-up of the autotuner's do_bench per config (Triton default 25)")
    ap.add_argument("--tune-rep-ms", type=float, default=25.0,
                    help="timed span of the autotuner's do_bench per config (Triton default 100)")
    ap.add_argument("--jobs", type=int, default=8, help="processes that precompile (0: none)")
    ap.add_argument("--no-qkv", action="store_true", help="skip TEAL's fused q|k|v kernel")
    ap.add_argument("--no-best", action="store_true",
                    help="skip timing every configuration (best config)")
    args = ap.parse_args()

    import functools
    import torch
    import torch.nn.functional as F
    import triton
    import triton.testing

    t_start = time.time()
    sg = import_teal(args.teal)
    dtnames = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    L, REPS = args.launches, args.reps
    kern, qkern = sg.splitk_sparse_gemv_kernel, sg.qkv_kernel
    bench = functools.partial(triton.testing.do_bench, warmup=args.tune_warmup_ms,
                              rep=args.tune_rep_ms)
    kern.do_bench = bench
    qkern.do_bench = bench

    dev = torch.cuda.get_device_properties(0)
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs; torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}); triton {triton.__version__}", flush=True)
    commit_file = os.path.join(args.teal, "COMMIT")
    if os.path.isfile(commit_file):
        print(f"TEAL commit: {open(commit_file).read().strip()}")
    print(f"graph: {L} launches, {REPS} replays, median; rotation >= {ROTATE_BYTES >> 20} MiB per "
          f"shape; autotuner do_bench warmup {args.tune_warmup_ms} ms rep {args.tune_rep_ms} ms, "
          "re-tuned at every s", flush=True)

    if args.jobs > 0:
        try:
            precompile(args.teal, dtnames, args.jobs)
        except Exception:
            print("precompile failed (the autotuner compiles instead):")
            traceback.print_exc()

    def quiet():
        # TEAL's wrapper prints a warning on every bf16 call
        return contextlib.redirect_stdout(io.StringIO())

    def median(v):
        v = sorted(v)
        return v[len(v) // 2]

    def time_graph(enqueue, launches):
        """enqueue() enqueues `launches` launches; median µs per launch over REPS replays."""
        with quiet():
            enqueue()  # warm-up; the first call of a shape autotunes
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with quiet(), torch.cuda.graph(g, capture_error_mode="thread_local"):
            enqueue()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(REPS):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / launches)
        del g
        return median(ts)

    def best_config(kobj, key_prefix, enq):
        """Time `enq` (L wrapper calls) with each of the autotuner's configurations forced in
        its cache entry for this shape; return (best µs, its config); the tuned entry is put
        back afterwards."""
        key = next(k for k in kobj.cache if tuple(k[:2]) == key_prefix)
        tuned = kobj.cache[key]
        best = (float("inf"), None)
        try:
            for ci in unique_configs(kobj):
                kobj.cache[key] = kobj.configs[ci]
                try:
                    t = time_graph(enq, L)
                except Exception as e:  # a configuration that does not run
                    print(f"    config {kobj.configs[ci]}: {e}")
                    continue
                if t < best[0]:
                    best = (t, kobj.configs[ci])
        finally:
            kobj.cache[key] = tuned
        return best

    def cfg_str(c):
        return f"BLOCK_M {c.kwargs['BLOCK_M']} BLOCK_N {c.kwargs['BLOCK_N']} warps {c.num_warps}"

    # ---- bandwidth
    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(7)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3)
    bw = 2 * n / median(ts)
    del src, dst
    print(f"bandwidth: device-to-device copy of 2 GiB, {bw / 1e9:.0f} GB/s (read + write)",
          flush=True)

    def threshold(x, s):
        if s <= 0:
            return 0.0  # TEAL's threshold at s = 0
        a = x.abs().float().sort().values
        k = min(max(math.ceil(s * a.numel()), 1), a.numel())
        return float(a[k - 1])

    def floor_us(zin, nout, real):
        return (1 - real) * zin * nout * 2 / bw * 1e6

    def rel_err(y, w_in_out, xm):
        """max|y - ref| / max|ref|, ref = float64 x_masked @ W[in, out]."""
        ref = xm.double() @ w_in_out.double()
        y = y.reshape(-1).double()
        if not torch.isfinite(y).all():
            return float("inf")
        return float((y - ref).abs().max() / ref.abs().max())

    results = {"bandwidth_GBps": bw / 1e9, "device": dev.name, "torch": torch.__version__,
               "triton": triton.__version__, "launches": L, "reps": REPS, "dtypes": {}}
    gen = torch.Generator(device="cuda")
    gen.manual_seed(5)

    for dtname in dtnames:
        dt = getattr(torch, dtname)
        try:
            t_dt = time.time()
            pools = {}
            for name, (zin, nout, _) in SHAPES.items():
                nc = max(2, math.ceil(ROTATE_BYTES / (zin * nout * 2)))
                st = [torch.randn(zin, nout, device="cuda", dtype=dt, generator=gen)
                      .mul_(zin ** -0.5) for _ in range(nc)]
                x = torch.randn(zin, device="cuda", generator=gen).to(dt)
                pools[name] = {
                    "in": zin, "out": nout, "copies": nc, "st": st,
                    "teal": [w.t() for w in st],               # [out, in], input-major storage
                    "blas": [w.t().contiguous() for w in st],  # [out, in], row-major (PyTorch)
                    "x": x, "x3": x.view(1, 1, zin), "x2": x.view(1, zin)}
            if not args.no_qkv:
                nq = HID + 2 * KV
                nc = max(2, math.ceil(ROTATE_BYTES / (HID * nq * 2)))
                qst = [torch.randn(HID, nq, device="cuda", dtype=dt, generator=gen)
                       .mul_(HID ** -0.5) for _ in range(nc)]
                qkv_pool = {"copies": nc, "st": qst, "teal": [w.t() for w in qst]}
            torch.cuda.synchronize()

            # cuBLAS, once per dtype (independent of s)
            blas = {}
            for name, p in pools.items():
                def enq(p=p):
                    for i in range(L):
                        F.linear(p["x2"], p["blas"][i % p["copies"]])
                blas[name] = time_graph(enq, L)
            nblk = max(1, L // 7)

            def enq_blas_block():
                for bi in range(nblk):
                    for j, (_, sh) in enumerate(BLOCK):
                        p = pools[sh]
                        F.linear(p["x2"], p["blas"][(2 * bi + j) % p["copies"]])
            blas_block = time_graph(enq_blas_block, nblk)
            blas_sum = sum(blas[n_] * SHAPES[n_][2] for n_ in SHAPES)
            print(f"\n== {dtname}: cuBLAS (F.linear) per projection µs: "
                  + ", ".join(f"{n_} {blas[n_]:.2f}" for n_ in SHAPES)
                  + f"; 7 GEMVs: sum {blas_sum:.1f}, block graph {blas_block:.1f}", flush=True)

            rows = []
            for s in sparsities:
                kern.cache.clear()
                qkern.cache.clear()
                per = {}
                for name, p in pools.items():
                    t = threshold(p["x"], s)
                    real = float((p["x"].abs().float() <= t).float().mean()) if s > 0 else \
                        float((p["x"] == 0).float().mean())
                    p["t"] = t

                    def enq(p=p, t=t):
                        for i in range(L):
                            sg.splitk_sparse_gemv(p["x3"], p["teal"][i % p["copies"]], t, 0)
                    teal_us = time_graph(enq, L)
                    cfg = kern.best_config
                    bn, bm = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"]
                    zin, nout = p["in"], p["out"]
                    ybare = torch.zeros(1, 1, nout, device="cuda", dtype=torch.float16)
                    grid = (triton.cdiv(nout, bn), triton.cdiv(zin, bm))
                    kw = cfg.all_kwargs()

                    def enq_bare(p=p, t=t, ybare=ybare, grid=grid, kw=kw, zin=zin, nout=nout):
                        for i in range(L):
                            kern.fn[grid](ybare, p["teal"][i % p["copies"]], p["x3"], t, nout,
                                          zin, nout // 16, zin // 16, 1, 0, **kw)
                    bare_us = time_graph(enq_bare, L)
                    # correctness, on copy 1 (fresh output)
                    xm = torch.where(p["x"].abs() > t, p["x"], torch.zeros_like(p["x"]))
                    with quiet():
                        y = sg.splitk_sparse_gemv(p["x3"], p["teal"][1], t, 0)
                    err = rel_err(y, p["st"][1], xm)
                    yb = F.linear(xm.view(1, -1), p["blas"][1])
                    err_blas = rel_err(yb, p["st"][1], xm)
                    per[name] = {"real": real, "threshold": t, "teal_us": teal_us,
                                 "kernel_only_us": bare_us, "cublas_us": blas[name],
                                 "floor_us": floor_us(zin, nout, real),
                                 "config": cfg_str(cfg),
                                 "max_rel_err": err, "cublas_max_rel_err": err_blas}
                    if not args.no_best:
                        bt, bc = best_config(kern, (zin // 16, nout // 16), enq)
                        per[name]["best_us"], per[name]["best_config"] = bt, cfg_str(bc)
                row = {"s": s, "per_proj": per}
                # TEAL's fused q|k|v (what gpt-fast runs)
                if not args.no_qkv:
                    p = pools["q/o"]
                    t = p["t"]

                    def enq_qkv(p=p, t=t):
                        for i in range(L):
                            sg.qkv_gemv(p["x3"], qkv_pool["teal"][i % qkv_pool["copies"]],
                                        t, t, t, 0, KV)
                    qkv_us = time_graph(enq_qkv, L)
                    xm = torch.where(p["x"].abs() > t, p["x"], torch.zeros_like(p["x"]))
                    with quiet():
                        y = sg.qkv_gemv(p["x3"], qkv_pool["teal"][1], t, t, t, 0, KV)
                    row["qkv"] = {"teal_us": qkv_us, "max_rel_err": rel_err(y, qkv_pool["st"][1], xm),
                                  "config": cfg_str(qkern.best_config)}
                    if not args.no_best:
                        bt, bc = best_config(qkern, (HID // 16, (HID + 2 * KV) // 16), enq_qkv)
                        row["qkv"]["best_us"], row["qkv"]["best_config"] = bt, cfg_str(bc)

                # whole blocks, 7 wrapper calls each
                def enq_block():
                    for bi in range(nblk):
                        for j, (_, sh) in enumerate(BLOCK):
                            q = pools[sh]
                            sg.splitk_sparse_gemv(q["x3"], q["teal"][(2 * bi + j) % q["copies"]],
                                                  q["t"], 0)
                row["teal_block_graph_us"] = time_graph(enq_block, nblk)
                mult = {n_: SHAPES[n_][2] for n_ in SHAPES}
                row["floor_us"] = sum(per[n_]["floor_us"] * mult[n_] for n_ in SHAPES)
                row["teal7_us"] = sum(per[n_]["teal_us"] * mult[n_] for n_ in SHAPES)
                row["kernel_only7_us"] = sum(per[n_]["kernel_only_us"] * mult[n_] for n_ in SHAPES)
                row["cublas7_us"] = blas_sum
                row["cublas_block_graph_us"] = blas_block
                if not args.no_best:
                    row["best7_us"] = sum(per[n_]["best_us"] * mult[n_] for n_ in SHAPES)
                if not args.no_qkv:
                    row["teal5_us"] = (row["qkv"]["teal_us"] + per["q/o"]["teal_us"]
                                       + 2 * per["gate/up"]["teal_us"] + per["down"]["teal_us"])
                    if not args.no_best:
                        row["best5_us"] = (row["qkv"]["best_us"] + per["q/o"]["best_us"]
                                           + 2 * per["gate/up"]["best_us"] + per["down"]["best_us"])
                row["real"] = sum(per[n_]["real"] * SHAPES[n_][0] * SHAPES[n_][1] * mult[n_]
                                  for n_ in SHAPES) / sum(SHAPES[n_][0] * SHAPES[n_][1] * mult[n_]
                                                          for n_ in SHAPES)
                row["max_rel_err"] = max(per[n_]["max_rel_err"] for n_ in SHAPES)
                row["cublas_max_rel_err"] = max(per[n_]["cublas_max_rel_err"] for n_ in SHAPES)
                rows.append(row)
                print(f"s {s:.2f} real {row['real']:.3f}: TEAL 7 {row['teal7_us']:.1f} µs "
                      f"(graph {row['teal_block_graph_us']:.1f}, kernel only {row['kernel_only7_us']:.1f}"
                      + (f", 5 with q|k|v {row['teal5_us']:.1f}" if "teal5_us" in row else "")
                      + (f"; best config: 7 {row['best7_us']:.1f}" if "best7_us" in row else "")
                      + (f", 5 {row['best5_us']:.1f}" if "best5_us" in row else "")
                      + f"), floor {row['floor_us']:.1f}, cuBLAS {blas_sum:.1f}; max rel err "
                      f"{row['max_rel_err']:.1e} (cuBLAS {row['cublas_max_rel_err']:.1e}) "
                      f"[{time.time() - t_start:.0f} s]", flush=True)
                for name, d in per.items():
                    print(f"    {name:<8} {d['teal_us']:7.2f} µs (x{d['teal_us'] / d['floor_us']:.2f}), "
                          f"kernel only {d['kernel_only_us']:6.2f}, cuBLAS {d['cublas_us']:6.2f}, "
                          f"real {d['real']:.3f}, err {d['max_rel_err']:.1e}, {d['config']}"
                          + (f"; best {d['best_us']:.2f} ({d['best_config']})" if "best_us" in d
                             else ""), flush=True)
                if "qkv" in row:
                    q_ = row["qkv"]
                    print(f"    q|k|v    {q_['teal_us']:7.2f} µs, err {q_['max_rel_err']:.1e}, "
                          f"{q_['config']}" + (f"; best {q_['best_us']:.2f} ({q_['best_config']})"
                                               if "best_us" in q_ else ""), flush=True)
            results["dtypes"][dtname] = {"cublas_us": blas, "cublas7_us": blas_sum,
                                         "cublas_block_graph_us": blas_block, "rows": rows}
            print(f"({dtname} done in {time.time() - t_dt:.0f} s)", flush=True)
            del pools
            if not args.no_qkv:
                del qkv_pool
            torch.cuda.empty_cache()
        except Exception:
            print(f"{dtname}: FAILED")
            traceback.print_exc()
            sys.stdout.flush()

    # ---- summary
    print(f"\nSummary: one Llama-3-8B block (q,k,v,o,gate,up,down), µs per block = sum of the 7 "
          f"per-projection graph times; BW {bw / 1e9:.0f} GB/s")
    print("TEAL 7 = 7 wrapper calls as autotuned; best = the fastest configuration of each; "
          "5 = q|k|v through qkv_gemv (gpt-fast's block)")
    print("| dtype | s | real | floor | TEAL 7 | x floor | vs cuBLAS | TEAL 7 best | x floor | "
          "vs cuBLAS | TEAL 7 kernel only | TEAL 5 | TEAL 5 best | vs cuBLAS | cuBLAS 7 | "
          "max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def f1(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    for dtname, d in results["dtypes"].items():
        for r in d["rows"]:
            t7, b7, t5, b5 = r["teal7_us"], r.get("best7_us"), r.get("teal5_us"), r.get("best5_us")
            c, fl = r["cublas7_us"], r["floor_us"]
            print(f"| {dtname} | {r['s']:.2f} | {r['real']:.3f} | {fl:.1f} | {t7:.1f} | "
                  f"{ratio(t7, fl)} | {ratio(c, t7)}x | {f1(b7)} | {ratio(b7, fl)} | "
                  f"{ratio(c, b7)}x | {r['kernel_only7_us']:.1f} | {f1(t5)} | {f1(b5)} | "
                  f"{ratio(c, b5)}x | {c:.1f} | {r['max_rel_err']:.1e} |")
    print(f"total {time.time() - t_start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
