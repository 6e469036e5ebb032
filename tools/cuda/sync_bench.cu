// How long does one dependency between two kernels of a decode step cost on this GPU, and
// how much of it would another kind of synchronisation save? A chain of L dependent
// "GEMV-like" kernels (each block reads the 16 KB input vector its predecessor wrote with
// atomics, sums it, and adds into 256 outputs with atomics), timed as a CUDA graph, with:
//   plain   launches ordered by the stream (no programmatic dependent launch)
//   pdl     programmatic dependent launch, griddepcontrol.wait (what teal's kernels do)
//   spin    programmatic dependent launch, but each block waits on a completion counter of
//           its predecessor (every block of the predecessor adds 1 when done) instead
//   persist one kernel of L phases, a grid-wide counter barrier between phases
// and an empty variant (no reading of x) of each. Prints microseconds per dependency.
//
//   nvcc -O3 -arch=sm_90 -o sync_bench tools/cuda/sync_bench.cu && ./sync_bench
//
// The PDL primitives and the block reduction are teal's own (its kernel source, included).
#include "../../crates/teal-kernels/src/cuda/kernels.cu"
#include <cstdio>
#include <cuda_runtime.h>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
    printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

constexpr int N = 4096, T = 256;

__device__ __forceinline__ void work(float* x, float* y, int read) {
    float s = 1.0f;
    if (read) {
        float ss = 0.0f;
        const float4* x4 = (const float4*)x;
        for (int i = threadIdx.x; i < N / 4; i += T) {
            float4 v = __ldcg(x4 + i);
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        s = block_sum(ss) * 1e-30f;
    }
    const int c = (blockIdx.x * T + threadIdx.x) % N;
    atomicAdd(&y[c], s);
}

// mode 0: plain, 1: pdl, 2: spin
__global__ void __launch_bounds__(T) step(float* x, float* y, unsigned* wait_cnt, unsigned wait_for,
                                          unsigned* done_cnt, int mode, int read) {
    if (mode >= 1) pdl_launch_next();
    if (mode == 1) pdl_wait();
    if (mode == 2 && wait_cnt != nullptr) {
        if (threadIdx.x == 0) {
            while (*(volatile unsigned*)wait_cnt < wait_for) {}
            __threadfence();
        }
        __syncthreads();
    }
    work(x, y, read);
    if (mode == 2) {
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(done_cnt, 1u);
    }
}

__global__ void __launch_bounds__(T) persist(float* bufs, unsigned* cnt, int L, int read) {
    for (int l = 0; l < L; ++l) {
        work(bufs + (size_t)(l % 2) * N, bufs + (size_t)((l + 1) % 2) * N, read);
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            atomicAdd(&cnt[l], 1u);
            while (*(volatile unsigned*)&cnt[l] < gridDim.x) {}
            __threadfence();
        }
        __syncthreads();
    }
}

static void launch(cudaStream_t st, int grid, bool pdl, float* x, float* y, unsigned* wc,
                   unsigned wf, unsigned* dc, int mode, int read) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(T);
    cfg.stream = st;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, step, x, y, wc, wf, dc, mode, read));
}

static float time_graph(cudaStream_t st, cudaGraphExec_t ex, int L) {
    std::vector<float> ts;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int r = 0; r < 23; ++r) {
        CK(cudaEventRecord(a, st));
        CK(cudaGraphLaunch(ex, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (r >= 3) ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2] * 1000.0f / L;
}

int main() {
    const int L = 160;
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    float* bufs;
    unsigned* cnt;
    CK(cudaMalloc(&bufs, 2 * N * sizeof(float)));
    CK(cudaMalloc(&cnt, (L + 1) * sizeof(unsigned)));
    CK(cudaMemset(bufs, 0, 2 * N * sizeof(float)));
    int sms, occ;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, persist, T, 0));
    printf("SMs %d, resident blocks of %d threads per SM %d, chain of %d dependencies\n", sms, T, occ, L);
    printf("%-8s %-6s %8s %8s %8s %8s\n", "mode", "read", "g=32", "g=264", "g=1056", "g=1792");
    const char* names[] = {"plain", "pdl", "spin", "persist"};
    for (int mode = 0; mode < 4; ++mode) {
        for (int read = 0; read < 2; ++read) {
            printf("%-8s %-6d", names[mode], read);
            for (int grid : {32, 264, 1056, 1792}) {
                if (mode == 3 && grid > sms * occ) { printf(" %8s", "-"); continue; }
                cudaGraph_t g;
                CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
                CK(cudaMemsetAsync(cnt, 0, (L + 1) * sizeof(unsigned), st));
                if (mode == 3) {
                    persist<<<grid, T, 0, st>>>(bufs, cnt, L, read);
                } else {
                    for (int l = 0; l < L; ++l)
                        launch(st, grid, mode >= 1, bufs + (l % 2) * N, bufs + ((l + 1) % 2) * N,
                               l == 0 ? nullptr : cnt + l - 1, (unsigned)grid, cnt + l, mode, read);
                }
                CK(cudaStreamEndCapture(st, &g));
                cudaGraphExec_t ex;
                CK(cudaGraphInstantiate(&ex, g, 0));
                printf(" %8.2f", time_graph(st, ex, L));
                CK(cudaGraphExecDestroy(ex));
                CK(cudaGraphDestroy(g));
            }
            printf("\n");
        }
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
