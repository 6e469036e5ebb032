//! Fast tokenizer tests on tiny hand-made vocabularies given as GGUF metadata (no model file).

use std::collections::HashMap;

use teal::gguf::MetaValue;
use teal::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

fn strs(v: &[&str]) -> MetaValue {
    MetaValue::Array(v.iter().map(|s| MetaValue::String(s.to_string())).collect())
}

fn ints(v: &[i32]) -> MetaValue {
    MetaValue::Array(v.iter().map(|&x| MetaValue::I32(x)).collect())
}

fn floats(v: &[f32]) -> MetaValue {
    MetaValue::Array(v.iter().map(|&x| MetaValue::F32(x)).collect())
}

fn build(meta: &HashMap<String, MetaValue>) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf_metadata(|k| meta.get(k))
}

/// GPT-2's byte-to-unicode table.
fn byte_char(b: u8) -> char {
    let mut n = 0u32;
    for x in 0..=255u8 {
        let printable = (0x21..=0x7E).contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
        if x == b {
            return if printable {
                x as char
            } else {
                char::from_u32(256 + n).unwrap()
            };
        }
        if !printable {
            n += 1;
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------------
// A tiny byte-level BPE vocabulary (SmolLM2-style: `tokenizer.ggml.pre = smollm`).

const BPE_WORDS: &[&str] = &[
    "he", "ll", "llo", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld", "us", "er", "user", "Ġuser",
    "Ġh", "Ġhello", "12",
];
const BPE_MERGES: &[&str] = &[
    "h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "u s", "e r", "us er",
    "Ġ user", "Ġ h", "Ġh ello", "1 2",
];
const BPE_SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

fn bpe_vocab() -> (Vec<String>, HashMap<String, MetaValue>) {
    let mut tokens: Vec<String> = BPE_SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; tokens.len()];
    for b in 0..=255u8 {
        tokens.push(byte_char(b).to_string());
        types.push(1);
    }
    for w in BPE_WORDS {
        tokens.push(w.to_string());
        types.push(1);
    }
    let tok_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut m = HashMap::new();
    m.insert(
        "tokenizer.ggml.model".into(),
        MetaValue::String("gpt2".into()),
    );
    m.insert(
        "tokenizer.ggml.pre".into(),
        MetaValue::String("smollm".into()),
    );
    m.insert("tokenizer.ggml.tokens".into(), strs(&tok_refs));
    m.insert("tokenizer.ggml.token_type".into(), ints(&types));
    m.insert("tokenizer.ggml.merges".into(), strs(BPE_MERGES));
    m.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1));
    m.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2));
    m.insert(
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(false),
    );
    m.insert(
        "tokenizer.chat_template".into(),
        MetaValue::String("{{ messages }}".into()),
    );
    (tokens, m)
}

fn id(tokens: &[String], t: &str) -> u32 {
    tokens
        .iter()
        .position(|x| x == t)
        .unwrap_or_else(|| panic!("{t:?} not in vocab")) as u32
}

#[test]
fn bpe_basic_encode_decode() {
    let (tokens, meta) = bpe_vocab();
    let t = build(&meta).unwrap();
    assert_eq!(t.vocab_size(), tokens.len());
    assert_eq!(t.kind(), "gpt2 byte-level BPE (pre: smollm)");
    let ids = t.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![id(&tokens, "hello"), id(&tokens, "Ġworld")]);
    assert_eq!(t.decode(&ids).unwrap(), "hello world");
    assert_eq!(
        t.token_str(id(&tokens, "Ġworld")).as_deref(),
        Some(" world")
    );
    assert_eq!(
        t.token_text(id(&tokens, "Ġworld")).as_deref(),
        Some("Ġworld")
    );
    assert_eq!(t.encode("", false).unwrap(), Vec::<u32>::new());
    assert_eq!(t.decode(&[]).unwrap(), "");
}

#[test]
fn bpe_special_tokens_parsed_without_prefix_space() {
    let (tokens, meta) = bpe_vocab();
    let t = build(&meta).unwrap();
    // The SmolLM2 trap: "user" right after a special token must not become "Ġuser".
    let ids = t
        .encode("<|im_start|>user\nhello<|im_end|>\n", false)
        .unwrap();
    let nl = id(&tokens, &byte_char(b'\n').to_string());
    assert_eq!(
        ids,
        vec![1, id(&tokens, "user"), nl, id(&tokens, "hello"), 2, nl]
    );
    assert_eq!(
        t.decode(&ids).unwrap(),
        "<|im_start|>user\nhello<|im_end|>\n"
    );
    assert_eq!(t.decode_with(&ids, true).unwrap(), "user\nhello\n");
    assert!(t.is_special(1) && !t.is_special(id(&tokens, "user")));
    // " user" after a special token keeps its space, as a normal word would.
    assert_eq!(
        t.encode("<|im_start|> user", false).unwrap(),
        vec![1, id(&tokens, "Ġuser")]
    );
}

#[test]
fn bpe_digits_split_individually_for_smollm() {
    let (tokens, meta) = bpe_vocab();
    let t = build(&meta).unwrap();
    let d = |c: u8| id(&tokens, &(c as char).to_string());
    // "12" is a token with a merge, but smollm's pre-tokenizer isolates every digit first.
    assert_eq!(
        t.encode("123", false).unwrap(),
        vec![d(b'1'), d(b'2'), d(b'3')]
    );
    // With the plain GPT-2 pre-tokenizer the merge applies.
    let mut meta2 = meta.clone();
    meta2.insert(
        "tokenizer.ggml.pre".into(),
        MetaValue::String("gpt-2".into()),
    );
    let t2 = build(&meta2).unwrap();
    assert_eq!(
        t2.encode("123", false).unwrap(),
        vec![id(&tokens, "12"), d(b'3')]
    );
}

#[test]
fn bpe_bytes_unicode_and_streaming() {
    let (tokens, meta) = bpe_vocab();
    let t = build(&meta).unwrap();
    let text = "héllo 🦀\r\n  x";
    let ids = t.encode(text, false).unwrap();
    assert_eq!(t.decode(&ids).unwrap(), text);
    // The crab is four byte tokens; the stream emits it once complete.
    let crab = t.encode("🦀", false).unwrap();
    assert_eq!(crab.len(), 4);
    let mut s = StreamDecoder::new(&t);
    let outs: Vec<String> = crab.iter().map(|&i| s.push(i).unwrap()).collect();
    assert_eq!(outs, vec!["", "", "", "🦀"]);
    // A whole text streamed token by token.
    let mut s = StreamDecoder::new(&t);
    let mut out = String::new();
    for &i in &ids {
        out.push_str(&s.push(i).unwrap());
    }
    out.push_str(&s.finish().unwrap());
    assert_eq!(out, text);
    // Control tokens left out of the text do not count as bytes of a character still coming:
    // two of them before the crab's four byte tokens must not make the stream give it up.
    let mut ids = vec![1, 2];
    ids.extend(&crab);
    let mut s = StreamDecoder::new(&t).skip_special(true);
    let outs: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
    assert_eq!(outs, vec!["", "", "", "", "", "🦀"]);
    assert_eq!(s.finish().unwrap(), "");
    // Bytes that can never be part of a character (stray continuation bytes) do not wait:
    // they come out at once as U+FFFD, and the crab after them still comes out whole.
    let stray = id(&tokens, &byte_char(0xA9).to_string());
    let mut ids = vec![stray, stray];
    ids.extend(&crab);
    let mut s = StreamDecoder::new(&t);
    let outs: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
    assert_eq!(outs, vec!["\u{FFFD}", "\u{FFFD}", "", "", "", "🦀"]);
    // A character cut short by the start of another: U+FFFD once the second starts, and the
    // second comes out whole.
    let ids = [crab[0], crab[0], crab[1], crab[2], crab[3]];
    let mut s = StreamDecoder::new(&t);
    let outs: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
    assert_eq!(outs, vec!["", "\u{FFFD}", "", "", "🦀"]);
    assert_eq!(s.finish().unwrap(), "");
    // A lone continuation byte decodes lossily.
    assert_eq!(
        t.token_str(id(&tokens, &byte_char(0xA9).to_string()))
            .as_deref(),
        Some("\u{FFFD}")
    );
    assert_eq!(
        t.token_bytes(id(&tokens, &byte_char(0xA9).to_string())),
        Some(&[0xA9u8][..])
    );
}

#[test]
fn bpe_special_ids_and_flags() {
    let (_, mut meta) = bpe_vocab();
    let t = build(&meta).unwrap();
    assert_eq!(t.bos_id(), Some(1));
    // eos first, then the other end-of-generation tokens llama.cpp recognises by text.
    assert_eq!(t.eos_ids(), &[2, 0]);
    assert!(!t.add_bos_default());
    assert_eq!(t.encode("hello", true).unwrap()[0], 1);
    assert_eq!(t.chat_template(), Some("{{ messages }}"));
    meta.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true));
    assert!(build(&meta).unwrap().add_bos_default());
    meta.remove("tokenizer.ggml.add_bos_token");
    meta.insert(
        "tokenizer.ggml.pre".into(),
        MetaValue::String("llama-bpe".into()),
    );
    assert!(
        build(&meta).unwrap().add_bos_default(),
        "llama3-style BPE adds BOS by default"
    );
    assert!(matches!(
        t.decode(&[100_000]),
        Err(TokenizerError::IdOutOfRange { .. })
    ));
}

#[test]
fn errors_name_the_key() {
    let (_, meta) = bpe_vocab();
    let mut m = meta.clone();
    m.remove("tokenizer.ggml.merges");
    let e = build(&m).unwrap_err().to_string();
    assert_eq!(e, "GGUF key tokenizer.ggml.merges missing");

    let mut m = meta.clone();
    m.remove("tokenizer.ggml.tokens");
    assert_eq!(
        build(&m).unwrap_err().to_string(),
        "GGUF key tokenizer.ggml.tokens missing"
    );

    let mut m = meta.clone();
    m.remove("tokenizer.ggml.model");
    assert_eq!(
        build(&m).unwrap_err().to_string(),
        "GGUF key tokenizer.ggml.model missing"
    );

    let mut m = meta.clone();
    m.insert(
        "tokenizer.ggml.model".into(),
        MetaValue::String("bert".into()),
    );
    assert!(build(&m).unwrap_err().to_string().contains("'bert'"));

    let mut m = meta.clone();
    m.insert(
        "tokenizer.ggml.pre".into(),
        MetaValue::String("no-such-pre".into()),
    );
    let e = build(&m).unwrap_err();
    assert!(matches!(e, TokenizerError::UnsupportedPre(_)), "{e}");
    assert!(e.to_string().contains("tokenizer.ggml.pre"));

    let mut m = meta.clone();
    m.insert("tokenizer.ggml.merges".into(), MetaValue::U32(3));
    assert!(build(&m)
        .unwrap_err()
        .to_string()
        .contains("tokenizer.ggml.merges"));

    // An id outside the vocabulary is ignored, as llama.cpp does.
    let mut m = meta.clone();
    m.insert(
        "tokenizer.ggml.eos_token_id".into(),
        MetaValue::U32(1_000_000),
    );
    assert_eq!(build(&m).unwrap().eos_ids(), &[0, 2]);

    let mut m = meta;
    m.insert(
        "tokenizer.ggml.bos_token_id".into(),
        MetaValue::String("1".into()),
    );
    let e = build(&m).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
}

#[test]
fn pre_tokenizers_of_known_models_build() {
    let (_, meta) = bpe_vocab();
    for pre in [
        "default",
        "gpt-2",
        "llama-bpe",
        "llama3",
        "qwen2",
        "smollm",
        "starcoder",
        "falcon",
        "deepseek-coder",
        "tekken",
        "gpt-4o",
        "bloom",
        "viking",
        "seed-coder",
        "dbrx",
        "stablelm2",
        "olmo",
        "command-r",
    ] {
        let mut m = meta.clone();
        m.insert("tokenizer.ggml.pre".into(), MetaValue::String(pre.into()));
        let t = build(&m).unwrap_or_else(|e| panic!("{pre}: {e}"));
        let s = "Hello  world, it's 2024!\n\tcafé 🦀";
        assert_eq!(t.decode(&t.encode(s, false).unwrap()).unwrap(), s, "{pre}");
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny SentencePiece vocabulary (`tokenizer.ggml.model = llama`).

fn spm_vocab() -> (Vec<String>, HashMap<String, MetaValue>) {
    // (piece, score): higher scores merge first.
    spm_vocab_with(&[
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.1),
        ("l", -2.2),
        ("o", -2.3),
        ("w", -2.4),
        ("r", -2.5),
        ("d", -2.6),
        ("a", -2.7),
        ("b", -2.8),
        ("c", -2.9),
        ("é", -3.0),
        ("ll", -4.0),
        ("he", -4.5),
        ("llo", -5.0),
        ("hello", -6.0),
        ("▁hello", -6.5),
        ("▁w", -7.0),
        ("or", -7.5),
        ("▁wor", -8.0),
        ("ld", -8.5),
        ("▁world", -9.0),
        ("ab", -10.0),
        ("bc", -9.5),
        ("▁▁", -11.0),
    ])
}

/// `<unk>`, `<s>`, `</s>`, the 256 byte tokens (ids 3 to 258), `pieces` (from id 259), then the
/// user-defined `<|user|>`.
fn spm_vocab_with(pieces: &[(&str, f32)]) -> (Vec<String>, HashMap<String, MetaValue>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u32 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (p, s) in pieces {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(*s);
    }
    tokens.push("<|user|>".into());
    types.push(4);
    scores.push(0.0);
    let tok_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut m = HashMap::new();
    m.insert(
        "tokenizer.ggml.model".into(),
        MetaValue::String("llama".into()),
    );
    m.insert("tokenizer.ggml.tokens".into(), strs(&tok_refs));
    m.insert("tokenizer.ggml.token_type".into(), ints(&types));
    m.insert("tokenizer.ggml.scores".into(), floats(&scores));
    m.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1));
    m.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2));
    m.insert("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(0));
    (tokens, m)
}

fn byte_id(b: u8) -> u32 {
    3 + b as u32
}

#[test]
fn spm_basic() {
    let (tokens, meta) = spm_vocab();
    let t = build(&meta).unwrap();
    assert_eq!(t.kind(), "llama SentencePiece");
    assert!(t.add_bos_default());
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_ids(), &[2]);
    // Dummy prefix: "hello world" is tokenized as "▁hello▁world".
    let ids = t.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![id(&tokens, "▁hello"), id(&tokens, "▁world")]);
    assert_eq!(t.decode(&ids).unwrap(), "hello world");
    assert_eq!(
        t.encode("hello world", true).unwrap(),
        vec![1, id(&tokens, "▁hello"), id(&tokens, "▁world")]
    );
    assert_eq!(t.decode(&[1, id(&tokens, "▁hello")]).unwrap(), "<s> hello");
    assert_eq!(
        t.token_str(id(&tokens, "▁hello")).as_deref(),
        Some(" hello")
    );
    assert_eq!(t.encode("", false).unwrap(), Vec::<u32>::new());
}

#[test]
fn spm_byte_fallback_and_unicode() {
    let (tokens, meta) = spm_vocab();
    let t = build(&meta).unwrap();
    // '\n' and 'ü' are not pieces: UTF-8 bytes as <0xXX> tokens. 'é' is a piece.
    let ids = t.encode("hé\nü", false).unwrap();
    assert_eq!(
        ids,
        vec![
            id(&tokens, "▁"),
            id(&tokens, "h"),
            id(&tokens, "é"),
            byte_id(b'\n'),
            byte_id(0xC3),
            byte_id(0xBC)
        ]
    );
    assert_eq!(t.decode(&ids).unwrap(), "hé\nü");
    let mut s = StreamDecoder::new(&t);
    let outs: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
    assert_eq!(outs.concat(), "hé\nü");
    assert_eq!(outs[4], "", "half of 'ü' waits for the other half");
}

#[test]
fn spm_merges_by_score_like_llama_cpp() {
    let (tokens, meta) = spm_vocab();
    let t = build(&meta).unwrap();
    // "▁abc": "bc" (-9.5) scores higher than "ab" (-10), so llama.cpp merges b+c first.
    let ids = t.encode("abc", false).unwrap();
    assert_eq!(
        ids,
        vec![id(&tokens, "▁"), id(&tokens, "a"), id(&tokens, "bc")]
    );
    // Multiple spaces: "▁▁" merges pairs of spaces.
    let ids = t.encode("a  b", false).unwrap();
    assert_eq!(
        ids,
        vec![
            id(&tokens, "▁"),
            id(&tokens, "a"),
            id(&tokens, "▁▁"),
            id(&tokens, "b")
        ]
    );
    assert_eq!(t.decode(&ids).unwrap(), "a  b");
}

#[test]
fn spm_equal_scores_merge_leftmost_first_like_llama_cpp() {
    // Equal scores (GGUF files converted without SentencePiece scores have -1000 for every
    // piece): llama.cpp merges the leftmost of the best-scoring pairs first, whatever the pieces.
    // The ids are llama.cpp's (node-llama-cpp 3.21.1) for this vocabulary written as a GGUF file.
    let (tokens, meta) = spm_vocab_with(&[
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -2.0),
        ("c", -2.0),
        ("bc", -5.0),
        ("ab", -5.0),
        ("▁a", -9.0),
        ("cab", -5.0),
        ("ca", -5.0),
    ]);
    let t = build(&meta).unwrap();
    let ids = |s: &[&str]| -> Vec<u32> { s.iter().map(|p| id(&tokens, p)).collect() };
    for (text, want) in [
        ("abc", ids(&["▁", "ab", "c"])),
        ("abcabc", ids(&["▁", "ab", "cab", "c"])),
        ("bcab", ids(&["▁", "bc", "ab"])),
        ("cabc", ids(&["▁", "cab", "c"])),
    ] {
        assert_eq!(t.encode(text, false).unwrap(), want, "{text:?}");
    }
}

#[test]
fn spm_special_tokens_get_the_dummy_prefix_after_them() {
    let (tokens, meta) = spm_vocab();
    let t = build(&meta).unwrap();
    // llama.cpp prefixes every text fragment that follows a special token with a space.
    let ids = t.encode("<s>hello</s><|user|>world", false).unwrap();
    assert_eq!(
        ids,
        vec![
            1,
            id(&tokens, "▁hello"),
            2,
            id(&tokens, "<|user|>"),
            id(&tokens, "▁world")
        ]
    );
    assert_eq!(t.decode_with(&ids, true).unwrap(), "hello<|user|> world");
    // Without the dummy prefix.
    let mut m = meta;
    m.insert(
        "tokenizer.ggml.add_space_prefix".into(),
        MetaValue::Bool(false),
    );
    let t2 = build(&m).unwrap();
    let ids = t2.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![id(&tokens, "hello"), id(&tokens, "▁world")]);
    assert_eq!(t2.decode(&ids).unwrap(), "hello world");
}

#[test]
fn stream_decoder_keeps_spm_leading_space_with_context() {
    let (tokens, meta) = spm_vocab();
    let t = build(&meta).unwrap();
    let prompt = t.encode("hello", true).unwrap();
    let mut s = StreamDecoder::with_context(&t, &prompt);
    assert_eq!(s.push(id(&tokens, "▁world")).unwrap(), " world");
    // At the start of a text the dummy-prefix space is dropped, as in decode().
    let mut s = StreamDecoder::new(&t);
    assert_eq!(s.push(id(&tokens, "▁world")).unwrap(), "world");
    assert_eq!(s.push(id(&tokens, "▁world")).unwrap(), " world");
}

/// The tiny SentencePiece vocabulary against llama.cpp: `tools/reference/make_spm_gguf.py tiny`
/// writes the same vocabulary as a GGUF file, `tokenize_reference.mjs` tokenizes the reference
/// strings with llama.cpp into `tests/fixtures/tokenizer/tiny-spm.json`.
#[test]
fn spm_tiny_matches_llama_cpp() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer/tiny-spm.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let (_, meta) = spm_vocab();
    let t = build(&meta).unwrap();
    let mut failures = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = t.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{name}: got {got:?}, llama.cpp {want:?}"));
        }
        // llama.cpp's detokenizer output (differs from the text where the dummy prefix was added).
        let want_text = case["llama_detokenize"].as_str().unwrap_or(text);
        let back = t.decode(&got).unwrap();
        if back != want_text {
            failures.push(format!("{name}: decode {back:?}, llama.cpp {want_text:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `Tokenizer::from_file` on a `tokenizer.json` (written from the GGUF-built tokenizer) plus a
/// `tokenizer_config.json` beside it: same ids, same text, special tokens from the config.
#[test]
fn tokenizer_json_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let texts = [
        "hello world",
        "<|im_start|>user\nhello<|im_end|>\n",
        "héllo 🦀\r\n  x",
        "123",
        "",
    ];
    // Byte-level BPE.
    let (_, meta) = bpe_vocab();
    let g = build(&meta).unwrap();
    g.save_json(&dir.path().join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": true},
            "add_bos_token": false, "chat_template": "{{ bos_token }}"}"#,
    )
    .unwrap();
    let t = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(t.kind(), "tokenizer.json");
    assert_eq!(t.vocab_size(), g.vocab_size());
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_ids(), &[2, 0]);
    assert!(!t.add_bos_default());
    assert_eq!(t.chat_template(), Some("{{ bos_token }}"));
    for s in texts {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(ids, g.encode(s, false).unwrap(), "{s:?}");
        assert_eq!(t.decode(&ids).unwrap(), s);
        for &i in &ids {
            assert_eq!(t.token_str(i), g.token_str(i));
        }
    }
    // SentencePiece, with generation_config.json adding an end-of-generation id.
    let dir = tempfile::tempdir().unwrap();
    let (tokens, meta) = spm_vocab();
    let g = build(&meta).unwrap();
    g.save_json(&dir.path().join("tokenizer.json"), true)
        .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true,
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    let t = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_ids(), &[2, 0]);
    assert!(t.add_bos_default());
    assert_eq!(t.chat_template(), Some("y"));
    for s in ["hello world", "hé\nü", "<s>hello</s><|user|>world", "a  b"] {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(ids, g.encode(s, false).unwrap(), "{s:?}");
        assert_eq!(t.decode(&ids).unwrap(), g.decode(&ids).unwrap(), "{s:?}");
    }
    assert_eq!(
        t.token_str(id(&tokens, "▁hello")).as_deref(),
        Some(" hello")
    );
    // Missing file: the error names it.
    let e = Tokenizer::from_file(&dir.path().join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
}

/// `tokenizer.ggml.add_eos_token`, read from a GGUF file (and `add_eos_token` of
/// `tokenizer_config.json`): text tokenized with the model's special tokens ends with EOS
/// (llama.cpp's `add_special`), and so do plain-text prompts and chats, once even where the
/// template writes EOS itself; infills and text without special tokens do not. Set false or
/// absent, nothing is appended.
#[test]
fn add_eos_token_ends_special_tokenizations_with_eos() {
    use teal::chat::{encode_prompt, Infill, Message, Prompt};
    use teal::gguf::{GgufFile, GgufWriter};
    let (mut tokens, mut meta) = bpe_vocab();
    // Fill-in-the-middle's tokens, so that an infill can be encoded.
    let fim = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"];
    let mut types = vec![1; tokens.len()];
    types[..BPE_SPECIALS.len()].fill(3);
    tokens.extend(fim.map(String::from));
    types.extend([3; 3]);
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    meta.insert("tokenizer.ggml.tokens".into(), strs(&refs));
    meta.insert("tokenizer.ggml.token_type".into(), ints(&types));
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}";
    meta.insert(
        "tokenizer.chat_template".into(),
        MetaValue::String(template.into()),
    );
    let dir = tempfile::tempdir().unwrap();
    let open = |meta: &HashMap<String, MetaValue>| {
        let path = dir.path().join("vocab.gguf");
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.add_meta(k, v.clone());
        }
        w.write(&path).unwrap();
        Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    };
    let [hello, pre, suf, mid] = ["hello", fim[0], fim[1], fim[2]].map(|t| id(&tokens, t));
    let (bos, eos) = (1, 2);
    let text = Prompt::Text("hello".into());
    let chat = Prompt::Chat(vec![Message::new("user", "hello")]);
    let infill = Prompt::Infill(Infill::new("hello", "hello"));
    let key = "tokenizer.ggml.add_eos_token";
    for off in [None, Some(false)] {
        match off {
            None => meta.remove(key),
            Some(b) => meta.insert(key.into(), MetaValue::Bool(b)),
        };
        let t = open(&meta);
        assert!(!t.add_eos_default());
        assert_eq!(t.encode_special("hello").unwrap(), [hello]);
        assert_eq!(encode_prompt(&t, &text).unwrap(), [hello]);
        assert_eq!(encode_prompt(&t, &chat).unwrap(), [hello]);
    }
    meta.insert(key.into(), MetaValue::Bool(true));
    let t = open(&meta);
    assert!(t.add_eos_default());
    assert_eq!(t.eos_id(), Some(eos));
    assert_eq!(t.encode_special("hello").unwrap(), [hello, eos]);
    assert_eq!(t.encode("hello", false).unwrap(), [hello]);
    assert_eq!(encode_prompt(&t, &text).unwrap(), [hello, eos]);
    assert_eq!(encode_prompt(&t, &chat).unwrap(), [hello, eos]);
    let infill_ids = [pre, hello, suf, hello, mid];
    assert_eq!(encode_prompt(&t, &infill).unwrap(), infill_ids);
    // A template that writes EOS itself: one EOS still.
    let own = MetaValue::String(format!("{template}{{{{ eos_token }}}}"));
    meta.insert("tokenizer.chat_template".into(), own);
    assert_eq!(encode_prompt(&open(&meta), &chat).unwrap(), [hello, eos]);
    // With BOS as well: both around a text, BOS alone before an infill.
    meta.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true));
    let t = open(&meta);
    assert_eq!(t.encode_special("hello").unwrap(), [bos, hello, eos]);
    assert_eq!(encode_prompt(&t, &text).unwrap(), [bos, hello, eos]);
    assert_eq!(
        encode_prompt(&t, &infill).unwrap(),
        [&[bos][..], &infill_ids].concat()
    );
    // tokenizer.json with tokenizer_config.json's `add_eos_token`.
    t.save_json(&dir.path().join("tokenizer.json"), false)
        .unwrap();
    for (add_eos, want) in [(true, vec![hello, eos]), (false, vec![hello])] {
        let config = format!(
            r#"{{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
                "add_eos_token": {add_eos}}}"#
        );
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        let tj = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(tj.add_eos_default(), add_eos);
        assert_eq!(tj.encode_special("hello").unwrap(), want);
    }
}
