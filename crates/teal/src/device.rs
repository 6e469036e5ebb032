//! Where a model runs: the one place that chooses between the CPU and a CUDA GPU. Generation
//! and perplexity drive a [`Decoder`] (one sequence, its own cache) and never name a device.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::Models;
use crate::kv_cache::KvCache;
use crate::models::llama::{DecodeScratch, Logits};
use crate::models::llama_gpu::GpuLlama;
use teal_kernels::cuda::WeightDtype;

/// One sequence being run by a model: its KV cache, its position, the logits of each step.
pub trait Decoder {
    fn config(&self) -> &Config;
    /// Positions the cache holds at most.
    fn capacity(&self) -> usize;
    /// Positions run so far.
    fn position(&self) -> usize;
    /// Start a new sequence at position 0.
    fn clear(&mut self) -> Result<()>;
    /// Runs `tokens` at positions `position()..` with the prefill model and returns the logits
    /// of the last position or of every one (`[n, vocab]`).
    fn prefill(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>>;
    /// Runs one token at `position()` with the decode model and returns its logits.
    fn decode(&mut self, token: u32) -> Result<&[f32]>;
    /// [`Decoder::decode`] followed by greedy sampling (first index on ties); a device
    /// decoder picks the token without copying the logits back.
    fn decode_greedy(&mut self, token: u32) -> Result<u32> {
        Ok(crate::sampler::argmax(self.decode(token)?))
    }
    /// Where it runs, for logs: `cpu`, `cuda:0 (NVIDIA H200, bf16)`.
    fn describe(&self) -> String;
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

    /// A decoder for `models` with room for `ctx` positions. On a GPU the weights are copied
    /// to the device once, in the device's weight type; the masks of the prefill and decode
    /// models become the thresholds of the two passes.
    pub fn decoder<'a>(self, models: Models<'a>, ctx: usize) -> Result<Box<dyn Decoder + 'a>> {
        match self {
            Device::Cpu => Ok(Box::new(CpuDecoder::new(models, ctx))),
            Device::Cuda { ordinal, dtype } => {
                Ok(Box::new(GpuLlama::new(models, ordinal, dtype, ctx)?))
            }
        }
    }
}

/// The CPU model ([`crate::models::llama::Llama`]) with its cache and decode buffers.
pub struct CpuDecoder<'a> {
    models: Models<'a>,
    cache: KvCache,
    scratch: DecodeScratch,
}

impl<'a> CpuDecoder<'a> {
    pub fn new(models: Models<'a>, ctx: usize) -> CpuDecoder<'a> {
        CpuDecoder {
            cache: models.decode.new_cache(ctx),
            scratch: DecodeScratch::new(&models.decode.config, ctx),
            models,
        }
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
    fn prefill(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        self.models.prefill.prefill(tokens, &mut self.cache, logits)
    }
    fn decode(&mut self, token: u32) -> Result<&[f32]> {
        self.models
            .decode
            .decode(token, &mut self.cache, &mut self.scratch)
    }
    fn describe(&self) -> String {
        "cpu".into()
    }
}
