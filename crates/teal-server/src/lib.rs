//! teal's HTTP server (OpenAI's API, and llama.cpp's own in `native.rs`), thin: the HTTP side
//! (axum, on a small tokio runtime) checks requests and writes answers; one engine thread owns
//! the decoders (slots) and runs a request on each free slot, the running ones a step each per
//! round (on the CPU their decode steps a layer at a time across them), taking them from a queue
//! in arrival order.
//!
//! - `GET /health`, `GET /v1/models` (also llama-server's `/v1/health` and `/models`) and
//!   `GET /v1/models/{id}` (OpenAI's retrieve: the model by its id, 404 for another)
//! - `POST /v1/completions` (`prompt`) and `POST /v1/chat/completions` (also `/chat/completions`;
//!   `messages`, rendered with the model's chat template), both with `"stream": true` as
//!   server-sent events ending in `data: [DONE]`, `max_tokens`, `temperature`, `top_p`, `top_k`,
//!   `min_p`, `repeat_penalty`, `repeat_last_n`, `presence_penalty`, `frequency_penalty`,
//!   `seed`, `stop`, `n` (choices one after another, choice j with seed + j), and for
//!   completions `suffix` (fill in the middle with the model's FIM tokens, cut to fit the
//!   context as `/infill`'s); answers carry `usage` (streamed: in a last chunk without
//!   choices, with `stream_options.include_usage`) and llama.cpp's `timings` (prompt and
//!   decode tokens per second).
//! - Scoring: a completion's `prompt` may be token ids, or a list of prompts (`n` choices each);
//!   `logprobs: k` gives each token's log-probability and its `k` most likely alternatives, and
//!   with `echo` also the prompt's tokens (`max_tokens` may then be 0): what lm-evaluation-harness's
//!   `local-completions` asks for its log-likelihood tasks. Chat takes `logprobs: true` and
//!   `top_logprobs: k`. Streamed, each chunk carries its tokens' entries; a stop sequence cuts
//!   the entries where it cuts the text (after the last token that starts before it).
//! - Prompt caching, as llama.cpp's `cache_prompt` (default on): a request whose prompt starts
//!   with the tokens of the previous request (its prompt and answer: a chat's next turn) reuses
//!   their keys and values and runs only the rest; `usage.prompt_tokens_details.cached_tokens`
//!   and `timings.cache_n` say how many were reused. `"cache_prompt": false` runs it whole.
//!   With several slots (decoders) each keeps its own cache; [`pick_slot`] chooses.
//!
//! - Tokenizer endpoints as vLLM's and llama.cpp's servers have them: `GET /tokenizer_info`,
//!   `POST /tokenize` (`prompt` or `content`, `add_special_tokens` or `add_special`) and
//!   `POST /detokenize` (`tokens`), so a client such as lm-evaluation-harness can tokenize with the
//!   model's own tokenizer.
//! - llama.cpp's `/completion`, `/infill`, `/apply-template` and `/props`: see `native.rs`.
//! - `GET /metrics` with `--metrics`: see `metrics.rs`.
//! - `GET /slots`: per slot, whether it is answering a request and the tokens its cache holds.
//!
//! Bad requests (malformed JSON, a missing field, a value of the wrong type, a prompt longer
//! than the context, an unsupported option) get status 400 and `{"error": {"message", "type",
//! "code"}}`, naming the field; other errors (404, 405, 413, ...) the same body.

mod metrics;
mod native;
mod stop;

use axum::body::Bytes;
use axum::extract::{FromRequest, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use teal::chat::{encode_prompt, FunctionCall, Infill, Message, Prompt, ToolCall};
use teal::device::Decoder;
use teal::generate::{
    step_together, EmbedTurn, GenerateParams, OnText, Session, StopReason, TokenLogprob, Turn,
    TurnStep,
};
use teal::grammar::Grammar;
use teal::sampler::{Penalties, SamplerConfig};
use teal::tokenizer::Tokenizer;
use teal::tools::stream::{CallStream, Delta};
use teal::tools::ToolChoice;
use tokio::sync::{mpsc, oneshot};

pub use metrics::Metrics;
pub use stop::{IndentLimit, StopFilter};

/// The model the server answers with, for `/v1/models` and every answer's `model`.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub id: String,
    /// Context length of the engine's decoder.
    pub ctx: usize,
    /// The engine's slots (decoders), for `/props`.
    pub slots: usize,
    /// Extra facts listed under `teal` in `/v1/models` (device, weights, sparsity, ...).
    pub meta: Value,
}

/// Work for the engine thread, taken in arrival order.
pub enum Job {
    /// Generate for one prompt.
    Generate(Box<Generate>),
    /// A tokenizer request, answered with its JSON body.
    Tokenizer(TokenizerJob, oneshot::Sender<Result<Value, ApiError>>),
    /// Embeddings of texts or token ids ([`teal::device::Decoder::embed`]), answered with each
    /// one's vector and token count.
    Embed(Vec<Prompt>, oneshot::Sender<EmbedResult>),
    /// The slots' state, answered with `/slots`' body.
    Slots(oneshot::Sender<Value>),
    /// How many requests are on slots and how many wait for one, for `/metrics`.
    Load(oneshot::Sender<Load>),
    /// Stop serving now: the jobs running and waiting are dropped (their answers end).
    Shutdown,
}

/// What the engine is doing, as it stands after taking the jobs that have arrived (llama.cpp's
/// `requests_processing` and `requests_deferred`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests running on a slot.
    pub processing: usize,
    /// Requests waiting for a free slot.
    pub deferred: usize,
}

/// What an embedding job answers: per input, its vector and its number of tokens.
pub type EmbedResult = Result<Vec<(Vec<f32>, usize)>, ApiError>;

/// What the tokenizer endpoints ask.
pub enum TokenizerJob {
    /// BOS, EOS and the chat template.
    Info,
    /// Token ids of a text, with BOS and EOS where the model adds them if `add_special`
    /// ([`Tokenizer::encode_special_with`]), control tokens written in it (`<|im_start|>`) as
    /// themselves if `parse_special`, else as text ([`Tokenizer::encode_with`]); with
    /// `with_pieces`, each id beside its piece (llama.cpp's).
    Encode {
        text: String,
        add_special: bool,
        parse_special: bool,
        with_pieces: bool,
    },
    /// The text of token ids.
    Decode(Vec<u32>),
    /// A chat rendered with the model's template (llama.cpp's `/apply-template`), ending with
    /// the header of the assistant's turn if `generation_prompt` ([`teal::chat::render_chat`]),
    /// else as it is ([`teal::chat::render_chat_as_is`]).
    Template {
        messages: Vec<Message>,
        generation_prompt: bool,
    },
}

/// What to generate for one prompt and where to send it.
pub struct Generate {
    pub prompt: Prompt,
    /// Log-probabilities of the generated tokens with this many alternatives each.
    pub logprobs: Option<usize>,
    /// Echo the prompt: its text before the answer's, and with `logprobs` its tokens' entries.
    pub echo: bool,
    /// Most tokens to generate (`None`: until end of sequence or the context is full).
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// Reuse the cached prefix the prompt shares with the previous request.
    pub cache_prompt: bool,
    /// Generate past end-of-sequence tokens (llama.cpp's `ignore_eos`).
    pub ignore_eos: bool,
    /// Stop once this long has passed since the first generated token and the text has a
    /// line break (llama.cpp's `t_max_predict_ms`, for code completion).
    pub time_limit: Option<Duration>,
    /// Stop at a line indented less than this (llama.cpp's `n_indent`; 0: off): see
    /// [`IndentLimit`].
    pub min_indent: usize,
    /// The slot to run on (`None`: the one [`pick_slot`] chooses).
    pub slot: Option<usize>,
    /// Biases of tokens named by id or by text (every token of the text), added to the
    /// sampler's [`SamplerConfig::logit_bias`] once the text is tokenized.
    pub logit_bias: Vec<(BiasKey, f32)>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// A `logit_bias` entry's token: an id, or a text whose tokens all get the bias.
#[derive(Clone, Debug, PartialEq)]
pub enum BiasKey {
    Id(u32),
    Text(String),
}

/// What the engine reports for a job: text as it is generated, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// The next piece of the answer's text, the tokens whose text starts in it and with
    /// `logprobs` their entries (a token whose text is held back, as the possible start of a
    /// stop sequence, comes with the piece that releases it; tokens from a stop sequence on
    /// never come).
    Text {
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<TokenInfo>,
        /// The slot generating it.
        slot: usize,
    },
    Done(Summary),
    Failed(ApiError),
}

/// Why generation stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopType {
    /// An end-of-sequence token.
    Eos,
    /// This stop sequence.
    Word(String),
    /// The token limit, the context or the time limit.
    Limit,
}

impl StopType {
    /// OpenAI's `finish_reason`: `stop` (end of sequence or a stop sequence) or `length`.
    pub fn finish_reason(&self) -> &'static str {
        match self {
            StopType::Eos | StopType::Word(_) => "stop",
            StopType::Limit => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub stop: StopType,
    /// The slot (decoder) that ran it.
    pub slot: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens reused from the previous request's cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Seconds running the prompt tokens that were not cached.
    pub prompt_secs: f64,
    /// Decode tokens (after the first) and their seconds.
    pub decode_tokens: usize,
    pub decode_secs: f64,
    /// The prompt's text (a text prompt as given, others decoded from their tokens).
    pub prompt_text: String,
    /// With `echo` and `logprobs`: the prompt's tokens' entries (the first has no
    /// log-probability), which come before those of the generated tokens.
    pub prompt_logprobs: Vec<TokenInfo>,
}

/// One token of an answer with `logprobs`: its text and bytes, its log-probability, and the
/// most likely tokens at its position.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: Option<f32>,
    /// The alternatives: id, text, bytes and log-probability.
    pub top: Vec<(u32, String, Vec<u8>, f32)>,
}

/// An error answer: HTTP status and message.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    /// The engine's queue is closed: no job can be sent.
    fn engine_stopped() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the engine has stopped".into(),
        }
    }

    /// The engine let go of a job's reply channel without answering.
    fn engine_dropped() -> ApiError {
        ApiError::internal("the engine dropped the request")
    }

    fn body(&self) -> Value {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Serves jobs until every sender of `jobs` is gone and none is left. Each decoder is a slot:
/// a KV cache and the tokens it holds, kept between requests; a prompt runs on the free slot
/// [`pick_slot`] chooses, so that several conversations each keep their cache. Requests on
/// different slots run at the same time, a step each per round ([`step_together`]: the CPU
/// slots' decode steps run a layer at a time across them, so that a layer that fits the
/// last-level cache is read from memory once per round); a new request's prompt runs in pieces
/// of [`PREFILL_CHUNK`] tokens, one per round. Requests that find no free slot wait, and take
/// one in arrival order. An embeddings request takes a slot too and runs a piece of one of its
/// inputs per round (pieces of at most [`PREFILL_CHUNK`] tokens, of equal sizes:
/// [`Session::embed_start`]), so that the other slots' answers go on while it runs, however
/// long its inputs. A request whose client has gone ends, waiting or running, at the next
/// round. An answer's decode timings are wall time, the other slots' turns included.
pub fn run_engine(
    slots: Vec<&mut dyn Decoder>,
    tok: &Tokenizer,
    jobs: std::sync::mpsc::Receiver<Job>,
) {
    use std::sync::mpsc::TryRecvError;
    let mut sessions: Vec<Session> = slots.into_iter().map(Session::new).collect();
    let Some(ctx) = sessions.first().map(Session::capacity) else {
        return;
    };
    let mut running: Vec<Option<Work>> = sessions.iter().map(|_| None).collect();
    // When each slot was last used (0: never), in jobs served.
    let (mut used, mut clock) = (vec![0u64; sessions.len()], 0);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    // `/metrics`' questions, answered once this round's jobs have taken their slots.
    let mut asked: Vec<oneshot::Sender<Load>> = Vec::new();
    let mut open = true;
    loop {
        // Wait for a job while nothing runs, then take every job that has arrived.
        let idle = running.iter().all(Option::is_none);
        if open && idle && waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => open = false,
            }
        }
        while open {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !open && idle && waiting.is_empty() {
            return;
        }
        // Jobs in arrival order, each on a free slot if there is one for it.
        for job in std::mem::take(&mut waiting) {
            let free: Vec<usize> = (0..sessions.len())
                .filter(|&i| running[i].is_none())
                .collect();
            match job {
                // A request whose client has gone while it waited (an editor's completion
                // request that the next keystroke replaced) is dropped unrun.
                Job::Generate(g) if g.events.is_closed() => {}
                // No free slot for it yet (its prompt is tokenized once it has one).
                Job::Generate(g)
                    if g.slot.map_or(free.is_empty(), |i| {
                        running.get(i).is_some_and(Option::is_some)
                    }) =>
                {
                    waiting.push_back(Job::Generate(g));
                }
                Job::Generate(g) => {
                    let tokens = match encode_prompt(tok, &g.prompt) {
                        Ok(t) => t,
                        Err(e) => {
                            g.events
                                .send(Event::Failed(ApiError::bad_request(e.to_string())))
                                .ok();
                            continue;
                        }
                    };
                    let i = match g.slot {
                        None => {
                            let state: Vec<SlotState> = free
                                .iter()
                                .map(|&i| SlotState {
                                    cached: sessions[i].cached_len(),
                                    shared: if g.cache_prompt {
                                        sessions[i].shared_prefix(&tokens)
                                    } else {
                                        0
                                    },
                                    last_used: used[i],
                                })
                                .collect();
                            free[pick_slot(&state, tokens.len())]
                        }
                        Some(i) if i >= sessions.len() => {
                            let msg = format!(
                                "id_slot = {i}: this server has {} slot(s), 0 to {}",
                                sessions.len(),
                                sessions.len() - 1
                            );
                            g.events
                                .send(Event::Failed(ApiError::bad_request(msg)))
                                .ok();
                            continue;
                        }
                        Some(i) => i,
                    };
                    clock += 1;
                    used[i] = clock;
                    running[i] = Running::start(&mut sessions[i], i, tok, *g, &tokens)
                        .map(|r| Work::Generate(Box::new(r)));
                }
                Job::Tokenizer(t, reply) => {
                    reply.send(tokenizer_job(tok, ctx, t)).ok();
                }
                Job::Slots(reply) => {
                    reply.send(slots_state(&sessions, &running, ctx)).ok();
                }
                Job::Load(reply) => asked.push(reply),
                Job::Shutdown => return,
                Job::Embed(inputs, reply) => {
                    // The least recently used free slot (the last of those never used): its
                    // cache is emptied.
                    let Some(i) = free.iter().rev().copied().min_by_key(|&i| used[i]) else {
                        waiting.push_back(Job::Embed(inputs, reply));
                        continue;
                    };
                    clock += 1;
                    used[i] = clock;
                    running[i] = Some(Work::Embed(Embedding {
                        inputs,
                        done: Vec::new(),
                        current: None,
                        reply,
                    }));
                }
            }
        }
        // A running job whose client has gone ends here, also where no failed send would tell
        // (its prompt still running, its text all held back for a stop sequence).
        for (slot, session) in running.iter_mut().zip(sessions.iter_mut()) {
            if let Some(Work::Generate(r)) = slot.take_if(|w| w.client_gone()) {
                r.finish(session, tok, Ok(()));
            }
        }
        // Only requests wait: every other job is answered when it is taken.
        let load = Load {
            processing: running.iter().filter(|r| r.is_some()).count(),
            deferred: waiting.len(),
        };
        for reply in asked.drain(..) {
            reply.send(load).ok();
        }
        // A step of each running job: a piece of its prompt, or a token (the CPU slots' decode
        // steps together, a layer at a time across them).
        let mut steps = Vec::new();
        let mut which = Vec::new();
        for (i, (slot, session)) in running.iter_mut().zip(sessions.iter_mut()).enumerate() {
            if let Some(Work::Generate(r)) = slot {
                let (turn, on_text) = r.parts(tok);
                steps.push(TurnStep {
                    session,
                    turn,
                    on_text,
                });
                which.push(i);
            }
        }
        let results = step_together(&mut steps);
        drop(steps);
        for (i, step) in which.into_iter().zip(results) {
            if !matches!(step, Ok(false)) {
                if let Some(Work::Generate(r)) = running[i].take() {
                    r.finish(&mut sessions[i], tok, step.map(|_| ()));
                }
            }
        }
        // A piece of an input of each embeddings request; one whose inputs are all done is
        // answered.
        for (slot, session) in running.iter_mut().zip(sessions.iter_mut()) {
            if let Some(Work::Embed(mut e)) = slot.take_if(|w| matches!(w, Work::Embed(_))) {
                match e.step(session, tok) {
                    None => *slot = Some(Work::Embed(e)),
                    Some(answer) => {
                        e.reply.send(answer).ok();
                    }
                }
            }
        }
    }
}

/// What a busy slot runs.
enum Work<'t> {
    /// A generation: a piece of its prompt or a token per round.
    Generate(Box<Running<'t>>),
    /// An embeddings request: a piece of an input per round.
    Embed(Embedding),
}

impl Work<'_> {
    /// Whether the request's client has gone.
    fn client_gone(&self) -> bool {
        match self {
            Work::Generate(r) => r.events.is_closed(),
            Work::Embed(e) => e.reply.is_closed(),
        }
    }
}

/// An embeddings request running on a slot: its inputs, the vectors and token counts of those
/// done, the input being embedded, and where the whole answer goes.
struct Embedding {
    inputs: Vec<Prompt>,
    done: Vec<(Vec<f32>, usize)>,
    current: Option<EmbedTurn>,
    reply: oneshot::Sender<EmbedResult>,
}

impl Embedding {
    /// Runs a piece of the current input, or of the next one (its first piece empties the
    /// slot's cache), in pieces of at most [`PREFILL_CHUNK`] tokens; the answer once the
    /// inputs are all done or one has failed, else `None`.
    fn step(&mut self, session: &mut Session, tok: &Tokenizer) -> Option<EmbedResult> {
        let i = self.done.len();
        let bad = |e: String| ApiError::bad_request(format!("input[{i}]: {e}"));
        let mut turn = match self.current.take() {
            Some(turn) => turn,
            None => {
                let Some(p) = self.inputs.get(i) else {
                    return Some(Ok(std::mem::take(&mut self.done)));
                };
                let tokens = match encode_prompt(tok, p) {
                    Ok(t) if t.is_empty() => return Some(Err(bad("empty".into()))),
                    Ok(t) => t,
                    Err(e) => return Some(Err(bad(e.to_string()))),
                };
                match session.embed_start(&tokens, PREFILL_CHUNK) {
                    Ok(turn) => turn,
                    Err(e) => return Some(Err(bad(e.to_string()))),
                }
            }
        };
        match session.embed_step(&mut turn) {
            Ok(None) => {
                self.current = Some(turn);
                return None;
            }
            Ok(Some(v)) => self.done.push((v, turn.input_tokens())),
            Err(e) => return Some(Err(bad(e.to_string()))),
        }
        (self.done.len() == self.inputs.len()).then(|| Ok(std::mem::take(&mut self.done)))
    }
}

/// `/slots`' body: per slot (llama.cpp's fields where they apply) its context, whether it is
/// answering a request, and the tokens its cache holds; while answering, the request's prompt
/// tokens and the tokens generated so far.
fn slots_state(sessions: &[Session], running: &[Option<Work>], ctx: usize) -> Value {
    let slot = |(i, (s, r)): (usize, (&Session, &Option<Work>))| {
        let mut v = json!({
            "id": i,
            "n_ctx": ctx,
            "is_processing": r.is_some(),
            // While answering, the positions run so far (the prompt's and the answer's).
            "cached_tokens": if r.is_some() { s.positions() } else { s.cached_len() },
        });
        if let Some(Work::Generate(r)) = r {
            v["n_prompt_tokens"] = json!(r.turn.prompt().len());
            v["next_token"] = json!({"n_decoded": r.turn.generated()});
        }
        v
    };
    Value::Array(sessions.iter().zip(running).enumerate().map(slot).collect())
}

/// What [`pick_slot`] knows of a slot.
#[derive(Clone, Copy, Debug)]
pub struct SlotState {
    /// Tokens its cache holds.
    pub cached: usize,
    /// Leading tokens of the prompt among them.
    pub shared: usize,
    /// When it was last used (larger: later; 0: never).
    pub last_used: u64,
}

/// The slot for a prompt of `len` tokens: the slot whose cached tokens the prompt continues
/// (the longest such: nothing cached is lost), else an empty slot, else the slot sharing the
/// longest prefix with the prompt if that covers at least half of it, else the least recently
/// used slot. `slots` must not be empty.
pub fn pick_slot(slots: &[SlotState], len: usize) -> usize {
    let best = |key: &dyn Fn(&SlotState) -> Option<(usize, u64)>| {
        (0..slots.len())
            .filter_map(|i| key(&slots[i]).map(|k| (k, i)))
            .max()
            .map(|(_, i)| i)
    };
    // Ties go to the most recently used slot among continuations and shared prefixes.
    let continued =
        best(&|s| (s.cached > 0 && s.shared == s.cached).then_some((s.shared, s.last_used)));
    let empty = || best(&|s| (s.cached == 0).then_some((0, u64::MAX - s.last_used)));
    let similar =
        || best(&|s| (2 * s.shared >= len && s.shared > 0).then_some((s.shared, s.last_used)));
    let oldest = || best(&|s| Some((0, u64::MAX - s.last_used))).unwrap_or(0);
    continued
        .or_else(empty)
        .or_else(similar)
        .unwrap_or_else(oldest)
}

/// The body of a tokenizer endpoint's answer (`ctx`: the engine's context).
fn tokenizer_job(tok: &Tokenizer, ctx: usize, job: TokenizerJob) -> Result<Value, ApiError> {
    let bad = |e: teal::tokenizer::TokenizerError| ApiError::bad_request(e.to_string());
    Ok(match job {
        TokenizerJob::Info => {
            let text = |id: Option<u32>| id.and_then(|i| tok.token_str(i));
            json!({
                "bos_token": text(tok.bos_id()),
                "eos_token": text(tok.eos_ids().first().copied()),
                "pad_token": null,
                "chat_template": tok.chat_template(),
                "add_bos_token": tok.add_bos_default(),
                "add_eos_token": tok.add_eos_default(),
                "vocab_size": tok.vocab_size(),
                "model_max_length": ctx,
            })
        }
        TokenizerJob::Encode {
            text,
            add_special,
            parse_special,
            with_pieces,
        } => {
            let ids = match add_special {
                true => tok.encode_special_with(&text, parse_special),
                false => tok.encode_with(&text, false, parse_special),
            }
            .map_err(bad)?;
            let tokens: Value = match with_pieces {
                false => json!(ids),
                // A piece that is not whole UTF-8 (part of a character) as its bytes.
                true => ids
                    .iter()
                    .map(|&id| {
                        let piece = match String::from_utf8(tok.piece_bytes(id)) {
                            Ok(text) => json!(text),
                            Err(e) => json!(e.into_bytes()),
                        };
                        json!({"id": id, "piece": piece})
                    })
                    .collect(),
            };
            json!({"tokens": tokens, "count": ids.len(), "max_model_len": ctx})
        }
        TokenizerJob::Decode(ids) => {
            let text = tok.decode(&ids).map_err(bad)?;
            json!({"prompt": text, "content": text})
        }
        TokenizerJob::Template {
            messages,
            generation_prompt,
        } => {
            let text = match generation_prompt {
                true => teal::chat::render_chat(tok, &messages),
                false => teal::chat::render_chat_as_is(tok, &messages),
            }
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
            json!({ "prompt": text })
        }
    })
}

/// Most prompt tokens a job runs between two rounds of the running jobs' tokens, so that a long
/// prompt does not stop the other slots' answers while it runs (llama.cpp's default physical
/// batch is 512 too). On the CPU each piece reads the weights again: SmolLM2-135M's prefill of
/// a 2048-token prompt in pieces of 512 took as long as in one piece in q8 and 1-6 % longer in
/// f32 (three rounds each).
const PREFILL_CHUNK: usize = 512;

/// A generation job running on a slot, a step per round (see [`Running::parts`]): its turn, and what stands
/// between the generated text and the client (stop sequences, the indentation limit, the time
/// limit, text held back).
struct Running<'t> {
    slot: usize,
    prompt: Prompt,
    echo: bool,
    logprobs: Option<usize>,
    time_limit: Option<Duration>,
    events: mpsc::UnboundedSender<Event>,
    turn: Turn<'t>,
    filter: StopFilter,
    indent: IndentLimit,
    /// Where the indentation limit cut the generated text (bytes).
    cut: Option<usize>,
    /// Generated tokens not sent yet, each with the byte offset in the generated text where
    /// its own text starts and its entry with `logprobs`.
    pending: VecDeque<(usize, u32, Option<TokenInfo>)>,
    /// Bytes generated, and how many of them were released.
    raw: usize,
    sent: usize,
    /// When the first token came, whether the text has a line break, whether the time limit
    /// stopped it.
    first: Option<Instant>,
    line_break: bool,
    timed_out: bool,
}

/// Sends `text` with the pending tokens that start before byte `sent`; false once the client
/// has gone.
fn release(
    events: &mpsc::UnboundedSender<Event>,
    slot: usize,
    text: String,
    sent: usize,
    pending: &mut VecDeque<(usize, u32, Option<TokenInfo>)>,
) -> bool {
    let n = pending.iter().take_while(|(at, _, _)| *at < sent).count();
    let (mut ids, mut logprobs) = (Vec::with_capacity(n), Vec::new());
    for (_, id, info) in pending.drain(..n) {
        ids.push(id);
        logprobs.extend(info);
    }
    (text.is_empty() && ids.is_empty())
        || events
            .send(Event::Text {
                text,
                tokens: ids,
                logprobs,
                slot,
            })
            .is_ok()
}

impl<'t> Running<'t> {
    /// Starts `job`, whose prompt is `tokens`, on `session` (slot `slot`); its steps then run
    /// the prompt and generate. `None` if it failed (the client has been told).
    fn start(
        session: &mut Session,
        slot: usize,
        tok: &'t Tokenizer,
        job: Generate,
        tokens: &[u32],
    ) -> Option<Running<'t>> {
        let fail = |e: ApiError| {
            job.events.send(Event::Failed(e)).ok();
            None
        };
        let mut sampler = job.sampler;
        for (key, b) in job.logit_bias {
            match key {
                BiasKey::Id(id) => sampler.logit_bias.push((id, b)),
                BiasKey::Text(text) => match tok.encode(&text, false) {
                    Ok(ids) => sampler.logit_bias.extend(ids.into_iter().map(|id| (id, b))),
                    Err(e) => return fail(ApiError::bad_request(format!("logit_bias: {e}"))),
                },
            }
        }
        if let Err(e) = sampler
            .check()
            .and_then(|()| sampler.check_tokens(tok.vocab_size()))
        {
            return fail(ApiError::bad_request(e));
        }
        let params = GenerateParams {
            max_tokens: job.max_tokens.unwrap_or(session.capacity()),
            sampler,
            ctx: session.capacity(),
            stop_at_eos: !job.ignore_eos,
            logprobs: job.logprobs,
            prompt_logprobs: job.echo && job.logprobs.is_some(),
            prefill_chunk: Some(PREFILL_CHUNK),
            special: false,
        };
        if !job.cache_prompt {
            session.forget();
        }
        let turn = match session.start(tok, tokens, &params) {
            Ok(turn) => turn,
            Err(e) => return fail(engine_error(e)),
        };
        Some(Running {
            slot,
            prompt: job.prompt,
            echo: job.echo,
            logprobs: job.logprobs,
            time_limit: job.time_limit,
            events: job.events,
            turn,
            filter: StopFilter::new(job.stop),
            indent: IndentLimit::new(job.min_indent),
            cut: None,
            pending: VecDeque::new(),
            raw: 0,
            sent: 0,
            first: None,
            line_break: false,
            timed_out: false,
        })
    }

    /// The job's turn, and what takes each generated token (holding back text for stop
    /// sequences, applying the indentation and time limits, sending the rest); it returns
    /// false to stop.
    fn parts<'r>(&'r mut self, tok: &'r Tokenizer) -> (&'r mut Turn<'t>, OnText<'r>) {
        let Running {
            slot,
            turn,
            events,
            filter,
            indent,
            cut,
            pending,
            raw,
            sent,
            first,
            line_break,
            timed_out,
            time_limit,
            ..
        } = self;
        let on_text = move |id: u32, piece: &str, entry: Option<&TokenLogprob>| {
            let info = entry.map(|e| token_info(tok, e.token, Some(e.logprob), &e.top));
            pending.push_back((*raw, id, info));
            let keep = indent.push(piece).unwrap_or_else(|at| {
                *cut = Some(*raw + at);
                at
            });
            *raw += piece.len();
            *line_break |= piece.contains('\n');
            let text = filter.push(&piece[..keep]);
            *sent += text.len();
            let since = *first.get_or_insert_with(Instant::now);
            *timed_out = *line_break && time_limit.is_some_and(|t| since.elapsed() > t);
            release(events, *slot, text, *sent, pending)
                && !filter.hit()
                && !*timed_out
                && cut.is_none()
        };
        (turn, Box::new(on_text))
    }

    /// Sends the end of the job: the rest of its text and its summary, or its error.
    fn finish(mut self, session: &mut Session, tok: &Tokenizer, result: teal::Result<()>) {
        if let Err(e) = result {
            self.events.send(Event::Failed(engine_error(e))).ok();
            return;
        }
        let prompt_text = match &self.prompt {
            Prompt::Text(t) => t.clone(),
            _ => tok.decode(self.turn.prompt()).unwrap_or_default(),
        };
        let first = self.turn.prompt()[0];
        let g = session.finish(self.turn);
        if !self.filter.hit() {
            // Generation ended without a stop sequence: the held-back text and every
            // remaining token before the indentation cut go out.
            let rest = self.filter.finish();
            let upto = self.cut.unwrap_or(usize::MAX);
            if !release(&self.events, self.slot, rest, upto, &mut self.pending) {
                return;
            }
        }
        let stop = match (self.filter.stopping_word(), g.stop) {
            (Some(w), _) => StopType::Word(w.to_string()),
            (None, StopReason::Eos) => StopType::Eos,
            (None, _) => StopType::Limit,
        };
        let prompt_logprobs = match self.logprobs.is_some() && self.echo {
            true => std::iter::once(token_info(tok, first, None, &[]))
                .chain(
                    g.prompt_logprobs
                        .iter()
                        .map(|e| token_info(tok, e.token, Some(e.logprob), &e.top)),
                )
                .collect(),
            false => Vec::new(),
        };
        self.events
            .send(Event::Done(Summary {
                stop,
                slot: self.slot,
                prompt_tokens: g.prompt_tokens,
                cached_tokens: g.cached_tokens,
                completion_tokens: g.tokens.len(),
                prompt_secs: g.prompt_secs,
                decode_tokens: g.decode_tokens,
                decode_secs: g.decode_secs,
                prompt_text,
                prompt_logprobs,
            }))
            .ok();
    }
}

/// A failed generation's answer: the request's fault (400) or the engine's (500).
fn engine_error(e: teal::Error) -> ApiError {
    match e {
        teal::Error::EmptyPrompt
        | teal::Error::ContextOverflow { .. }
        | teal::Error::Invalid(_) => ApiError::bad_request(e.to_string()),
        e => ApiError::internal(e.to_string()),
    }
}

/// A token's entry for an answer: its text and bytes, log-probability and alternatives.
fn token_info(tok: &Tokenizer, t: u32, logprob: Option<f32>, top: &[(u32, f32)]) -> TokenInfo {
    TokenInfo {
        id: t,
        text: tok.token_str(t).unwrap_or_default(),
        bytes: tok.piece_bytes(t),
        logprob,
        top: top
            .iter()
            .map(|&(a, lp)| {
                (
                    a,
                    tok.token_str(a).unwrap_or_default(),
                    tok.piece_bytes(a),
                    lp,
                )
            })
            .collect(),
    }
}

#[derive(Clone)]
struct AppState {
    jobs: std::sync::mpsc::Sender<Job>,
    model: Arc<ModelInfo>,
    next_id: Arc<AtomicU64>,
    /// With `--metrics`.
    metrics: Option<Arc<Metrics>>,
    /// When the routes were made (the model loaded), in Unix seconds: `/v1/models`' `created`.
    created: u64,
}

impl AppState {
    /// Counts a finished answer.
    fn record(&self, s: &Summary) {
        if let Some(m) = &self.metrics {
            m.record(s);
        }
    }
}

/// Who may use the server, and what it reports.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Every request but `/health` and `/v1/models` (and their aliases `/v1/health` and
    /// `/models`, and `/v1/models/{id}`) must carry one of these, as
    /// `Authorization: Bearer KEY` or `X-Api-Key: KEY` (status 401 otherwise), as llama.cpp's
    /// `--api-key`; none: no check.
    pub api_keys: Vec<String>,
    /// Web pages from these origins may call the server from a browser (CORS; `*`: any);
    /// none: no CORS headers, so browsers keep other sites' pages out.
    pub cors_origins: Vec<String>,
    /// Serve `GET /metrics` (Prometheus' format, llama.cpp's names).
    pub metrics: bool,
}

/// The HTTP routes, sending jobs to the engine through `jobs`, as `opts` says.
pub fn router(jobs: std::sync::mpsc::Sender<Job>, model: ModelInfo, opts: ServeOptions) -> Router {
    let state = AppState {
        jobs,
        model: Arc::new(model),
        next_id: Arc::new(AtomicU64::new(1)),
        metrics: opts.metrics.then(Arc::default),
        created: unix_secs(),
    };
    Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/v1/models/{*id}", get(model_by_id))
        .route("/models/{*id}", get(model_by_id))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/completion", post(native::completion))
        .route("/completions", post(native::completion))
        .route("/infill", post(native::infill))
        .route("/apply-template", post(native::apply_template))
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(native::embeddings))
        .route("/embedding", post(native::embeddings))
        .route("/props", get(native::props))
        .route("/metrics", get(metrics))
        .route("/slots", get(slots))
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: format!("{method} is not allowed on {}", uri.path()),
            }
        })
        .fallback(|uri: Uri| async move {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("no such endpoint: {uri}"),
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(opts.api_keys),
            require_key,
        ))
        // Outside the key check: a browser's preflight request carries no key.
        .layer(cors(&opts.cors_origins))
        .with_state(state)
}

/// The CORS layer for these origins (`*`: any; none: no CORS headers).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| axum::http::HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers(Any)
}

/// [`router`]'s key check.
async fn require_key(
    State(keys): State<Arc<Vec<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match key_error(&keys, &req) {
        None => next.run(req).await,
        Some(e) => e.into_response(),
    }
}

/// Why `req` may not pass [`router`]'s key check, if it may not.
fn key_error(keys: &[String], req: &axum::extract::Request) -> Option<ApiError> {
    let path = req.uri().path();
    let public = matches!(path, "/health" | "/v1/health" | "/v1/models" | "/models")
        || path.starts_with("/v1/models/")
        || path.starts_with("/models/");
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let given = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("x-api-key"));
    if keys.is_empty() || public || given.is_some_and(|k| keys.iter().any(|x| x == k)) {
        return None;
    }
    Some(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: match given {
            None => "this server needs an API key: send `Authorization: Bearer KEY`".into(),
            Some(_) => "invalid API key".into(),
        },
    })
}

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("starting the HTTP runtime: {0}")]
    Runtime(std::io::Error),
}

/// Listens on `addr` (`host:port`) and serves until Ctrl-C, which ends the answers in progress:
/// HTTP on one tokio thread, the engine on the calling thread with one slot per decoder of
/// `slots` ([`run_engine`]).
/// `on_listening` gets the bound address once requests can come.
pub fn serve(
    addr: &str,
    slots: Vec<&mut dyn Decoder>,
    tok: &Tokenizer,
    model: ModelInfo,
    opts: ServeOptions,
    on_listening: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let (listener, bound) = rt
        .block_on(async {
            let l = tokio::net::TcpListener::bind(addr).await?;
            let bound = l.local_addr()?;
            Ok((l, bound))
        })
        .map_err(|source: std::io::Error| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let (tx, rx) = std::sync::mpsc::channel();
    let app = router(tx.clone(), model, opts);
    // On Ctrl-C the server takes no more connections and the engine's loop below ends at its
    // next round, rather than once every answer in progress is done.
    rt.spawn(async move {
        let stop = async move {
            tokio::signal::ctrl_c().await.ok();
            tx.send(Job::Shutdown).ok();
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .ok();
    });
    on_listening(bound);
    run_engine(slots, tok, rx);
    Ok(())
}

/// A request's body. One that does not arrive whole (over the size limit: 413) gets the usual
/// JSON error answer rather than axum's plain text.
struct RequestBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(RequestBody)
            .map_err(|e| ApiError {
                status: e.status(),
                message: e.body_text(),
            })
    }
}

/// Sends a tokenizer request to the engine and answers with its result.
async fn tokenizer_answer(st: &AppState, job: TokenizerJob) -> Response {
    match tokenizer_value(st, job).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The engine's result for a tokenizer request.
async fn tokenizer_value(st: &AppState, job: TokenizerJob) -> Result<Value, ApiError> {
    let (reply, rx) = oneshot::channel();
    if st.jobs.send(Job::Tokenizer(job, reply)).is_err() {
        return Err(ApiError::engine_stopped());
    }
    rx.await.unwrap_or_else(|_| Err(ApiError::engine_dropped()))
}

/// `GET /slots`: each slot's state ([`Job::Slots`]).
async fn slots(State(st): State<AppState>) -> Response {
    let (reply, rx) = oneshot::channel();
    if st.jobs.send(Job::Slots(reply)).is_err() {
        return ApiError::engine_stopped().into_response();
    }
    match rx.await {
        Ok(v) => Json(v).into_response(),
        Err(_) => ApiError::engine_dropped().into_response(),
    }
}

async fn tokenizer_info(State(st): State<AppState>) -> Response {
    tokenizer_answer(&st, TokenizerJob::Info).await
}

/// `/tokenize`'s body: vLLM's field names or llama.cpp's.
#[derive(Deserialize)]
struct TokenizeRequest {
    #[serde(alias = "content")]
    prompt: String,
    #[serde(alias = "add_special")]
    add_special_tokens: Option<bool>,
    /// llama.cpp's: each token as `{"id", "piece"}`, the piece a string, or its bytes where it
    /// is not whole UTF-8.
    with_pieces: Option<bool>,
    /// llama.cpp's: control tokens written in the text are those tokens (default), or text.
    parse_special: Option<bool>,
}

async fn tokenize(State(st): State<AppState>, RequestBody(body): RequestBody) -> Response {
    match parse::<TokenizeRequest>(&body) {
        Ok(r) => {
            let job = TokenizerJob::Encode {
                text: r.prompt,
                add_special: r.add_special_tokens.unwrap_or(false),
                parse_special: r.parse_special.unwrap_or(true),
                with_pieces: r.with_pieces.unwrap_or(false),
            };
            tokenizer_answer(&st, job).await
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(State(st): State<AppState>, RequestBody(body): RequestBody) -> Response {
    match parse::<DetokenizeRequest>(&body) {
        Ok(r) => tokenizer_answer(&st, TokenizerJob::Decode(r.tokens)).await,
        Err(e) => e.into_response(),
    }
}

/// `/v1/embeddings`: OpenAI's request (`input`: a text, texts, token ids or lists of them,
/// and llama.cpp's ids and texts in one input; llama.cpp's `content` too) and answer,
/// `encoding_format` `float` or `base64` (little-endian f32, what OpenAI's Python client asks
/// for).
#[derive(Deserialize)]
struct EmbeddingRequest {
    #[serde(alias = "content")]
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

/// The request's inputs run by the engine: per input, its vector and its number of tokens.
async fn embed(st: &AppState, r: &EmbeddingRequest) -> EmbedResult {
    let (inputs, _) = native::prompts(&r.input, "input")?;
    let (reply, rx) = oneshot::channel();
    if st.jobs.send(Job::Embed(inputs, reply)).is_err() {
        return Err(ApiError::engine_stopped());
    }
    rx.await.unwrap_or_else(|_| Err(ApiError::engine_dropped()))
}

async fn embeddings(State(st): State<AppState>, RequestBody(body): RequestBody) -> Response {
    let r = match parse::<EmbeddingRequest>(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return ApiError::bad_request(format!(
                "encoding_format: '{other}' is not supported (float or base64)"
            ))
            .into_response()
        }
    };
    let vectors = match embed(&st, &r).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let dims = vectors.first().map_or(0, |(v, _)| v.len());
    if r.dimensions.is_some_and(|d| d != dims) {
        return ApiError::bad_request(format!(
            "dimensions: this model's embeddings have {dims} (no other size is supported)"
        ))
        .into_response();
    }
    let tokens: usize = vectors.iter().map(|(_, n)| n).sum();
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, (v, _))| {
            let embedding = if base64 {
                use base64::Engine;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": st.model.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// `GET /metrics`: Prometheus' text format; 501 without `--metrics`, as llama.cpp's.
async fn metrics(State(st): State<AppState>) -> Response {
    let Some(m) = &st.metrics else {
        return ApiError {
            status: StatusCode::NOT_IMPLEMENTED,
            message: "metrics are off: start teal serve with --metrics".into(),
        }
        .into_response();
    };
    let (reply, rx) = oneshot::channel();
    if st.jobs.send(Job::Load(reply)).is_err() {
        return ApiError::engine_stopped().into_response();
    }
    match rx.await {
        Ok(load) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            m.render(load),
        )
            .into_response(),
        Err(_) => ApiError::engine_dropped().into_response(),
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(st): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&st)]}))
}

/// `GET /v1/models/{id}` (OpenAI's retrieve, which clients call to check that a model is
/// there): the model `/v1/models` lists, by its id (percent-decoded: OpenAI's Python client
/// encodes a `/` in it); 404 for any other id.
async fn model_by_id(
    State(st): State<AppState>,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match id {
        Ok(axum::extract::Path(id)) => id,
        Err(e) => return ApiError::bad_request(format!("model id: {e}")).into_response(),
    };
    if id != st.model.id {
        return ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no model '{id}' here: this server serves '{}'", st.model.id),
        }
        .into_response();
    }
    Json(model_object(&st)).into_response()
}

/// The served model as `/v1/models` lists it.
fn model_object(st: &AppState) -> Value {
    let m = &st.model;
    json!({"id": m.id, "object": "model", "created": st.created, "owned_by": "teal", "context_length": m.ctx, "teal": m.meta})
}

/// Now, in seconds since the Unix epoch.
fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A string or a list of strings (OpenAI's `prompt` and `stop`).
#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The options both endpoints take, read from the request's object beside its own fields.
/// Other OpenAI fields are accepted and ignored.
#[derive(Deserialize)]
struct Options {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// llama.cpp's: 0 or less for no top-k cut.
    top_k: Option<i64>,
    /// llama.cpp's: -1 for a random seed.
    seed: Option<i64>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    /// llama.cpp's: -1 for the whole context.
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// llama.cpp's: generate past end tokens (none is sampled).
    ignore_eos: Option<bool>,
    stop: Option<OneOrMany>,
    n: Option<usize>,
    cache_prompt: Option<bool>,
    logit_bias: Option<Value>,
    response_format: Option<ResponseFormat>,
    /// A GBNF grammar (llama.cpp's extension, also in its OpenAI endpoints).
    grammar: Option<String>,
    /// A JSON Schema the answer must meet (llama.cpp's extension).
    json_schema: Option<Value>,
}

/// OpenAI's `stream_options`: with `include_usage`, a last chunk before `[DONE]` carries the
/// usage (and no choices).
#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}` (JSON mode;
/// llama.cpp also takes a `schema` in it) or `{"type": "json_schema", "json_schema": {"name":
/// ..., "schema": {...}}}` (structured outputs).
#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    schema: Option<Value>,
    json_schema: Option<Value>,
}

/// The constraint the request's `grammar`, `json_schema` and `response_format` ask for: JSON
/// mode where any JSON object will do, else a grammar (a schema is converted by
/// [`teal::json_schema::schema_to_gbnf`]); at most one of them.
fn constraint(o: &Options) -> Result<(bool, Option<Arc<Grammar>>), ApiError> {
    let bad = |m: String| ApiError::bad_request(m);
    /// What one field asks for.
    enum Ask<'a> {
        Gbnf(&'a str),
        Schema(&'a Value),
        AnyObject,
    }
    let mut asked: Vec<(&str, Ask)> = Vec::new();
    if let Some(g) = o.grammar.as_deref().filter(|g| !g.trim().is_empty()) {
        asked.push(("grammar", Ask::Gbnf(g)));
    }
    if let Some(v) = o.json_schema.as_ref().filter(|v| !v.is_null()) {
        asked.push(("json_schema", Ask::Schema(v)));
    }
    if let Some(f) = &o.response_format {
        match (f.kind.as_str(), &f.schema, &f.json_schema) {
            ("text", _, _) => {}
            ("json_object", None, _) => asked.push(("response_format", Ask::AnyObject)),
            ("json_object", Some(v), _) => asked.push(("response_format.schema", Ask::Schema(v))),
            ("json_schema", _, Some(js)) => match js.get("schema") {
                Some(v) => asked.push(("response_format.json_schema.schema", Ask::Schema(v))),
                None => return Err(bad("response_format.json_schema: no 'schema' in it".into())),
            },
            ("json_schema", _, None) => {
                return Err(bad(
                    "response_format: type json_schema needs a 'json_schema' object".into(),
                ))
            }
            (other, _, _) => {
                return Err(bad(format!(
                    "response_format: type '{other}' is not supported (text, json_object or \
                     json_schema)"
                )))
            }
        }
    }
    if asked.len() > 1 {
        let names: Vec<&str> = asked.iter().map(|(n, _)| *n).collect();
        return Err(bad(format!(
            "{}: give only one of these",
            names.join(" and ")
        )));
    }
    let Some((name, ask)) = asked.pop() else {
        return Ok((false, None));
    };
    let text = match ask {
        Ask::AnyObject => return Ok((true, None)),
        Ask::Schema(v) if *v == json!({}) || *v == json!({"type": "object"}) => {
            return Ok((true, None))
        }
        Ask::Schema(v) => {
            teal::json_schema::schema_to_gbnf(v).map_err(|e| bad(format!("{name}: {e}")))?
        }
        Ask::Gbnf(g) => g.to_string(),
    };
    let g = Grammar::parse(&text).map_err(|e| bad(format!("{name}: {e}")))?;
    Ok((false, Some(Arc::new(g))))
}

/// A completion's prompt: text or token ids, one or a list of them.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids or a list of such lists"
)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    /// Alternatives per token (0: the chosen token's log-probability only).
    logprobs: Option<usize>,
    echo: Option<bool>,
    /// The text after the completion: the prompt is then the text before it, and the model
    /// fills in the middle (OpenAI's insertion field; needs the model's FIM tokens).
    suffix: Option<String>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    /// Functions the model may call (OpenAI's `tools`; see [`teal::tools`]).
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    /// Several calls in one answer (on by default, as OpenAI's).
    parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    /// May be null in an assistant message with tool calls.
    content: Option<Content>,
    tool_calls: Option<Vec<RequestToolCall>>,
    tool_call_id: Option<String>,
}

/// An assistant message's tool call as OpenAI writes it (the arguments as JSON text).
#[derive(Deserialize)]
struct RequestToolCall {
    #[serde(default)]
    id: String,
    function: RequestFunction,
}

#[derive(Deserialize)]
struct RequestFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// A message's content: a string, or a list of parts of which only text is supported.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// The most alternatives per token a request may ask for (OpenAI's chat limit).
const MAX_LOGPROBS: usize = 20;

/// The most choices per prompt (`n`); they are generated one after another.
const MAX_CHOICES: usize = 16;

/// What a checked request asks of the engine, less the channel: one job per prompt.
struct Request {
    prompts: Vec<Prompt>,
    /// Choices per prompt: choice j samples with seed + j (the prompt is cached after the
    /// first).
    n: usize,
    logprobs: Option<usize>,
    echo: bool,
    max_tokens: Option<usize>,
    sampler: SamplerConfig,
    stop: Vec<String>,
    cache_prompt: bool,
    stream: bool,
    /// Streamed: a last chunk with the usage (OpenAI's `stream_options.include_usage`).
    include_usage: bool,
    ignore_eos: bool,
    time_limit: Option<Duration>,
    min_indent: usize,
    slot: Option<usize>,
    logit_bias: Vec<(BiasKey, f32)>,
    /// The answer's text is read for calls of these tools ([`teal::tools::parse_calls`]).
    tools: Vec<String>,
    /// Several calls in one answer (`parallel_tool_calls`), else the first one only.
    parallel_tool_calls: bool,
}

impl Request {
    /// Cuts an infill prompt to fit the context `ctx` with room for the answer: `max_tokens`
    /// (at most half the context), a quarter of the context without a limit.
    fn fit_infill(&mut self, ctx: usize) {
        if let Some(Prompt::Infill(f)) = self.prompts.first_mut() {
            let answer = self.max_tokens.map_or(ctx / 4, |n| n.clamp(1, ctx / 2));
            f.budget = Some(ctx.saturating_sub(answer).max(1));
        }
    }
}

/// `logit_bias`: OpenAI's `{"id": bias}` or llama.cpp's `[[id, bias], ...]`, where `false`
/// stands for never (-inf) and a token text may take the place of an id.
fn parse_logit_bias(v: Value) -> Result<Vec<(BiasKey, f32)>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "logit_bias: expected {\"token id or text\": bias} or [[token id or text, bias or \
             false], ...]",
        )
    };
    let bias = |b: &Value| match b {
        Value::Bool(false) => Some(f32::NEG_INFINITY),
        b => b.as_f64().map(|b| b as f32),
    };
    let key = |k: &Value| match k {
        Value::String(s) => Some(match s.parse::<u32>() {
            Ok(id) => BiasKey::Id(id),
            Err(_) => BiasKey::Text(s.clone()),
        }),
        k => k
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .map(BiasKey::Id),
    };
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, b)| Some((key(&Value::String(k.clone()))?, bias(b)?)))
            .collect::<Option<_>>()
            .ok_or_else(bad),
        Value::Array(a) => a
            .iter()
            .map(|e| match e.as_array().map(Vec::as_slice) {
                Some([k, b]) => Some((key(k)?, bias(b)?)),
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// Whose API a request follows, where their rules differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    /// OpenAI's completions: at least one token unless echoing the prompt; at most four stop
    /// sequences.
    Completions,
    /// OpenAI's chat completions: as its completions.
    Chat,
    /// `n_predict` 0 runs the prompt only; any number of stop sequences.
    LlamaCpp,
}

impl Api {
    /// The request field names of the choices per prompt and the alternatives per token,
    /// for error messages.
    fn fields(self) -> (&'static str, &'static str) {
        match self {
            Api::Completions => ("n", "logprobs"),
            Api::Chat => ("n", "top_logprobs"),
            Api::LlamaCpp => ("n_cmpl", "n_probs"),
        }
    }
}

/// Defaults as llama.cpp's server (and `teal run`): [`SamplerConfig::LLAMA_CPP`] (temperature
/// 0.8, top-k 40, top-p 0.95, min-p 0.05, no penalties, over the last 64 tokens when set).
fn check_options(
    api: Api,
    o: Options,
    prompts: Vec<Prompt>,
    logprobs: Option<usize>,
    echo: bool,
) -> Result<Request, ApiError> {
    let (n_field, logprobs_field) = api.fields();
    let (json_object, grammar) = constraint(&o)?;
    let n = o.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::bad_request(format!(
            "{n_field} = {n}: from 1 to {MAX_CHOICES} choices per prompt"
        )));
    }
    if prompts.is_empty() {
        return Err(ApiError::bad_request("prompt: the list is empty"));
    }
    // An empty list of token ids in a list of prompts is refused before the others run (an
    // empty text is the engine's to judge: with a BOS token it is not empty).
    let empty = |p: &Prompt| matches!(p, Prompt::Tokens(ids) if ids.is_empty());
    if let Some(i) = prompts.iter().position(empty).filter(|_| prompts.len() > 1) {
        return Err(ApiError::bad_request(format!("prompt[{i}] is empty")));
    }
    let stream = o.stream.unwrap_or(false);
    if stream && n > 1 {
        return Err(ApiError::bad_request(format!(
            "{n_field} = {n}: one choice per streamed request"
        )));
    }
    if stream && prompts.len() > 1 {
        return Err(ApiError::bad_request(format!(
            "stream: one prompt per streamed request (got {})",
            prompts.len()
        )));
    }
    if let Some(k) = logprobs {
        if k > MAX_LOGPROBS {
            return Err(ApiError::bad_request(format!(
                "{logprobs_field} = {k}: at most {MAX_LOGPROBS} alternatives per token"
            )));
        }
    }
    if echo && stream {
        return Err(ApiError::bad_request("echo: not available with stream"));
    }
    let (max_tokens, max_tokens_field) = match (o.max_tokens, o.max_completion_tokens) {
        (Some(n), _) => (Some(n), "max_tokens"),
        (None, n) => (n, "max_completion_tokens"),
    };
    if max_tokens == Some(0) && !echo && api != Api::LlamaCpp {
        let echo_note = if api == Api::Completions {
            " (0 only with echo)"
        } else {
            ""
        };
        return Err(ApiError::bad_request(format!(
            "{max_tokens_field} must be at least 1{echo_note}"
        )));
    }
    let stop = o.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_request("stop: a sequence is empty"));
    }
    if stop.len() > 4 && api != Api::LlamaCpp {
        return Err(ApiError::bad_request("stop: at most 4 sequences"));
    }
    let seed = match o.seed {
        None | Some(-1) => teal::sampler::random_seed(),
        Some(s) => u64::try_from(s).map_err(|_| {
            ApiError::bad_request(format!("seed = {s}: must be >= 0, or -1 for a random seed"))
        })?,
    };
    let d = SamplerConfig::LLAMA_CPP;
    let repeat_last_n = match o.repeat_last_n {
        None => d.penalties.last_n,
        Some(-1) => usize::MAX,
        Some(n) => usize::try_from(n).map_err(|_| {
            ApiError::bad_request(format!(
                "repeat_last_n = {n}: must be >= 0, or -1 for the whole context"
            ))
        })?,
    };
    let sampler = SamplerConfig {
        temperature: o.temperature.unwrap_or(d.temperature),
        top_k: o.top_k.map_or(d.top_k, |k| usize::try_from(k).unwrap_or(0)),
        top_p: o.top_p.unwrap_or(d.top_p),
        min_p: o.min_p.unwrap_or(d.min_p),
        seed,
        penalties: Penalties {
            last_n: repeat_last_n,
            repeat: o.repeat_penalty.unwrap_or(d.penalties.repeat),
            presence: o.presence_penalty.unwrap_or(d.penalties.presence),
            frequency: o.frequency_penalty.unwrap_or(d.penalties.frequency),
        },
        logit_bias: Vec::new(),
        json_object,
        grammar,
        infill: false,
    };
    // Checked with the sampler's other settings once the engine has tokenized the texts.
    let logit_bias = match o.logit_bias {
        None => Vec::new(),
        Some(v) => parse_logit_bias(v)?,
    };
    sampler.check().map_err(ApiError::bad_request)?;
    Ok(Request {
        prompts,
        n,
        logprobs,
        echo,
        max_tokens,
        sampler,
        stop,
        cache_prompt: o.cache_prompt.unwrap_or(true),
        stream,
        include_usage: o.stream_options.and_then(|s| s.include_usage) == Some(true),
        ignore_eos: o.ignore_eos.unwrap_or(false),
        time_limit: None,
        min_indent: 0,
        slot: None,
        logit_bias,
        tools: Vec::new(),
        parallel_tool_calls: true,
    })
}

/// A request body's JSON.
fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON in the request body: {e}")))
}

/// `T` read from a request's JSON; a value of the wrong type is an error that names its field
/// (`max_tokens: invalid type: string "ten", expected usize`).
fn from_json<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v)
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_json(&json_body(body)?)
}

/// A request's own fields `R` and the options `O` it shares with other endpoints, both read
/// from its JSON object (not with `#[serde(flatten)]`, whose errors do not name the field).
fn parse_with_options<R, O>(body: &[u8]) -> Result<(R, O), ApiError>
where
    R: serde::de::DeserializeOwned,
    O: serde::de::DeserializeOwned,
{
    let v = json_body(body)?;
    Ok((from_json(&v)?, from_json(&v)?))
}

/// A `/v1/completions` request on a server with context `ctx`.
fn completion_request(body: &[u8], ctx: usize) -> Result<Request, ApiError> {
    let (r, options): (CompletionRequest, Options) = parse_with_options(body)?;
    let echo = r.echo.unwrap_or(false);
    let prompts = match (r.prompt, r.suffix) {
        (PromptField::Text(prefix), Some(suffix)) => {
            if echo {
                return Err(ApiError::bad_request("echo: not available with suffix"));
            }
            vec![Prompt::Infill(Infill::new(prefix, suffix))]
        }
        (_, Some(_)) => {
            return Err(ApiError::bad_request(
                "suffix: needs one text prompt (the text before the completion)",
            ))
        }
        (PromptField::Text(t), None) => vec![Prompt::Text(t)],
        (PromptField::Texts(v), None) => v.into_iter().map(Prompt::Text).collect(),
        (PromptField::Ids(ids), None) => vec![Prompt::Tokens(ids)],
        (PromptField::IdLists(v), None) => v.into_iter().map(Prompt::Tokens).collect(),
    };
    let mut req = check_options(Api::Completions, options, prompts, r.logprobs, echo)?;
    req.fit_infill(ctx);
    Ok(req)
}

/// A chat's messages, of text only (a message's text parts joined with line breaks, as
/// llama.cpp joins them). OpenAI's `developer` role is the `system` one; other roles go to the
/// chat template as they are, as llama.cpp passes them (Llama 3.1's `ipython`, the older
/// `function`). A `tool` message answers a call: it follows an assistant message with
/// `tool_calls` (other results between them), as OpenAI requires.
fn chat_messages(messages: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "developer" => "system",
                r => r,
            };
            let content = match m.content {
                None if m.tool_calls.is_none() => {
                    return Err(ApiError::bad_request(format!(
                        "messages[{i}]: expected 'content' or 'tool_calls'"
                    )))
                }
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        (kind, _) => Err(ApiError::bad_request(format!(
                            "messages[{i}]: content parts of type '{kind}' are not supported (text only)"
                        ))),
                    })
                    .collect::<Result<Vec<String>, ApiError>>()?
                    .join("\n"),
            };
            let mut msg = Message::new(role, content);
            msg.tool_call_id = m.tool_call_id;
            for (j, c) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
                // OpenAI sends the arguments as JSON text; the templates want the object.
                let arguments = match c.function.arguments {
                    Value::String(t) => serde_json::from_str(&t).map_err(|e| {
                        ApiError::bad_request(format!(
                            "messages[{i}].tool_calls[{j}].function.arguments: not valid JSON ({e})"
                        ))
                    })?,
                    v => v,
                };
                msg.tool_calls.push(ToolCall {
                    id: c.id,
                    kind: "function".into(),
                    function: FunctionCall {
                        name: c.function.name,
                        arguments,
                    },
                });
            }
            Ok(msg)
        })
        .collect::<Result<Vec<Message>, ApiError>>()?;
    for (i, _) in messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "tool")
    {
        let asked = messages[..i].iter().rev().find(|m| m.role != "tool");
        if !asked.is_some_and(|m| m.role == "assistant" && !m.tool_calls.is_empty()) {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: a 'tool' message must follow an assistant message with \
                 'tool_calls' (the calls it answers)"
            )));
        }
    }
    Ok(messages)
}

fn chat_request(body: &[u8]) -> Result<Request, ApiError> {
    let (r, options): (ChatRequest, Options) = parse_with_options(body)?;
    if r.messages.is_empty() {
        return Err(ApiError::bad_request("messages: the list is empty"));
    }
    let messages = chat_messages(r.messages)?;
    let logprobs = match (r.logprobs, r.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, None) => None,
        (_, Some(_)) => {
            return Err(ApiError::bad_request(
                "top_logprobs: needs logprobs set to true",
            ))
        }
    };
    let tools = teal::tools::parse_tools(r.tools.as_deref().unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let choice = teal::tools::parse_tool_choice(r.tool_choice.as_ref(), &tools)
        .map_err(ApiError::bad_request)?;
    let prompt = match choice {
        ToolChoice::None => Prompt::Chat(messages),
        _ => Prompt::ToolChat {
            messages,
            tools: r.tools.unwrap_or_default(),
        },
    };
    // The calls' grammar: whole for a required or named call; lazy for auto (the answer may
    // be text, but a call it starts must be well-formed), unless the request has its own.
    let (only, lazy) = match &choice {
        ToolChoice::Required => (None, false),
        ToolChoice::Function(name) => (Some(name.as_str()), false),
        ToolChoice::Auto | ToolChoice::None => (None, true),
    };
    let mut req = check_options(Api::Chat, options, vec![prompt], logprobs, false)?;
    let own = req.sampler.grammar.is_some() || req.sampler.json_object;
    if own && !lazy {
        return Err(ApiError::bad_request(
            "tool_choice: a required tool call and a grammar or response format: give one",
        ));
    }
    let parallel = r.parallel_tool_calls.unwrap_or(true);
    if choice != ToolChoice::None && !own {
        let g = teal::tools::call_grammar(&tools, only, parallel, lazy)
            .map_err(ApiError::bad_request)?;
        req.sampler.grammar = Some(Arc::new(g));
    }
    if choice != ToolChoice::None {
        req.tools = tools.into_iter().map(|t| t.name).collect();
        req.parallel_tool_calls = parallel;
    }
    Ok(req)
}

/// Which endpoint an answer is written for.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

/// Fixed parts of one answer: id, time, model and endpoint.
#[derive(Clone)]
struct Answer {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    /// A chat whose answers are read for calls of these tools.
    tools: Vec<String>,
    /// Several calls in one answer, else the first one only (a request's own grammar may
    /// give more).
    parallel_tool_calls: bool,
}

impl Answer {
    fn new(st: &AppState, kind: Kind) -> Answer {
        let n = st.next_id.fetch_add(1, Ordering::Relaxed);
        Answer {
            kind,
            id: match kind {
                Kind::Completion => format!("cmpl-{n}"),
                Kind::Chat => format!("chatcmpl-{n}"),
            },
            created: unix_secs(),
            model: st.model.id.clone(),
            tools: Vec::new(),
            parallel_tool_calls: true,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The whole answer of a request without streaming: `n` choices per prompt, each its text
    /// (after the prompt's with `echo`), with `logprobs` its entries (after the prompt's with
    /// `echo`), and its summary.
    fn full(&self, results: &[Collected], n: usize, echo: bool, logprobs: bool) -> Value {
        let choices = results
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (text, s) = (&c.text, &c.summary);
                let lp = logprobs.then(|| [s.prompt_logprobs.as_slice(), &c.entries].concat());
                match self.kind {
                    Kind::Completion => json!({
                        "index": i,
                        "text": if echo { format!("{}{text}", s.prompt_text) } else { text.clone() },
                        "logprobs": lp.as_deref().map(|t| completion_logprobs(t, 0)),
                        "finish_reason": s.stop.finish_reason(),
                    }),
                    Kind::Chat => {
                        let (message, reason) = self.message(text, s);
                        json!({
                            "index": i,
                            "message": message,
                            "logprobs": lp.as_deref().map(chat_logprobs),
                            "finish_reason": reason,
                        })
                    }
                }
            })
            .collect();
        let summaries = || results.iter().map(|c| &c.summary);
        let mut v = self.envelope(false, choices);
        v["usage"] = usage(summaries(), n);
        v["timings"] = timings(summaries());
        v
    }

    /// A chat answer's message and `finish_reason`: with tools, the calls in `text` become
    /// `tool_calls` (ids from [`call_id`]) and the reason `tool_calls`, or
    /// `length` where the token limit cut the answer (as llama.cpp's server: a call cut short
    /// is dropped, the whole ones before it are kept, and the client learns it was cut).
    fn message(&self, text: &str, s: &Summary) -> (Value, &'static str) {
        let names: Vec<&str> = self.tools.iter().map(String::as_str).collect();
        let calls = match names.is_empty() {
            true => None,
            false => teal::tools::parse_calls(text, &names),
        };
        match calls {
            None => (
                json!({"role": "assistant", "content": text}),
                s.stop.finish_reason(),
            ),
            Some((content, calls)) => {
                let keep = if self.parallel_tool_calls {
                    calls.len()
                } else {
                    1
                };
                let calls: Vec<Value> = calls
                    .iter()
                    .take(keep)
                    .map(|c| {
                        json!({
                            "id": call_id(),
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        })
                    })
                    .collect();
                let content = (!content.is_empty()).then_some(content);
                (
                    json!({"role": "assistant", "content": content, "tool_calls": calls}),
                    call_reason(s),
                )
            }
        }
    }

    /// The chunks of a streamed chat answer with tools for what [`CallStream`] read of a piece
    /// of it, as OpenAI streams them: content as a `content` delta; a call's start as a
    /// `tool_calls` delta with its index, a new id, its type and name and empty arguments; the
    /// next piece of its arguments as one with its index and that piece (calls after the
    /// first left out without `parallel_tool_calls`). With `logprobs`, the first chunk carries
    /// the entries `held` has, taking them.
    fn call_chunks(
        &self,
        deltas: Vec<Delta>,
        logprobs: bool,
        held: &mut Vec<TokenInfo>,
    ) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for d in deltas {
            let delta = match d {
                Delta::Call { index, .. } | Delta::Arguments { index, .. }
                    if index > 0 && !self.parallel_tool_calls =>
                {
                    continue
                }
                Delta::Content(text) => json!({ "content": text }),
                Delta::Call { index, name } => json!({"tool_calls": [{
                    "index": index, "id": call_id(), "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]}),
                Delta::Arguments { index, text } => {
                    json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
                }
            };
            let lp = logprobs.then(|| chat_logprobs(&std::mem::take(held)));
            let choice = json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": null});
            out.push(sse_json(self.envelope(true, vec![choice])));
        }
        out
    }

    /// A streamed chunk: a piece of text, or with `finish` the one with the finish reason and
    /// llama.cpp's `timings`. With `logprobs`, the entries of the piece's tokens and the
    /// characters of text streamed before it (where the completion's `text_offset` counts
    /// from).
    fn chunk(
        &self,
        text: Option<String>,
        logprobs: Option<(&[TokenInfo], usize)>,
        finish: Option<&Summary>,
    ) -> Value {
        let reason = finish.map(|s| s.stop.finish_reason());
        let choice = match self.kind {
            Kind::Completion => {
                let lp = logprobs.map(|(t, at)| completion_logprobs(t, at));
                json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": lp, "finish_reason": reason})
            }
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    // The first chunk, naming the role: its content is OpenAI's "" for a text
                    // answer, but null where the answer may be tool calls (as OpenAI and
                    // llama.cpp stream calls), so that a client that accumulates the deltas
                    // (OpenAI's SDK) has null content for calls only, as the whole answer.
                    None if finish.is_none() => {
                        let content = match self.tools.is_empty() {
                            true => json!(""),
                            false => Value::Null,
                        };
                        json!({"role": "assistant", "content": content})
                    }
                    None => json!({}),
                };
                let lp = logprobs.map(|(t, _)| chat_logprobs(t));
                json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason})
            }
        };
        let mut v = self.envelope(true, vec![choice]);
        if let Some(s) = finish {
            v["timings"] = timings([s]);
        }
        v
    }

    /// The chunk after the last one with `stream_options.include_usage`: no choices, the usage.
    fn usage_chunk(&self, s: &Summary) -> Value {
        let mut v = self.envelope(true, Vec::new());
        v["usage"] = usage([s], 1);
        v
    }
}

/// The `finish_reason` of an answer with tool calls: `tool_calls`, or `length` where the token
/// limit cut it.
fn call_reason(s: &Summary) -> &'static str {
    match s.stop {
        StopType::Limit => s.stop.finish_reason(),
        StopType::Eos | StopType::Word(_) => "tool_calls",
    }
}

/// A tool call's id: `call_` and 24 random hex digits, as OpenAI's are random. Clients key a
/// call's result by it, so it must not repeat in a conversation, which may outlive the server
/// (answer ids count from 1 again after a restart) or span several servers.
fn call_id() -> String {
    let r = teal::sampler::random_seed;
    format!("call_{:08x}{:08x}{:08x}", r(), r(), r())
}

/// OpenAI's completion `logprobs`: token texts, their log-probabilities (`null` for the first
/// prompt token), the alternatives as `{text: logprob}` and each token's character offset in
/// the choice's text, the first at `offset`. A token that is part of a character (byte
/// fallback) is written as OpenAI writes it, `bytes:\xf0\x9f`, and its offset is where that
/// character starts.
fn completion_logprobs(tokens: &[TokenInfo], offset: usize) -> Value {
    json!({
        "tokens": tokens.iter().map(|t| completion_token(&t.text, &t.bytes)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|t| {
                t.logprob.map(|_| {
                    let mut top = serde_json::Map::new();
                    for (_, text, bytes, lp) in &t.top {
                        top.entry(completion_token(text, bytes)).or_insert(json!(lp));
                    }
                    top
                })
            })
            .collect::<Vec<_>>(),
        "text_offset": text_offsets(tokens.iter().map(|t| &t.bytes[..]), offset),
    })
}

/// A token's text in a completion's `logprobs`: its text, or where its bytes are not whole
/// UTF-8 characters `bytes:` and each byte as `\xNN` (OpenAI's form).
fn completion_token(text: &str, bytes: &[u8]) -> String {
    if std::str::from_utf8(bytes).is_ok() {
        return text.to_string();
    }
    let hex: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
    format!("bytes:{hex}")
}

/// The character offset at which each token's text starts, the first at `offset`, in the
/// text the tokens' bytes decode to (invalid bytes each as one replacement character): a token
/// that ends inside a character adds nothing until the one that completes it.
fn text_offsets<'a>(tokens: impl Iterator<Item = &'a [u8]>, mut offset: usize) -> Vec<usize> {
    let mut pending: Vec<u8> = Vec::new();
    tokens
        .map(|bytes| {
            let at = offset;
            pending.extend_from_slice(bytes);
            loop {
                match std::str::from_utf8(&pending) {
                    Ok(s) => {
                        offset += s.chars().count();
                        pending.clear();
                        break;
                    }
                    Err(e) => {
                        let valid = e.valid_up_to();
                        let chars =
                            std::str::from_utf8(&pending[..valid]).map_or(0, |s| s.chars().count());
                        offset += chars;
                        match e.error_len() {
                            // Invalid bytes: one replacement character, then the rest.
                            Some(n) => {
                                offset += 1;
                                pending.drain(..valid + n);
                            }
                            // A character not yet complete: wait for the next token.
                            None => {
                                pending.drain(..valid);
                                break;
                            }
                        }
                    }
                }
            }
            at
        })
        .collect()
}

/// OpenAI's chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(tokens: &[TokenInfo]) -> Value {
    let content: Vec<Value> = tokens.iter().map(|t| token_entry(t, false)).collect();
    json!({ "content": content })
}

/// One token's entry as OpenAI's chat and llama.cpp's `completion_probabilities` write it:
/// `token`, `logprob`, `bytes` and `top_logprobs` (each alike), with `id`s for llama.cpp.
fn token_entry(t: &TokenInfo, ids: bool) -> Value {
    let entry = |id: u32, text: &str, bytes: &[u8], lp: Option<f32>| {
        let mut v = json!({"token": text, "logprob": lp, "bytes": bytes});
        if ids {
            v["id"] = json!(id);
        }
        v
    };
    let mut v = entry(t.id, &t.text, &t.bytes, t.logprob);
    v["top_logprobs"] = t
        .top
        .iter()
        .map(|(id, text, bytes, lp)| entry(*id, text, bytes, Some(*lp)))
        .collect();
    v
}

/// `usage` of the answer's choices, `n` per prompt: each prompt counts once (OpenAI's way; its
/// first choice's cached tokens).
fn usage<'a>(summaries: impl IntoIterator<Item = &'a Summary>, n: usize) -> Value {
    let (mut prompt, mut cached, mut completion) = (0, 0, 0);
    for (i, s) in summaries.into_iter().enumerate() {
        if i % n == 0 {
            prompt += s.prompt_tokens;
            cached += s.cached_tokens;
        }
        completion += s.completion_tokens;
    }
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// llama.cpp's `timings` of the answer's choices, every run counted.
fn timings<'a>(summaries: impl IntoIterator<Item = &'a Summary>) -> Value {
    let (mut cache_n, mut prompt_n, mut completion, mut decoded) = (0, 0, 0, 0);
    let (mut prompt_secs, mut decode_secs) = (0.0, 0.0);
    for s in summaries {
        cache_n += s.cached_tokens;
        prompt_n += s.prompt_tokens - s.cached_tokens;
        completion += s.completion_tokens;
        decoded += s.decode_tokens;
        prompt_secs += s.prompt_secs;
        decode_secs += s.decode_secs;
    }
    let per_s = |n: usize, secs: f64| n as f64 / f64::max(secs, 1e-9);
    json!({
        "cache_n": cache_n,
        "prompt_n": prompt_n,
        "prompt_per_second": per_s(prompt_n, prompt_secs),
        "predicted_n": completion,
        "predicted_per_second": per_s(decoded, decode_secs),
    })
}

async fn completions(State(st): State<AppState>, RequestBody(body): RequestBody) -> Response {
    match completion_request(&body, st.model.ctx) {
        Ok(r) => answer(st, Kind::Completion, r).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(st): State<AppState>, RequestBody(body): RequestBody) -> Response {
    match chat_request(&body) {
        Ok(r) => answer(st, Kind::Chat, r).await,
        Err(e) => e.into_response(),
    }
}

/// Queues the request's jobs and answers: an error if the engine rejects a prompt before
/// generating (so a bad streamed request still gets status 400), else the whole text of each
/// prompt (one after another) or a stream.
async fn answer(st: AppState, kind: Kind, r: Request) -> Response {
    let a = Answer {
        tools: r.tools.clone(),
        parallel_tool_calls: r.parallel_tool_calls,
        ..Answer::new(&st, kind)
    };
    match run_jobs(&st, &r).await {
        Err(e) => e.into_response(),
        Ok(Outcome::Stream(first, rx)) => {
            let lp = r.logprobs.is_some();
            stream_answer(a, lp, r.include_usage, first, rx, st).into_response()
        }
        Ok(Outcome::Done(results)) => {
            Json(a.full(&results, r.n, r.echo, r.logprobs.is_some())).into_response()
        }
    }
}

/// The whole output of one job.
struct Collected {
    text: String,
    tokens: Vec<u32>,
    /// With `logprobs`: the generated tokens' entries.
    entries: Vec<TokenInfo>,
    summary: Summary,
}

/// What [`run_jobs`] gives: every job's output, or with `stream` the (one) job's first event
/// and where the rest arrive.
enum Outcome {
    Done(Vec<Collected>),
    Stream(Event, mpsc::UnboundedReceiver<Event>),
}

/// Runs the jobs of `r` (`n` choices per prompt) one after another; an error if the engine
/// rejects a prompt before generating.
async fn run_jobs(st: &AppState, r: &Request) -> Result<Outcome, ApiError> {
    let mut results = Vec::with_capacity(r.prompts.len() * r.n);
    let jobs = r.prompts.iter().flat_map(|p| (0..r.n).map(move |j| (p, j)));
    for (prompt, choice) in jobs {
        let mut rx = submit(st, r, prompt.clone(), choice)?;
        let mut ev = match rx.recv().await {
            Some(Event::Failed(e)) => return Err(e),
            Some(ev) => ev,
            None => return Err(ApiError::engine_dropped()),
        };
        if r.stream {
            return Ok(Outcome::Stream(ev, rx));
        }
        let (mut text, mut ids, mut entries) = (String::new(), Vec::new(), Vec::new());
        loop {
            match ev {
                Event::Text {
                    text: t,
                    tokens,
                    logprobs,
                    ..
                } => {
                    text.push_str(&t);
                    ids.extend(tokens);
                    entries.extend(logprobs);
                }
                Event::Done(summary) => {
                    st.record(&summary);
                    break results.push(Collected {
                        text,
                        tokens: ids,
                        entries,
                        summary,
                    });
                }
                Event::Failed(e) => return Err(e),
            }
            ev = rx.recv().await.ok_or_else(ApiError::engine_dropped)?;
        }
    }
    Ok(Outcome::Done(results))
}

/// Sends the job for choice `choice` of one prompt of `r` to the engine (sampling with the
/// request's seed + `choice`); returns where its events arrive.
fn submit(
    st: &AppState,
    r: &Request,
    prompt: Prompt,
    choice: usize,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (events, rx) = mpsc::unbounded_channel();
    let job = Job::Generate(Box::new(Generate {
        prompt,
        logprobs: r.logprobs,
        echo: r.echo,
        max_tokens: r.max_tokens,
        sampler: SamplerConfig {
            seed: r.sampler.seed.wrapping_add(choice as u64),
            ..r.sampler.clone()
        },
        stop: r.stop.clone(),
        cache_prompt: r.cache_prompt,
        ignore_eos: r.ignore_eos,
        time_limit: r.time_limit,
        min_indent: r.min_indent,
        slot: r.slot,
        logit_bias: r.logit_bias.clone(),
        events,
    }));
    st.jobs.send(job).map_err(|_| ApiError::engine_stopped())?;
    Ok(rx)
}

/// Server-sent events: a chat's first chunk names the role, then one chunk per piece of text
/// (with `logprobs`, its tokens' entries), the last chunk with the finish reason and timings,
/// with `include_usage` one more with the usage, then `[DONE]`. An error after the first event
/// is sent as an `{"error": ...}` event and ends the stream. With tools, the text is read for
/// calls as it comes ([`CallStream`]): its content is streamed as before, but for text held
/// while it may be a call's start, and each call as OpenAI streams them
/// ([`Answer::call_chunks`]).
fn stream_answer(
    a: Answer,
    logprobs: bool,
    include_usage: bool,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
    counted: AppState,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let head: Vec<SseEvent> = match a.kind {
        Kind::Chat => vec![sse_json(a.chunk(None, None, None))],
        Kind::Completion => vec![],
    };
    // The characters streamed so far.
    let mut chars = 0;
    // With tools, the calls read from the text as it comes, and the entries of the tokens
    // whose text is held back (as a possible call's start) until a chunk carries them.
    let names: Vec<&str> = a.tools.iter().map(String::as_str).collect();
    let mut calls = (!names.is_empty()).then(|| CallStream::new(&names));
    let mut held: Vec<TokenInfo> = Vec::new();
    let events = sse_events(first, rx, counted, move |ev| match (ev, calls.as_mut()) {
        (
            Event::Text {
                text, logprobs: t, ..
            },
            Some(reader),
        ) => {
            held.extend(t);
            (
                a.call_chunks(reader.push(&text), logprobs, &mut held),
                false,
            )
        }
        (
            Event::Text {
                text, logprobs: t, ..
            },
            None,
        ) => {
            let at = chars;
            chars += text.chars().count();
            let lp = logprobs.then_some((t.as_slice(), at));
            (vec![sse_json(a.chunk(Some(text), lp, None))], false)
        }
        (Event::Done(s), reader) => {
            let (mut out, last) = match reader {
                Some(reader) => {
                    let out = a.call_chunks(reader.finish(), logprobs, &mut held);
                    let lp = (logprobs && !held.is_empty()).then_some((held.as_slice(), 0));
                    let mut last = a.chunk(None, lp, Some(&s));
                    // `tool_calls` where a call sent is whole, as the unstreamed answer (one
                    // begun and cut short by a stop sequence is no call there); without
                    // parallel calls only the first begun was sent.
                    let whole = match a.parallel_tool_calls {
                        true => reader.calls().next().is_some(),
                        false => reader.is_whole(0),
                    };
                    if whole {
                        last["choices"][0]["finish_reason"] = json!(call_reason(&s));
                    }
                    (out, last)
                }
                None => (Vec::new(), a.chunk(None, None, Some(&s))),
            };
            out.push(sse_json(last));
            if include_usage {
                out.push(sse_json(a.usage_chunk(&s)));
            }
            out.push(SseEvent::default().data("[DONE]"));
            (out, true)
        }
        (Event::Failed(e), _) => (vec![sse_json(e.body())], true),
    });
    Sse::new(stream::iter(head).chain(events).map(Ok))
}

/// One server-sent event carrying `v`.
fn sse_json(v: Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The server-sent events of a job: `first`, then the events from `rx`, each written by `step`,
/// which also says whether the stream ends with it. The finished answer is counted in
/// `counted`'s metrics.
fn sse_events(
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
    counted: AppState,
    step: impl FnMut(Event) -> (Vec<SseEvent>, bool) + Send + 'static,
) -> impl futures_util::Stream<Item = SseEvent> {
    let start = (Some(first), rx, (counted, step), false);
    stream::unfold(start, |(next, mut rx, mut state, ended)| async move {
        if ended {
            return None;
        }
        let ev = match next {
            Some(ev) => ev,
            None => rx.recv().await?,
        };
        let (st, step) = &mut state;
        if let Event::Done(s) = &ev {
            st.record(s);
        }
        let (out, ended) = step(ev);
        Some((stream::iter(out), (None, rx, state, ended)))
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::{
        completion_token, pick_slot, text_offsets, tokenizer_job, SlotState, TokenizerJob,
    };
    use serde_json::json;
    use std::collections::HashMap;
    use teal::gguf::MetaValue;
    use teal::tokenizer::Tokenizer;

    /// `/tokenize` with `add_special` gives the tokens llama.cpp's `llama_tokenize` does with
    /// it: BOS and EOS around the text where the model adds them (a vocabulary of five tokens
    /// whose metadata says so); `/tokenizer_info` says both.
    #[test]
    fn tokenize_adds_eos_where_the_model_does() {
        let strs = |v: &[&str]| {
            MetaValue::Array(v.iter().map(|s| MetaValue::String(s.to_string())).collect())
        };
        let tokens = ["<s>", "</s>", "h", "i", "hi"];
        let types = [3, 3, 1, 1, 1].map(MetaValue::I32).to_vec();
        let meta: HashMap<&str, MetaValue> = [
            ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.pre", MetaValue::String("smollm".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            ("tokenizer.ggml.token_type", MetaValue::Array(types)),
            ("tokenizer.ggml.merges", strs(&["h i"])),
            ("tokenizer.ggml.bos_token_id", MetaValue::U32(0)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(1)),
            ("tokenizer.ggml.add_bos_token", MetaValue::Bool(true)),
            ("tokenizer.ggml.add_eos_token", MetaValue::Bool(true)),
        ]
        .into_iter()
        .collect();
        let tok = Tokenizer::from_gguf_metadata(|k| meta.get(k)).unwrap();
        let encode = |add_special| {
            let job = TokenizerJob::Encode {
                text: "hi".into(),
                add_special,
                parse_special: true,
                with_pieces: false,
            };
            tokenizer_job(&tok, 64, job).unwrap()["tokens"].clone()
        };
        assert_eq!(encode(true), json!([0, 4, 1]));
        assert_eq!(encode(false), json!([4]));
        let info = tokenizer_job(&tok, 64, TokenizerJob::Info).unwrap();
        assert_eq!(info["add_bos_token"], true, "{info}");
        assert_eq!(info["add_eos_token"], true, "{info}");
    }

    /// A character split over byte-fallback tokens: each part written as OpenAI writes it, all
    /// at the character's offset, the text after it counted once.
    #[test]
    fn byte_fallback_tokens_in_completion_logprobs() {
        let fish = "🐧".as_bytes();
        let toks: [&[u8]; 6] = [b"a ", &fish[..1], &fish[1..3], &fish[3..], b"b", b"\xff"];
        assert_eq!(text_offsets(toks.into_iter(), 5), [5, 7, 7, 7, 8, 9]);
        assert_eq!(completion_token("\u{fffd}", &fish[..1]), "bytes:\\xf0");
        assert_eq!(
            completion_token("\u{fffd}", &fish[1..3]),
            "bytes:\\x9f\\x90"
        );
        assert_eq!(completion_token(" b", b" b"), " b");
    }

    fn slot(cached: usize, shared: usize, last_used: u64) -> SlotState {
        SlotState {
            cached,
            shared,
            last_used,
        }
    }

    #[test]
    fn slots_are_picked_to_keep_caches() {
        // A continuation wins, the longest one.
        let s = [slot(10, 10, 5), slot(20, 20, 1), slot(0, 0, 0)];
        assert_eq!(pick_slot(&s, 30), 1);
        // No continuation: an empty slot before truncating someone's cache.
        let s = [slot(10, 8, 5), slot(0, 0, 0), slot(20, 3, 1)];
        assert_eq!(pick_slot(&s, 30), 1);
        // No empty slot: the longest shared prefix if it covers half the prompt.
        let s = [slot(10, 8, 5), slot(20, 16, 1)];
        assert_eq!(pick_slot(&s, 30), 1);
        // Otherwise the least recently used slot.
        let s = [slot(10, 8, 5), slot(20, 3, 2), slot(7, 0, 9)];
        assert_eq!(pick_slot(&s, 30), 1);
        // One slot: always it.
        assert_eq!(pick_slot(&[slot(10, 0, 3)], 5), 0);
    }
}
