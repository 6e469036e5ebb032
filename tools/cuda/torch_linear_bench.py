"""cuBLAS reference through PyTorch: time F.linear(x[1, in], W[out, in]) (what TEAL's dense
baseline runs) at the Llama-3-8B and 70B shapes, f16 and bf16, as CUDA-graph replays of 40
calls rotating among weight copies (> 256 MB in all, so weights are not served from L2).
Run on the GPU machine: python3 tools/cuda/torch_linear_bench.py"""
import torch
import torch.nn.functional as F

SHAPES = [("llama3-8b", "q/o", 4096, 4096), ("llama3-8b", "k/v", 4096, 1024),
          ("llama3-8b", "gate/up", 4096, 14336), ("llama3-8b", "down", 14336, 4096),
          ("llama-70b", "q/o", 8192, 8192), ("llama-70b", "k/v", 8192, 1024),
          ("llama-70b", "gate/up", 8192, 28672), ("llama-70b", "down", 28672, 8192)]
CALLS, REPS = 40, 7

print(f"{'model':<10} {'proj':<8} {'in':>6} {'out':>6} {'dtype':<9} {'torch_us':>9}")
for model, proj, n_in, n_out in SHAPES:
    for dt in (torch.float16, torch.bfloat16):
        copies = max(2, -(-(256 << 20) // (n_in * n_out * 2)))
        ws = [torch.randn(n_out, n_in, device="cuda", dtype=dt) * 0.05 for _ in range(copies)]
        x = torch.randn(1, n_in, device="cuda", dtype=dt)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(3):
                F.linear(x, ws[i % copies])
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(CALLS):
                y = F.linear(x, ws[i % copies])
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(REPS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); g.replay(); b.record(); b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / CALLS)
        times.sort()
        print(f"{model:<10} {proj:<8} {n_in:>6} {n_out:>6} {str(dt)[6:]:<9} {times[len(times)//2]:>9.2f}", flush=True)
        del ws, g
