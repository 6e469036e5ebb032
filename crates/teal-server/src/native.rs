//! llama.cpp's own endpoints (not OpenAI's), in the shapes its server documents, so that the
//! clients written for `llama-server` work unchanged:
//!
//! - `POST /completion` (also `/completions`): `prompt` (text, token ids, ids and texts in one
//!   prompt as `[12, "text", 34]`, or a list of them: the answer is then a list), `n_predict`
//!   (-1: no limit; 0: run the prompt only), `temperature` (<= 0: greedy), `top_k` (<= 0:
//!   off), `top_p`, `min_p`, `seed` (-1: random), `repeat_penalty`, `repeat_last_n`,
//!   `presence_penalty`, `frequency_penalty`, `stop`, `stream`, `cache_prompt`, `n_probs`,
//!   `ignore_eos`, `return_tokens`, `n_indent`, `t_max_predict_ms`, `n_cmpl`, `id_slot`,
//!   `logit_bias`, `samplers` and `response_fields`.
//!   The answer has `content`, `tokens`, `stop_type` (`eos`, `word`, `limit`),
//!   `stopping_word`, `tokens_predicted`, `tokens_evaluated`, `tokens_cached`,
//!   `generation_settings`, `prompt`, `timings` and with `n_probs` `completion_probabilities`;
//!   streamed, one event per piece of text and a last one with `stop: true` and the rest (no
//!   `[DONE]`, as llama.cpp).
//! - `POST /infill`: code completion as editors ask for it (llama.vim, llama.vscode):
//!   `input_prefix`, `input_suffix`, `input_extra` (other files, `{filename, text}`) and
//!   `prompt` (the start of the middle), with every option of `/completion`; the parts are cut
//!   to fit the context as [`teal::chat::Infill`] describes.
//! - `POST /apply-template` (`messages`: the prompt text of a chat; `add_generation_prompt:
//!   false` leaves out the assistant's header after it) and `GET /props`.
//! - `POST /embeddings` (also `/embedding`): `/v1/embeddings`' request, answered as a list of
//!   `{"index", "embedding": [vector]}`.
//!
//! `grammar` (GBNF, [`teal::grammar`]) and `json_schema` (converted to a grammar by
//! [`teal::json_schema`]; `{}` and `{"type": "object"}` are JSON mode) constrain the answer.
//! Options that would change the answer and that teal does not implement (Mirostat, DRY, XTC,
//! typical-p, dynamic temperature, post-sampling probabilities) are refused with status 400 when set to anything
//! but their neutral value. In `samplers`, the stages listed are used in llama.cpp's default
//! order (penalties, top-k, top-p, min-p, temperature, infill) and those left out are off (the
//! temperature then 1); `infill` is llama.cpp's stage for code completion
//! ([`teal::constrain::InfillStage`]: prefix-sharing tokens merged, unlikely ones cut, end of
//! generation where it weighs enough).

use super::*;
use teal::chat::Piece;

/// The options of `/completion` and `/infill`, llama.cpp's names. Other fields are ignored.
#[derive(Deserialize)]
struct NativeOptions {
    n_predict: Option<i64>,
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    stop: Option<Vec<String>>,
    stream: Option<bool>,
    cache_prompt: Option<bool>,
    n_probs: Option<usize>,
    ignore_eos: Option<bool>,
    return_tokens: Option<bool>,
    n_indent: Option<i64>,
    t_max_predict_ms: Option<u64>,
    n_cmpl: Option<usize>,
    id_slot: Option<i64>,
    samplers: Option<Vec<String>>,
    response_fields: Option<Vec<String>>,
    response_format: Option<ResponseFormat>,
    grammar: Option<String>,
    json_schema: Option<Value>,
    mirostat: Option<i64>,
    dry_multiplier: Option<f32>,
    xtc_probability: Option<f32>,
    typical_p: Option<f32>,
    dynatemp_range: Option<f32>,
    logit_bias: Option<Value>,
    post_sampling_probs: Option<bool>,
}

/// `/completion`'s own field, beside [`NativeOptions`].
#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Value,
}

/// `/infill`'s own fields, beside [`NativeOptions`].
#[derive(Deserialize)]
struct InfillRequest {
    #[serde(default)]
    input_prefix: String,
    #[serde(default)]
    input_suffix: String,
    #[serde(default)]
    input_extra: Vec<ExtraFile>,
    #[serde(default)]
    prompt: String,
}

/// One of `/infill`'s other files.
#[derive(Deserialize)]
struct ExtraFile {
    #[serde(default)]
    filename: String,
    text: String,
}

#[derive(Deserialize)]
struct TemplateRequest {
    messages: Vec<ChatMessage>,
    /// End with the header of the assistant's turn (default), as llama.cpp's.
    add_generation_prompt: Option<bool>,
}

/// What a native answer needs beyond the engine's [`Request`].
struct Shape {
    return_tokens: bool,
    response_fields: Option<Vec<String>>,
    /// Asked for several prompts or completions: the answer is a list.
    list: bool,
}

/// The sampler stages `samplers` may name: teal's, and llama.cpp's that are no-ops at their
/// neutral settings (which the option check enforces).
const SAMPLERS: &[&str] = &[
    "penalties",
    "top_k",
    "top_p",
    "min_p",
    "temperature",
    "dry",
    "typ_p",
    "typical_p",
    "xtc",
    "infill",
];

/// The engine's request for `prompts` with options `o`, and the answer's shape.
fn check(
    o: NativeOptions,
    prompts: Vec<Prompt>,
    many: bool,
    ctx: usize,
) -> Result<(Request, Shape), ApiError> {
    let bad = |m: String| Err(ApiError::bad_request(m));
    let nonzero = |v: Option<f32>, neutral: f32| v.is_some_and(|v| v != neutral);
    let unsupported = [
        ("mirostat", o.mirostat.is_some_and(|m| m != 0)),
        ("dry_multiplier", nonzero(o.dry_multiplier, 0.0)),
        ("xtc_probability", nonzero(o.xtc_probability, 0.0)),
        ("typical_p", nonzero(o.typical_p, 1.0)),
        ("dynatemp_range", nonzero(o.dynatemp_range, 0.0)),
        ("post_sampling_probs", o.post_sampling_probs == Some(true)),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return bad(format!("{name}: not supported by teal"));
    }
    let mut temperature = o.temperature.map(|t| t.max(0.0));
    let mut top_k = o.top_k;
    let (mut top_p, mut min_p) = (o.top_p, o.min_p);
    let mut penalties = [o.repeat_penalty, o.presence_penalty, o.frequency_penalty];
    if let Some(list) = &o.samplers {
        if let Some(s) = list.iter().find(|s| !SAMPLERS.contains(&s.as_str())) {
            return bad(format!(
                "samplers: unknown sampler '{s}' (known: {})",
                SAMPLERS.join(", ")
            ));
        }
        let has = |name: &str| list.iter().any(|s| s == name);
        if !has("temperature") {
            temperature = Some(1.0);
        }
        if !has("top_k") {
            top_k = Some(0);
        }
        if !has("top_p") {
            top_p = Some(1.0);
        }
        if !has("min_p") {
            min_p = Some(0.0);
        }
        if !has("penalties") {
            penalties = [Some(1.0), Some(0.0), Some(0.0)];
        }
    }
    // -1: no limit; -2 (llama.cpp: until the context is full) is the same here.
    let max_tokens = match o.n_predict {
        None | Some(-1 | -2) => None,
        Some(n) => match usize::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => return bad(format!("n_predict = {n}: must be >= 0, or -1 for no limit")),
        },
    };
    let min_indent = match o.n_indent.map(usize::try_from) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad("n_indent: must be >= 0".into()),
    };
    let slot = match o.id_slot {
        None | Some(-1) => None,
        Some(i) => match usize::try_from(i) {
            Ok(i) => Some(i),
            Err(_) => return bad(format!("id_slot = {i}: must be >= 0, or -1 for any slot")),
        },
    };
    let n = o.n_cmpl.unwrap_or(1);
    let options = Options {
        max_tokens,
        max_completion_tokens: None,
        temperature,
        top_p,
        top_k,
        seed: o.seed,
        min_p,
        repeat_penalty: penalties[0],
        repeat_last_n: o.repeat_last_n,
        presence_penalty: penalties[1],
        frequency_penalty: penalties[2],
        stream: o.stream,
        stream_options: None,
        ignore_eos: o.ignore_eos,
        stop: o.stop.map(OneOrMany::Many),
        n: Some(n),
        cache_prompt: o.cache_prompt,
        logit_bias: o.logit_bias,
        response_format: o.response_format,
        grammar: o.grammar,
        json_schema: o.json_schema,
    };
    let logprobs = o.n_probs.filter(|&k| k > 0);
    let list = many || n > 1;
    let mut r = check_options(Api::LlamaCpp, options, prompts, logprobs, false)?;
    r.sampler.infill = o
        .samplers
        .as_ref()
        .is_some_and(|l| l.iter().any(|s| s == "infill"));
    r.time_limit = o
        .t_max_predict_ms
        .filter(|&t| t > 0)
        .map(Duration::from_millis);
    r.min_indent = min_indent;
    r.slot = slot;
    r.fit_infill(ctx);
    let shape = Shape {
        return_tokens: o.return_tokens.unwrap_or(false),
        response_fields: o.response_fields,
        list,
    };
    Ok((r, shape))
}

/// `/completion`'s `prompt` (and the embeddings' `input`, named by `field`), as llama.cpp
/// reads it: a text, token ids, token ids and texts in one prompt (a list with a number in
/// it), or a list of prompts (texts, and lists of ids or of ids and texts); with several, the
/// answer is a list.
pub(crate) fn prompts(v: &Value, field: &str) -> Result<(Vec<Prompt>, bool), ApiError> {
    let one = |v: &Value| -> Result<Prompt, ApiError> {
        let bad = || {
            ApiError::bad_request(format!(
                "{field}: expected a string, token ids (with texts among them), or a list of them"
            ))
        };
        let id = |x: &Value| x.as_u64().and_then(|i| u32::try_from(i).ok());
        match v {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(a) => match a.iter().map(id).collect::<Option<Vec<u32>>>() {
                Some(ids) => Ok(Prompt::Tokens(ids)),
                None => a
                    .iter()
                    .map(|x| match (x, id(x)) {
                        (Value::String(s), _) => Ok(Piece::Text(s.clone())),
                        (_, Some(i)) => Ok(Piece::Token(i)),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_, _>>()
                    .map(Prompt::Mixed),
            },
            _ => Err(bad()),
        }
    };
    match v {
        Value::Array(a) if a.is_empty() => {
            Err(ApiError::bad_request(format!("{field}: the list is empty")))
        }
        Value::Array(a) if a.iter().any(Value::is_number) => Ok((vec![one(v)?], false)),
        Value::Array(a) => Ok((a.iter().map(one).collect::<Result<_, _>>()?, a.len() > 1)),
        v => Ok((vec![one(v)?], false)),
    }
}

pub(crate) async fn completion(
    State(st): State<AppState>,
    RequestBody(body): RequestBody,
) -> Response {
    let checked = parse_with_options(&body).and_then(|(r, o): (CompletionRequest, _)| {
        let (p, many) = prompts(&r.prompt, "prompt")?;
        check(o, p, many, st.model.ctx)
    });
    match checked {
        Ok((r, shape)) => answer(st, r, shape).await,
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn infill(State(st): State<AppState>, RequestBody(body): RequestBody) -> Response {
    let checked = parse_with_options(&body).and_then(|(r, o): (InfillRequest, _)| {
        let f = Infill {
            prefix: r.input_prefix,
            suffix: r.input_suffix,
            middle: r.prompt,
            extra: r
                .input_extra
                .into_iter()
                .map(|e| (e.filename, e.text))
                .collect(),
            budget: None,
        };
        check(o, vec![Prompt::Infill(f)], false, st.model.ctx)
    });
    match checked {
        Ok((r, shape)) => answer(st, r, shape).await,
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn apply_template(
    State(st): State<AppState>,
    RequestBody(body): RequestBody,
) -> Response {
    let job = parse::<TemplateRequest>(&body).and_then(|r| {
        Ok(TokenizerJob::Template {
            generation_prompt: r.add_generation_prompt.unwrap_or(true),
            messages: chat_messages(r.messages)?,
        })
    });
    match job {
        Ok(job) => tokenizer_answer(&st, job).await,
        Err(e) => e.into_response(),
    }
}

/// llama.cpp's `/embeddings` (also `/embedding`): `/v1/embeddings`' request, llama.cpp's own
/// answer: per input `{"index", "embedding": [vector]}`, the pooled vector in a list (where
/// llama.cpp's `--pooling none` would list one per token).
pub(crate) async fn embeddings(
    State(st): State<AppState>,
    RequestBody(body): RequestBody,
) -> Response {
    let vectors = match parse::<EmbeddingRequest>(&body) {
        Ok(r) => embed(&st, &r).await,
        Err(e) => Err(e),
    };
    match vectors {
        Ok(v) => {
            let all: Vec<Value> = v
                .iter()
                .enumerate()
                .map(|(i, (v, _))| json!({"index": i, "embedding": [v]}))
                .collect();
            Json(Value::Array(all)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `/props`: the defaults of `/completion`, the slots and the chat template.
pub(crate) async fn props(State(st): State<AppState>) -> Response {
    let info = match tokenizer_value(&st, TokenizerJob::Info).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let m = &st.model;
    let d = SamplerConfig::LLAMA_CPP;
    Json(json!({
        "default_generation_settings": {
            "n_ctx": m.ctx,
            "params": {
                "n_predict": -1,
                "seed": -1,
                "temperature": d.temperature,
                "top_k": d.top_k,
                "top_p": d.top_p,
                "min_p": d.min_p,
                "repeat_last_n": d.penalties.last_n,
                "repeat_penalty": d.penalties.repeat,
                "presence_penalty": d.penalties.presence,
                "frequency_penalty": d.penalties.frequency,
                "stop": [],
                "ignore_eos": false,
                "n_probs": 0,
                "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
            },
        },
        "total_slots": m.slots,
        "model_path": m.id,
        "chat_template": info["chat_template"],
        "bos_token": info["bos_token"],
        "eos_token": info["eos_token"],
        "modalities": {"vision": false, "audio": false},
        "build_info": concat!("teal ", env!("CARGO_PKG_VERSION")),
        "teal": m.meta,
    }))
    .into_response()
}

/// Runs the request and answers in llama.cpp's shapes.
async fn answer(st: AppState, r: Request, shape: Shape) -> Response {
    match run_jobs(&st, &r).await {
        Err(e) => e.into_response(),
        Ok(Outcome::Stream(first, rx)) => stream(r, shape, first, rx, st).into_response(),
        Ok(Outcome::Done(results)) => {
            let all: Vec<Value> = results
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let v = result(&st.model, &r, &shape, i, c, false);
                    pick(v, shape.response_fields.as_deref())
                })
                .collect();
            match shape.list {
                true => Json(Value::Array(all)).into_response(),
                false => Json(all.into_iter().next().unwrap_or_default()).into_response(),
            }
        }
    }
}

/// The settings a result reports (`generation_settings`).
fn settings(m: &ModelInfo, r: &Request) -> Value {
    let s = &r.sampler;
    json!({
        "n_ctx": m.ctx,
        "model": m.id,
        "n_predict": r.max_tokens.map_or(-1, |n| n as i64),
        "seed": s.seed,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_last_n": if s.penalties.last_n == usize::MAX { -1 } else { s.penalties.last_n as i64 },
        "repeat_penalty": s.penalties.repeat,
        "presence_penalty": s.penalties.presence,
        "frequency_penalty": s.penalties.frequency,
        "stop": r.stop,
        "ignore_eos": r.ignore_eos,
        "n_indent": r.min_indent,
        "t_max_predict_ms": r.time_limit.map_or(0, |t| t.as_millis() as u64),
        "stream": r.stream,
        "n_probs": r.logprobs.unwrap_or(0),
        "cache_prompt": r.cache_prompt,
    })
}

/// llama.cpp's `completion_probabilities`: per token its id, text, bytes, log-probability and
/// the most likely tokens at its position.
fn probabilities(entries: &[TokenInfo]) -> Value {
    entries.iter().map(|t| token_entry(t, true)).collect()
}

/// One result: job `index`'s whole answer, or with `streamed` the last event of its stream
/// (whose text and tokens came before).
fn result(
    m: &ModelInfo,
    r: &Request,
    shape: &Shape,
    index: usize,
    c: &Collected,
    streamed: bool,
) -> Value {
    let s = &c.summary;
    let ms = |secs: f64| secs * 1e3;
    let per = |n: usize, secs: f64| (ms(secs) / n.max(1) as f64, n as f64 / secs.max(1e-9));
    let prompt_n = s.prompt_tokens - s.cached_tokens;
    let (prompt_tok_ms, prompt_per_s) = per(prompt_n, s.prompt_secs);
    let (predicted_tok_ms, predicted_per_s) = per(s.decode_tokens, s.decode_secs);
    let (stop_type, word) = match &s.stop {
        StopType::Eos => ("eos", ""),
        StopType::Word(w) => ("word", w.as_str()),
        StopType::Limit => ("limit", ""),
    };
    let mut v = json!({
        "index": index,
        "content": if streamed { "" } else { c.text.as_str() },
        "tokens": if shape.return_tokens && !streamed { c.tokens.clone() } else { Vec::new() },
        "id_slot": s.slot,
        "stop": true,
        "model": m.id,
        "tokens_predicted": s.completion_tokens,
        "tokens_evaluated": s.prompt_tokens,
        "generation_settings": settings(m, r),
        "prompt": s.prompt_text,
        "has_new_line": c.text.contains('\n'),
        "truncated": false,
        "stop_type": stop_type,
        "stopping_word": word,
        "tokens_cached": s.cached_tokens,
        "timings": {
            "cache_n": s.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": ms(s.prompt_secs),
            "prompt_per_token_ms": prompt_tok_ms,
            "prompt_per_second": prompt_per_s,
            "predicted_n": s.completion_tokens,
            "predicted_ms": ms(s.decode_secs),
            "predicted_per_token_ms": predicted_tok_ms,
            "predicted_per_second": predicted_per_s,
        },
    });
    if r.logprobs.is_some() && !streamed {
        v["completion_probabilities"] = probabilities(&c.entries);
    }
    v
}

/// `response_fields`: only these fields, a nested one (`timings/prompt_n`) moved to the top
/// under its path (llama.cpp's `"timings/prompt_n": 5`); missing ones left out. An empty list
/// leaves the answer whole, as llama.cpp's does.
fn pick(v: Value, fields: Option<&[String]>) -> Value {
    let Some(fields) = fields.filter(|f| !f.is_empty()) else {
        return v;
    };
    let mut out = serde_json::Map::new();
    for f in fields {
        if let Some(x) = f.split('/').try_fold(&v, |cur, part| cur.get(part)) {
            out.insert(f.clone(), x.clone());
        }
    }
    Value::Object(out)
}

/// Server-sent events: one per piece of text (`content`, its `tokens`, with `n_probs` their
/// `completion_probabilities`, `stop: false`), then the result with `stop: true`; an error as
/// an `{"error": ...}` event that ends the stream.
fn stream(
    r: Request,
    shape: Shape,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
    counted: AppState,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    // The text and tokens streamed so far.
    let (mut text, mut ids) = (String::new(), Vec::new());
    let model = counted.model.clone();
    let events = sse_events(first, rx, counted, move |ev| match ev {
        Event::Text {
            text: t,
            tokens,
            logprobs,
            slot,
        } => {
            text.push_str(&t);
            ids.extend(&tokens);
            let mut v = json!({
                "index": 0,
                "content": t,
                "tokens": tokens,
                "stop": false,
                "id_slot": slot,
                "tokens_predicted": ids.len(),
            });
            if r.logprobs.is_some() {
                v["completion_probabilities"] = probabilities(&logprobs);
            }
            (vec![sse_json(v)], false)
        }
        Event::Done(summary) => {
            let c = Collected {
                text: std::mem::take(&mut text),
                tokens: std::mem::take(&mut ids),
                entries: Vec::new(),
                summary,
            };
            let v = result(&model, &r, &shape, 0, &c, true);
            (
                vec![sse_json(pick(v, shape.response_fields.as_deref()))],
                true,
            )
        }
        Event::Failed(e) => (vec![sse_json(e.body())], true),
    });
    Sse::new(events.map(Ok))
}
