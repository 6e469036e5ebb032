//! The Llama forward pass on a CUDA GPU, for generation and perplexity.
//!
//! The weights of a CPU [`Llama`] are copied once, rounded to f16 or bf16, input-major; the
//! thresholds of its masks go into the sparse GEMV: one per projection (TEAL's
//! `InputMask::Threshold`), or one per input channel (`InputMask::Channels`, and
//! `InputMask::WeightAware` resolved against the weights as the CPU does, `t / ||W[:, j]||`),
//! copied to the device per projection and pass. One decode step: embedding row -> per block
//! [q|k|v GEMV on RMSNorm(h) (+ bias), attention with RoPE and the KV append in the same kernel
//! (long caches in runs of keys, several blocks per head), o GEMV into the residual h, gate|up
//! GEMV on RMSNorm(h), down GEMV with SiLU*mul in its prologue into h] -> LM head on RMSNorm(h)
//! (dense): 5 launches per block. Each RMSNorm is computed inside the GEMV that reads it, and
//! every GEMV adds into its output with f32 atomics (no workspace pass): outputs that are not
//! the residual are set to their biases or zeros by an earlier launch (see `enqueue`). Each
//! kind of step is captured once as a CUDA graph and replayed; the token is written to the
//! device before each replay and the position advances on the device. How many input rows each
//! block of a decode GEMV takes is fitted to the masks at the first decode step after they
//! change: the step is timed with each candidate split (`GpuLlama::fit_splits`), since the best
//! split depends on how many rows the thresholds keep.
//!
//! Prefill uses the prefill thresholds. Prompts of `GEMM_MIN_ROWS` (32) positions or more run in
//! chunks of up to `GEMM_ROWS` (512) through cuBLAS (`GpuLlama::prefill_gemm`, launched eagerly):
//! per projection and run of columns that share a threshold, the input thresholded (and
//! normalized, or SiLU*mul) and rounded to the weights' f16/bf16 ([`Gpu::gemm_input`]), then
//! one GEMM with f32 accumulation and output; RoPE and the KV append of every row, then the
//! tiled causal attention of the chunk ([`Gpu::attention_prefill`]). The rounding of the
//! inputs is the one difference from the GEMV path (tests/gpu_model.rs measures it); an f16
//! input beyond f16's range sends that chunk to the GEMV path. Shorter prompts run in chunks
//! of up to [`MAX_BATCH`] positions: the same GEMVs over all rows of the chunk (each weight row
//! read once per chunk, each position thresholded on its own), and instead of the fused
//! attention kernel, RoPE and the KV append of every row, then each row's causal attention
//! over the cache: 7 launches per block, one captured graph per chunk size. The LM head runs
//! on the chunks whose logits are wanted.
//!
//! An observed step (one position, prefill thresholds) also writes the input of each projection
//! site of every layer into its own buffer (RMSNorm and SiLU*mul computed separately for that),
//! which is copied back after the step for calibration and sparsity counting.

use crate::config::Config;
use crate::device::{Bandwidth, Decoder, Footprint, Masks, Pooled};
use crate::error::{Error, Result};
use crate::generate::Models;
use crate::linear::{transpose, Dense, Linear, Sparsify};
use crate::models::llama::{Llama, Logits, Observer, Site};
use crate::sampler::Sampler;
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use teal_kernels::cuda::{
    AttentionSplit, CudaBlas, CudaError, CudaGraph, DeviceBuffer, GemvOpts, GemvPlan, Gpu,
    GpuLinear, Norm, Prepare, Threshold, WeightDtype, MAX_BATCH,
};

/// The two threshold sets a model carries: the prefill model's and the decode model's.
const PASSES: usize = 2;
const PREFILL: usize = 0;
const DECODE: usize = 1;

/// What a captured graph runs: one decode position, one prefill position that also copies
/// out every site's input (calibration), or a prefill chunk of `rows` positions, with or
/// without the LM head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    Decode,
    Observe,
    Chunk { rows: usize, logits: bool },
}

/// Projections that read the same input and write side by side into one output (q|k|v,
/// gate|up): one fused launch where the GEMV can give each part its own threshold (part
/// boundaries on GEMV tiles, or one threshold for all), else one launch per part at its
/// column offset.
struct Group {
    launches: Vec<Launch>,
    /// Columns of the fused output (one row of it per position).
    width: usize,
}

struct Launch {
    w: GpuLinear,
    /// First output column.
    offset: usize,
    /// Thresholds of the fused segments, per pass.
    thresholds: [Vec<SegThreshold>; PASSES],
    /// Row split of the one-position launches, fitted by [`GpuLlama::fit_splits`]; `None`:
    /// [`Gpu::gemv_plan`]'s.
    plan: Option<GemvPlan>,
}

/// Row splits that [`GpuLlama::fit_splits`] tries for each one-position launch, besides
/// [`Gpu::gemv_plan`]'s and those that fill whole waves of blocks
/// ([`Gpu::whole_wave_splits`]).
const FIT_ROWS: [usize; 8] = [96, 128, 160, 192, 256, 320, 512, 1024];
/// Decode steps timed per candidate split (median), after one untimed.
const FIT_REPS: usize = 7;
/// A candidate split replaces the current one only where the decode step gets faster by this
/// fraction (a guard against timing noise).
const FIT_MARGIN: f64 = 0.002;

/// Prompts of at least this many positions are prefilled through cuBLAS GEMMs (one read of the
/// weights per chunk of up to [`GEMM_ROWS`] positions); shorter ones in GEMV chunks of
/// [`MAX_BATCH`] (a captured graph each, cheaper to launch than the GEMM path's ~15 eager
/// launches per block). Measured on an H200 (docs/perf-cuda.md): a GEMM chunk of 64 positions
/// takes about as long as 1.1 GEMV chunks at the Llama-3-8B shape and 1.7 at SmolLM2's, so
/// from 32 positions on the GEMMs are at least twice as fast.
const GEMM_MIN_ROWS: usize = 32;
/// Most positions of one GEMM prefill chunk: bounds its activations (the logits of every
/// position are `GEMM_ROWS x vocab` f32, 263 MB for Llama 3).
const GEMM_ROWS: usize = 512;

/// The threshold of one fused segment in one pass: `|x| <= t` zeroed (negative: dense), or
/// one per input channel (the values, and their copy on the device that the launches read).
#[derive(Clone)]
enum SegThreshold {
    Scalar(f32),
    Channels(Arc<Vec<f32>>, Arc<DeviceBuffer<f32>>),
}

/// Every input kept.
const DENSE: SegThreshold = SegThreshold::Scalar(-1.0);

impl SegThreshold {
    /// The mask of `w` as its [`Linear::sparsify`] resolves it (per-channel thresholds copied
    /// to the device).
    fn of(g: &Gpu, w: &Linear) -> Result<SegThreshold> {
        Ok(match w.sparsify() {
            None => DENSE,
            Some(Sparsify::Threshold(t)) => SegThreshold::Scalar(*t),
            Some(Sparsify::Channels(t)) => {
                SegThreshold::Channels(Arc::clone(t), Arc::new(g.upload(t)?))
            }
        })
    }

    /// What the kernels take.
    fn kernel(&self) -> Threshold<'_> {
        match self {
            SegThreshold::Scalar(t) => Threshold::Scalar(*t),
            SegThreshold::Channels(_, d) => Threshold::Channels(d),
        }
    }

    /// The threshold values as bits (one, or one per input channel).
    fn bits(&self) -> impl Iterator<Item = u32> + '_ {
        let v: &[f32] = match self {
            SegThreshold::Scalar(t) => std::slice::from_ref(t),
            SegThreshold::Channels(t, _) => t,
        };
        v.iter().map(|t| t.to_bits())
    }
}

impl PartialEq for SegThreshold {
    /// The same kind with the same bits.
    fn eq(&self, other: &SegThreshold) -> bool {
        let kinds = matches!(
            (self, other),
            (SegThreshold::Scalar(_), SegThreshold::Scalar(_))
                | (SegThreshold::Channels(..), SegThreshold::Channels(..))
        );
        kinds && self.bits().eq(other.bits())
    }
}

/// Input-major bits of `parts` side by side: row j = part0 row j | part1 row j | ...
/// (converted on all threads: the upload of a Llama-3-8B-sized model is 8 billion values).
fn fused_bits(parts: &[&Linear], dtype: WeightDtype) -> Vec<u16> {
    let n_in = parts[0].in_dim;
    let n_out: usize = parts.iter().map(|p| p.out_dim).sum();
    let mut bits = vec![0u16; n_in * n_out];
    bits.par_chunks_mut(n_out.max(1))
        .enumerate()
        .for_each_init(Vec::new, |row, (j, out)| {
            let mut off = 0;
            for p in parts {
                row.resize(p.out_dim, 0.0);
                p.input_row(j, row);
                dtype.encode_into(row, &mut out[off..off + p.out_dim]);
                off += p.out_dim;
            }
        });
    bits
}

/// The rows of an output-major layer (`[out, in]`), each encoded: the embedding table.
fn row_bits(m: &Dense, dtype: WeightDtype) -> Vec<u16> {
    let mut bits = vec![0u16; m.out_dim * m.in_dim];
    bits.par_chunks_mut(m.in_dim.max(1))
        .enumerate()
        .for_each_init(Vec::new, |row, (o, out)| {
            row.resize(m.in_dim, 0.0);
            m.row(o, row);
            dtype.encode_into(row, out);
        });
    bits
}

/// An output-major layer turned input-major (`bits[j * out + o] = W[o, j]`): the GEMV's layout.
fn transposed_bits(m: &Dense, dtype: WeightDtype) -> Vec<u16> {
    transpose(m.out_dim, m.in_dim, &row_bits(m, dtype))
}

/// The parts' biases side by side (zeros for a part without one), or None when no part has
/// one: what one row of a fused output starts from before its GEMVs add into it.
fn fused_bias(parts: &[&Linear]) -> Option<Vec<f32>> {
    if parts.iter().all(|w| w.bias().is_none()) {
        return None;
    }
    let mut b = Vec::new();
    for w in parts {
        match w.bias() {
            Some(v) => b.extend_from_slice(v),
            None => b.resize(b.len() + w.out_dim, 0.0),
        }
    }
    Some(b)
}

/// `row` repeated `rows` times on the device.
fn upload_rows(g: &Gpu, row: &[f32], rows: usize) -> Result<DeviceBuffer<f32>> {
    Ok(g.upload(&row.repeat(rows))?)
}

impl Group {
    /// A dense layer that has no mask in either pass (the LM head): one launch.
    fn dense(g: &Gpu, m: &Dense, dtype: WeightDtype) -> Result<Group> {
        let w = g.linear_from_bits(&transposed_bits(m, dtype), m.in_dim, m.out_dim, dtype, &[])?;
        Ok(Group {
            launches: vec![Launch {
                w,
                offset: 0,
                thresholds: std::array::from_fn(|_| vec![DENSE]),
                plan: None,
            }],
            width: m.out_dim,
        })
    }

    /// `parts[i][pass]` is part i as the model of `pass` holds it (same weights, its mask).
    fn new(g: &Gpu, parts: &[[&Linear; PASSES]], dtype: WeightDtype) -> Result<Group> {
        let mut t = Vec::with_capacity(parts.len());
        for p in parts {
            t.push([
                SegThreshold::of(g, p[PREFILL])?,
                SegThreshold::of(g, p[DECODE])?,
            ]);
        }
        let weights: Vec<&Linear> = parts.iter().map(|p| p[DECODE]).collect();
        let n_in = weights[0].in_dim;
        let ends: Vec<usize> = weights
            .iter()
            .scan(0, |end, w| {
                *end += w.out_dim;
                Some(*end)
            })
            .collect();
        let n_out = *ends.last().unwrap_or(&0);
        let on_tiles = ends[..ends.len() - 1]
            .iter()
            .all(|&e| e % teal_kernels::cuda::GEMV_TILE == 0);
        let uniform = t.iter().all(|ti| *ti == t[0]);
        // On tiles the fused launch always carries one threshold per part, so that
        // `set_thresholds` can give the parts different ones later.
        let launches = if uniform && !on_tiles {
            let thresholds = std::array::from_fn(|pass| vec![t[0][pass].clone()]);
            let w = g.linear_from_bits(&fused_bits(&weights, dtype), n_in, n_out, dtype, &[])?;
            vec![Launch {
                w,
                offset: 0,
                thresholds,
                plan: None,
            }]
        } else if on_tiles {
            let thresholds =
                std::array::from_fn(|pass| t.iter().map(|ti| ti[pass].clone()).collect());
            let w = g.linear_from_bits(&fused_bits(&weights, dtype), n_in, n_out, dtype, &ends)?;
            vec![Launch {
                w,
                offset: 0,
                thresholds,
                plan: None,
            }]
        } else {
            let mut launches = Vec::with_capacity(parts.len());
            for (i, w) in weights.iter().enumerate() {
                let bits = fused_bits(&[*w], dtype);
                launches.push(Launch {
                    w: g.linear_from_bits(&bits, n_in, w.out_dim, dtype, &[])?,
                    offset: ends[i] - w.out_dim,
                    thresholds: std::array::from_fn(|pass| vec![t[i][pass].clone()]),
                    plan: None,
                });
            }
            launches
        };
        Ok(Group {
            launches,
            width: n_out,
        })
    }

    /// New thresholds of the parts (both passes), where the launches built for the first ones
    /// can take them: one per part launch, one per fused segment, or one for a fused launch
    /// without segments when all parts share it. Returns the new thresholds of the launches
    /// from the first (those after them keep theirs), changing nothing
    /// ([`Group::set_thresholds`] applies them), so that a model whose later layer refuses
    /// keeps every layer's old ones.
    fn new_thresholds(
        &self,
        t: &[SegThreshold],
        what: &str,
    ) -> Result<Vec<[Vec<SegThreshold>; PASSES]>> {
        if self.launches.len() == t.len() {
            return Ok(t
                .iter()
                .map(|ti| [vec![ti.clone()], vec![ti.clone()]])
                .collect());
        }
        let first = if self.launches[0].w.segments().len() == t.len() {
            t.to_vec()
        } else if t.iter().all(|x| *x == t[0]) {
            vec![t[0].clone()]
        } else {
            return Err(Error::Invalid(format!(
                "{what}: the fused projections were uploaded for one shared threshold; \
                 open a new GPU decoder for per-projection thresholds"
            )));
        };
        Ok(vec![[first.clone(), first]])
    }

    /// Applies [`Group::new_thresholds`]'s result (launch by launch from the first).
    fn set_thresholds(&mut self, t: Vec<[Vec<SegThreshold>; PASSES]>) {
        for (l, ti) in self.launches.iter_mut().zip(t) {
            l.thresholds = ti;
        }
    }

    /// `y += W s_t(x)` for `batch` rows: y holds the residual, or what a [`Prepare`] of an
    /// earlier launch set (the bias or zeros); with `norm` the input is RMSNorm(x), computed
    /// by the GEMV. The first launch also carries out `prepare`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        g: &Gpu,
        x: &DeviceBuffer<f32>,
        norm: Option<Norm<'_>>,
        y: &mut DeviceBuffer<f32>,
        mut prepare: Option<Prepare<'_>>,
        pass: usize,
        batch: usize,
        base: GemvOpts,
    ) -> Result<()> {
        for l in &mut self.launches {
            let opts = GemvOpts {
                accumulate: true,
                y_offset: l.offset,
                y_stride: self.width,
                plan: if batch == 1 { l.plan } else { base.plan },
                ..base
            };
            let t: Vec<Threshold<'_>> = l.thresholds[pass]
                .iter()
                .map(SegThreshold::kernel)
                .collect();
            match (prepare.take(), norm) {
                (Some(p), n) => g.gemv_and_prepare(&mut l.w, x, n, y, batch, &t, opts, p)?,
                (None, Some(n)) => g.gemv_rmsnorm(&mut l.w, x, n, y, batch, &t, opts)?,
                (None, None) => g.gemv(&mut l.w, x, y, batch, &t, opts)?,
            }
        }
        Ok(())
    }
}

/// What a GEMM prefill launch reads: `rows` rows of `x` from row `row0`, `ld` apart, through
/// an RMSNorm or SiLU*mul ([`Gpu::gemm_input`]).
struct GemmIn<'a> {
    x: &'a DeviceBuffer<f32>,
    row0: usize,
    ld: usize,
    norm: Option<Norm<'a>>,
    silu_mul: bool,
}

impl<'a> GemmIn<'a> {
    fn plain(x: &'a DeviceBuffer<f32>, ld: usize) -> GemmIn<'a> {
        GemmIn {
            x,
            row0: 0,
            ld,
            norm: None,
            silu_mul: false,
        }
    }

    /// RMSNorm (`weight`, `eps`) of the rows of `x` from `row0`, `ld` apart.
    fn normed(
        x: &'a DeviceBuffer<f32>,
        row0: usize,
        ld: usize,
        weight: &'a DeviceBuffer<f32>,
        eps: f32,
    ) -> GemmIn<'a> {
        GemmIn {
            row0,
            norm: Some(Norm { weight, eps }),
            ..GemmIn::plain(x, ld)
        }
    }
}

/// The cuBLAS handle of the GEMM prefill and its scratch: the 16-bit inputs of one launch
/// and the f16 overflow flag.
struct GemmWork {
    blas: CudaBlas,
    _workspace: DeviceBuffer<u8>,
    x16: DeviceBuffer<u16>,
    overflow: DeviceBuffer<i32>,
}

impl Group {
    /// `y = beta * y + W s_t(x)` over `rows` positions through cuBLAS: per run of columns
    /// that share a threshold in `pass`, the input thresholded and rounded to the weights'
    /// dtype ([`Gpu::gemm_input`]; once per threshold) and one GEMM ([`Gpu::gemm`]).
    #[allow(clippy::too_many_arguments)]
    fn run_gemm(
        &self,
        g: &Gpu,
        work: &mut GemmWork,
        x: &GemmIn<'_>,
        y: &mut DeviceBuffer<f32>,
        rows: usize,
        pass: usize,
        beta: f32,
    ) -> Result<()> {
        let mut current: Option<&SegThreshold> = None;
        for l in &self.launches {
            let ends = l.w.segments();
            let ts = &l.thresholds[pass];
            let mut pieces: Vec<(std::ops::Range<usize>, &SegThreshold)> =
                Vec::with_capacity(ends.len());
            let mut start = 0;
            for (k, &end) in ends.iter().enumerate() {
                let t = if ts.len() == ends.len() {
                    &ts[k]
                } else {
                    &ts[0]
                };
                match pieces.last_mut() {
                    Some((cols, tp)) if *tp == t => cols.end = end,
                    _ => pieces.push((start..end, t)),
                }
                start = end;
            }
            for (cols, t) in pieces {
                if current != Some(t) {
                    g.gemm_input(
                        x.x,
                        x.row0,
                        x.ld,
                        rows,
                        l.w.n_in,
                        t.kernel(),
                        x.norm,
                        x.silu_mul,
                        l.w.dtype,
                        &mut work.x16,
                        &mut work.overflow,
                    )?;
                    current = Some(t);
                }
                let col0 = l.offset + cols.start;
                g.gemm(
                    &work.blas, &l.w, cols, &work.x16, rows, y, col0, self.width, beta,
                )?;
            }
        }
        Ok(())
    }
}

/// Where a block's one-position launch sits ([`Layer::groups`] index, launch within the
/// group) and its weight shape: every block's launch there of that shape gets one row split.
#[derive(Clone, Copy)]
struct Slot {
    group: usize,
    launch: usize,
    shape: (usize, usize),
}

struct Layer {
    attn_norm: DeviceBuffer<f32>,
    ffn_norm: DeviceBuffer<f32>,
    qkv: Group,
    /// What gate|up's output starts from (its biases, [`MAX_BATCH`] rows), set by the q|k|v
    /// launch.
    gate_up_bias: Option<DeviceBuffer<f32>>,
    o: Group,
    gate_up: Group,
    down: Group,
    /// The keys and values of each slot ([`GpuLlama::with_slots`]).
    k_cache: Vec<DeviceBuffer<f32>>,
    v_cache: Vec<DeviceBuffer<f32>>,
    /// The inputs of the four sites ([`Site::ALL`] order) after an observed step.
    sites: Option<[DeviceBuffer<f32>; 4]>,
}

/// Names of a block's GEMV groups, in [`Layer::groups`] order.
const GROUP_NAMES: [&str; 4] = ["q|k|v", "o", "gate|up", "down"];

impl Layer {
    /// The GEMV groups in enqueue order: q|k|v, o, gate|up, down.
    fn groups(&self) -> [&Group; 4] {
        [&self.qkv, &self.o, &self.gate_up, &self.down]
    }

    /// [`Layer::groups`], to change.
    fn groups_mut(&mut self) -> [&mut Group; 4] {
        [
            &mut self.qkv,
            &mut self.o,
            &mut self.gate_up,
            &mut self.down,
        ]
    }
}

/// A Llama on one GPU with one sequence's KV cache (see the module documentation).
pub struct GpuLlama {
    gpu: Gpu,
    ordinal: usize,
    m: Resident,
    /// The steps run so far per slot, captured at first use.
    graphs: HashMap<(usize, Step), CudaGraph>,
    /// Row splits fitted by [`GpuLlama::fit_splits`], per [`Resident::slots`], by the decode
    /// thresholds they were fitted to (their bits).
    fitted: HashMap<Vec<u32>, Vec<GemvPlan>>,
    /// The positions run in each slot (the current one is [`Resident::slot`]).
    lens: Vec<usize>,
    host_logits: Vec<f32>,
    /// The GEMM prefill, set up at the first prompt that takes it.
    gemm: GemmState,
    /// The decode model on the host (its weights shared, not copied): [`Decoder::set_masks`]
    /// resolves masks against it as the CPU does ([`Llama::with_masks`]).
    host: Llama,
}

/// Whether the GEMM prefill is set up ([`GpuLlama::new_gemm`]).
enum GemmState {
    Untried,
    Missing,
    Ready(Box<GemmPrefill>),
}

/// The GEMM prefill's cuBLAS work and its activations and positions for up to [`GEMM_ROWS`]
/// positions.
struct GemmPrefill {
    work: GemmWork,
    acts: Acts,
    pos: DeviceBuffer<i32>,
}

/// The activations of a step over `rows` positions, each `[rows, width]`: one row for a
/// decode step, [`MAX_BATCH`] for prefill chunks.
struct Acts {
    h: DeviceBuffer<f32>,
    qkv: DeviceBuffer<f32>,
    attn: DeviceBuffer<f32>,
    gu: DeviceBuffer<f32>,
    logits: DeviceBuffer<f32>,
    tok: DeviceBuffer<u32>,
}

impl Acts {
    /// Buffers for `rows` positions; q|k|v starts from layer 0's biases `qkv_bias0` (later
    /// steps find them set by the last layer's o launch).
    fn new(g: &Gpu, c: &Config, rows: usize, qkv_bias0: Option<&[f32]>) -> Result<Acts> {
        let qkv_width = c.q_dim() + 2 * c.kv_dim();
        Ok(Acts {
            h: g.zeros(rows * c.hidden_size)?,
            qkv: match qkv_bias0 {
                Some(b) => upload_rows(g, b, rows)?,
                None => g.zeros(rows * qkv_width)?,
            },
            attn: g.zeros(rows * c.q_dim())?,
            gu: g.zeros(rows * 2 * c.intermediate_size)?,
            logits: g.zeros(rows * c.vocab_size)?,
            tok: g.zeros(rows)?,
        })
    }
}

/// Everything a step reads and writes on the device.
struct Resident {
    config: Config,
    dtype: WeightDtype,
    ctx: usize,
    /// The slot whose KV cache the steps use ([`GpuLlama::select`]).
    slot: usize,
    layers: Vec<Layer>,
    /// What each layer's q|k|v output starts from (its biases, [`MAX_BATCH`] rows), set by
    /// the previous layer's o launch (the last layer's sets layer 0's, for the next step).
    qkv_bias: Vec<Option<DeviceBuffer<f32>>>,
    embed: DeviceBuffer<u16>,
    norm: DeviceBuffer<f32>,
    lm_head: Group,
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
    /// Decode (and observed) steps: one position.
    one: Acts,
    /// The decode attention's runs of keys for long caches (shared by the layers, which run
    /// one after another).
    attn_split: AttentionSplit,
    /// Prefill chunks: up to [`MAX_BATCH`] positions.
    chunk: Acts,
    next: DeviceBuffer<u32>,
    /// The sampler's uniform number for the device sampler.
    uniform: DeviceBuffer<f32>,
    /// The decode position (advanced on the device by each decode step).
    pos: DeviceBuffer<i32>,
    /// The positions of a prefill chunk's rows, and the keys each attends to (position + 1).
    chunk_pos: DeviceBuffer<i32>,
    chunk_keys: DeviceBuffer<i32>,
}

impl GpuLlama {
    /// Copies the weights of `models` (the prefill and decode models share them) to GPU
    /// `ordinal` in `dtype`, with room for `ctx` positions.
    pub fn new(
        models: Models<'_>,
        ordinal: usize,
        dtype: WeightDtype,
        ctx: usize,
    ) -> Result<GpuLlama> {
        GpuLlama::with_slots(models, ordinal, dtype, ctx, 1)
    }

    /// [`GpuLlama::new`] with the KV caches of `slots` sequences (`ctx` positions each) over
    /// one copy of the weights: `GpuLlama::select` picks the one the steps run on, and
    /// [`GpuSlot::split`] makes a decoder of each.
    pub fn with_slots(
        models: Models<'_>,
        ordinal: usize,
        dtype: WeightDtype,
        ctx: usize,
        slots: usize,
    ) -> Result<GpuLlama> {
        let gpu = Gpu::new(ordinal)?;
        let (pm, dm): (&Llama, &Llama) = (models.prefill, models.decode);
        let c = dm.config.clone();
        if pm.layers.len() != dm.layers.len() || ctx == 0 || slots == 0 {
            return Err(Error::Invalid(
                "GPU model: the prefill and decode models differ, or the context or the number \
                 of slots is 0"
                    .into(),
            ));
        }
        // The decode attention keeps a head's scores in shared memory.
        let max_ctx = teal_kernels::cuda::attention_max_keys(c.head_dim);
        if ctx > max_ctx {
            return Err(Error::Invalid(format!(
                "context {ctx} is longer than the GPU decode attention holds ({max_ctx} \
                 positions for head dim {}); use a shorter -c/--ctx",
                c.head_dim
            )));
        }
        let kvd = c.kv_dim();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut qkv_bias = Vec::with_capacity(c.num_hidden_layers);
        let bias_rows = |b: Option<Vec<f32>>| -> Result<Option<DeviceBuffer<f32>>> {
            b.map(|b| upload_rows(&gpu, &b, MAX_BATCH)).transpose()
        };
        let qkv_bias0 = dm
            .layers
            .first()
            .and_then(|db| fused_bias(&[&db.q_proj, &db.k_proj, &db.v_proj]));
        for (l, (pb, db)) in pm.layers.iter().zip(&dm.layers).enumerate() {
            let what = format!("layer {l}");
            if db.o_proj.bias().is_some() || db.down_proj.bias().is_some() {
                return Err(Error::Invalid(format!(
                    "{what}: o_proj or down_proj has a bias, which the GPU model does not add"
                )));
            }
            qkv_bias.push(bias_rows(fused_bias(&[
                &db.q_proj, &db.k_proj, &db.v_proj,
            ]))?);
            layers.push(Layer {
                gate_up_bias: bias_rows(fused_bias(&[&db.gate_proj, &db.up_proj]))?,
                attn_norm: gpu.upload(&db.input_layernorm)?,
                ffn_norm: gpu.upload(&db.post_attention_layernorm)?,
                qkv: Group::new(
                    &gpu,
                    &[
                        [&pb.q_proj, &db.q_proj],
                        [&pb.k_proj, &db.k_proj],
                        [&pb.v_proj, &db.v_proj],
                    ],
                    dtype,
                )?,
                o: Group::new(&gpu, &[[&pb.o_proj, &db.o_proj]], dtype)?,
                gate_up: Group::new(
                    &gpu,
                    &[[&pb.gate_proj, &db.gate_proj], [&pb.up_proj, &db.up_proj]],
                    dtype,
                )?,
                down: Group::new(&gpu, &[[&pb.down_proj, &db.down_proj]], dtype)?,
                k_cache: (0..slots)
                    .map(|_| gpu.zeros(ctx * kvd))
                    .collect::<std::result::Result<_, _>>()?,
                v_cache: (0..slots)
                    .map(|_| gpu.zeros(ctx * kvd))
                    .collect::<std::result::Result<_, _>>()?,
                sites: None,
            });
        }
        let (cos, sin) = dm.rope_tables_for(0, ctx);
        let lm_head = Group::dense(&gpu, &dm.lm_head, dtype)?;
        let m = Resident {
            one: Acts::new(&gpu, &c, 1, qkv_bias0.as_deref())?,
            attn_split: gpu.attention_split(
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                ctx,
            )?,
            chunk: Acts::new(&gpu, &c, MAX_BATCH, qkv_bias0.as_deref())?,
            qkv_bias,
            embed: gpu.upload(&row_bits(&dm.embed_tokens, dtype))?,
            norm: gpu.upload(&dm.norm)?,
            cos: gpu.upload(&cos)?,
            sin: gpu.upload(&sin)?,
            next: gpu.zeros(1)?,
            uniform: gpu.zeros(1)?,
            pos: gpu.zeros(1)?,
            chunk_pos: gpu.zeros(MAX_BATCH)?,
            chunk_keys: gpu.zeros(MAX_BATCH)?,
            layers,
            lm_head,
            config: c,
            dtype,
            ctx,
            slot: 0,
        };
        Ok(GpuLlama {
            host_logits: vec![0.0; m.config.vocab_size],
            graphs: HashMap::new(),
            fitted: HashMap::new(),
            lens: vec![0; slots],
            gemm: GemmState::Untried,
            host: dm.clone(),
            m,
            gpu,
            ordinal,
        })
    }
}

impl Resident {
    /// Block 0's GEMV launches in enqueue order, the slots of [`GpuLlama::fit_splits`].
    fn slots(&self) -> Vec<Slot> {
        let mut slots = Vec::new();
        let Some(first) = self.layers.first() else {
            return slots;
        };
        for (group, g) in first.groups().into_iter().enumerate() {
            for (launch, l) in g.launches.iter().enumerate() {
                slots.push(Slot {
                    group,
                    launch,
                    shape: (l.w.n_in, l.w.n_out),
                });
            }
        }
        slots
    }

    /// Give every block's launch in each slot that slot's row split (for one-position steps).
    fn set_splits(&mut self, slots: &[Slot], plans: &[GemvPlan]) {
        for layer in &mut self.layers {
            let groups = layer.groups_mut();
            for (s, &plan) in slots.iter().zip(plans) {
                if let Some(l) = groups[s.group].launches.get_mut(s.launch) {
                    if (l.w.n_in, l.w.n_out) == s.shape {
                        l.plan = Some(plan);
                    }
                }
            }
        }
    }

    /// The decode thresholds of every launch, as bits: what [`GpuLlama::fit_splits`] fits to.
    fn decode_thresholds(&self) -> Vec<u32> {
        self.layers
            .iter()
            .flat_map(Layer::groups)
            .flat_map(|g| &g.launches)
            .flat_map(|l| l.thresholds[DECODE].iter().flat_map(SegThreshold::bits))
            .collect()
    }

    /// Enqueue `step` (see the module documentation): a decode or observed step at the
    /// device position `pos`, which it advances, or a prefill chunk at the positions
    /// `chunk_pos` (each row attending to `chunk_keys` keys). An observed step also writes
    /// each layer's site inputs to its site buffers.
    fn enqueue(&mut self, g: &Gpu, step: Step) -> Result<()> {
        let c = &self.config;
        let (d, eps) = (c.hidden_size, c.rms_norm_eps);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let n_layers = self.layers.len();
        let slot = self.slot;
        let (pass, rows, observe, logits) = match step {
            Step::Decode => (DECODE, 1, false, true),
            Step::Observe => (PREFILL, 1, true, true),
            Step::Chunk { rows, logits } => (PREFILL, rows, false, logits),
        };
        let chunk = matches!(step, Step::Chunk { .. });
        let a = if chunk {
            &mut self.chunk
        } else {
            &mut self.one
        };
        let acc = GemvOpts::default();
        g.embed(&self.embed, self.dtype, &a.tok, &mut a.h, d, rows)?;
        // Every GEMV adds into its output. The residual h holds what o and down add to; q|k|v,
        // gate|up and the logits are set to their biases or zeros by an earlier launch
        // (`Prepare`) once their last reader has finished: gu by q|k|v (after the previous
        // down), qkv by o (after attention, for the next layer), the logits by layer 0's
        // gate|up (after the previous step was read).
        for (i, l) in self.layers.iter_mut().enumerate() {
            let mut sites = match (observe, l.sites.as_mut()) {
                (false, _) => None,
                (true, Some(s)) => Some(s),
                (true, None) => {
                    return Err(Error::Invalid("observed step without site buffers".into()))
                }
            };
            if let Some(s) = sites.as_mut() {
                g.rmsnorm(&a.h, &l.attn_norm, &mut s[0], 1, d, eps)?;
            }
            let norm = Norm {
                weight: &l.attn_norm,
                eps,
            };
            let prep = Prepare {
                out: &mut a.gu,
                from: l.gate_up_bias.as_ref(),
            };
            l.qkv
                .run(g, &a.h, Some(norm), &mut a.qkv, Some(prep), pass, rows, acc)?;
            if chunk {
                // Rows attend to keys of earlier rows of the same chunk: RoPE and the cache
                // append for all rows first, then the attention.
                let width = q_dim + 2 * kv_dim;
                let (cos, sin, at) = (&self.cos, &self.sin, &self.chunk_pos);
                g.rope_neox(&mut a.qkv, cos, sin, at, rows, nh + nkv, hd, width)?;
                g.kv_append(
                    &a.qkv,
                    &mut l.k_cache[slot],
                    &mut l.v_cache[slot],
                    at,
                    q_dim,
                    kv_dim,
                    rows,
                )?;
                g.attention_chunk(
                    &a.qkv,
                    &l.k_cache[slot],
                    &l.v_cache[slot],
                    &mut a.attn,
                    &self.chunk_keys,
                    rows,
                    nh,
                    nkv,
                    hd,
                    self.ctx,
                )?;
            } else {
                g.attention_rope_decode(
                    &a.qkv,
                    &self.cos,
                    &self.sin,
                    &self.pos,
                    &mut l.k_cache[slot],
                    &mut l.v_cache[slot],
                    &mut a.attn,
                    &mut self.attn_split,
                    nh,
                    nkv,
                    hd,
                    self.ctx,
                )?;
            }
            if let Some(s) = sites.as_mut() {
                g.copy(&a.attn, &mut s[1])?;
            }
            let prep = Prepare {
                out: &mut a.qkv,
                from: self.qkv_bias[(i + 1) % n_layers].as_ref(),
            };
            l.o.run(g, &a.attn, None, &mut a.h, Some(prep), pass, rows, acc)?;
            if let Some(s) = sites.as_mut() {
                g.rmsnorm(&a.h, &l.ffn_norm, &mut s[2], 1, d, eps)?;
            }
            let norm = Norm {
                weight: &l.ffn_norm,
                eps,
            };
            let prep = (i == 0 && logits).then_some(Prepare {
                out: &mut a.logits,
                from: None,
            });
            l.gate_up
                .run(g, &a.h, Some(norm), &mut a.gu, prep, pass, rows, acc)?;
            if let Some(s) = sites.as_mut() {
                g.silu_mul(&a.gu, &mut s[3], c.intermediate_size, 1)?;
            }
            let glu = GemvOpts {
                silu_mul_input: true,
                ..acc
            };
            l.down
                .run(g, &a.gu, None, &mut a.h, None, pass, rows, glu)?;
        }
        if logits {
            let norm = Norm {
                weight: &self.norm,
                eps,
            };
            self.lm_head
                .run(g, &a.h, Some(norm), &mut a.logits, None, pass, rows, acc)?;
        }
        if !chunk {
            g.advance_position(&mut self.pos)?;
        }
        Ok(())
    }
}

impl Resident {
    /// Enqueue a GEMM prefill chunk of `rows` positions from `start` (their tokens and
    /// positions written to `p`) with the prefill thresholds: per block, q|k|v (from its
    /// biases), RoPE and the KV append of every row, the chunk's causal attention (tiled,
    /// [`Gpu::attention_prefill`]), o into the residual,
    /// gate|up, down with SiLU*mul into the residual; each projection one
    /// [`Group::run_gemm`]. With `head`, the LM head over every row or the last one, into
    /// the logits from row 0.
    fn enqueue_gemm(
        &mut self,
        g: &Gpu,
        p: &mut GemmPrefill,
        start: usize,
        rows: usize,
        head: Option<Logits>,
    ) -> Result<()> {
        let c = &self.config;
        let (d, eps, ff) = (c.hidden_size, c.rms_norm_eps, c.intermediate_size);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let width = q_dim + 2 * kv_dim;
        let slot = self.slot;
        let (a, work) = (&mut p.acts, &mut p.work);
        g.embed(&self.embed, self.dtype, &a.tok, &mut a.h, d, rows)?;
        for (l, bias) in self.layers.iter_mut().zip(&self.qkv_bias) {
            let beta = from_bias(g, &mut a.qkv, bias.as_ref(), rows, width)?;
            let normed = GemmIn::normed(&a.h, 0, d, &l.attn_norm, eps);
            l.qkv
                .run_gemm(g, work, &normed, &mut a.qkv, rows, PREFILL, beta)?;
            g.rope_neox(
                &mut a.qkv,
                &self.cos,
                &self.sin,
                &p.pos,
                rows,
                nh + nkv,
                hd,
                width,
            )?;
            g.kv_append(
                &a.qkv,
                &mut l.k_cache[slot],
                &mut l.v_cache[slot],
                &p.pos,
                q_dim,
                kv_dim,
                rows,
            )?;
            let (kc, vc) = (&l.k_cache[slot], &l.v_cache[slot]);
            g.attention_prefill(&a.qkv, kc, vc, &mut a.attn, start, rows, nh, nkv, hd)?;
            let attn = GemmIn::plain(&a.attn, q_dim);
            l.o.run_gemm(g, work, &attn, &mut a.h, rows, PREFILL, 1.0)?;
            let beta = from_bias(g, &mut a.gu, l.gate_up_bias.as_ref(), rows, 2 * ff)?;
            let normed = GemmIn::normed(&a.h, 0, d, &l.ffn_norm, eps);
            l.gate_up
                .run_gemm(g, work, &normed, &mut a.gu, rows, PREFILL, beta)?;
            let glu = GemmIn {
                silu_mul: true,
                ..GemmIn::plain(&a.gu, 2 * ff)
            };
            l.down
                .run_gemm(g, work, &glu, &mut a.h, rows, PREFILL, 1.0)?;
        }
        if let Some(which) = head {
            let (row0, n) = match which {
                Logits::All => (0, rows),
                Logits::Last => (rows - 1, 1),
            };
            let x = GemmIn::normed(&a.h, row0, d, &self.norm, eps);
            self.lm_head
                .run_gemm(g, work, &x, &mut a.logits, n, PREFILL, 0.0)?;
        }
        Ok(())
    }
}

/// The positions `start..start + rows`, as the kernels take them.
fn positions(start: usize, rows: usize) -> Vec<i32> {
    (start..start + rows).map(|p| p as i32).collect()
}

/// Set `rows` rows of `y` (`width` wide) to `bias` for a GEMM to add to (beta 1), or leave
/// them for a GEMM that overwrites them (beta 0); returns that beta.
fn from_bias(
    g: &Gpu,
    y: &mut DeviceBuffer<f32>,
    bias: Option<&DeviceBuffer<f32>>,
    rows: usize,
    width: usize,
) -> Result<f32> {
    match bias {
        Some(b) => {
            g.fill_rows(y, Some(b), rows, width, width)?;
            Ok(1.0)
        }
        None => Ok(0.0),
    }
}

impl GpuLlama {
    /// Replay `step`'s graph (captured at first use); the logits stay on the device. The
    /// caller has written its tokens (and a chunk's positions) to the device.
    fn launch(&mut self, step: Step) -> Result<()> {
        let key = (self.m.slot, step);
        if !self.graphs.contains_key(&key) {
            if step == Step::Decode {
                self.fit_splits()?;
            }
            let (g, m) = (&self.gpu, &mut self.m);
            let graph = g.capture(|| m.enqueue(g, step).map_err(capture_error))?;
            self.graphs.insert(key, graph);
        }
        if let Some(graph) = self.graphs.get(&key) {
            graph
                .launch()
                .map_err(teal_kernels::cuda::CudaError::from)?;
        }
        Ok(())
    }

    /// Makes `slot` the sequence the next steps continue (its KV cache and position).
    fn select(&mut self, slot: usize) -> Result<()> {
        if slot >= self.lens.len() {
            return Err(Error::Invalid(format!(
                "slot {slot} of a GPU model with {} slots",
                self.lens.len()
            )));
        }
        if slot != self.m.slot {
            self.m.slot = slot;
            self.gpu.write(&[self.lens[slot] as i32], &mut self.m.pos)?;
        }
        Ok(())
    }

    /// The positions run in the current slot.
    fn len(&self) -> usize {
        self.lens[self.m.slot]
    }

    /// The current slot's count, to advance or cut.
    fn len_mut(&mut self) -> &mut usize {
        &mut self.lens[self.m.slot]
    }

    /// Fits the row split of each one-position GEMV launch to the current masks, once per set
    /// of decode thresholds (kept for later): the decode step itself, at the current position
    /// with the token already written, is captured with each candidate split of one slot at a
    /// time ([`FIT_ROWS`] and [`Gpu::whole_wave_splits`], starting from [`Gpu::gemv_plan`]'s)
    /// and timed over [`FIT_REPS`] replays; a candidate is kept where the step gets faster by
    /// [`FIT_MARGIN`]. The replays write the KV cache rows from the current position on, which
    /// the real steps overwrite before any step reads them; the position is restored. Without
    /// room for the replays before the end of the context the splits stay as they are.
    fn fit_splits(&mut self) -> Result<()> {
        let key = self.m.decode_thresholds();
        let slots = self.m.slots();
        if let Some(plans) = self.fitted.get(&key) {
            self.m.set_splits(&slots, plans);
            return Ok(());
        }
        if self.len() + FIT_REPS + 2 > self.m.ctx {
            return Ok(());
        }
        let mut plans: Vec<GemvPlan> = slots
            .iter()
            .map(|s| self.gpu.gemv_plan(s.shape.0, s.shape.1, 1.0, 1))
            .collect();
        let mut best = self.time_decode(&slots, &plans)?;
        for i in 0..slots.len() {
            let start = plans[i];
            let (n_in, n_out) = slots[i].shape;
            let cap = n_in.div_ceil(32) * 32;
            let mut candidates = FIT_ROWS.to_vec();
            candidates.extend(self.gpu.whole_wave_splits(n_in, n_out));
            candidates.sort_unstable();
            candidates.dedup();
            for rows in candidates
                .into_iter()
                .filter(|&r| r <= cap && r != start.rows_per_chunk)
            {
                let mut trial = plans.clone();
                trial[i] = GemvPlan {
                    rows_per_chunk: rows,
                };
                let t = self.time_decode(&slots, &trial)?;
                if t < best * (1.0 - FIT_MARGIN) {
                    best = t;
                    plans = trial;
                }
            }
        }
        self.m.set_splits(&slots, &plans);
        self.fitted.insert(key, plans);
        Ok(())
    }

    /// Seconds of one decode step with `plans`, from the current position (restored after).
    fn time_decode(&mut self, slots: &[Slot], plans: &[GemvPlan]) -> Result<f64> {
        self.m.set_splits(slots, plans);
        let (g, m) = (&self.gpu, &mut self.m);
        let graph = g.capture(|| m.enqueue(g, Step::Decode).map_err(capture_error))?;
        self.gpu.write(&[self.len() as i32], &mut self.m.pos)?;
        let t = self.gpu.replay_seconds(&graph, FIT_REPS)?;
        self.gpu.write(&[self.len() as i32], &mut self.m.pos)?;
        Ok(t)
    }

    /// Checks that `tokens` fit in the vocabulary and after the current position.
    fn check_input(&self, tokens: &[u32], what: &'static str) -> Result<()> {
        let vocab = self.m.config.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        if self.len() + tokens.len() > self.m.ctx {
            return Err(Error::ContextOverflow {
                what,
                got: self.len() + tokens.len(),
                ctx: self.m.ctx,
            });
        }
        Ok(())
    }

    /// Prefill `tokens` at the current position in GEMV chunks of up to [`MAX_BATCH`]
    /// positions (captured graphs), appending `want`'s logits to `out`: every position's, or
    /// the last one's.
    /// With `states`, each chunk's residual rows (the last block's output, before the final
    /// RMSNorm) are appended to it.
    fn prefill_chunks(
        &mut self,
        tokens: &[u32],
        want: Option<Logits>,
        out: &mut Vec<f32>,
        mut states: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let v = self.m.config.vocab_size;
        let n_chunks = tokens.len().div_ceil(MAX_BATCH);
        for (ci, chunk) in tokens.chunks(MAX_BATCH).enumerate() {
            let rows = chunk.len();
            let first = match want {
                Some(Logits::All) => Some(0),
                Some(Logits::Last) if ci + 1 == n_chunks => Some(rows - 1),
                _ => None,
            };
            let pos = positions(self.len(), rows);
            let keys: Vec<i32> = pos.iter().map(|p| p + 1).collect();
            self.gpu.write(chunk, &mut self.m.chunk.tok)?;
            self.gpu.write(&pos, &mut self.m.chunk_pos)?;
            self.gpu.write(&keys, &mut self.m.chunk_keys)?;
            self.launch(Step::Chunk {
                rows,
                logits: first.is_some(),
            })?;
            *self.len_mut() += rows;
            if let Some(first) = first {
                let all = self.gpu.download_prefix(&self.m.chunk.logits, rows * v)?;
                out.extend_from_slice(&all[first * v..]);
            }
            if let Some(st) = states.as_deref_mut() {
                let d = self.m.config.hidden_size;
                st.extend(self.gpu.download_prefix(&self.m.chunk.h, rows * d)?);
            }
        }
        Ok(())
    }

    /// Prefill `tokens` (at most [`GEMM_ROWS`]) at the current position in one GEMM chunk
    /// ([`Resident::enqueue_gemm`], run eagerly), appending `want`'s logits to `out`. False,
    /// with nothing done that counts, where the GEMM path is not available (no cuBLAS, or no
    /// memory for its buffers) or an f16 input overflowed: the caller runs the GEMV chunks,
    /// which write the same cache rows again. With `states`, the residual rows are appended to
    /// it as by [`GpuLlama::prefill_chunks`].
    fn prefill_gemm(
        &mut self,
        tokens: &[u32],
        want: Option<Logits>,
        out: &mut Vec<f32>,
        states: Option<&mut Vec<f32>>,
    ) -> Result<bool> {
        if matches!(self.gemm, GemmState::Untried) {
            self.gemm = self.new_gemm()?;
        }
        let len = self.len();
        let GemmState::Ready(p) = &mut self.gemm else {
            return Ok(false);
        };
        let rows = tokens.len();
        let pos = positions(len, rows);
        self.gpu.write(tokens, &mut p.acts.tok)?;
        self.gpu.write(&pos, &mut p.pos)?;
        self.m.enqueue_gemm(&self.gpu, p, len, rows, want)?;
        if self.m.dtype == WeightDtype::F16 && self.gpu.download(&p.work.overflow)?[0] != 0 {
            self.gpu.write(&[0i32], &mut p.work.overflow)?;
            return Ok(false);
        }
        if let Some(w) = want {
            let n = if w == Logits::All { rows } else { 1 };
            let v = self.m.config.vocab_size;
            out.extend(self.gpu.download_prefix(&p.acts.logits, n * v)?);
        }
        if let Some(st) = states {
            let d = self.m.config.hidden_size;
            st.extend(self.gpu.download_prefix(&p.acts.h, rows * d)?);
        }
        *self.len_mut() += rows;
        Ok(true)
    }

    /// The GEMM prefill's cuBLAS handle and buffers for [`GEMM_ROWS`] positions, or
    /// [`GemmState::Missing`] without libcublas, the device memory for them or a head
    /// dimension that the prefill attention takes.
    fn new_gemm(&self) -> Result<GemmState> {
        if !Gpu::prefill_attention_fits(self.m.config.head_dim) {
            return Ok(GemmState::Missing);
        }
        let (g, c) = (&self.gpu, &self.m.config);
        let widest = c.hidden_size.max(c.q_dim()).max(c.intermediate_size);
        let set_up = || -> Result<GemmPrefill> {
            let (blas, workspace) = g.cublas()?;
            Ok(GemmPrefill {
                work: GemmWork {
                    blas,
                    _workspace: workspace,
                    x16: g.zeros(GEMM_ROWS * widest)?,
                    overflow: g.zeros(1)?,
                },
                acts: Acts::new(g, c, GEMM_ROWS, None)?,
                pos: g.zeros(GEMM_ROWS)?,
            })
        };
        match set_up() {
            Ok(p) => Ok(GemmState::Ready(Box::new(p))),
            Err(Error::Cuda(CudaError::NoCublas | CudaError::OutOfMemory { .. })) => {
                Ok(GemmState::Missing)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `tokens` at the current position with the prefill model: prompts of
    /// `GEMM_MIN_ROWS` positions or more in GEMM chunks of up to `GEMM_ROWS` (of equal sizes)
    /// where cuBLAS is present, shorter ones (and an f16 chunk whose inputs overflow f16) in
    /// GEMV chunks (see the module documentation). Appends `logits`' logits to `out`, and with
    /// `states` every position's residual.
    fn run_prompt(
        &mut self,
        tokens: &[u32],
        logits: Option<Logits>,
        out: &mut Vec<f32>,
        mut states: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.check_input(tokens, "the input")?;
        let n = tokens.len();
        let size = if n >= GEMM_MIN_ROWS {
            n.div_ceil(n.div_ceil(GEMM_ROWS))
        } else {
            n
        };
        for (i, piece) in tokens.chunks(size).enumerate() {
            let want = match logits {
                Some(Logits::All) => Some(Logits::All),
                Some(Logits::Last) => ((i + 1) * size >= n).then_some(Logits::Last),
                None => None,
            };
            let gemm = piece.len() >= GEMM_MIN_ROWS
                && self.prefill_gemm(piece, want, out, states.as_deref_mut())?;
            if !gemm {
                self.prefill_chunks(piece, want, out, states.as_deref_mut())?;
            }
        }
        // The decode steps read their position on the device.
        self.gpu.write(&[self.len() as i32], &mut self.m.pos)?;
        Ok(())
    }

    /// A decode step of `token`, its logits copied back.
    fn decode_logits(&mut self, token: u32) -> Result<Vec<f32>> {
        self.step(token, Step::Decode)?;
        Ok(self.gpu.download(&self.m.one.logits)?)
    }

    /// Runs `token` and picks the next one as `sampler` would from unbiased logits: greedy, or
    /// for top-k up to [`teal_kernels::cuda::SAMPLE_MAX_K`] the CPU sampler's arithmetic on the
    /// device with its next uniform number; a larger or no top-k cut samples on the host from
    /// the copied logits.
    fn pick_on_device(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32> {
        let cfg = sampler.config();
        if cfg.temperature <= 0.0 {
            return self.decode_greedy(token);
        }
        let v = self.m.config.vocab_size;
        let k = match cfg.top_k {
            0 => v,
            k => k.min(v),
        };
        if k > teal_kernels::cuda::SAMPLE_MAX_K {
            return Ok(sampler.sample(self.decode(token)?));
        }
        let (inv_t, top_p, min_p) = (1.0 / cfg.temperature, cfg.top_p, cfg.min_p);
        let position = self.position();
        self.step(token, Step::Decode)?;
        let r = sampler.draw();
        self.gpu.write(&[r], &mut self.m.uniform)?;
        self.gpu.sample_top_k(
            &self.m.one.logits,
            v,
            k,
            inv_t,
            top_p,
            min_p,
            &self.m.uniform,
            &mut self.m.next,
        )?;
        self.picked(position)
    }

    /// The token an on-device pick of the step at `position` wrote; where the kernel found a
    /// NaN or an infinity among the logits, the error the CPU gives (from the copied logits).
    fn picked(&mut self, position: usize) -> Result<u32> {
        let id = self.gpu.download(&self.m.next)?[0];
        if id != teal_kernels::cuda::NON_FINITE {
            return Ok(id);
        }
        let logits = self.gpu.download(&self.m.one.logits)?;
        crate::device::check_logits(&logits, self.m.config.vocab_size, position, false)?;
        Err(Error::Invalid(format!(
            "position {position}: the device pick reported non-finite logits, the copy has none"
        )))
    }

    /// Run `token` at the current position as a decode or observed step.
    fn step(&mut self, token: u32, step: Step) -> Result<()> {
        self.check_input(&[token], "the sequence")?;
        self.gpu.write(&[token], &mut self.m.one.tok)?;
        self.launch(step)?;
        *self.len_mut() += 1;
        Ok(())
    }
}

/// `enqueue` returns the engine's error; the capture helper wants the backend's.
fn capture_error(e: Error) -> teal_kernels::cuda::CudaError {
    match e {
        Error::Cuda(c) => c,
        other => teal_kernels::cuda::CudaError::Invalid(other.to_string()),
    }
}

impl Decoder for GpuLlama {
    fn config(&self) -> &Config {
        &self.m.config
    }
    fn capacity(&self) -> usize {
        self.m.ctx
    }
    fn position(&self) -> usize {
        self.len()
    }
    fn clear(&mut self) -> Result<()> {
        self.truncate(0)
    }
    /// The cached keys and values past `len` stay in device memory and are overwritten by
    /// the next steps; attention reads only positions before the current one.
    fn truncate(&mut self, len: usize) -> Result<()> {
        let cut = self.len().min(len);
        *self.len_mut() = cut;
        self.gpu.write(&[cut as i32], &mut self.m.pos)?;
        Ok(())
    }
    /// In GEMM or GEMV chunks (`GpuLlama::run_prompt`).
    fn prefill(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(match logits {
            Logits::Last => self.m.config.vocab_size,
            Logits::All => tokens.len() * self.m.config.vocab_size,
        });
        let first = logits.first_position(self.position(), tokens.len());
        self.run_prompt(tokens, Some(logits), &mut out, None)?;
        crate::device::check_logits(&out, self.m.config.vocab_size, first, false)?;
        Ok(out)
    }
    /// The residual of every position from the prefill model (GEMM or GEMV chunks, as
    /// [`Decoder::prefill`]), copied back; the final RMSNorm and the pooling run on the host.
    /// A piece is chunked on its own: an input in pieces of the sizes the whole input's GEMM
    /// chunks have runs the same chunks.
    fn embed_piece(&mut self, tokens: &[u32], pooled: &mut Pooled) -> Result<()> {
        let mut states = Vec::with_capacity(tokens.len() * self.m.config.hidden_size);
        self.run_prompt(tokens, None, &mut Vec::new(), Some(&mut states))?;
        let c = &self.m.config;
        let (d, eps) = (c.hidden_size, c.rms_norm_eps);
        let norm = self.gpu.download(&self.m.norm)?;
        let mut normed = vec![0.0f32; states.len()];
        for (x, y) in states.chunks(d).zip(normed.chunks_mut(d)) {
            teal_kernels::reference::rmsnorm(x, &norm, eps, y);
        }
        pooled.add(&normed);
        Ok(())
    }
    fn decode(&mut self, token: u32) -> Result<&[f32]> {
        let position = self.position();
        self.host_logits = self.decode_logits(token)?;
        crate::device::check_logits(&self.host_logits, self.m.config.vocab_size, position, false)?;
        Ok(&self.host_logits)
    }
    fn decode_greedy(&mut self, token: u32) -> Result<u32> {
        let position = self.position();
        self.step(token, Step::Decode)?;
        let v = self.m.config.vocab_size;
        self.gpu
            .argmax(&self.m.one.logits, &mut self.m.next, 1, v)?;
        self.picked(position)
    }
    /// On the device where the sampler allows it ([`Self::pick_on_device`]: the CPU sampler's
    /// arithmetic, same seed, same numbers), a greedy pick with banned tokens (biases of -inf)
    /// checked after it; other biases, penalties and constraints, and sampling with bans, on
    /// the host from the copied logits.
    fn decode_sample(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32> {
        let cfg = sampler.config();
        // Bans alone leave a greedy pick to the device (the argmax is the same unless it is
        // banned); a sampled one not, as a ban renormalizes the distribution the uniform
        // number is read against (measured on an H100: 4 of 32 tokens differed).
        let device_picks = !cfg.adjusts_logits() || (cfg.bans_only() && cfg.temperature <= 0.0);
        if !device_picks {
            // Biases and penalties (which need the recent tokens the host sampler keeps) are
            // applied on the host.
            return Ok(sampler.sample(self.decode(token)?));
        }
        let picked = self.pick_on_device(token, sampler)?;
        if !sampler.config().banned(picked) {
            return Ok(picked);
        }
        // A greedy pick of a banned token (e.g. an end token with `ignore_eos`): the host picks
        // again from this step's logits with the bans applied, as the CPU sampler would have.
        let mut logits = self.gpu.download(&self.m.one.logits)?;
        for &(t, _) in &sampler.config().logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(crate::sampler::argmax(&logits))
    }
    fn prefill_observed(&mut self, tokens: &[u32], observer: &mut dyn Observer) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let c = &self.m.config;
        let widths = [c.hidden_size, c.q_dim(), c.hidden_size, c.intermediate_size];
        for l in &mut self.m.layers {
            if l.sites.is_none() {
                l.sites = Some([
                    self.gpu.zeros(widths[0])?,
                    self.gpu.zeros(widths[1])?,
                    self.gpu.zeros(widths[2])?,
                    self.gpu.zeros(widths[3])?,
                ]);
            }
        }
        for &t in tokens {
            self.step(t, Step::Observe)?;
            for (li, l) in self.m.layers.iter().enumerate() {
                if let Some(sites) = &l.sites {
                    for (si, buf) in sites.iter().enumerate() {
                        let v = self.gpu.download(buf)?;
                        observer.observe(li, Site::ALL[si], &v[..widths[si]], widths[si]);
                    }
                }
            }
        }
        Ok(())
    }
    /// Resolved as on the CPU ([`Llama::with_masks`]: the number of layers and the widths of
    /// per-channel thresholds checked, weight-aware thresholds from the weights' column
    /// norms), then the thresholds of every launch replaced (per-channel ones copied to the
    /// device). All or nothing: every layer's new thresholds are made and checked before any
    /// is replaced, so that an error (a refused fusion, device memory) leaves the old ones and
    /// the captured graphs, whose launches read the old per-channel buffers, valid.
    fn set_masks(&mut self, masks: Option<&Masks>) -> Result<()> {
        let masked = masks.map(|m| self.host.with_masks(m)).transpose()?;
        let mut new = Vec::with_capacity(self.m.layers.len());
        for (i, l) in self.m.layers.iter().enumerate() {
            let what = format!("layer {i}");
            let mut t: [SegThreshold; 7] = std::array::from_fn(|_| DENSE);
            if let Some(m) = &masked {
                for (tp, (_, w)) in t.iter_mut().zip(m.layers[i].linears()) {
                    *tp = SegThreshold::of(&self.gpu, w)?;
                }
            }
            new.push([
                l.qkv.new_thresholds(&t[0..3], &what)?,
                l.o.new_thresholds(&t[3..4], &what)?,
                l.gate_up.new_thresholds(&t[4..6], &what)?,
                l.down.new_thresholds(&t[6..7], &what)?,
            ]);
        }
        self.graphs.clear();
        for (l, [qkv, o, gate_up, down]) in self.m.layers.iter_mut().zip(new) {
            l.qkv.set_thresholds(qkv);
            l.o.set_thresholds(o);
            l.gate_up.set_thresholds(gate_up);
            l.down.set_thresholds(down);
        }
        Ok(())
    }
    fn footprint(&self) -> Footprint {
        let c = &self.m.config;
        let (d, ff, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let b = 2.0; // f16 / bf16
        let proj = [d * q, d * kv, d * kv, q * d, d * ff, d * ff, ff * d].map(|n| n as f64 * b);
        Footprint {
            proj: vec![proj; c.num_hidden_layers],
            lm_head: (c.vocab_size * d) as f64 * b,
            embed_row: d as f64 * b,
            kv_per_position: (2 * c.num_hidden_layers * kv * 4) as f64,
        }
    }
    fn bandwidth(&self, _cpu_buffer: usize) -> Result<Bandwidth> {
        Ok(Bandwidth {
            bytes_per_s: self.gpu.copy_bandwidth()?,
            method: "device-to-device copy, bytes read + written",
        })
    }
    /// With fitted splits (`GpuLlama::fit_splits`), block 0's rows per chunk of each
    /// one-position launch follow the device, e.g. `rows q|k|v 192, o 128, gate|up 256, down 128`.
    fn describe(&self) -> String {
        let splits: Vec<String> = self
            .m
            .layers
            .first()
            .map(Layer::groups)
            .into_iter()
            .flatten()
            .zip(GROUP_NAMES)
            .flat_map(|(g, name)| {
                g.launches
                    .iter()
                    .filter_map(move |l| l.plan.map(|p| format!("{name} {}", p.rows_per_chunk)))
            })
            .collect();
        let fitted = if splits.is_empty() {
            String::new()
        } else {
            format!("; rows {}", splits.join(", "))
        };
        format!(
            "cuda:{} ({}, {}{fitted})",
            self.ordinal,
            self.gpu.name(),
            self.m.dtype.name()
        )
    }
}

/// One slot of a [`GpuLlama`] with several ([`GpuLlama::with_slots`]): a [`Decoder`] of its
/// own sequence over the shared weights, which makes its slot the model's current one before
/// each call. The slots share the weights' thresholds too: [`Decoder::set_masks`] on one sets
/// them for all.
pub struct GpuSlot {
    model: Rc<RefCell<GpuLlama>>,
    slot: usize,
    config: Config,
    logits: Vec<f32>,
}

impl GpuSlot {
    /// A decoder for each slot of `model`.
    pub fn split(model: GpuLlama) -> Vec<GpuSlot> {
        let config = model.m.config.clone();
        let n = model.lens.len();
        let model = Rc::new(RefCell::new(model));
        (0..n)
            .map(|slot| GpuSlot {
                model: Rc::clone(&model),
                slot,
                config: config.clone(),
                logits: Vec::new(),
            })
            .collect()
    }

    /// `f` on the model with this slot selected.
    fn on<R>(&self, f: impl FnOnce(&mut GpuLlama) -> Result<R>) -> Result<R> {
        let mut m = self.model.borrow_mut();
        m.select(self.slot)?;
        f(&mut m)
    }
}

impl Decoder for GpuSlot {
    fn config(&self) -> &Config {
        &self.config
    }
    fn capacity(&self) -> usize {
        self.model.borrow().m.ctx
    }
    fn position(&self) -> usize {
        self.model.borrow().lens[self.slot]
    }
    fn clear(&mut self) -> Result<()> {
        self.on(|m| m.clear())
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        self.on(|m| m.truncate(len))
    }
    fn prefill(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        self.on(|m| m.prefill(tokens, logits))
    }
    fn embed_piece(&mut self, tokens: &[u32], pooled: &mut Pooled) -> Result<()> {
        self.on(|m| m.embed_piece(tokens, pooled))
    }
    fn decode(&mut self, token: u32) -> Result<&[f32]> {
        let position = self.position();
        self.logits = self.on(|m| m.decode_logits(token))?;
        let vocab = self.model.borrow().m.config.vocab_size;
        crate::device::check_logits(&self.logits, vocab, position, false)?;
        Ok(&self.logits)
    }
    fn decode_greedy(&mut self, token: u32) -> Result<u32> {
        self.on(|m| m.decode_greedy(token))
    }
    fn decode_sample(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32> {
        self.on(|m| m.decode_sample(token, sampler))
    }
    fn prefill_observed(&mut self, tokens: &[u32], observer: &mut dyn Observer) -> Result<()> {
        self.on(|m| m.prefill_observed(tokens, observer))
    }
    fn set_masks(&mut self, masks: Option<&Masks>) -> Result<()> {
        self.on(|m| m.set_masks(masks))
    }
    fn footprint(&self) -> Footprint {
        self.model.borrow().footprint()
    }
    fn bandwidth(&self, cpu_buffer: usize) -> Result<Bandwidth> {
        self.model.borrow().bandwidth(cpu_buffer)
    }
    fn describe(&self) -> String {
        let n = self.model.borrow().lens.len();
        format!(
            "{}, slot {} of {n}",
            self.model.borrow().describe(),
            self.slot
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random::{random_llama_as, shape};
    use teal_kernels::packed::Dtype;

    /// The upload layouts, built on all threads, against the weights read one value at a time
    /// (odd sizes: d 48, q|k|v 48 + 16 + 16, vocabulary 97).
    #[test]
    fn upload_layouts_match_the_weights() {
        let m = random_llama_as(&shape("qwen2-tiny").unwrap(), 5, Dtype::Bf16).unwrap();
        let b = &m.layers[1];
        let parts = [&b.q_proj, &b.k_proj, &b.v_proj];
        for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
            let bits = fused_bits(&parts, dtype);
            let n_out: usize = parts.iter().map(|p| p.out_dim).sum();
            assert_eq!(bits.len(), b.q_proj.in_dim * n_out);
            for j in 0..b.q_proj.in_dim {
                let mut off = 0;
                for p in parts {
                    let mut row = vec![0.0f32; p.out_dim];
                    p.input_row(j, &mut row);
                    for (o, &v) in row.iter().enumerate() {
                        assert_eq!(bits[j * n_out + off + o], dtype.encode(&[v])[0]);
                    }
                    off += p.out_dim;
                }
            }
            let head = &m.lm_head;
            let (rows, t) = (row_bits(head, dtype), transposed_bits(head, dtype));
            let mut row = vec![0.0f32; head.in_dim];
            for o in 0..head.out_dim {
                head.row(o, &mut row);
                for (j, &v) in row.iter().enumerate() {
                    let e = dtype.encode(&[v])[0];
                    assert_eq!(rows[o * head.in_dim + j], e);
                    assert_eq!(t[j * head.out_dim + o], e);
                }
            }
        }
    }
}
