//! Where a model runs: the one place that chooses between the CPU and a CUDA GPU. Generation
//! and perplexity drive a [`Decoder`] (one sequence, its own cache) and never name a device.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::Models;
use crate::kv_cache::{KvCache, KvDtype};
use crate::linear::InputMask;
use crate::models::llama::{DecodeScratch, Llama, Logits, Observer};
use crate::models::llama_gpu::{GpuLlama, GpuSlot};
use crate::sampler::Sampler;
use teal_kernels::cuda::WeightDtype;
use teal_kernels::packed::Dtype;

/// TEAL masks of one model: per layer, q, k, v, o, gate, up, down (`None`: dense).
pub type Masks = [[Option<InputMask>; 7]];

/// Bytes of memory a decode step reads, as the device stores the model: each projection of
/// each layer read whole (q, k, v, o, gate, up, down), the LM head, one embedding row, and the
/// keys and values of one cached position over all layers.
#[derive(Clone, Debug)]
pub struct Footprint {
    pub proj: Vec<[f64; 7]>,
    pub lm_head: f64,
    pub embed_row: f64,
    pub kv_per_position: f64,
}

/// A measured memory bandwidth in bytes/s and how it was measured.
#[derive(Clone, Debug)]
pub struct Bandwidth {
    pub bytes_per_s: f64,
    pub method: &'static str,
}

/// One sequence being run by a model: its KV cache, its position, the logits of each step.
pub trait Decoder {
    fn config(&self) -> &Config;
    /// Positions the cache holds at most.
    fn capacity(&self) -> usize;
    /// Positions run so far.
    fn position(&self) -> usize;
    /// Start a new sequence at position 0.
    fn clear(&mut self) -> Result<()>;
    /// Forgets every position from `len` on (nothing if `len >= position()`): the next prefill
    /// or decode step continues the sequence at `len`, reusing the cached positions before it.
    fn truncate(&mut self, len: usize) -> Result<()>;
    /// Runs `tokens` at positions `position()..` with the prefill model and returns the logits
    /// of the last position or of every one (`[n, vocab]`).
    fn prefill(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>>;
    /// Runs one token at `position()` with the decode model and returns its logits.
    fn decode(&mut self, token: u32) -> Result<&[f32]>;
    /// Runs `tokens` at positions `position()..` with the prefill model, keeping their keys
    /// and values in the cache (a next piece attends to them), and adds their final hidden
    /// states (after the last RMSNorm) to `pooled`: an input run in pieces this way pools what
    /// it pools run whole, up to the order of float sums inside the forward pass (none where
    /// the pieces take the kernels the whole input takes).
    fn embed_piece(&mut self, tokens: &[u32], pooled: &mut Pooled) -> Result<()>;
    /// The embedding of `tokens` as a sequence of its own, run whole ([`Decoder::embed_piece`]
    /// from an empty cache): the mean of the final hidden states over its positions, scaled to
    /// unit length (llama.cpp's mean pooling with its default normalization). The cache is
    /// left empty.
    fn embed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.clear()?;
        let mut pooled = Pooled::new(self.config().hidden_size);
        let ran = self.embed_piece(tokens, &mut pooled);
        self.clear()?;
        ran?;
        Ok(pooled.unit())
    }
    /// [`Decoder::decode`] followed by greedy sampling (first index on ties); a device
    /// decoder picks the token without copying the logits back.
    fn decode_greedy(&mut self, token: u32) -> Result<u32> {
        Ok(crate::sampler::argmax(self.decode(token)?))
    }
    /// [`Decoder::decode`] followed by `sampler` (greedy, or temperature / top-k / top-p with
    /// the sampler's random numbers); a device decoder samples on the device where it can.
    fn decode_sample(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32> {
        Ok(sampler.sample(self.decode(token)?))
    }
    /// The model, cache and buffers of a CPU decoder, for [`decode_each`] to run its decode
    /// step in lockstep with others' (`None`: a device decoder, which decodes on its own).
    fn lockstep(&mut self) -> Option<Lockstep<'_>> {
        None
    }
    /// Runs `tokens` like [`Decoder::prefill`] (no logits) and reports the input of every
    /// projection site of every layer to `observer`, in position order (a device decoder
    /// reports one position per call).
    fn prefill_observed(&mut self, tokens: &[u32], observer: &mut dyn Observer) -> Result<()>;
    /// Replaces the TEAL masks of both the prefill and the decode model (`None`: dense).
    fn set_masks(&mut self, masks: Option<&Masks>) -> Result<()>;
    /// What one decode step reads, as stored on this device.
    fn footprint(&self) -> Footprint;
    /// Memory bandwidth of the device, the floor of a memory-bound decode: on the CPU a
    /// streaming read of `cpu_buffer` bytes, on a GPU a device-to-device copy.
    fn bandwidth(&self, cpu_buffer: usize) -> Result<Bandwidth>;
    /// Where it runs, for logs: `cpu (KV cache f16)`, `cuda:0 (NVIDIA H200, bf16)`.
    fn describe(&self) -> String;
}

/// An embedding's pooling ([`Decoder::embed_piece`]): the sum of the final hidden states of the
/// positions run so far, added in f64 position by position, so that an input run in pieces
/// sums its states in the order of the input run whole.
#[derive(Clone, Debug)]
pub struct Pooled {
    sum: Vec<f64>,
}

impl Pooled {
    /// Nothing pooled yet, for states `d` wide.
    pub fn new(d: usize) -> Pooled {
        Pooled { sum: vec![0.0; d] }
    }

    /// Adds the rows (`d` wide) of `states`, in order.
    pub fn add(&mut self, states: &[f32]) {
        for row in states.chunks(self.sum.len()) {
            for (a, &v) in self.sum.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
    }

    /// The mean of the states added, scaled to unit length (computed from their sum, which
    /// points the same way).
    pub fn unit(&self) -> Vec<f32> {
        let norm = self
            .sum
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        self.sum.iter().map(|v| (v / norm) as f32).collect()
    }
}

/// A device a model can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA GPU by ordinal, with the element type its weights are stored in.
    Cuda {
        ordinal: usize,
        dtype: WeightDtype,
    },
}

impl Device {
    /// Parses `cpu` or `cuda:N` (`cuda` = `cuda:0`); `gpu_dtype` (`f16` or `bf16`) is the
    /// weight type on a GPU.
    pub fn parse(device: &str, gpu_dtype: &str) -> Result<Device> {
        let dtype = WeightDtype::parse(gpu_dtype)?;
        match device {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda { ordinal: 0, dtype }),
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Device::Cuda { ordinal, dtype }),
                _ => Err(Error::Invalid(format!(
                    "device '{d}': expected cpu or cuda:N (e.g. cuda:0)"
                ))),
            },
        }
    }

    /// [`Device::parse`], checking that an explicit GPU is there ([`CudaError`] naming what
    /// is missing), or picks one for `auto`: `cuda:0` when a driver, a GPU and NVRTC are
    /// present, else the CPU with a one-line note naming what is missing.
    ///
    /// [`CudaError`]: teal_kernels::cuda::CudaError
    pub fn select(device: &str, gpu_dtype: &str) -> Result<(Device, Option<String>)> {
        if device != "auto" {
            let d = Device::parse(device, gpu_dtype)?;
            if let Device::Cuda { ordinal, .. } = d {
                teal_kernels::cuda::probe(ordinal)?;
            }
            return Ok((d, None));
        }
        let dtype = WeightDtype::parse(gpu_dtype)?;
        Ok(match teal_kernels::cuda::probe(0) {
            Ok(()) => (Device::Cuda { ordinal: 0, dtype }, None),
            Err(e) => (
                Device::Cpu,
                Some(format!("note: --device auto runs on the CPU: {e}")),
            ),
        })
    }

    /// The format a model built for this device is best stored in on the host: `cpu` for the
    /// CPU, the GPU's weight type for a GPU (its copy then holds exactly the host's values).
    pub fn host_dtype(self, cpu: Dtype) -> Dtype {
        match self {
            Device::Cpu => cpu,
            Device::Cuda {
                dtype: WeightDtype::F16,
                ..
            } => Dtype::F16,
            Device::Cuda {
                dtype: WeightDtype::Bf16,
                ..
            } => Dtype::Bf16,
        }
    }

    /// The name of the device, as `--device` takes it.
    pub fn name(self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda { ordinal, .. } => format!("cuda:{ordinal}"),
        }
    }

    /// A decoder for `models` with room for `ctx` positions and an f32 KV cache. On a GPU
    /// the weights are copied to the device once, in the device's weight type; the masks of
    /// the prefill and decode models become the thresholds of the two passes.
    pub fn decoder<'a>(self, models: Models<'a>, ctx: usize) -> Result<Box<dyn Decoder + 'a>> {
        self.decoder_kv(models, ctx, KvDtype::F32)
    }

    /// [`Device::decoder`] with a KV cache of `kv` (a GPU keeps f32 only).
    pub fn decoder_kv<'a>(
        self,
        models: Models<'a>,
        ctx: usize,
        kv: KvDtype,
    ) -> Result<Box<dyn Decoder + 'a>> {
        match (self, kv) {
            (Device::Cpu, kv) => Ok(Box::new(CpuDecoder::with_kv(models, ctx, kv))),
            (Device::Cuda { ordinal, dtype }, KvDtype::F32) => {
                Ok(Box::new(GpuLlama::new(models, ordinal, dtype, ctx)?))
            }
            (Device::Cuda { .. }, kv) => Err(Error::Invalid(format!(
                "KV cache type {} is not supported on the GPU, whose cache is f32 \
                 (use --kv-dtype f32, or leave it out)",
                kv.name()
            ))),
        }
    }

    /// `n` decoders of `models` with a KV cache each (a server's slots); on a GPU they share one
    /// copy of the weights ([`GpuSlot`]), on the CPU they share the models.
    pub fn decoders<'a>(
        self,
        models: Models<'a>,
        n: usize,
        ctx: usize,
        kv: KvDtype,
    ) -> Result<Vec<Box<dyn Decoder + 'a>>> {
        match (self, kv) {
            (Device::Cuda { ordinal, dtype }, KvDtype::F32) if n > 1 => {
                let model = GpuLlama::with_slots(models, ordinal, dtype, ctx, n)?;
                Ok(GpuSlot::split(model)
                    .into_iter()
                    .map(|s| Box::new(s) as Box<dyn Decoder + 'a>)
                    .collect())
            }
            _ => (0..n).map(|_| self.decoder_kv(models, ctx, kv)).collect(),
        }
    }

    /// The KV cache type a command gets without asking: f16 on the CPU (half the bytes of a
    /// long context, as llama.cpp), f32 on a GPU (the only one it has).
    pub fn default_kv(self) -> KvDtype {
        match self {
            Device::Cpu => KvDtype::F16,
            Device::Cuda { .. } => KvDtype::F32,
        }
    }
}

/// What [`Decoder::describe`] says of the CPU with a KV cache of `kv`, e.g. `cpu (KV cache f16)`.
pub fn describe_cpu(kv: KvDtype) -> String {
    format!("cpu (KV cache {})", kv.name())
}

/// A CPU decoder's parts that a decode step uses ([`Decoder::lockstep`]).
pub struct Lockstep<'s> {
    pub model: &'s Llama,
    pub cache: &'s mut KvCache,
    pub scratch: &'s mut DecodeScratch,
}

/// One decode step on each decoder, `tokens[i]` on `decs[i]`, calling `f(i, logits)` for each
/// step that succeeded; returns each step's result. The CPU decoders' steps run a layer at a
/// time across them ([`Llama::decode_lockstep`]: on a model whose layers fit the last-level
/// cache, every step after the first reads each layer's weights from there), each computing
/// what it computes alone; other decoders decode one after another.
pub fn decode_each<'d>(
    decs: &mut [&mut (dyn Decoder + 'd)],
    tokens: &[u32],
    mut f: impl FnMut(usize, &[f32]),
) -> Vec<Result<()>> {
    assert_eq!(decs.len(), tokens.len(), "decode_each: a token per decoder");
    let mut results: Vec<Result<()>> = (0..decs.len()).map(|_| Ok(())).collect();
    for (i, d) in decs.iter_mut().enumerate() {
        if d.lockstep().is_none() {
            results[i] = d.decode(tokens[i]).map(|logits| f(i, logits));
        }
    }
    let (mut steps, mut which) = (Vec::new(), Vec::new());
    for (i, d) in decs.iter_mut().enumerate() {
        if let Some(p) = d.lockstep() {
            steps.push((p.model, tokens[i], p.cache, p.scratch));
            which.push(i);
        }
    }
    let done = Llama::decode_lockstep(&mut steps);
    for ((&i, r), (m, _, cache, s)) in which.iter().zip(done).zip(&steps) {
        results[i] = r
            .and_then(|()| {
                check_logits(
                    s.logits(),
                    m.config.vocab_size,
                    cache.len() - 1,
                    cache.dtype() == KvDtype::F16,
                )
            })
            .map(|()| f(i, s.logits()));
    }
    results
}

/// The CPU model ([`crate::models::llama::Llama`]) with its cache and decode buffers.
pub struct CpuDecoder<'a> {
    models: Models<'a>,
    /// The model with masks from [`Decoder::set_masks`], for both passes.
    masked: Option<Llama>,
    cache: KvCache,
    scratch: DecodeScratch,
}

impl<'a> CpuDecoder<'a> {
    /// A decoder with an f32 KV cache for `ctx` positions.
    pub fn new(models: Models<'a>, ctx: usize) -> CpuDecoder<'a> {
        CpuDecoder::with_kv(models, ctx, KvDtype::F32)
    }

    /// A decoder with a KV cache of `kv` for `ctx` positions.
    pub fn with_kv(models: Models<'a>, ctx: usize, kv: KvDtype) -> CpuDecoder<'a> {
        CpuDecoder {
            cache: models.decode.new_cache_as(ctx, kv),
            scratch: DecodeScratch::new(&models.decode.config, ctx),
            masked: None,
            models,
        }
    }

    fn decode_model(&self) -> &Llama {
        self.masked.as_ref().unwrap_or(self.models.decode)
    }
}

/// An error naming the first non-finite value of `logits` (`[n, vocab]`, its first row the
/// position `first`), where a NaN would otherwise come out as a perplexity of NaN or as
/// tokens sampled from garbage; `kv_f16`: the KV cache holds f16 (the error says so).
pub(crate) fn check_logits(logits: &[f32], vocab: usize, first: usize, kv_f16: bool) -> Result<()> {
    match logits.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFiniteLogits {
            position: first + i / vocab,
            token: i % vocab,
            value: logits[i],
            kv_f16,
        }),
    }
}

impl Decoder for CpuDecoder<'_> {
    fn config(&self) -> &Config {
        &self.models.decode.config
    }
    fn capacity(&self) -> usize {
        self.cache.capacity()
    }
    fn position(&self) -> usize {
        self.cache.len()
    }
    fn clear(&mut self) -> Result<()> {
        self.cache.clear();
        Ok(())
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len);
        Ok(())
    }
    /// Prefill's temporaries (activations of every position, dequantized weight blocks, sgemm
    /// packing buffers) come from the heap, reused from call to call, and are handed back to
    /// the system before decoding starts (`load::reusing_heap`): left there, they
    /// stayed resident while decoding (1.7-2.9 MB after an 8-token prompt on SmolLM2-135M).
    /// The program's code pages go too (`load::release_executable_pages`): decoding maps back
    /// the code it runs, and tokenizing's, prefill's and loading's stay out (2.5-3 MB).
    fn prefill(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let m = self.masked.as_ref().unwrap_or(self.models.prefill);
        let first = logits.first_position(self.cache.len(), tokens.len());
        let cache = &mut self.cache;
        let out = crate::load::reusing_heap(|| m.prefill(tokens, cache, logits))?;
        check_logits(
            &out,
            m.config.vocab_size,
            first,
            self.cache.dtype() == KvDtype::F16,
        )?;
        Ok(out)
    }
    fn embed_piece(&mut self, tokens: &[u32], pooled: &mut Pooled) -> Result<()> {
        let m = self.masked.as_ref().unwrap_or(self.models.prefill);
        let cache = &mut self.cache;
        pooled.add(&crate::load::reusing_heap(|| {
            m.hidden_states(tokens, cache)
        })?);
        Ok(())
    }
    fn decode(&mut self, token: u32) -> Result<&[f32]> {
        let m = self.masked.as_ref().unwrap_or(self.models.decode);
        let (position, f16) = (self.cache.len(), self.cache.dtype() == KvDtype::F16);
        let logits = m.decode(token, &mut self.cache, &mut self.scratch)?;
        check_logits(logits, m.config.vocab_size, position, f16)?;
        Ok(logits)
    }
    fn lockstep(&mut self) -> Option<Lockstep<'_>> {
        Some(Lockstep {
            model: self.masked.as_ref().unwrap_or(self.models.decode),
            cache: &mut self.cache,
            scratch: &mut self.scratch,
        })
    }
    fn prefill_observed(&mut self, tokens: &[u32], observer: &mut dyn Observer) -> Result<()> {
        let m = self.masked.as_ref().unwrap_or(self.models.prefill);
        let cache = &mut self.cache;
        crate::load::reusing_heap(|| {
            m.prefill_observed(tokens, cache, Logits::Last, Some(observer))
        })?;
        Ok(())
    }
    fn set_masks(&mut self, masks: Option<&Masks>) -> Result<()> {
        let base = self.models.decode;
        let dense;
        let masks = match masks {
            Some(m) => m,
            None => {
                dense = vec![Default::default(); base.layers.len()];
                &dense
            }
        };
        self.masked = Some(base.with_masks(masks)?);
        Ok(())
    }
    fn footprint(&self) -> Footprint {
        let m = self.decode_model();
        let c = &m.config;
        Footprint {
            proj: m
                .layers
                .iter()
                .map(|b| {
                    let l = b.linears();
                    std::array::from_fn(|p| l[p].1.weight_bytes() as f64)
                })
                .collect(),
            lm_head: m.lm_head.weight_bytes() as f64,
            embed_row: m.embed_tokens.row_bytes() as f64,
            kv_per_position: (2 * c.num_hidden_layers * c.kv_dim() * self.cache.dtype().bytes())
                as f64,
        }
    }
    fn bandwidth(&self, cpu_buffer: usize) -> Result<Bandwidth> {
        Ok(Bandwidth {
            bytes_per_s: crate::bench::read_bandwidth(cpu_buffer, 5),
            method: "streaming read, all threads",
        })
    }
    fn describe(&self) -> String {
        describe_cpu(self.cache.dtype())
    }
}
