// teal CUDA kernels. Compiled at run time by NVRTC (no headers needed: every conversion is
// written out), loaded once per process. All activations are f32; weights are f16 or bf16
// stored input-major, `wt[in, out]`, so that the weights of one input channel are one
// contiguous row and a zero input skips a whole row.
//
// NVRTC compiles this file as several programs at once (cuda/nvrtc.rs): with TEAL_PART = 0
// every kernel but the GEMVs; with TEAL_PART > 0 the two GEMVs (vector and any-width loads)
// of one batch size TEAL_GEMV_B, weight type TEAL_GEMV_WT (named TEAL_GEMV_NAME) and
// threshold kind TEAL_GEMV_PC (name suffix TEAL_GEMV_SUF). Without TEAL_PART, all of them.

typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF __int_as_float(0xff800000)

#define GEMV_THREADS 256
#define GEMV_WARPS 8
#define GEMV_TILE 256  // output columns per block: 32 lanes x 8 columns (one 16-byte load)

// Programmatic dependent launch (Hopper+): every kernel lets the next one in the stream start
// launching at once, and waits for the previous one's memory before touching any (the decode
// attention reads its older cache rows in between; see attn_gqa_decode). Without the
// launch attribute (or before sm_90) both are no-ops.
__device__ __forceinline__ void pdl_launch_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_begin() {
    pdl_launch_next();
    pdl_wait();
}

// TEAL's s_t: input v kept where |v| > t. A negative t is a dense site, which keeps every
// input, NaN included (as the CPU's dense products do), so that a NaN or an infinity reaches the
// logits and is reported, not dropped as |NaN| > t would.
__device__ __forceinline__ bool kept(float v, float t) { return t < 0.0f || fabsf(v) > t; }

__device__ __forceinline__ float f16_to_f32(u32 h) {
    float f;
    asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "r"(h));
    return f;
}

struct F16 {
    static __device__ __forceinline__ void cvt2(u32 v, float& lo, float& hi) {
        lo = f16_to_f32(v & 0xffffu);
        hi = f16_to_f32(v >> 16);
    }
};

struct BF16 {
    static __device__ __forceinline__ void cvt2(u32 v, float& lo, float& hi) {
        lo = __uint_as_float(v << 16);
        hi = __uint_as_float(v & 0xffff0000u);
    }
};

__device__ __forceinline__ uint4 ld_stream16(const u16* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// ---------------------------------------------------------------------------------------
// Block-wide reductions (blockDim.x a multiple of 32, at most 1024).

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float p = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
        p = warp_sum(p);
        if (threadIdx.x == 0) total = p;
    }
    __syncthreads();
    return total;
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float p = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : NEG_INF;
        p = warp_max(p);
        if (threadIdx.x == 0) total = p;
    }
    __syncthreads();
    return total;
}

// Eight weights of row `row` starting at column `col`. VEC: one aligned 16-byte load
// (n_out % 8 == 0); otherwise scalar loads with bounds checks (odd sizes).
template <bool VEC>
__device__ __forceinline__ uint4 load8(const u16* __restrict__ wt, int row, int col, int n_out) {
    const u16* p = wt + (size_t)row * (size_t)n_out + col;
    if (VEC) return ld_stream16(p);
    u32 w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = (col + i < n_out) ? (u32)p[i] : 0u;
    return make_uint4(w[0] | (w[1] << 16), w[2] | (w[3] << 16), w[4] | (w[5] << 16),
                      w[6] | (w[7] << 16));
}

template <class WT, int B>
__device__ __forceinline__ void fma8(float (&a)[B][8], uint4 w, const float* xs, int s, int R) {
    float f[8];
    WT::cvt2(w.x, f[0], f[1]);
    WT::cvt2(w.y, f[2], f[3]);
    WT::cvt2(w.z, f[4], f[5]);
    WT::cvt2(w.w, f[6], f[7]);
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const float xb = xs[b * R + s];
#pragma unroll
        for (int i = 0; i < 8; ++i) a[b][i] = fmaf(xb, f[i], a[b][i]);
    }
}

// Weights of the kept rows idx[s0 + u * GEMV_WARPS], u < U, at columns col.. (one 16-byte load
// each: a warp's pass of loads). With PRED, rows at or past `cnt` are not loaded (zeros).
template <int U, bool VEC, bool PRED>
__device__ __forceinline__ void load_rows(uint4 (&w)[U], const u16* __restrict__ wt,
                                          const int* idx, int s0, int cnt, int col, int n_out) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int s = s0 + u * GEMV_WARPS;
        w[u] = (!PRED || s < cnt) ? load8<VEC>(wt, idx[s], col, n_out) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// The FMAs of a pass `load_rows` loaded (with PRED, only of rows before `cnt`).
template <class WT, int B, int U, bool PRED>
__device__ __forceinline__ void fma_rows(float (&a)[B][8], const uint4 (&w)[U], const float* xs,
                                         int s0, int cnt, int R) {
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (!PRED || s0 + u * GEMV_WARPS < cnt) fma8<WT, B>(a, w[u], xs, s0 + u * GEMV_WARPS, R);
}

// TEAL sparse GEMV, y[b, :] = beta * y[b, :] + sum_j s_t(x[b, j]) * wt[j, :], b < B, row b
// of y starting at y + b * ldy (ldy >= n_out: the columns of one projection in a wider row).
//
// Grid: (column tiles of 256, input chunks of R rows). Each block
//  1. compacts the rows j of its chunk with |x[b, j]| > t for some b (the union over the
//     batch) into a shared index list, keeping the thresholded values, 256 rows a pass;
//  2. its 8 warps read only those rows (16-byte streaming loads, U rows in flight per warp)
//     and accumulate in f32 registers; in chunks of more than 256 rows the loads of the rows
//     kept so far are in flight while the next compaction pass runs;
//  3. sums the 8 warps in shared memory and adds the block's partial into the f32
//     accumulator `acc` with f32 atomics (no f16 atomics);
//  4. the last block of a column tile (a counter per tile) writes y and resets `acc` and its
//     counter to zero, so the workspace is clean for the next call without a memset.
// With `glu` set, x is [B, 2 n_in] = gate | up and the input is silu(gate) * up, computed in
// step 1 (the MLP's down projection without a separate SiLU*mul kernel).
// With `accumulate` set, step 3 adds straight into y (y += W s_t(x): y must hold zeros or the
// residual) and step 4 is skipped: two dependent memory round trips fewer (4 columns per
// vector reduction where y's rows are 16-byte aligned).
// Fused projections: column tiles before seg1 use t0, before seg2 t1, the rest t2. With PC
// (per-channel), a segment whose vector (c0, c1, c2: n_in floats) is given keeps input j when
// |x[b, j]| > c[j] instead; the kernels without PC read no vector (the scalar path's code).
// With `nw` set (and not `glu`), the input is RMSNorm(x) = x / sqrt(mean(x^2) + eps) * nw,
// each block computing the row's mean square itself (the RMSNorm kernel folded in).
template <class WT, int B, bool VEC, bool PC>
__device__ __forceinline__ void gemv_impl(const u16* __restrict__ wt, const float* __restrict__ x,
                                          float* __restrict__ y, float* __restrict__ acc,
                                          u32* __restrict__ counters, int n_in, int n_out, int R,
                                          float t0, float t1, float t2,
                                          const float* __restrict__ c0,
                                          const float* __restrict__ c1,
                                          const float* __restrict__ c2, int seg1, int seg2,
                                          float beta, int accumulate, int glu,
                                          const float* __restrict__ nw, float eps,
                                          float* __restrict__ init_dst,
                                          const float* __restrict__ init_src, int init_n, int ldy) {
    pdl_begin();
    if (init_dst != nullptr) {
        // Side job: set a later accumulate-mode GEMV's output (whose last reader has finished:
        // it ran before the kernel this one waited for) to its bias or to zero.
        const int nb = gridDim.x * gridDim.y;
        for (int i = (blockIdx.y * gridDim.x + blockIdx.x) * GEMV_THREADS + threadIdx.x;
             i < init_n; i += nb * GEMV_THREADS)
            init_dst[i] = init_src != nullptr ? init_src[i] : 0.0f;
    }
    __shared__ float inv_rms[B];
    const int k0 = blockIdx.y * R;
    const int k1 = min(k0 + R, n_in);
    // With PC, this block's segment's per-channel thresholds (null: its scalar one) and those of
    // the first compaction pass's rows, loaded with its inputs.
    const float* __restrict__ tc = nullptr;
    float tc_first = 0.0f;
    if (PC) {
        const int cb = blockIdx.x * GEMV_TILE, j = k0 + (int)threadIdx.x;
        tc = cb < seg1 ? c0 : (cb < seg2 ? c1 : c2);
        if (tc != nullptr && j < k1) tc_first = tc[j];
    }
    // With the RMSNorm prologue, the first compaction pass's inputs and norm weights are
    // loaded before the mean square's loads, so that both share one L2 round trip.
    float x_first[B], nw_first = 0.0f;
    if (nw != nullptr && !glu) {
        const int j = k0 + (int)threadIdx.x;
#pragma unroll
        for (int b = 0; b < B; ++b) x_first[b] = j < k1 ? x[(size_t)b * n_in + j] : 0.0f;
        nw_first = j < k1 ? nw[j] : 0.0f;
    }
    if (nw != nullptr) {
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float ss = 0.0f;
            if ((n_in & 3) == 0) {
                // 16-byte loads, several in flight per thread (one L2 round trip for 4096).
                const float4* x4 = (const float4*)(x + (size_t)b * n_in);
#pragma unroll 4
                for (int i = threadIdx.x; i < (n_in >> 2); i += GEMV_THREADS) {
                    const float4 v = x4[i];
                    ss = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss))));
                }
            } else {
                for (int i = threadIdx.x; i < n_in; i += GEMV_THREADS) {
                    const float v = x[(size_t)b * n_in + i];
                    ss = fmaf(v, v, ss);
                }
            }
            ss = block_sum(ss);
            if (threadIdx.x == 0) inv_rms[b] = 1.0f / sqrtf(ss / (float)n_in + eps);
        }
        __syncthreads();
    }
    extern __shared__ float smem[];
    float* xs = smem;                       // [B][R] thresholded inputs of the kept rows
    int* idx = (int*)(smem + B * R);        // [R] kept row numbers
    float* red = (float*)(idx + R);         // [8][256] per-warp partial sums
    __shared__ int wcount[GEMV_WARPS];
    __shared__ int is_last;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int col_base = blockIdx.x * GEMV_TILE;
    const float t = col_base < seg1 ? t0 : (col_base < seg2 ? t1 : t2);

    // One compaction pass: rows r0 .. r0 + 255 of the chunk, the kept ones appended to idx / xs
    // after the `cnt` kept so far; returns the new count. Every thread of the block calls it
    // (two barriers).
    auto compact = [&](int r0, int cnt) -> int {
        const int j = r0 + tid;
        const float tj =
            !PC || tc == nullptr ? t : (r0 == k0 ? tc_first : (j < k1 ? tc[j] : t));
        float v[B];
        bool keep = false;
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (j >= k1) {
                v[b] = 0.0f;
            } else if (glu) {
                const float g = x[(size_t)b * 2 * n_in + j], u = x[(size_t)b * 2 * n_in + n_in + j];
                v[b] = g / (1.0f + expf(-g)) * u;
            } else if (nw != nullptr) {
                const bool first = r0 == k0;
                v[b] = (first ? x_first[b] : x[(size_t)b * n_in + j]) * inv_rms[b] *
                       (first ? nw_first : nw[j]);
            } else {
                v[b] = x[(size_t)b * n_in + j];
            }
            keep |= (j < k1) && kept(v[b], tj);
        }
        const u32 m = __ballot_sync(0xffffffffu, keep);
        if (lane == 0) wcount[warp] = __popc(m);
        __syncthreads();
        int off = cnt, tot = 0;
#pragma unroll
        for (int w = 0; w < GEMV_WARPS; ++w) {
            off += w < warp ? wcount[w] : 0;
            tot += wcount[w];
        }
        if (keep) {
            const int s = off + __popc(m & ((1u << lane) - 1u));
            idx[s] = j;
#pragma unroll
            for (int b = 0; b < B; ++b) xs[b * R + s] = kept(v[b], tj) ? v[b] : 0.0f;
        }
        __syncthreads();
        return cnt + tot;
    };

    float a[B][8];
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
        for (int i = 0; i < 8; ++i) a[b][i] = 0.0f;

    const int col = col_base + lane * 8;
    const bool active = col < n_out;
    // U rows in flight per warp before the first use; a pass of the block covers PASS kept
    // rows, warp w taking s0, s0 + 8, ... (s0 = w + a multiple of PASS). (Written as a main loop
    // plus a one-row remainder loop, ptxas compiled the batch-1 kernel to 32 registers with
    // each load issued just before its use, one or two in flight, and the remainder waited
    // one round trip per row.)
    constexpr int U = B <= 2 ? 8 : 4;
    constexpr int PASS = U * GEMV_WARPS;
    int cnt = compact(k0, 0);
    int s0 = warp;
    // Chunks of more than 256 rows: each further compaction pass runs while one full pass of
    // loads of the rows kept so far is in flight, and full passes beyond the one kept for the
    // next compaction run in between, so the weights stream while the inputs are tested.
    // (s0 - warp and cnt are the same in every warp: these conditions are block-uniform.)
    for (int r0 = k0 + GEMV_THREADS; r0 < k1; r0 += GEMV_THREADS) {
        const bool full = s0 - warp + PASS <= cnt;
        uint4 w[U];
        if (full && active) load_rows<U, VEC, false>(w, wt, idx, s0, cnt, col, n_out);
        cnt = compact(r0, cnt);
        if (full) {
            if (active) fma_rows<WT, B, U, false>(a, w, xs, s0, cnt, R);
            s0 += PASS;
        }
        const int reserve = r0 + GEMV_THREADS < k1 ? PASS : 0;
        for (; s0 - warp + PASS + reserve <= cnt; s0 += PASS) {
            if (!active) continue;
            load_rows<U, VEC, false>(w, wt, idx, s0, cnt, col, n_out);
            fma_rows<WT, B, U, false>(a, w, xs, s0, cnt, R);
        }
    }
    if (active) {
        // The rest, the last pass predicated.
        for (; s0 < cnt; s0 += PASS) {
            uint4 w[U];
            load_rows<U, VEC, true>(w, wt, idx, s0, cnt, col, n_out);
            fma_rows<WT, B, U, true>(a, w, xs, s0, cnt, R);
        }
    }

    const bool split = gridDim.y > 1 && !accumulate;
    // Accumulate mode on 16-byte aligned rows: one vector reduction (red.global.add.v4.f32)
    // per 4 columns, a quarter of the atomic operations at the L2.
    const bool vred = VEC && accumulate && (ldy & 3) == 0 && ((size_t)y & 15) == 0;
    const int c = col_base + tid;
#pragma unroll
    for (int b = 0; b < B; ++b) {
        float4* rp = (float4*)(red + warp * GEMV_TILE + lane * 8);
        rp[0] = make_float4(a[b][0], a[b][1], a[b][2], a[b][3]);
        rp[1] = make_float4(a[b][4], a[b][5], a[b][6], a[b][7]);
        __syncthreads();
        if (vred) {
            const int c4 = col_base + 4 * tid;
            if (tid < GEMV_TILE / 4 && c4 < n_out) {
                float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                for (int w = 0; w < GEMV_WARPS; ++w) {
                    const float4 r = ((const float4*)(red + w * GEMV_TILE))[tid];
                    s.x += r.x;
                    s.y += r.y;
                    s.z += r.z;
                    s.w += r.w;
                }
                float* p = y + (size_t)b * ldy + c4;
#if __CUDA_ARCH__ >= 900
                asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                             :: "l"(p), "f"(s.x), "f"(s.y), "f"(s.z), "f"(s.w) : "memory");
#else
                // Vector reductions are sm_90's: four scalar ones before it.
                atomicAdd(p, s.x);
                atomicAdd(p + 1, s.y);
                atomicAdd(p + 2, s.z);
                atomicAdd(p + 3, s.w);
#endif
            }
            __syncthreads();
            continue;
        }
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < GEMV_WARPS; ++w) sum += red[w * GEMV_TILE + tid];
        if (c < n_out) {
            const size_t o = (size_t)b * ldy + c;
            if (accumulate) atomicAdd(&y[o], sum);
            else if (split) atomicAdd(&acc[(size_t)b * n_out + c], sum);
            else y[o] = beta != 0.0f ? fmaf(beta, y[o], sum) : sum;
        }
        __syncthreads();
    }
    if (!split) return;

    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (c < n_out) {
#pragma unroll
        for (int b = 0; b < B; ++b) {
            const size_t o = (size_t)b * n_out + c, oy = (size_t)b * ldy + c;
            const float v = *(volatile float*)&acc[o];
            acc[o] = 0.0f;
            y[oy] = beta != 0.0f ? fmaf(beta, y[oy], v) : v;
        }
    }
    if (tid == 0) counters[blockIdx.x] = 0u;
}

#define GEMV_ARGS                                                                             \
    const u16 *__restrict__ wt, const float *__restrict__ x, float *__restrict__ y,          \
        float *__restrict__ acc, u32 *__restrict__ counters, int n_in, int n_out, int R,     \
        float t0, float t1, float t2, const float *__restrict__ c0,                           \
        const float *__restrict__ c1, const float *__restrict__ c2, int seg1, int seg2,       \
        float beta, int accumulate, int glu, const float *__restrict__ nw, float eps,         \
        float *__restrict__ init_dst, const float *__restrict__ init_src, int init_n, int ldy
#define GEMV_PASS                                                                             \
    wt, x, y, acc, counters, n_in, n_out, R, t0, t1, t2, c0, c1, c2, seg1, seg2, beta,        \
        accumulate, glu, nw, eps, init_dst, init_src, init_n, ldy

#define GEMV_KERNEL(NAME, WT, B, VEC, PC)                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) NAME(GEMV_ARGS) {             \
        gemv_impl<WT, B, VEC, PC>(GEMV_PASS);                                                \
    }
#define GEMV_KERNELS_B(B)                                                                    \
    GEMV_KERNEL(gemv_f16_b##B##_vec, F16, B, true, false)                                    \
    GEMV_KERNEL(gemv_f16_b##B##_any, F16, B, false, false)                                   \
    GEMV_KERNEL(gemv_bf16_b##B##_vec, BF16, B, true, false)                                  \
    GEMV_KERNEL(gemv_bf16_b##B##_any, BF16, B, false, false)                                 \
    GEMV_KERNEL(gemv_f16_b##B##_vec_pc, F16, B, true, true)                                  \
    GEMV_KERNEL(gemv_f16_b##B##_any_pc, F16, B, false, true)                                 \
    GEMV_KERNEL(gemv_bf16_b##B##_vec_pc, BF16, B, true, true)                                \
    GEMV_KERNEL(gemv_bf16_b##B##_any_pc, BF16, B, false, true)

// One part's pair; GEMV_PART expands the TEAL_GEMV_* values before GEMV_PAIR pastes them
// into the names (an empty suffix pastes as nothing).
#define GEMV_PAIR(NAME, WT, B, PC, SUF)                                                     \
    GEMV_KERNEL(gemv_##NAME##_b##B##_vec##SUF, WT, B, true, PC)                              \
    GEMV_KERNEL(gemv_##NAME##_b##B##_any##SUF, WT, B, false, PC)
#define GEMV_PART(NAME, WT, B, PC, SUF) GEMV_PAIR(NAME, WT, B, PC, SUF)

#if !defined(TEAL_PART)
GEMV_KERNELS_B(1)
GEMV_KERNELS_B(2)
GEMV_KERNELS_B(3)
GEMV_KERNELS_B(4)
GEMV_KERNELS_B(5)
GEMV_KERNELS_B(6)
GEMV_KERNELS_B(7)
GEMV_KERNELS_B(8)
#elif TEAL_PART > 0
GEMV_PART(TEAL_GEMV_NAME, TEAL_GEMV_WT, TEAL_GEMV_B, TEAL_GEMV_PC, TEAL_GEMV_SUF)
#endif

// Everything below is part 0.
#if !defined(TEAL_PART) || TEAL_PART == 0

// RMSNorm of each row: out = x / sqrt(mean(x^2) + eps) * w. One block per row.
extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ out, int n, float eps) {
    pdl_begin();
    const float* xr = x + (size_t)blockIdx.x * n;
    float* o = out + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// f32 rounded to nearest (ties to even) as bf16 or f16 bits; a bf16 NaN stays NaN.
__device__ __forceinline__ u16 f32_to_bf16_rn(float v) {
    const u32 b = __float_as_uint(v);
    if ((b & 0x7f800000u) == 0x7f800000u) return (u16)((b >> 16) | ((b & 0xffffu) ? 0x40u : 0u));
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ u16 f32_to_f16_rn(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

// The input of a GEMM prefill launch (cuBLAS multiplies f16/bf16 by f16/bf16): row b of
// `out` = s_t(v) rounded to the weights' type (is_bf16), where v is row b of x (stride ldx),
// RMSNorm(x) = x / sqrt(mean(x^2) + eps) * nw with `nw`, or silu(gate) * up with `glu`
// (x = gate | up, n_in each), and s_t keeps |v| > t (|v_j| > tc[j] with a per-channel vector
// tc), the same arithmetic as the GEMV's.
// An f16 value beyond the type's range sets *overflow (the caller falls back to the GEMV).
// Grid: rows; blocks of 256.
extern "C" __global__ void gemm_input_f32(const float* __restrict__ x, u16* __restrict__ out,
                                          int n_in, int ldx, float t,
                                          const float* __restrict__ tc,
                                          const float* __restrict__ nw, float eps, int glu,
                                          int is_bf16, int* __restrict__ overflow) {
    pdl_begin();
    const float* xr = x + (size_t)blockIdx.x * ldx;
    u16* o = out + (size_t)blockIdx.x * n_in;
    float inv = 1.0f;
    if (nw != nullptr) {
        float ss = 0.0f;
        for (int i = threadIdx.x; i < n_in; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
        ss = block_sum(ss);
        inv = 1.0f / sqrtf(ss / (float)n_in + eps);
    }
    bool over = false;
    for (int j = threadIdx.x; j < n_in; j += blockDim.x) {
        float v;
        if (glu) {
            const float g = xr[j], u = xr[n_in + j];
            v = g / (1.0f + expf(-g)) * u;
        } else {
            v = nw != nullptr ? xr[j] * inv * nw[j] : xr[j];
        }
        v = kept(v, tc != nullptr ? tc[j] : t) ? v : 0.0f;
        over |= !is_bf16 && fabsf(v) > 65504.0f;
        o[j] = is_bf16 ? f32_to_bf16_rn(v) : f32_to_f16_rn(v);
    }
    if (over) atomicOr(overflow, 1);
}

// y[b, :] = src (one row) or zeros, for b < rows (row stride ldy): what a GEMM adds to.
extern "C" __global__ void fill_rows_f32(float* __restrict__ y, const float* __restrict__ src,
                                         int n, int ldy) {
    pdl_begin();
    float* yr = y + (size_t)blockIdx.y * ldy;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        yr[i] = src != nullptr ? src[i] : 0.0f;
}

// NeoX RoPE in place on x[b, head * hd + i]: dimension i pairs with i + hd/2. cos/sin tables
// are [positions, hd/2]; the position of row b is pos[b] (on the device, so a captured graph
// replays for any position). Grid: (heads, batch); threads over hd/2.
extern "C" __global__ void rope_neox_f32(float* __restrict__ x, const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t,
                                         const int* __restrict__ pos, int hd, int row_stride) {
    pdl_begin();
    const int half = hd >> 1;
    const int p = pos[blockIdx.y];
    float* h = x + (size_t)blockIdx.y * row_stride + (size_t)blockIdx.x * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = cos_t[(size_t)p * half + i], s = sin_t[(size_t)p * half + i];
        const float a = h[i], b = h[i + half];
        h[i] = a * c - b * s;
        h[i + half] = b * c + a * s;
    }
}

#define VPRE 4
#define ATTN_THREADS 1024  // threads of a decode attention block (ATTN_THREADS in mod.rs)

// How a decode attention block's threads map onto keys (hd % 4 == 0, hd / 4 a power of two
// dividing blockDim); the preload and the attention that uses it must agree on it.
// Scores: each key is split over kl lanes (a power of two), slice4 (<= 4) float4s each; this
// thread is lane `part` of key `key0` of a pass of nt / kl keys; key_mask: the lanes of its
// key, for the shuffles. Weighted sum: q4n lanes per key, one float4 (d4) of dimensions each;
// this thread takes key kg of a pass of `groups` keys.
struct AttnLanes {
    int q4n, kl, slice4, part, key0, keys_per_pass, d4, kg, groups;
    u32 key_mask;
    __device__ __forceinline__ explicit AttnLanes(int hd) {
        const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
        q4n = hd >> 2;
        kl = q4n > 4 ? q4n >> 2 : 1;
        slice4 = q4n / kl;
        part = tid & (kl - 1);
        key0 = tid / kl;
        keys_per_pass = nt / kl;
        key_mask = kl >= 32 ? 0xffffffffu : ((1u << kl) - 1u) << (lane & ~(kl - 1));
        d4 = tid % q4n;
        kg = tid / q4n;
        groups = nt / q4n;
    }
};

// What a thread of attn_gqa_decode reads first from the caches: its slice of the key of the
// first score pass (at most 4 float4s) and its first VPRE value rows. Loaded by
// `attend_preload` before the block waits for its predecessor, for the keys already in the
// caches.
struct AttnPre {
    float4 k[4];
    float4 v[VPRE];
};

// Fill `pre` from the caches for keys [0, n_old); zeros beyond.
__device__ __forceinline__ void attend_preload(const float* __restrict__ kb,
                                               const float* __restrict__ vb, int kvs,
                                               int n_old, int hd, AttnPre& pre) {
    const AttnLanes ln(hd);
    const int p = ln.key0;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < 4; ++i)
        pre.k[i] = (i < ln.slice4 && p < n_old)
                       ? ((const float4*)(kb + (size_t)p * kvs))[ln.part * ln.slice4 + i]
                       : zero;
#pragma unroll
    for (int u = 0; u < VPRE; ++u) {
        const int pv = ln.kg + u * ln.groups;
        pre.v[u] = pv < n_old ? ((const float4*)(vb + (size_t)pv * kvs))[ln.d4] : zero;
    }
}

// acc += w * v, lane by lane.
__device__ __forceinline__ void fma4(float4& acc, float w, float4 v) {
    acc.x = fmaf(w, v.x, acc.x);
    acc.y = fmaf(w, v.y, acc.y);
    acc.z = fmaf(w, v.z, acc.z);
    acc.w = fmaf(w, v.w, acc.w);
}

// The sum of rows 0..rows-1 of a [rows][cols] float4 array in shared memory, at column col.
__device__ __forceinline__ float4 sum_rows4(const float4* red, int rows, int cols, int col) {
    float4 o = red[col];
    for (int i = 1; i < rows; ++i) {
        const float4 x = red[i * cols + col];
        o.x += x.x;
        o.y += x.y;
        o.z += x.z;
        o.w += x.w;
    }
    return o;
}

// One lane's part of a score: slice4 (<= 4) float4s of the key times the query's. Unrolled
// with constant indices, so that k4 may be registers (AttnPre::k).
__device__ __forceinline__ float dot_slice(const float4* k4, const float4* q4, int slice4) {
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (i < slice4) {
            const float4 kv = k4[i], qv = q4[i];
            dot = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, dot))));
        }
    }
    return dot;
}

// Attention of one query head over its `nk` keys, for attn_decode_f32 (one block per head
// and row; hd % 4 == 0 and hd / 4 a power of two dividing blockDim). qs: the query in shared
// memory; kb, vb: the head's column block of the K and V caches, row stride kvs. sc: shared
// scratch of max(nk, 4 * blockDim) floats. Writes the normalized output to `out`.
// Scores: each key is split over kl lanes (kl a power of two, at most 4 16-byte loads per
// lane, all in flight at once), so a 1024-thread block scores 128 keys per pass at hd 128 and
// 256 at hd 64. Weighted sum: hd / 4 lanes per key, one float4 of dimensions each,
// blockDim / (hd / 4) keys per pass, partial sums reduced in shared memory; each thread's
// first VPRE value rows are loaded before the scores, so that their memory latency overlaps
// the score pass.
__device__ __forceinline__ void attend(const float* __restrict__ qs, const float* __restrict__ kb,
                                       const float* __restrict__ vb, int kvs, int nk, int hd,
                                       float* __restrict__ sc, float* __restrict__ out) {
    const int tid = threadIdx.x, nt = blockDim.x;
    const float scale = 1.0f / sqrtf((float)hd);
    const AttnLanes ln(hd);
    const int kl = ln.kl, slice4 = ln.slice4, part = ln.part;
    const int lanes = ln.q4n, d4 = ln.d4, g = ln.kg, groups = ln.groups;
    const float4* q4 = (const float4*)qs + part * slice4;
    float4 vpre[VPRE];
#pragma unroll
    for (int u = 0; u < VPRE; ++u) {
        const int p = g + u * groups;
        vpre[u] = p < nk ? ((const float4*)(vb + (size_t)p * kvs))[d4]
                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float m = NEG_INF;
    for (int p = ln.key0; p < nk; p += ln.keys_per_pass) {
        float dot = dot_slice((const float4*)(kb + (size_t)p * kvs) + part * slice4, q4, slice4);
        for (int o = kl >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(ln.key_mask, dot, o);
        dot *= scale;
        if (part == 0) sc[p] = dot;
        m = fmaxf(m, dot);
    }
    m = block_max(m);
    float s = 0.0f;
    for (int p = tid; p < nk; p += nt) {
        const float e = expf(sc[p] - m);
        sc[p] = e;
        s += e;
    }
    s = block_sum(s);
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int u = 0; u < VPRE; ++u) {
        const int p = g + u * groups;
        const float w = p < nk ? sc[p] : 0.0f;
        fma4(acc, w, vpre[u]);
    }
#pragma unroll 4
    for (int p = g + VPRE * groups; p < nk; p += groups) {
        const float4 v = ((const float4*)(vb + (size_t)p * kvs))[d4];
        const float w = sc[p];
        fma4(acc, w, v);
    }
    __syncthreads();  // every score read: sc becomes the reduction buffer
    float4* red = (float4*)sc;
    red[g * lanes + d4] = acc;
    __syncthreads();
    if (tid < lanes) {
        const float4 o = sum_rows4(red, groups, lanes, tid);
        const float inv = 1.0f / s;
        ((float4*)out)[tid] = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
    }
}

// Decode attention of query rows over KV caches, grouped-query. Query row b starts at
// q + b * q_stride (heads side by side); out: [batch, n_head * hd]; k, v: row b's cache at
// b * cache_stride (0: one cache shared by every row, e.g. consecutive positions of one
// sequence with n_keys[b] = pos[b] + 1), max_pos rows of n_kv_head * hd; n_keys[b] keys valid.
// Grid: (n_head, batch). Shared memory: hd + max(max_keys, 4 * blockDim) floats.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_decode_f32(const float* __restrict__ q, const float* __restrict__ k,
                                           const float* __restrict__ v, float* __restrict__ out,
                                           const int* __restrict__ n_keys, int n_head,
                                           int n_kv_head, int hd, size_t cache_stride,
                                           int q_stride) {
    pdl_begin();
    extern __shared__ float4 sm4[];
    float* qs = (float*)sm4;
    const int h = blockIdx.x, b = blockIdx.y;
    const int kh = h / (n_head / n_kv_head);
    const float* qh = q + (size_t)b * q_stride + (size_t)h * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = qh[d];
    __syncthreads();
    const size_t c = (size_t)b * cache_stride + (size_t)kh * hd;
    attend(qs, k + c, v + c, n_kv_head * hd, n_keys[b], hd, qs + hd,
           out + (size_t)b * n_head * hd + (size_t)h * hd);
}

#define GQA_THREADS 512  // threads of a grouped decode attention block (GQA_THREADS in mod.rs)
#define GQA_RED 256      // floats of the block reductions' scratch (32 warps x 8 heads)

// Block-wide max (MAX) or sum of G values per thread at once; red: 32 * G floats of shared
// memory. Returns with every thread holding the results and red free again.
template <int G, bool MAX>
__device__ __forceinline__ void block_reduce_g(float (&v)[G], float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float x = MAX ? warp_max(v[g]) : warp_sum(v[g]);
        if (lane == 0) red[g * 32 + warp] = x;
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float x = MAX ? NEG_INF : 0.0f;
        for (int w = 0; w < nw; ++w) x = MAX ? fmaxf(x, red[g * 32 + w]) : x + red[g * 32 + w];
        v[g] = x;
    }
    __syncthreads();
}

// Attention of one decode step for query heads h0 .. h0 + ng - 1 (ng <= G) that share the
// key-value head kh, over run r of ns runs of the keys 0..=p (see attn_rope_decode_*): NeoX
// RoPE on the block's query heads and on the key head, the rotated key and the value stored
// at cache row p when `store`, then attention with the newest key taken from shared memory
// (the other blocks need not wait for the store). The rotated q and k are not written back to
// qkv. Each cached key and value is read once for all ng heads.
// Scores: each key is split over kl lanes (kl a power of two, at most 4 16-byte loads per
// lane, all in flight at once), every lane scoring its slice against all the heads' queries.
// Weighted sum: hd / 4 lanes per key, one float4 of dimensions each, one accumulator per head,
// blockDim / (hd / 4) keys per pass, reduced in shared memory. With ns = 1 the normalized
// output goes to out; else the unnormalized sums, maxima and sums of exponentials go to
// `part` and the last block of the group to finish (counters[h0]) merges the runs into out
// and resets the counter. `pre`: what attend_preload read before the wait.
// Shared memory: (G + 2) hd + GQA_RED + max(ng * (keys of the run), 4 * blockDim) floats.
template <int G>
__device__ __forceinline__ void attn_gqa_run(const float* __restrict__ qkv,
                                             const float* __restrict__ cos_t,
                                             const float* __restrict__ sin_t, int p,
                                             float* __restrict__ kc, float* __restrict__ vc,
                                             float* __restrict__ out, int n_head, int n_kv,
                                             int hd, float* __restrict__ part,
                                             u32* __restrict__ counters, int n_split, int kh,
                                             int h0, int ng, int r, int ns, int k0, int n,
                                             bool store, const AttnPre& pre) {
    extern __shared__ float4 sm4[];
    float* qs = (float*)sm4;  // [ng][hd], rotated
    float* kn = qs + G * hd;
    float* vn = kn + hd;
    float* red = vn + hd;
    float* sc = red + GQA_RED;  // [ng][n] scores, then the weighted sums' reduction
    const int half = hd >> 1, kvs = n_kv * hd, nk = p + 1;
    const bool newest = k0 + n == nk;  // this run ends with key p, taken from shared memory
    const size_t base = (size_t)k0 * kvs + (size_t)kh * hd;
    for (int i = threadIdx.x; i < ng * half; i += blockDim.x) {
        const int g = i / half, j = i - g * half;
        const float c = cos_t[(size_t)p * half + j], s = sin_t[(size_t)p * half + j];
        const float* qh = qkv + (size_t)(h0 + g) * hd;
        const float a = qh[j], b = qh[j + half];
        qs[g * hd + j] = a * c - b * s;
        qs[g * hd + j + half] = b * c + a * s;
    }
    const float* kq = qkv + (size_t)(n_head + kh) * hd;
    const float* vq = qkv + (size_t)(n_head + n_kv + kh) * hd;
    float* krow = kc + (size_t)p * kvs + (size_t)kh * hd;
    float* vrow = vc + (size_t)p * kvs + (size_t)kh * hd;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const float c = cos_t[(size_t)p * half + j], s = sin_t[(size_t)p * half + j];
        const float a = kq[j], b = kq[j + half];
        const float ra = a * c - b * s, rb = b * c + a * s;
        kn[j] = ra;
        kn[j + half] = rb;
        if (store) {
            krow[j] = ra;
            krow[j + half] = rb;
        }
    }
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        const float v = vq[i];
        vn[i] = v;
        if (store) vrow[i] = v;
    }
    __syncthreads();

    const int tid = threadIdx.x, nt = blockDim.x;
    const float scale = 1.0f / sqrtf((float)hd);
    const AttnLanes ln(hd);
    const int q4n = ln.q4n, kl = ln.kl, slice4 = ln.slice4, sl = ln.part;
    float m[G];
#pragma unroll
    for (int g = 0; g < G; ++g) m[g] = NEG_INF;
    const float* kb = kc + base;
    for (int k = ln.key0; k < n; k += ln.keys_per_pass) {
        float4 k4[4];
        const float4* src = (newest && k == n - 1) ? (const float4*)kn + sl * slice4
                                                   : (const float4*)(kb + (size_t)k * kvs) + sl * slice4;
        const bool first = k < ln.keys_per_pass;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (i < slice4) k4[i] = (first && !(newest && k == n - 1)) ? pre.k[i] : src[i];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (g < ng) {
                float dot = dot_slice(k4, (const float4*)(qs + g * hd) + sl * slice4, slice4);
                for (int o = kl >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(ln.key_mask, dot, o);
                dot *= scale;
                if (sl == 0) sc[g * n + k] = dot;
                m[g] = fmaxf(m[g], dot);
            }
        }
    }
    block_reduce_g<G, true>(m, red);
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        s[g] = 0.0f;
        if (g < ng) {
            for (int k = tid; k < n; k += nt) {
                const float e = expf(sc[g * n + k] - m[g]);
                sc[g * n + k] = e;
                s[g] += e;
            }
        }
    }
    block_reduce_g<G, false>(s, red);
    const int d4 = ln.d4, kg = ln.kg, groups = ln.groups;
    float4 acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float* vb = vc + base;
    const float4 vnew = ((const float4*)vn)[d4];
#pragma unroll
    for (int u = 0; u < VPRE; ++u) {
        const int k = kg + u * groups;
        if (k < n) {
            const float4 v = (newest && k == n - 1) ? vnew : pre.v[u];
#pragma unroll
            for (int g = 0; g < G; ++g) {
                if (g < ng) {
                    const float w = sc[g * n + k];
                    fma4(acc[g], w, v);
                }
            }
        }
    }
#pragma unroll 4
    for (int k = kg + VPRE * groups; k < n; k += groups) {
        const float4 v =
            (newest && k == n - 1) ? vnew : ((const float4*)(vb + (size_t)k * kvs))[d4];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (g < ng) {
                const float w = sc[g * n + k];
                fma4(acc[g], w, v);
            }
        }
    }
    __syncthreads();  // every weight read: sc becomes the reduction buffer
    float4* red4 = (float4*)sc;
    float* ms = part + (size_t)n_head * n_split * hd;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (g < ng) {
            red4[kg * q4n + d4] = acc[g];
            __syncthreads();
            if (tid < q4n) {
                const float4 o = sum_rows4(red4, groups, q4n, tid);
                const int h = h0 + g;
                if (ns == 1) {
                    const float inv = 1.0f / s[g];
                    ((float4*)(out + (size_t)h * hd))[tid] =
                        make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
                } else {
                    const size_t slot = (size_t)h * n_split + r;
                    ((float4*)(part + slot * hd))[tid] = o;
                    if (tid == 0) {
                        ms[2 * slot] = m[g];
                        ms[2 * slot + 1] = s[g];
                    }
                }
            }
            __syncthreads();
        }
    }
    if (ns == 1) return;
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(&counters[h0], 1u) == (u32)(ns - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int i = tid; i < ng * hd; i += nt) {
        const int h = h0 + i / hd, d = i % hd;
        const volatile float* vpart = part + (size_t)h * n_split * hd;
        const volatile float* vms = ms + 2 * (size_t)h * n_split;
        float mx = NEG_INF;
        for (int j = 0; j < ns; ++j) mx = fmaxf(mx, vms[2 * j]);
        float num = 0.0f, den = 0.0f;
        for (int j = 0; j < ns; ++j) {
            const float w = expf(vms[2 * j] - mx);
            num = fmaf(w, vpart[(size_t)j * hd + d], num);
            den = fmaf(w, vms[2 * j + 1], den);
        }
        out[(size_t)h * hd + d] = num / den;
    }
    if (tid == 0) counters[h0] = 0u;
}

// One decode step's attention straight from the fused q|k|v row at position p = pos[0],
// batch 1, grouped-query (per = n_head / n_kv query heads share a key-value head). The keys
// 0..=p are split (flash-decoding) into ns = min(n_split, ceil((p + 1) / split_keys)) runs
// (split_keys >= n_split). Grid: (n_kv, n_split, per). Up to group_keys keys, block
// (kh, r < ns, z) attends query head kh * per + z alone over run r: short caches get as many
// blocks as heads and runs, each with little to do. Longer ones are read once per key-value
// head: block (kh, r < ns, z < ceil(per / G)) takes run r for up to G query heads kh * per +
// z * G ... Other blocks exit at once. One block per key-value head stores its new key and
// value. Each thread's first key slice and VPRE value rows are read before the wait for the
// previous kernel (their memory latency overlaps its tail), so pos and cache rows 0..p-1 must
// have been written before that kernel started: in the decoder they come from earlier steps,
// each its own graph launch.
#define ATTN_GQA(NAME, G)                                                                    \
    extern "C" __global__ void __launch_bounds__(GQA_THREADS)                                \
        NAME(const float* __restrict__ qkv, const float* __restrict__ cos_t,                 \
             const float* __restrict__ sin_t, const int* __restrict__ pos,                   \
             float* __restrict__ kc, float* __restrict__ vc, float* __restrict__ out,        \
             int n_head, int n_kv, int hd, float* __restrict__ part,                         \
             u32* __restrict__ counters, int n_split, int split_keys, int group_keys) {      \
        pdl_launch_next();                                                                   \
        const int p = pos[0], nk = p + 1, kh = blockIdx.x, per = n_head / n_kv;              \
        const bool by_head = nk <= group_keys;                                               \
        const int ns = min(n_split, (nk + split_keys - 1) / split_keys);                     \
        const int r = blockIdx.y, z = blockIdx.z, len = (nk + ns - 1) / ns, k0 = r * len;    \
        const int h0 = kh * per + (by_head ? z : z * G);                                     \
        const int ng = by_head ? 1 : min(G, per - z * G);                                    \
        if (r >= ns || ng <= 0) return;                                                      \
        const int n = min(len, nk - k0);                                                     \
        const bool store = k0 + n == nk && z == 0;                                           \
        const size_t base = (size_t)k0 * n_kv * hd + (size_t)kh * hd;                        \
        AttnPre pre;                                                                         \
        attend_preload(kc + base, vc + base, n_kv * hd, k0 + n == nk ? n - 1 : n, hd, pre);  \
        pdl_wait();                                                                          \
        if (by_head)                                                                         \
            attn_gqa_run<1>(qkv, cos_t, sin_t, p, kc, vc, out, n_head, n_kv, hd, part,       \
                            counters, n_split, kh, h0, 1, r, ns, k0, n, store, pre);         \
        else                                                                                 \
            attn_gqa_run<G>(qkv, cos_t, sin_t, p, kc, vc, out, n_head, n_kv, hd, part,       \
                            counters, n_split, kh, h0, ng, r, ns, k0, n, store, pre);        \
    }
ATTN_GQA(attn_rope_decode_g1_f32, 1)
ATTN_GQA(attn_rope_decode_g2_f32, 2)
ATTN_GQA(attn_rope_decode_g4_f32, 4)
ATTN_GQA(attn_rope_decode_g8_f32, 8)

#define PF_QT 32    // query rows of a prefill attention block (PREFILL_ATTN_ROWS in mod.rs)
#define PF_KT 16    // keys per shared-memory tile
#define PF_MAXHD 128

// Causal attention of a prefill chunk of `rows` positions pos0, pos0 + 1, ..., tiled
// (flash-attention in f32): block (h, t) takes query rows t*32 .. t*32+31 of head h (the q
// part of fused q|k|v rows after RoPE, q_stride apart) and runs over keys 0 ..= the tile's
// last position of the caches (rows n_kv*hd wide, this chunk's keys appended), 16 keys at a
// time in shared memory, with an online softmax per row. Each row's 8 threads (one eighth of
// a warp) score keys j and j + 8 of a tile and own the output float4s j, j + 8, ... of the
// row. hd % 4 == 0, hd <= 128. out: [rows, n_head * hd]. Blocks of 256.
extern "C" __global__ void __launch_bounds__(256)
attn_prefill_f32(const float* __restrict__ qkv, const float* __restrict__ kc,
                 const float* __restrict__ vc, float* __restrict__ out, int pos0, int rows,
                 int n_head, int n_kv, int hd, int q_stride) {
    pdl_begin();
    __shared__ float4 qs[PF_QT * PF_MAXHD / 4];
    __shared__ float4 ks[PF_KT * (PF_MAXHD / 4 + 1)];  // rows padded by a float4
    __shared__ float4 vs[PF_KT * PF_MAXHD / 4];
    __shared__ float ps[PF_QT * PF_KT];
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const int h = blockIdx.x, r0 = blockIdx.y * PF_QT, tid = threadIdx.x;
    const int kh = h / (n_head / n_kv), kvs = n_kv * hd, h4 = hd >> 2, kst = h4 + 1;
    const int q = tid >> 3, j = tid & 7;
    const int nrows = min(PF_QT, rows - r0);
    for (int i = tid; i < PF_QT * h4; i += blockDim.x) {
        const int r = i / h4, c = i - r * h4;
        qs[r * h4 + c] =
            r < nrows ? ((const float4*)(qkv + (size_t)(r0 + r) * q_stride + (size_t)h * hd))[c]
                      : zero;
    }
    const int my_pos = pos0 + r0 + q, last_key = pos0 + r0 + nrows - 1;
    const float scale = 1.0f / sqrtf((float)hd);
    const u32 row_lanes = 0xffu << (tid & 24);
    float m = NEG_INF, l = 0.0f;
    float4 o[PF_MAXHD / 32];
#pragma unroll
    for (int u = 0; u < PF_MAXHD / 32; ++u) o[u] = zero;
    for (int k0 = 0; k0 <= last_key; k0 += PF_KT) {
        __syncthreads();  // the previous tile is read (and the query tile written)
        for (int i = tid; i < PF_KT * h4; i += blockDim.x) {
            const int k = i / h4, c = i - k * h4;
            const bool ok = k0 + k <= last_key;
            const size_t off = (size_t)(k0 + k) * kvs + (size_t)kh * hd;
            ks[k * kst + c] = ok ? ((const float4*)(kc + off))[c] : zero;
            vs[k * h4 + c] = ok ? ((const float4*)(vc + off))[c] : zero;
        }
        __syncthreads();
        float s[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int k = j + 8 * e;
            float dot = 0.0f;
            for (int c = 0; c < h4; ++c) {
                const float4 a = qs[q * h4 + c], b = ks[k * kst + c];
                dot = fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, dot))));
            }
            s[e] = k0 + k <= my_pos ? dot * scale : NEG_INF;
        }
        float tmax = fmaxf(s[0], s[1]);
#pragma unroll
        for (int o_ = 1; o_ < 8; o_ <<= 1) tmax = fmaxf(tmax, __shfl_xor_sync(row_lanes, tmax, o_));
        // Key 0 is in every row's first tile, so m is finite after it; a tile beyond the
        // row's position leaves m and l as they are (alpha 1, p 0).
        const float mn = fmaxf(m, tmax);
        const float alpha = expf(m - mn);
        const float p0 = expf(s[0] - mn), p1 = expf(s[1] - mn);
        float psum = p0 + p1;
#pragma unroll
        for (int o_ = 1; o_ < 8; o_ <<= 1) psum += __shfl_xor_sync(row_lanes, psum, o_);
        l = l * alpha + psum;
        m = mn;
        ps[q * PF_KT + j] = p0;
        ps[q * PF_KT + j + 8] = p1;
        __syncwarp();
#pragma unroll
        for (int u = 0; u < PF_MAXHD / 32; ++u) {
            const int c4 = j + 8 * u;
            if (c4 < h4) {
                float4 acc = o[u];
                acc.x *= alpha;
                acc.y *= alpha;
                acc.z *= alpha;
                acc.w *= alpha;
#pragma unroll 4
                for (int k = 0; k < PF_KT; ++k) {
                    const float p = ps[q * PF_KT + k];
                    const float4 v = vs[k * h4 + c4];
                    fma4(acc, p, v);
                }
                o[u] = acc;
            }
        }
    }
    if (q < nrows) {
        const float inv = 1.0f / l;
        float4* orow = (float4*)(out + (size_t)(r0 + q) * n_head * hd + (size_t)h * hd);
#pragma unroll
        for (int u = 0; u < PF_MAXHD / 32; ++u) {
            const int c4 = j + 8 * u;
            if (c4 < h4)
                orow[c4] = make_float4(o[u].x * inv, o[u].y * inv, o[u].z * inv, o[u].w * inv);
        }
    }
}

// out[b, i] = silu(gu[b, i]) * gu[b, n + i]: gate and up side by side, as the fused
// gate|up GEMV writes them.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gu, float* __restrict__ out,
                                        int n, int batch) {
    pdl_begin();
    const size_t total = (size_t)n * batch;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t b = i / n, c = i % n;
        const float g = gu[b * 2 * n + c], u = gu[b * 2 * n + n + c];
        out[i] = g / (1.0f + expf(-g)) * u;
    }
}

// Index of the largest value of each row (first one on ties, -0 and +0 equal; 0 for rows of no
// values), or 0xffffffff where the row holds a NaN or an infinity, -inf included (the host then
// reports the logits as non-finite, as the CPU does). Grid: (chunks of `chunk` values, rows), 256 threads. Each block finds
// its chunk's best (each thread 8 loads in flight, 16-byte loads when n % 4 == 0) and folds it
// into the row's 64-bit key with one atomicMax: the value's order-keeping bits above the
// complemented index, so the largest key is the largest value at its smallest index. The
// row's last block (a counter per row) writes the index and resets the key and the counter
// to zero, so the workspace is clean for the next call.
__device__ __forceinline__ u32 order_key(float v) {
    const u32 u = v == 0.0f ? 0u : __float_as_uint(v);  // -0 as +0, as float comparisons
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// Combine two candidates (index 0x7fffffff: none yet), ties to the smaller index.
__device__ __forceinline__ void argmax_take(float v, int i, float& best, int& bidx) {
    if (v > best || (v == best && i < bidx)) { best = v; bidx = i; }
}
extern "C" __global__ void __launch_bounds__(256)
argmax_f32(const float* __restrict__ x, int n, int chunk, u32* __restrict__ out,
           unsigned long long* __restrict__ keys, u32* __restrict__ counters) {
    pdl_begin();
    __shared__ float bv[8];
    __shared__ int bi[8];
    const int row = blockIdx.y, tid = threadIdx.x;
    const float* r = x + (size_t)row * n;
    const int lo = blockIdx.x * chunk, hi = min(lo + chunk, n);
    float best = NEG_INF;
    int bidx = 0x7fffffff;
    bool bad = false;
    if ((n & 3) == 0 && (chunk & 3) == 0) {
        const float4* r4 = (const float4*)r;
        for (int i0 = (lo >> 2) + tid; i0 < (hi >> 2); i0 += 8 * 256) {
            float4 v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u)
                v[u] = i0 + u * 256 < (hi >> 2) ? r4[i0 + u * 256]
                                                : make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                // A thread's indices increase: only a larger value replaces its best.
                const int i = 4 * (i0 + u * 256);
                if (i0 + u * 256 < (hi >> 2))
                    bad |= !(isfinite(v[u].x) && isfinite(v[u].y) && isfinite(v[u].z) &&
                             isfinite(v[u].w));
                if (v[u].x > best) { best = v[u].x; bidx = i; }
                if (v[u].y > best) { best = v[u].y; bidx = i + 1; }
                if (v[u].z > best) { best = v[u].z; bidx = i + 2; }
                if (v[u].w > best) { best = v[u].w; bidx = i + 3; }
            }
        }
    } else {
        for (int i0 = lo + tid; i0 < hi; i0 += 8 * 256) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) v[u] = i0 + u * 256 < hi ? r[i0 + u * 256] : NEG_INF;
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                if (i0 + u * 256 < hi) bad |= !isfinite(v[u]);
                if (v[u] > best) { best = v[u]; bidx = i0 + u * 256; }
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bidx, o);
        argmax_take(ov, oi, best, bidx);
    }
    if ((tid & 31) == 0) { bv[tid >> 5] = best; bi[tid >> 5] = bidx; }
    const int any_bad = __syncthreads_or(bad);
    if (tid != 0) return;
#pragma unroll
    for (int w = 1; w < 8; ++w) argmax_take(bv[w], bi[w], best, bidx);
    // All ones: above every value's key (a NaN never becomes `best`), so it stays the row's.
    if (any_bad)
        atomicMax(&keys[row], ~0ull);
    else if (bidx != 0x7fffffff)
        atomicMax(&keys[row], ((unsigned long long)order_key(best) << 32) | (u32)~bidx);
    __threadfence();
    if (atomicAdd(&counters[row], 1u) != gridDim.x - 1) return;
    __threadfence();
    const unsigned long long k = atomicExch(&keys[row], 0ull);
    out[row] = k == ~0ull ? 0xffffffffu : (k == 0ull ? 0u : ~(u32)k);
    counters[row] = 0u;
}

// Temperature / top-k / top-p sampling of one row of logits, as teal's CPU sampler does it
// (crates/teal/src/sampler.rs), with its uniform number r[0] in [0, 1) given. One block of 1024
// threads, k <= SAMPLE_MAX_K. The k largest logits are found by a radix select on order-keeping
// keys (4 passes of 8 bits; of the values tied with the k-th, those of the lowest indices),
// sorted descending (bitonic, ties by index), then one thread runs
// the CPU's sequential arithmetic: the nucleus prefix reaching top_p and the min-p cut on the
// probabilities of the logits as they are, then p = exp((l - max) * inv_t) of the kept ones
// (llama.cpp's order: the temperature last), and the walk r * kept_total -= p. A row holding
// a NaN or an infinity gives 0xffffffff (non-finite logits, reported by the host).
#define SAMPLE_MAX_K 256
__device__ __forceinline__ bool sample_before(const float* cv, const int* ci, int a, int b) {
    return cv[a] > cv[b] || (cv[a] == cv[b] && ci[a] < ci[b]);
}
extern "C" __global__ void sample_topk_f32(const float* __restrict__ x, int n, int k, float inv_t,
                                           float top_p, float min_p, const float* __restrict__ r,
                                           u32* __restrict__ out) {
    pdl_begin();
    __shared__ u32 hist[256];
    __shared__ u32 s_prefix;
    __shared__ int s_k, n_gt, n_eq;
    __shared__ float cv[SAMPLE_MAX_K];
    __shared__ int ci[SAMPLE_MAX_K];
    __shared__ int warp_eq[32];
    const int tid = threadIdx.x;
    u32 prefix = 0, mask = 0;
    int kk = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = tid; i < n; i += blockDim.x) {
            const u32 key = order_key(x[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int acc = 0;
            for (int b = 255; b >= 0; --b) {
                if (acc + (int)hist[b] >= kk) {
                    s_prefix = prefix | ((u32)b << shift);
                    s_k = kk - acc;
                    break;
                }
                acc += (int)hist[b];
            }
        }
        __syncthreads();
        prefix = s_prefix;
        kk = s_k;
        mask |= 255u << shift;
        __syncthreads();
    }
    // prefix: key of the k-th largest; kk of the values equal to it are taken.
    if (tid == 0) { n_gt = 0; n_eq = 0; }
    for (int i = tid; i < SAMPLE_MAX_K; i += blockDim.x) { cv[i] = NEG_INF; ci[i] = 0x7fffffff; }
    __syncthreads();
    bool bad = false;
    for (int i = tid; i < n; i += blockDim.x) {
        const float v = x[i];
        bad |= !isfinite(v);
        const u32 key = order_key(v);
        if (key > prefix) {
            const int at = atomicAdd(&n_gt, 1);
            cv[at] = v; ci[at] = i;
        } else if (key == prefix) {
            const int e = atomicAdd(&n_eq, 1);
            if (e < kk) { cv[k - kk + e] = v; ci[k - kk + e] = i; }
        }
    }
    if (__syncthreads_or(bad)) {
        if (tid == 0) out[0] = 0xffffffffu;
        return;
    }
    // More values equal the k-th largest than are taken: those taken must be the ones with the
    // lowest indices (the CPU's order), so they are taken again in index order, a block-wide
    // stretch at a time (a ballot per warp, the warps' counts in shared memory).
    if (n_eq > kk) {
        int taken = 0;
        for (int i0 = 0; i0 < n && taken < kk; i0 += blockDim.x) {
            const int i = i0 + tid;
            const bool eq = i < n && order_key(x[i]) == prefix;
            const u32 ballot = __ballot_sync(0xffffffffu, eq);
            if ((tid & 31) == 0) warp_eq[tid >> 5] = __popc(ballot);
            __syncthreads();
            int at = taken + __popc(ballot & ((1u << (tid & 31)) - 1u));
            int total = 0;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
                if (w < (tid >> 5)) at += warp_eq[w];
                total += warp_eq[w];
            }
            if (eq && at < kk) { cv[k - kk + at] = x[i]; ci[k - kk + at] = i; }
            taken += total;
            __syncthreads();
        }
    }
    for (int size = 2; size <= SAMPLE_MAX_K; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < SAMPLE_MAX_K; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i) {
                    const bool swap = (i & size) == 0 ? sample_before(cv, ci, j, i)
                                                      : sample_before(cv, ci, i, j);
                    if (swap) {
                        const float tv = cv[i]; cv[i] = cv[j]; cv[j] = tv;
                        const int ti = ci[i]; ci[i] = ci[j]; ci[j] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (tid == 0) {
        const float m = cv[0];
        int keep = k;
        if (top_p < 1.0f) {
            float total = 0.0f;
            for (int c = 0; c < k; ++c) total += expf(cv[c] - m);
            float acc = 0.0f;
            for (int c = 0; c < k; ++c) {
                acc += expf(cv[c] - m) / total;
                if (acc >= top_p) { keep = c + 1; break; }
            }
        }
        // Min-p: logits below the largest plus ln(min_p); never cuts before the first.
        if (min_p > 0.0f) {
            const float floor_l = logf(min_p);
            for (int c = 1; c < keep; ++c) {
                if (cv[c] - m < floor_l) { keep = c; break; }
            }
        }
        // The temperature last (llama.cpp's order); the largest weigh 1 also where inv_t is
        // infinite.
        for (int c = 0; c < keep; ++c) {
            const float d = cv[c] - m;
            cv[c] = d == 0.0f ? 1.0f : expf(d * inv_t);
        }
        float kept = 0.0f;
        for (int c = 0; c < keep; ++c) kept += cv[c];
        float rr = r[0] * kept;
        u32 tok = (u32)ci[keep - 1];
        for (int c = 0; c < keep; ++c) {
            rr -= cv[c];
            if (rr <= 0.0f) { tok = (u32)ci[c]; break; }
        }
        out[0] = tok;
    }
}

// Read-only bandwidth probe: each thread sums 16-byte words; the sum is written so the loads
// cannot be removed.
extern "C" __global__ void read_probe(const uint4* __restrict__ p, size_t n16, u32* __restrict__ sink) {
    pdl_begin();
    u32 s = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n16;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = ld_stream16((const u16*)(p + i));
        s ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (s == 0x9e3779b9u) sink[0] = s;
}

// Deterministic pseudo-random weights on the device (benchmarks with random weights at model
// scale): w[i] = scale * u, u uniform in [-1, 1) from a hash of (seed, i), as f16 or bf16 bits.
extern "C" __global__ void fill_random_u16(u16* __restrict__ w, size_t n, u32 seed, float scale,
                                           int is_bf16) {
    pdl_begin();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 0x9E3779B1u ^ (u32)(i >> 32) * 0x85EBCA77u ^ seed * 0xC2B2AE3Du;
        h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
        const float v = scale * ((float)(h >> 8) * (1.0f / 8388608.0f) - 1.0f);
        w[i] = is_bf16 ? f32_to_bf16_rn(v) : f32_to_f16_rn(v);
    }
}

// Append the key and value rows (columns [q_dim, q_dim + kv_dim) and
// [q_dim + kv_dim, q_dim + 2 kv_dim) of fused q|k|v row b) to the caches at row pos[b].
// Grid: (blocks, batch).
extern "C" __global__ void kv_append_f32(const float* __restrict__ qkv, float* __restrict__ kc,
                                         float* __restrict__ vc, const int* __restrict__ pos,
                                         int q_dim, int kv_dim) {
    pdl_begin();
    const size_t row = (size_t)pos[blockIdx.y] * kv_dim;
    const float* r = qkv + (size_t)blockIdx.y * (q_dim + 2 * kv_dim);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < kv_dim; i += gridDim.x * blockDim.x) {
        kc[row + i] = r[q_dim + i];
        vc[row + i] = r[q_dim + kv_dim + i];
    }
}

// h[b, :] = table[tok[b], :] as f32 (embedding lookup of the tokens argmax or the host
// wrote). Grid: (blocks, batch).
extern "C" __global__ void embed_row(const u16* __restrict__ table, const u32* __restrict__ tok,
                                     float* __restrict__ h, int d, int is_bf16) {
    pdl_begin();
    const u16* r = table + (size_t)tok[blockIdx.y] * d;
    float* hb = h + (size_t)blockIdx.y * d;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x) {
        const u32 b = r[i];
        hb[i] = is_bf16 ? __uint_as_float(b << 16) : f16_to_f32(b);
    }
}

// Advance the decode position held on the device: pos[0] += 1 (the last kernel of a
// captured decode step, so that replays need no host writes).
extern "C" __global__ void advance_position(int* __restrict__ pos) {
    pdl_begin();
    if (threadIdx.x == 0 && blockIdx.x == 0) pos[0] += 1;
}

#endif  // part 0
