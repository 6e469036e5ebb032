//! The Llama forward pass on a CUDA GPU, one position per step, for generation and perplexity.
//!
//! The weights of a CPU [`Llama`] are copied once, rounded to f16 or bf16, input-major; the
//! thresholds of its TEAL masks ([`InputMask::Threshold`]) go into the sparse GEMV. One step:
//! embedding row -> per block [q|k|v GEMV on RMSNorm(h) (+ bias), RoPE + KV append,
//! attention, o GEMV into the residual h, gate|up GEMV on RMSNorm(h), down GEMV with SiLU*mul
//! in its prologue into h] -> LM head on RMSNorm(h) (dense). Each RMSNorm is computed inside
//! the GEMV that reads it. A step is captured once as a CUDA graph
//! per pass (prefill thresholds, decode thresholds) and replayed; the token is written to the
//! device before each replay and the position advances on the device.
//!
//! Prefill runs the prompt one position at a time through the same step (correct, not fast).
//! Weight-aware masks (per-channel thresholds) are not supported on the GPU. An observed step
//! (a third graph, prefill thresholds) also writes the input of each projection site of every
//! layer into its own buffer (RMSNorm and SiLU*mul computed separately for that), which is
//! copied back after the step for calibration and sparsity counting.

use crate::config::Config;
use crate::device::{Bandwidth, Decoder, Footprint, Masks};
use crate::error::{Error, Result};
use crate::generate::Models;
use crate::linear::{Dense, InputMask, Linear};
use crate::models::llama::{Llama, Logits, Observer, Site};
use crate::sampler::Sampler;
use teal_kernels::cuda::{CudaGraph, DeviceBuffer, GemvOpts, Gpu, GpuLinear, WeightDtype};

/// The two threshold sets a model carries: the prefill model's and the decode model's.
const PASSES: usize = 2;
const PREFILL: usize = 0;
const DECODE: usize = 1;
/// The third graph: a prefill step that also copies out every site's input.
const OBSERVE: usize = 2;

/// Projections that read the same input and write side by side into one output (q|k|v,
/// gate|up): one fused launch where the GEMV can give each part its own threshold (part
/// boundaries on GEMV tiles, or one threshold for all), else one launch per part at its
/// column offset.
struct Group {
    launches: Vec<Launch>,
    /// The parts' biases side by side, copied into the output before the GEMVs add to it.
    bias: Option<DeviceBuffer<f32>>,
}

struct Launch {
    w: GpuLinear,
    /// First output column.
    offset: usize,
    /// Thresholds of the fused segments, per pass (negative: dense).
    thresholds: [Vec<f32>; PASSES],
}

/// The GEMV threshold of a mask: `|x| <= t` is zeroed; dense keeps everything.
fn threshold(mask: Option<InputMask>, what: &str) -> Result<f32> {
    match mask {
        None => Ok(-1.0),
        Some(InputMask::Threshold(t)) => Ok(t),
        Some(InputMask::WeightAware(_)) => Err(Error::Invalid(format!(
            "{what}: weight-aware (WINA) masks are not supported on the GPU; use TEAL \
             thresholds (--quantile abs or teal) or --device cpu"
        ))),
    }
}

/// Input-major bits of `parts` side by side: row j = part0 row j | part1 row j | ...
fn fused_bits(parts: &[&Linear], dtype: WeightDtype) -> Vec<u16> {
    let n_in = parts[0].in_dim;
    let n_out: usize = parts.iter().map(|p| p.out_dim).sum();
    let mut bits = Vec::with_capacity(n_in * n_out);
    let mut row = Vec::new();
    for j in 0..n_in {
        for p in parts {
            row.resize(p.out_dim, 0.0);
            p.input_row(j, &mut row);
            bits.extend(dtype.encode(&row));
        }
    }
    bits
}

/// The rows of an output-major layer (`[out, in]`), each encoded: the embedding table.
fn row_bits(m: &Dense, dtype: WeightDtype) -> Vec<u16> {
    let mut bits = Vec::with_capacity(m.out_dim * m.in_dim);
    let mut row = vec![0.0f32; m.in_dim];
    for o in 0..m.out_dim {
        m.row(o, &mut row);
        bits.extend(dtype.encode(&row));
    }
    bits
}

/// An output-major layer turned input-major (`bits[j * out + o] = W[o, j]`): the GEMV's layout.
fn transposed_bits(m: &Dense, dtype: WeightDtype) -> Vec<u16> {
    let (n_in, n_out) = (m.in_dim, m.out_dim);
    let mut bits = vec![0u16; n_in * n_out];
    let mut row = vec![0.0f32; n_in];
    for o in 0..n_out {
        m.row(o, &mut row);
        for (j, b) in dtype.encode(&row).into_iter().enumerate() {
            bits[j * n_out + o] = b;
        }
    }
    bits
}

impl Group {
    /// A dense layer that has no mask in either pass (the LM head): one launch.
    fn dense(g: &Gpu, m: &Dense, dtype: WeightDtype) -> Result<Group> {
        let w = g.linear_from_bits(&transposed_bits(m, dtype), m.in_dim, m.out_dim, dtype, &[])?;
        Ok(Group {
            launches: vec![Launch {
                w,
                offset: 0,
                thresholds: std::array::from_fn(|_| vec![-1.0]),
            }],
            bias: None,
        })
    }

    /// `parts[i][pass]` is part i as the model of `pass` holds it (same weights, its mask).
    fn new(g: &Gpu, parts: &[[&Linear; PASSES]], dtype: WeightDtype, what: &str) -> Result<Group> {
        let mut t = vec![[0.0f32; PASSES]; parts.len()];
        for (i, p) in parts.iter().enumerate() {
            for pass in 0..PASSES {
                t[i][pass] = threshold(p[pass].mask(), what)?;
            }
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
            let thresholds = std::array::from_fn(|pass| vec![t[0][pass]]);
            let w = g.linear_from_bits(&fused_bits(&weights, dtype), n_in, n_out, dtype, &[])?;
            vec![Launch {
                w,
                offset: 0,
                thresholds,
            }]
        } else if on_tiles {
            let thresholds = std::array::from_fn(|pass| t.iter().map(|ti| ti[pass]).collect());
            let w = g.linear_from_bits(&fused_bits(&weights, dtype), n_in, n_out, dtype, &ends)?;
            vec![Launch {
                w,
                offset: 0,
                thresholds,
            }]
        } else {
            let mut launches = Vec::with_capacity(parts.len());
            for (i, w) in weights.iter().enumerate() {
                let bits = fused_bits(&[*w], dtype);
                launches.push(Launch {
                    w: g.linear_from_bits(&bits, n_in, w.out_dim, dtype, &[])?,
                    offset: ends[i] - w.out_dim,
                    thresholds: std::array::from_fn(|pass| vec![t[i][pass]]),
                });
            }
            launches
        };
        let bias = if weights.iter().any(|w| w.bias().is_some()) {
            let mut b = Vec::with_capacity(n_out);
            for w in &weights {
                match w.bias() {
                    Some(v) => b.extend_from_slice(v),
                    None => b.resize(b.len() + w.out_dim, 0.0),
                }
            }
            Some(g.upload(&b)?)
        } else {
            None
        };
        Ok(Group { launches, bias })
    }

    /// New thresholds of the parts (both passes), where the launches built for the first ones
    /// can take them: one per part launch, one per fused segment, or one for a fused launch
    /// without segments when all parts share it.
    fn set_thresholds(&mut self, t: &[f32], what: &str) -> Result<()> {
        if self.launches.len() == t.len() {
            for (l, &ti) in self.launches.iter_mut().zip(t) {
                l.thresholds = [vec![ti], vec![ti]];
            }
            return Ok(());
        }
        let l = &mut self.launches[0];
        if l.w.segments().len() == t.len() {
            l.thresholds = [t.to_vec(), t.to_vec()];
        } else if t.iter().all(|&x| x == t[0]) {
            l.thresholds = [vec![t[0]], vec![t[0]]];
        } else {
            return Err(Error::Invalid(format!(
                "{what}: the fused projections were uploaded for one shared threshold; \
                 open a new GPU decoder for per-projection thresholds"
            )));
        }
        Ok(())
    }

    /// `y = W s_t(x)` (+ bias), or `y += W s_t(x)` with `accumulate` (y holds the residual);
    /// with `norm = (w, eps)` the input is RMSNorm(x) with weights w, computed by the GEMV.
    fn run(
        &mut self,
        g: &Gpu,
        x: &DeviceBuffer<f32>,
        norm: Option<(&DeviceBuffer<f32>, f32)>,
        y: &mut DeviceBuffer<f32>,
        pass: usize,
        base: GemvOpts,
    ) -> Result<()> {
        let beta = match &self.bias {
            Some(b) => {
                g.copy(b, y)?;
                1.0
            }
            None => 0.0,
        };
        for l in &mut self.launches {
            let opts = GemvOpts {
                beta,
                y_offset: l.offset,
                ..base
            };
            let t = &l.thresholds[pass];
            match norm {
                Some((nw, eps)) => g.gemv_rmsnorm(&mut l.w, x, nw, eps, y, 1, t, opts)?,
                None => g.gemv(&mut l.w, x, y, 1, t, opts)?,
            }
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: DeviceBuffer<f32>,
    ffn_norm: DeviceBuffer<f32>,
    qkv: Group,
    o: Group,
    gate_up: Group,
    down: Group,
    k_cache: DeviceBuffer<f32>,
    v_cache: DeviceBuffer<f32>,
    /// The inputs of the four sites ([`Site::ALL`] order) after an observed step.
    sites: Option<[DeviceBuffer<f32>; 4]>,
}

/// A Llama on one GPU with one sequence's KV cache (see the module documentation).
pub struct GpuLlama {
    gpu: Gpu,
    ordinal: usize,
    m: Resident,
    /// Prefill, decode and observed step, captured at first use.
    graphs: [Option<CudaGraph>; 3],
    len: usize,
    host_logits: Vec<f32>,
}

/// Everything a step reads and writes on the device.
struct Resident {
    config: Config,
    dtype: WeightDtype,
    ctx: usize,
    layers: Vec<Layer>,
    embed: DeviceBuffer<u16>,
    norm: DeviceBuffer<f32>,
    lm_head: Group,
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
    h: DeviceBuffer<f32>,
    qkv: DeviceBuffer<f32>,
    attn: DeviceBuffer<f32>,
    gu: DeviceBuffer<f32>,
    logits: DeviceBuffer<f32>,
    tok: DeviceBuffer<u32>,
    next: DeviceBuffer<u32>,
    /// The sampler's uniform number for the device sampler.
    uniform: DeviceBuffer<f32>,
    pos: DeviceBuffer<i32>,
    n_keys: DeviceBuffer<i32>,
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
        let gpu = Gpu::new(ordinal)?;
        let (pm, dm): (&Llama, &Llama) = (models.prefill, models.decode);
        let c = dm.config.clone();
        if pm.layers.len() != dm.layers.len() || ctx == 0 {
            return Err(Error::Invalid(
                "GPU model: the prefill and decode models differ, or the context is 0".into(),
            ));
        }
        // The decode attention keeps a block's scores in 48 KiB of shared memory.
        let max_ctx = 48 * 1024 / 4 - 1024 - c.head_dim;
        if ctx > max_ctx {
            return Err(Error::Invalid(format!(
                "context {ctx} is longer than the GPU decode attention holds ({max_ctx} \
                 positions for head dim {}); use a shorter -c/--ctx",
                c.head_dim
            )));
        }
        let (d, ff, kvd) = (c.hidden_size, c.intermediate_size, c.kv_dim());
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (l, (pb, db)) in pm.layers.iter().zip(&dm.layers).enumerate() {
            let what = format!("layer {l}");
            layers.push(Layer {
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
                    &what,
                )?,
                o: Group::new(&gpu, &[[&pb.o_proj, &db.o_proj]], dtype, &what)?,
                gate_up: Group::new(
                    &gpu,
                    &[[&pb.gate_proj, &db.gate_proj], [&pb.up_proj, &db.up_proj]],
                    dtype,
                    &what,
                )?,
                down: Group::new(&gpu, &[[&pb.down_proj, &db.down_proj]], dtype, &what)?,
                k_cache: gpu.zeros(ctx * kvd)?,
                v_cache: gpu.zeros(ctx * kvd)?,
                sites: None,
            });
        }
        let (cos, sin) = dm.rope_tables_for(0, ctx);
        let lm_head = Group::dense(&gpu, &dm.lm_head, dtype)?;
        let m = Resident {
            embed: gpu.upload(&row_bits(&dm.embed_tokens, dtype))?,
            norm: gpu.upload(&dm.norm)?,
            cos: gpu.upload(&cos)?,
            sin: gpu.upload(&sin)?,
            h: gpu.zeros(d)?,
            qkv: gpu.zeros(c.q_dim() + 2 * kvd)?,
            attn: gpu.zeros(c.q_dim())?,
            gu: gpu.zeros(2 * ff)?,
            logits: gpu.zeros(c.vocab_size)?,
            tok: gpu.zeros(1)?,
            next: gpu.zeros(1)?,
            uniform: gpu.zeros(1)?,
            pos: gpu.zeros(1)?,
            n_keys: gpu.upload(&[1i32])?,
            layers,
            lm_head,
            config: c,
            dtype,
            ctx,
        };
        Ok(GpuLlama {
            host_logits: vec![0.0; m.config.vocab_size],
            graphs: [None, None, None],
            len: 0,
            m,
            gpu,
            ordinal,
        })
    }
}

impl Resident {
    /// Enqueue one step of `pass` at the device position (see the module documentation);
    /// with `observe`, each layer's site inputs are also written to its site buffers.
    fn enqueue(&mut self, g: &Gpu, pass: usize, observe: bool) -> Result<()> {
        let c = &self.config;
        let (d, eps) = (c.hidden_size, c.rms_norm_eps);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let plain = GemvOpts::default();
        let acc = GemvOpts {
            accumulate: true,
            ..plain
        };
        g.embed(&self.embed, self.dtype, &self.tok, &mut self.h, d)?;
        for l in &mut self.layers {
            let mut sites = match (observe, l.sites.as_mut()) {
                (false, _) => None,
                (true, Some(s)) => Some(s),
                (true, None) => {
                    return Err(Error::Invalid("observed step without site buffers".into()))
                }
            };
            if let Some(s) = sites.as_mut() {
                g.rmsnorm(&self.h, &l.attn_norm, &mut s[0], 1, d, eps)?;
            }
            l.qkv.run(
                g,
                &self.h,
                Some((&l.attn_norm, eps)),
                &mut self.qkv,
                pass,
                plain,
            )?;
            g.rope_kv_append(
                &mut self.qkv,
                &self.cos,
                &self.sin,
                &self.pos,
                &mut l.k_cache,
                &mut l.v_cache,
                nh,
                nkv,
                hd,
            )?;
            g.attention_decode(
                &self.qkv,
                &l.k_cache,
                &l.v_cache,
                &mut self.attn,
                &self.n_keys,
                1,
                nh,
                nkv,
                hd,
                self.ctx,
            )?;
            if let Some(s) = sites.as_mut() {
                g.copy(&self.attn, &mut s[1])?;
            }
            l.o.run(g, &self.attn, None, &mut self.h, pass, acc)?;
            if let Some(s) = sites.as_mut() {
                g.rmsnorm(&self.h, &l.ffn_norm, &mut s[2], 1, d, eps)?;
            }
            l.gate_up.run(
                g,
                &self.h,
                Some((&l.ffn_norm, eps)),
                &mut self.gu,
                pass,
                plain,
            )?;
            if let Some(s) = sites.as_mut() {
                g.silu_mul(&self.gu, &mut s[3], c.intermediate_size, 1)?;
            }
            let glu = GemvOpts {
                silu_mul_input: true,
                ..acc
            };
            l.down.run(g, &self.gu, None, &mut self.h, pass, glu)?;
        }
        let norm = Some((&self.norm, eps));
        self.lm_head
            .run(g, &self.h, norm, &mut self.logits, pass, plain)?;
        g.advance_position(&mut self.pos, &mut self.n_keys)?;
        Ok(())
    }
}

impl GpuLlama {
    /// Run `token` at the current position as graph `graph` (PREFILL, DECODE or OBSERVE);
    /// the logits stay on the device.
    fn step(&mut self, token: u32, graph: usize) -> Result<()> {
        if token as usize >= self.m.config.vocab_size {
            return Err(Error::Invalid(format!(
                "token id {token} is outside the vocabulary of {}",
                self.m.config.vocab_size
            )));
        }
        if self.len >= self.m.ctx {
            return Err(Error::ContextOverflow {
                what: "the sequence",
                got: self.len + 1,
                ctx: self.m.ctx,
            });
        }
        if self.graphs[graph].is_none() {
            let (g, m) = (&self.gpu, &mut self.m);
            let (pass, observe) = match graph {
                OBSERVE => (PREFILL, true),
                p => (p, false),
            };
            self.graphs[graph] =
                Some(g.capture(|| m.enqueue(g, pass, observe).map_err(capture_error))?);
        }
        self.gpu.write(&[token], &mut self.m.tok)?;
        if let Some(graph) = &self.graphs[graph] {
            graph
                .launch()
                .map_err(teal_kernels::cuda::CudaError::from)?;
        }
        self.len += 1;
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
        self.len
    }
    fn clear(&mut self) -> Result<()> {
        self.gpu.write(&[0i32], &mut self.m.pos)?;
        self.gpu.write(&[1i32], &mut self.m.n_keys)?;
        self.len = 0;
        Ok(())
    }
    fn prefill(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if self.len + tokens.len() > self.m.ctx {
            return Err(Error::ContextOverflow {
                what: "the input",
                got: self.len + tokens.len(),
                ctx: self.m.ctx,
            });
        }
        let v = self.m.config.vocab_size;
        let mut out = Vec::with_capacity(match logits {
            Logits::Last => v,
            Logits::All => tokens.len() * v,
        });
        for (i, &t) in tokens.iter().enumerate() {
            self.step(t, PREFILL)?;
            if logits == Logits::All || i + 1 == tokens.len() {
                out.extend(self.gpu.download(&self.m.logits)?);
            }
        }
        Ok(out)
    }
    fn decode(&mut self, token: u32) -> Result<&[f32]> {
        self.step(token, DECODE)?;
        self.host_logits = self.gpu.download(&self.m.logits)?;
        Ok(&self.host_logits)
    }
    fn decode_greedy(&mut self, token: u32) -> Result<u32> {
        self.step(token, DECODE)?;
        let v = self.m.config.vocab_size;
        self.gpu.argmax(&self.m.logits, &mut self.m.next, 1, v)?;
        Ok(self.gpu.download(&self.m.next)?[0])
    }
    /// Greedy: [`Decoder::decode_greedy`]. Otherwise, for top-k up to
    /// [`teal_kernels::cuda::SAMPLE_MAX_K`], the CPU sampler's arithmetic on the device with the
    /// sampler's next uniform number (same seed, same numbers); a larger or no top-k cut
    /// samples on the host from the copied logits.
    fn decode_sample(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32> {
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
        let (inv_t, top_p) = (1.0 / cfg.temperature, cfg.top_p);
        self.step(token, DECODE)?;
        let r = sampler.draw();
        self.gpu.write(&[r], &mut self.m.uniform)?;
        self.gpu.sample_top_k(
            &self.m.logits,
            v,
            k,
            inv_t,
            top_p,
            &self.m.uniform,
            &mut self.m.next,
        )?;
        Ok(self.gpu.download(&self.m.next)?[0])
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
            self.step(t, OBSERVE)?;
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
    fn set_masks(&mut self, masks: Option<&Masks>) -> Result<()> {
        let n = self.m.layers.len();
        if masks.is_some_and(|m| m.len() != n) {
            return Err(Error::Invalid(format!(
                "masks for {} layers, the model has {n}",
                masks.map_or(0, |m| m.len())
            )));
        }
        for (i, l) in self.m.layers.iter_mut().enumerate() {
            let what = format!("layer {i}");
            let mut t = [0.0f32; 7];
            for (p, tp) in t.iter_mut().enumerate() {
                *tp = threshold(masks.and_then(|m| m[i][p]), &what)?;
            }
            l.qkv.set_thresholds(&t[0..3], &what)?;
            l.o.set_thresholds(&t[3..4], &what)?;
            l.gate_up.set_thresholds(&t[4..6], &what)?;
            l.down.set_thresholds(&t[6..7], &what)?;
        }
        self.graphs = [None, None, None];
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
    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, {})",
            self.ordinal,
            self.gpu.name(),
            self.m.dtype.name()
        )
    }
}
