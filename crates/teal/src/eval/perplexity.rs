//! Perplexity, protocol P512 (DESIGN §4): the whole text tokenized as stored (no BOS), the first
//! K non-overlapping windows of `ctx` tokens, each run from an empty cache, tokens 1..ctx-1 of
//! each scored; PPL = exp(mean NLL). [`Scoring::LlamaCpp`] scores as `llama-perplexity` does
//! instead, on the same windows.

use crate::device::{CpuDecoder, Decoder};
use crate::error::{Error, Result};
use crate::generate::Models;
use crate::kv_cache::KvDtype;
use crate::models::llama::{Llama, Logits};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct PplOptions {
    pub ctx: usize,
    /// First K windows, at most every full window (llama-perplexity caps `--chunks` so);
    /// `None`: every full window.
    pub chunks: Option<usize>,
    /// Element type of the CPU's KV cache.
    pub kv: KvDtype,
    /// Which tokens of a window are scored.
    pub scoring: Scoring,
}

/// Which tokens of each window are scored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scoring {
    /// P512: every token after the window's first.
    #[default]
    P512,
    /// `llama-perplexity`'s: the window's first token replaced by `bos` (where the model adds
    /// one; the text is then tokenized with BOS in front, see [`Scoring::encode`]), and only the
    /// tokens after its first half scored (positions `ctx/2 + 1 ..`), each predicted with at
    /// least half a window of context. Like `llama-perplexity`, it needs a text of at least two
    /// windows.
    LlamaCpp { bos: Option<u32> },
}

impl Scoring {
    pub fn name(self) -> &'static str {
        match self {
            Scoring::P512 => "p512",
            Scoring::LlamaCpp { .. } => "llama.cpp",
        }
    }

    /// `llama-perplexity`'s scoring for a model with tokenizer `tok`: BOS where the model adds one
    /// (`tokenizer.ggml.add_bos_token`, else its tokenizer type's default).
    pub fn llama_cpp(tok: &Tokenizer) -> Scoring {
        Scoring::LlamaCpp {
            bos: tok.bos_id().filter(|_| tok.add_bos_default()),
        }
    }

    /// The tokens of `text` (a file's contents) that the windows are cut from. P512: the text as
    /// stored, no BOS, control tokens' text tokenized as plain text (as the reference script
    /// `tools/reference/llamacpp/reference.mjs` tokenizes it). llama.cpp: the text as `llama-perplexity -f FILE` reads and tokenizes it:
    /// one trailing `\n` dropped (llama.cpp's `--file` drops it), `bos` in front where there is
    /// one, and control tokens' text (`<|im_start|>`) tokenized as plain text, not parsed to
    /// their ids (`common_tokenize` with `parse_special = false`).
    pub fn encode(self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        match self {
            Scoring::P512 => Ok(tok.encode_with(text, false, false)?),
            Scoring::LlamaCpp { bos } => {
                let text = text.strip_suffix('\n').unwrap_or(text);
                let ids = tok.encode_with(text, false, false)?;
                Ok(bos.into_iter().chain(ids).collect())
            }
        }
    }

    /// The tokens a window of the text runs: `w`, or with BOS in place of its first.
    pub fn window(self, w: &[u32]) -> std::borrow::Cow<'_, [u32]> {
        match self {
            Scoring::LlamaCpp { bos: Some(b) } if !w.is_empty() => {
                let mut v = w.to_vec();
                v[0] = b;
                v.into()
            }
            _ => w.into(),
        }
    }

    /// The position whose prediction (of the next token) is the first scored in a window of
    /// `len` tokens.
    pub fn first(self, len: usize) -> usize {
        match self {
            Scoring::P512 => 0,
            Scoring::LlamaCpp { .. } => len / 2,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PplResult {
    pub ppl: f64,
    pub nll: f64,
    /// Standard error of the mean NLL over the scored tokens, `sqrt((mean(NLL^2) - nll^2) /
    /// (n - 1))` (NaN below two tokens); `ppl * nll_std_err` is llama-perplexity's "+/-".
    pub nll_std_err: f64,
    pub tokens_scored: usize,
    pub chunks: usize,
    pub ctx: usize,
    /// Mean NLL of each window.
    pub chunk_nll: Vec<f64>,
}

/// `-log softmax(logits)[target]`, accumulated in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&v| (v as f64 - m).exp())
        .sum::<f64>()
        .ln()
        + m;
    lse - logits[target as usize] as f64
}

/// The windows scored: `(start, end)` token ranges, the first `opts.chunks` full windows or
/// every one where the text has fewer (as llama-perplexity's `n_chunk = min(n_chunks,
/// n_chunk_max)`).
pub fn windows(n_tokens: usize, opts: &PplOptions) -> Result<Vec<(usize, usize)>> {
    if opts.ctx < opts.scoring.first(opts.ctx) + 2 {
        return Err(Error::Invalid(format!(
            "context {} is too short to score any token",
            opts.ctx
        )));
    }
    if matches!(opts.scoring, Scoring::LlamaCpp { .. }) && n_tokens < 2 * opts.ctx {
        // llama-perplexity refuses such a text ("you need at least 2 n_ctx tokens").
        return Err(Error::Invalid(format!(
            "the text has {n_tokens} tokens; llama.cpp's scoring, as llama-perplexity, needs at \
             least two windows ({} tokens)",
            2 * opts.ctx
        )));
    }
    let full = n_tokens / opts.ctx;
    if full == 0 {
        return Err(Error::Invalid(format!(
            "the text has {n_tokens} tokens, fewer than one window of {} tokens",
            opts.ctx
        )));
    }
    let k = match opts.chunks {
        Some(0) => return Err(Error::Invalid("--chunks must be at least 1".into())),
        Some(k) => k.min(full),
        None => full,
    };
    Ok((0..k).map(|i| (i * opts.ctx, (i + 1) * opts.ctx)).collect())
}

/// Runs P512 on `tokens` on the CPU; `progress(done, total)` is called after each window.
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    opts: &PplOptions,
    progress: impl FnMut(usize, usize),
) -> Result<PplResult> {
    let mut dec = CpuDecoder::with_kv(Models::single(model), opts.ctx, opts.kv);
    perplexity_on(&mut dec, tokens, opts, progress)
}

/// [`perplexity`] with any [`Decoder`] whose capacity is at least `opts.ctx`.
pub fn perplexity_on(
    dec: &mut dyn Decoder,
    tokens: &[u32],
    opts: &PplOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<PplResult> {
    let wins = windows(tokens.len(), opts)?;
    let vocab = dec.config().vocab_size;
    let mut chunk_nll = Vec::with_capacity(wins.len());
    let mut total = 0.0;
    let mut total2 = 0.0;
    let mut scored = 0;
    for (i, &(s, e)) in wins.iter().enumerate() {
        dec.clear()?;
        let w = opts.scoring.window(&tokens[s..e]);
        let logits = dec.prefill(&w, Logits::All)?;
        let first = opts.scoring.first(w.len());
        let mut sum = 0.0;
        for t in first + 1..w.len() {
            let v = nll(&logits[(t - 1) * vocab..t * vocab], w[t]);
            sum += v;
            total2 += v * v;
        }
        let n = w.len() - 1 - first;
        chunk_nll.push(sum / n as f64);
        total += sum;
        scored += n;
        progress(i + 1, wins.len());
    }
    let mean = total / scored as f64;
    let var = (total2 / scored as f64 - mean * mean).max(0.0);
    Ok(PplResult {
        ppl: mean.exp(),
        nll: mean,
        nll_std_err: (var / (scored as f64 - 1.0)).sqrt(),
        tokens_scored: scored,
        chunks: wins.len(),
        ctx: opts.ctx,
        chunk_nll,
    })
}
