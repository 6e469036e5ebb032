//! Text generation: prefill the prompt, then decode one token at a time with the KV cache,
//! streaming each piece of text as it is complete.

use crate::device::{CpuDecoder, Decoder};
use crate::error::{Error, Result};
use crate::models::llama::{Llama, Logits};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Context length (KV cache capacity).
    pub ctx: usize,
    pub stop_at_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
    Caller,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub decode_tokens: usize,
    pub decode_secs: f64,
}

impl Generation {
    pub fn prompt_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }
    /// Decode speed: tokens after the first (the first comes from the prefill's logits).
    pub fn decode_tok_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_secs.max(1e-9)
    }
}

/// The model that runs the prompt and the one that decodes: the same for dense or `all`-mode
/// sparse generation; dense and sparse for TEAL's `decode-only` mode. They share weights.
#[derive(Clone, Copy)]
pub struct Models<'a> {
    pub prefill: &'a Llama,
    pub decode: &'a Llama,
}

impl<'a> Models<'a> {
    pub fn single(m: &'a Llama) -> Models<'a> {
        Models {
            prefill: m,
            decode: m,
        }
    }
}

/// Generates up to `params.max_tokens` tokens after `prompt` on the CPU. `on_text` receives
/// each new piece of text as soon as it is complete UTF-8 and returns `false` to stop.
pub fn generate(
    models: Models<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    let mut dec = CpuDecoder::new(models, params.ctx);
    generate_on(&mut dec, tokenizer, prompt, params, on_text)
}

/// [`generate`] with any [`Decoder`] (its capacity is the context; `params.ctx` is not
/// used). The decoder starts a new sequence.
pub fn generate_on(
    dec: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let ctx = dec.capacity();
    if prompt.len() >= ctx {
        return Err(Error::ContextOverflow {
            what: "the prompt",
            got: prompt.len(),
            ctx,
        });
    }
    dec.clear()?;
    let mut sampler = Sampler::new(params.sampler.clone());
    let mut stream = StreamDecoder::with_context(tokenizer, prompt);

    let t0 = Instant::now();
    let logits = dec.prefill(prompt, Logits::Last)?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let mut tokens = Vec::with_capacity(params.max_tokens.min(ctx));
    let mut next = sampler.sample(&logits);
    let t1 = Instant::now();
    let stop = loop {
        if params.stop_at_eos && tokenizer.eos_ids().contains(&next) {
            break StopReason::Eos;
        }
        tokens.push(next);
        let piece = stream.push(next)?;
        if !on_text(&piece) {
            break StopReason::Caller;
        }
        if tokens.len() >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        if dec.position() >= ctx {
            break StopReason::ContextFull;
        }
        next = dec.decode_sample(next, &mut sampler)?;
    };
    Ok(Generation {
        decode_tokens: tokens.len().saturating_sub(1),
        decode_secs: t1.elapsed().as_secs_f64(),
        tokens,
        stop,
        prompt_tokens: prompt.len(),
        prompt_secs,
    })
}
