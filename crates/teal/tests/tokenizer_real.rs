//! The tokenizers of the real SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct GGUF files
//! against llama.cpp's ids.
//!
//! The expected ids come from `tools/reference/tokenize_reference.mjs` (llama.cpp through
//! node-llama-cpp 3.21.1, `llama_tokenize(vocab, text, add_special=false, parse_special=true)`),
//! stored in `tests/fixtures/tokenizer/*.json`. The WikiText ranges are read at test time from
//! `../shared/data/wikitext-2-raw-test.raw` beside the workspace.
//!
//! Runs when `TEAL_SMOLLM2_GGUF` / `TEAL_QWEN_GGUF` point to the GGUF files, else skips with a
//! message.

use std::path::{Path, PathBuf};

use serde_json::Value;
use teal::chat::{encode_prompt, Infill, Prompt};
use teal::gguf::{GgufFile, MetaValue};
use teal::tokenizer::{StreamDecoder, Tokenizer};

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

fn wikitext() -> Option<Vec<u8>> {
    let p: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/wikitext-2-raw-test.raw");
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("skipping the WikiText ranges: {} not found", p.display());
            None
        }
    }
}

fn load(var: &str) -> Option<Tokenizer> {
    let Some(path) = std::env::var_os(var) else {
        eprintln!("skipping: set {var} to the GGUF file to run this test");
        return None;
    };
    let g = GgufFile::open(Path::new(&path))
        .unwrap_or_else(|e| panic!("{}: {e}", Path::new(&path).display()));
    let t0 = std::time::Instant::now();
    let t = Tokenizer::from_gguf(&g).unwrap();
    eprintln!(
        "{var}: {} ({} tokens) built in {:.2}s",
        t.kind(),
        t.vocab_size(),
        t0.elapsed().as_secs_f64()
    );
    Some(t)
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Describes where two id sequences first differ, with the tokens around it.
fn diff(t: &Tokenizer, got: &[u32], want: &[u32]) -> String {
    let i = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    let show = |ids: &[u32]| -> String {
        let lo = i.saturating_sub(3);
        let hi = (i + 4).min(ids.len());
        ids[lo..hi]
            .iter()
            .map(|&id| format!("{id}:{:?}", t.token_str(id).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "first difference at index {i} (got {} ids, want {}):\n   got  {}\n   want {}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    )
}

fn stream(t: &Tokenizer, ids: &[u32]) -> String {
    let mut d = StreamDecoder::new(t);
    let mut out = String::new();
    for &id in ids {
        out.push_str(&d.push(id).unwrap());
    }
    out.push_str(&d.finish().unwrap());
    out
}

fn check(t: &Tokenizer, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let mut failures = Vec::new();
    let mut n = 0;
    // `want_text`: what decoding gives back; the text itself, except where llama.cpp's own
    // detokenizer differs (SentencePiece: the dummy-prefix space after special tokens).
    let mut check_one = |name: &str, text: &str, want: &[u32], want_text: &str| {
        n += 1;
        let got = t.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{name}: {}", diff(t, &got, want)));
        }
        let back = t.decode(&got).unwrap();
        if back != want_text {
            failures.push(format!(
                "{name}: decode(encode(s)) = {back:?}, want {want_text:?}"
            ));
        }
        let streamed = stream(t, &got);
        if streamed != want_text {
            failures.push(format!(
                "{name}: streamed decode = {streamed:?}, want {want_text:?}"
            ));
        }
    };
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want_text = case["llama_detokenize"].as_str().unwrap_or(text);
        check_one(
            case["name"].as_str().unwrap(),
            text,
            &ids_of(&case["ids"]),
            want_text,
        );
    }
    if let Some(data) = wikitext() {
        for r in fx["wikitext"]["ranges"].as_array().unwrap() {
            let (s, e) = (
                r["start"].as_u64().unwrap() as usize,
                r["end"].as_u64().unwrap() as usize,
            );
            assert!(
                e <= data.len(),
                "wikitext file shorter than the fixture's range"
            );
            let text = std::str::from_utf8(&data[s..e]).expect("range on character boundaries");
            assert!(r.get("llama_detokenize_differs").is_none());
            check_one(r["name"].as_str().unwrap(), text, &ids_of(&r["ids"]), text);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} texts differ from llama.cpp:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{fixture_name}: {n} texts match llama.cpp");
}

#[test]
fn smollm2_matches_llama_cpp() {
    let Some(t) = load("TEAL_SMOLLM2_GGUF") else {
        return;
    };
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.kind(), "gpt2 byte-level BPE (pre: smollm)");
    assert_eq!(t.bos_id(), Some(1));
    // llama.cpp's end-of-generation set: <|im_end|> (eos), <|endoftext|>, <reponame> (FIM repo).
    assert_eq!(t.eos_ids(), &[2, 0, 4]);
    assert!(!t.add_bos_default());
    // No `add_eos_token`: a text with the model's special tokens is the text alone.
    assert!(!t.add_eos_default());
    assert_eq!(
        t.encode_special("Hi").unwrap(),
        t.encode("Hi", false).unwrap()
    );
    assert!(t.chat_template().unwrap().contains("<|im_start|>"));
    // The SmolLM2 trap: no prefix space after a special token.
    assert_eq!(t.encode("<|im_start|>user", false).unwrap(), vec![1, 4093]);
    assert_eq!(t.token_str(4093).as_deref(), Some("user"));
    assert_eq!(t.encode("Hi", true).unwrap()[0], 1);
    check(&t, "smollm2-135m-instruct.json");

    // A token holding a space and the first byte of a character (27709, " \xe7" of " 猫"): the space
    // comes out with it, not only once the character is complete (a generation stopped there
    // lost it); the character once its last byte comes; a control token leaves no text where
    // the decoder skips them (as generated text does).
    let ids = t.encode("Cat: 猫", false).unwrap();
    let first = ids.iter().position(|&id| id == 27709).unwrap();
    let mut d = StreamDecoder::new(&t);
    let pieces: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    assert!(pieces[first].ends_with(' '), "{pieces:?}");
    assert_eq!(pieces.concat() + &d.finish().unwrap(), "Cat: 猫");
    let mut d = StreamDecoder::with_context(&t, &ids).skip_special(true);
    assert_eq!(d.push(1).unwrap(), "");
    assert_eq!(d.push(4093).unwrap(), "user");

    // The same vocabulary through tokenizer.json + tokenizer_config.json (`Tokenizer::from_file`).
    let dir = tempfile::tempdir().unwrap();
    t.save_json(&dir.path().join("tokenizer.json"), false)
        .unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": t.chat_template().unwrap()
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tj = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tj.eos_ids(), &[2, 0]);
    assert_eq!(tj.chat_template(), t.chat_template());
    check(&tj, "smollm2-135m-instruct.json");
}

#[test]
fn qwen25_coder_matches_llama_cpp() {
    let Some(t) = load("TEAL_QWEN_GGUF") else {
        return;
    };
    assert_eq!(t.vocab_size(), 151936);
    assert_eq!(t.kind(), "gpt2 byte-level BPE (pre: qwen2)");
    // llama.cpp's end-of-generation set: <|im_end|> (eos), </s>, <|endoftext|>, <|fim_pad|>,
    // <|repo_name|>, <|file_sep|>.
    assert_eq!(
        t.eos_ids(),
        &[151645, 128247, 151643, 151662, 151663, 151664]
    );
    assert!(!t.add_bos_default());
    assert!(!t.add_eos_default());
    assert_eq!(
        t.encode_special("Hi").unwrap(),
        t.encode("Hi", false).unwrap()
    );
    assert!(t.chat_template().unwrap().contains("<|im_start|>"));
    check(&t, "qwen2.5-coder-0.5b-instruct.json");
}

/// llama.cpp's SentencePiece path on a realistic vocabulary: the 49k-piece vocabulary that
/// `tools/reference/make_spm_gguf.py from-smollm2` derives from SmolLM2's (byte-level tokens
/// turned into text pieces with `▁` for spaces, score = -id, `<0xXX>` byte tokens), rebuilt here
/// the same way; the reference ids are llama.cpp's for that GGUF.
#[test]
fn spm_from_smollm2_matches_llama_cpp() {
    let Some(path) = std::env::var_os("TEAL_SMOLLM2_GGUF") else {
        eprintln!("skipping: set TEAL_SMOLLM2_GGUF to the GGUF file to run this test");
        return;
    };
    let g = GgufFile::open(Path::new(&path)).unwrap();
    let src: Vec<&str> = g
        .get_array("tokenizer.ggml.tokens")
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let src_types: Vec<i64> = g
        .get_array("tokenizer.ggml.token_type")
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    // GPT-2 byte alphabet, inverted.
    let mut byte_of = std::collections::HashMap::new();
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
        byte_of.insert(c, b as u8);
    }
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    types.extend(std::iter::repeat_n(6, 256));
    tokens.extend(["<|im_start|>".to_string(), "<|im_end|>".to_string()]);
    types.extend([3, 3]);
    let mut scores = vec![0.0f32; tokens.len()];
    let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    for (i, (t, &ty)) in src.iter().zip(&src_types).enumerate() {
        if ty != 1 {
            continue;
        }
        let Some(bytes) = t
            .chars()
            .map(|c| byte_of.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
        else {
            continue;
        };
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        let text = text.replace(' ', "\u{2581}");
        if text.is_empty() || !seen.insert(text.clone()) {
            continue;
        }
        tokens.push(text);
        types.push(1);
        scores.push(-(i as f32));
    }
    assert_eq!(
        tokens.len(),
        49083,
        "the vocabulary make_spm_gguf.py builds"
    );
    let mut meta = std::collections::HashMap::new();
    meta.insert("tokenizer.ggml.model", MetaValue::String("llama".into()));
    meta.insert(
        "tokenizer.ggml.tokens",
        MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()),
    );
    meta.insert(
        "tokenizer.ggml.token_type",
        MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
    );
    meta.insert(
        "tokenizer.ggml.scores",
        MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()),
    );
    meta.insert("tokenizer.ggml.bos_token_id", MetaValue::U32(1));
    meta.insert("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    meta.insert("tokenizer.ggml.unknown_token_id", MetaValue::U32(0));
    let t0 = std::time::Instant::now();
    let t = Tokenizer::from_gguf_metadata(|k| meta.get(k)).unwrap();
    eprintln!(
        "spm-from-smollm2: {} built in {:.2}s",
        t.kind(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(t.kind(), "llama SentencePiece");
    assert!(t.add_bos_default());
    check(&t, "spm-from-smollm2.json");
}

/// Qwen2.5's `<tool_call>` and `</tool_call>` are single (user-defined, not control) tokens:
/// the tool-call grammar lets the model write them as it was trained to, one token each, and
/// no control token.
#[test]
fn tool_call_grammar_takes_qwens_tool_call_tokens() {
    let Some(t) = load("TEAL_QWEN_GGUF") else {
        return;
    };
    let (open, close) = (
        t.token_to_id("<tool_call>").unwrap(),
        t.token_to_id("</tool_call>").unwrap(),
    );
    assert!(!t.is_special(open) && !t.is_special(close));
    let tools = teal::tools::parse_tools(&[serde_json::json!(
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    )])
    .unwrap();
    let g = std::sync::Arc::new(teal::tools::call_grammar(&tools, None, false, false).unwrap());
    let mut m = teal::grammar::GrammarMode::new(g, &t);
    let im_start = t.token_to_id("<|im_start|>").unwrap();
    assert!(m.allows(open) && !m.allows(close) && !m.allows(im_start));
    for id in [open].into_iter().chain(
        t.encode("\n{\"name\": \"f\", \"arguments\": {}}\n", false)
            .unwrap(),
    ) {
        assert!(m.allows(id), "{id}");
        m.accept(id);
    }
    assert!(m.allows(close));
    m.accept(close);
    assert!(m.allows(t.eos_ids()[0]));
}

/// Without special-token parsing (llama.cpp's `parse_special = false`) control tokens written in
/// the text are text, user-defined ones (`<tool_call>`) are still single tokens; an infill's code
/// is tokenized that way, as llama.cpp's `/infill` does, so a prefix that mentions
/// `<|endoftext|>` or `<|fim_middle|>` does not get those control tokens. The ids are llama.cpp's
/// (node-llama-cpp 3.21.1, `tokenize(text, false)`).
#[test]
fn qwen_text_without_special_parsing_matches_llama_cpp() {
    let Some(t) = load("TEAL_QWEN_GGUF") else {
        return;
    };
    for (text, plain, parsed) in [
        (
            "s = '<|endoftext|>'\n",
            &[82, 284, 3857, 91, 8691, 723, 427, 91, 23431][..],
            &[82, 284, 364, 151643, 1248][..],
        ),
        (
            "<|fim_middle|>",
            &[27, 91, 69, 318, 62580, 91, 29],
            &[151660],
        ),
        (
            "<|im_start|>user <tool_call>x",
            &[27, 91, 318, 4906, 91, 29, 872, 220, 151657, 87],
            &[151644, 872, 220, 151657, 87],
        ),
    ] {
        assert_eq!(
            t.encode_with(text, false, false).unwrap(),
            plain,
            "{text:?}"
        );
        assert_eq!(t.encode(text, false).unwrap(), parsed, "{text:?}");
    }
    let f = Infill {
        prefix: "s = '<|endoftext|>'\n".into(),
        suffix: "<|fim_middle|>".into(),
        extra: vec![("a.py".into(), "<|file_sep|>".into())],
        ..Infill::default()
    };
    let ids = encode_prompt(&t, &Prompt::Infill(f)).unwrap();
    let count = |text: &str| {
        let id = t.token_to_id(text).unwrap();
        ids.iter().filter(|&&x| x == id).count()
    };
    assert_eq!(count("<|endoftext|>"), 0);
    assert_eq!(count("<|fim_middle|>"), 1);
    // One before the extra file, one before the current file.
    assert_eq!(count("<|file_sep|>"), 2);
}

/// llama.cpp's infill sampler compares the candidates' texts written without special tokens
/// (`token_to_piece(..., special = false)`: a control token is empty), so `<` does not absorb
/// `<|endoftext|>`, and the end-of-generation token stays a candidate.
#[test]
fn infill_stage_leaves_control_tokens_out_of_prefix_merges() {
    let Some(t) = load("TEAL_QWEN_GGUF") else {
        return;
    };
    let (lt, x, eot) = (
        t.token_to_id("<").unwrap(),
        t.token_to_id("x").unwrap(),
        t.token_to_id("<|endoftext|>").unwrap(),
    );
    let stage = teal::constrain::InfillStage::new(&t);
    let mut cand = vec![(0.5, lt), (0.44, x), (0.06, eot)];
    assert_eq!(stage.apply(&mut cand), 3, "{cand:?}");
    assert_eq!(cand, [(0.5, lt), (0.44, x), (0.06, eot)]);
}
