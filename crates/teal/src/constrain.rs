//! Constrained sampling: JSON mode (OpenAI's `response_format: {"type": "json_object"}`). A
//! recognizer of JSON prefixes decides, before each sampled token, which tokens keep the text a
//! prefix of one JSON object; the others are masked out, and once the object is closed only an
//! end-of-sequence token may follow.

use crate::tokenizer::{TokenBytes, Tokenizer};

/// The most nested objects and arrays JSON mode allows.
pub const MAX_DEPTH: u32 = 128;

/// The most whitespace bytes in a row outside strings (a line break and deep indentation),
/// so that a model cannot stall in whitespace, which JSON allows without end.
pub const MAX_WHITESPACE: u8 = 64;

/// Where a recognizer is in the grammar between tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A value (after `:`, or the top level).
    Value,
    /// A value or `]` (after `[`).
    ValueOrClose,
    /// A key (after `,` in an object).
    Key,
    /// A key or `}` (after `{`).
    KeyOrClose,
    /// `:` after a key.
    Colon,
    /// `,` or the closer of the innermost container.
    CommaOrClose,
}

/// Inside a token of the grammar (a string, number or literal), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    None,
    /// In a string (a key if `key`); `esc`: after a backslash; `hex`: \u digits still due;
    /// `utf8`: the continuation bytes still due of a UTF-8 character and the range of the next;
    /// `sur`: where a \u escape stands against UTF-16 surrogates.
    Str {
        key: bool,
        esc: bool,
        hex: u8,
        utf8: Utf8,
        sur: Sur,
    },
    Num(Num),
    /// In `true`, `false` or `null`: the word and how many of its bytes came.
    Lit(&'static [u8], u8),
}

/// A `\u` escape of a UTF-16 surrogate is taken only as a high-low pair (a lone one is no
/// character, and parsers such as serde_json refuse it): where the escapes stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sur {
    /// No surrogate under way.
    No,
    /// The first digit was `d`: the second says whether it is a surrogate.
    Lead,
    /// In the digits of a high surrogate.
    High,
    /// After a high surrogate: its low one's `\`, then its `u`.
    Slash,
    U,
    /// The low surrogate's first digit (`d`), then its second (`c`-`f`).
    LowD,
    LowC,
}

/// The rest of a UTF-8 character in a string: bytes still due, and the range of the next one
/// (well-formed UTF-8 only: no overlong forms, surrogates or code points past U+10FFFF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Utf8 {
    due: u8,
    lo: u8,
    hi: u8,
}

impl Lex {
    /// At the start of a string (a key if `key`).
    fn string(key: bool) -> Lex {
        Lex::Str {
            key,
            esc: false,
            hex: 0,
            utf8: Utf8::NONE,
            sur: Sur::No,
        }
    }
}

impl Utf8 {
    const NONE: Utf8 = Utf8 {
        due: 0,
        lo: 0x80,
        hi: 0xbf,
    };

    /// After lead byte `b` (an ASCII byte: nothing due, [`Utf8::NONE`]), or `None` if `b`
    /// leads no character (the grammars' table of lead bytes).
    fn lead(b: u8) -> Option<Utf8> {
        let (_, due, (lo, hi)) = crate::grammar::utf8_lead(b)?;
        Some(Utf8 { due, lo, hi })
    }

    /// After continuation byte `b`, or `None` if it is out of range.
    fn next(self, b: u8) -> Option<Utf8> {
        (self.lo..=self.hi).contains(&b).then_some(Utf8 {
            due: self.due - 1,
            ..Utf8::NONE
        })
    }
}

/// The parts of a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// Whether a number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }

    /// The state after `b`, if `b` continues the number.
    fn next(self, b: u8) -> Option<Num> {
        use Num::*;
        Some(match (self, b) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') => Int,
            (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => Exp,
            (Exp, b'+' | b'-') => ExpSign,
            (Exp | ExpSign | ExpDigits, b'0'..=b'9') => ExpDigits,
            _ => return None,
        })
    }
}

/// A recognizer of the prefixes of one JSON object (whitespace around it allowed). Copy, so
/// that a token can be tried on a copy: the containers are bits of `stack` (1: object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonPrefix {
    expect: Expect,
    lex: Lex,
    stack: u128,
    depth: u32,
    /// Whitespace bytes in a row so far.
    ws: u8,
    /// The top-level object is closed.
    done: bool,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix {
            expect: Expect::Value,
            lex: Lex::None,
            stack: 0,
            depth: 0,
            ws: 0,
            done: false,
        }
    }
}

impl JsonPrefix {
    /// Whether the object is complete.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Takes `bytes`; false (and the state undefined) if they leave no JSON object prefix.
    pub fn push_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.push(b))
    }

    /// Takes one byte; false if it leaves no JSON object prefix.
    pub fn push(&mut self, b: u8) -> bool {
        match self.lex {
            Lex::Str {
                key,
                esc,
                hex,
                utf8,
                sur,
            } => {
                let string = |esc, hex, utf8, sur| Lex::Str {
                    key,
                    esc,
                    hex,
                    utf8,
                    sur,
                };
                self.lex = match (esc, hex, b, sur) {
                    _ if utf8.due > 0 => match utf8.next(b) {
                        Some(u) => string(false, 0, u, Sur::No),
                        None => return false,
                    },
                    // A high surrogate's low one: `\u`, `d`, `c`-`f`, two digits.
                    (_, _, b'\\', Sur::Slash) => string(true, 0, utf8, Sur::U),
                    (_, _, b'u', Sur::U) => string(false, 4, utf8, Sur::LowD),
                    (_, _, b'd' | b'D', Sur::LowD) => string(false, 3, utf8, Sur::LowC),
                    (_, _, b'c'..=b'f' | b'C'..=b'F', Sur::LowC) => string(false, 2, utf8, Sur::No),
                    (_, _, _, Sur::Slash | Sur::U | Sur::LowD | Sur::LowC) => return false,
                    (_, 1.., b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F', _) => {
                        let sur = match (hex, sur, b) {
                            (4, _, b'd' | b'D') => Sur::Lead,
                            (3, Sur::Lead, b'8' | b'9' | b'a' | b'b' | b'A' | b'B') => Sur::High,
                            // A low surrogate without a high one before it.
                            (3, Sur::Lead, b'c'..=b'f' | b'C'..=b'F') => return false,
                            (1, Sur::High, _) => Sur::Slash,
                            (_, Sur::High, _) => Sur::High,
                            _ => Sur::No,
                        };
                        string(false, hex - 1, utf8, sur)
                    }
                    (_, 1.., _, _) => return false,
                    (true, _, b'u', _) => string(false, 4, utf8, Sur::No),
                    (true, _, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't', _) => {
                        string(false, 0, utf8, Sur::No)
                    }
                    (true, _, _, _) => return false,
                    (false, _, b'\\', _) => string(true, 0, utf8, Sur::No),
                    (false, _, b'"', _) => {
                        self.lex = Lex::None;
                        match key {
                            true => self.expect = Expect::Colon,
                            false => self.end_value(),
                        }
                        return true;
                    }
                    (false, _, 0..=0x1f, _) => return false,
                    (false, _, _, _) => match Utf8::lead(b) {
                        Some(u) => string(false, 0, u, Sur::No),
                        None => return false,
                    },
                };
                true
            }
            Lex::Num(n) => match n.next(b) {
                Some(next) => {
                    self.lex = Lex::Num(next);
                    true
                }
                None if n.complete() => {
                    self.lex = Lex::None;
                    self.end_value();
                    self.push(b)
                }
                None => false,
            },
            Lex::Lit(word, i) => {
                if word[i as usize] != b {
                    return false;
                }
                self.lex = match i as usize + 1 == word.len() {
                    true => {
                        self.end_value();
                        Lex::None
                    }
                    false => Lex::Lit(word, i + 1),
                };
                true
            }
            Lex::None => self.structural(b),
        }
    }

    /// A byte between the tokens of the grammar.
    fn structural(&mut self, b: u8) -> bool {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            self.ws += 1;
            return self.ws <= MAX_WHITESPACE;
        }
        self.ws = 0;
        if self.done {
            return false;
        }
        let top_is_object = self.depth > 0 && (self.stack >> (self.depth - 1)) & 1 == 1;
        match (self.expect, b) {
            // The top level is an object.
            (Expect::Value, _) if self.depth == 0 && b != b'{' => false,
            (Expect::Value | Expect::ValueOrClose, b'{') => self.open(true),
            (Expect::Value | Expect::ValueOrClose, b'[') => self.open(false),
            (Expect::Value | Expect::ValueOrClose, b'"') => {
                self.lex = Lex::string(false);
                true
            }
            (Expect::Value | Expect::ValueOrClose, b'-') => {
                self.lex = Lex::Num(Num::Minus);
                true
            }
            (Expect::Value | Expect::ValueOrClose, b'0'..=b'9') => {
                self.lex = Lex::Num(if b == b'0' { Num::Zero } else { Num::Int });
                true
            }
            (Expect::Value | Expect::ValueOrClose, b't' | b'f' | b'n') => {
                let word: &'static [u8] = match b {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                self.lex = Lex::Lit(word, 1);
                true
            }
            (Expect::ValueOrClose, b']') | (Expect::KeyOrClose, b'}') => self.close(),
            (Expect::Key | Expect::KeyOrClose, b'"') => {
                self.lex = Lex::string(true);
                true
            }
            (Expect::Colon, b':') => {
                self.expect = Expect::Value;
                true
            }
            (Expect::CommaOrClose, b',') => {
                self.expect = match top_is_object {
                    true => Expect::Key,
                    false => Expect::Value,
                };
                true
            }
            (Expect::CommaOrClose, b'}') if top_is_object => self.close(),
            (Expect::CommaOrClose, b']') if !top_is_object => self.close(),
            _ => false,
        }
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        self.stack = (self.stack & !(1 << self.depth)) | (u128::from(object) << self.depth);
        self.depth += 1;
        self.expect = match object {
            true => Expect::KeyOrClose,
            false => Expect::ValueOrClose,
        };
        true
    }

    fn close(&mut self) -> bool {
        self.depth -= 1;
        self.end_value();
        true
    }

    /// After a complete value: the object is done at the top level, else `,` or a closer.
    fn end_value(&mut self) {
        match self.depth {
            0 => self.done = true,
            _ => self.expect = Expect::CommaOrClose,
        }
    }
}

/// JSON mode for a sampler: which tokens may come next, from each token's bytes.
#[derive(Clone, Debug)]
pub struct JsonMode {
    state: JsonPrefix,
    /// Each token's bytes; `None` for special tokens (never allowed, end-of-sequence aside).
    bytes: TokenBytes,
    eos: Vec<u32>,
}

impl JsonMode {
    /// JSON mode over `tok`'s vocabulary.
    pub fn new(tok: &Tokenizer) -> JsonMode {
        JsonMode {
            state: JsonPrefix::default(),
            bytes: tok.text_bytes(),
            eos: tok.eos_ids().to_vec(),
        }
    }

    /// Whether `token` may come next: once the object is closed an end-of-sequence token and
    /// nothing else, before that a non-empty token whose bytes keep the text a JSON object
    /// prefix.
    pub fn allows(&self, token: u32) -> bool {
        let (done, eos) = (self.state.done(), self.eos.contains(&token));
        if done || eos {
            return done && eos;
        }
        match self.bytes.get(token as usize) {
            Some(Some(b)) if !b.is_empty() => self.state.clone().push_all(b),
            _ => false,
        }
    }

    /// Records the token sampled.
    pub fn accept(&mut self, token: u32) {
        if let Some(Some(b)) = self.bytes.get(token as usize) {
            self.state.push_all(b);
        }
    }

    /// The end-of-sequence tokens.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }
}

/// llama.cpp's `infill` sampler stage for code completion, on the candidates left after the
/// top-k / top-p / min-p cuts (weights, most likely first):
/// 1. where the end-of-generation tokens weigh enough (3 x their share x the candidates' count
///    above the text tokens' share), only they remain;
/// 2. a token whose text starts another's absorbs it, the likelier of the two keeping both
///    weights (among the first [`INFILL_MERGE`] candidates);
/// 3. text tokens under 0.2 of the total go, then those under 1 / (text tokens left + 1); if
///    no text token is left, the end-of-text token alone remains.
#[derive(Clone, Debug)]
pub struct InfillStage {
    /// Each token's bytes, `None` for special tokens (empty here).
    bytes: TokenBytes,
    eog: Vec<u32>,
    eot: u32,
}

/// The most candidates the prefix merge of [`InfillStage`] looks at.
pub const INFILL_MERGE: usize = 1024;

impl InfillStage {
    /// The stage for `tok`'s vocabulary (end of text: its first end-of-generation token).
    /// Special tokens count as empty, as llama.cpp writes the candidates without them: they
    /// take no part in the prefix merge.
    pub fn new(tok: &Tokenizer) -> InfillStage {
        let bytes = tok.text_bytes();
        let eog = tok.eos_ids().to_vec();
        let eot = eog.first().copied().unwrap_or(0);
        InfillStage { bytes, eog, eot }
    }

    /// The stage for a vocabulary given as each token's bytes (`None`: a special token).
    pub fn from_parts(bytes: TokenBytes, eog: Vec<u32>, eot: u32) -> InfillStage {
        InfillStage { bytes, eog, eot }
    }

    /// Applies the stage to `cand` (weight, token), most likely first; returns how many remain
    /// at its front.
    pub fn apply(&self, cand: &mut Vec<(f32, u32)>) -> usize {
        let is_eog = |t: u32| self.eog.contains(&t);
        let total: f32 = cand.iter().map(|c| c.0).sum();
        let eog: f32 = cand.iter().filter(|c| is_eog(c.1)).map(|c| c.0).sum();
        if 3.0 * eog * cand.len() as f32 > total - eog {
            cand.retain(|c| is_eog(c.1));
            return cand.len();
        }
        let bytes = |t: u32| {
            self.bytes
                .get(t as usize)
                .and_then(Option::as_deref)
                .unwrap_or_default()
        };
        let n = cand.len().min(INFILL_MERGE);
        for i in 0..n {
            for j in 0..n {
                let (a, b) = (bytes(cand[i].1), bytes(cand[j].1));
                if i == j || cand[i].0 == 0.0 || cand[j].0 == 0.0 || a.is_empty() {
                    continue;
                }
                if b.starts_with(a) {
                    let (keep, gone) = if cand[j].0 > cand[i].0 {
                        (j, i)
                    } else {
                        (i, j)
                    };
                    cand[keep].0 += cand[gone].0;
                    cand[gone].0 = 0.0;
                }
            }
        }
        let mut thold = 0.2 * total;
        for pass in 0..2 {
            cand.retain(|c| c.0 > 0.0 && (is_eog(c.1) || c.0 >= thold));
            let text = cand.iter().filter(|c| !is_eog(c.1)).count();
            if text == 0 {
                *cand = vec![(1.0, self.eot)];
                return 1;
            }
            if pass == 0 {
                thold = cand.iter().map(|c| c.0).sum::<f32>() / (text + 1) as f32;
            }
        }
        cand.sort_by(|a, b| b.0.total_cmp(&a.0));
        cand.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn prefix(s: &str) -> bool {
        JsonPrefix::default().push_all(s.as_bytes())
    }

    fn complete(s: &str) -> bool {
        let mut p = JsonPrefix::default();
        p.push_all(s.as_bytes()) && p.done()
    }

    #[test]
    fn recognizes_json_object_prefixes() {
        for ok in [
            "",
            " ",
            "{",
            "{\"a\"",
            "{\"a\": 1",
            "{\"a\": -0.5e+3, \"b\": [true, false, null, \"x\\n\\u00e9\"], \"c\": {}}",
            "{\"nested\": [[[]], {\"k\": [1, 2]}]}",
            "{\"s\": \"caf\u{e9} \u{10348} \u{20ac} \\\"q\\\"\"",
            "{\"a\": 12",
            "{\"a\": 1.",
            "{\"a\": 1e",
            "{\"a\": tr",
        ] {
            assert!(prefix(ok), "{ok:?} should be a prefix");
        }
        for bad in [
            "[",
            "1",
            "\"x\"",
            "{1",
            "{\"a\" 1",
            "{\"a\": 01",
            "{\"a\": 1.}",
            "{\"a\": .5}",
            "{\"a\": tru}",
            "{\"a\": 1,}",
            "{\"a\": [1,]}",
            "{\"a\": 1]",
            "{\"a\": \"\\x\"}",
            "{\"a\": \"\\u12g4\"}",
            "{\"a\": \"tab\there\"}",
            "{} {",
            "{}x",
            "{,}",
        ] {
            assert!(!prefix(bad), "{bad:?} should not be a prefix");
        }
        // Strings hold well-formed UTF-8 only, which may come a byte at a time (a character
        // split over two tokens).
        for bad in [
            &b"{\"a\": \"\xc3\""[..],
            b"{\"a\": \"\xc0\x80",
            b"{\"a\": \"\xed\xa0\x80",
            b"{\"a\": \"\xf4\x90\x80\x80",
            b"{\"a\": \"\x80",
        ] {
            assert!(!JsonPrefix::default().push_all(bad), "{bad:?}");
        }
        // A \u escape of a surrogate only as a high-low pair.
        assert!(complete("{\"a\": \"\\ud83d\\uDE00\\uD7FF\\uE000\"}"));
        assert!(prefix("{\"a\": \"\\uD83D"));
        for bad in [
            "{\"a\": \"\\uD83D\"",
            "{\"a\": \"\\uD83Dx",
            "{\"a\": \"\\uD83D\\n",
            "{\"a\": \"\\uD83D\\uD8",
            "{\"a\": \"\\uD83D\\u0041",
            "{\"a\": \"\\uDC",
            "{\"a\": \"\\udfff",
        ] {
            assert!(!prefix(bad), "{bad:?} should not be a prefix");
        }
        assert!(JsonPrefix::default().push_all(b"{\"a\": \"\xc3"));
        assert!(JsonPrefix::default().push_all(b"{\"a\": \"\xc3\xa9\""));
        assert!(complete("{\"a\": [1, {\"b\": null}]}"));
        assert!(complete(" {} \n"));
        // Whitespace runs are bounded; inside strings anything goes.
        let ws = " ".repeat(MAX_WHITESPACE as usize);
        assert!(prefix(&format!("{ws}{{{ws}\"a\"{ws}:{ws}1")));
        assert!(!prefix(&format!("{ws} ")));
        assert!(prefix(&format!("{{\"{ws}{ws}\"")));
        assert!(!complete("{\"a\": 1"));
        assert!(!complete("{\"a\": [1]"));
    }

    #[test]
    fn depth_is_bounded() {
        let deep = format!("{{\"a\": {}", "[".repeat(MAX_DEPTH as usize - 1));
        assert!(prefix(&deep));
        assert!(!prefix(&format!("{deep}[")));
    }

    /// Against serde_json, an independent parser: single-byte changes of valid documents
    /// (as written, compact and pretty) are complete here exactly when serde_json reads them as one
    /// object, and every prefix of a valid document is a prefix here.
    #[test]
    fn agrees_with_serde_json() {
        let docs = [
            r#"{"name": "Felix", "age": 2, "tags": ["a", "b\n", "\u00e9"], "w": -1.5e-3, "x": {"y": [true, false, null, []]}}"#,
            r#"{"a": [0, 10, 2.50, 1E5, -0], "b": {}, "c": "q\"\\/"}"#,
            r#"{"e": "\ud83d\uDE00 \uD7FF\ue000"}"#,
        ];
        let alphabet = b"{}[]\":,0123456789-+.eEtrufalsn \\u\n\tx\x01dDcC8b";
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut checked = 0;
        for doc in docs {
            let v: serde_json::Value = serde_json::from_str(doc).unwrap();
            // As written (with its escapes: serde_json writes the characters), compact, pretty.
            for text in [
                doc.to_string(),
                serde_json::to_string(&v).unwrap(),
                serde_json::to_string_pretty(&v).unwrap(),
            ] {
                let b = text.as_bytes();
                for i in 0..=b.len() {
                    assert!(JsonPrefix::default().push_all(&b[..i]), "{:?}", &text[..i]);
                }
                for _ in 0..3000 {
                    let mut m = b.to_vec();
                    let at = next(m.len());
                    match next(3) {
                        0 => m[at] = alphabet[next(alphabet.len())],
                        1 => m.insert(at, alphabet[next(alphabet.len())]),
                        _ => {
                            m.remove(at);
                        }
                    }
                    let mut p = JsonPrefix::default();
                    let ours = p.push_all(&m) && p.done();
                    let theirs = std::str::from_utf8(&m)
                        .ok()
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                        .is_some_and(|v| v.is_object());
                    assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&m));
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 27000);
    }

    /// llama.cpp's example: "hel" absorbs "hell" and "hello"; a likely end-of-generation token
    /// wins outright; nothing likely enough left: end of text.
    #[test]
    fn infill_stage_merges_prefixes_and_cuts() {
        let words = ["hel", "hell", "hello", "dummy", "<eot>", "x"];
        let stage = InfillStage::from_parts(
            Arc::new(words.iter().map(|w| Some(w.as_bytes().to_vec())).collect()),
            vec![4],
            4,
        );
        let mut cand = vec![(0.5, 0), (0.2, 1), (0.1, 2), (0.1, 3), (0.0, 4)];
        let n = stage.apply(&mut cand);
        assert_eq!(n, 1);
        assert_eq!(cand[0].1, 0);
        assert!((cand[0].0 - 0.8).abs() < 1e-6, "{cand:?}");
        // End of generation: 3 x 0.2 x 4 candidates = 2.4 above 0.8 of text: only it stays.
        let mut cand = vec![(0.5, 3), (0.25, 5), (0.2, 4), (0.05, 1)];
        assert_eq!(stage.apply(&mut cand), 1);
        assert_eq!(cand[0].1, 4);
        // Many small text tokens: none reaches 0.2 of the total, so end of text.
        let many = InfillStage::from_parts(
            Arc::new(
                ["a", "b", "c", "d", "e", "f", "<eot>"]
                    .iter()
                    .map(|w| Some(w.as_bytes().to_vec()))
                    .collect(),
            ),
            vec![6],
            6,
        );
        let mut flat: Vec<(f32, u32)> = (0..6).map(|t| (0.16, t)).collect();
        assert_eq!(many.apply(&mut flat), 1);
        assert_eq!(flat[0], (1.0, 6));
        // Two strong text tokens survive both cuts, most likely first.
        let mut two = vec![(0.45, 3), (0.4, 5), (0.15, 0)];
        assert_eq!(stage.apply(&mut two), 2);
        assert_eq!((two[0].1, two[1].1), (3, 5));
    }
}
