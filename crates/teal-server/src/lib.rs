//! teal's OpenAI-compatible HTTP server, thin: the HTTP side (axum, on a small tokio runtime)
//! checks requests and writes answers; one engine thread owns the decoder and runs one request at
//! a time (the engine decodes batch 1), taking them from a queue in arrival order.
//!
//! - `GET /health`, `GET /v1/models`
//! - `POST /v1/completions` (`prompt`) and `POST /v1/chat/completions` (`messages`, rendered with
//!   the model's chat template), both with `"stream": true` as server-sent events ending in
//!   `data: [DONE]`, `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`; answers carry
//!   `usage` and llama.cpp's `timings` (prompt and decode tokens per second).
//! - Prompt caching, as llama.cpp's `cache_prompt` (default on): a request whose prompt starts
//!   with the tokens of the previous request (its prompt and answer: a chat's next turn) reuses
//!   their keys and values and runs only the rest; `usage.prompt_tokens_details.cached_tokens`
//!   and `timings.cache_n` say how many were reused. `"cache_prompt": false` runs it whole.
//!
//! Bad requests (malformed JSON, a missing field, a prompt longer than the context, an
//! unsupported option) get status 400 and `{"error": {"message", "type", "code"}}`.

mod stop;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use teal::chat::{encode_prompt, Message, Prompt};
use teal::device::Decoder;
use teal::generate::{GenerateParams, Session, StopReason};
use teal::sampler::SamplerConfig;
use teal::tokenizer::Tokenizer;
use tokio::sync::mpsc;

pub use stop::StopFilter;

/// The model the server answers with, for `/v1/models` and every answer's `model`.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub id: String,
    /// Context length of the engine's decoder.
    pub ctx: usize,
    /// Extra facts listed under `teal` in `/v1/models` (device, weights, sparsity, ...).
    pub meta: Value,
}

/// One request for the engine thread: what to generate and where to send it.
pub struct Job {
    pub prompt: Prompt,
    /// Most tokens to generate (`None`: until end of sequence or the context is full).
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// Reuse the cached prefix the prompt shares with the previous request.
    pub cache_prompt: bool,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the engine reports for a job: text as it is generated, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Summary),
    Failed(ApiError),
}

#[derive(Clone, Debug)]
pub struct Summary {
    /// `stop` (end of sequence or a stop sequence) or `length` (max_tokens or the context).
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    /// Prompt tokens reused from the previous request's cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Over the prompt tokens that were run (not the cached ones).
    pub prompt_tok_s: f64,
    pub decode_tok_s: f64,
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

    fn body(&self) -> Value {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        json!({"error": {"message": self.message, "type": kind, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Serves jobs one after another until every sender of `jobs` is gone.
pub fn run_engine(dec: &mut dyn Decoder, tok: &Tokenizer, jobs: std::sync::mpsc::Receiver<Job>) {
    let mut session = Session::new(dec);
    for job in jobs {
        serve_job(&mut session, tok, job);
    }
}

fn serve_job(session: &mut Session, tok: &Tokenizer, job: Job) {
    let send = |e: Event| job.events.send(e).is_ok();
    let tokens = match encode_prompt(tok, &job.prompt) {
        Ok(t) => t,
        Err(e) => {
            send(Event::Failed(ApiError::bad_request(e.to_string())));
            return;
        }
    };
    let params = GenerateParams {
        max_tokens: job.max_tokens.unwrap_or(session.capacity()),
        sampler: job.sampler,
        ctx: session.capacity(),
        stop_at_eos: true,
    };
    if !job.cache_prompt {
        session.forget();
    }
    let mut filter = StopFilter::new(job.stop);
    let result = session.generate(tok, &tokens, &params, |piece| {
        let text = filter.push(piece);
        // A closed channel means the client has gone: stop generating for it.
        (text.is_empty() || send(Event::Text(text))) && !filter.hit()
    });
    match result {
        Ok(g) => {
            let rest = filter.finish();
            if !rest.is_empty() && !send(Event::Text(rest)) {
                return;
            }
            let finish_reason = match g.stop {
                StopReason::MaxTokens | StopReason::ContextFull => "length",
                StopReason::Eos | StopReason::Caller => "stop",
            };
            send(Event::Done(Summary {
                finish_reason,
                prompt_tokens: g.prompt_tokens,
                cached_tokens: g.cached_tokens,
                completion_tokens: g.tokens.len(),
                prompt_tok_s: g.prompt_tok_s(),
                decode_tok_s: g.decode_tok_s(),
            }));
        }
        Err(e @ (teal::Error::EmptyPrompt | teal::Error::ContextOverflow { .. })) => {
            send(Event::Failed(ApiError::bad_request(e.to_string())));
        }
        Err(e) => {
            send(Event::Failed(ApiError::internal(e.to_string())));
        }
    }
}

#[derive(Clone)]
struct AppState {
    jobs: std::sync::mpsc::Sender<Job>,
    model: Arc<ModelInfo>,
    next_id: Arc<AtomicU64>,
}

/// The HTTP routes, sending jobs to the engine through `jobs`.
pub fn router(jobs: std::sync::mpsc::Sender<Job>, model: ModelInfo) -> Router {
    let state = AppState {
        jobs,
        model: Arc::new(model),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|uri: Uri| async move {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("no such endpoint: {uri}"),
            }
        })
        .with_state(state)
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

/// Listens on `addr` (`host:port`) and serves until Ctrl-C: HTTP on one tokio thread, the
/// engine on the calling thread. `on_listening` gets the bound address once requests can come.
pub fn serve(
    addr: &str,
    dec: &mut dyn Decoder,
    tok: &Tokenizer,
    model: ModelInfo,
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
    let app = router(tx, model);
    // When the server stops, the router and with it the queue's sender are dropped, which ends
    // the engine's loop below after the job in progress.
    rt.spawn(async move {
        let stop = async {
            tokio::signal::ctrl_c().await.ok();
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .ok();
    });
    on_listening(bound);
    run_engine(dec, tok, rx);
    Ok(())
}

async fn models(State(st): State<AppState>) -> Json<Value> {
    let m = &st.model;
    Json(json!({
        "object": "list",
        "data": [{"id": m.id, "object": "model", "owned_by": "teal", "context_length": m.ctx, "teal": m.meta}],
    }))
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

/// The options both endpoints take. Other OpenAI fields are accepted and ignored.
#[derive(Deserialize)]
struct Options {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stream: Option<bool>,
    stop: Option<OneOrMany>,
    n: Option<usize>,
    cache_prompt: Option<bool>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(flatten)]
    options: Options,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    options: Options,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
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

/// What a checked request asks of the engine, less the channel.
struct Request {
    prompt: Prompt,
    max_tokens: Option<usize>,
    sampler: SamplerConfig,
    stop: Vec<String>,
    cache_prompt: bool,
    stream: bool,
}

/// Defaults as llama.cpp's server (and `teal run`): temperature 0.8, top-k 40, top-p 0.95.
fn check_options(o: Options, prompt: Prompt) -> Result<Request, ApiError> {
    if let Some(n) = o.n.filter(|&n| n != 1) {
        return Err(ApiError::bad_request(format!(
            "n = {n}: this server returns one choice per request"
        )));
    }
    let max_tokens = o.max_tokens.or(o.max_completion_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    let temperature = o.temperature.unwrap_or(0.8);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad_request(format!(
            "temperature = {temperature}: must be a finite number >= 0 (0: greedy)"
        )));
    }
    let top_p = o.top_p.unwrap_or(0.95);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "top_p = {top_p}: must be in (0, 1]"
        )));
    }
    let stop = o.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_request(
            "stop: at most 4 sequences, none of them empty",
        ));
    }
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    Ok(Request {
        prompt,
        max_tokens,
        sampler: SamplerConfig {
            temperature,
            top_k: o.top_k.unwrap_or(40),
            top_p,
            seed,
        },
        stop,
        cache_prompt: o.cache_prompt.unwrap_or(true),
        stream: o.stream.unwrap_or(false),
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(match e.classify() {
            serde_json::error::Category::Data => format!("invalid request: {e}"),
            _ => format!("malformed JSON in the request body: {e}"),
        })
    })
}

fn completion_request(body: &Bytes) -> Result<Request, ApiError> {
    let r: CompletionRequest = parse(body)?;
    let mut prompts = r.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "prompt: one string per request (got a list of {})",
            prompts.len()
        )));
    }
    check_options(r.options, Prompt::Text(prompts.remove(0)))
}

fn chat_request(body: &Bytes) -> Result<Request, ApiError> {
    let r: ChatRequest = parse(body)?;
    if r.messages.is_empty() {
        return Err(ApiError::bad_request("messages: the list is empty"));
    }
    let messages = r
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        (kind, _) => Err(ApiError::bad_request(format!(
                            "messages[{i}]: content parts of type '{kind}' are not supported (text only)"
                        ))),
                    })
                    .collect::<Result<String, ApiError>>()?,
            };
            Ok(Message::new(m.role, content))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    check_options(r.options, Prompt::Chat(messages))
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
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: st.model.id.clone(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choice: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The whole answer of a request without streaming.
    fn full(&self, text: String, s: &Summary) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": s.finish_reason})
            }
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": s.finish_reason,
            }),
        };
        let mut v = self.envelope(false, choice);
        add_usage(&mut v, s);
        v
    }

    /// A streamed chunk: a piece of text, or with `finish` the last one.
    fn chunk(&self, text: Option<String>, finish: Option<&Summary>) -> Value {
        let reason = finish.map(|s| s.finish_reason);
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": reason})
            }
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": reason})
            }
        };
        let mut v = self.envelope(true, choice);
        if let Some(s) = finish {
            add_usage(&mut v, s);
        }
        v
    }
}

fn add_usage(v: &mut Value, s: &Summary) {
    v["usage"] = json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    });
    v["timings"] = json!({
        "cache_n": s.cached_tokens,
        "prompt_n": s.prompt_tokens - s.cached_tokens,
        "prompt_per_second": s.prompt_tok_s,
        "predicted_n": s.completion_tokens,
        "predicted_per_second": s.decode_tok_s,
    });
}

async fn completions(State(st): State<AppState>, body: Bytes) -> Response {
    match completion_request(&body) {
        Ok(r) => answer(st, Kind::Completion, r).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(st): State<AppState>, body: Bytes) -> Response {
    match chat_request(&body) {
        Ok(r) => answer(st, Kind::Chat, r).await,
        Err(e) => e.into_response(),
    }
}

/// Queues the job and answers: an error if the engine rejects the request before generating
/// (so a bad streamed request still gets status 400), else the whole text or a stream.
async fn answer(st: AppState, kind: Kind, r: Request) -> Response {
    let (events, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: r.prompt,
        max_tokens: r.max_tokens,
        sampler: r.sampler,
        stop: r.stop,
        cache_prompt: r.cache_prompt,
        events,
    };
    if st.jobs.send(job).is_err() {
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the engine has stopped".into(),
        }
        .into_response();
    }
    let a = Answer::new(&st, kind);
    let first = match rx.recv().await {
        Some(Event::Failed(e)) => return e.into_response(),
        Some(ev) => ev,
        None => return ApiError::internal("the engine dropped the request").into_response(),
    };
    if r.stream {
        return stream_answer(a, first, rx).into_response();
    }
    let mut text = String::new();
    let mut ev = Some(first);
    loop {
        match ev {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(s)) => return Json(a.full(text, &s)).into_response(),
            Some(Event::Failed(e)) => return e.into_response(),
            None => return ApiError::internal("the engine dropped the request").into_response(),
        }
        ev = rx.recv().await;
    }
}

/// Server-sent events: a chat's first chunk names the role, then one chunk per piece of text,
/// the last chunk with the finish reason, usage and timings, then `[DONE]`. An error after the
/// first event is sent as an `{"error": ...}` event and ends the stream.
fn stream_answer(
    a: Answer,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let head: Vec<SseEvent> = match a.kind {
        Kind::Chat => vec![data(a.chunk(None, None))],
        Kind::Completion => vec![],
    };
    let events = stream::unfold((Some(first), rx, false), move |(next, mut rx, ended)| {
        let a = a.clone();
        async move {
            if ended {
                return None;
            }
            let ev = match next {
                Some(ev) => ev,
                None => rx.recv().await?,
            };
            let (out, ended) = match ev {
                Event::Text(t) => (vec![data(a.chunk(Some(t), None))], false),
                Event::Done(s) => (
                    vec![
                        data(a.chunk(None, Some(&s))),
                        SseEvent::default().data("[DONE]"),
                    ],
                    true,
                ),
                Event::Failed(e) => (vec![data(e.body())], true),
            };
            Some((stream::iter(out), (None, rx, ended)))
        }
    })
    .flatten();
    Sse::new(stream::iter(head).chain(events).map(Ok))
}
