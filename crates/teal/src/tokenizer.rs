//! Tokenizer: built from a GGUF file's vocabulary (matching llama.cpp's ids) or from a Hugging Face
//! `tokenizer.json`.
//!
//! Encoding runs on the `tokenizers` crate. For a GGUF vocabulary the pipeline is assembled the way
//! llama.cpp's `llama-vocab.cpp` tokenizes, so that the ids are the same:
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE over `tokenizer.ggml.tokens` and
//!   `tokenizer.ggml.merges`. The text is first split with the regexes llama.cpp picks for
//!   `tokenizer.ggml.pre` (each regex splits every piece the previous one produced, keeping both the
//!   matches and the gaps), then mapped to GPT-2's byte alphabet, *without* a prefix space (adding
//!   one, the `ByteLevel` default, is what turns `<|im_start|>user` into `Ġuser`).
//! * `tokenizer.ggml.model = "llama"`: SentencePiece. llama.cpp merges adjacent symbols greedily by
//!   the score of the merged token; that is a BPE whose merge ranks are the tokens' scores, which
//!   is what is built here (ranks from `tokenizer.ggml.scores`), with `<0xXX>` byte fallback, spaces
//!   as `▁` and the dummy-prefix space in front of every text fragment
//!   (`tokenizer.ggml.add_space_prefix`, default true).
//!
//! In both cases control, user-defined and unknown tokens (`tokenizer.ggml.token_type` 3, 4, 2)
//! plus the end-of-generation tokens llama.cpp recognises by their text are added as special
//! tokens: written in the text (`<|im_start|>`) they are parsed to their ids.
//!
//! Decoding concatenates the bytes of each token's piece the way llama.cpp's `token_to_piece`
//! does (special tokens render as their text), then reads the bytes as UTF-8. llama.cpp's optional
//! `clean_spaces` post-processing is not applied, so `decode(encode(s)) == s`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use tokenizers as hf;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::Vocab;
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{
    AddedToken, AddedVocabulary, Model, OffsetType, PreTokenizer, SplitDelimiterBehavior,
    TokenizerImpl,
};

use crate::gguf::{GgufFile, MetaValue};

pub mod compact;
use compact::{CompactBpe, CompactBpeError};

/// Errors from building or running a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF key {0} missing")]
    MissingKey(String),
    #[error("GGUF key {key} has the wrong type: expected {expected}")]
    BadType { key: String, expected: &'static str },
    #[error("GGUF key {key}: {msg}")]
    BadValue { key: String, msg: String },
    #[error("unsupported tokenizer model '{0}' in tokenizer.ggml.model (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer '{0}' in tokenizer.ggml.pre")]
    UnsupportedPre(String),
    #[error("token id {id} is out of range (vocabulary of {vocab_size} tokens)")]
    IdOutOfRange { id: u32, vocab_size: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("tokenizers: {0}")]
    Hf(String),
    #[error(transparent)]
    Bpe(#[from] CompactBpeError),
}

type Result<T> = std::result::Result<T, TokenizerError>;

fn hf_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Hf(e.to_string())
}

// llama.cpp token types (tokenizer.ggml.token_type).
const TT_UNDEFINED: i64 = 0;
const TT_NORMAL: i64 = 1;
const TT_UNKNOWN: i64 = 2;
const TT_CONTROL: i64 = 3;
const TT_USER_DEFINED: i64 = 4;
const TT_UNUSED: i64 = 5;
const TT_BYTE: i64 = 6;

/// Texts llama.cpp treats as end-of-generation tokens (`llama-vocab.cpp`, `special_eog_ids`),
/// whatever their declared type; they become control tokens.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// FIM tokens llama.cpp recognises by their text (one per kind, when no `tokenizer.ggml.*_id` key
/// names it) and marks as control. The pad, repo and file-separator kinds also end generation.
const FIM_KINDS: &[(&str, &[&str], bool)] = &[
    (
        "tokenizer.ggml.fim_pre_token_id",
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
        false,
    ),
    (
        "tokenizer.ggml.fim_suf_token_id",
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
        false,
    ),
    (
        "tokenizer.ggml.fim_mid_token_id",
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
        false,
    ),
    (
        "tokenizer.ggml.fim_pad_token_id",
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
        true,
    ),
    (
        "tokenizer.ggml.fim_rep_token_id",
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
        true,
    ),
    ("tokenizer.ggml.fim_sep_token_id", &["<|file_sep|>"], true),
];

/// Deprecated key names llama.cpp still reads for the first three FIM kinds.
const FIM_OLD_KEYS: &[&str] = &[
    "tokenizer.ggml.prefix_token_id",
    "tokenizer.ggml.suffix_token_id",
    "tokenizer.ggml.middle_token_id",
];

// Pre-tokenizer regexes, as in llama.cpp's `llm_tokenizer_bpe` (the original Hugging Face forms
// where llama.cpp had to rewrite them for std::regex).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// The llama.cpp pre-tokenizer for a `tokenizer.ggml.pre` value: the regexes and whether whole
/// pieces found in the vocabulary skip the merges (`ignore_merges`).
struct PreSpec {
    regexes: &'static [&'static str],
    ignore_merges: bool,
    add_bos: bool,
}

fn pre_spec(pre: &str) -> Option<PreSpec> {
    let spec = |regexes, ignore_merges, add_bos| PreSpec {
        regexes,
        ignore_merges,
        add_bos,
    };
    Some(match pre {
        "default" | "" => spec(
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => spec(&[RE_LLAMA3], true, true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" | "glm4" => spec(&[RE_LLAMA3], false, false),
        "deepseek-coder" => spec(
            &[
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}",
            ],
            false,
            false,
        ),
        "falcon" => spec(
            &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            spec(&[RE_GPT2], false, false)
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => spec(&[r"\p{N}", RE_GPT2], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "megrez" | "hunyuan"
        | "solar-open" => spec(&[RE_QWEN2], false, false),
        "poro-chat" | "bloom" | "gpt3-finnish" => spec(&[RE_BLOOM], false, false),
        "viking" => spec(&[RE_BLOOM, r"\p{N}"], false, false),
        "tekken" => spec(&[RE_TEKKEN], true, true),
        "gpt-4o" | "llama4" | "kanana2" => spec(&[RE_GPT4O], false, false),
        "seed-coder" => spec(&[RE_SEED_CODER], false, false),
        _ => return None,
    })
}

/// GPT-2's byte-to-unicode table: byte `b` is written as `BYTE_CHARS[b]` in byte-level vocabularies.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

fn char_bytes() -> HashMap<char, u8> {
    byte_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

/// `<0xXX>` -> the byte.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// How a vocabulary writes text in its tokens (for turning a token into bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2 byte-level alphabet.
    ByteLevel,
    /// SentencePiece: `▁` for spaces, `<0xXX>` byte tokens.
    SentencePiece,
}

/// The bytes of every token, one after another in one buffer (a vocabulary of 150k tokens as
/// 150k separate vectors costs about 7 MB more in headers and allocator overhead).
struct Pieces {
    bytes: Vec<u8>,
    /// `ends[id]`: where token `id`'s bytes end in `bytes`.
    ends: Vec<u32>,
}

impl Pieces {
    fn get(&self, id: usize) -> Option<&[u8]> {
        let end = *self.ends.get(id)? as usize;
        let start = id.checked_sub(1).map_or(0, |p| self.ends[p] as usize);
        self.bytes.get(start..end)
    }
}

impl std::ops::Index<usize> for Pieces {
    type Output = [u8];
    fn index(&self, id: usize) -> &[u8] {
        self.get(id).unwrap_or(&[])
    }
}

impl FromIterator<Vec<u8>> for Pieces {
    fn from_iter<I: IntoIterator<Item = Vec<u8>>>(iter: I) -> Pieces {
        let mut p = Pieces {
            bytes: Vec::new(),
            ends: Vec::new(),
        };
        for piece in iter {
            p.bytes.extend_from_slice(&piece);
            p.ends.push(p.bytes.len() as u32);
        }
        p.bytes.shrink_to_fit();
        p.ends.shrink_to_fit();
        p
    }
}

/// The `tokenizers` pipeline of a GGUF vocabulary: its own normalizer, pre-tokenizer, decoder
/// and special tokens around a [`CompactBpe`].
type GgufPipeline = TokenizerImpl<
    CompactBpe,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// What encodes: the pipeline built from GGUF metadata, or a `tokenizer.json` as loaded.
enum Engine {
    Gguf(Box<GgufPipeline>),
    Json(Box<hf::Tokenizer>),
}

/// The ids of `text` through `t`'s pipeline (`encode_fast` without added special tokens), with
/// `added` splitting the added tokens out of the text.
fn encode_ids<M: Model>(
    t: &TokenizerImpl<
        M,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >,
    added: &AddedVocabulary,
    text: &str,
) -> hf::Result<Vec<u32>> {
    let mut pre = added.extract_and_normalize(t.get_normalizer(), text);
    if let Some(p) = t.get_pre_tokenizer() {
        p.pre_tokenize(&mut pre)?;
    }
    pre.tokenize(|s| t.get_model().tokenize(s.get()))?;
    Ok(pre
        .into_encoding(None, 0, OffsetType::None)?
        .get_ids()
        .to_vec())
}

impl Engine {
    /// The ids of `text`; `added`: the added tokens to split out of it, where not the engine's.
    fn encode(&self, text: &str, added: Option<&AddedVocabulary>) -> hf::Result<Vec<u32>> {
        match self {
            Engine::Gguf(t) => encode_ids(t, added.unwrap_or(t.get_added_vocabulary()), text),
            Engine::Json(t) => encode_ids(t, added.unwrap_or(t.get_added_vocabulary()), text),
        }
    }

    /// The engine's added tokens with the special ones left in the text (llama.cpp's
    /// `parse_special = false`: user-defined tokens are still split out).
    fn added_without_specials(&self) -> AddedVocabulary {
        let mut added = match self {
            Engine::Gguf(t) => t.get_added_vocabulary().clone(),
            Engine::Json(t) => t.get_added_vocabulary().clone(),
        };
        added.set_encode_special_tokens(true);
        added
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> hf::Result<String> {
        match self {
            Engine::Gguf(t) => t.decode(ids, skip_special),
            Engine::Json(t) => t.decode(ids, skip_special),
        }
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Engine::Gguf(t) => t.id_to_token(id),
            Engine::Json(t) => t.id_to_token(id),
        }
    }

    fn token_to_id(&self, text: &str) -> Option<u32> {
        match self {
            Engine::Gguf(t) => t.token_to_id(text),
            Engine::Json(t) => t.token_to_id(text),
        }
    }

    fn save(&self, path: &Path, pretty: bool) -> hf::Result<()> {
        match self {
            Engine::Gguf(t) => t.save(path, pretty),
            Engine::Json(t) => t.save(path, pretty),
        }
    }
}

/// Every token's bytes, `None` for special tokens ([`Tokenizer::text_bytes`]).
pub type TokenBytes = std::sync::Arc<Vec<Option<Vec<u8>>>>;

/// A tokenizer with llama.cpp-compatible ids for GGUF vocabularies.
pub struct Tokenizer {
    engine: Engine,
    kind: String,
    vocab_size: usize,
    bos: Option<u32>,
    /// The end-of-sequence token, which [`Tokenizer::encode_special`] appends where `add_eos`.
    eos: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
    /// Bytes of each token as decoding writes them (llama.cpp `token_to_piece`, special tokens
    /// rendered). `None`: decode through the `tokenizers` decoder.
    pieces: Option<Pieces>,
    /// Control / unknown tokens (skipped by `decode_with(.., true)`).
    special: Vec<bool>,
    /// SentencePiece dummy prefix: decoding drops one leading space of the first token.
    strip_leading_space: bool,
    /// Fill-in-the-middle tokens by kind ([`FIM_KINDS`]' order: prefix, suffix, middle, pad,
    /// repository name, file separator), where the vocabulary has them.
    fim: [Option<u32>; 6],
    /// [`Tokenizer::text_bytes`], made on first use.
    text_bytes: std::sync::OnceLock<TokenBytes>,
    /// The added tokens split out of a text encoded without special-token parsing, made on
    /// first use.
    plain_added: std::sync::OnceLock<AddedVocabulary>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata access

struct Meta<'m, F: Fn(&str) -> Option<&'m MetaValue>> {
    get: F,
}

/// An integer of any width, or a bool as 0/1 (the tokenizer's keys are read leniently).
fn meta_i64(v: &MetaValue) -> Option<i64> {
    v.as_i64().or_else(|| v.as_bool().map(i64::from))
}

/// A float, or an integer read as one.
fn meta_f32(v: &MetaValue) -> Option<f32> {
    v.as_f32().or_else(|| meta_i64(v).map(|x| x as f32))
}

impl<'m, F: Fn(&str) -> Option<&'m MetaValue>> Meta<'m, F> {
    fn opt(&self, key: &str) -> Option<&'m MetaValue> {
        (self.get)(key)
    }

    fn req(&self, key: &str) -> Result<&'m MetaValue> {
        self.opt(key)
            .ok_or_else(|| TokenizerError::MissingKey(key.to_string()))
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'m str>> {
        match self.opt(key) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(bad_type(key, "string")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.opt(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => meta_i64(v)
                .map(|x| Some(x != 0))
                .ok_or_else(|| bad_type(key, "bool")),
        }
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.opt(key) {
            None => Ok(None),
            Some(v) => meta_i64(v)
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| bad_type(key, "unsigned integer")),
        }
    }

    fn array(&self, key: &str) -> Result<&'m [MetaValue]> {
        match self.req(key)? {
            MetaValue::Array(a) => Ok(a.as_slice()),
            _ => Err(bad_type(key, "array")),
        }
    }

    fn opt_array(&self, key: &str) -> Result<Option<&'m [MetaValue]>> {
        if self.opt(key).is_none() {
            return Ok(None);
        }
        self.array(key).map(Some)
    }

    fn str_array(&self, key: &str) -> Result<Vec<&'m str>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                _ => Err(bad_type(key, "array of strings")),
            })
            .collect()
    }
}

fn bad_type(key: &str, expected: &'static str) -> TokenizerError {
    TokenizerError::BadType {
        key: key.to_string(),
        expected,
    }
}

fn bad_value(key: &str, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::BadValue {
        key: key.to_string(),
        msg: msg.into(),
    }
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        Self::from_gguf_metadata(|k| g.get(k))
    }

    /// Builds the tokenizer from GGUF metadata, given as a lookup from key to value.
    pub fn from_gguf_metadata<'m>(get: impl Fn(&str) -> Option<&'m MetaValue>) -> Result<Self> {
        let meta = Meta { get };
        let model = meta
            .opt_str(KEY_MODEL)?
            .ok_or_else(|| TokenizerError::MissingKey(KEY_MODEL.into()))?;
        let spm = match model {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        // Vocabulary, as llama.cpp loads it.
        let raw_tokens = meta.str_array(KEY_TOKENS)?;
        let n = raw_tokens.len();
        if n == 0 {
            return Err(bad_value(KEY_TOKENS, "empty vocabulary"));
        }
        let tokens: Vec<String> = raw_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // llama.cpp reads token texts as C strings: a NUL ends them.
                let t = t.split('\0').next().unwrap_or("");
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.to_string()
                }
            })
            .collect();
        let mut types: Vec<i64> = match meta.opt_array(KEY_TYPES)? {
            None => vec![TT_NORMAL; n],
            Some(a) => {
                if a.len() < n {
                    return Err(bad_value(
                        KEY_TYPES,
                        format!("{} entries for {n} tokens", a.len()),
                    ));
                }
                a[..n]
                    .iter()
                    .map(|v| meta_i64(v).ok_or_else(|| bad_type(KEY_TYPES, "array of integers")))
                    .collect::<Result<_>>()?
            }
        };
        let mut vocab: Vocab = Vocab::default();
        vocab.reserve(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(prev) = vocab.insert(t.clone(), i as u32) {
                return Err(bad_value(
                    KEY_TOKENS,
                    format!("duplicate token {t:?} at ids {prev} and {i}"),
                ));
            }
        }
        let id_of = |text: &str| vocab.get(text).copied();

        // Special token ids. Like llama.cpp, an id outside the vocabulary is ignored (the model
        // type's default is used).
        let special_id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
            let id = meta.opt_u32(key)?.filter(|&x| (x as usize) < n);
            Ok(id.or(default.filter(|&x| (x as usize) < n)))
        };
        let bos = special_id("tokenizer.ggml.bos_token_id", spm.then_some(1))?;
        let eos = special_id("tokenizer.ggml.eos_token_id", spm.then_some(2))?;
        let eot = special_id("tokenizer.ggml.eot_token_id", None)?;
        let eom = special_id("tokenizer.ggml.eom_token_id", None)?;
        let unk = special_id("tokenizer.ggml.unknown_token_id", spm.then_some(0))?;

        let (eos_ids, fim) =
            special_attributes(&meta, &tokens, &mut types, &id_of, [eos, eot, eom])?;
        let add_space_prefix = meta
            .opt_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(spm);
        let pre = meta.opt_str(KEY_PRE)?.unwrap_or("");

        let (mut hf_tok, kind, add_bos_default, style) = if spm {
            let scores: Vec<f32> = match meta.opt_array(KEY_SCORES)? {
                None => vec![0.0; n],
                Some(a) => {
                    if a.len() < n {
                        return Err(bad_value(
                            KEY_SCORES,
                            format!("{} entries for {n} tokens", a.len()),
                        ));
                    }
                    a[..n]
                        .iter()
                        .map(|v| meta_f32(v).ok_or_else(|| bad_type(KEY_SCORES, "array of floats")))
                        .collect::<Result<_>>()?
                }
            };
            let merges = spm_merges(&tokens, &scores, &vocab);
            let unk_text = unk.map(|u| tokens[u as usize].as_str());
            let bpe = CompactBpe::new(&tokens, &merges, unk_text, true, false)?;
            let mut t = GgufPipeline::new(bpe);
            let mut norms: Vec<NormalizerWrapper> = Vec::new();
            if add_space_prefix {
                norms.push(Prepend::new("▁".into()).into());
            }
            norms.push(Replace::new(" ", "▁").map_err(hf_err)?.into());
            t.with_normalizer(Some(NormalizerSequence::new(norms)))
                .map_err(hf_err)?;
            let mut decs: Vec<DecoderWrapper> = vec![
                Replace::new("▁", " ").map_err(hf_err)?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if add_space_prefix {
                decs.push(StripDecoder::new(' ', 1, 0).into());
            }
            t.with_decoder(Some(DecoderSequence::new(decs)));
            (
                t,
                "llama SentencePiece".to_string(),
                true,
                PieceStyle::SentencePiece,
            )
        } else {
            let spec =
                pre_spec(pre).ok_or_else(|| TokenizerError::UnsupportedPre(pre.to_string()))?;
            let merges = bpe_merges(&meta.str_array(KEY_MERGES)?, &vocab);
            let bpe = CompactBpe::new(&tokens, &merges, None, false, spec.ignore_merges)?;
            let mut t = GgufPipeline::new(bpe);
            let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
            for re in spec.regexes {
                let split = Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| hf_err(format!("pre-tokenizer regex {re:?}: {e}")))?;
                steps.push(split.into());
            }
            steps.push(ByteLevel::new(false, false, false).into());
            t.with_pre_tokenizer(Some(PreSequence::new(steps)));
            t.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
            let pre_name = if pre.is_empty() { "default" } else { pre };
            (
                t,
                format!("gpt2 byte-level BPE (pre: {pre_name})"),
                spec.add_bos,
                PieceStyle::ByteLevel,
            )
        };

        // Special tokens: the ones llama.cpp partitions out of the text before tokenizing.
        let mut added: Vec<AddedToken> = Vec::new();
        let mut special = vec![false; n];
        for (i, ty) in types.iter().enumerate() {
            match *ty {
                TT_CONTROL | TT_UNKNOWN => {
                    special[i] = true;
                    added.push(AddedToken::from(tokens[i].clone(), true));
                }
                TT_USER_DEFINED => {
                    added.push(AddedToken::from(tokens[i].clone(), false).normalized(false));
                }
                _ => {}
            }
        }
        hf_tok.add_special_tokens(added).map_err(hf_err)?;

        // Pieces (llama.cpp token_to_piece with special = true).
        let cb = char_bytes();
        let pieces: Pieces = tokens
            .iter()
            .zip(&types)
            .map(|(text, &ty)| match ty {
                TT_CONTROL | TT_UNKNOWN | TT_USER_DEFINED => text.as_bytes().to_vec(),
                TT_NORMAL => normal_piece(text, style, &cb),
                TT_BYTE => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
                TT_UNUSED | TT_UNDEFINED => Vec::new(),
                _ => Vec::new(),
            })
            .collect();

        let add_bos = meta
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(add_bos_default);
        // llama.cpp's default for both vocabulary types read here: off.
        let add_eos = meta
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let chat_template = meta.opt_str("tokenizer.chat_template")?.map(str::to_string);

        Ok(Tokenizer {
            plain_added: Default::default(),
            engine: Engine::Gguf(Box::new(hf_tok)),
            kind,
            vocab_size: n,
            bos,
            eos,
            eos_ids,
            add_bos,
            add_eos,
            chat_template,
            pieces: Some(pieces),
            special,
            strip_leading_space: spm && add_space_prefix,
            fim,
            text_bytes: Default::default(),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. `tokenizer_config.json` (BOS/EOS tokens,
    /// `add_bos_token`, `add_eos_token`, `chat_template`) and `generation_config.json` (`eos_token_id`) next to it
    /// are read when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let hf_tok: hf::Tokenizer = text.parse().map_err(|e| TokenizerError::File {
            path: path.to_path_buf(),
            msg: format!("not a tokenizer.json: {e}"),
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TokenizerError::File {
                path: path.to_path_buf(),
                msg: format!("invalid JSON: {e}"),
            })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let s = std::fs::read_to_string(&p).map_err(|source| TokenizerError::Io {
                path: p.clone(),
                source,
            })?;
            serde_json::from_str(&s)
                .map(Some)
                .map_err(|e| TokenizerError::File {
                    path: p.clone(),
                    msg: format!("invalid JSON: {e}"),
                })
        };
        let config = read_json("tokenizer_config.json")?.unwrap_or(serde_json::Value::Null);
        let gen_config = read_json("generation_config.json")?.unwrap_or(serde_json::Value::Null);

        // Ids run from 0 to the largest one in the vocabulary or the added tokens.
        let vocab_size = hf_tok
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let token_field = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let bos_text = token_field(&config["bos_token"]);
        let eos_text = token_field(&config["eos_token"]);
        let bos = bos_text.as_deref().and_then(|t| hf_tok.token_to_id(t));
        let eos = eos_text.as_deref().and_then(|t| hf_tok.token_to_id(t));
        let mut eos_ids: Vec<u32> = Vec::new();
        let mut push = |id: u32| {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        };
        if let Some(id) = eos {
            push(id);
        }
        match &gen_config["eos_token_id"] {
            serde_json::Value::Number(x) => {
                if let Some(id) = x.as_u64() {
                    push(id as u32)
                }
            }
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .for_each(|id| push(id as u32)),
            _ => {}
        }
        let added = hf_tok.get_added_tokens_decoder();
        let mut eog_added: Vec<u32> = added
            .iter()
            .filter(|(_, t)| EOG_TEXTS.contains(&t.content.as_str()))
            .map(|(id, _)| *id)
            .collect();
        eog_added.sort_unstable();
        eog_added.into_iter().for_each(&mut push);

        let post = json["post_processor"].to_string();
        let add_bos = match config["add_bos_token"].as_bool() {
            Some(b) => b,
            None => bos_text
                .as_deref()
                .map(|t| post.contains(&serde_json::Value::String(t.to_string()).to_string()))
                .unwrap_or(false),
        };
        let add_eos = config["add_eos_token"].as_bool().unwrap_or(false);
        let chat_template = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|e| e["name"] == "default")
                .or_else(|| list.first())
                .and_then(|e| e["template"].as_str())
                .map(str::to_string),
            _ => None,
        };

        let mut special = vec![false; vocab_size];
        for (id, t) in &added {
            if t.special && (*id as usize) < vocab_size {
                special[*id as usize] = true;
            }
        }

        // Pieces, when the decoder is one of the two known styles.
        let decoder = json["decoder"].to_string();
        let style = if decoder.contains("\"ByteLevel\"") {
            Some(PieceStyle::ByteLevel)
        } else if decoder.contains("\"ByteFallback\"")
            || decoder.contains("\"Metaspace\"")
            || decoder.contains('▁')
        {
            Some(PieceStyle::SentencePiece)
        } else {
            None
        };
        let strip_leading_space = style == Some(PieceStyle::SentencePiece)
            && (decoder.contains("\"Strip\"")
                || (decoder.contains("\"Metaspace\"") && !decoder.contains("\"never\"")));
        let pieces = style.map(|style| {
            let cb = char_bytes();
            (0..vocab_size as u32)
                .map(|id| {
                    if let Some(t) = added.get(&id) {
                        return t.content.as_bytes().to_vec();
                    }
                    match hf_tok.id_to_token(id) {
                        Some(text) => match (style, parse_byte_token(&text)) {
                            (PieceStyle::SentencePiece, Some(b)) => vec![b],
                            _ => normal_piece(&text, style, &cb),
                        },
                        None => Vec::new(),
                    }
                })
                .collect()
        });

        let id_of = |t: &str| hf_tok.token_to_id(t);
        let fim = std::array::from_fn(|kind| first_of(FIM_KINDS[kind].1, &id_of));
        Ok(Tokenizer {
            plain_added: Default::default(),
            engine: Engine::Json(Box::new(hf_tok)),
            kind: "tokenizer.json".to_string(),
            vocab_size,
            bos,
            eos,
            eos_ids,
            add_bos,
            add_eos,
            chat_template,
            pieces,
            special,
            strip_leading_space,
            fim,
            text_bytes: Default::default(),
        })
    }

    /// Token ids of `text`. Special tokens written in the text are parsed to their ids; the only
    /// other token ever added is BOS in front, when `add_bos` (and the model has one).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_bos, true)
    }

    /// [`Tokenizer::encode`]; without `parse_special`, control tokens written in the text
    /// (`<|im_start|>`) are text like any other (llama.cpp's `parse_special = false`, for text
    /// that is data, not prompt markup), user-defined ones are still parsed.
    pub fn encode_with(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        let added = (!parse_special).then(|| {
            self.plain_added
                .get_or_init(|| self.engine.added_without_specials())
        });
        let enc = self.engine.encode(text, added).map_err(hf_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend(enc);
        Ok(ids)
    }

    /// Token ids of `text` with the special tokens the model puts around a text (llama.cpp's
    /// `llama_tokenize` with `add_special`): BOS in front where [`Tokenizer::add_bos_default`],
    /// EOS at the end where [`Tokenizer::add_eos_default`].
    pub fn encode_special(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_special_with(text, true)
    }

    /// [`Tokenizer::encode_special`]; without `parse_special`, control tokens written in the
    /// text are text ([`Tokenizer::encode_with`]).
    pub fn encode_special_with(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = self.encode_with(text, self.add_bos_default(), parse_special)?;
        ids.extend(self.eos.filter(|_| self.add_eos_default()));
        Ok(ids)
    }

    /// Text of `ids`, special tokens included (as their text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of `ids`; with `skip_special`, control tokens (BOS, EOS, `<|im_start|>`, ...) are left out.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        for &id in ids {
            if id as usize >= self.vocab_size {
                return Err(TokenizerError::IdOutOfRange {
                    id,
                    vocab_size: self.vocab_size,
                });
            }
        }
        match &self.pieces {
            Some(pieces) => {
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                let mut first = true;
                for &id in ids {
                    if skip_special && self.special[id as usize] {
                        continue;
                    }
                    let piece = &pieces[id as usize];
                    if first && self.strip_leading_space && piece.first() == Some(&b' ') {
                        bytes.extend_from_slice(&piece[1..]);
                    } else {
                        bytes.extend_from_slice(piece);
                    }
                    first = false;
                }
                Ok(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
            None => self.engine.decode(ids, skip_special).map_err(hf_err),
        }
    }

    /// The beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token (`tokenizer.ggml.eos_token_id`, `eos_token` of
    /// `tokenizer_config.json`): the first of [`Tokenizer::eos_ids`] where the model names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Ids that end generation: EOS first, then end-of-turn-like tokens (eot, `<|im_end|>`,
    /// `<|eot_id|>`, `<|endoftext|>`, `<|end_of_text|>`, ... when present; the set llama.cpp uses).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The fill-in-the-middle tokens (prefix, suffix, middle), where the vocabulary has all
    /// three (by `tokenizer.ggml.fim_*_token_id`, else by the texts llama.cpp recognises).
    pub fn fim_ids(&self) -> Option<[u32; 3]> {
        match self.fim {
            [Some(p), Some(s), Some(m), ..] => Some([p, s, m]),
            _ => None,
        }
    }

    /// The repository-name and file-separator tokens of repository-level fill in the middle
    /// (Qwen2.5-Coder's `<|repo_name|>` and `<|file_sep|>`), where the vocabulary has both.
    pub fn fim_repo_ids(&self) -> Option<[u32; 2]> {
        match self.fim {
            [.., Some(r), Some(s)] => Some([r, s]),
            _ => None,
        }
    }

    /// Whether prompts start with BOS: `tokenizer.ggml.add_bos_token`, or the model type's default
    /// (SentencePiece and Llama-3-style BPE: yes; other BPE: no).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether a text tokenized with the model's special tokens ends with EOS:
    /// `tokenizer.ggml.add_eos_token` (`add_eos_token` of `tokenizer_config.json`), off where
    /// absent; embedding models that pool the last token set it.
    pub fn add_eos_default(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }

    /// The text `id` decodes to on its own (for streaming and inspection); SentencePiece tokens
    /// keep their leading space. Invalid UTF-8 (a partial character) is replaced by U+FFFD.
    pub fn token_str(&self, id: u32) -> Option<String> {
        if id as usize >= self.vocab_size {
            return None;
        }
        match &self.pieces {
            Some(p) => Some(String::from_utf8_lossy(&p[id as usize]).into_owned()),
            None => self.engine.decode(&[id], false).ok(),
        }
    }

    /// The raw bytes `id` decodes to (GGUF and byte-level / SentencePiece tokenizer.json files).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.as_ref()?.get(id as usize)
    }

    /// The bytes `id` decodes to on its own: [`Tokenizer::token_bytes`]' where the tokenizer
    /// keeps the byte table, else its text's.
    pub fn piece_bytes(&self, id: u32) -> Vec<u8> {
        match self.token_bytes(id) {
            Some(b) => b.to_vec(),
            None => self.token_str(id).unwrap_or_default().into_bytes(),
        }
    }

    /// Every token's bytes ([`Tokenizer::piece_bytes`]), `None` for special tokens: what the
    /// constrained samplers test against, made once per tokenizer and shared.
    pub fn text_bytes(&self) -> TokenBytes {
        self.text_bytes
            .get_or_init(|| {
                std::sync::Arc::new(
                    (0..self.vocab_size as u32)
                        .map(|id| (!self.is_special(id)).then(|| self.piece_bytes(id)))
                        .collect(),
                )
            })
            .clone()
    }

    /// The token as written in the vocabulary (`Ġuser`, `▁the`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.engine.id_to_token(id)
    }

    /// The id of a vocabulary entry, written as in the vocabulary.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.engine.token_to_id(text)
    }

    /// Whether `id` is a control / special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// What kind of tokenizer this is, e.g. `gpt2 byte-level BPE (pre: smollm)`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The Jinja chat template shipped with the model.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (a GGUF vocabulary as an ordinary
    /// BPE model with this pipeline and these special tokens; [`Tokenizer::from_file`] reads it).
    pub fn save_json(&self, path: &Path, pretty: bool) -> Result<()> {
        self.engine
            .save(path, pretty)
            .map_err(|e| TokenizerError::File {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })
    }
}

/// llama.cpp's special-token bookkeeping (`llama_vocab::impl::load`): marks the tokens it
/// recognises by their text as control tokens (in `types`, which decides what is parsed out of the
/// text as a special token) and returns the end-of-generation ids, EOS first.
fn special_attributes<'m, F: Fn(&str) -> Option<&'m MetaValue>>(
    meta: &Meta<'m, F>,
    tokens: &[String],
    types: &mut [i64],
    id_of: &dyn Fn(&str) -> Option<u32>,
    eos_eot_eom: [Option<u32>; 3],
) -> Result<(Vec<u32>, [Option<u32>; 6])> {
    let n = tokens.len();
    let mark_control = |types: &mut [i64], id: u32| {
        let ty = &mut types[id as usize];
        if !matches!(*ty, TT_CONTROL | TT_USER_DEFINED | TT_UNKNOWN) {
            *ty = TT_CONTROL;
        }
    };
    let mut eog: Vec<u32> = Vec::new();
    let mut fim = [None; 6];

    // FIM tokens: by key, else the first (lowest id) text match, which becomes control.
    for (i, (key, texts, ends)) in FIM_KINDS.iter().enumerate() {
        let mut id = meta.opt_u32(key)?;
        if id.is_none() && i < FIM_OLD_KEYS.len() {
            id = meta.opt_u32(FIM_OLD_KEYS[i])?;
        }
        let id = match id.filter(|&x| (x as usize) < n) {
            Some(x) => Some(x),
            None => {
                let found = first_of(texts, id_of);
                if let Some(x) = found {
                    mark_control(types, x);
                }
                found
            }
        };
        if let (Some(x), true) = (id, *ends) {
            eog.push(x);
        }
        fim[i] = id;
    }

    // End-of-generation texts.
    for t in EOG_TEXTS {
        if let Some(id) = id_of(t) {
            eog.push(id);
            mark_control(types, id);
        }
    }
    // gpt-oss: these are always rendered.
    for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(id) = id_of(t) {
            types[id as usize] = TT_USER_DEFINED;
        }
    }
    eog.extend(eos_eot_eom.iter().flatten());
    eog.sort_unstable();
    eog.dedup();

    let has = |eog: &[u32], t: &str| id_of(t).is_some_and(|id| eog.contains(&id));
    // o200k_harmony / solar-open: "<|end|>" does not end generation there.
    if has(&eog, "<|end|>")
        && ((has(&eog, "<|return|>") && (has(&eog, "<|call|>") || has(&eog, "<|calls|>")))
            || ((has(&eog, "<|call|>") || has(&eog, "<|calls|>")) && has(&eog, "<|flush|>")))
    {
        let id = id_of("<|end|>").unwrap();
        eog.retain(|&x| x != id);
        types[id as usize] = TT_USER_DEFINED;
    }
    // gemma4 / paddleocr: "</s>" is an ordinary token when "<|tool_response>" exists.
    if has(&eog, "<|tool_response>") && has(&eog, "</s>") {
        let id = id_of("</s>").unwrap();
        eog.retain(|&x| x != id);
        types[id as usize] = TT_NORMAL;
    }

    let mut out: Vec<u32> = Vec::with_capacity(eog.len());
    if let Some(eos) = eos_eot_eom[0] {
        out.push(eos);
    }
    out.extend(eog.into_iter().filter(|&x| Some(x) != eos_eot_eom[0]));
    Ok((out, fim))
}

/// The lowest id among the tokens with these texts (llama.cpp's choice when several match).
fn first_of(texts: &[&str], id_of: &dyn Fn(&str) -> Option<u32>) -> Option<u32> {
    texts.iter().filter_map(|t| id_of(t)).min()
}

/// Bytes of a normal vocabulary token.
fn normal_piece(text: &str, style: PieceStyle, cb: &HashMap<char, u8>) -> Vec<u8> {
    match style {
        PieceStyle::ByteLevel => {
            let mut out = Vec::with_capacity(text.len());
            for c in text.chars() {
                match cb.get(&c) {
                    Some(&b) => out.push(b),
                    None => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            out
        }
        PieceStyle::SentencePiece => text.replace('▁', " ").into_bytes(),
    }
}

/// `tokenizer.ggml.merges` ("a b" strings, in rank order) as pairs with their ranks the BPE model
/// accepts: the split is at the first space after the first byte (as llama.cpp does); pairs whose
/// parts or result are not in the vocabulary (never produced by llama.cpp either) and repeats are
/// dropped.
fn bpe_merges(raw: &[&str], vocab: &Vocab) -> Vec<(String, String, u32)> {
    let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    for m in raw {
        // Byte-wise, like `std::string::find(' ', 1)`; a space is always a character boundary.
        let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        if a.is_empty() || b.is_empty() || !vocab.contains_key(a) || !vocab.contains_key(b) {
            continue;
        }
        if !vocab.contains_key(&format!("{a}{b}")) || !seen.insert((a, b)) {
            continue;
        }
        let rank = out.len() as u32;
        out.push((a.to_string(), b.to_string(), rank));
    }
    out
}

/// SentencePiece as BPE: every split of a vocabulary token into two vocabulary tokens is a merge,
/// ranked by the merged token's score (higher first), as llama.cpp's SPM tokenizer merges. Equal
/// scores share a rank: llama.cpp merges the leftmost of such pairs first, whatever the tokens.
fn spm_merges(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String, u32)> {
    let mut cands: Vec<(f32, String, String)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        for (pos, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(pos);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                cands.push((scores[id], a.to_string(), b.to_string()));
            }
        }
    }
    // Higher score first; the sort is stable, so ties stay in token order.
    cands.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(std::cmp::Ordering::Equal));
    let mut rank = 0;
    let mut prev = None;
    cands
        .into_iter()
        .map(|(score, a, b)| {
            if prev.is_some_and(|p| p != score) {
                rank += 1;
            }
            prev = Some(score);
            (a, b, rank)
        })
        .collect()
}

/// Incremental detokenizer for streaming: feed ids one at a time, get back the newly completed
/// text. Characters split over several tokens come out once complete (the complete ones before
/// them at once), and SentencePiece leading spaces are kept (the decoding window always starts
/// at an earlier token).
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Bytes of the window's text past `read_offset` already handed out: the complete
    /// characters before an incomplete one.
    held: usize,
    skip_special: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder for a stream starting at the beginning of a text.
    pub fn new(t: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok: t,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            held: 0,
            skip_special: false,
        }
    }

    /// A decoder for tokens that continue `context` (e.g. the prompt): its last tokens are used
    /// so that the first generated token keeps its leading space.
    pub fn with_context(t: &'a Tokenizer, context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(6)..];
        StreamDecoder {
            tok: t,
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
            held: 0,
            skip_special: false,
        }
    }

    /// Leave control tokens out of the text.
    pub fn skip_special(mut self, skip: bool) -> Self {
        self.skip_special = skip;
        self
    }

    /// Feeds one id; returns the text it completes (possibly empty). While the window ends in
    /// an incomplete character, the complete characters before it are handed out (a token such
    /// as " \xe7" holds a space and the first byte of a character; the space must not wait for
    /// the rest, which may never come when the generation stops there).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix, full) = self.window()?;
        if full.len() > prefix.len() && full.starts_with(&prefix) {
            let tail = &full[prefix.len()..];
            let Some(complete) = tail.strip_suffix('\u{FFFD}').filter(|_| self.waits()) else {
                let new = tail.get(self.held..).unwrap_or_default().to_string();
                self.advance();
                return Ok(new);
            };
            let new = complete.get(self.held..).unwrap_or_default().to_string();
            self.held = self.held.max(complete.len());
            Ok(new)
        } else if !full.starts_with(&prefix) && !full.ends_with('\u{FFFD}') {
            // The window no longer decodes to an extension of what was emitted (should not
            // happen); restart it at the current token.
            let new = self
                .tok
                .decode_with(&self.ids[self.read_offset..], self.skip_special)?;
            let new = new.get(self.held..).unwrap_or_default().to_string();
            self.advance();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whether the pending tokens end inside a character that may still complete: their bytes
    /// end in the valid start of one. Bytes that can never be part of a character (a stray
    /// continuation byte) do not wait, so a character after them is not cut short. Where a
    /// token's bytes are unknown (tokenizers without a byte table), up to 4 tokens that write
    /// text are waited for, a UTF-8 character's most bytes.
    fn waits(&self) -> bool {
        let writing: Vec<u32> = self.ids[self.read_offset..]
            .iter()
            .copied()
            .filter(|&id| !(self.skip_special && self.tok.is_special(id)))
            .collect();
        let mut bytes = Vec::new();
        for &id in &writing {
            let Some(b) = self.tok.token_bytes(id) else {
                return writing.len() < 4;
            };
            bytes.extend_from_slice(b);
        }
        let last = bytes.len().saturating_sub(4)..bytes.len();
        let Some(start) = last.rev().find(|&i| bytes[i] & 0xC0 != 0x80) else {
            return false;
        };
        matches!(std::str::from_utf8(&bytes[start..]),
            Err(e) if e.valid_up_to() == 0 && e.error_len().is_none())
    }

    /// Whatever is still pending (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, full) = self.window()?;
        let new = full
            .get(prefix.len()..)
            .and_then(|tail| tail.get(self.held..))
            .unwrap_or_default()
            .to_string();
        self.advance();
        Ok(new)
    }

    /// The window's text up to the pending tokens, and with them.
    fn window(&self) -> Result<(String, String)> {
        let text = |ids: &[u32]| self.tok.decode_with(ids, self.skip_special);
        Ok((
            text(&self.ids[self.prefix_offset..self.read_offset])?,
            text(&self.ids[self.prefix_offset..])?,
        ))
    }

    /// The window's pending tokens are handed out: the next window starts after them.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.held = 0;
        self.compact();
    }

    fn compact(&mut self) {
        if self.prefix_offset > 64 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}
