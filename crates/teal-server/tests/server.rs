//! The HTTP server on the real SmolLM2 model (f32 weights, context 256): answers against the
//! engine's own generation and llama.cpp's greedy tokens, streaming against whole answers, stop
//! sequences, and bad requests. Skips when the model is not cached, unless
//! TEAL_REQUIRE_ASSETS=1 (scripts/test.sh), where a missing model fails.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::OnceLock;
use teal::chat::{encode_prompt, Message, Prompt};
use teal::device::{CpuDecoder, Decoder};
use teal::generate::{generate, GenerateParams, Models};
use teal::sampler::{Penalties, SamplerConfig};
use teal::ModelFiles;
use teal_server::{router, run_engine, Event, Job, ModelInfo, Summary};
use tower::ServiceExt;

const CTX: usize = 256;

fn smollm2() -> Option<PathBuf> {
    teal::assets::test_model("TEAL_SMOLLM2_GGUF", teal::assets::DEFAULT_MODEL_FILE).unwrap()
}

/// An engine thread of its own on the model at `path`, with `slots` KV caches.
fn spawn_engine(path: PathBuf, slots: usize) -> Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_engine_on(path, slots, CTX, rx);
    tx
}

/// [`spawn_engine`] with a context of `ctx`, taking its jobs from `rx` (where some may wait
/// already).
fn spawn_engine_on(path: PathBuf, slots: usize, ctx: usize, rx: std::sync::mpsc::Receiver<Job>) {
    std::thread::spawn(move || {
        let files = ModelFiles::open(&path).unwrap();
        let model = files.load_model().unwrap();
        let mut decs: Vec<CpuDecoder> = (0..slots)
            .map(|_| CpuDecoder::new(Models::single(&model), ctx))
            .collect();
        let slots = decs.iter_mut().map(|d| d as &mut dyn Decoder).collect();
        run_engine(slots, &files.tokenizer, rx);
    });
}

/// The engine thread, shared by every test of this file (jobs queue up), and the model path.
fn engine() -> Option<(Sender<Job>, PathBuf)> {
    static ENGINE: OnceLock<(Sender<Job>, PathBuf)> = OnceLock::new();
    let path = smollm2()?;
    Some(
        ENGINE
            .get_or_init(|| (spawn_engine(path.clone(), 1), path))
            .clone(),
    )
}

fn app(tx: Sender<Job>) -> axum::Router {
    router(
        tx,
        ModelInfo {
            id: "smollm2".into(),
            ctx: CTX,
            slots: 1,
            meta: json!({"sparsity": 0.0}),
        },
        Default::default(),
    )
}

/// Sends `body` to `uri` (GET when `None`) and returns the status and the raw body.
async fn call(tx: &Sender<Job>, uri: &str, body: Option<&str>) -> (StatusCode, String) {
    let req = match body {
        Some(b) => Request::post(uri).body(Body::from(b.to_string())),
        None => Request::get(uri).body(Body::empty()),
    }
    .unwrap();
    let res = app(tx.clone()).oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn call_json(tx: &Sender<Job>, uri: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(tx, uri, Some(&body.to_string())).await;
    (
        s,
        serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b}")),
    )
}

/// Sends `body` to `uri` and checks that it gets a 400 whose message contains `needle`.
async fn expect_400(tx: &Sender<Job>, uri: &str, body: Value, needle: &str) {
    let (s, v) = call_json(tx, uri, body.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{uri} {body}: {v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{uri} {body}: {msg}");
}

/// The `data:` payloads of a server-sent event stream, `[DONE]` as a string.
fn sse_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_string())))
        .collect()
}

/// Greedy sampling settings.
fn greedy() -> SamplerConfig {
    SamplerConfig {
        temperature: 0.0,
        ..Default::default()
    }
}

/// The text of the engine itself for `prompt`, up to `n` tokens (stopping at EOS).
fn engine_text(
    path: &std::path::Path,
    prompt: &Prompt,
    n: usize,
    sampler: SamplerConfig,
) -> String {
    engine_generation(path, prompt, n, sampler, true).0
}

/// The engine's own text for `prompt`, up to `n` tokens, and how many tokens it generated.
fn engine_generation(
    path: &std::path::Path,
    prompt: &Prompt,
    n: usize,
    sampler: SamplerConfig,
    stop_at_eos: bool,
) -> (String, usize) {
    let files = ModelFiles::open(path).unwrap();
    let model = files.load_model().unwrap();
    let ids = encode_prompt(&files.tokenizer, prompt).unwrap();
    let params = GenerateParams {
        max_tokens: n,
        sampler,
        ctx: CTX,
        stop_at_eos,
        logprobs: None,
        prompt_logprobs: false,
        prefill_chunk: None,
        special: false,
    };
    let mut text = String::new();
    let g = generate(
        Models::single(&model),
        &files.tokenizer,
        &ids,
        &params,
        |_, p, _| {
            text.push_str(p);
            true
        },
    )
    .unwrap();
    (text, g.tokens.len())
}

/// Greedy completion: llama.cpp's continuation of the same prompt (the text that
/// `crates/teal/tests/real_models.rs` checks token by token), with usage and the finish reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completion_matches_llama_cpp_and_streams_the_same_text() {
    let Some((tx, _)) = engine() else { return };
    let req = json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let (s, v) = call_json(&tx, "/v1/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "smollm2");
    assert_eq!(v["choices"][0]["text"], " Paris.\n\nThe answer is: 201");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 17);
    assert!(v["timings"]["predicted_per_second"].as_f64().unwrap() > 0.0);

    let mut streamed = req;
    streamed["stream"] = json!(true);
    let (s, body) = call(&tx, "/v1/completions", Some(&streamed.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let events = sse_data(&body);
    assert_eq!(events.last().unwrap(), "[DONE]", "{body}");
    let chunks = &events[..events.len() - 1];
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, " Paris.\n\nThe answer is: 201");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["timings"]["predicted_n"], 12);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
}

/// Chat: the model's own template (text parts joined with line breaks), the engine's greedy
/// answer, streamed as deltas after a first chunk that names the role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_is_the_engines_answer_whole_and_streamed() {
    let Some((tx, path)) = engine() else { return };
    let msgs = vec![
        Message::new("system", "You are brief."),
        Message::new("user", "What is\n2+2?"),
    ];
    let expected = engine_text(&path, &Prompt::Chat(msgs), 40, greedy());
    assert!(!expected.is_empty());
    let req = json!({
        "model": "anything",
        "messages": [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]},
        ],
        "max_tokens": 40,
        "temperature": 0,
        "frequency_penalty": 0,
    });
    let (s, v) = call_json(&tx, "/v1/chat/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());

    let mut streamed = req;
    streamed["stream"] = json!(true);
    let (s, body) = call(&tx, "/v1/chat/completions", Some(&streamed.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let events = sse_data(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events[1..events.len() - 1]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected);
    assert_eq!(
        events[events.len() - 2]["choices"][0]["finish_reason"],
        v["choices"][0]["finish_reason"]
    );
}

/// The sampling settings reach the engine: greedy with llama.cpp's repeat penalty and OpenAI's
/// presence and frequency penalties gives the engine's own text with the same settings (not
/// the plain greedy one), and a seeded sampled answer without settings is the engine's with
/// llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), `n` choices
/// each with its own seed. Each request runs its whole prompt, as the library call does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_settings_reach_the_engine() {
    let Some((tx, path)) = engine() else { return };
    let prompt = Prompt::Text("The capital of France is".into());
    let penalized = SamplerConfig {
        penalties: Penalties {
            last_n: 64,
            repeat: 1.3,
            presence: 0.4,
            frequency: 0.2,
        },
        ..greedy()
    };
    let expected = engine_text(&path, &prompt, 24, penalized);
    assert_ne!(expected, engine_text(&path, &prompt, 24, greedy()));
    let req = json!({
        "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0,
        "repeat_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.2,
        "cache_prompt": false,
    });
    let (s, v) = call_json(&tx, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], expected.as_str());

    let defaults = SamplerConfig {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        seed: 5,
        ..Default::default()
    };
    // Three choices: choice j samples with seed 5 + j; usage counts the prompt once.
    let req = json!({"prompt": "The capital of France is", "max_tokens": 24, "seed": 5,
                     "n": 3, "cache_prompt": false});
    let (s, v) = call_json(&tx, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (j, c) in choices.iter().enumerate() {
        let cfg = SamplerConfig {
            seed: 5 + j as u64,
            ..defaults.clone()
        };
        assert_eq!(c["index"], j);
        assert_eq!(c["text"], engine_text(&path, &prompt, 24, cfg).as_str());
    }
    assert_ne!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 72);
}

/// Two slots on an engine of their own: two conversations that alternate each keep their cache
/// (with one slot each would run whole), a third prompt takes the least recently used slot, and
/// every answer is the engine's fresh greedy answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_keep_a_cache_per_conversation() {
    let Some(path) = smollm2() else { return };
    let tx = spawn_engine(path.clone(), 2);
    let complete = |prompt: String| {
        let tx = tx.clone();
        async move {
            let req = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
            let (s, v) = call_json(&tx, "/v1/completions", req).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let usage = &v["usage"];
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap(),
                usage["prompt_tokens"].as_u64().unwrap(),
            )
        }
    };
    let a = "The capital of France is".to_string();
    let b = "Once upon a time, in a small village,".to_string();
    let (answer_a, cached, _) = complete(a.clone()).await;
    assert_eq!(cached, 0);
    let (answer_b, cached, _) = complete(b.clone()).await;
    assert_eq!(cached, 0, "the second conversation takes the empty slot");
    // Each continues on its own slot: the prompt and the 11 answer tokens that were run.
    let a2 = format!("{a}{answer_a} Its");
    let (text, cached, _) = complete(a2.clone()).await;
    assert_eq!(cached, 16);
    assert_eq!(text, engine_text(&path, &Prompt::Text(a2), 12, greedy()));
    let b2 = format!("{b}{answer_b} The");
    let (text, cached_b, n_b) = complete(b2.clone()).await;
    assert!(cached_b > 10, "{cached_b} of {n_b}");
    assert_eq!(
        text,
        engine_text(&path, &Prompt::Text(b2.clone()), 12, greedy())
    );
    // A third prompt replaces the least recently used slot (the first conversation's), so the
    // second conversation still finds its cache.
    let (_, cached, _) = complete("Water boils at".into()).await;
    assert_eq!(cached, 0);
    let (_, cached, n) = complete(b2).await;
    assert_eq!(cached, n - 1);
}

/// Prompt caching on an engine of its own (so that no other test's request comes between):
/// a repeated prompt reuses all but its last token, a prompt that continues the previous
/// prompt and answer reuses both, and a chat's second turn its first; every answer is the
/// engine's fresh greedy answer to the same prompt. `"cache_prompt": false` reuses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_cache_reuses_the_shared_prefix() {
    let Some(path) = smollm2() else { return };
    let tx = spawn_engine(path.clone(), 1);
    let complete = |prompt: String, cache: bool| {
        let tx = tx.clone();
        async move {
            let req = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "cache_prompt": cache});
            let (s, v) = call_json(&tx, "/v1/completions", req).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            assert_eq!(v["timings"]["cache_n"], cached);
            assert_eq!(
                v["timings"]["prompt_n"].as_u64().unwrap() + cached,
                v["usage"]["prompt_tokens"].as_u64().unwrap()
            );
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                cached,
            )
        }
    };
    let first = "The capital of France is".to_string();
    let answer = " Paris.\n\nThe answer is: 201";
    assert_eq!(complete(first.clone(), true).await, (answer.into(), 0));
    assert_eq!(complete(first.clone(), true).await, (answer.into(), 4));
    assert_eq!(complete(first.clone(), false).await, (answer.into(), 0));

    // The 5 prompt tokens and the 11 answer tokens that were run (the 12th was not): the
    // answer's text tokenizes back to the generated tokens.
    let longer = format!("{first}{answer} The capital of Italy is");
    let expected = engine_text(&path, &Prompt::Text(longer.clone()), 12, greedy());
    let (text, cached) = complete(longer, true).await;
    assert_eq!(text, expected);
    assert_eq!(cached, 16);

    let mut msgs = vec![json!({"role": "user", "content": "What is 2+2?"})];
    let chat = |msgs: Vec<Value>| {
        let tx = tx.clone();
        async move {
            let req = json!({"messages": msgs, "max_tokens": 24, "temperature": 0});
            let (s, v) = call_json(&tx, "/v1/chat/completions", req).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            (
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                v["usage"]["prompt_tokens"].as_u64().unwrap(),
                v["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap(),
            )
        }
    };
    let (reply, first_prompt, _) = chat(msgs.clone()).await;
    msgs.push(json!({"role": "assistant", "content": reply}));
    msgs.push(json!({"role": "user", "content": "And 3+3?"}));
    let expected = engine_text(
        &path,
        &Prompt::Chat(vec![
            Message::new("user", "What is 2+2?"),
            Message::new("assistant", reply.as_str()),
            Message::new("user", "And 3+3?"),
        ]),
        24,
        greedy(),
    );
    let (second, _, cached) = chat(msgs).await;
    assert_eq!(second, expected);
    assert!(
        cached > first_prompt,
        "cached {cached} of the first turn's {first_prompt}"
    );

    // Scoring two choices of one question: the second reuses the context's cached positions
    // and log-probability entries (all but the last shared token, whose entry needs the
    // logits before it), and its entries equal those of a run without the cache. More
    // alternatives than were kept reuse nothing.
    let score = |prompt: &str, k: usize, cache: bool| {
        let tx = tx.clone();
        let req = json!({"prompt": prompt, "echo": true, "logprobs": k, "max_tokens": 1,
                         "temperature": 0, "cache_prompt": cache});
        async move {
            let (s, v) = call_json(&tx, "/v1/completions", req).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            (v["choices"][0]["logprobs"].clone(), cached)
        }
    };
    let (_, cached) = score("The capital of France is Paris", 2, true).await;
    assert_eq!(cached, 0);
    let (reused, cached) = score("The capital of France is Rome", 2, true).await;
    assert_eq!(cached, 4);
    let (fresh, cached) = score("The capital of France is Rome", 2, false).await;
    assert_eq!(cached, 0);
    assert_eq!(reused["tokens"], fresh["tokens"]);
    let lps = |v: &Value, key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| match e {
                Value::Object(m) => m.values().map(|x| x.as_f64().unwrap()).collect(),
                e => e.as_f64().into_iter().collect::<Vec<_>>(),
            })
            .collect()
    };
    for key in ["token_logprobs", "top_logprobs"] {
        let (a, b) = (lps(&reused, key), lps(&fresh, key));
        assert_eq!(a.len(), b.len(), "{key}");
        // The reused run computes the last positions in a batch of their own: f32 sums in
        // another order, far below 1e-4.
        assert!(
            a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4),
            "{key}: {a:?} vs {b:?}"
        );
    }
    let (_, cached) = score("The capital of France is Paris", 2, true).await;
    assert_eq!(cached, 4);
    let (_, cached) = score("The capital of France is Rome", 5, true).await;
    assert_eq!(cached, 0);
}

/// Scoring as lm-evaluation-harness's `local-completions` does it: token ids, `echo`,
/// `logprobs`. The first 200 tokens of WikiText-2's first P512 window (the ids llama.cpp
/// tokenized) with `max_tokens` 0: each token's log-probability is minus llama.cpp's NLL for
/// it (tools/reference/llamacpp/results.json, the same f32 weights and an f32 KV cache), and
/// the most likely alternative is llama.cpp's argmax. Then a batch of two prompts with one
/// generated token each: two choices, the prompt echoed, the greedy token the top entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_with_echo_and_logprobs_matches_llama_cpp() {
    let Some((tx, path)) = engine() else { return };
    let refp = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/reference/llamacpp/results.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(refp).unwrap()).unwrap();
    let ppl = &reference["f32"]["ppl"];
    let as_vec = |v: &Value| v.as_array().unwrap().clone();
    let ids: Vec<u64> = as_vec(&ppl["window0_ids"])[..200]
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let req =
        json!({"prompt": ids, "echo": true, "logprobs": 1, "max_tokens": 0, "temperature": 0});
    let (s, v) = call_json(&tx, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let token_lp = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(token_lp.len(), 200);
    assert!(token_lp[0].is_null() && top[0].is_null());
    assert_eq!(v["usage"]["completion_tokens"], 0);
    let files = ModelFiles::open(&path).unwrap();
    let tok = &files.tokenizer;
    let ids32: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    assert_eq!(v["choices"][0]["text"], tok.decode(&ids32).unwrap());
    let (nll, argmax) = (as_vec(&ppl["window0_nll"]), as_vec(&ppl["window0_argmax"]));
    // llama.cpp's per-window mean NLL agrees with teal's to 7e-7 nats (QUALITY.md); per token
    // both are f32 sums in different orders: measured at most 3.0e-5 apart on these 199.
    // 1e-3 leaves room and still catches any real error (a shifted position moves nats).
    let mut worst = 0.0f64;
    for i in 1..200 {
        let got = token_lp[i].as_f64().unwrap();
        worst = worst.max((got + nll[i - 1].as_f64().unwrap()).abs());
        let alt = top[i].as_object().unwrap();
        assert_eq!(alt.len(), 1, "position {i}");
        let want = tok
            .token_str(argmax[i - 1].as_u64().unwrap() as u32)
            .unwrap();
        assert!(
            alt.contains_key(&want),
            "position {i}: {alt:?} vs llama.cpp's {want:?}"
        );
    }
    assert!(
        worst < 1e-3,
        "largest difference from llama.cpp's NLL: {worst}"
    );

    let req = json!({
        "prompt": ["The capital of France is", "1, 2, 3,"],
        "echo": true, "logprobs": 3, "max_tokens": 1, "temperature": 0,
    });
    let (s, v) = call_json(&tx, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], "The capital of France is Paris");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let lp = &c["logprobs"];
        let n = lp["tokens"].as_array().unwrap().len();
        let last = lp["token_logprobs"][n - 1].as_f64().unwrap();
        let alts = lp["top_logprobs"][n - 1].as_object().unwrap();
        assert_eq!(alts.len(), 3);
        let best = alts
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(last, best, "greedy: the generated token is the most likely");
        assert_eq!(lp["text_offset"][0], 0);
    }
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        5 + tok.encode("1, 2, 3,", false).unwrap().len()
    );

    let req = json!({
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "logprobs": true, "top_logprobs": 2, "max_tokens": 4, "temperature": 0,
        "cache_prompt": false,
    });
    let (s, v) = call_json(&tx, "/v1/chat/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    let text: String = content
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(text, v["choices"][0]["message"]["content"]);
    for t in content {
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(t["top_logprobs"][0]["logprob"], t["logprob"]);
        assert_eq!(
            t["bytes"].as_array().unwrap().len(),
            t["token"].as_str().unwrap().len()
        );
    }
    // Streamed, the deltas carry the same entries (no cached prefix in either request, so the
    // same computation).
    let mut streamed = req;
    streamed["stream"] = json!(true);
    let (s, body) = call(&tx, "/v1/chat/completions", Some(&streamed.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let events = sse_data(&body);
    let pieces: Vec<Value> = events[..events.len() - 1]
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(&pieces, content);
}

/// A stop sequence ends the text just before it, whole or streamed; with `logprobs` the entries
/// end with the last token that starts before the stop sequence (here " answer", whose space is
/// the text's last character), and a stream carries the same entries piece by piece, their
/// `text_offset` counted over the whole text. (Each request runs its whole prompt, so that the
/// log-probabilities are computed the same way and compare exactly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_cut_the_text_and_the_logprobs() {
    let Some((tx, _)) = engine() else { return };
    let plain = json!({
        "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "logprobs": 2,
        "cache_prompt": false,
    });
    let (s, v) = call_json(&tx, "/v1/completions", plain.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let all = v["choices"][0]["logprobs"].clone();
    assert_eq!(all["tokens"].as_array().unwrap().len(), 12);
    let cut = " Paris.\n\nThe ";
    let starts_before_cut = all["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .take_while(|o| o.as_u64().unwrap() < cut.chars().count() as u64)
        .count();
    let expected = |key: &str| json!(all[key].as_array().unwrap()[..starts_before_cut]);
    for stream in [false, true] {
        let mut req = plain.clone();
        req["stop"] = json!(["answer", "zzz"]);
        req["stream"] = json!(stream);
        let (s, body) = call(&tx, "/v1/completions", Some(&req.to_string())).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let (text, finish, lp) = if stream {
            let ev = sse_data(&body);
            let chunks = &ev[..ev.len() - 1];
            let t: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            let mut lp =
                json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
            for c in chunks
                .iter()
                .filter(|c| !c["choices"][0]["logprobs"].is_null())
            {
                for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                    let part = c["choices"][0]["logprobs"][key].as_array().unwrap().clone();
                    lp[key].as_array_mut().unwrap().extend(part);
                }
            }
            let last = chunks.last().unwrap()["choices"][0]["finish_reason"].clone();
            (t, last, lp)
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            let c = &v["choices"][0];
            (
                c["text"].as_str().unwrap().to_string(),
                c["finish_reason"].clone(),
                c["logprobs"].clone(),
            )
        };
        assert_eq!(text, cut, "stream: {stream}");
        assert_eq!(finish, "stop");
        assert_eq!(starts_before_cut, 6, "{all}");
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            assert_eq!(lp[key], expected(key), "stream: {stream}, {key}");
        }
    }
}

/// Bad requests: status 400 (404 for an unknown path) and an error object naming the problem;
/// the engine keeps serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let Some((tx, _)) = engine() else { return };
    let long = "word ".repeat(400);
    let cases: Vec<(&str, String, &str)> = vec![
        ("/v1/completions", "{\"prompt\": ".into(), "malformed JSON"),
        ("/v1/completions", "not json".into(), "malformed JSON"),
        (
            "/v1/completions",
            json!({"promt": "x"}).to_string(),
            "missing field `prompt`",
        ),
        (
            "/v1/completions",
            json!({"prompt": 5}).to_string(),
            "a string, a list of strings, a list of token ids",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"], "stream": true}).to_string(),
            "one prompt per streamed request",
        ),
        (
            "/v1/completions",
            json!({"prompt": []}).to_string(),
            "the list is empty",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 99999999]}).to_string(),
            "token id 99999999 is outside the vocabulary of 49152",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 21}).to_string(),
            "at most 20",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string(),
            "needs logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "x"}, {"role": "user"}]}).to_string(),
            "messages[1]: expected 'content' or 'tool_calls'",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "echo": true, "stream": true}).to_string(),
            "echo: not available with stream",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 17}).to_string(),
            "n = 17: from 1 to 16",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 2, "stream": true}).to_string(),
            "n = 2: one choice per streamed request",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}).to_string(),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": -1}).to_string(),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_p": -0.1}).to_string(),
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"prompt": "def f(", "suffix": ")"}).to_string(),
            "no fill-in-the-middle tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"], "suffix": ")"}).to_string(),
            "suffix: needs one text prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "suffix": ")", "echo": true}).to_string(),
            "echo: not available with suffix",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "min_p": 1.5}).to_string(),
            "min_p = 1.5: must be in [0, 1]",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "repeat_penalty": 0}).to_string(),
            "repeat_penalty = 0: must be a finite number > 0",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3})
                .to_string(),
            "presence_penalty = 3: must be in [-2, 2]",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "repeat_last_n": -2}).to_string(),
            "repeat_last_n = -2: must be >= 0, or -1",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "stop": [""]}).to_string(),
            "stop",
        ),
        (
            "/v1/completions",
            json!({"prompt": long}).to_string(),
            "longer than the context of 256",
        ),
        (
            "/v1/completions",
            json!({"prompt": long, "stream": true}).to_string(),
            "longer than the context",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"prompt": "x"}).to_string(),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(),
            "image_url",
        ),
    ];
    for (uri, body, needle) in cases {
        let (s, b) = call(&tx, uri, Some(&body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {b}");
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b}"));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body} -> {msg}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], 400);
    }
    let (s, b) = call(&tx, "/v1/nothing", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(b.contains("/v1/nothing"));

    let (s, v) = call_json(
        &tx,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

/// A prompt that fits but leaves less room than max_tokens ends at the context: `length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_stops_at_the_context() {
    let Some((tx, _)) = engine() else { return };
    let prompt = "one two three four five six seven eight nine ten ".repeat(20);
    let (s, v) = call_json(
        &tx,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 1000, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used <= CTX as u64 + 1, "{v}");
}

/// `/health` and `/v1/models`, also as llama-server's `/v1/health` and `/models`; the model
/// object has OpenAI's fields (`created`: when the server started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_models() {
    let Some((tx, _)) = engine() else { return };
    for uri in ["/health", "/v1/health"] {
        let (s, b) = call(&tx, uri, None).await;
        assert_eq!(
            (s, b.as_str()),
            (StatusCode::OK, "{\"status\":\"ok\"}"),
            "{uri}"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for uri in ["/v1/models", "/models"] {
        let (s, b) = call(&tx, uri, None).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["object"], "list");
        let m = &v["data"][0];
        assert_eq!(m["id"], "smollm2");
        assert_eq!(m["object"], "model");
        assert_eq!(m["owned_by"], "teal");
        assert_eq!(m["context_length"], CTX);
        let created = m["created"]
            .as_u64()
            .unwrap_or_else(|| panic!("{uri}: {m}"));
        assert!(created.abs_diff(now) < 600, "{created} vs {now}");
    }
}

/// `GET /v1/models/{id}` (OpenAI's retrieve, `client.models.retrieve(id)`): the model
/// `/v1/models` lists, by its id, also percent-encoded as OpenAI's Python client sends one with
/// a `/`; another id is a 404 in OpenAI's error shape; open without a key, as `/v1/models`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_retrieved_by_its_id() {
    let Some((tx, _)) = engine() else { return };
    let (_, list) = call(&tx, "/v1/models", None).await;
    let listed = serde_json::from_str::<Value>(&list).unwrap()["data"][0].clone();
    for uri in ["/v1/models/smollm2", "/models/smollm2"] {
        let (s, b) = call(&tx, uri, None).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {b}");
        assert_eq!(serde_json::from_str::<Value>(&b).unwrap(), listed, "{uri}");
    }
    let (s, b) = call(&tx, "/v1/models/llama", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("'llama'") && msg.contains("'smollm2'"),
        "{msg}"
    );
    // An id with a slash, plain and percent-encoded.
    let info = ModelInfo {
        id: "org/smol.gguf".into(),
        ctx: CTX,
        slots: 1,
        meta: json!({}),
    };
    let keys = teal_server::ServeOptions {
        api_keys: vec!["k1".into()],
        ..Default::default()
    };
    let app = router(tx, info, keys);
    for uri in ["/v1/models/org/smol.gguf", "/v1/models/org%2Fsmol.gguf"] {
        let req = Request::get(uri).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{uri}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "org/smol.gguf", "{uri}: {v}");
    }
}

/// The tokenizer endpoints with vLLM's field names (what lm-evaluation-harness's remote
/// tokenizer sends) and llama.cpp's: the ids `teal tokenize` gives, back to the same text; BOS
/// only on request (SmolLM2 adds none by default); an id outside the vocabulary is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_endpoints() {
    let Some((tx, _)) = engine() else { return };
    let (s, info) = call(&tx, "/tokenizer_info", None).await;
    assert_eq!(s, StatusCode::OK, "{info}");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["eos_token"], "<|im_end|>");
    assert_eq!(info["add_eos_token"], false);
    assert_eq!(info["model_max_length"], CTX);
    assert!(info["chat_template"].as_str().unwrap().contains("im_start"));
    let ids = json!([504, 3575, 282, 4649, 314]);
    for body in [
        json!({"prompt": "The capital of France is", "add_special_tokens": false}),
        json!({"content": "The capital of France is", "add_special": true}),
    ] {
        let (s, v) = call_json(&tx, "/tokenize", body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["tokens"], ids);
        assert_eq!(v["count"], 5);
    }
    let (s, v) = call_json(&tx, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["prompt"], "The capital of France is");
    assert_eq!(v["content"], v["prompt"]);
    expect_400(
        &tx,
        "/detokenize",
        json!({"tokens": [1, 99999999]}),
        "99999999",
    )
    .await;
    expect_400(&tx, "/tokenize", json!({"text": "x"}), "prompt").await;
    // llama.cpp's `with_pieces`: each id with its piece, the bytes of a piece that is part of
    // a character; the pieces make up the text.
    let text = "<|im_start|>Llama 🦙";
    let body = json!({"content": text, "with_pieces": true});
    let (s, v) = call_json(&tx, "/tokenize", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens[0]["piece"], "<|im_start|>");
    let mut bytes = Vec::new();
    for t in tokens {
        assert!(t["id"].is_u64(), "{t}");
        match &t["piece"] {
            Value::String(p) => bytes.extend(p.as_bytes()),
            Value::Array(b) => bytes.extend(b.iter().map(|x| x.as_u64().unwrap() as u8)),
            p => panic!("piece {p}"),
        }
    }
    assert_eq!(bytes, text.as_bytes());
    assert!(tokens.iter().any(|t| t["piece"].is_array()), "{v}");
    // llama.cpp's `parse_special` (default true): with false, a control token's text is text.
    let special = |parse: Option<bool>| {
        let mut body = json!({"content": "<|im_start|>"});
        if let Some(p) = parse {
            body["parse_special"] = json!(p);
        }
        let tx = tx.clone();
        async move { call_json(&tx, "/tokenize", body).await.1["tokens"].clone() }
    };
    assert_eq!(special(None).await, json!([1]));
    assert_eq!(special(Some(true)).await, json!([1]));
    let as_text = special(Some(false)).await;
    assert!(as_text.as_array().unwrap().len() > 1, "{as_text}");
    let (_, d) = call_json(&tx, "/detokenize", json!({ "tokens": as_text })).await;
    assert_eq!(d["content"], "<|im_start|>");
}

/// llama.cpp's `/completion`: the greedy answer with its token ids and probabilities, the
/// same text and tokens streamed (events until `stop: true`, no `[DONE]`), a stop word,
/// `response_fields`, a list of prompts and `n_predict` 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_completion_in_llama_cpps_shape() {
    let Some((tx, _)) = engine() else { return };
    let plain = json!({
        "prompt": "The capital of France is", "n_predict": 12, "temperature": 0,
        "return_tokens": true, "n_probs": 2, "cache_prompt": false,
    });
    let (s, v) = call_json(&tx, "/completion", plain.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["content"], " Paris.\n\nThe answer is: 201");
    assert_eq!(v["stop"], true);
    assert_eq!(v["stop_type"], "limit");
    assert_eq!(v["stopping_word"], "");
    assert_eq!(v["tokens_predicted"], 12);
    assert_eq!(v["tokens_evaluated"], 5);
    assert_eq!(v["prompt"], "The capital of France is");
    assert_eq!(v["has_new_line"], true);
    assert_eq!(v["id_slot"], 0);
    assert_eq!(v["generation_settings"]["n_predict"], 12);
    assert_eq!(v["timings"]["predicted_n"], 12);
    let ids = v["tokens"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 12);
    let (_, d) = call_json(&tx, "/detokenize", json!({ "tokens": ids })).await;
    assert_eq!(d["content"], v["content"]);
    let probs = v["completion_probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), 12);
    for (p, id) in probs.iter().zip(&ids) {
        assert_eq!(&p["id"], id);
        let top = p["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(&top[0]["id"], id);
        assert_eq!(top[0]["logprob"], p["logprob"]);
        assert!(p["logprob"].as_f64().unwrap() <= 0.0);
    }

    // Streamed: the same text, tokens and entries, then the result without them.
    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    let (s, body) = call(&tx, "/completion", Some(&streamed.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let events = sse_data(&body);
    let (last, pieces) = events.split_last().unwrap();
    assert!(pieces.iter().all(|e| e["stop"] == false), "{body}");
    assert!(pieces.iter().all(|e| e["id_slot"] == 0), "{body}");
    let text: String = pieces
        .iter()
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, " Paris.\n\nThe answer is: 201");
    let streamed_ids: Vec<Value> = pieces
        .iter()
        .flat_map(|e| e["tokens"].as_array().unwrap().clone())
        .collect();
    assert_eq!(streamed_ids, ids);
    let streamed_probs: Vec<Value> = pieces
        .iter()
        .flat_map(|e| e["completion_probabilities"].as_array().unwrap().clone())
        .collect();
    assert_eq!(&streamed_probs, probs);
    assert_eq!(last["stop"], true);
    assert_eq!(last["stop_type"], "limit");
    assert_eq!(last["content"], "");
    assert_eq!(last["tokens_predicted"], 12);

    // A stop word: the text before it, the tokens that start before it, and the word.
    let mut stopped = plain.clone();
    stopped["stop"] = json!(["zzz", "answer"]);
    let (_, v) = call_json(&tx, "/completion", stopped).await;
    assert_eq!(v["content"], " Paris.\n\nThe ");
    assert_eq!(v["stop_type"], "word");
    assert_eq!(v["stopping_word"], "answer");
    assert_eq!(json!(v["tokens"]), json!(ids[..6]));

    // response_fields: those fields only, nested ones under their path (llama.cpp's
    // `res.body["generation_settings/n_predict"]`); an empty list leaves the answer whole.
    let mut fields = plain.clone();
    fields["response_fields"] = json!(["content", "timings/predicted_n", "missing"]);
    let (_, v) = call_json(&tx, "/completion", fields.clone()).await;
    assert_eq!(
        v,
        json!({"content": " Paris.\n\nThe answer is: 201", "timings/predicted_n": 12})
    );
    fields["response_fields"] = json!([]);
    let (_, v) = call_json(&tx, "/completion", fields).await;
    assert_eq!(v["content"], " Paris.\n\nThe answer is: 201");
    assert_eq!(v["generation_settings"]["n_predict"], 12);

    // A list of prompts (text and token ids): a list of results.
    let (_, t) = call_json(
        &tx,
        "/tokenize",
        json!({"content": "The capital of France is"}),
    )
    .await;
    let req = json!({"prompt": ["The capital of France is", t["tokens"]], "n_predict": 3, "temperature": 0});
    let (s, v) = call_json(&tx, "/completion", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let all = v.as_array().unwrap();
    assert_eq!(all.len(), 2);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["index"], i);
        assert_eq!(r["content"], " Paris.\n");
    }

    // n_predict 0: the prompt only.
    let req = json!({"prompt": "The capital of France is", "n_predict": 0});
    let (s, v) = call_json(&tx, "/completion", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["content"], "");
    assert_eq!(v["tokens_predicted"], 0);
    assert_eq!(v["tokens_evaluated"], 5);
}

/// Token ids and texts in one prompt (llama.cpp's `[12, "text", 34]`): the ids with each
/// text's tokens in its place, on `/completion` (also in a list of prompts) and on the
/// embeddings' `input`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_mix_token_ids_and_text() {
    let Some((tx, _)) = engine() else { return };
    let ids = |text: &str| {
        let tx = tx.clone();
        let text = text.to_string();
        async move {
            let (_, t) = call_json(&tx, "/tokenize", json!({ "content": text })).await;
            t["tokens"].as_array().unwrap().clone()
        }
    };
    let (the, rest) = (ids("The").await, ids(" capital of France").await);
    let mut mixed = the.clone();
    mixed.push(json!(" capital of France"));
    mixed.extend(ids(" is").await);
    let flat: Vec<Value> = the
        .iter()
        .chain(&rest)
        .cloned()
        .chain(ids(" is").await)
        .collect();
    let req = |prompt: Value| json!({"prompt": prompt, "n_predict": 4, "temperature": 0});
    let (s, a) = call_json(&tx, "/completion", req(json!(mixed))).await;
    assert_eq!(s, StatusCode::OK, "{a}");
    let (_, b) = call_json(&tx, "/completion", req(json!(flat))).await;
    assert_eq!(a["content"], b["content"]);
    assert_eq!(a["tokens_evaluated"], flat.len());
    let (s, v) = call_json(&tx, "/completion", req(json!([mixed, "x"]))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v[0]["content"], b["content"]);

    let (s, e) = call_json(&tx, "/v1/embeddings", json!({ "input": mixed })).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    let (_, f) = call_json(&tx, "/v1/embeddings", json!({ "input": flat })).await;
    assert_eq!(e["data"].as_array().unwrap().len(), 1);
    assert_eq!(e["data"][0]["embedding"], f["data"][0]["embedding"]);
    let input = json!(["The capital", flat, mixed]);
    let (s, e) = call_json(&tx, "/v1/embeddings", json!({ "input": input })).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert_eq!(e["data"].as_array().unwrap().len(), 3);
    assert_eq!(e["data"][1]["embedding"], e["data"][2]["embedding"]);
}

/// `samplers` turns off the stages it leaves out: with only top-k listed, the temperature is
/// 1 whatever `temperature` says, and top-p and min-p are off, as OpenAI's endpoint with those
/// settings and the same seed samples. With `infill` listed too, the text is the library's
/// own with the infill stage on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_samplers_choose_the_stages() {
    let Some((tx, path)) = engine() else { return };
    let prompt = "Once upon a time";
    let native = json!({
        "prompt": prompt, "n_predict": 16, "seed": 7, "temperature": 0.0,
        "top_k": 40, "top_p": 0.5, "min_p": 0.3, "samplers": ["top_k"],
    });
    let openai = json!({
        "prompt": prompt, "max_tokens": 16, "seed": 7, "temperature": 1.0,
        "top_k": 40, "top_p": 1.0, "min_p": 0.0,
    });
    let (s, a) = call_json(&tx, "/completion", native.clone()).await;
    assert_eq!(s, StatusCode::OK, "{a}");
    let (_, b) = call_json(&tx, "/v1/completions", openai).await;
    assert_eq!(a["content"], b["choices"][0]["text"]);
    assert_eq!(a["generation_settings"]["temperature"], 1.0);

    let mut with_infill = native;
    with_infill["samplers"] = json!(["top_k", "infill"]);
    let (_, c) = call_json(&tx, "/completion", with_infill).await;
    let cfg = SamplerConfig {
        temperature: 1.0,
        top_k: 40,
        top_p: 1.0,
        min_p: 0.0,
        seed: 7,
        infill: true,
        ..Default::default()
    };
    let want = engine_text(&path, &Prompt::Text(prompt.into()), 16, cfg);
    assert_eq!(c["content"], want.as_str());
}

/// The native endpoints' bad requests: options teal does not implement, bad values, mixed
/// prompts, a slot that does not exist, infilling without FIM tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_bad_requests_name_the_field() {
    let Some((tx, _)) = engine() else { return };
    for (uri, body, needle) in [
        (
            "/completion",
            json!({"prompt": "x", "grammar": "root ::= \"a\" | b"}),
            "grammar: line 1 column 16: rule 'b' is used but not defined",
        ),
        (
            "/completion",
            json!({"prompt": "x", "grammar": "root ::= \"a\"", "json_schema": {"type": "string"}}),
            "grammar and json_schema: give only one",
        ),
        (
            "/completion",
            json!({"prompt": "x", "json_schema": {"type": "string", "pattern": "^a+$"}}),
            "pattern",
        ),
        (
            "/completion",
            json!({"prompt": "x", "mirostat": 2}),
            "mirostat",
        ),
        (
            "/completion",
            json!({"prompt": "x", "samplers": ["top_k", "foo"]}),
            "unknown sampler 'foo'",
        ),
        (
            "/completion",
            json!({"prompt": "x", "seed": -5}),
            "seed = -5",
        ),
        (
            "/completion",
            json!({"prompt": "x", "n_predict": -3}),
            "n_predict = -3",
        ),
        (
            "/completion",
            json!({"prompt": "x", "n_probs": 21}),
            "n_probs = 21",
        ),
        (
            "/completion",
            json!({"prompt": "x", "n_cmpl": 17}),
            "n_cmpl = 17",
        ),
        (
            "/completion",
            json!({"prompt": "x", "n_indent": -1}),
            "n_indent",
        ),
        (
            "/completion",
            json!({"prompt": [1, "x", {"a": 1}]}),
            "expected a string, token ids",
        ),
        ("/completion", json!({"prompt": []}), "empty"),
        (
            "/completion",
            json!({"prompt": "x", "id_slot": 3}),
            "id_slot = 3",
        ),
        ("/completion", json!({"n_predict": 3}), "prompt"),
        (
            "/infill",
            json!({"input_prefix": "def f(", "input_suffix": ")"}),
            "fill-in-the-middle",
        ),
        (
            "/infill",
            json!({"input_prefix": "a", "input_extra": [{"filename": "x"}]}),
            "text",
        ),
        (
            "/apply-template",
            json!({"messages": "hi"}),
            "expected a sequence",
        ),
    ] {
        expect_400(&tx, uri, body, needle).await;
    }
    // Neutral values of the unsupported options pass, as llama.cpp's clients send them.
    let req = json!({
        "prompt": "x", "n_predict": 1, "grammar": "", "mirostat": 0, "typical_p": 1.0,
        "dry_multiplier": 0.0, "logit_bias": [], "t_max_prompt_ms": 500,
    });
    let (s, v) = call_json(&tx, "/completion", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// `/apply-template` renders with the model's template; `/props` names the defaults, slots and
/// template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_template_and_props() {
    let Some((tx, path)) = engine() else { return };
    let files = ModelFiles::open(&path).unwrap();
    let msgs = vec![Message::new("user", "Hi there")];
    let want = teal::chat::render_chat(&files.tokenizer, &msgs).unwrap();
    let (s, v) = call_json(
        &tx,
        "/apply-template",
        json!({"messages": [{"role": "user", "content": "Hi there"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["prompt"], want.as_str());
    assert!(
        want.contains("Hi there") && want.ends_with("assistant\n"),
        "{want}"
    );
    // llama.cpp's `add_generation_prompt: false`: the chat without the assistant's header.
    let (s, v) = call_json(
        &tx,
        "/apply-template",
        json!({"messages": [{"role": "user", "content": "Hi there"}], "add_generation_prompt": false}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["prompt"].as_str().unwrap(),
        want.strip_suffix("<|im_start|>assistant\n").unwrap()
    );
    let (s, b) = call(&tx, "/props", None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["total_slots"], 1);
    assert_eq!(v["default_generation_settings"]["n_ctx"], CTX);
    assert_eq!(v["default_generation_settings"]["params"]["top_k"], 40);
    assert_eq!(v["chat_template"], files.tokenizer.chat_template().unwrap());
}

fn qwen() -> Option<PathBuf> {
    teal::assets::test_model("TEAL_QWEN_GGUF", "Qwen2.5-Coder-0.5B-Instruct.gguf").unwrap()
}

/// The engines the tool-call tests run on, by model: Qwen2.5-Coder (whose template writes the
/// tools) on a slot of its own, and the shared SmolLM2 engine (whose template does not);
/// `None` where the model is not cached.
fn tool_engines() -> [(&'static str, Option<Sender<Job>>); 2] {
    [
        ("qwen", qwen().map(|p| spawn_engine(p, 1))),
        ("smollm2", engine().map(|(tx, _)| tx)),
    ]
}

/// `/infill` on Qwen2.5-Coder: the plain prefix-suffix-middle prompt and its greedy middle;
/// the typed start of the middle after `<|fim_middle|>`; other files in the repository-level
/// format; a prefix too long for the context cut to its end, also through OpenAI's `suffix`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_infill_on_qwen() {
    let Some(path) = qwen() else { return };
    let tx = spawn_engine(path, 1);
    let req = json!({
        "input_prefix": "def add(a, b):\n    ", "input_suffix": "\n    return result\n",
        "n_predict": 8, "temperature": 0,
    });
    let (s, v) = call_json(&tx, "/infill", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["prompt"],
        "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return result\n<|fim_middle|>"
    );
    let content = v["content"].as_str().unwrap();
    assert!(content.starts_with("result = a + b"), "{content:?}");

    let mut typed = req.clone();
    typed["prompt"] = json!("result");
    let (_, v) = call_json(&tx, "/infill", typed).await;
    assert!(
        v["prompt"]
            .as_str()
            .unwrap()
            .ends_with("<|fim_middle|>result"),
        "{v}"
    );
    let content = v["content"].as_str().unwrap();
    assert!(content.starts_with(" = a + b"), "{content:?}");

    let mut extra = req.clone();
    extra["input_extra"] = json!([{"filename": "utils.py", "text": "def helper():\n    pass\n"}]);
    let (s, v) = call_json(&tx, "/infill", extra).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["prompt"],
        "<|repo_name|>myproject\n<|file_sep|>utils.py\ndef helper():\n    pass\n\
         <|file_sep|>filename\n<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    \
         return result\n<|fim_middle|>"
    );

    // 400 lines of prefix in a context of 256: the prefix's end is kept, the whole fits with
    // room for the answer.
    let long: String = (0..400).map(|i| format!("x{i} = {i}\n")).collect();
    let mut cut = req;
    cut["input_prefix"] = json!(format!("{long}def add(a, b):\n    "));
    let (s, v) = call_json(&tx, "/infill", cut).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let prompt = v["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("x399 = 399\ndef add(a, b):\n    <|fim_suffix|>"),
        "{prompt}"
    );
    assert!(!prompt.contains("\nx0 = 0\n"), "{prompt}");
    assert!(
        v["tokens_evaluated"].as_u64().unwrap() <= (CTX - 8) as u64,
        "{v}"
    );

    // OpenAI's `suffix` is cut to fit the same way (it was refused as longer than the context).
    let req = json!({
        "prompt": format!("{long}def add(a, b):\n    "), "suffix": "\n    return result\n",
        "max_tokens": 8, "temperature": 0,
    });
    let (s, v) = call_json(&tx, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() <= (CTX - 8) as u64,
        "{v}"
    );
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("result = a + b"), "{text:?}");
}

/// A generation job for the engine: greedy, `max_tokens`, on `slot` if given, past
/// end-of-sequence tokens; its events come to the returned receiver.
fn greedy_job(
    prompt: &str,
    max_tokens: usize,
    slot: Option<usize>,
) -> (Job, tokio::sync::mpsc::UnboundedReceiver<Event>) {
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job::Generate(Box::new(teal_server::Generate {
        prompt: Prompt::Text(prompt.into()),
        logprobs: None,
        echo: false,
        max_tokens: Some(max_tokens),
        sampler: greedy(),
        stop: Vec::new(),
        cache_prompt: true,
        ignore_eos: true,
        time_limit: None,
        min_indent: 0,
        slot,
        logit_bias: Vec::new(),
        events,
    }));
    (job, rx)
}

/// Receives a job's events up to its summary: its text and summary.
async fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, Summary) {
    let mut text = String::new();
    loop {
        match rx.recv().await.expect("the engine dropped the job") {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Done(s) => return (text, s),
            Event::Failed(e) => panic!("{}", e.message),
        }
    }
}

/// The engine's own greedy text for `prompt`, `n` tokens, not stopping at end of sequence.
fn solo_text(path: &std::path::Path, prompt: &str, n: usize) -> String {
    let (text, count) = engine_generation(path, &Prompt::Text(prompt.into()), n, greedy(), false);
    assert_eq!(count, n);
    text
}

/// Requests on different slots run at the same time: a short request sent while a long one
/// runs on the other slot finishes first, a request for the busy slot waits for it, and every
/// answer is the engine's own greedy answer run alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_different_slots_run_at_the_same_time() {
    let Some(path) = smollm2() else { return };
    let tx = spawn_engine(path.clone(), 2);
    let (long, short, pinned) = (
        "Once upon a time, in a small village,",
        "The capital of France is",
        "Water boils at",
    );
    let (job, mut rx_long) = greedy_job(long, 120, Some(0));
    tx.send(job).unwrap();
    // The long request has started (its prompt has run) before the others are sent.
    let first = match rx_long.recv().await.unwrap() {
        Event::Text { text, .. } => text,
        e => panic!("{e:?}"),
    };
    let files = ModelFiles::open(&path).unwrap();
    let n_tokens = |p: &str| {
        encode_prompt(&files.tokenizer, &Prompt::Text(p.into()))
            .unwrap()
            .len()
    };
    // `/slots` says slot 0 is answering the long request and slot 1 is free.
    let (status, body) = call(&tx, "/slots", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["is_processing"], true, "{v}");
    assert_eq!(v[0]["n_prompt_tokens"], n_tokens(long), "{v}");
    let decoded = v[0]["next_token"]["n_decoded"].as_u64().unwrap() as usize;
    assert!(decoded >= 1, "{v}");
    // Its cache holds the prompt and the answer's tokens run so far (the last one handed out
    // may not have run yet).
    let cached = v[0]["cached_tokens"].as_u64().unwrap() as usize;
    let prompt_len = n_tokens(long);
    assert!(
        (prompt_len + decoded - 1..=prompt_len + decoded).contains(&cached),
        "{v}"
    );
    assert_eq!(
        (&v[1]["is_processing"], &v[1]["n_ctx"]),
        (&json!(false), &json!(CTX))
    );
    let (job, mut rx_short) = greedy_job(short, 6, None);
    tx.send(job).unwrap();
    let (job, mut rx_pinned) = greedy_job(pinned, 6, Some(0));
    tx.send(job).unwrap();
    let (text_short, s_short) = collect(&mut rx_short).await;
    assert_eq!(s_short.slot, 1, "the short request takes the free slot");
    // The long request is still running: its summary has not come.
    let mut text_long = first;
    let done_long = loop {
        match rx_long.try_recv() {
            Ok(Event::Text { text, .. }) => text_long.push_str(&text),
            Ok(Event::Done(s)) => break Some(s),
            Ok(Event::Failed(e)) => panic!("{}", e.message),
            Err(_) => break None,
        }
    };
    assert!(
        done_long.is_none(),
        "the long request ended before the short one"
    );
    // The request for slot 0 waits for the long request, then runs on its slot.
    let (text_pinned, s_pinned) = collect(&mut rx_pinned).await;
    assert_eq!(s_pinned.slot, 0);
    let s_long = loop {
        match rx_long.try_recv() {
            Ok(Event::Text { text, .. }) => text_long.push_str(&text),
            Ok(Event::Done(s)) => break s,
            other => panic!("the long request had not ended: {other:?}"),
        }
    };
    assert_eq!((s_long.slot, s_long.completion_tokens), (0, 120));
    assert_eq!(text_long, solo_text(&path, long, 120));
    assert_eq!(text_short, solo_text(&path, short, 6));
    assert_eq!(text_pinned, solo_text(&path, pinned, 6));
    // Both free again, each holding its last sequence.
    let (_, body) = call(&tx, "/slots", None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    // The last generated token has not been run.
    for (i, want) in [(0, n_tokens(pinned) + 5), (1, n_tokens(short) + 5)] {
        assert_eq!(v[i]["is_processing"], false, "{v}");
        assert_eq!(v[i]["cached_tokens"], want, "{v}");
    }
}

/// A queued request whose client has gone is dropped unrun: the slot's cache does not hold
/// its prompt afterwards (the same prompt sent next reuses nothing, and then, sent again,
/// everything but its last token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_not_run() {
    let Some(path) = smollm2() else { return };
    let tx = spawn_engine(path, 1);
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    drop(rx);
    let prompt = "The capital of France is";
    tx.send(Job::Generate(Box::new(teal_server::Generate {
        prompt: Prompt::Text(prompt.into()),
        logprobs: None,
        echo: false,
        max_tokens: Some(4),
        sampler: greedy(),
        stop: Vec::new(),
        cache_prompt: true,
        ignore_eos: false,
        time_limit: None,
        min_indent: 0,
        slot: None,
        logit_bias: Vec::new(),
        events,
    })))
    .unwrap();
    let req = json!({"prompt": prompt, "n_predict": 4, "temperature": 0});
    let (_, v) = call_json(&tx, "/completion", req.clone()).await;
    assert_eq!(v["tokens_cached"], 0, "{v}");
    let (_, v) = call_json(&tx, "/completion", req).await;
    assert_eq!(v["tokens_cached"], 4, "{v}");
}

/// An embeddings request whose client has gone is dropped before its inputs run: the slot
/// keeps the cache of the answer before it (embedding would have emptied it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_embeddings_are_not_run() {
    let Some(path) = smollm2() else { return };
    let tx = spawn_engine(path, 1);
    let req = json!({"prompt": "The capital of France is", "n_predict": 4, "temperature": 0});
    let (_, v) = call_json(&tx, "/completion", req.clone()).await;
    assert_eq!(v["tokens_cached"], 0, "{v}");
    let (reply, answer) = tokio::sync::oneshot::channel();
    drop(answer);
    tx.send(Job::Embed(vec![Prompt::Text("cats".into()); 3], reply))
        .unwrap();
    let (_, v) = call_json(&tx, "/completion", req).await;
    assert_eq!(v["tokens_cached"], 4, "{v}");
}

/// A running request whose client has gone stops at once, even while nothing of it is sent
/// (its answer all held back as the possible start of a stop sequence, so that no failed send
/// tells the engine): the slot is free again long before the token limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_requests_stop_when_their_client_has_gone() {
    let Some(path) = smollm2() else { return };
    let (prompt, n) = ("Once upon a time, in a small village,", 200);
    let stop = format!("{}\u{1}", solo_text(&path, prompt, n));
    let tx = spawn_engine(path, 1);
    let (mut job, rx) = greedy_job(prompt, n, None);
    if let Job::Generate(g) = &mut job {
        g.stop = vec![stop];
    }
    tx.send(job).unwrap();
    let slot = || async {
        let (_, body) = call(&tx, "/slots", None).await;
        serde_json::from_str::<Value>(&body).unwrap()[0].clone()
    };
    // Each `/slots` is answered between two of the engine's rounds.
    while slot().await["next_token"]["n_decoded"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {}
    drop(rx);
    let s = loop {
        let s = slot().await;
        if s["is_processing"] == false {
            break s;
        }
    };
    // The prompt's tokens and the few generated before the client went.
    assert!(s["cached_tokens"].as_u64().unwrap() < 50, "{s}");
}

/// `logit_bias` by id (OpenAI's object, llama.cpp's pairs) and by text: banning the greedy
/// first token (" Paris") gives the engine's own answer with that ban, pushing another one
/// (" London") makes it the first; bad entries and ids outside the vocabulary get a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_reaches_the_sampler() {
    let Some((tx, path)) = engine() else { return };
    let id = |text: &'static str| {
        let tx = tx.clone();
        async move {
            let (_, t) = call_json(&tx, "/tokenize", json!({ "content": text })).await;
            let ids = t["tokens"].as_array().unwrap().clone();
            assert_eq!(ids.len(), 1, "{text:?}: {ids:?}");
            ids[0].as_u64().unwrap() as u32
        }
    };
    let (paris, london) = (id(" Paris").await, id(" London").await);
    let prompt = "The capital of France is";
    let banned = engine_text(
        &path,
        &Prompt::Text(prompt.into()),
        8,
        SamplerConfig {
            logit_bias: vec![(paris, f32::NEG_INFINITY)],
            ..greedy()
        },
    );
    assert!(!banned.starts_with(" Paris"), "{banned:?}");
    let openai = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "logit_bias": {paris.to_string(): -1e9}});
    let (s, v) = call_json(&tx, "/v1/completions", openai).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], banned.as_str());
    for bias in [json!([[paris, false]]), json!([[" Paris", false]])] {
        let req = json!({"prompt": prompt, "n_predict": 8, "temperature": 0, "logit_bias": bias});
        let (s, v) = call_json(&tx, "/completion", req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["content"], banned.as_str(), "{bias}");
    }
    let req =
        json!({"prompt": prompt, "n_predict": 2, "temperature": 0, "logit_bias": [[london, 100]]});
    let (_, v) = call_json(&tx, "/completion", req).await;
    assert!(v["content"].as_str().unwrap().starts_with(" London"), "{v}");

    for (bias, needle) in [
        (json!({"99999": 1}), "token 99999 is not in the vocabulary"),
        (json!([[1, "x"]]), "logit_bias: expected"),
        (json!([[1, 1e39]]), "logit_bias of token 1 = inf"),
        (json!("x"), "logit_bias: expected"),
    ] {
        let req = json!({"prompt": prompt, "max_tokens": 2, "logit_bias": bias});
        expect_400(&tx, "/v1/completions", req, needle).await;
    }
}

/// With API keys, requests need one (`Authorization: Bearer` or `X-Api-Key`): 401 with an
/// authentication error otherwise; `/health` and `/v1/models` stay open. CORS preflights pass
/// for the allowed origin only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_endpoint_but_health() {
    let Some((tx, _)) = engine() else { return };
    let info = ModelInfo {
        id: "smollm2".into(),
        ctx: CTX,
        slots: 1,
        meta: json!({}),
    };
    let access = teal_server::ServeOptions {
        api_keys: vec!["k1".into(), "sekrit".into()],
        cors_origins: vec!["http://localhost:3000".into()],
        metrics: false,
    };
    let app = router(tx, info, access);
    let send = |uri: &str, header: Option<(&str, &str)>| {
        let mut req = match uri {
            "/tokenize" => Request::post(uri),
            _ => Request::get(uri),
        };
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let body = match uri {
            "/tokenize" => Body::from(r#"{"content": "Hi"}"#),
            _ => Body::empty(),
        };
        app.clone().oneshot(req.body(body).unwrap())
    };
    for uri in ["/health", "/v1/health", "/v1/models", "/models"] {
        assert_eq!(
            send(uri, None).await.unwrap().status(),
            StatusCode::OK,
            "{uri}"
        );
    }
    for (header, why) in [
        (None, "needs an API key"),
        (Some(("authorization", "Bearer nope")), "invalid API key"),
        (Some(("authorization", "sekrit")), "needs an API key"),
    ] {
        let res = send("/tokenize", header).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{header:?}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
    }
    for header in [("authorization", "Bearer sekrit"), ("x-api-key", "k1")] {
        let res = send("/tokenize", Some(header)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{header:?}");
    }
    // CORS: a browser's preflight (no key) from the allowed origin is answered with it; from
    // another origin without it.
    for (origin, allowed) in [
        ("http://localhost:3000", true),
        ("https://evil.example", false),
    ] {
        let req = Request::builder()
            .method("OPTIONS")
            .uri("/v1/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let allow = res.headers().get("access-control-allow-origin");
        assert_eq!(
            allow.is_some_and(|v| v == origin),
            allowed,
            "{origin}: {allow:?}"
        );
    }
}

/// JSON mode (`response_format: {"type": "json_object"}`): greedy and sampled answers are one
/// JSON object, ending (`stop`) when it closes; other response formats get a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_answers_one_object() {
    let Some((tx, _)) = engine() else { return };
    let msg = "Describe a cat as JSON with the keys name, age and color.";
    for (temperature, seed) in [(0.0, 1), (0.8, 5), (1.0, 9)] {
        let req = json!({
            "messages": [{"role": "user", "content": msg}], "max_tokens": 160,
            "temperature": temperature, "seed": seed,
            "response_format": {"type": "json_object"},
        });
        let (s, v) = call_json(&tx, "/v1/chat/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text:?}");
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(parsed.is_object(), "{text:?}");
        eprintln!("json mode, temperature {temperature}: {text}");
    }
    // llama.cpp's json_schema: {} (any JSON) is JSON mode too.
    let req = json!({"prompt": "A JSON object with the name and age of a person:", "n_predict": 120, "temperature": 0, "json_schema": {}});
    let (s, v) = call_json(&tx, "/completion", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let text = v["content"].as_str().unwrap();
    assert_eq!(v["stop_type"], "eos", "{text:?}");
    assert!(
        serde_json::from_str::<Value>(text).is_ok_and(|j| j.is_object()),
        "{text:?}"
    );
    let req = json!({"prompt": "x", "response_format": {"type": "json_schema"}});
    expect_400(&tx, "/v1/completions", req, "json_schema").await;
}

/// A GBNF grammar (llama.cpp's `grammar`) and a JSON Schema (llama.cpp's `json_schema`,
/// OpenAI's `response_format` `json_schema`) shape greedy and sampled answers, which end
/// (`eos`, `stop`) where the grammar is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grammar_and_json_schema_constrain_the_answer() {
    let Some((tx, _)) = engine() else { return };
    let grammar = "root ::= (\"Yes\" | \"No\") \", because \" [a-z ]{1,40} \".\"";
    for (temperature, seed) in [(0.0, 1), (1.0, 3), (1.5, 7)] {
        let req = json!({
            "prompt": "Question: Is Paris the capital of France?\nAnswer:", "n_predict": 64,
            "temperature": temperature, "seed": seed, "grammar": grammar,
        });
        let (s, v) = call_json(&tx, "/completion", req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let text = v["content"].as_str().unwrap();
        assert_eq!(v["stop_type"], "eos", "{text:?}");
        let rest = text
            .strip_prefix("Yes, because ")
            .or_else(|| text.strip_prefix("No, because "))
            .and_then(|r| r.strip_suffix('.'))
            .unwrap_or_else(|| panic!("{text:?}"));
        assert!(
            (1..=40).contains(&rest.len())
                && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b' '),
            "{text:?}"
        );
        eprintln!("grammar, temperature {temperature}: {text}");
    }
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer"},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        },
        "required": ["name", "age"],
    });
    let msg = "Describe a person as JSON with a name, an age and pets.";
    for (temperature, seed) in [(0.0, 1), (1.0, 5)] {
        let req = json!({
            "messages": [{"role": "user", "content": msg}], "max_tokens": 160,
            "temperature": temperature, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        });
        let (s, v) = call_json(&tx, "/v1/chat/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text:?}");
        let p: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let o = p.as_object().unwrap();
        assert!(
            o.keys()
                .all(|k| ["name", "age", "pets"].contains(&k.as_str())),
            "{text}"
        );
        assert!(
            o["name"].as_str().is_some_and(|n| n.chars().count() <= 24),
            "{text}"
        );
        assert!(o["age"].is_i64() || o["age"].is_u64(), "{text}");
        if let Some(pets) = o.get("pets") {
            let pets = pets.as_array().unwrap();
            assert!(pets.len() <= 3, "{text}");
            assert!(pets
                .iter()
                .all(|x| ["cat", "dog", "fish"].contains(&x.as_str().unwrap())));
        }
        eprintln!("json_schema, temperature {temperature}: {text}");
    }
    // The same schema through llama.cpp's json_schema gives the same greedy text.
    let req = json!({
        "messages": [{"role": "user", "content": msg}], "max_tokens": 160,
        "temperature": 0, "json_schema": schema,
    });
    let (s, a) = call_json(&tx, "/v1/chat/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{a}");
    let mut req = req;
    req["response_format"] = json!({"type": "json_object", "schema": schema});
    req.as_object_mut().unwrap().remove("json_schema");
    let (s, b) = call_json(&tx, "/v1/chat/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
}

/// The router of a one-slot SmolLM2 server with `--metrics`, its jobs sent to `jobs`.
fn metrics_router(jobs: std::sync::mpsc::Sender<Job>) -> axum::Router {
    let info = ModelInfo {
        id: "smollm2".into(),
        ctx: CTX,
        slots: 1,
        meta: json!({}),
    };
    let opts = teal_server::ServeOptions {
        metrics: true,
        ..Default::default()
    };
    router(jobs, info, opts)
}

/// `--metrics`: after a whole and a streamed answer (on an engine of its own), `/metrics`
/// counts their tokens in llama.cpp's names, and no request is in flight; without it, 501.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_answers() {
    let Some(path) = smollm2() else { return };
    let tx = spawn_engine(path, 1);
    let app = metrics_router(tx.clone());
    let post = |uri: &'static str, body: Value| {
        let req = Request::post(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let app = app.clone();
        async move {
            let res = app.oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap().to_bytes()
        }
    };
    let prompt = "The capital of France is";
    post(
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "cache_prompt": false}),
    )
    .await;
    post("/completion", json!({"prompt": prompt, "n_predict": 8, "temperature": 0, "stream": true, "cache_prompt": false})).await;
    let req = Request::get("/metrics").body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("llamacpp:{name} ")))
            .unwrap_or_else(|| panic!("{name} missing: {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("prompt_tokens_total"), 10.0, "{text}");
    assert_eq!(value("tokens_predicted_total"), 20.0, "{text}");
    assert_eq!(value("answers_total"), 2.0, "{text}");
    assert_eq!(value("requests_processing"), 0.0, "{text}");
    assert_eq!(value("requests_deferred"), 0.0, "{text}");
    assert!(value("predicted_tokens_seconds") > 0.0, "{text}");
    assert!(text.contains("# TYPE llamacpp:tokens_predicted_total counter"));
    // Off by default.
    let (s, body) = call(&tx, "/metrics", None).await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{body}");
    assert!(body.contains("--metrics"), "{body}");
}

/// `--metrics` counts the prompt tokens reused from the cache, as llama.cpp's
/// `prompt_tokens_cache_total`, and their share of all prompt tokens (`prompt_cache_hit_ratio`):
/// the same prompt twice, the second run from the first's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_cached_prompt_tokens() {
    let Some(path) = smollm2() else { return };
    let tx = spawn_engine(path, 1);
    let app = metrics_router(tx);
    let send = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let res = app.oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        }
    };
    let req = json!({"prompt": "The capital of France is", "n_predict": 4, "temperature": 0});
    let mut cached = 0;
    for _ in 0..2 {
        let post = Request::post("/completion").body(Body::from(req.to_string()));
        let v: Value = serde_json::from_str(&send(post.unwrap()).await).unwrap();
        cached = v["timings"]["cache_n"].as_u64().unwrap();
    }
    assert!(cached > 0);
    let text = send(Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(
        metric(&text, "prompt_tokens_cache_total"),
        cached as f64,
        "{text}"
    );
    let run = metric(&text, "prompt_tokens_total");
    let ratio = metric(&text, "prompt_cache_hit_ratio");
    assert!(
        (ratio - cached as f64 / (cached as f64 + run)).abs() < 1e-9,
        "{text}"
    );
    assert!(text.contains("# TYPE llamacpp:prompt_cache_hit_ratio gauge"));
}

/// The value of `llamacpp:{name}` in a `/metrics` body.
fn metric(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("llamacpp:{name} ")))
        .unwrap_or_else(|| panic!("{name} missing: {text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `requests_processing` counts the requests on a slot and `requests_deferred` those waiting
/// for one (llama.cpp's gauges): with one slot, two requests and a `/metrics` queued before the
/// engine starts, one request runs and the other waits; once both are done, neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_tell_running_requests_from_waiting_ones() {
    let Some(path) = smollm2() else { return };
    let (tx, rx) = std::sync::mpsc::channel();
    let (long, short) = ("Once upon a time, in a small village,", "Water boils at");
    let (job, rx_long) = greedy_job(long, 100, None);
    tx.send(job).unwrap();
    let (job, mut rx_short) = greedy_job(short, 4, None);
    tx.send(job).unwrap();
    // The router's jobs come to the test, which hands them to the engine: the first
    // `/metrics` reaches it behind the two requests, before it has started.
    let (http_tx, http_rx) = std::sync::mpsc::channel::<Job>();
    let app = metrics_router(http_tx);
    let ask = |app: axum::Router| async move {
        let req = Request::get("/metrics").body(Body::empty()).unwrap();
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };
    let asked = tokio::spawn(ask(app.clone()));
    let question = http_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("/metrics asks the engine");
    tx.send(question).unwrap();
    let forward = tx.clone();
    std::thread::spawn(move || http_rx.iter().for_each(|job| forward.send(job).unwrap()));
    spawn_engine_on(path.clone(), 1, CTX, rx);
    let text = asked.await.unwrap();
    assert_eq!(metric(&text, "requests_processing"), 1.0, "{text}");
    assert_eq!(metric(&text, "requests_deferred"), 1.0, "{text}");
    assert!(
        text.contains("# TYPE llamacpp:requests_deferred gauge"),
        "{text}"
    );
    // The long request's client goes: it ends, and the waiting one runs on its slot.
    drop(rx_long);
    let (text_short, _) = collect(&mut rx_short).await;
    assert_eq!(text_short, solo_text(&path, short, 4));
    let text = ask(app).await;
    assert_eq!(metric(&text, "requests_processing"), 0.0, "{text}");
    assert_eq!(metric(&text, "requests_deferred"), 0.0, "{text}");
}

/// Code completion's stops on `/completion`: `n_indent` ends at the first later line indented
/// less (cut before its text), `t_max_predict_ms` at the first token after the time is up once
/// a line break has come (1 ms: well before the 60 tokens asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_code_stops() {
    let Some((tx, _)) = engine() else { return };
    let prompt = "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n";
    let plain = json!({"prompt": prompt, "n_predict": 60, "temperature": 0, "cache_prompt": false});
    let (_, v) = call_json(&tx, "/completion", plain.clone()).await;
    let full = v["content"].as_str().unwrap().to_string();
    assert!(full.starts_with("```\n\nIn this example"), "{full:?}");

    let mut indented = plain.clone();
    indented["n_indent"] = json!(4);
    let (_, v) = call_json(&tx, "/completion", indented).await;
    assert_eq!(v["content"], "```\n\n");
    assert_eq!(v["stop_type"], "limit");

    let mut timed = plain;
    timed["t_max_predict_ms"] = json!(1);
    let (_, v) = call_json(&tx, "/completion", timed).await;
    let text = v["content"].as_str().unwrap();
    assert_eq!(v["stop_type"], "limit", "{v}");
    assert!(text.contains('\n') && full.starts_with(text), "{text:?}");
    assert!(v["tokens_predicted"].as_u64().unwrap() < 60, "{v}");
}

/// Two tools (`get_weather` of a city, `get_time` of nothing) and a user's question that asks
/// for the first.
fn weather_and_time() -> (Value, Value, Value) {
    let weather = json!({"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"]}}});
    let time = json!({"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}}}});
    let user = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    (weather, time, user)
}

/// OpenAI's tool calling on Qwen2.5-Coder (whose template writes the tools) and SmolLM2 (whose
/// template does not: the tools go into the system message): a required call, a named one
/// and parallel calls are well-formed calls of declared tools with valid arguments, whole and
/// streamed; `auto` gives text or well-formed calls; a conversation with a call and its result
/// runs; bad tools get a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_answered_as_openai_does() {
    let (weather, time, user) = weather_and_time();
    let engines = tool_engines();
    for (name, tx) in engines {
        let Some(tx) = tx else { continue };
        for (choice, temperature, parallel) in [
            (json!("required"), 0.0, false),
            (json!("required"), 1.0, false),
            (
                json!({"type": "function", "function": {"name": "get_time"}}),
                0.0,
                true,
            ),
        ] {
            let req = json!({
                "messages": user, "tools": [weather, time], "tool_choice": choice,
                "temperature": temperature, "seed": 3, "max_tokens": 48,
                "parallel_tool_calls": parallel,
            });
            let (s, v) = call_json(&tx, "/v1/chat/completions", req).await;
            assert_eq!(s, StatusCode::OK, "{name}: {v}");
            let c = &v["choices"][0];
            // A model that goes on calling until the token limit cuts a call: the whole
            // calls before it, and the reason `length` (llama.cpp's server does the same).
            let cut = v["usage"]["completion_tokens"] == 48;
            let reason = if cut { "length" } else { "tool_calls" };
            assert_eq!(c["finish_reason"], reason, "{name}: {v}");
            let calls = c["message"]["tool_calls"].as_array().unwrap();
            assert!(
                !calls.is_empty() && (parallel || calls.len() == 1),
                "{name}: {v}"
            );
            for call in calls {
                assert_eq!(call["type"], "function");
                assert!(call["id"].as_str().unwrap().starts_with("call_"));
                let f = &call["function"];
                let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
                match f["name"].as_str().unwrap() {
                    "get_weather" => assert!(args["city"].is_string(), "{name}: {v}"),
                    "get_time" => assert_eq!(args, json!({}), "{name}: {v}"),
                    other => panic!("{name}: undeclared tool {other}"),
                }
                if choice.is_object() {
                    assert_eq!(f["name"], "get_time");
                }
            }
            eprintln!("{name} {choice}: {}", c["message"]);
        }
        // auto: text or calls; a call the model starts is well-formed (lazy grammar).
        let req =
            json!({"messages": user, "tools": [weather, time], "temperature": 0, "max_tokens": 48});
        let (s, v) = call_json(&tx, "/v1/chat/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{name}: {v}");
        let c = &v["choices"][0];
        if c["finish_reason"] == "tool_calls" {
            for call in c["message"]["tool_calls"].as_array().unwrap() {
                let args = call["function"]["arguments"].as_str().unwrap();
                assert!(serde_json::from_str::<Value>(args).is_ok(), "{name}: {v}");
            }
        } else {
            assert!(c["message"]["content"].is_string(), "{name}: {v}");
        }
        eprintln!("{name} auto: {}", c["message"]);
        // Streamed: the call's name, then its arguments in pieces, then the reason and
        // [DONE] (see tool_calls_are_streamed_as_they_are_generated).
        let req = json!({"messages": user, "tools": [weather], "tool_choice": "required",
                         "parallel_tool_calls": false, "temperature": 0, "max_tokens": 48,
                         "stream": true});
        let (s, body) = call(&tx, "/v1/chat/completions", Some(&req.to_string())).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let (_, calls, reason) = streamed_message(&body);
        assert_eq!(calls.len(), 1, "{body}");
        assert_eq!((calls[0].index, calls[0].name.as_str()), (0, "get_weather"));
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert!(args["city"].is_string(), "{body}");
        assert_eq!(reason, "tool_calls", "{body}");
        // The call and its result in the conversation (arguments as JSON text, as OpenAI's
        // clients send them); auto: the model may answer in text.
        let req = json!({
            "messages": [
                {"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
            ],
            "tools": [weather], "temperature": 0, "max_tokens": 24,
        });
        let (s, v) = call_json(&tx, "/v1/chat/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{name}: {v}");
        eprintln!("{name} after the result: {}", v["choices"][0]["message"]);
        for (body, needle) in [
            (
                json!({"messages": user, "tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"messages": user, "tools": [weather], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "no tool named 'nope'",
            ),
            (
                json!({"messages": user, "tool_choice": "required"}),
                "no tools are declared",
            ),
            (
                json!({"messages": user, "tools": [weather], "tool_choice": "required", "grammar": "root ::= \"a\""}),
                "tool_choice",
            ),
        ] {
            expect_400(&tx, "/v1/chat/completions", body, needle).await;
        }
    }
}

/// Every declared tool's schema is checked, not only those a grammar uses: a malformed
/// schema of a tool that is not called gets a 400 naming the tool, whatever `tool_choice` or
/// grammar the request has; a keyword a grammar cannot express passes in a tool that is not
/// `strict`, and is refused in a `strict` one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_declared_tool_s_schema_is_checked() {
    let Some((tx, _)) = engine() else { return };
    let tool = |name: &str, params: Value, strict: bool| {
        json!({"type": "function",
               "function": {"name": name, "parameters": params, "strict": strict}})
    };
    let used = tool(
        "get_time",
        json!({"type": "object", "properties": {}}),
        false,
    );
    let dangling = json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/Nope"}}});
    let unused = tool("unused", dangling, false);
    let user = json!([{"role": "user", "content": "What time is it?"}]);
    for extra in [
        json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        json!({"tool_choice": "none"}),
        json!({"tool_choice": "auto", "grammar": "root ::= \"a\""}),
        json!({}),
    ] {
        let mut req = json!({"messages": user, "tools": [used, unused], "max_tokens": 1});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        expect_400(
            &tx,
            "/v1/chat/completions",
            req,
            "tools[1].function.parameters: tool arguments schema of 'unused': /properties/p",
        )
        .await;
    }
    let pattern =
        json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a$"}}});
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let req = |strict: bool| {
        json!({"messages": user, "tools": [used, tool("unused", pattern.clone(), strict)],
               "tool_choice": named, "max_tokens": 1})
    };
    let (s, v) = call_json(&tx, "/v1/chat/completions", req(false)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    expect_400(
        &tx,
        "/v1/chat/completions",
        req(true),
        "'unused': /properties/s: keyword 'pattern' is not supported",
    )
    .await;
}

/// A conversation's calls and results are checked before the template writes them: errors
/// name the message and the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_messages_are_checked() {
    let Some((tx, _)) = engine() else { return };
    let user = json!({"role": "user", "content": "Weather in Paris?"});
    let asked = |arguments: Value| {
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": arguments}}]})
    };
    let result = json!({"role": "tool", "tool_call_id": "call_1", "content": "Sunny"});
    for uri in ["/v1/chat/completions", "/apply-template"] {
        expect_400(
            &tx,
            uri,
            json!({"messages": [user, asked(json!("{\"city\": \"Par")), result], "max_tokens": 1}),
            "messages[1].tool_calls[0].function.arguments: not valid JSON",
        )
        .await;
    }
    // A result answers a call of the assistant message before it (other results between).
    for messages in [
        json!([user, result]),
        json!([result, user]),
        json!([user, {"role": "assistant", "content": "Sunny."}, result]),
        json!([user, asked(json!("{}")), result, user, result]),
    ] {
        let i = messages.as_array().unwrap().len() - 1;
        let i = if messages[0] == result { 0 } else { i };
        for uri in ["/v1/chat/completions", "/apply-template"] {
            let needle = format!("messages[{i}]: a 'tool' message must follow");
            expect_400(
                &tx,
                uri,
                json!({"messages": messages, "max_tokens": 1}),
                &needle,
            )
            .await;
        }
    }
    let two = json!([user, asked(json!("{}")), result, result]);
    let (s, v) = call_json(
        &tx,
        "/v1/chat/completions",
        json!({"messages": two, "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // As JSON text or as an object, whole arguments pass.
    for arguments in [json!("{\"city\": \"Paris\"}"), json!({"city": "Paris"})] {
        let req = json!({"messages": [user, asked(arguments), result], "max_tokens": 1});
        let (s, v) = call_json(&tx, "/v1/chat/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}

/// Under a request's own grammar (no call grammar holds the model), the answer is still read
/// for calls of the declared tools only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_under_a_requests_own_grammar() {
    let Some((tx, _)) = engine() else { return };
    let time = json!({"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}}}});
    let block = |name: &str| {
        format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {{}}}}\n</tool_call>")
    };
    let ask = |grammar: String| {
        json!({"messages": [{"role": "user", "content": "What time is it?"}], "tools": [time],
               "grammar": grammar, "temperature": 0, "max_tokens": 60})
    };
    let rm = block("rm");
    let (s, v) = call_json(
        &tx,
        "/v1/chat/completions",
        ask(format!("root ::= {}", serde_json::to_string(&rm).unwrap())),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert!(c["message"].get("tool_calls").is_none(), "{v}");
    assert_eq!(
        (&c["message"]["content"], &c["finish_reason"]),
        (&json!(rm), &json!("stop"))
    );
    // Call ids are unique across servers: each call here goes to a new router (a restarted
    // server, whose answer ids start again), and a client keys the results by these ids.
    let one = serde_json::to_string(&block("get_time")).unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (s, v) = call_json(&tx, "/v1/chat/completions", ask(format!("root ::= {one}"))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        ids.push(v["choices"][0]["message"]["tool_calls"][0]["id"].clone());
    }
    assert!(ids[0].as_str().unwrap().starts_with("call_"), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
    // Two calls and parallel_tool_calls false: the first one only, whole and streamed.
    let two =
        serde_json::to_string(&format!("{}\n{}", block("get_time"), block("get_time"))).unwrap();
    for stream in [false, true] {
        let mut req = ask(format!("root ::= {two}"));
        req["parallel_tool_calls"] = json!(false);
        req["stream"] = json!(stream);
        let (s, body) = call(&tx, "/v1/chat/completions", Some(&req.to_string())).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let names: Vec<String> = match stream {
            false => serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["message"]
                ["tool_calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["function"]["name"].as_str().unwrap().to_string())
                .collect(),
            true => streamed_message(&body)
                .1
                .into_iter()
                .map(|c| c.name)
                .collect(),
        };
        assert_eq!(names, ["get_time"], "{body}");
    }
}

/// A call of a streamed chat answer.
#[derive(Debug)]
struct StreamedCall {
    index: u64,
    id: String,
    name: String,
    /// The pieces joined, and how many chunks carried one.
    arguments: String,
    pieces: usize,
}

/// A streamed chat answer read back: its content, its calls and its finish reason, checking
/// that the calls come as OpenAI streams them: a call's first delta has its index (the next
/// one), a new id, its type and name and empty arguments, the others its index and a piece of
/// arguments only.
fn streamed_message(body: &str) -> (Value, Vec<StreamedCall>, Value) {
    let events = sse_data(body);
    assert_eq!(events.last().unwrap(), "[DONE]", "{body}");
    // The content as OpenAI's clients accumulate the deltas: null until one carries a string.
    let mut content = Value::Null;
    let mut calls: Vec<StreamedCall> = Vec::new();
    let mut reasons = Vec::new();
    for e in &events[..events.len() - 1] {
        let c = &e["choices"][0];
        if !c["finish_reason"].is_null() {
            reasons.push(c["finish_reason"].clone());
        }
        if let Some(t) = c["delta"]["content"].as_str() {
            content = json!(format!("{}{t}", content.as_str().unwrap_or_default()));
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = d["index"].as_u64().unwrap();
            let f = &d["function"];
            let args = f["arguments"].as_str().unwrap();
            if index == calls.len() as u64 {
                assert_eq!((&d["type"], args), (&json!("function"), ""), "{body}");
                let id = d["id"].as_str().unwrap();
                assert!(id.starts_with("call_"), "{body}");
                let name = f["name"].as_str().unwrap();
                calls.push(StreamedCall {
                    index,
                    id: id.into(),
                    name: name.into(),
                    arguments: String::new(),
                    pieces: 0,
                });
            } else {
                assert_eq!(index + 1, calls.len() as u64, "{body}");
                assert!(d.get("id").is_none() && f.get("name").is_none(), "{body}");
                let call = calls.last_mut().unwrap();
                call.arguments.push_str(args);
                call.pieces += 1;
            }
        }
    }
    assert_eq!(reasons.len(), 1, "{body}");
    let ids: std::collections::HashSet<&String> = calls.iter().map(|c| &c.id).collect();
    assert_eq!(ids.len(), calls.len(), "{body}");
    (content, calls, reasons[0].clone())
}

/// `request` answered whole and streamed: the same content (null for calls only), calls
/// (names and arguments, the streamed pieces joined) and finish reason (where the token limit
/// cut the answer, the stream may have begun one more call, the one cut short); the streamed
/// calls and the reason.
async fn whole_and_streamed(tx: &Sender<Job>, request: &Value) -> (Vec<StreamedCall>, Value) {
    let (calls, v) = whole_and_streamed_answer(tx, request).await;
    (calls, v["choices"][0]["finish_reason"].clone())
}

/// [`whole_and_streamed`]: the streamed calls and the whole answer.
async fn whole_and_streamed_answer(
    tx: &Sender<Job>,
    request: &Value,
) -> (Vec<StreamedCall>, Value) {
    let (s, v) = call_json(tx, "/v1/chat/completions", request.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (s, body) = call(tx, "/v1/chat/completions", Some(&streamed.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (content, calls, reason) = streamed_message(&body);
    let c = &v["choices"][0];
    // The content too as a client accumulates it: null where the answer is calls only.
    assert_eq!(
        (&c["message"]["content"], &c["finish_reason"]),
        (&content, &reason),
        "{v}\n{body}"
    );
    let whole: Vec<(&str, &str)> = c["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let f = &t["function"];
            (
                f["name"].as_str().unwrap(),
                f["arguments"].as_str().unwrap(),
            )
        })
        .collect();
    let mut pieces: Vec<(&str, &str)> = calls
        .iter()
        .map(|c| (c.name.as_str(), c.arguments.as_str()))
        .collect();
    if reason == "length" && pieces.len() == whole.len() + 1 {
        pieces.pop();
    }
    assert_eq!(whole, pieces, "{v}\n{body}");
    (calls, v)
}

/// Tool calls are streamed as they are generated, as OpenAI and llama.cpp's server stream
/// them: the name first, then the arguments a piece at a time, which joined are the
/// arguments of the same answer unstreamed; the content before a call streamed as text; the
/// first call only without `parallel_tool_calls`; a stop sequence after a call. The text is
/// the request's own grammar's (the call grammar holds no such text), in the `<tool_call>`
/// format and in a Markdown code block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_streamed_as_they_are_generated() {
    let Some((tx, _)) = engine() else { return };
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time"}},
    ]);
    let weather = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \
                   \"days\": 3, \"note\": \"\\u00e9t\\u00e9 \\\"ou\\\"\"}}";
    let args = r#"{"city":"Paris","days":3,"note":"été \"ou\""}"#;
    let time = "{\"name\": \"get_time\"}";
    let ask = |text: String| {
        let grammar = format!("root ::= {}", serde_json::to_string(&text).unwrap());
        json!({"messages": [{"role": "user", "content": "Weather and time?"}], "tools": tools,
               "grammar": grammar, "temperature": 0, "max_tokens": 120, "cache_prompt": false})
    };
    let blocks = format!(
        "Let me look.\n<tool_call>\n{weather}\n</tool_call>\n<tool_call>\n{time}\n</tool_call>"
    );
    let (calls, reason) = whole_and_streamed(&tx, &ask(blocks.clone())).await;
    assert_eq!(reason, "tool_calls");
    let got: Vec<(u64, &str, &str)> = calls
        .iter()
        .map(|c| (c.index, c.name.as_str(), c.arguments.as_str()))
        .collect();
    assert_eq!(got, [(0, "get_weather", args), (1, "get_time", "{}")]);
    // A piece of the arguments per token or so, not the whole at once.
    assert!(calls[0].pieces > 5, "{calls:?}");
    // The content comes before the calls, as text.
    let mut req = ask(blocks.clone());
    req["stream"] = json!(true);
    let (_, body) = call(&tx, "/v1/chat/completions", Some(&req.to_string())).await;
    let events = sse_data(&body);
    let first_call = events
        .iter()
        .position(|e| e["choices"][0]["delta"].get("tool_calls").is_some())
        .unwrap();
    let before: String = events[..first_call]
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(before, "Let me look.", "{body}");
    // Without parallel calls: the first one only, whole and streamed.
    let mut req = ask(blocks.clone());
    req["parallel_tool_calls"] = json!(false);
    let (calls, reason) = whole_and_streamed(&tx, &req).await;
    assert_eq!((calls.len(), reason), (1, json!("tool_calls")), "{calls:?}");
    assert_eq!(calls[0].arguments, args);
    // A stop sequence after the first call ends the answer there.
    let mut req = ask(blocks.clone());
    req["stop"] = json!(["</tool_call>"]);
    let (calls, reason) = whole_and_streamed(&tx, &req).await;
    assert_eq!((calls.len(), reason), (1, json!("tool_calls")), "{calls:?}");
    // A stop sequence inside the only call's arguments: the stream had begun the call, but
    // it is no whole call, so both answers end for the stop sequence.
    let mut req = ask(blocks);
    req["stop"] = json!(["Paris"]);
    let (_, v) = call_json(&tx, "/v1/chat/completions", req.clone()).await;
    assert_eq!(v["choices"][0]["finish_reason"], json!("stop"), "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    req["stream"] = json!(true);
    let (_, body) = call(&tx, "/v1/chat/completions", Some(&req.to_string())).await;
    let (_, begun, reason) = streamed_message(&body);
    assert_eq!((begun.len(), reason), (1, json!("stop")), "{body}");
    // A call broken mid-object, then a whole one, without parallel calls: the stream sent the
    // broken one only (it cannot take it back), so it does not end as `tool_calls`; the
    // unstreamed answer has the whole call.
    let broken = format!(
        "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"a\": 1\n</tool_call>\n\
         <tool_call>\n{time}\n</tool_call>"
    );
    let mut req = ask(broken);
    req["parallel_tool_calls"] = json!(false);
    let (_, v) = call_json(&tx, "/v1/chat/completions", req.clone()).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], json!("tool_calls"), "{v}");
    assert_eq!(
        c["message"]["tool_calls"][0]["function"]["name"],
        json!("get_time"),
        "{v}"
    );
    req["stream"] = json!(true);
    let (_, body) = call(&tx, "/v1/chat/completions", Some(&req.to_string())).await;
    let (_, begun, reason) = streamed_message(&body);
    assert_eq!((begun.len(), reason), (1, json!("stop")), "{body}");
    assert_eq!(begun[0].name, "get_weather", "{body}");
    // A code block (as small models write calls with `auto`) is streamed too.
    let fenced = format!("```json\n{weather}\n```");
    let (calls, _) = whole_and_streamed(&tx, &ask(fenced)).await;
    assert_eq!(
        (calls.len(), calls[0].arguments.as_str()),
        (1, args),
        "{calls:?}"
    );
    assert!(calls[0].pieces > 5, "{calls:?}");
    // Text that only looked like a call's start is content, whole and streamed.
    let text = "<tool_call> is a tag; {\"a\": 1}";
    let (calls, reason) = whole_and_streamed(&tx, &ask(text.into())).await;
    assert_eq!((calls.len(), reason), (0, json!("stop")));
}

/// The models' own calls (grammar-constrained for `required` and a named tool, lazily for
/// `auto`), greedy: streamed a piece at a time, the pieces joined are the unstreamed answer's
/// arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_tool_calls_stream_as_their_whole_answers() {
    let (weather, time, user) = weather_and_time();
    let engines = tool_engines();
    for (name, tx) in engines {
        let Some(tx) = tx else { continue };
        for (choice, parallel) in [
            (json!("required"), true),
            (json!("required"), false),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                true,
            ),
            (json!("auto"), true),
        ] {
            let req = json!({
                "messages": user, "tools": [weather, time], "tool_choice": choice,
                "parallel_tool_calls": parallel, "temperature": 0, "max_tokens": 48,
                "cache_prompt": false,
            });
            let (calls, _) = whole_and_streamed(&tx, &req).await;
            eprintln!("{name} {choice} {parallel}: {calls:?}");
            assert!(parallel || calls.len() <= 1, "{name}: {calls:?}");
            if choice != "auto" {
                assert!(!calls.is_empty(), "{name} {choice}");
            }
            // The city's call comes in pieces.
            for c in calls.iter().filter(|c| c.name == "get_weather") {
                assert!(c.pieces > 1, "{name} {choice}: {calls:?}");
            }
        }
    }
}

/// Qwen2.5-Coder with `auto` writes its calls bare (without `<tool_call>`), often in a code
/// fence: the lazy grammar holds such an answer from its start once it begins a call of a
/// declared tool, so that sampled answers (the model free to break a call, or to write syntax
/// after it, where nothing holds it) stream the same calls as they have unstreamed, with valid
/// arguments and nothing else: no content, such as the fence's end after a call that had
/// none (which seeds 2 and 11 wrote before the grammar held bare calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_calls_under_auto_stream_as_their_whole_answers() {
    let Some(tx) = qwen().map(|p| spawn_engine(p, 1)) else {
        return;
    };
    let (weather, time, user) = weather_and_time();
    let mut bare = 0;
    for seed in 0..8 {
        let req = json!({
            "messages": user, "tools": [weather, time], "temperature": 1.0, "seed": seed,
            "max_tokens": 40, "logprobs": true,
        });
        let (calls, v) = whole_and_streamed_answer(&tx, &req).await;
        let c = &v["choices"][0];
        let reason = &c["finish_reason"];
        let text: String = c["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["token"].as_str().unwrap())
            .collect();
        eprintln!("{seed}: {text:?} {reason}");
        if !text.trim_start().starts_with(['{', '[', '`']) {
            continue;
        }
        bare += 1;
        assert!(!calls.is_empty(), "{seed}: {v}");
        assert!(c["message"]["content"].is_null(), "{seed}: {v}");
        let cut = v["usage"]["completion_tokens"] == 40;
        assert_eq!(reason, if cut { "length" } else { "tool_calls" }, "{v}");
        for call in c["message"]["tool_calls"].as_array().unwrap() {
            let f = &call["function"];
            let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
            match f["name"].as_str().unwrap() {
                "get_weather" => assert!(args["city"].is_string(), "{seed}: {v}"),
                name => assert_eq!(name, "get_time", "{seed}: {v}"),
            }
        }
    }
    assert!(bare >= 5, "{bare}");
}

/// `/v1/embeddings`: unit vectors of the hidden size, the library's mean-pooled final states
/// (text and token-id inputs alike), base64 as OpenAI's client asks; the slot's cache is
/// emptied, so a generation afterwards gives the text it gave before; bad inputs get a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_pooled_final_states() {
    let Some((tx, path)) = engine() else { return };
    let gen = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let (_, before) = call_json(&tx, "/v1/completions", gen.clone()).await;
    let texts = [
        "The cat sat on the mat.",
        "Quantum chromodynamics",
        "The cat sat on the mat.",
    ];
    let (s, v) = call_json(&tx, "/v1/embeddings", json!({"input": texts})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let files = ModelFiles::open(&path).unwrap();
    let model = files.load_model().unwrap();
    let mut dec = CpuDecoder::new(Models::single(&model), CTX);
    let data = v["data"].as_array().unwrap();
    let vecs: Vec<Vec<f32>> = data
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let mut tokens = 0;
    for (i, (text, got)) in texts.iter().zip(&vecs).enumerate() {
        assert_eq!(data[i]["index"], i);
        assert_eq!(got.len(), files.config.hidden_size);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        let ids = encode_prompt(&files.tokenizer, &Prompt::Text(text.to_string())).unwrap();
        tokens += ids.len();
        let want = dec.embed(&ids).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-6, "{text}: {diff}");
    }
    assert_eq!(vecs[0], vecs[2]);
    assert_ne!(vecs[0], vecs[1]);
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    // Token ids and base64 give the same vector.
    let ids = encode_prompt(&files.tokenizer, &Prompt::Text(texts[0].into())).unwrap();
    let (s, b) = call_json(
        &tx,
        "/v1/embeddings",
        json!({"input": ids, "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, vecs[0]);
    let (_, after) = call_json(&tx, "/v1/completions", gen).await;
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
    for (body, needle) in [
        (json!({"input": []}), "input: the list is empty"),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "x", "dimensions": 64}), "dimensions"),
        (json!({"input": "word ".repeat(400)}), "input[0]"),
        (json!({"input": [[]]}), "input[0]: empty"),
    ] {
        expect_400(&tx, "/v1/embeddings", body, needle).await;
    }
}

/// llama.cpp's own `/embeddings` (and `/embedding`): `/v1/embeddings`' vectors, answered as
/// its list of `{"index", "embedding": [vector]}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_embeddings_in_llama_cpps_shape() {
    let Some((tx, _)) = engine() else { return };
    let texts = json!(["The cat sat on the mat.", "Quantum chromodynamics"]);
    let (s, oai) = call_json(&tx, "/v1/embeddings", json!({ "input": texts })).await;
    assert_eq!(s, StatusCode::OK, "{oai}");
    for (uri, body) in [
        ("/embeddings", json!({ "input": texts })),
        ("/embedding", json!({ "content": texts })),
    ] {
        let (s, v) = call_json(&tx, uri, body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let all = v.as_array().unwrap_or_else(|| panic!("{uri}: {v}"));
        assert_eq!(all.len(), 2);
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e["index"], i);
            assert_eq!(e["embedding"], json!([oai["data"][i]["embedding"]]));
        }
    }
    expect_400(
        &tx,
        "/embeddings",
        json!({"input": []}),
        "input: the list is empty",
    )
    .await;
}

/// An embeddings request runs a piece of an input per round beside the other slots' answers:
/// two short inputs take a round each, and a long one (over two pieces of 512 tokens) three,
/// in pieces of equal size; a generation of 4 tokens queued with it (both before the engine
/// starts, each on a slot of its own) takes 5 rounds (its prompt, then a token each), and so
/// ends before the embeddings, with the text it gives alone (run whole, the long input would
/// have been answered in the third round, with the generation's second token). Each vector is
/// that input's embedding run whole, bit for bit: the pieces attend to the ones before them,
/// and no piece is short enough to take other kernels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_take_turns_with_generations() {
    let Some(path) = smollm2() else { return };
    let ctx = 2048;
    let files = ModelFiles::open(&path).unwrap();
    let ids = |t: &str| encode_prompt(&files.tokenizer, &Prompt::Text(t.into())).unwrap();
    let long: Vec<String> = (0..130)
        .map(|i| format!("Sentence number {i} is about cats."))
        .collect();
    let texts = [
        "Sentence number 1 is about cats.".to_string(),
        "Sentence number 2 is about dogs.".to_string(),
        long.join(" "),
    ];
    let n_long = ids(&texts[2]).len();
    assert!((1025..=1536).contains(&n_long), "{n_long} tokens");
    let (tx, rx) = std::sync::mpsc::channel();
    let prompt = "The capital of France is";
    let (job, mut rx_gen) = greedy_job(prompt, 4, None);
    tx.send(job).unwrap();
    let inputs = texts.iter().map(|t| Prompt::Text(t.clone())).collect();
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send(Job::Embed(inputs, reply)).unwrap();
    spawn_engine_on(path.clone(), 2, ctx, rx);
    let vectors = answer.await.unwrap().unwrap();
    // The generation's tokens all came while the inputs were embedded.
    let mut text = String::new();
    let summary = loop {
        match rx_gen.try_recv() {
            Ok(Event::Text { text: t, .. }) => text.push_str(&t),
            Ok(Event::Done(s)) => break s,
            other => panic!("the generation had not ended before the embeddings: {other:?}"),
        }
    };
    assert_eq!(summary.completion_tokens, 4);
    assert_eq!(text, solo_text(&path, prompt, 4));
    let model = files.load_model().unwrap();
    let mut dec = CpuDecoder::new(Models::single(&model), ctx);
    assert_eq!(vectors.len(), texts.len());
    for (t, (v, n)) in texts.iter().zip(&vectors) {
        let ids = ids(t);
        assert_eq!(*n, ids.len());
        assert_eq!(*v, dec.embed(&ids).unwrap(), "{n} tokens");
    }
}

/// A value of the wrong type gets a 400 that names its field (the request structs share their
/// options; the error still says which field), on OpenAI's endpoints and llama.cpp's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_errors_name_the_field() {
    let Some((tx, _)) = engine() else { return };
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": "ten"}),
            "max_tokens: invalid type: string \"ten\", expected usize",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "temperature": "hot"}),
            "temperature: invalid type: string \"hot\"",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "logprobs": true}),
            "logprobs: invalid type: boolean `true`",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "seed": -2}),
            "seed = -2: must be >= 0, or -1 for a random seed",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "seed": 1.5}),
            "seed: invalid type: floating point",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "stream": "yes"}),
            "stream: invalid type: string \"yes\"",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 1e3}),
            "max_tokens: invalid type: floating point",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "stop": 5}),
            "stop: a string or a list of strings",
        ),
        (
            "/v1/completions",
            json!({"prompt": 5}),
            "prompt: a string, a list of strings",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "stream_options": {"include_usage": 1}}),
            "stream_options.include_usage: invalid type: integer `1`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_tokens": "ten"}),
            "max_tokens: invalid type: string \"ten\"",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": 2}),
            "logprobs: invalid type: integer `2`, expected a boolean",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content: a string or a list of content parts",
        ),
        (
            "/completion",
            json!({"prompt": "hi", "n_predict": "ten"}),
            "n_predict: invalid type: string \"ten\"",
        ),
        (
            "/infill",
            json!({"input_prefix": "def f(", "temperature": "hot"}),
            "temperature: invalid type: string \"hot\"",
        ),
    ];
    for (uri, body, needle) in cases {
        expect_400(&tx, uri, body, needle).await;
    }
    // llama.cpp's -1s: a random seed, no top-k cut.
    let req = json!({"prompt": "hi", "seed": -1, "top_k": -1, "max_tokens": 2});
    let (s, v) = call_json(&tx, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Missing fields are named as before.
    expect_400(
        &tx,
        "/v1/completions",
        json!({"max_tokens": 3}),
        "missing field `prompt`",
    )
    .await;
}

/// OpenAI's `developer` role is the system message (not a turn after the template's default
/// system prompt); other roles reach the template as llama.cpp passes them; text parts are
/// joined with line breaks, as llama.cpp joins them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_roles_and_content_parts() {
    let Some((tx, _)) = engine() else { return };
    let chat = |role: &str, content: Value| json!({"messages": [{"role": role, "content": content}, {"role": "user", "content": "Hi"}]});
    let template = |body: Value| {
        let tx = tx.clone();
        async move {
            let (s, v) = call_json(&tx, "/apply-template", body).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["prompt"].as_str().unwrap().to_string()
        }
    };
    let system = template(chat("system", json!("Be brief."))).await;
    assert_eq!(
        template(chat("developer", json!("Be brief."))).await,
        system
    );
    assert!(!system.contains("developer"), "{system}");

    // Through the chat endpoint: the same prompt.
    let mut tokens = Vec::new();
    for role in ["system", "developer"] {
        let mut body = chat(role, json!("Be brief."));
        body["max_tokens"] = json!(1);
        let (s, v) = call_json(&tx, "/v1/chat/completions", body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        tokens.push(v["usage"]["prompt_tokens"].clone());
    }
    assert_eq!(tokens[0], tokens[1]);

    let ipython = template(chat("ipython", json!("{\"result\": 4}"))).await;
    assert!(ipython.contains("ipython"), "{ipython}");

    let parts = json!([{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]);
    assert_eq!(
        template(chat("user", parts)).await,
        template(chat("user", json!("Hello\nworld"))).await
    );
}

/// Streamed answers carry `usage` only with `stream_options.include_usage`, as OpenAI's: then
/// in one more chunk before `[DONE]`, with no choices; llama.cpp's `timings` stay on the chunk
/// with the finish reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_usage_only_when_asked() {
    let Some((tx, _)) = engine() else { return };
    let bodies = [
        (
            "/v1/completions",
            json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                   "cache_prompt": false}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                   "temperature": 0, "cache_prompt": false}),
        ),
    ];
    for (uri, body) in bodies {
        let (s, whole) = call_json(&tx, uri, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{whole}");
        for include in [None, Some(false), Some(true)] {
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            if let Some(i) = include {
                streamed["stream_options"] = json!({"include_usage": i});
            }
            let (s, b) = call(&tx, uri, Some(&streamed.to_string())).await;
            assert_eq!(s, StatusCode::OK, "{b}");
            let events = sse_data(&b);
            assert_eq!(events.last().unwrap(), "[DONE]", "{b}");
            let mut chunks = events[..events.len() - 1].to_vec();
            if include == Some(true) {
                let last = chunks.pop().unwrap();
                assert_eq!(last["choices"], json!([]), "{last}");
                assert_eq!(last["object"], chunks[0]["object"]);
                assert_eq!(last["id"], chunks[0]["id"]);
                assert_eq!(last["usage"], whole["usage"], "{last}");
                assert!(last.get("timings").is_none(), "{last}");
            }
            assert!(
                chunks.iter().all(|c| c["usage"].is_null()),
                "{uri} {include:?}: {b}"
            );
            let finish = chunks.last().unwrap();
            assert_eq!(finish["choices"][0]["finish_reason"], "length", "{b}");
            assert_eq!(finish["timings"]["predicted_n"], 4, "{finish}");
        }
    }
}

/// Answers other than 200 are the usual JSON error, also where axum answers by itself: a method
/// an endpoint does not take (405, with `Allow`) and a body over the size limit (413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_for_every_status() {
    let Some((tx, _)) = engine() else { return };
    let send = |method: &str, uri: &str, body: String| {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .unwrap();
        app(tx.clone()).oneshot(req)
    };
    let big = json!({"prompt": "x".repeat(3 << 20)}).to_string();
    let cases = [
        ("GET", "/v1/completions", String::new(), 405, "POST"),
        ("POST", "/v1/models", "{}".to_string(), 405, "GET"),
        ("DELETE", "/v1/chat/completions", String::new(), 405, "POST"),
        ("POST", "/v1/completions", big, 413, ""),
    ];
    for (method, uri, body, status, allow) in cases {
        let res = send(method, uri, body).await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{method} {uri}");
        let header = |name: &str| {
            res.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        assert_eq!(header("content-type"), "application/json", "{method} {uri}");
        assert!(header("allow").contains(allow), "{method} {uri}");
        let b = res.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}: {b:?}"));
        assert_eq!(v["error"]["code"], status, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty(), "{v}");
    }
}

/// llama-server's `/chat/completions` (without `/v1`) is the chat endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_v1() {
    let Some((tx, _)) = engine() else { return };
    let body =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0});
    let (s, v) = call_json(&tx, "/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let (_, w) = call_json(&tx, "/v1/chat/completions", body).await;
    assert_eq!(v["choices"], w["choices"]);
}

/// llama.cpp's `ignore_eos` on the OpenAI endpoints too: the answer that ends after a few
/// tokens runs to `max_tokens` instead, with no end token sampled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_on_the_openai_endpoints() {
    let Some((tx, _)) = engine() else { return };
    let body = |ignore: bool| {
        json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 40,
               "temperature": 0, "ignore_eos": ignore})
    };
    let (s, v) = call_json(&tx, "/v1/chat/completions", body(false)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let (s, v) = call_json(&tx, "/v1/chat/completions", body(true)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
}

/// Small things of the OpenAI endpoints' errors: they name the field the client sent
/// (`top_logprobs`, `max_completion_tokens`), and an empty list of token ids in a list of
/// prompts is refused before any prompt runs, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_what_was_sent() {
    let Some((tx, _)) = engine() else { return };
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs = 21: at most 20",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_completion_tokens": 0}),
            "max_completion_tokens must be at least 1",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_completion_tokens": 0}),
            "max_completion_tokens must be at least 1",
        ),
        (
            "/v1/completions",
            json!({"prompt": [[504, 3575], []], "max_tokens": 1}),
            "prompt[1] is empty",
        ),
        (
            "/completion",
            json!({"prompt": [[], [504]], "n_predict": 1}),
            "prompt[0] is empty",
        ),
    ];
    for (uri, body, needle) in cases {
        expect_400(&tx, uri, body, needle).await;
    }
    // The first prompt of `[[504, 3575], []]` did not run: no answer is counted.
    let app = metrics_router(tx);
    let body = json!({"prompt": [[504, 3575], []], "max_tokens": 1}).to_string();
    let req = Request::post("/v1/completions").body(Body::from(body));
    let res = app.clone().oneshot(req.unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let req = Request::get("/metrics").body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(
        text.lines().any(|l| l == "llamacpp:answers_total 0"),
        "{text}"
    );
}
