//! CUDA backend. The driver, NVRTC and cuBLAS are loaded at run time (cudarc's dynamic
//! loading), and the kernels in `kernels.cu` are embedded in the binary and compiled by NVRTC
//! at first use, so the binary builds without a CUDA toolkit and runs with a driver alone (plus
//! libnvrtc). Every entry point returns [`CudaError`], which names the cause: no driver, no GPU,
//! no NVRTC, out of device memory, an unsupported dtype.
//!
//! Layout: weights are f16 or bf16, stored input-major (`wt[in, out]`) so that a zero input
//! skips one contiguous row; activations are f32 `[batch, n]`, batch <= [`MAX_BATCH`].

use std::sync::Arc;

use std::ffi::c_void;

use cudarc::driver::{
    result::DriverError, sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};

/// Kernel parameter list: the address of each argument, in the kernel's order.
macro_rules! params {
    ($($a:expr),* $(,)?) => { [$( &$a as *const _ as *mut c_void ),*] };
}
use half::{bf16, f16};

/// Device buffer and graph types of the backend, so that users need not name cudarc.
pub use cudarc::cublas::CudaBlas;
pub use cudarc::driver::{CudaGraph, CudaSlice as DeviceBuffer};

/// The embedded CUDA C source of every kernel.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

mod nvrtc;
pub use nvrtc::{compile_kernels, gemv_part, image_defines, Images, PARTS};

/// Largest batch the sparse GEMV takes in one launch (the rows it reads are the union of the
/// batch's nonzero inputs).
pub const MAX_BATCH: usize = 8;

/// Values of one row that one block of [`Gpu::argmax`] scans (256 threads, 8 loads of 4).
pub const ARGMAX_CHUNK: usize = 8192;

/// Largest top-k [`Gpu::sample_top_k`] takes.
pub const SAMPLE_MAX_K: usize = 256;

/// What [`Gpu::argmax`] and [`Gpu::sample_top_k`] write for a row that holds a NaN or an
/// infinity (never a token id: ids are below the vocabulary's size).
pub const NON_FINITE: u32 = u32::MAX;

/// Output columns of one GEMV block; inner boundaries of fused segments lie on these tiles.
pub const GEMV_TILE: usize = 256;
const GEMV_THREADS: u32 = 256;
/// Largest input chunk one GEMV block handles (bounds its shared memory under 48 KiB).
pub const MAX_ROWS_PER_CHUNK: usize = 1024;
const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Threads of a batched decode attention block (one block per query head and row).
const ATTN_THREADS: usize = 1024;
/// Threads of a grouped decode attention block (GQA_THREADS in kernels.cu).
const GQA_THREADS: usize = 512;
/// Floats of a grouped attention block's reduction scratch (GQA_RED in kernels.cu).
const GQA_RED: usize = 256;
/// Query heads one grouped attention block takes at most, and the group sizes it is compiled
/// for (attn_rope_decode_g{1,2,4,8}_f32).
const GQA_GROUPS: [usize; 4] = [1, 2, 4, 8];
/// Dynamic shared memory a decode attention kernel may use: the default per-block limit (48
/// KiB) less 16 bytes for the grouped kernel's static `is_last` (the two together must fit:
/// at exactly 48 KiB of dynamic memory its launch failed).
const ATTN_SHARED_BYTES: usize = 48 * 1024 - 16;
/// Keys per run of a split decode attention: caches up to this long are not split.
const ATTN_SPLIT_KEYS: usize = 256;
/// Most runs the keys of one head are split into.
const ATTN_MAX_SPLIT: usize = 16;
/// Caches up to this long are attended by one block per query head (and run); longer ones by
/// one block per key-value head (and run) for the query heads that share it.
const ATTN_GROUP_KEYS: usize = 2048;
/// Query rows of one prefill attention block (PF_QT in kernels.cu).
const PREFILL_ATTN_ROWS: usize = 32;
/// The largest head dimension of the prefill attention (PF_MAXHD in kernels.cu).
pub const PREFILL_ATTN_MAX_HD: usize = 128;

/// A 1-D launch of `blocks` blocks of `threads` threads, no dynamic shared memory.
fn blocks_1d(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Shared floats of the batched decode attention (attn_decode_f32): the query, then the
/// scores, which become the reduction buffer of the weighted sum (4 floats per thread).
fn attention_shared_floats(hd: usize, max_keys: usize) -> usize {
    hd + max_keys.max(4 * ATTN_THREADS)
}

/// The longest KV cache (positions) the decode attention kernels take for head dim `hd`: the
/// scores of one head sit in shared memory (the grouped kernel's new key, value and
/// reduction scratch beside them).
pub fn attention_max_keys(hd: usize) -> usize {
    (ATTN_SHARED_BYTES / 4).saturating_sub(3 * hd + GQA_RED)
}

/// Largest head dimension of the decode attention kernels: a key's dot product is split over
/// at most one warp's 32 lanes of up to 4 float4s each (a larger head's lanes would span two
/// warps, which the kernels' shuffles do not join).
pub const MAX_HEAD_DIM: usize = 512;

/// Shapes the decode attention kernels take: hd a power of two from 4 to [`MAX_HEAD_DIM`],
/// whole key-value groups, and a cache whose scores fit in shared memory.
fn check_attention(n_head: usize, n_kv: usize, hd: usize, max_keys: usize) -> Result<()> {
    if !(4..=MAX_HEAD_DIM).contains(&hd)
        || !hd.is_multiple_of(4)
        || !GQA_THREADS.is_multiple_of(hd / 4)
        || n_kv == 0
        || !n_head.is_multiple_of(n_kv)
    {
        return Err(CudaError::Invalid(format!(
            "attention: head dim {hd} must be a power of two from 4 to {MAX_HEAD_DIM}, heads \
             {n_head} a multiple of {n_kv}"
        )));
    }
    if max_keys > attention_max_keys(hd) {
        return Err(CudaError::Invalid(format!(
            "attention: {max_keys} positions exceed the decode kernel's shared memory ({} for \
             head dim {hd})",
            attention_max_keys(hd)
        )));
    }
    Ok(())
}

/// Why the CUDA backend could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda.so could not be loaded (is the NVIDIA driver installed?)")]
    NoDriver,
    #[error("no CUDA GPU: {0}")]
    NoGpu(String),
    #[error(
        "NVRTC missing: libnvrtc.so could not be loaded; install the CUDA runtime compiler \
         (CUDA toolkit or the nvidia-cuda-nvrtc package) and add its lib directory to \
         LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("cuBLAS missing: libcublas.so could not be loaded")]
    NoCublas,
    #[error("CUDA kernel compilation failed: {0}")]
    Compile(String),
    #[error("out of device memory: allocating {bytes} bytes failed ({free} bytes free)")]
    OutOfMemory { bytes: usize, free: usize },
    #[error("unsupported dtype for the device: {0}")]
    UnsupportedDtype(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Weight element types the GPU kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F16,
    Bf16,
}

impl WeightDtype {
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        }
    }

    /// Parse a dtype name; anything but f16/bf16 is [`CudaError::UnsupportedDtype`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f16" | "fp16" | "float16" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            other => Err(CudaError::UnsupportedDtype(format!(
                "{other} (the GPU GEMV reads f16 or bf16 weights)"
            ))),
        }
    }

    /// Round f32 values to this dtype's bits (round to nearest even).
    pub fn encode(self, v: &[f32]) -> Vec<u16> {
        let mut bits = vec![0u16; v.len()];
        self.encode_into(v, &mut bits);
        bits
    }

    /// [`WeightDtype::encode`] into `out` (as long as `v`).
    pub fn encode_into(self, v: &[f32], out: &mut [u16]) {
        assert_eq!(v.len(), out.len(), "encode_into: lengths");
        match self {
            WeightDtype::F16 => {
                for (b, &x) in out.iter_mut().zip(v) {
                    *b = f16::from_f32(x).to_bits();
                }
            }
            WeightDtype::Bf16 => {
                for (b, &x) in out.iter_mut().zip(v) {
                    *b = bf16::from_f32(x).to_bits();
                }
            }
        }
    }

    /// The f32 value of one stored element.
    pub fn decode(self, bits: u16) -> f32 {
        match self {
            WeightDtype::F16 => f16::from_bits(bits).to_f32(),
            WeightDtype::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }
}

fn arch_name(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (a, b) => {
            return Err(CudaError::NoGpu(format!(
                "compute capability {a}.{b} is not supported by these kernels"
            )))
        }
    })
}

/// The workspace of a split decode attention ([`Gpu::attention_split`]): each run's
/// unnormalized sum, max and sum of exponentials, and a counter per head (zero between
/// launches).
pub struct AttentionSplit {
    n_head: usize,
    n_kv: usize,
    hd: usize,
    max_keys: usize,
    /// Query heads per block of a split cache (one of [`GQA_GROUPS`]).
    group: usize,
    group_keys: usize,
    n_split: usize,
    part: CudaSlice<f32>,
    counters: CudaSlice<u32>,
}

impl AttentionSplit {
    /// How many runs the keys of a long cache are split into at most (1: never split).
    pub fn n_split(&self) -> usize {
        self.n_split
    }

    /// Query heads one block attends in caches longer than `ATTN_GROUP_KEYS` (one of 1, 2,
    /// 4, 8; the whole group up to 8).
    pub fn group(&self) -> usize {
        self.group
    }

    /// The same workspace attending by key-value group from caches longer than `keys` on
    /// instead of `ATTN_GROUP_KEYS` (the tests cover both ways of attending with it).
    pub fn group_from(self, keys: usize) -> Self {
        Self {
            group_keys: keys,
            ..self
        }
    }

    /// Dynamic shared floats of a block: its queries, the new key and value, the reduction
    /// scratch, then the scores of its heads over the longest run (which become the weighted
    /// sums' reduction buffer, 4 floats per thread).
    fn shared_floats(&self) -> usize {
        let run = ATTN_SPLIT_KEYS.max(self.max_keys.div_ceil(self.n_split));
        (self.group + 2) * self.hd + GQA_RED + (self.group * run).max(4 * GQA_THREADS)
    }
}

/// A GPU with the teal kernels loaded, one stream.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    gemv: Vec<CudaFunction>,
    rmsnorm: CudaFunction,
    rope: CudaFunction,
    attn: CudaFunction,
    silu_mul: CudaFunction,
    argmax: CudaFunction,
    /// argmax_f32's per-row best keys and block counters (zero between calls).
    argmax_keys: CudaSlice<u64>,
    argmax_counts: CudaSlice<u32>,
    sample: CudaFunction,
    read_probe: CudaFunction,
    fill_random: CudaFunction,
    kv_append: CudaFunction,
    embed: CudaFunction,
    advance: CudaFunction,
    /// attn_rope_decode_g{1,2,4,8}_f32 (GQA_GROUPS).
    attn_rope: Vec<CudaFunction>,
    gemm_input: CudaFunction,
    fill_rows: CudaFunction,
    attn_prefill: CudaFunction,
    name: String,
    sms: usize,
    pdl: bool,
}

/// Where a GEMV kernel sits in [`Gpu`]'s list: by batch, dtype, vector loads, and whether it
/// takes per-channel thresholds (`pc`).
fn gemv_kernel_index(dtype: WeightDtype, batch: usize, vec: bool, pc: bool) -> usize {
    let d = match dtype {
        WeightDtype::F16 => 0,
        WeightDtype::Bf16 => 1,
    };
    (((batch - 1) * 2 + d) * 2 + usize::from(!vec)) * 2 + usize::from(pc)
}

/// Dynamic shared memory of a GEMV block: the chunk's thresholded inputs and kept row
/// numbers, and the warps' partial sums (`smem` in `gemv_impl`).
fn gemv_shared_bytes(batch: usize, rows: usize) -> usize {
    (batch * rows + rows) * 4 + 8 * GEMV_TILE * 4
}

/// Waves counted by [`whole_wave_rows`].
const WHOLE_WAVES: usize = 3;
/// The shortest chunk [`whole_wave_rows`] proposes: below it a block's fixed costs (the
/// compaction, the reduction) outweigh its rows.
const MIN_WAVE_ROWS: usize = 64;

/// For k = 1 ..= [`WHOLE_WAVES`], the shortest chunk of input rows (a multiple of 8, so the
/// kernel's shared arrays stay 16-byte aligned) with which `tiles` column tiles times the
/// chunks fit in k waves of `wave(rows)` resident blocks, where it is between
/// [`MIN_WAVE_ROWS`] and [`MAX_ROWS_PER_CHUNK`]. A launch of 1.36 waves (Llama-3-8B's down
/// projection in chunks of 320 rows on 528 resident blocks) starts its last blocks only as the
/// first ones finish, each with its whole latency chain ahead of it; in chunks of 440 rows its
/// 528 blocks start at once. Ascending, without repeats.
fn whole_wave_rows(n_in: usize, tiles: usize, wave: impl Fn(usize) -> usize) -> Vec<usize> {
    let mut out = Vec::new();
    if n_in == 0 || tiles == 0 {
        return out;
    }
    for k in 1..=WHOLE_WAVES {
        let chunks = k * wave(MIN_WAVE_ROWS) / tiles;
        if chunks == 0 {
            continue;
        }
        let mut rows = n_in.div_ceil(chunks).div_ceil(8) * 8;
        while rows <= MAX_ROWS_PER_CHUNK && tiles * n_in.div_ceil(rows) > k * wave(rows) {
            rows += 8;
        }
        if (MIN_WAVE_ROWS..=MAX_ROWS_PER_CHUNK).contains(&rows) && !out.contains(&rows) {
            out.push(rows);
        }
    }
    out.sort_unstable();
    out
}

/// A weight matrix on the device, input-major `wt[n_in, n_out]`, with its GEMV workspace.
/// `segments` splits the columns into up to three fused projections (e.g. q|k|v) that each
/// have their own threshold.
pub struct GpuLinear {
    pub n_in: usize,
    pub n_out: usize,
    pub dtype: WeightDtype,
    segments: Vec<usize>,
    wt: CudaSlice<u16>,
    acc: CudaSlice<f32>,
    counters: CudaSlice<u32>,
}

impl GpuLinear {
    /// Column boundaries of the fused projections (end of each).
    pub fn segments(&self) -> &[usize] {
        &self.segments
    }

    /// The weight bits on the device, input-major.
    pub fn weights(&self) -> &CudaSlice<u16> {
        &self.wt
    }

    /// Device bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        self.n_in * self.n_out * 2
    }
}

/// Options of one GEMV launch; the default is `y = W s_t(x)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GemvOpts {
    /// `y = beta * y + W s_t(x)` (ignored with `accumulate`).
    pub beta: f32,
    /// Add the partial sums into y with f32 atomics: y must hold zeros or the residual.
    pub accumulate: bool,
    /// x is `[batch, 2 * n_in]` = gate | up and the input is `silu(gate) * up`.
    pub silu_mul_input: bool,
    /// Row split; `None` uses [`Gpu::gemv_plan`] at full density.
    pub plan: Option<GemvPlan>,
    /// Write `y` starting at element `y_offset`: one projection's columns of a wider fused
    /// output, e.g. k into q|k|v when the segments cannot share one launch.
    pub y_offset: usize,
    /// Elements from one row of `y` to the next (the fused output's width); 0:
    /// `y_offset + n_out`.
    pub y_stride: usize,
}

/// An RMSNorm folded into a GEMV's input: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    pub weight: &'a CudaSlice<f32>,
    pub eps: f32,
}

/// A side job of a GEMV launch: set `out` to `from` (a bias) or to zeros, so that a later
/// GEMV can add into it (accumulate mode) instead of writing through a workspace. The launch
/// does it after waiting for its predecessor, so `out`'s last reader must run before this
/// launch's predecessor ends.
pub struct Prepare<'a> {
    pub out: &'a mut CudaSlice<f32>,
    pub from: Option<&'a CudaSlice<f32>>,
}

/// The threshold of one fused segment of a sparse GEMV, or of a GEMM input
/// ([`Gpu::gemm_input`]): input `x_j` is zeroed when `|x_j| <= t` (a negative `t` keeps every
/// input), or, per input channel, when `|x_j| <= t[j]` (a vector of at least `n_in` values).
#[derive(Clone, Copy)]
pub enum Threshold<'a> {
    Scalar(f32),
    Channels(&'a CudaSlice<f32>),
}

/// How a GEMV launch splits its input rows: `rows_per_chunk` input rows per block (1 to
/// [`MAX_ROWS_PER_CHUNK`], rounded up to a multiple of 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvPlan {
    pub rows_per_chunk: usize,
}

impl Gpu {
    /// Open GPU `ordinal`, compile (or reuse) the kernels and load them.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_device(ordinal)?;
        let ctx = CudaContext::new(ordinal)?;
        // One stream, ordered by construction: cudarc's per-buffer event tracking is not
        // needed and would put event records into every launch (and into captured graphs).
        // SAFETY: every launch goes through `self.stream` only.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let cache = nvrtc::KernelCache::new(arch_name(major, minor)?, Some(nvrtc::default_dir()));
        let images = cache.images()?;
        let mut modules = Vec::with_capacity(PARTS);
        for (part, image) in images.iter().enumerate() {
            let module = match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.clone())) {
                Ok(m) => m,
                // A cached image that does not load (truncated, or from another driver):
                // compiled again, and replaced on disk.
                Err(_) => {
                    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cache.recompile(part)?))?
                }
            };
            modules.push(module);
        }
        let module = &modules[0];
        let mut gemv = Vec::with_capacity(MAX_BATCH * 8);
        for b in 1..=MAX_BATCH {
            for (bf16, d) in [(false, "f16"), (true, "bf16")] {
                for v in ["vec", "any"] {
                    for (pc, suffix) in [(false, ""), (true, "_pc")] {
                        let part = &modules[gemv_part(b, bf16, pc)];
                        gemv.push(part.load_function(&format!("gemv_{d}_b{b}_{v}{suffix}"))?);
                    }
                }
            }
        }
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        let stream = ctx.new_stream()?;
        Ok(Gpu {
            name: ctx.name()?,
            argmax_keys: stream.alloc_zeros(MAX_BATCH)?,
            argmax_counts: stream.alloc_zeros(MAX_BATCH)?,
            stream,
            rmsnorm: module.load_function("rmsnorm_f32")?,
            rope: module.load_function("rope_neox_f32")?,
            attn: module.load_function("attn_decode_f32")?,
            silu_mul: module.load_function("silu_mul_f32")?,
            argmax: module.load_function("argmax_f32")?,
            sample: module.load_function("sample_topk_f32")?,
            read_probe: module.load_function("read_probe")?,
            fill_random: module.load_function("fill_random_u16")?,
            kv_append: module.load_function("kv_append_f32")?,
            embed: module.load_function("embed_row")?,
            advance: module.load_function("advance_position")?,
            attn_rope: GQA_GROUPS
                .iter()
                .map(|g| module.load_function(&format!("attn_rope_decode_g{g}_f32")))
                .collect::<std::result::Result<_, _>>()?,
            gemm_input: module.load_function("gemm_input_f32")?,
            fill_rows: module.load_function("fill_rows_f32")?,
            attn_prefill: module.load_function("attn_prefill_f32")?,
            _modules: modules,
            gemv,
            pdl: major >= 9,
            ctx,
            sms,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Record everything `enqueue` launches on this GPU's stream into one CUDA graph
    /// (nothing runs while recording), ready to replay with [`CudaGraph::launch`].
    pub fn capture(&self, enqueue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = enqueue();
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
        recorded?;
        let graph = graph.ok_or_else(|| CudaError::Invalid("captured an empty graph".into()))?;
        graph.upload()?;
        Ok(graph)
    }

    /// Seconds one replay of `graph` takes: one untimed replay, then the median of `reps`
    /// replays timed with events on this GPU's stream.
    pub fn replay_seconds(&self, graph: &CudaGraph, reps: usize) -> Result<f64> {
        graph.launch()?;
        let ctx = self.stream.context();
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let a = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            let b = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            a.record(&self.stream)?;
            graph.launch()?;
            b.record(&self.stream)?;
            b.synchronize()?;
            times.push(a.elapsed_ms(&b)? as f64 * 1e-3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// `dst[..src.len()] = src` on the device, in stream order (can be captured).
    pub fn copy(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        if src.len() > dst.len() {
            return Err(CudaError::Invalid(format!(
                "copying {} elements into a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        let mut view = dst.slice_mut(0..src.len());
        Ok(self.stream.memcpy_dtod(src, &mut view)?)
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Launch with programmatic dependent launch (on by default from sm_90): the next kernel
    /// starts launching while this one drains; each kernel waits for its predecessor's memory
    /// before touching any (`pdl_begin` in kernels.cu).
    pub fn set_programmatic_launch(&mut self, on: bool) {
        self.pdl = on;
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> sys::CUdeviceptr {
        s.device_ptr(&self.stream).0
    }

    fn ptr_mut<T>(&self, s: &mut CudaSlice<T>) -> sys::CUdeviceptr {
        s.device_ptr_mut(&self.stream).0
    }

    /// # Safety
    /// `params` must match the kernel's parameter list and every pointer must be valid for
    /// the accesses the kernel makes under `cfg`.
    unsafe fn launch(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: zero is a valid bit pattern for this plain C struct/union.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let c = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl),
        };
        self.ctx.bind_to_thread()?;
        // SAFETY: the caller guarantees the parameters; the config is well formed.
        unsafe {
            sys::cuLaunchKernelEx(
                &c,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        Ok(())
    }

    fn oom(&self, bytes: usize, e: DriverError) -> CudaError {
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let free = self.ctx.mem_get_info().map(|(f, _)| f).unwrap_or(0);
            CudaError::OutOfMemory { bytes, free }
        } else {
            CudaError::Driver(e)
        }
    }

    /// Zeroed device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| self.oom(n * std::mem::size_of::<T>(), e))
    }

    /// Copy host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(|e| self.oom(std::mem::size_of_val(v), e))
    }

    /// Overwrite a device buffer's first `v.len()` elements.
    pub fn write<T: DeviceRepr>(&self, v: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if v.len() > dst.len() {
            return Err(CudaError::Invalid(format!(
                "writing {} elements into a buffer of {}",
                v.len(),
                dst.len()
            )));
        }
        let mut view = dst.slice_mut(0..v.len());
        Ok(self.stream.memcpy_htod(v, &mut view)?)
    }

    /// Copy a device buffer back (synchronizes).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(src)?)
    }

    /// Copy the first `n` elements of a device buffer back (synchronizes).
    pub fn download_prefix<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        if n > src.len() {
            return Err(CudaError::Invalid(format!(
                "copying back {n} elements of a buffer of {}",
                src.len()
            )));
        }
        Ok(self.stream.clone_dtoh(&src.slice(0..n))?)
    }

    /// Upload weights given input-major in f32 (`wt[n_in, n_out]`), rounded to `dtype`.
    pub fn linear_from_f32(
        &self,
        wt: &[f32],
        n_in: usize,
        n_out: usize,
        dtype: WeightDtype,
        segments: &[usize],
    ) -> Result<GpuLinear> {
        if wt.len() != n_in * n_out {
            return Err(CudaError::Invalid(format!(
                "weights hold {} values, {n_in} x {n_out} expected",
                wt.len()
            )));
        }
        self.linear_from_bits(&dtype.encode(wt), n_in, n_out, dtype, segments)
    }

    /// Upload weights already encoded as f16/bf16 bits, input-major.
    pub fn linear_from_bits(
        &self,
        bits: &[u16],
        n_in: usize,
        n_out: usize,
        dtype: WeightDtype,
        segments: &[usize],
    ) -> Result<GpuLinear> {
        if bits.len() != n_in * n_out || n_in == 0 || n_out == 0 {
            return Err(CudaError::Invalid(format!(
                "weights hold {} values, {n_in} x {n_out} expected",
                bits.len()
            )));
        }
        if n_in > i32::MAX as usize || n_out > i32::MAX as usize {
            return Err(CudaError::Invalid("matrix dimension over 2^31".into()));
        }
        let segments = check_segments(n_out, segments)?;
        Ok(GpuLinear {
            n_in,
            n_out,
            dtype,
            segments,
            wt: self.upload(bits)?,
            acc: self.zeros(MAX_BATCH * n_out)?,
            counters: self.zeros(n_out.div_ceil(GEMV_TILE))?,
        })
    }

    /// A `[n_in, n_out]` weight matrix of pseudo-random values uniform in `[-scale, scale)`,
    /// generated on the device from `seed` (benchmarks at model scale without host traffic).
    pub fn linear_random(
        &self,
        n_in: usize,
        n_out: usize,
        dtype: WeightDtype,
        segments: &[usize],
        seed: u32,
        scale: f32,
    ) -> Result<GpuLinear> {
        let segments = check_segments(n_out, segments)?;
        let mut wt = self.zeros::<u16>(n_in * n_out)?;
        self.fill_random(&mut wt, dtype, seed, scale)?;
        Ok(GpuLinear {
            n_in,
            n_out,
            dtype,
            segments,
            wt,
            acc: self.zeros(MAX_BATCH * n_out)?,
            counters: self.zeros(n_out.div_ceil(GEMV_TILE))?,
        })
    }

    /// Fill `w` with pseudo-random `dtype` values uniform in `[-scale, scale)`.
    pub fn fill_random(
        &self,
        w: &mut CudaSlice<u16>,
        dtype: WeightDtype,
        seed: u32,
        scale: f32,
    ) -> Result<()> {
        let n = w.len();
        let bf = i32::from(dtype == WeightDtype::Bf16);
        let cfg = blocks_1d((n.div_ceil(256)).min(self.sms * 32) as u32, 256);
        let wp = self.ptr_mut(w);
        let mut p = params![wp, n, seed, scale, bf];
        // SAFETY: matches fill_random_u16; n elements in w.
        unsafe { self.launch(&self.fill_random, cfg, &mut p) }
    }

    /// Copy the key and value parts of fused q|k|v row b (`[batch, q_dim + 2 kv_dim]`) into
    /// the caches at row `pos[b]`, for b < batch.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        qkv: &CudaSlice<f32>,
        kc: &mut CudaSlice<f32>,
        vc: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        q_dim: usize,
        kv_dim: usize,
        batch: usize,
    ) -> Result<()> {
        if qkv.len() < batch * (q_dim + 2 * kv_dim)
            || kc.len() < kv_dim
            || vc.len() < kv_dim
            || pos.len() < batch
        {
            return Err(CudaError::Invalid("kv_append buffers too small".into()));
        }
        let (q_i, kv_i) = (q_dim as i32, kv_dim as i32);
        let cfg = LaunchConfig {
            grid_dim: (kv_dim.div_ceil(256) as u32, batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (qp, kp, vp, pp) = (
            self.ptr(qkv),
            self.ptr_mut(kc),
            self.ptr_mut(vc),
            self.ptr(pos),
        );
        let mut p = params![qp, kp, vp, pp, q_i, kv_i];
        // SAFETY: matches kv_append_f32; the caller sizes the caches for every position used.
        unsafe { self.launch(&self.kv_append, cfg, &mut p) }
    }

    /// `h[b, :] = table[tok[b], :]` for b < batch, from a `[vocab, d]` f16/bf16 table.
    pub fn embed(
        &self,
        table: &CudaSlice<u16>,
        dtype: WeightDtype,
        tok: &CudaSlice<u32>,
        h: &mut CudaSlice<f32>,
        d: usize,
        batch: usize,
    ) -> Result<()> {
        if h.len() < batch * d || table.len() < d || tok.len() < batch {
            return Err(CudaError::Invalid("embed buffers too small".into()));
        }
        let (d_i, bf) = (d as i32, i32::from(dtype == WeightDtype::Bf16));
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(256) as u32, batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (tp, kp, hp) = (self.ptr(table), self.ptr(tok), self.ptr_mut(h));
        let mut p = params![tp, kp, hp, d_i, bf];
        // SAFETY: matches embed_row; token ids come from argmax over the table's rows.
        unsafe { self.launch(&self.embed, cfg, &mut p) }
    }

    /// The workspace of [`Gpu::attention_rope_decode`] for `n_head` query heads sharing `n_kv`
    /// key-value heads of dimension `hd`, over caches of up to `max_keys` positions: how many
    /// query heads one block takes once the cache is split (the whole group up to 8), how many
    /// runs the keys are split into (one per `ATTN_SPLIT_KEYS` keys up to
    /// `ATTN_MAX_SPLIT`, and no more blocks than two per multiprocessor), with room for each
    /// run's partial result.
    pub fn attention_split(
        &self,
        n_head: usize,
        n_kv: usize,
        hd: usize,
        max_keys: usize,
    ) -> Result<AttentionSplit> {
        check_attention(n_head, n_kv, hd, max_keys)?;
        let per = n_head / n_kv;
        let group = *GQA_GROUPS
            .iter()
            .find(|&&g| g >= per)
            .unwrap_or(&GQA_GROUPS[GQA_GROUPS.len() - 1]);
        let n_group = per.div_ceil(group);
        let fit = (2 * self.multiprocessors() / (n_kv * n_group)).max(1);
        let n_split = max_keys
            .div_ceil(ATTN_SPLIT_KEYS)
            .clamp(1, ATTN_MAX_SPLIT.min(fit));
        let split = AttentionSplit {
            n_head,
            n_kv,
            hd,
            max_keys,
            group,
            group_keys: ATTN_GROUP_KEYS,
            n_split,
            part: self.zeros(n_head * n_split * (hd + 2))?,
            counters: self.zeros(n_head)?,
        };
        if split.shared_floats() * 4 > ATTN_SHARED_BYTES {
            return Err(CudaError::Invalid(format!(
                "attention: {max_keys} positions in {n_split} runs exceed the decode kernel's \
                 shared memory for {per} query heads of {hd} per key-value head"
            )));
        }
        Ok(split)
    }

    /// One decode step's attention from the fused q|k|v row (batch 1) at position `pos[0]`:
    /// NeoX RoPE on the `n_head` query and `n_kv` key heads, the rotated keys and the values
    /// stored at cache row `pos[0]`, and attention over keys `0..=pos[0]` into `out`
    /// (`[n_head * hd]`). qkv itself is not changed. The caches hold `max_keys` rows of
    /// `n_kv * hd`; see [`attention_max_keys`]. Caches longer than `ATTN_SPLIT_KEYS` are
    /// attended in runs of keys, merged by the last block (`split`, from
    /// [`Gpu::attention_split`] for these heads and at least `max_keys`). Up to
    /// `ATTN_GROUP_KEYS` keys each query head has its own blocks; beyond, each run of a
    /// key-value head is attended by one block for the query heads that share it (up to 8),
    /// which reads each cached key and value once. `pos` and the cache
    /// rows before `pos[0]` are read before the launch waits for the previous kernel in the
    /// stream (their memory latency overlaps that kernel's tail), so they must not be written
    /// by that kernel nor by one still running when it starts: write them by a copy or by an
    /// earlier graph launch, as the decoder does (each decode step is its own graph launch).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rope_decode(
        &self,
        qkv: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        kc: &mut CudaSlice<f32>,
        vc: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        split: &mut AttentionSplit,
        n_head: usize,
        n_kv: usize,
        hd: usize,
        max_keys: usize,
    ) -> Result<()> {
        check_attention(n_head, n_kv, hd, max_keys)?;
        if split.n_head != n_head
            || split.n_kv != n_kv
            || split.hd != hd
            || split.max_keys < max_keys
        {
            return Err(CudaError::Invalid(format!(
                "attention_rope_decode: the split workspace is for {} heads ({} key-value) of {} \
                 over {} keys, not {n_head} heads ({n_kv}) of {hd} over {max_keys}",
                split.n_head, split.n_kv, split.hd, split.max_keys
            )));
        }
        let cache = max_keys * n_kv * hd;
        if qkv.len() < (n_head + 2 * n_kv) * hd
            || kc.len() < cache
            || vc.len() < cache
            || out.len() < n_head * hd
            || cos.len() < max_keys * hd / 2
            || sin.len() < max_keys * hd / 2
        {
            return Err(CudaError::Invalid(
                "attention_rope_decode buffers too small".into(),
            ));
        }
        let (nh, nkv, hd_i, ns) = (n_head as i32, n_kv as i32, hd as i32, split.n_split as i32);
        let cfg = LaunchConfig {
            grid_dim: (n_kv as u32, split.n_split as u32, (n_head / n_kv) as u32),
            block_dim: (GQA_THREADS as u32, 1, 1),
            shared_mem_bytes: (split.shared_floats() * 4) as u32,
        };
        let f = &self.attn_rope[GQA_GROUPS
            .iter()
            .position(|&g| g == split.group)
            .unwrap_or(0)];
        let (qp, cp, sp, pp) = (self.ptr(qkv), self.ptr(cos), self.ptr(sin), self.ptr(pos));
        let (kp, vp, op) = (self.ptr_mut(kc), self.ptr_mut(vc), self.ptr_mut(out));
        let (wp, np) = (
            self.ptr_mut(&mut split.part),
            self.ptr_mut(&mut split.counters),
        );
        let (sk, gk) = (ATTN_SPLIT_KEYS as i32, split.group_keys as i32);
        let mut p = params![qp, cp, sp, pp, kp, vp, op, nh, nkv, hd_i, wp, np, ns, sk, gk];
        // SAFETY: matches attn_rope_decode_g*_f32 for split.group; sizes checked, the
        // workspace holds n_head * n_split * (hd + 2) floats and n_head counters, split_keys
        // >= n_split, the caller keeps pos[0] below max_keys.
        unsafe { self.launch(f, cfg, &mut p) }
    }

    /// `pos[0] += 1` on the device.
    pub fn advance_position(&self, pos: &mut CudaSlice<i32>) -> Result<()> {
        let cfg = blocks_1d(1, 32);
        let pp = self.ptr_mut(pos);
        let mut p = params![pp];
        // SAFETY: matches advance_position; the buffer holds at least one element.
        unsafe { self.launch(&self.advance, cfg, &mut p) }
    }

    /// Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), median of
    /// 10 copies of a 2 GiB buffer: the `BW` of every byte floor.
    pub fn copy_bandwidth(&self) -> Result<f64> {
        let n = 1usize << 30;
        let mut src = self.zeros::<u16>(n)?;
        self.fill_random(&mut src, WeightDtype::F16, 1, 1.0)?;
        let mut dst = self.zeros::<u16>(n)?;
        let mut times = Vec::new();
        for _ in 0..10 {
            let a = self
                .ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            let b = self
                .ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            a.record(&self.stream)?;
            self.stream.memcpy_dtod(&src, &mut dst)?;
            b.record(&self.stream)?;
            b.synchronize()?;
            times.push(a.elapsed_ms(&b)? as f64 * 1e-3);
        }
        times.sort_by(f64::total_cmp);
        Ok(2.0 * (n * 2) as f64 / times[times.len() / 2])
    }

    /// Default split of the input rows for `batch` input rows, fitted to the H200 sweeps
    /// (docs/perf-cuda.md): about 13.6 blocks per multiprocessor (1792 on 132 SMs) for up to 3
    /// rows, 2 for 4 or more (the batch-8 kernel is bound by its arithmetic and two blocks fill
    /// a multiprocessor's registers; fewer chunks also mean fewer atomic partial sums), chunks a
    /// power of two between 64 (128 for up to 3 rows: a small matrix then runs in about one
    /// wave of blocks) and 1024 rows, twice as long below 30% density so that each warp still
    /// has rows to read. Where that split for up to 3 rows needs more than one wave of resident
    /// blocks but no more than one and a half, the chunks grow (in steps of 32 rows) until
    /// every block fits in one wave: a second, mostly idle wave costs a whole block's latency
    /// chain (Llama-3-8B's q|k|v: 768 blocks of 128 rows on 528 resident become 528 of 192).
    pub fn gemv_plan(&self, n_in: usize, n_out: usize, density: f32, batch: usize) -> GemvPlan {
        let tiles = n_out.div_ceil(GEMV_TILE);
        let (per_sm, min_rows) = if batch >= 4 { (2.0, 64) } else { (13.6, 128) };
        let mut rows = n_in as f64 * tiles as f64 / (per_sm * self.sms as f64);
        if density < 0.3 {
            rows *= 2.0;
        }
        let pow2 = 2f64.powf(rows.max(1.0).log2().round()) as usize;
        let cap = n_in.div_ceil(32) * 32;
        let mut rows = pow2.clamp(min_rows, MAX_ROWS_PER_CHUNK).min(cap);
        if batch < 4 {
            let wave = self.resident_gemv_blocks(batch, rows) * self.sms;
            let blocks = tiles * n_in.div_ceil(rows);
            if wave >= tiles && blocks > wave && 2 * blocks <= 3 * wave {
                let chunks = wave / tiles;
                rows = (n_in.div_ceil(chunks).div_ceil(32) * 32).min(MAX_ROWS_PER_CHUNK);
            }
        }
        GemvPlan {
            rows_per_chunk: rows,
        }
    }

    /// Row splits of a one-row GEMV whose blocks fill whole waves of resident blocks (see
    /// [`whole_wave_rows`]): candidates for a split fitted by timing, beside round numbers
    /// that can leave a last wave mostly idle.
    pub fn whole_wave_splits(&self, n_in: usize, n_out: usize) -> Vec<usize> {
        whole_wave_rows(n_in, n_out.div_ceil(GEMV_TILE), |rows| {
            self.resident_gemv_blocks(1, rows) * self.sms
        })
    }

    /// How many blocks of the batch-`batch` GEMV kernel one multiprocessor holds at once with
    /// chunks of `rows` rows (0 where the driver cannot say).
    fn resident_gemv_blocks(&self, batch: usize, rows: usize) -> usize {
        let b = batch.clamp(1, MAX_BATCH);
        let f = &self.gemv[gemv_kernel_index(WeightDtype::Bf16, b, true, false)];
        f.occupancy_max_active_blocks_per_multiprocessor(
            GEMV_THREADS,
            gemv_shared_bytes(batch, rows),
            None,
        )
        .map_or(0, |n| n as usize)
    }

    /// `y[b, :] = beta * y[b, :] + Wt^T s_t(x[b, :])` for b < batch, with one [`Threshold`] per
    /// fused segment (`thresholds.len() == w.segments().len()`), scalar or per input channel;
    /// a negative scalar keeps every input (dense). Where every segment's is scalar, the
    /// kernel reads no per-channel vector. `x` is `[batch, n_in]`, `y` is `[batch, n_out]`,
    /// both f32.
    /// See [`GemvOpts`] for accumulation into y, a SiLU*mul input and the row split.
    pub fn gemv(
        &self,
        w: &mut GpuLinear,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        batch: usize,
        thresholds: &[Threshold<'_>],
        opts: GemvOpts,
    ) -> Result<()> {
        self.gemv_with_norm(w, x, None, y, batch, thresholds, opts, None)
    }

    /// [`Gpu::gemv`] on `RMSNorm(x) = x / sqrt(mean(x^2) + eps) * norm.weight` (each row of
    /// x), the normalization computed inside the GEMV (no separate RMSNorm launch); the
    /// thresholds apply to the normalized input. Not with a SiLU*mul input.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_rmsnorm(
        &self,
        w: &mut GpuLinear,
        x: &CudaSlice<f32>,
        norm: Norm<'_>,
        y: &mut CudaSlice<f32>,
        batch: usize,
        thresholds: &[Threshold<'_>],
        opts: GemvOpts,
    ) -> Result<()> {
        self.gemv_with_norm(w, x, Some(norm), y, batch, thresholds, opts, None)
    }

    /// [`Gpu::gemv`] (or [`Gpu::gemv_rmsnorm`] with `norm`) whose blocks also carry out
    /// `prepare` (see [`Prepare`]).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_and_prepare(
        &self,
        w: &mut GpuLinear,
        x: &CudaSlice<f32>,
        norm: Option<Norm<'_>>,
        y: &mut CudaSlice<f32>,
        batch: usize,
        thresholds: &[Threshold<'_>],
        opts: GemvOpts,
        prepare: Prepare<'_>,
    ) -> Result<()> {
        self.gemv_with_norm(w, x, norm, y, batch, thresholds, opts, Some(prepare))
    }

    #[allow(clippy::too_many_arguments)]
    fn gemv_with_norm(
        &self,
        w: &mut GpuLinear,
        x: &CudaSlice<f32>,
        norm: Option<Norm<'_>>,
        y: &mut CudaSlice<f32>,
        batch: usize,
        thresholds: &[Threshold<'_>],
        opts: GemvOpts,
        prepare: Option<Prepare<'_>>,
    ) -> Result<()> {
        let GemvOpts {
            beta,
            accumulate,
            silu_mul_input,
            plan,
            y_offset,
            y_stride,
        } = opts;
        let ldy = if y_stride == 0 {
            y_offset + w.n_out
        } else {
            y_stride
        };
        let x_width = if silu_mul_input { 2 * w.n_in } else { w.n_in };
        if norm.is_some_and(|n| silu_mul_input || n.weight.len() < w.n_in) {
            return Err(CudaError::Invalid(
                "gemv with RMSNorm: norm weights shorter than the input, or a SiLU*mul input"
                    .into(),
            ));
        }
        if let Some(p) = &prepare {
            if p.from.is_some_and(|f| f.len() < p.out.len()) || p.out.len() > i32::MAX as usize {
                return Err(CudaError::Invalid(
                    "gemv prepare: the source is shorter than the buffer to set".into(),
                ));
            }
        }
        if batch == 0 || batch > MAX_BATCH {
            return Err(CudaError::Invalid(format!(
                "batch {batch}: 1..={MAX_BATCH} supported"
            )));
        }
        if ldy < y_offset + w.n_out || ldy > i32::MAX as usize {
            return Err(CudaError::Invalid(format!(
                "gemv output row of {ldy} elements cannot hold columns {y_offset}..{}",
                y_offset + w.n_out
            )));
        }
        if x.len() < batch * x_width || y.len() < (batch - 1) * ldy + y_offset + w.n_out {
            return Err(CudaError::Invalid("gemv buffers too small".into()));
        }
        if thresholds.len() != w.segments.len() {
            return Err(CudaError::Invalid(format!(
                "{} thresholds for {} fused segments",
                thresholds.len(),
                w.segments.len()
            )));
        }
        // Per segment the scalar and the per-channel vector (null: the scalar applies); the
        // segments past the last (at most 3) are empty.
        let mut t: [(f32, sys::CUdeviceptr); 3] = [(f32::INFINITY, 0); 3];
        for (ti, &th) in t.iter_mut().zip(thresholds) {
            *ti = self.threshold_args(th, w.n_in)?;
        }
        let pc = t.iter().any(|&(_, c)| c != 0);
        let [(t0, c0), (t1, c1), (t2, c2)] = t;
        let plan = plan.unwrap_or_else(|| self.gemv_plan(w.n_in, w.n_out, 1.0, batch));
        // A multiple of 8 (MAX_ROWS_PER_CHUNK is one), so that the 16-byte reduction stores
        // after the [B][R] inputs and R row numbers stay aligned for any batch.
        let r = plan
            .rows_per_chunk
            .clamp(1, MAX_ROWS_PER_CHUNK)
            .next_multiple_of(8);
        let vec = w.n_out.is_multiple_of(8);
        let f = &self.gemv[gemv_kernel_index(w.dtype, batch, vec, pc)];
        let seg = |i: usize| w.segments.get(i).copied().unwrap_or(w.n_out) as i32;
        let (seg1, seg2) = (seg(0), seg(1));
        let (n_in, n_out, r_i, ldy) = (w.n_in as i32, w.n_out as i32, r as i32, ldy as i32);
        let cfg = LaunchConfig {
            grid_dim: (
                w.n_out.div_ceil(GEMV_TILE) as u32,
                w.n_in.div_ceil(r) as u32,
                1,
            ),
            block_dim: (GEMV_THREADS, 1, 1),
            shared_mem_bytes: gemv_shared_bytes(batch, r) as u32,
        };
        let (acc_mode, glu) = (i32::from(accumulate), i32::from(silu_mul_input));
        let yp = self.ptr_mut(y) + (y_offset * std::mem::size_of::<f32>()) as sys::CUdeviceptr;
        let (wp, xp) = (self.ptr(&w.wt), self.ptr(x));
        let (ap, cp) = (self.ptr_mut(&mut w.acc), self.ptr_mut(&mut w.counters));
        let (nw, eps): (sys::CUdeviceptr, f32) = match norm {
            Some(n) => (self.ptr(n.weight), n.eps),
            None => (0, 0.0),
        };
        let (init_dst, init_src, init_n): (sys::CUdeviceptr, sys::CUdeviceptr, i32) = match prepare
        {
            Some(p) => (
                self.ptr_mut(p.out),
                p.from.map_or(0, |f| self.ptr(f)),
                p.out.len() as i32,
            ),
            None => (0, 0, 0),
        };
        let mut p = params![
            wp, xp, yp, ap, cp, n_in, n_out, r_i, t0, t1, t2, c0, c1, c2, seg1, seg2, beta,
            acc_mode, glu, nw, eps, init_dst, init_src, init_n, ldy
        ];
        // SAFETY: parameters match GEMV_ARGS in kernels.cu; buffer sizes checked above.
        unsafe { self.launch(f, cfg, &mut p) }
    }

    /// A [`Threshold`]'s kernel arguments: the scalar and the per-channel vector (null for a
    /// scalar; with a vector the scalar is not read), the vector checked to cover `n_in`
    /// inputs.
    fn threshold_args(&self, t: Threshold<'_>, n_in: usize) -> Result<(f32, sys::CUdeviceptr)> {
        match t {
            Threshold::Scalar(t) => Ok((t, 0)),
            Threshold::Channels(c) if c.len() >= n_in => Ok((f32::INFINITY, self.ptr(c))),
            Threshold::Channels(c) => Err(CudaError::Invalid(format!(
                "{} per-channel thresholds for {n_in} inputs",
                c.len()
            ))),
        }
    }

    /// RMSNorm of `rows` rows of length `n`.
    pub fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        if x.len() < rows * n || out.len() < rows * n || w.len() < n {
            return Err(CudaError::Invalid("rmsnorm buffers too small".into()));
        }
        let n_i = n as i32;
        let cfg = blocks_1d(rows as u32, 1024);
        let (xp, wp, op) = (self.ptr(x), self.ptr(w), self.ptr_mut(out));
        let mut p = params![xp, wp, op, n_i, eps];
        // SAFETY: matches rmsnorm_f32; sizes checked.
        unsafe { self.launch(&self.rmsnorm, cfg, &mut p) }
    }

    /// NeoX RoPE in place on `x[b, head * hd ..]` for `n_heads` heads of each of `batch` rows
    /// (row stride `row_stride`), at positions `pos[b]` (device), tables `[positions, hd/2]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_neox(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        batch: usize,
        n_heads: usize,
        hd: usize,
        row_stride: usize,
    ) -> Result<()> {
        if !hd.is_multiple_of(2) || x.len() < batch * row_stride || pos.len() < batch {
            return Err(CudaError::Invalid("rope arguments".into()));
        }
        let (hd_i, rs_i) = (hd as i32, row_stride as i32);
        let cfg = LaunchConfig {
            grid_dim: (n_heads as u32, batch as u32, 1),
            block_dim: ((hd as u32 / 2).clamp(32, 256).div_ceil(32) * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (xp, cp, sp, pp) = (self.ptr_mut(x), self.ptr(cos), self.ptr(sin), self.ptr(pos));
        let mut p = params![xp, cp, sp, pp, hd_i, rs_i];
        // SAFETY: matches rope_neox_f32; sizes checked.
        unsafe { self.launch(&self.rope, cfg, &mut p) }
    }

    /// Decode attention: one query row per sequence over `n_keys[b]` cached keys (device).
    /// `k`/`v` hold `batch` caches of `max_keys` rows of `n_kv_head * hd`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n_keys: &CudaSlice<i32>,
        batch: usize,
        n_head: usize,
        n_kv_head: usize,
        hd: usize,
        max_keys: usize,
    ) -> Result<()> {
        let cache = max_keys * n_kv_head * hd;
        if k.len() < batch * cache || v.len() < batch * cache {
            return Err(CudaError::Invalid("attention buffers too small".into()));
        }
        let shape = (batch, n_head, n_kv_head, hd, max_keys);
        self.attention_rows(q, n_head * hd, k, v, cache, out, n_keys, shape)
    }

    /// Attention of `batch` consecutive positions of one sequence (a prefill chunk), after
    /// RoPE and [`Gpu::kv_append`]: query row b is the q part of fused q|k|v row b
    /// (`[batch, (n_head + 2 n_kv_head) hd]`) and attends to the first `n_keys[b]` rows of the
    /// one cache `k`/`v` (`max_keys` rows of `n_kv_head * hd`), e.g. `n_keys[b] = pos[b] + 1`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_chunk(
        &self,
        qkv: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n_keys: &CudaSlice<i32>,
        batch: usize,
        n_head: usize,
        n_kv_head: usize,
        hd: usize,
        max_keys: usize,
    ) -> Result<()> {
        let cache = max_keys * n_kv_head * hd;
        let row = (n_head + 2 * n_kv_head) * hd;
        if k.len() < cache || v.len() < cache || qkv.len() < batch * row {
            return Err(CudaError::Invalid("attention buffers too small".into()));
        }
        let shape = (batch, n_head, n_kv_head, hd, max_keys);
        self.attention_rows(qkv, row, k, v, 0, out, n_keys, shape)
    }

    /// Whether [`Gpu::attention_prefill`] takes heads of dimension `hd`.
    pub fn prefill_attention_fits(hd: usize) -> bool {
        hd >= 4 && hd.is_multiple_of(4) && hd <= PREFILL_ATTN_MAX_HD
    }

    /// Causal attention of a prefill chunk of `rows` consecutive positions from `pos0`, after
    /// RoPE and [`Gpu::kv_append`], tiled: query row b is the q part of fused q|k|v row b
    /// (`[rows, (n_head + 2 n_kv_head) hd]`) and attends to cache rows `0..=pos0 + b` of `k`/`v`
    /// (rows of `n_kv_head * hd`). Heads of dimension a multiple of 4 up to
    /// [`PREFILL_ATTN_MAX_HD`] ([`Gpu::prefill_attention_fits`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        qkv: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        pos0: usize,
        rows: usize,
        n_head: usize,
        n_kv_head: usize,
        hd: usize,
    ) -> Result<()> {
        let row = (n_head + 2 * n_kv_head) * hd;
        let cache = (pos0 + rows) * n_kv_head * hd;
        if !Self::prefill_attention_fits(hd) || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head)
        {
            return Err(CudaError::Invalid(format!(
                "prefill attention: head dim {hd} must be a multiple of 4 up to \
                 {PREFILL_ATTN_MAX_HD}, heads {n_head} a multiple of {n_kv_head}"
            )));
        }
        if rows == 0
            || qkv.len() < rows * row
            || k.len() < cache
            || v.len() < cache
            || out.len() < rows * n_head * hd
        {
            return Err(CudaError::Invalid(
                "prefill attention buffers too small".into(),
            ));
        }
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, rows.div_ceil(PREFILL_ATTN_ROWS) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (p0, r_i, nh, nkv, hd_i, qs) = (
            pos0 as i32,
            rows as i32,
            n_head as i32,
            n_kv_head as i32,
            hd as i32,
            row as i32,
        );
        let (qp, kp, vp, op) = (self.ptr(qkv), self.ptr(k), self.ptr(v), self.ptr_mut(out));
        let mut p = params![qp, kp, vp, op, p0, r_i, nh, nkv, hd_i, qs];
        // SAFETY: matches attn_prefill_f32; sizes checked.
        unsafe { self.launch(&self.attn_prefill, cfg, &mut p) }
    }

    /// `attn_decode_f32` over query rows `q_stride` apart and caches `cache` apart (0: one
    /// shared cache); `shape` = (batch, n_head, n_kv_head, hd, max_keys).
    #[allow(clippy::too_many_arguments)]
    fn attention_rows(
        &self,
        q: &CudaSlice<f32>,
        q_stride: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: usize,
        out: &mut CudaSlice<f32>,
        n_keys: &CudaSlice<i32>,
        shape: (usize, usize, usize, usize, usize),
    ) -> Result<()> {
        let (batch, n_head, n_kv_head, hd, max_keys) = shape;
        check_attention(n_head, n_kv_head, hd, max_keys)?;
        let rows = batch * n_head * hd;
        if batch == 0
            || q.len() < (batch - 1) * q_stride + n_head * hd
            || out.len() < rows
            || n_keys.len() < batch
        {
            return Err(CudaError::Invalid("attention buffers too small".into()));
        }
        let (nh, nkv, hd_i, qs) = (n_head as i32, n_kv_head as i32, hd as i32, q_stride as i32);
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, batch as u32, 1),
            block_dim: (ATTN_THREADS as u32, 1, 1),
            shared_mem_bytes: (attention_shared_floats(hd, max_keys) * 4) as u32,
        };
        let (qp, kp, vp) = (self.ptr(q), self.ptr(k), self.ptr(v));
        let (op, np) = (self.ptr_mut(out), self.ptr(n_keys));
        let mut p = params![qp, kp, vp, op, np, nh, nkv, hd_i, cache, qs];
        // SAFETY: matches attn_decode_f32; sizes checked.
        unsafe { self.launch(&self.attn, cfg, &mut p) }
    }

    /// `out[b, i] = silu(gu[b, i]) * gu[b, n + i]`.
    pub fn silu_mul(
        &self,
        gu: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        batch: usize,
    ) -> Result<()> {
        if gu.len() < 2 * n * batch || out.len() < n * batch {
            return Err(CudaError::Invalid("silu_mul buffers too small".into()));
        }
        let (n_i, b_i) = (n as i32, batch as i32);
        let cfg = blocks_1d((n * batch).div_ceil(256).min(4096) as u32, 256);
        let (gp, op) = (self.ptr(gu), self.ptr_mut(out));
        let mut p = params![gp, op, n_i, b_i];
        // SAFETY: matches silu_mul_f32; sizes checked.
        unsafe { self.launch(&self.silu_mul, cfg, &mut p) }
    }

    /// Index of the largest value of each of `rows` rows of length `n` (first on ties, -0 and
    /// +0 equal; 0 for rows of no values), or [`NON_FINITE`] for a row holding a NaN or an
    /// infinity (-inf included): up to [`MAX_BATCH`] rows per launch, each row split over blocks of
    /// [`ARGMAX_CHUNK`] values.
    pub fn argmax(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<u32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        if x.len() < rows * n || out.len() < rows {
            return Err(CudaError::Invalid("argmax buffers too small".into()));
        }
        if n > i32::MAX as usize {
            return Err(CudaError::Invalid(format!(
                "argmax over rows of {n} values"
            )));
        }
        let (n_i, chunk) = (n as i32, ARGMAX_CHUNK as i32);
        let (kp, cp) = (self.ptr(&self.argmax_keys), self.ptr(&self.argmax_counts));
        for r0 in (0..rows).step_by(MAX_BATCH) {
            let group = (rows - r0).min(MAX_BATCH);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(ARGMAX_CHUNK).max(1) as u32, group as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let xp = self.ptr(x) + (r0 * n * 4) as sys::CUdeviceptr;
            let op = self.ptr_mut(out) + (r0 * 4) as sys::CUdeviceptr;
            let mut p = params![xp, n_i, chunk, op, kp, cp];
            // SAFETY: matches argmax_f32; sizes checked; the keys and counters hold MAX_BATCH
            // rows, are zero between calls (the kernel's last block per row resets them) and
            // are used by this stream only.
            unsafe { self.launch(&self.argmax, cfg, &mut p) }?;
        }
        Ok(())
    }

    /// Samples one token from the `n` logits `x` as teal's CPU sampler does, with its uniform
    /// number `r[0]` in [0, 1) given: the `k` largest (1 <= k <= [`SAMPLE_MAX_K`]), softmax at
    /// `1 / inv_t`, the nucleus prefix reaching `top_p` (1: off), then the token where
    /// `r * kept total` runs out. Writes the id to `out[0]`, or [`NON_FINITE`] where the
    /// logits hold a NaN or an infinity.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_top_k(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        k: usize,
        inv_t: f32,
        top_p: f32,
        min_p: f32,
        r: &CudaSlice<f32>,
        out: &mut CudaSlice<u32>,
    ) -> Result<()> {
        if x.len() < n || out.is_empty() || r.is_empty() || k == 0 || k > SAMPLE_MAX_K.min(n) {
            return Err(CudaError::Invalid(format!(
                "sampling top-{k} of {n} logits (1 <= k <= {SAMPLE_MAX_K} and k <= n)"
            )));
        }
        let (n_i, k_i) = (n as i32, k as i32);
        let cfg = blocks_1d(1, 1024);
        let (xp, rp, op) = (self.ptr(x), self.ptr(r), self.ptr_mut(out));
        let mut p = params![xp, n_i, k_i, inv_t, top_p, min_p, rp, op];
        // SAFETY: matches sample_topk_f32; sizes checked.
        unsafe { self.launch(&self.sample, cfg, &mut p) }
    }

    /// Stream every 16-byte word of `buf` once (a read-bandwidth probe).
    pub fn read_probe(&self, buf: &CudaSlice<u16>, sink: &mut CudaSlice<u32>) -> Result<()> {
        let n16 = buf.len() / 8;
        let cfg = blocks_1d(self.sms as u32 * 8, 512);
        let (bp, sp) = (self.ptr(buf), self.ptr_mut(sink));
        let mut p = params![bp, n16, sp];
        // SAFETY: matches read_probe; n16 words lie inside buf.
        unsafe { self.launch(&self.read_probe, cfg, &mut p) }
    }

    /// The f16/bf16 input of a [`Gpu::gemm`] (cuBLAS multiplies two 16-bit operands):
    /// `out[b, :] = round(s_t(v_b))` for `rows` rows of `n_in`, in `dtype`, where `v_b` is row
    /// `row0 + b` of `x` (rows `ldx` apart), `RMSNorm(x)` with `norm`, or `silu(gate) * up`
    /// with `silu_mul_input` (`x` rows = gate | up, `n_in` each); `s_t` keeps `|v| > t`, or
    /// `|v_j| > t[j]` with per-channel thresholds, as the GEMV does. An f16 value beyond the
    /// type's range sets `overflow[0]` to 1.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_input(
        &self,
        x: &CudaSlice<f32>,
        row0: usize,
        ldx: usize,
        rows: usize,
        n_in: usize,
        t: Threshold<'_>,
        norm: Option<Norm<'_>>,
        silu_mul_input: bool,
        dtype: WeightDtype,
        out: &mut CudaSlice<u16>,
        overflow: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let width = if silu_mul_input { 2 * n_in } else { n_in };
        if rows == 0
            || ldx < width
            || x.len() < (row0 + rows - 1) * ldx + width
            || out.len() < rows * n_in
            || overflow.is_empty()
            || norm.is_some_and(|n| n.weight.len() < n_in)
            || (norm.is_some() && silu_mul_input)
        {
            return Err(CudaError::Invalid("gemm_input arguments".into()));
        }
        let (t, tc) = self.threshold_args(t, n_in)?;
        let (n_i, ld_i, glu) = (n_in as i32, ldx as i32, i32::from(silu_mul_input));
        let bf = i32::from(dtype == WeightDtype::Bf16);
        let (nw, eps) = match norm {
            Some(n) => (self.ptr(n.weight), n.eps),
            None => (0, 0.0f32),
        };
        let cfg = blocks_1d(rows as u32, 256);
        let xp = self.ptr(x) + (row0 * ldx * 4) as u64;
        let (op, fp) = (self.ptr_mut(out), self.ptr_mut(overflow));
        let mut p = params![xp, op, n_i, ld_i, t, tc, nw, eps, glu, bf, fp];
        // SAFETY: matches gemm_input_f32; sizes checked.
        unsafe { self.launch(&self.gemm_input, cfg, &mut p) }
    }

    /// `y[b, :n] = src` (one row) or zeros for `rows` rows `ldy` apart: the bias or zeros a
    /// [`Gpu::gemm`] with `beta = 1` adds to.
    pub fn fill_rows(
        &self,
        y: &mut CudaSlice<f32>,
        src: Option<&CudaSlice<f32>>,
        rows: usize,
        n: usize,
        ldy: usize,
    ) -> Result<()> {
        if rows == 0
            || ldy < n
            || y.len() < (rows - 1) * ldy + n
            || src.is_some_and(|s| s.len() < n)
        {
            return Err(CudaError::Invalid("fill_rows arguments".into()));
        }
        let (n_i, ld_i) = (n as i32, ldy as i32);
        let sp = src.map_or(0, |s| self.ptr(s));
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(64) as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let yp = self.ptr_mut(y);
        let mut p = params![yp, sp, n_i, ld_i];
        // SAFETY: matches fill_rows_f32; sizes checked.
        unsafe { self.launch(&self.fill_rows, cfg, &mut p) }
    }

    /// A GEMM for prefill through cuBLAS: `y[b, col0 + j] = beta * y[b, col0 + j] +
    /// sum_i x[b, i] * wt[i, cols.start + j]` for `rows` rows b and the columns `cols` of the
    /// input-major weights, f32 accumulate and output (rows of `y` `ldy` apart); `x` from
    /// [`Gpu::gemm_input`] in the weights' dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        blas: &cudarc::cublas::CudaBlas,
        w: &GpuLinear,
        cols: std::ops::Range<usize>,
        x: &CudaSlice<u16>,
        rows: usize,
        y: &mut CudaSlice<f32>,
        col0: usize,
        ldy: usize,
        beta: f32,
    ) -> Result<()> {
        let m = cols.len();
        if rows == 0
            || m == 0
            || cols.end > w.n_out
            || x.len() < rows * w.n_in
            || col0 + m > ldy
            || y.len() < (rows - 1) * ldy + col0 + m
        {
            return Err(CudaError::Invalid("gemm arguments".into()));
        }
        // Column-major view: wt row-major [n_in, n_out] is A = [n_out, n_in] (lda n_out), x
        // row-major [rows, n_in] is B = [n_in, rows], y is C = [m, rows] (ldc ldy): C = A B.
        let wp = self.ptr(&w.wt) + (cols.start * 2) as u64;
        let yp = self.ptr_mut(y) + (col0 * 4) as u64;
        let a = (wp, w.n_out, false);
        // SAFETY: the pointers address live device buffers at least as large as the checked
        // shapes need.
        unsafe {
            gemm_ex_16(
                blas,
                w.dtype,
                (m, rows, w.n_in),
                a,
                (self.ptr(x), w.n_in),
                beta,
                (yp, ldy),
            )
        }
    }

    /// cuBLAS on the same problem, for comparison: `y = W x` with `W` `[n_out, n_in]`
    /// row-major (PyTorch's layout) or, with `input_major`, `Wt[n_in, n_out]`; x and W in
    /// `dtype`, f32 accumulate and output.
    #[allow(clippy::too_many_arguments)]
    pub fn cublas_gemv(
        &self,
        blas: &cudarc::cublas::CudaBlas,
        w: &CudaSlice<u16>,
        x: &CudaSlice<u16>,
        y: &mut CudaSlice<f32>,
        n_in: usize,
        n_out: usize,
        dtype: WeightDtype,
        input_major: bool,
    ) -> Result<()> {
        // Column-major view: W row-major [out, in] is A = [in, out] col-major, y = A^T x;
        // Wt row-major [in, out] is [out, in] col-major, y = A x.
        let a = if input_major {
            (self.ptr(w), n_out, false)
        } else {
            (self.ptr(w), n_in, true)
        };
        let yp = self.ptr_mut(y);
        // SAFETY: pointers are live device buffers of the sizes described by the arguments.
        unsafe {
            gemm_ex_16(
                blas,
                dtype,
                (n_out, 1, n_in),
                a,
                (self.ptr(x), n_in),
                0.0,
                (yp, n_out),
            )
        }
    }

    /// A cuBLAS handle on this GPU's stream and its workspace (keep both alive together);
    /// [`CudaError::NoCublas`] without libcublas.
    pub fn cublas(&self) -> Result<(cudarc::cublas::CudaBlas, CudaSlice<u8>)> {
        // SAFETY: only checks whether the shared library can be opened.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        let blas = cudarc::cublas::CudaBlas::new(self.stream.clone())?;
        // An explicit workspace, so that cuBLAS calls can be captured into a graph.
        let ws = self.zeros::<u8>(CUBLAS_WORKSPACE)?;
        let p = self.ptr(&ws);
        // SAFETY: the workspace outlives the handle: both are returned together.
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                p as *mut _,
                CUBLAS_WORKSPACE,
            )
        }
        .result()?;
        Ok((blas, ws))
    }
}

/// One `cublasGemmEx` in cuBLAS's column-major terms: `C = op(A) B + beta C` with
/// `(m, n, k)` = rows of C, columns of C, the inner dimension; `a` = (pointer, leading
/// dimension, transposed), `b` and `c` = (pointer, leading dimension). A and B are 16-bit of
/// `dtype`; the sums and C are f32.
///
/// # Safety
/// The pointers must address device buffers that hold the matrices these shapes and leading
/// dimensions describe, on the handle's stream.
unsafe fn gemm_ex_16(
    blas: &cudarc::cublas::CudaBlas,
    dtype: WeightDtype,
    (m, n, k): (usize, usize, usize),
    (ap, lda, transposed): (sys::CUdeviceptr, usize, bool),
    (bp, ldb): (sys::CUdeviceptr, usize),
    beta: f32,
    (cp, ldc): (sys::CUdeviceptr, usize),
) -> Result<()> {
    use cudarc::cublas::sys as bs;
    let ty = match dtype {
        WeightDtype::F16 => bs::cudaDataType::CUDA_R_16F,
        WeightDtype::Bf16 => bs::cudaDataType::CUDA_R_16BF,
    };
    let op_a = if transposed {
        bs::cublasOperation_t::CUBLAS_OP_T
    } else {
        bs::cublasOperation_t::CUBLAS_OP_N
    };
    let alpha = 1.0f32;
    // SAFETY: the caller guarantees the buffers; alpha and beta outlive the call.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op_a,
            bs::cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            ap as *const _,
            ty,
            lda as i32,
            bp as *const _,
            ty,
            ldb as i32,
            &beta as *const f32 as *const _,
            cp as *mut _,
            bs::cudaDataType::CUDA_R_32F,
            ldc as i32,
            bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}

/// Column boundaries of fused projections: at most 3, increasing, ending at `n_out`, inner
/// boundaries on GEMV tiles (each block reads one threshold).
fn check_segments(n_out: usize, segments: &[usize]) -> Result<Vec<usize>> {
    let segments = if segments.is_empty() {
        vec![n_out]
    } else {
        segments.to_vec()
    };
    let ok = segments.len() <= 3
        && segments.last() == Some(&n_out)
        && segments.windows(2).all(|w| w[0] < w[1])
        && segments[..segments.len() - 1]
            .iter()
            .all(|&s| s % GEMV_TILE == 0);
    if ok {
        Ok(segments)
    } else {
        Err(CudaError::Invalid(format!(
            "fused segments {segments:?}: at most 3, increasing, ending at {n_out}, inner \
             boundaries multiples of {GEMV_TILE}"
        )))
    }
}

/// The driver loads and has device `ordinal`; the error names the first thing missing.
fn check_device(ordinal: usize) -> Result<()> {
    // SAFETY: only checks whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let count = CudaContext::device_count().map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            CudaError::NoGpu("the driver reports no CUDA device".into())
        }
        _ => CudaError::NoGpu(format!("driver initialisation failed: {e}")),
    })?;
    if ordinal >= count.max(0) as usize {
        return Err(CudaError::NoGpu(format!(
            "cuda:{ordinal} asked for, {count} device(s) present"
        )));
    }
    let mut version = 0;
    // SAFETY: writes one int; the driver is initialised (device_count above).
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| CudaError::NoGpu(format!("driver version query failed: {e}")))?;
    check_driver_version(version)
}

/// The oldest driver API the backend calls into (as `major * 1000 + minor * 10`): CUDA 12.8,
/// whose `cuEventElapsedTime_v2` the CUDA 13 bindings time with (the split fitting and the
/// bandwidth probe). An older driver lacks the symbol, which the bindings report by panicking
/// at the first call, so it is refused here with a message.
const MIN_DRIVER_VERSION: i32 = 12080;

fn check_driver_version(version: i32) -> Result<()> {
    if version < MIN_DRIVER_VERSION {
        return Err(CudaError::NoGpu(format!(
            "the NVIDIA driver supports CUDA {}.{}; the CUDA backend needs {}.{} or newer \
             (update the driver)",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER_VERSION / 1000,
            MIN_DRIVER_VERSION % 1000 / 10
        )));
    }
    Ok(())
}

/// Whether `cuda:ordinal` can be opened, without compiling or loading anything: the driver
/// loads, has that device, and NVRTC (needed to compile the kernels) loads. The error names
/// the first thing missing.
pub fn probe(ordinal: usize) -> Result<()> {
    check_device(ordinal)?;
    // SAFETY: only checks whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    Ok(())
}

/// Open `cuda:ordinal`, or say why not. Tests and benchmarks use this to skip with a message
/// where there is no driver or no GPU (CI), and to fail on any other error.
pub fn try_gpu(ordinal: usize) -> Result<Option<Gpu>> {
    match Gpu::new(ordinal) {
        Ok(g) => Ok(Some(g)),
        Err(CudaError::NoDriver) | Err(CudaError::NoGpu(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Starts (`on`) or stops the range of work that a profiler told not to record from the
/// start records (`ncu --profile-from-start off`), on the context current on this thread
/// (the one a [`Gpu`] made on it); without a profiler attached the driver ignores it.
pub fn profiler_range(on: bool) -> Result<()> {
    // SAFETY: plain driver calls on the current context; they take no pointers.
    let r = unsafe {
        if on {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
    r.result()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_drivers_are_refused_with_a_message() {
        check_driver_version(12080).unwrap();
        check_driver_version(13000).unwrap();
        let e = check_driver_version(12040).unwrap_err();
        assert!(matches!(e, CudaError::NoGpu(_)), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("CUDA 12.4") && e.contains("12.8 or newer"),
            "{e}"
        );
    }

    /// Head dims whose key lanes would span two warps (1024, 2048) are refused, not computed
    /// wrong; 512 and the usual ones are taken.
    #[test]
    fn attention_head_dims_stay_within_a_warp() {
        for hd in [4, 64, 128, 256, 512] {
            check_attention(8, 2, hd, 64).unwrap();
        }
        for hd in [1024, 2048, 96, 2] {
            let e = check_attention(8, 2, hd, 64).unwrap_err().to_string();
            assert!(e.contains("from 4 to 512"), "{e}");
        }
    }

    /// Llama-3-8B's launches on 132 multiprocessors holding 4 GEMV blocks each (528).
    #[test]
    fn whole_wave_rows_fill_waves() {
        let wave = |_: usize| 528;
        // down, 14336 -> 4096 (16 tiles): 528 blocks of 440 rows, 1024 of 224, 1520 of 152.
        assert_eq!(whole_wave_rows(14336, 16, wave), vec![152, 224, 440]);
        // gate|up, 4096 -> 28672 (112 tiles): 4, 9 and 14 chunks.
        assert_eq!(whole_wave_rows(4096, 112, wave), vec![296, 456, 1024]);
        // q|k|v, 4096 -> 6144 (24 tiles): one wave is the split gemv_plan already picks.
        assert_eq!(whole_wave_rows(4096, 24, wave), vec![64, 96, 192]);
        for (n_in, tiles) in [(14336, 16), (4096, 112), (4096, 24), (4096, 16), (577, 3)] {
            let rows = whole_wave_rows(n_in, tiles, wave);
            for (k, &r) in rows.iter().rev().enumerate() {
                assert!(r % 8 == 0 && (MIN_WAVE_ROWS..=MAX_ROWS_PER_CHUNK).contains(&r));
                // The longest chunk fills one wave, the next two, ...: at most k + 1 waves,
                // and a shorter chunk (by 8 rows) would need more.
                let blocks = |r: usize| tiles * n_in.div_ceil(r);
                assert!(blocks(r) <= (k + 1) * 528, "{n_in} x {tiles}: {r}");
                assert!(r == MIN_WAVE_ROWS || blocks(r - 8) > (k + 1) * 528);
            }
        }
    }

    /// Shapes too small for a wave, a wave that depends on the chunk, and nothing to split.
    #[test]
    fn whole_wave_rows_edges() {
        // SmolLM2's 576 -> 1536 (6 tiles): 88 chunks would be 8 rows each, under the minimum.
        assert!(whole_wave_rows(576, 6, |_| 528).is_empty());
        // Fewer blocks resident with longer chunks: the chunk grows until it fits.
        let shrinking = |r: usize| if r > 400 { 264 } else { 528 };
        assert_eq!(whole_wave_rows(14336, 16, shrinking), vec![152, 224, 896]);
        assert!(whole_wave_rows(0, 16, |_| 528).is_empty());
        assert!(whole_wave_rows(4096, 0, |_| 528).is_empty());
        // The driver cannot say: no wave, no candidates.
        assert!(whole_wave_rows(4096, 16, |_| 0).is_empty());
    }
}
