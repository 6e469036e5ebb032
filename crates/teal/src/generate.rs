//! Text generation: prefill the prompt, then decode one token at a time with the KV cache,
//! streaming each piece of text as it is complete. A [`Session`] remembers which tokens its
//! decoder's cache holds, so that the next prompt prefills only what follows the prefix it
//! shares with them (a chat's next turn, a repeated request).

use crate::device::{CpuDecoder, Decoder, Pooled};
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
    /// Whether an end-of-sequence token ends the generation; `false` never samples one
    /// (llama.cpp's `ignore_eos`), so the generation runs to `max_tokens` or the context,
    /// unless a constraint or the infill stage can only end it (a complete grammar or JSON
    /// answer, an infill with no text left to write).
    pub stop_at_eos: bool,
    /// Log-probabilities of every generated token and of its `k` most likely alternatives
    /// (`None`: none; the decode steps may then sample on the device).
    pub logprobs: Option<usize>,
    /// Also those of every prompt token after the first, with `logprobs`'s `k` (the prompt
    /// runs in pieces whose logits take about [`LOGITS_CHUNK_BYTES`]; a [`Session`] reuses a
    /// cached prefix only as far as it has these entries for it).
    pub prompt_logprobs: bool,
    /// Most prompt tokens a [`Turn::step`] runs (`None`: the whole prompt in one step), so that
    /// a server interleaving turns keeps the others going while a long prompt runs.
    pub prefill_chunk: Option<usize>,
    /// Whether the text shows control tokens (`<|im_start|>`, FIM tokens, ...) that the model
    /// writes, as llama.cpp's `--special`; by default they leave no text. The end-of-sequence
    /// token that ends a generation is never shown.
    pub special: bool,
}

/// Bytes of logits a prompt with [`GenerateParams::prompt_logprobs`] holds at a time: it runs
/// in pieces of this many bytes of logits (16 to 1024 positions). Fewer, larger pieces cost
/// less: each piece dequantizes the LM head for its matrix product, and its logits are a
/// fresh mapping (SmolLM2 q8, a 666-token prompt: 3.3 s in pieces of 64 positions, 1.9 s in
/// pieces of 256, 1.6 s in this size's 341, against 1.1 s for the prompt without logits).
pub const LOGITS_CHUNK_BYTES: usize = 64 << 20;

/// A token's log-probability under the model (natural log, after the softmax of the raw
/// logits, before any sampling temperature or cut) and the `k` most likely tokens at its
/// position, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// `token`'s entry from the logits of its position.
    pub fn from_logits(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        let lp = |t: usize| (logits[t] as f64 - lse) as f32;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let k = k.min(logits.len());
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if k > 0 && k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
        }
        order.truncate(k);
        order.sort_by(by_logit);
        TokenLogprob {
            token,
            logprob: lp(token as usize),
            top: order.into_iter().map(|t| (t as u32, lp(t))).collect(),
        }
    }
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
    /// Prompt tokens whose cached keys and values were reused (not run again).
    pub cached_tokens: usize,
    /// Seconds spent running the prompt tokens that were not cached.
    pub prompt_secs: f64,
    /// With [`GenerateParams::prompt_logprobs`]: one entry per prompt token after the first.
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// With [`GenerateParams::logprobs`]: one entry per generated token.
    pub logprobs: Vec<TokenLogprob>,
    pub decode_tokens: usize,
    pub decode_secs: f64,
}

impl Generation {
    /// Prompt speed over the tokens that were run (the cached ones were not).
    pub fn prompt_tok_s(&self) -> f64 {
        (self.prompt_tokens - self.cached_tokens) as f64 / self.prompt_secs.max(1e-9)
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

/// Generates up to `params.max_tokens` tokens after `prompt` on the CPU. `on_text` is called
/// once per generated token with the token, the new text it completes (empty while a
/// character is still incomplete UTF-8) and, with [`GenerateParams::logprobs`], its entry; it
/// returns `false` to stop.
pub fn generate(
    models: Models<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: impl FnMut(u32, &str, Option<&TokenLogprob>) -> bool,
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
    mut on_text: impl FnMut(u32, &str, Option<&TokenLogprob>) -> bool,
) -> Result<Generation> {
    check_prompt(dec, prompt)?;
    let mut turn = Turn::begin(dec, 0, Vec::new(), tokenizer, prompt, params)?;
    while !turn.step(dec, &mut on_text)? {}
    Ok(turn.finish())
}

/// A decoder and the tokens its KV cache holds. Each [`Session::generate`] keeps the cached
/// positions of the longest prefix its prompt shares with the previous prompt and the tokens
/// generated after it, and runs only the rest, as llama.cpp's server does with `cache_prompt`.
/// Log-probability entries computed for cached tokens are kept too, so that scoring prompts
/// sharing a context (the choices of a multiple-choice question) run only what differs.
/// The reused keys and values are those computed before: the same as a fresh run's up to the
/// order of floating-point sums, except that tokens generated by a different decode model
/// (TEAL's `decode-only` mode) keep the sparse model's values where a fresh prompt would run
/// them dense.
pub struct Session<'d> {
    dec: &'d mut dyn Decoder,
    /// The tokens at positions `0..dec.position()`, as far as known (none after a failure).
    cached: Vec<u32>,
    /// For each cached token, its log-probability entry where one was computed (never for
    /// the first token).
    scored: Vec<Option<TokenLogprob>>,
}

impl<'d> Session<'d> {
    /// A session over `dec`, whose current contents are not reused.
    pub fn new(dec: &'d mut dyn Decoder) -> Session<'d> {
        Session {
            dec,
            cached: Vec::new(),
            scored: Vec::new(),
        }
    }

    /// Starts the embedding of `tokens` as a sequence of its own ([`Decoder::embed`]) in
    /// pieces of at most `max_piece` tokens, a piece per [`Session::embed_step`]; the cache is
    /// emptied, so nothing is reused afterwards. The pieces are of equal sizes (the last up to
    /// a token per piece shorter), so that none is short: a short piece would take other
    /// kernels than the input run whole (on the CPU up to 8 positions run as rows, not through
    /// sgemm; on a GPU under 32 as GEMV chunks), and its sums another order. So the vector is
    /// the whole input's bit for bit on the CPU, and on a GPU where `max_piece` is its GEMM
    /// chunk (512), which it splits the whole input into the same way.
    pub fn embed_start(&mut self, tokens: &[u32], max_piece: usize) -> Result<EmbedTurn> {
        self.forget();
        self.dec.clear()?;
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let (n, ctx) = (tokens.len(), self.dec.capacity());
        if n > ctx {
            return Err(Error::ContextOverflow {
                what: "the input",
                got: n,
                ctx,
            });
        }
        Ok(EmbedTurn {
            tokens: tokens.to_vec(),
            piece: n.div_ceil(n.div_ceil(max_piece.max(1))),
            ran: 0,
            pooled: Pooled::new(self.dec.config().hidden_size),
            owner: address(self.dec),
        })
    }

    /// Runs the next piece of `turn` (from this session's [`Session::embed_start`]): after the
    /// last, the embedding, with the cache emptied (also after a failure); before, `None`.
    pub fn embed_step(&mut self, turn: &mut EmbedTurn) -> Result<Option<Vec<f32>>> {
        if address(self.dec) != turn.owner || turn.ran == turn.tokens.len() {
            return Err(Error::Invalid(
                "an embedding was stepped after its end or on another session than its own".into(),
            ));
        }
        let end = (turn.ran + turn.piece).min(turn.tokens.len());
        if let Err(e) = self
            .dec
            .embed_piece(&turn.tokens[turn.ran..end], &mut turn.pooled)
        {
            self.dec.clear()?;
            return Err(e);
        }
        turn.ran = end;
        if end < turn.tokens.len() {
            return Ok(None);
        }
        self.dec.clear()?;
        Ok(Some(turn.pooled.unit()))
    }

    /// The decoder's capacity: the context.
    pub fn capacity(&self) -> usize {
        self.dec.capacity()
    }

    /// How many tokens the cache holds that are known here (0 after a failure).
    pub fn cached_len(&self) -> usize {
        self.cached.len()
    }

    /// How many positions the decoder's cache holds now, a turn's included while it runs.
    pub fn positions(&self) -> usize {
        self.dec.position()
    }

    /// How many leading tokens of `prompt` the cache holds.
    pub fn shared_prefix(&self, prompt: &[u32]) -> usize {
        self.cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Forgets the cached tokens: the next prompt runs whole.
    pub fn forget(&mut self) {
        self.cached.clear();
        self.scored.clear();
    }

    /// [`generate_on`], reusing the cached prefix that `prompt` starts with (all but its last
    /// token at most, whose logits start the generation). With
    /// [`GenerateParams::prompt_logprobs`], only as far as the cached entries reach (with at
    /// least `logprobs` alternatives each), and one token less: the first token run needs the
    /// logits of the position before it.
    pub fn generate(
        &mut self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(u32, &str, Option<&TokenLogprob>) -> bool,
    ) -> Result<Generation> {
        let mut turn = self.start(tokenizer, prompt, params)?;
        while !self.step(&mut turn, &mut on_text)? {}
        Ok(self.finish(turn))
    }

    /// [`Session::generate`] a step at a time: keeps the cached prefix `prompt` shares;
    /// [`Session::step`] then runs the rest of the prompt and generates, and
    /// [`Session::finish`] records what the cache holds. Until then the session knows of no
    /// cached tokens (as after a failure), so a caller running several sessions must not start
    /// another turn on this one.
    pub fn start<'t>(
        &mut self,
        tokenizer: &'t Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
    ) -> Result<Turn<'t>> {
        check_prompt(self.dec, prompt)?;
        let common = self.shared_prefix(prompt);
        let k = params.logprobs.unwrap_or(0);
        let keep = if params.prompt_logprobs {
            // Entries for tokens 1..=keep come from the cache.
            let scored = self.scored.iter().skip(1);
            let reach = scored
                .take_while(|e| e.as_ref().is_some_and(|e| e.top.len() >= k))
                .count();
            reach.min(common.saturating_sub(1))
        } else {
            common
        }
        .min(prompt.len() - 1);
        let reused: Vec<TokenLogprob> = if params.prompt_logprobs {
            self.scored
                .iter()
                .skip(1)
                .take(keep)
                .flatten()
                .map(|e| TokenLogprob {
                    top: e.top[..k].to_vec(),
                    ..e.clone()
                })
                .collect()
        } else {
            Vec::new()
        };
        let kept: Vec<Option<TokenLogprob>> = self.scored.drain(..).take(keep + 1).collect();
        // Until this turn is finished, the cache holds no sequence known here.
        self.cached.clear();
        let mut turn = Turn::begin(self.dec, keep, reused, tokenizer, prompt, params)?;
        turn.common = common;
        turn.kept = kept;
        Ok(turn)
    }

    /// [`Turn::step`] on this session's decoder (`turn` from this session's
    /// [`Session::start`]).
    pub fn step(
        &mut self,
        turn: &mut Turn,
        on_text: impl FnMut(u32, &str, Option<&TokenLogprob>) -> bool,
    ) -> Result<bool> {
        turn.step(self.dec, on_text)
    }

    /// The finished `turn`'s generation; the session now knows the tokens the cache holds.
    pub fn finish(&mut self, turn: Turn) -> Generation {
        let (g, prompt, common, kept) = turn.split();
        // The last generated token has been run only if generation stopped at an
        // end-of-sequence token (which is not in `tokens`).
        let n = self.dec.position();
        self.cached = prompt.iter().chain(&g.tokens).copied().take(n).collect();
        let computed = |i: usize| -> Option<TokenLogprob> {
            match i.checked_sub(prompt.len()) {
                None => g.prompt_logprobs.get(i.checked_sub(1)?).cloned(),
                Some(j) => g.logprobs.get(j).cloned(),
            }
        };
        self.scored = (0..n)
            .map(|i| match kept.get(i) {
                // An entry of the old sequence holds for the same token at the same place.
                Some(e) if i < common => e.clone(),
                _ => computed(i),
            })
            .collect();
        g
    }
}

/// What receives a turn's tokens in [`step_together`]: `on_text` of [`generate`].
pub type OnText<'r> = Box<dyn FnMut(u32, &str, Option<&TokenLogprob>) -> bool + 'r>;

/// One turn of [`step_together`]: the session it runs on (the one that started it), the turn,
/// and what receives its text.
pub struct TurnStep<'r, 'd, 't> {
    pub session: &'r mut Session<'d>,
    pub turn: &'r mut Turn<'t>,
    pub on_text: OnText<'r>,
}

/// [`Session::step`] of several turns, each on its own session, with the same results: the
/// decode steps of the turns on CPU decoders run together ([`crate::device::decode_each`]: a
/// layer at a time across them, so that where a layer fits the last-level cache its weights
/// are read from memory once), the other turns' steps one after another. Returns each turn's
/// result.
pub fn step_together<'d, 't>(steps: &mut [TurnStep<'_, 'd, 't>]) -> Vec<Result<bool>> {
    let mut results = Vec::with_capacity(steps.len());
    // The turns whose step is a CPU decode step, and the token each runs.
    let mut run: Vec<(usize, u32)> = Vec::new();
    for (i, s) in steps.iter_mut().enumerate() {
        let dec = &mut *s.session.dec;
        let r = if let Err(e) = s.turn.check_owner(dec) {
            Err(e)
        } else if s.turn.ended.is_some() {
            Ok(true)
        } else if s.turn.ran < s.turn.prompt.len() || dec.lockstep().is_none() {
            s.turn.step(dec, &mut s.on_text)
        } else {
            match s.turn.emit(dec, &mut s.on_text) {
                Ok(Some(t)) => {
                    run.push((i, t));
                    Ok(false)
                }
                Ok(None) => Ok(true),
                Err(e) => Err(e),
            }
        };
        results.push(r);
    }
    #[allow(clippy::type_complexity)]
    let (mut decs, mut turns): (Vec<&mut (dyn Decoder + 'd)>, Vec<&mut Turn<'t>>) = steps
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| run.iter().any(|r| r.0 == *i))
        .map(|(_, s)| (&mut *s.session.dec, &mut *s.turn))
        .unzip();
    let tokens: Vec<u32> = run.iter().map(|r| r.1).collect();
    let done = crate::device::decode_each(&mut decs, &tokens, |k, logits| turns[k].accept(logits));
    for ((i, _), r) in run.iter().zip(done) {
        if let Err(e) = r {
            results[*i] = Err(e);
        }
    }
    results
}

/// The checks that leave the decoder untouched: a prompt that is empty or does not fit.
/// (Ids outside the vocabulary are the decoders' own check, on every prefill.) Generation runs
/// them itself; a caller that shows the prompt first can run them before.
pub fn check_prompt(dec: &dyn Decoder, prompt: &[u32]) -> Result<()> {
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
    Ok(())
}

/// An embedding in progress, a piece of its input at a time: what a server runs beside the
/// other slots' turns ([`Session::embed_start`], [`Session::embed_step`]).
pub struct EmbedTurn {
    tokens: Vec<u32>,
    /// Tokens per piece.
    piece: usize,
    /// Tokens run so far.
    ran: usize,
    pooled: Pooled,
    /// The decoder it runs on ([`address`]).
    owner: usize,
}

impl EmbedTurn {
    /// How many tokens its input has.
    pub fn input_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// A generation in progress, a step at a time ([`Turn::step`]: a piece of the prompt, or a
/// token): what [`generate_on`] and [`Session::generate`] run to the end, and what a server
/// runs side by side over its slots (each turn on its own decoder, [`step_together`]).
pub struct Turn<'t> {
    tokenizer: &'t Tokenizer,
    params: GenerateParams,
    sampler: Sampler,
    stream: StreamDecoder<'t>,
    prompt: Vec<u32>,
    /// Cached prompt positions kept (not run again).
    keep: usize,
    /// Prompt positions run so far (from `keep`), and most of them to run in one step.
    ran: usize,
    chunk: usize,
    prompt_secs: f64,
    prompt_logprobs: Vec<TokenLogprob>,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    /// The sampled token not yet handed out, and its entry with `logprobs`.
    next: u32,
    next_lp: Option<TokenLogprob>,
    /// When decoding started (the prompt's last piece ran).
    t1: Instant,
    /// Why and after how many seconds of decoding it stopped, once it has.
    ended: Option<(StopReason, f64)>,
    /// For [`Session::finish`]: the prompt's tokens shared with the session's previous
    /// sequence, and that sequence's entries kept.
    common: usize,
    kept: Vec<Option<TokenLogprob>>,
    /// The address of the decoder the turn began on: its steps must run there.
    owner: usize,
}

/// A decoder's address, which identifies it while it is borrowed.
fn address(dec: &dyn Decoder) -> usize {
    dec as *const dyn Decoder as *const () as usize
}

impl<'t> Turn<'t> {
    /// Keeps the first `keep` cached positions (`prompt[..keep]`, fewer than the prompt's
    /// tokens); the first steps run the rest of the prompt. With `prompt_logprobs`, `reused`
    /// holds the entries of tokens `1..=keep`; the rest are computed.
    fn begin(
        dec: &mut dyn Decoder,
        keep: usize,
        reused: Vec<TokenLogprob>,
        tokenizer: &'t Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
    ) -> Result<Turn<'t>> {
        if keep == 0 {
            dec.clear()?;
        } else {
            dec.truncate(keep)?;
        }
        let mut cfg = params.sampler.clone();
        if !params.stop_at_eos {
            // As llama.cpp's `ignore_eos`: the end-of-sequence tokens are never sampled. (Where
            // a constraint allows nothing else, its answer is complete: one still ends it.)
            cfg.logit_bias
                .extend(tokenizer.eos_ids().iter().map(|&t| (t, f32::NEG_INFINITY)));
        }
        let mut sampler = Sampler::for_tokenizer(cfg, tokenizer);
        let recent = prompt.len().saturating_sub(params.sampler.penalties.last_n);
        for &t in &prompt[recent..] {
            sampler.accept(t);
        }
        let mut chunk = params.prefill_chunk.unwrap_or(usize::MAX).max(1);
        if params.prompt_logprobs {
            let vocab = dec.config().vocab_size;
            chunk = chunk.min((LOGITS_CHUNK_BYTES / (4 * vocab)).clamp(16, 1024));
        }
        Ok(Turn {
            tokenizer,
            params: params.clone(),
            sampler,
            stream: StreamDecoder::with_context(tokenizer, prompt).skip_special(!params.special),
            prompt: prompt.to_vec(),
            keep,
            ran: keep,
            chunk,
            prompt_secs: 0.0,
            prompt_logprobs: reused,
            tokens: Vec::with_capacity(params.max_tokens.min(dec.capacity())),
            logprobs: Vec::new(),
            next: 0,
            next_lp: None,
            t1: Instant::now(),
            ended: None,
            common: 0,
            kept: Vec::new(),
            owner: address(dec),
        })
    }

    /// An error unless `dec` is the decoder the turn began on.
    fn check_owner(&self, dec: &dyn Decoder) -> Result<()> {
        if address(dec) != self.owner {
            return Err(Error::Invalid(
                "a turn was stepped on another decoder than the one it began on".into(),
            ));
        }
        Ok(())
    }

    /// Runs the next piece of the prompt (at most `chunk` tokens); after the last, samples
    /// the first token, or ends the turn if no token is wanted.
    fn prefill_piece(&mut self, dec: &mut dyn Decoder) -> Result<()> {
        let t0 = Instant::now();
        let end = self.ran.saturating_add(self.chunk).min(self.prompt.len());
        let piece = &self.prompt[self.ran..end];
        let logits = if self.params.prompt_logprobs {
            let k = self.params.logprobs.unwrap_or(0);
            let vocab = dec.config().vocab_size;
            let rows = dec.prefill(piece, Logits::All)?;
            let mut last = Vec::new();
            for (i, row) in rows.chunks(vocab).enumerate() {
                match self.prompt.get(self.ran + i + 1) {
                    Some(&t) => self
                        .prompt_logprobs
                        .push(TokenLogprob::from_logits(row, t, k)),
                    None => last = row.to_vec(),
                }
            }
            last
        } else {
            dec.prefill(piece, Logits::Last)?
        };
        self.ran = end;
        self.prompt_secs += t0.elapsed().as_secs_f64();
        if self.ran < self.prompt.len() {
            return Ok(());
        }
        if self.params.max_tokens == 0 {
            self.ended = Some((StopReason::MaxTokens, 0.0));
            return Ok(());
        }
        self.next = self.sampler.sample(&logits);
        self.next_lp = self
            .params
            .logprobs
            .map(|k| TokenLogprob::from_logits(&logits, self.next, k));
        self.t1 = Instant::now();
        Ok(())
    }

    /// On `dec` (the decoder the turn began on, else an error): while the prompt is not all
    /// run, runs its next piece ([`GenerateParams::prefill_chunk`]); then hands out the
    /// sampled token (`on_text` as for [`generate`]) and, unless that ends the generation,
    /// runs it and samples the next. Returns whether the generation has ended.
    pub fn step(
        &mut self,
        dec: &mut dyn Decoder,
        on_text: impl FnMut(u32, &str, Option<&TokenLogprob>) -> bool,
    ) -> Result<bool> {
        self.check_owner(dec)?;
        if self.ended.is_some() {
            return Ok(true);
        }
        if self.ran < self.prompt.len() {
            self.prefill_piece(dec)?;
            return Ok(self.ended.is_some());
        }
        let Some(next) = self.emit(dec, on_text)? else {
            return Ok(true);
        };
        match self.params.logprobs {
            None => self.next = dec.decode_sample(next, &mut self.sampler)?,
            Some(_) => {
                let logits = dec.decode(next)?;
                self.accept(logits);
            }
        }
        Ok(false)
    }

    /// Hands out the sampled token (`on_text` as for [`generate`]); returns it if it is to be
    /// run (`None`: the generation has ended).
    fn emit(
        &mut self,
        dec: &dyn Decoder,
        mut on_text: impl FnMut(u32, &str, Option<&TokenLogprob>) -> bool,
    ) -> Result<Option<u32>> {
        let next = self.next;
        let stop = if self.tokenizer.eos_ids().contains(&next) {
            Some(StopReason::Eos)
        } else {
            self.tokens.push(next);
            let piece = self.stream.push(next)?;
            let go_on = on_text(next, &piece, self.next_lp.as_ref());
            self.logprobs.extend(self.next_lp.take());
            if !go_on {
                Some(StopReason::Caller)
            } else if self.tokens.len() >= self.params.max_tokens {
                Some(StopReason::MaxTokens)
            } else if dec.position() >= dec.capacity() {
                Some(StopReason::ContextFull)
            } else {
                None
            }
        };
        match stop {
            Some(stop) => {
                self.ended = Some((stop, self.t1.elapsed().as_secs_f64()));
                Ok(None)
            }
            None => Ok(Some(next)),
        }
    }

    /// Samples the next token from the logits of the one handed out.
    fn accept(&mut self, logits: &[f32]) {
        self.next = self.sampler.sample(logits);
        if let Some(k) = self.params.logprobs {
            self.next_lp = Some(TokenLogprob::from_logits(logits, self.next, k));
        }
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Tokens handed out so far.
    pub fn generated(&self) -> usize {
        self.tokens.len()
    }

    /// The generation, once [`Turn::step`] has said it ended (before that: stopped by the
    /// caller).
    pub fn finish(self) -> Generation {
        self.split().0
    }

    /// The generation, and for [`Session::finish`] the prompt, its tokens shared with the
    /// session's previous sequence and that sequence's entries kept.
    #[allow(clippy::type_complexity)]
    fn split(self) -> (Generation, Vec<u32>, usize, Vec<Option<TokenLogprob>>) {
        let (stop, decode_secs) = self
            .ended
            .unwrap_or((StopReason::Caller, self.t1.elapsed().as_secs_f64()));
        let g = Generation {
            decode_tokens: self.tokens.len().saturating_sub(1),
            decode_secs,
            tokens: self.tokens,
            stop,
            prompt_tokens: self.prompt.len(),
            cached_tokens: self.keep,
            prompt_secs: self.prompt_secs,
            prompt_logprobs: self.prompt_logprobs,
            logprobs: self.logprobs,
        };
        (g, self.prompt, self.common, self.kept)
    }
}

#[cfg(test)]
mod tests {
    use super::TokenLogprob;

    /// Log-softmax against its definition, the alternatives most likely first (ties by id),
    /// `k` = 0 and `k` past the vocabulary.
    #[test]
    fn token_logprob_from_logits() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        let e = TokenLogprob::from_logits(&logits, 4, 2);
        assert_eq!(e.token, 4);
        assert!((e.logprob as f64 - (0.5 - lse)).abs() < 1e-6);
        assert_eq!(e.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3]);
        assert!((e.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
        assert!(TokenLogprob::from_logits(&logits, 0, 0).top.is_empty());
        let all = TokenLogprob::from_logits(&logits, 0, 9);
        assert_eq!(
            all.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 3, 0, 4, 2]
        );
        let total: f64 = all.top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
