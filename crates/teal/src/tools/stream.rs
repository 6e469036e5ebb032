//! Tool calls read as the answer is generated, for streaming them as OpenAI and llama.cpp's
//! server do: a call's name as soon as it is known, then its arguments piece by piece, and the
//! text around the calls as it comes, held back only while it may still be (the start of) a
//! call.
//!
//! [`CallStream`] reads the formats [`super::parse_calls`] reads (which is [`CallStream`] run
//! over a whole answer, so that a streamed answer and a whole one agree):
//!
//! - `<tool_call>` blocks anywhere in the answer, each holding a call object
//!   `{"name": ..., "arguments": {...}}` (or `"parameters"`, or the arguments as JSON text);
//! - at the start of the answer, bare call objects one after another or in arrays, optionally
//!   in a Markdown code block (```` ```json ````) and after Mistral's `[TOOL_CALLS]` or Llama
//!   3.1's `<|python_tag|>`; text after them is the answer's content. A bare call names its
//!   tool first: it begins `{"name": "NAME"` for a declared name, written without escapes
//!   (JSON's whitespace between the tokens), as llama.cpp's trigger of such calls has it; an
//!   object that begins otherwise (`{"answer"`, `{"name": "undeclared"`, `{"arguments"`) is
//!   content as soon as it does, so that a plain JSON answer streams. With `tool_choice`
//!   `auto`, [`super::call_grammar`]'s trigger matches exactly these starts, and holds the
//!   rest of the answer to well-formed calls.
//!
//! A call object whose `name` (one of the declared names) comes first and whose arguments are
//! an object is streamed: its name once `"arguments": {` follows it, then its arguments.
//! Other call objects (keys in another order, arguments as JSON text) are held until they are
//! whole. The arguments are written as serde_json writes them (`Value::to_string`: no
//! whitespace, its escapes and numbers; a repeated key is kept as written), a piece whenever
//! the model has written more of them. Text that turns out not to be a call (an undeclared
//! name, not JSON, arguments that are not an object) is content, as are blocks that are not
//! calls. A call object that has `name` twice, or two of `arguments` and `parameters`, is no
//! call either (which one would count depends on the order it is read in): held, it is
//! content; streamed, it is left incomplete. A call whose text is cut short (the token limit,
//! a stop sequence, text that is not JSON after its arguments began) is left incomplete:
//! [`CallStream::calls`] has the complete calls only.
//!
//! The content is the text outside the calls. Its whitespace is held until text follows it; it
//! is dropped at the end when there are calls, and before the first text when a call came
//! before that (whitespace at the start of an answer whose text comes before its calls is
//! kept: it was streamed before the calls were known).

use super::{call, Call};
use std::collections::VecDeque;

/// What [`CallStream`] read from a piece of the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// Text of the answer's content.
    Content(String),
    /// A call begins: the `index`-th (from 0) of the answer, calling `name`.
    Call { index: usize, name: String },
    /// The next piece of the `index`-th call's arguments (JSON text).
    Arguments { index: usize, text: String },
}

/// The opening and closing tags of a call block.
pub(super) const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// The starts of a Markdown code block around calls (the longest first).
pub(super) const FENCES: [&str; 3] = ["```json", "```xml", "```"];
/// The markers other model families write before their calls.
pub(super) const MARKERS: [&str; 2] = ["[TOOL_CALLS]", "<|python_tag|>"];

/// Reads tool calls from an answer given a piece at a time ([`CallStream::push`], then
/// [`CallStream::finish`]), calls of the declared `names` only.
#[derive(Debug)]
pub struct CallStream {
    names: Vec<String>,
    mode: Mode,
    /// Text read as a call's syntax (tags, a code fence, the call object) while it may still
    /// turn out not to be a call: then it is content.
    raw: String,
    /// Text to read again (given back by a mode that held it).
    again: VecDeque<char>,
    /// Whitespace of the content held until text follows it.
    space: String,
    /// Whether content other than whitespace was given.
    wrote: bool,
    /// The calls begun, and whether each is whole.
    calls: Vec<(Call, bool)>,
    out: Vec<Delta>,
}

/// Where a call object stands: after it, what is read next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// In a `<tool_call>` block: its closing tag.
    Block,
    /// At the start of the answer: more objects (`fenced`: in a code block).
    Bare { fenced: bool },
    /// An element of an array of calls.
    Item { fenced: bool },
}

/// Where an array of calls stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    /// After `[`: the first call.
    First,
    /// After a call: `,` or `]`.
    Next,
    /// After `,`: a call.
    Call,
}

#[derive(Debug)]
enum Mode {
    /// The start of the answer, after its leading whitespace: `lead` may still open a code
    /// block.
    Fence { lead: String },
    /// After the code block's opening if any: `lead` may still be a marker.
    Marker { fenced: bool, lead: String },
    /// At the start of the answer, between call objects; `ticks`: backticks of the code
    /// block's end read.
    Bare { fenced: bool, ticks: u8 },
    /// In an array of call objects.
    Array { fenced: bool, at: Item },
    /// After the code block's end: only whitespace may follow the calls.
    Fenced,
    /// In a call object.
    Object(Box<Object>),
    /// Content; `tag`: text held while it may be the start of `<tool_call>`.
    Text { tag: String },
    /// After `<tool_call>`: the call object.
    Open,
    /// After a block's call: whitespace, and text held while it may be `</tool_call>`.
    Close { space: String, tag: String },
}

impl Default for Mode {
    fn default() -> Mode {
        Mode::Text { tag: String::new() }
    }
}

/// A call object being read.
#[derive(Debug)]
struct Object {
    json: Json,
    /// Its text as serde_json writes it, until the call is known.
    head: String,
    /// Whether the call may still be known from its start (`{"name": "f", "arguments": {`).
    early: bool,
    /// The call's index once known, and whether its arguments are being read.
    call: Option<usize>,
    in_args: bool,
    after: After,
    /// A bare call object whose name has not been read yet: it must begin `{"name": "NAME"`
    /// (without escapes) for one of the declared names.
    unnamed: bool,
    /// How many times the object has the key `name`, and `arguments` or `parameters`.
    names: u8,
    args: u8,
}

/// Whether `lead` is the start of one of `words` (`None`: it cannot be), or one of them and
/// more (`Some(n)`: the longest is `n` bytes), or still may become one (`Some(0)`).
fn word_at(lead: &str, words: &[&str]) -> Option<usize> {
    if words
        .iter()
        .any(|w| w.len() > lead.len() && w.starts_with(lead))
    {
        return Some(0);
    }
    words
        .iter()
        .filter(|w| lead.starts_with(**w))
        .map(|w| w.len())
        .max()
}

/// How the start of a bare call object (as serde_json writes it) stands against
/// `{"name":"NAME"` for one of `names`: `None` while it may still become one.
fn name_first(head: &str, names: &[String]) -> Option<bool> {
    const NAME: &str = "{\"name\":\"";
    let Some(rest) = head.strip_prefix(NAME) else {
        return match NAME.starts_with(head) {
            true => None,
            false => Some(false),
        };
    };
    match rest.find('"') {
        Some(end) => Some(names.iter().any(|n| *n == rest[..end])),
        None if names.iter().any(|n| n.starts_with(rest)) => None,
        None => Some(false),
    }
}

/// How the start of a call object (as serde_json writes it) stands against the early form
/// `{"name":"NAME","arguments":{` (or `"parameters"`) for one of `names`.
enum Early {
    /// It may still become one.
    Maybe,
    /// It cannot.
    No,
    /// It is one, calling this name; its arguments start at this byte.
    Call(String, usize),
}

fn early(head: &str, names: &[String]) -> Early {
    const NAME: &str = "{\"name\":\"";
    if head.len() <= NAME.len() {
        return match NAME.starts_with(head) {
            true => Early::Maybe,
            false => Early::No,
        };
    }
    let Some(rest) = head.strip_prefix(NAME) else {
        return Early::No;
    };
    let Some(end) = rest.find('"') else {
        return match names.iter().any(|n| n.starts_with(rest)) {
            true => Early::Maybe,
            false => Early::No,
        };
    };
    let name = &rest[..end];
    if !names.iter().any(|n| n == name) {
        return Early::No;
    }
    let tail = &rest[end + 1..];
    for key in [",\"arguments\":{", ",\"parameters\":{"] {
        if tail.starts_with(key) {
            let at = NAME.len() + end + 1 + key.len() - 1;
            return Early::Call(name.to_string(), at);
        }
        if key.starts_with(tail) {
            return Early::Maybe;
        }
    }
    Early::No
}

impl CallStream {
    /// Nothing read yet; calls of `names` only.
    pub fn new(names: &[&str]) -> CallStream {
        CallStream {
            names: names.iter().map(|n| n.to_string()).collect(),
            mode: Mode::Fence {
                lead: String::new(),
            },
            raw: String::new(),
            again: VecDeque::new(),
            space: String::new(),
            wrote: false,
            calls: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Reads the next piece of the answer; what it adds.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        for c in text.chars() {
            self.step(c);
            while let Some(c) = self.again.pop_front() {
                self.step(c);
            }
        }
        std::mem::take(&mut self.out)
    }

    /// The end of the answer: what was held back and is content after all (text that did not
    /// become a call, the content's last whitespace when there is no call).
    pub fn finish(&mut self) -> Vec<Delta> {
        let whole = self.calls.iter().any(|(_, whole)| *whole);
        match std::mem::take(&mut self.mode) {
            Mode::Fence { lead } | Mode::Marker { lead, .. } => {
                let raw = std::mem::take(&mut self.raw);
                self.content(&raw);
                self.content(&lead);
            }
            Mode::Text { tag } => self.content(&tag),
            Mode::Object(o) if o.call.is_some() => {}
            Mode::Close { .. } => {}
            Mode::Bare { .. }
            | Mode::Array { .. }
            | Mode::Fenced
            | Mode::Object(_)
            | Mode::Open => {
                // A call cut short after whole ones is dropped; alone, it is content.
                let raw = std::mem::take(&mut self.raw);
                if !whole {
                    self.content(&raw);
                }
            }
        }
        if !whole {
            let space = std::mem::take(&mut self.space);
            self.emit(Delta::Content(space));
        }
        std::mem::take(&mut self.out)
    }

    /// The whole calls read so far, in order.
    pub fn calls(&self) -> impl Iterator<Item = &Call> {
        self.calls.iter().filter(|(_, w)| *w).map(|(c, _)| c)
    }

    /// Whether call `index` (in the order the calls began) is whole.
    pub fn is_whole(&self, index: usize) -> bool {
        self.calls.get(index).is_some_and(|(_, whole)| *whole)
    }

    /// Whether a call has begun (whole or not).
    pub fn called(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Adds `d` to what the current piece gives, joined to the delta before it where they
    /// are of one kind.
    fn emit(&mut self, d: Delta) {
        match (self.out.last_mut(), &d) {
            (_, Delta::Content(t) | Delta::Arguments { text: t, .. }) if t.is_empty() => return,
            (Some(Delta::Content(a)), Delta::Content(b)) => {
                a.push_str(b);
                return;
            }
            (Some(Delta::Arguments { index: i, text: a }), Delta::Arguments { index, text: b })
                if i == index =>
            {
                a.push_str(b);
                return;
            }
            _ => {}
        }
        self.out.push(d);
    }

    /// Content text: whitespace held until text follows it, dropped before the first text
    /// when a call came before it.
    fn content(&mut self, text: &str) {
        for c in text.chars() {
            if c.is_whitespace() {
                self.space.push(c);
                continue;
            }
            let space = std::mem::take(&mut self.space);
            if self.wrote || self.calls.is_empty() {
                self.emit(Delta::Content(space));
            }
            self.emit(Delta::Content(c.to_string()));
            self.wrote = true;
        }
    }

    /// Reads `text` again, before what comes next.
    fn again(&mut self, text: &str) {
        for c in text.chars().rev() {
            self.again.push_front(c);
        }
    }

    /// The held text is not a call: it is content, and `c` is read as content.
    fn not_a_call(&mut self, c: char) -> Mode {
        let raw = std::mem::take(&mut self.raw);
        self.content(&raw);
        self.again.push_front(c);
        Mode::default()
    }

    fn begin(&mut self, name: String) -> usize {
        let index = self.calls.len();
        self.emit(Delta::Call {
            index,
            name: name.clone(),
        });
        self.calls.push((
            Call {
                name,
                arguments: String::new(),
            },
            false,
        ));
        self.raw.clear();
        index
    }

    fn arguments(&mut self, index: usize, text: &str) {
        self.calls[index].0.arguments.push_str(text);
        self.emit(Delta::Arguments {
            index,
            text: text.to_string(),
        });
    }

    fn step(&mut self, c: char) {
        let mode = std::mem::take(&mut self.mode);
        self.mode = self.next(mode, c);
    }

    /// The mode after reading `c` in `mode`.
    fn next(&mut self, mode: Mode, c: char) -> Mode {
        match mode {
            Mode::Fence { lead } if lead.is_empty() && c.is_whitespace() => {
                self.content(&c.to_string());
                Mode::Fence { lead }
            }
            Mode::Fence { mut lead } => {
                lead.push(c);
                match word_at(&lead, &FENCES) {
                    Some(0) => Mode::Fence { lead },
                    Some(n) => {
                        self.raw.push_str(&lead[..n]);
                        self.again(&lead[n..]);
                        Mode::Marker {
                            fenced: true,
                            lead: String::new(),
                        }
                    }
                    None => {
                        self.again(&lead);
                        Mode::Marker {
                            fenced: false,
                            lead: String::new(),
                        }
                    }
                }
            }
            Mode::Marker { fenced, lead } if lead.is_empty() && c.is_whitespace() => {
                self.raw.push(c);
                Mode::Marker { fenced, lead }
            }
            Mode::Marker { fenced, mut lead } => {
                lead.push(c);
                match word_at(&lead, &MARKERS) {
                    Some(0) => Mode::Marker { fenced, lead },
                    Some(n) => {
                        self.raw.push_str(&lead[..n]);
                        self.again(&lead[n..]);
                        Mode::Bare { fenced, ticks: 0 }
                    }
                    None => {
                        self.again(&lead);
                        Mode::Bare { fenced, ticks: 0 }
                    }
                }
            }
            Mode::Bare { fenced, ticks } if ticks > 0 => match c {
                '`' if ticks == 2 => {
                    self.raw.push(c);
                    Mode::Fenced
                }
                '`' => {
                    self.raw.push(c);
                    Mode::Bare {
                        fenced,
                        ticks: ticks + 1,
                    }
                }
                _ => self.not_a_call(c),
            },
            Mode::Bare { fenced, ticks } => match c {
                c if c.is_whitespace() => {
                    self.raw.push(c);
                    Mode::Bare { fenced, ticks }
                }
                '{' => self.object(After::Bare { fenced }, c),
                '[' => {
                    self.raw.push(c);
                    Mode::Array {
                        fenced,
                        at: Item::First,
                    }
                }
                // The end of a code block of calls (without a call, it is none).
                '`' if fenced && self.called() => {
                    self.raw.push(c);
                    Mode::Bare { fenced, ticks: 1 }
                }
                _ => self.not_a_call(c),
            },
            Mode::Array { fenced, at } => match (at, c) {
                (_, c) if c.is_whitespace() => {
                    self.raw.push(c);
                    Mode::Array { fenced, at }
                }
                (Item::First | Item::Call, '{') => self.object(After::Item { fenced }, c),
                (Item::Next, ',') => {
                    self.raw.push(c);
                    Mode::Array {
                        fenced,
                        at: Item::Call,
                    }
                }
                (Item::Next, ']') => {
                    // The end of an array of whole calls: no content, as its start.
                    self.raw.clear();
                    Mode::Bare { fenced, ticks: 0 }
                }
                _ => self.not_a_call(c),
            },
            Mode::Fenced if c.is_whitespace() => {
                self.raw.push(c);
                Mode::Fenced
            }
            Mode::Fenced => {
                // Text after a code block of calls: the block's end is no content.
                if self.called() {
                    self.raw.clear();
                }
                self.not_a_call(c)
            }
            Mode::Object(o) => self.object_char(o, c),
            Mode::Text { mut tag } => {
                if tag.is_empty() && c != '<' {
                    self.content(&c.to_string());
                    return Mode::Text { tag };
                }
                tag.push(c);
                if tag == OPEN {
                    self.raw = tag;
                    Mode::Open
                } else if OPEN.starts_with(&tag) {
                    Mode::Text { tag }
                } else {
                    // Not the tag: its `<` is content, the rest is read again.
                    self.content("<");
                    self.again(&tag[1..]);
                    Mode::default()
                }
            }
            Mode::Open => match c {
                c if c.is_whitespace() => {
                    self.raw.push(c);
                    Mode::Open
                }
                '{' => self.object(After::Block, c),
                _ => self.not_a_call(c),
            },
            Mode::Close { mut space, mut tag } => {
                if tag.is_empty() && c.is_whitespace() {
                    space.push(c);
                    return Mode::Close { space, tag };
                }
                tag.push(c);
                if tag == CLOSE {
                    Mode::default()
                } else if CLOSE.starts_with(&tag) {
                    Mode::Close { space, tag }
                } else {
                    // No closing tag: what follows the call is content.
                    self.again(&format!("{space}{tag}"));
                    Mode::default()
                }
            }
        }
    }

    /// A call object starts with `c` (`{`).
    fn object(&mut self, after: After, c: char) -> Mode {
        let o = Object {
            json: Json::default(),
            head: String::new(),
            early: true,
            call: None,
            in_args: false,
            after,
            unnamed: after != After::Block,
            names: 0,
            args: 0,
        };
        self.object_char(Box::new(o), c)
    }

    fn object_char(&mut self, mut o: Box<Object>, c: char) -> Mode {
        if (o.unnamed && c == '\\') || !o.json.push(c) {
            // Not JSON: a call begun is left incomplete; otherwise the text is content.
            return match o.call {
                Some(_) => {
                    self.again.push_front(c);
                    Mode::default()
                }
                None => self.not_a_call(c),
            };
        }
        match o.json.key().as_deref() {
            Some("name") => o.names += 1,
            Some("arguments" | "parameters") => o.args += 1,
            _ => {}
        }
        let text = o.json.take();
        match o.call {
            Some(index) if o.in_args => {
                self.arguments(index, &text);
                o.in_args = o.json.depth() > 1;
            }
            Some(_) => {}
            None => {
                if o.unnamed {
                    match name_first(&format!("{}{text}", o.head), &self.names) {
                        Some(false) => return self.not_a_call(c),
                        Some(true) => o.unnamed = false,
                        None => {}
                    }
                }
                self.raw.push(c);
                o.head.push_str(&text);
                if o.early {
                    match early(&o.head, &self.names) {
                        Early::Maybe => {}
                        Early::No => o.early = false,
                        Early::Call(name, at) => {
                            let index = self.begin(name);
                            let args = o.head.split_off(at);
                            self.arguments(index, &args);
                            o.call = Some(index);
                            o.in_args = o.json.depth() > 1;
                        }
                    }
                }
            }
        }
        if !o.json.done() {
            return Mode::Object(o);
        }
        // A key that says which call it is, given twice: no call (a call streamed from its
        // name on is left incomplete).
        let twice = o.names > 1 || o.args > 1;
        let index = match o.call {
            Some(index) => index,
            None => {
                let found = serde_json::from_str(&o.head)
                    .ok()
                    .filter(|_| !twice)
                    .and_then(|v| call(v, &self.names));
                let Some(found) = found else {
                    let raw = std::mem::take(&mut self.raw);
                    self.content(&raw);
                    return Mode::default();
                };
                let index = self.begin(found.name);
                self.arguments(index, &found.arguments);
                index
            }
        };
        self.calls[index].1 = !twice;
        match o.after {
            After::Block => Mode::Close {
                space: String::new(),
                tag: String::new(),
            },
            After::Bare { fenced } => Mode::Bare { fenced, ticks: 0 },
            After::Item { fenced } => Mode::Array {
                fenced,
                at: Item::Next,
            },
        }
    }
}

/// Where a [`Json`] value stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum At {
    /// A value must come.
    #[default]
    Value,
    /// After `[`: a value or `]`.
    FirstItem,
    /// After `{`: a key or `}`.
    FirstKey,
    /// After `,` in an object: a key.
    Key,
    Colon,
    /// After a value: `,` or the end of its array or object.
    Next,
    /// In a string (`key`: an object's key); after `\`; in `\u`'s digits; after a high
    /// surrogate, its low one's `\u` (`seen`: of its two characters).
    Str {
        key: bool,
    },
    Escape {
        key: bool,
    },
    Hex {
        key: bool,
    },
    Low {
        key: bool,
        seen: u8,
    },
    Number,
    /// In `true`, `false` or `null`: the word and how much of it was read.
    Word(&'static str, usize),
    /// The value is whole.
    Done,
}

/// The most arrays and objects open in one another that serde_json reads (its recursion
/// limit): a call nested deeper is not JSON, as its arguments could not be read back.
const MAX_DEPTH: usize = 127;

/// One JSON value read a character at a time and written as serde_json writes it
/// (`Value::to_string`), written text taken with [`Json::take`]: no whitespace, numbers once
/// whole as serde_json reads and writes them, strings with its escapes, arrays and objects
/// nested [`MAX_DEPTH`] deep at most.
#[derive(Debug, Default)]
struct Json {
    at: At,
    /// The arrays (`[`) and objects (`{`) open.
    open: Vec<u8>,
    /// A number's text, or `\u`'s digits.
    buf: String,
    /// A high surrogate waiting for its low one.
    high: Option<u32>,
    out: String,
    /// The top-level key being read, and one the last character ended.
    key: String,
    key_read: Option<String>,
}

/// Writes `c` into a JSON string as serde_json does.
fn escape(out: &mut String, c: char) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
        c => out.push(c),
    }
}

fn json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

impl Json {
    /// Reads `c`; false if the text is not JSON (or goes on after the value).
    fn push(&mut self, c: char) -> bool {
        match self.at {
            At::Done => false,
            At::Number if matches!(c, '0'..='9' | '+' | '-' | '.' | 'e' | 'E') => {
                self.buf.push(c);
                true
            }
            At::Number => {
                let number = std::mem::take(&mut self.buf);
                match serde_json::from_str::<serde_json::Number>(&number) {
                    Ok(n) => {
                        self.out.push_str(&n.to_string());
                        self.value_done();
                        self.push(c)
                    }
                    Err(_) => false,
                }
            }
            At::Word(word, n) => {
                if !word[n..].starts_with(c) {
                    return false;
                }
                match n + 1 == word.len() {
                    true => {
                        self.out.push_str(word);
                        self.value_done();
                    }
                    false => self.at = At::Word(word, n + 1),
                }
                true
            }
            At::Str { key } => {
                match c {
                    '"' => {
                        self.out.push('"');
                        match key {
                            true => {
                                if self.open.len() == 1 {
                                    self.key_read = Some(std::mem::take(&mut self.key));
                                }
                                self.at = At::Colon;
                            }
                            false => self.value_done(),
                        }
                    }
                    '\\' => self.at = At::Escape { key },
                    c if (c as u32) < 0x20 => return false,
                    c => self.put(c, key),
                }
                true
            }
            At::Escape { key } => {
                let c = match c {
                    '"' | '\\' | '/' => c,
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'u' => {
                        self.at = At::Hex { key };
                        return true;
                    }
                    _ => return false,
                };
                self.put(c, key);
                self.at = At::Str { key };
                true
            }
            At::Hex { key } => {
                if !c.is_ascii_hexdigit() {
                    return false;
                }
                self.buf.push(c);
                if self.buf.len() < 4 {
                    return true;
                }
                let Ok(n) = u32::from_str_radix(&std::mem::take(&mut self.buf), 16) else {
                    return false;
                };
                let n = match (self.high.take(), n) {
                    (Some(high), 0xDC00..=0xDFFF) => {
                        0x10000 + ((high - 0xD800) << 10) + (n - 0xDC00)
                    }
                    (Some(_), _) | (None, 0xDC00..=0xDFFF) => return false,
                    (None, 0xD800..=0xDBFF) => {
                        self.high = Some(n);
                        self.at = At::Low { key, seen: 0 };
                        return true;
                    }
                    (None, n) => n,
                };
                let Some(c) = char::from_u32(n) else {
                    return false;
                };
                self.put(c, key);
                self.at = At::Str { key };
                true
            }
            At::Low { key, seen } => {
                match (seen, c) {
                    (0, '\\') => self.at = At::Low { key, seen: 1 },
                    (1, 'u') => self.at = At::Hex { key },
                    _ => return false,
                }
                true
            }
            _ if json_space(c) => true,
            At::Colon => {
                if c != ':' {
                    return false;
                }
                self.out.push(':');
                self.at = At::Value;
                true
            }
            At::FirstKey | At::Key if c == '"' => {
                self.out.push('"');
                self.at = At::Str { key: true };
                true
            }
            At::FirstKey if c == '}' => self.close(b'{', c),
            At::FirstItem if c == ']' => self.close(b'[', c),
            At::Value | At::FirstItem => {
                match c {
                    '{' | '[' if self.open.len() >= MAX_DEPTH => return false,
                    '{' | '[' => {
                        self.open.push(c as u8);
                        self.out.push(c);
                        self.at = match c {
                            '{' => At::FirstKey,
                            _ => At::FirstItem,
                        };
                    }
                    '"' => {
                        self.out.push('"');
                        self.at = At::Str { key: false };
                    }
                    '-' | '0'..='9' => {
                        self.buf.push(c);
                        self.at = At::Number;
                    }
                    't' => self.at = At::Word("true", 1),
                    'f' => self.at = At::Word("false", 1),
                    'n' => self.at = At::Word("null", 1),
                    _ => return false,
                }
                true
            }
            At::Next => match (self.open.last(), c) {
                (Some(b'{'), ',') => {
                    self.out.push(',');
                    self.at = At::Key;
                    true
                }
                (Some(b'['), ',') => {
                    self.out.push(',');
                    self.at = At::Value;
                    true
                }
                (Some(b'{'), '}') => self.close(b'{', c),
                (Some(b'['), ']') => self.close(b'[', c),
                _ => false,
            },
            At::FirstKey | At::Key => false,
        }
    }

    /// Writes a string's character `c` (`key`: of an object's key), as serde_json does.
    fn put(&mut self, c: char, key: bool) {
        escape(&mut self.out, c);
        if key && self.open.len() == 1 {
            self.key.push(c);
        }
    }

    /// The top-level key the last character ended, if it did.
    fn key(&mut self) -> Option<String> {
        self.key_read.take()
    }

    /// Closes the innermost array or object (`open`) with `c`.
    fn close(&mut self, open: u8, c: char) -> bool {
        if self.open.pop() != Some(open) {
            return false;
        }
        self.out.push(c);
        self.value_done();
        true
    }

    fn value_done(&mut self) {
        self.at = match self.open.is_empty() {
            true => At::Done,
            false => At::Next,
        };
    }

    /// The text written since the last call.
    fn take(&mut self) -> String {
        std::mem::take(&mut self.out)
    }

    /// The arrays and objects open.
    fn depth(&self) -> usize {
        self.open.len()
    }

    fn done(&self) -> bool {
        self.at == At::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Every piece `text` gives, fed whole, then a character at a time: both the same once
    /// joined.
    fn read(text: &str, names: &[&str]) -> (String, Vec<(usize, String, String)>, Vec<Call>) {
        let run = |pieces: Vec<String>| {
            let mut s = CallStream::new(names);
            let mut deltas = Vec::new();
            for p in &pieces {
                deltas.extend(s.push(p));
            }
            deltas.extend(s.finish());
            let mut content = String::new();
            let mut calls: Vec<(usize, String, String)> = Vec::new();
            for d in deltas {
                match d {
                    Delta::Content(t) => content.push_str(&t),
                    Delta::Call { index, name } => {
                        assert_eq!(index, calls.len());
                        calls.push((index, name, String::new()));
                    }
                    Delta::Arguments { index, text } => calls[index].2.push_str(&text),
                }
            }
            (content, calls, s.calls().cloned().collect::<Vec<_>>())
        };
        let whole = run(vec![text.to_string()]);
        let chars = run(text.chars().map(String::from).collect());
        assert_eq!(whole, chars, "{text:?}");
        whole
    }

    #[test]
    fn json_is_written_as_serde_json_writes_it() {
        for text in [
            r#"{"a": 1, "b": [true, false, null, -0, 1.50, 1e5, -2E-3, 18446744073709551616]}"#,
            r#"{ "s" : "x\"\\\/\b\f\n\r\t\u0001\u001f\u007f\u00e9\ud83d\ude00é😀" , "k\u0041" : {} , "e": [ ] }"#,
            "{\"deep\": [[[{\"x\": [1, {\"y\": \"z\"}]}]]], \"n\": 12345678901234567890123}",
            "{}",
        ] {
            let mut j = Json::default();
            assert!(text.chars().all(|c| j.push(c)), "{text}");
            assert!(j.done(), "{text}");
            let want = serde_json::from_str::<Value>(text).unwrap().to_string();
            assert_eq!(j.take(), want, "{text}");
        }
        for bad in [
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": 1.}",
            "{\"a\": tru}",
            "{\"a\": \"\\ud83d\"}",
            "{\"a\": \"\\ude00\"}",
            "{\"a\": \"\\x\"}",
            "{\"a\": \"\n\"}",
            "{\"a\": 1,}",
            "{\"a\": [1}",
            "{} {}",
            "{\"a\": 1e400}",
        ] {
            let mut j = Json::default();
            let ok = bad.chars().all(|c| j.push(c)) && j.done();
            assert!(!ok, "{bad}");
        }
    }

    #[test]
    fn a_call_is_streamed_from_its_name_on() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>";
        let mut s = CallStream::new(&["get_weather"]);
        let mut got = Vec::new();
        for c in text.chars() {
            got.push(s.push(&c.to_string()));
        }
        got.push(s.finish());
        let flat: Vec<Delta> = got.iter().flatten().cloned().collect();
        assert_eq!(flat[0], Delta::Content("L".into()));
        // The name once `"arguments": {` follows it; then the arguments a piece at a time
        // (the number once whole), whitespace left out.
        let at = flat
            .iter()
            .position(|d| matches!(d, Delta::Call { .. }))
            .unwrap();
        assert_eq!(
            flat[at],
            Delta::Call {
                index: 0,
                name: "get_weather".into()
            }
        );
        let pieces: Vec<&str> = flat[at + 1..]
            .iter()
            .map(|d| match d {
                Delta::Arguments { index: 0, text } => text.as_str(),
                d => panic!("{d:?}"),
            })
            .collect();
        assert!(pieces.len() > 10, "{pieces:?}");
        assert!(pieces.contains(&"3}"), "{pieces:?}");
        assert_eq!(pieces.concat(), r#"{"city":"Paris","days":3}"#);
        let content: String = flat[..at]
            .iter()
            .map(|d| match d {
                Delta::Content(t) => t.as_str(),
                d => panic!("{d:?}"),
            })
            .collect();
        // The line break before the call is held, then dropped at the end.
        assert_eq!(content, "Let me check.");
        let (content, calls, whole) = read(text, &["get_weather"]);
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 1);
        assert_eq!(whole[0].arguments, calls[0].2);
    }

    #[test]
    fn text_is_content_as_soon_as_it_cannot_be_a_call() {
        // Plain text comes as it is read, but for a possible `<tool_call>` and whitespace.
        let mut s = CallStream::new(&["f"]);
        assert_eq!(s.push("Hi"), [Delta::Content("Hi".into())]);
        assert_eq!(s.push(" <tool"), []);
        assert_eq!(s.push("s"), [Delta::Content(" <tools".into())]);
        assert_eq!(s.push("\n"), []);
        assert_eq!(s.finish(), [Delta::Content("\n".into())]);
        // A possible call at the start is held: a code block, an object, an array, a marker.
        for start in [
            "```",
            "```json\n",
            "{\"name\": \"f\"",
            "[",
            "[TOOL",
            "<|python",
        ] {
            let mut s = CallStream::new(&["f"]);
            assert_eq!(s.push(start), [], "{start}");
        }
        // ... and given as soon as it cannot be one.
        let mut s = CallStream::new(&["f"]);
        assert_eq!(s.push("  ```py"), [Delta::Content("  ```py".into())]);
        // A bare call names a declared tool first: an object that does not is content at
        // once, not when it closes (a plain JSON answer streams).
        for (start, held) in [
            ("{\"name\": \"g", "{\"name\": \""),
            ("{\"answer\"", "{\""),
            ("[{\"arguments\": {", "[{\""),
            ("```json\n{ \"n\\u0061me\"", "```json\n{ \""),
            (
                "<|python_tag|>{\"name\": \"ff\"",
                "<|python_tag|>{\"name\": \"f",
            ),
        ] {
            let mut s = CallStream::new(&["f"]);
            assert_eq!(s.push(held), [], "{start}");
            assert_eq!(
                s.push(&start[held.len()..]),
                [Delta::Content(start.into())],
                "{start}"
            );
            assert_eq!(s.push("}"), [Delta::Content("}".into())], "{start}");
        }
        // Without a call, the content is the text exactly.
        for text in [
            "  Hello <b>x</b>\n\n",
            "<tool_call>not json</tool_call> ",
            "```json\n{\"a\": 1}\n```\n",
            "[1, 2]",
            "[TOOL_CALLS] nothing",
            "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}\n</tool_call>",
            "```json\n```\nok",
            "",
        ] {
            let (content, calls, _) = read(text, &["f"]);
            assert_eq!((content.as_str(), calls.len()), (text, 0), "{text:?}");
        }
    }

    #[test]
    fn calls_in_every_format_give_the_same_pieces_whole_and_streamed() {
        let names = ["f", "g"];
        // The text, its content, its calls' names and arguments.
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
        let cases: &[Case] = &[
            (
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1, 2.50]}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>",
                "",
                &[("f", r#"{"x":[1,2.5]}"#), ("g", "{}")],
            ),
            // Text between and after calls; a block without its closing tag.
            (
                "A\n<tool_call>{\"name\": \"f\", \"parameters\": {\"s\": \"\\u00e9\"}}</tool_call>\nB\n<tool_call>{\"name\": \"g\"}\n C ",
                "A\n\nB\n\n C",
                &[("f", r#"{"s":"é"}"#), ("g", "{}")],
            ),
            // Keys in another order, arguments as JSON text: held until whole.
            (
                "<tool_call>{\"arguments\": {\"y\": true}, \"name\": \"g\"}</tool_call><tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"z\\\": null}\"}</tool_call>",
                "",
                &[("g", r#"{"y":true}"#), ("f", r#"{"z":null}"#)],
            ),
            // Bare, in a code block, in arrays, after markers.
            (
                "```json\n{\n  \"name\": \"f\",\n  \"arguments\": {\"x\": 1}\n}\n```\n",
                "",
                &[("f", r#"{"x":1}"#)],
            ),
            (
                "```\n[{\"name\": \"f\", \"arguments\": {}}, {\"name\": \"g\", \"arguments\": {\"k\": \"v\"}}]\n```",
                "",
                &[("f", "{}"), ("g", r#"{"k":"v"}"#)],
            ),
            (
                "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"x\": 1}}]",
                "",
                &[("f", r#"{"x":1}"#)],
            ),
            (
                "<|python_tag|>{\"name\": \"g\", \"parameters\": {\"x\": 2}}",
                "",
                &[("g", r#"{"x":2}"#)],
            ),
            (
                "{\"name\": \"f\", \"arguments\": {}}\n{\"name\": \"g\", \"arguments\": {}} and more",
                "and more",
                &[("f", "{}"), ("g", "{}")],
            ),
            (
                "[{\"name\": \"f\", \"arguments\": {}}] and more",
                "and more",
                &[("f", "{}")],
            ),
            // Cut short after whole calls: dropped.
            (
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"f",
                "",
                &[("f", "{}")],
            ),
            // Other keys after the arguments.
            (
                "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": {\"b\": []}}, \"id\": 7}</tool_call>",
                "",
                &[("f", r#"{"a":{"b":[]}}"#)],
            ),
        ];
        for (text, content, want) in cases {
            let (got_content, calls, whole) = read(text, &names);
            assert_eq!(&got_content, content, "{text:?}");
            let got: Vec<(&str, &str)> = whole
                .iter()
                .map(|c| (c.name.as_str(), c.arguments.as_str()))
                .collect();
            assert_eq!(&got, want, "{text:?}");
            // The streamed pieces of each whole call are its arguments.
            for (c, (_, name, args)) in whole.iter().zip(&calls) {
                assert_eq!((&c.name, &c.arguments), (name, args), "{text:?}");
            }
        }
    }

    #[test]
    fn a_call_cut_short_is_begun_but_not_whole() {
        let (content, calls, whole) = read(
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": \"abc",
            &["f"],
        );
        assert_eq!(content, "");
        assert_eq!(calls, [(0, "f".into(), "{\"x\":\"abc".into())]);
        assert!(whole.is_empty());
        // Text that is not JSON after the arguments began: the call stays incomplete, the
        // rest is content.
        let (content, calls, whole) = read("{\"name\": \"f\", \"arguments\": {\"x\" oops", &["f"]);
        assert_eq!((content.as_str(), calls.len()), ("oops", 1));
        assert!(whole.is_empty());
    }

    /// A call object that gives its name, or its arguments, twice is no call, whatever the
    /// order of its keys: streamed from its name on, it is left incomplete; held, it is
    /// content. (The first name was streamed and the last one read from a held object.)
    #[test]
    fn a_call_with_a_key_given_twice_is_no_call() {
        for object in [
            r#"{"name": "f", "arguments": {"x": 1}, "name": "g"}"#,
            r#"{"name": "f", "id": 1, "name": "g", "arguments": {}}"#,
            r#"{"arguments": {}, "name": "f", "name": "g"}"#,
            r#"{"name": "f", "arguments": {"x": 1}, "arguments": {"y": 2}}"#,
            r#"{"name": "f", "parameters": {"x": 1}, "arguments": {"y": 2}}"#,
            r#"{"arguments": {}, "name": "f", "n\u0061me": "g"}"#,
        ] {
            let block = format!("{OPEN}{object}{CLOSE}");
            let (content, _, whole) = read(&block, &["f", "g"]);
            assert!(whole.is_empty(), "{block}");
            if !content.is_empty() {
                assert_eq!(content, block);
            }
        }
        // Keys of the arguments are theirs.
        let nested = r#"{"name": "f", "arguments": {"name": "a", "arguments": 1}}"#;
        let (_, _, whole) = read(nested, &["f"]);
        assert_eq!(whole[0].arguments, r#"{"name":"a","arguments":1}"#);
    }

    #[test]
    fn calls_nest_as_deep_as_serde_json_reads() {
        // Nested in the call object (depth 1) and its arguments (2): at the limit, a call
        // whose arguments serde_json reads back, in either key order (in a block: a bare
        // call names its tool first); one deeper is no call.
        for (depth, whole) in [(MAX_DEPTH - 2, true), (MAX_DEPTH - 1, false), (200, false)] {
            let value = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            for text in [
                format!("{{\"name\": \"f\", \"arguments\": {{\"a\": {value}}}}}"),
                format!("{OPEN}{{\"arguments\": {{\"a\": {value}}}, \"name\": \"f\"}}"),
            ] {
                let (_, _, calls) = read(&text, &["f"]);
                assert_eq!(calls.len(), usize::from(whole), "{depth}: {text}");
                for c in calls {
                    let args: Value = serde_json::from_str(&c.arguments).unwrap();
                    assert_eq!(
                        args,
                        serde_json::json!({ "a": serde_json::from_str::<Value>(&value).unwrap() })
                    );
                }
            }
        }
    }

    /// Pieces of answers: of calls in every format, and text that is near them.
    const PARTS: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "<tool",
        "</",
        "<",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "\"name\"",
        "\"arguments\"",
        "\"parameters\"",
        "\"f\"",
        "\"g\"",
        "\"x\"",
        "\"\\u00e9\"",
        "1",
        "2.50",
        "true",
        "null",
        " ",
        "\n",
        "```",
        "```json",
        "[TOOL_CALLS]",
        "<|python_tag|>",
        "Hi",
        "é",
        "\\",
        "{\"name\": \"f\", \"arguments\": {",
        "{\"name\": \"f\", \"arguments\": {\"x\": [1, \"a\\n\"]}}",
        "<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>",
        "{\"arguments\": {}, \"name\": \"g\"}",
        "[{\"name\": \"f\", \"parameters\": {}}]",
        "😀",
        "中文",
        "\0",
        "\"\\ud800\"",
        "\"\\ud83d\\ude00\"",
        "\"h\"",
        "-0",
        "1e400",
        "[[[[",
        "{\"name\": \"f\", \"arguments\": [1]}",
        "{\"name\": \"g\", \"arguments\": \"{\\\"a\\\": 1}\"}",
        "{\"name\": \"f\", \"arguments\": {\"a\": 1, \"a\": 2}}",
    ];

    /// `text` pushed to a reader of `f` and `g` in pieces cut at `cuts` (anywhere in the
    /// text), then finished: the reader and every delta it gave.
    fn fed_in_pieces(text: &str, cuts: &[proptest::sample::Index]) -> (CallStream, Vec<Delta>) {
        let chars: Vec<char> = text.chars().collect();
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(chars.len() + 1)).collect();
        at.sort();
        let mut s = CallStream::new(&["f", "g"]);
        let mut deltas = Vec::new();
        let mut from = 0;
        for &to in at.iter().chain([chars.len()].iter()) {
            deltas.extend(s.push(&chars[from..to].iter().collect::<String>()));
            from = to;
        }
        deltas.extend(s.finish());
        (s, deltas)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever the text and however it is cut into pieces, the stream gives the same
        /// content and calls; without a call begun, the content is the text.
        #[test]
        fn pieces_do_not_change_what_is_read(
            parts in proptest::collection::vec(0..PARTS.len(), 0..24),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..12),
        ) {
            let text: String = parts.iter().map(|&i| PARTS[i]).collect();
            // Cuts anywhere in the text (not only near its start, where calls are rarer).
            let (s, deltas) = fed_in_pieces(&text, &cuts);
            let mut whole = CallStream::new(&["f", "g"]);
            let mut once = whole.push(&text);
            once.extend(whole.finish());
            let join = |ds: &[Delta]| {
                let mut content = String::new();
                let mut calls: Vec<(String, String)> = Vec::new();
                for d in ds {
                    match d {
                        Delta::Content(t) => content.push_str(t),
                        Delta::Call { name, .. } => calls.push((name.clone(), String::new())),
                        Delta::Arguments { index, text } => calls[*index].1.push_str(text),
                    }
                }
                (content, calls)
            };
            let (content, calls) = join(&deltas);
            proptest::prop_assert_eq!(&(content.clone(), calls.clone()), &join(&once), "{:?}", text);
            proptest::prop_assert_eq!(s.calls().collect::<Vec<_>>(), whole.calls().collect::<Vec<_>>());
            // The content is the text less what calls took: nothing added, nothing repeated.
            let mut rest = text.chars();
            proptest::prop_assert!(content.chars().all(|c| rest.any(|d| d == c)), "{:?}", text);
            if calls.is_empty() {
                proptest::prop_assert_eq!(content, text);
            }
            // A whole call's pieces are its arguments, which are JSON.
            for c in s.calls() {
                proptest::prop_assert!(calls.iter().any(|(n, a)| n == &c.name && a == &c.arguments));
                proptest::prop_assert!(serde_json::from_str::<serde_json::Value>(&c.arguments).is_ok());
            }
        }
    }

    /// A JSON value of any kind, strings with what JSON escapes and characters near calls.
    fn value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[a-z<>/\\[\\]{}`\"\\\\ \n\t\u{0}\u{1f}\u{7f}é😀]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 24, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec(("[a-z\"\\\\é]{0,4}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A call object's text as a model may write it: `style`'s bits choose `parameters`,
    /// the arguments as JSON text, the arguments before the name, pretty-printed.
    fn call_text(name: &str, args: &Value, style: u8) -> String {
        let key = if style & 1 == 1 {
            "parameters"
        } else {
            "arguments"
        };
        let args = match style & 2 {
            0 => args.clone(),
            _ => Value::String(args.to_string()),
        };
        let mut object = serde_json::Map::new();
        if style & 4 == 4 {
            object.insert(key.into(), args);
            object.insert("name".into(), name.into());
        } else {
            object.insert("name".into(), name.into());
            object.insert(key.into(), args);
        }
        let object = Value::Object(object);
        match style & 8 {
            0 => object.to_string(),
            _ => serde_json::to_string_pretty(&object).unwrap(),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

        /// Calls written in every format, with text around them where the format has it:
        /// read back with their names and arguments (serde_json's text of the value written),
        /// the streamed pieces the same, the content the text outside the calls.
        #[test]
        fn calls_in_every_format_are_read_back(
            calls in proptest::collection::vec(
                (0..2usize, proptest::collection::vec(("[a-z_\"é]{0,6}", value()), 0..5), 0u8..16),
                1..4,
            ),
            format in 0u8..7,
            texts in proptest::collection::vec("[A-Za-z][A-Za-z .,é😀中\n]{0,10}", 4),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..12),
        ) {
            let calls: Vec<(&str, Value, u8)> = calls
                .into_iter()
                .map(|(n, kv, style)| (["f", "g"][n], Value::Object(kv.into_iter().collect()), style))
                .collect();
            let calls = match format {
                6 => &calls[..1],
                _ => &calls[..],
            };
            // Bare calls name their tool first; blocks have either order.
            let order = if format == 0 { 4 } else { 0 };
            let objects: Vec<String> =
                calls.iter().map(|(n, a, s)| call_text(n, a, *s & (11 | order))).collect();
            let (text, content) = match format {
                // Blocks, text before, between and after them.
                0 => {
                    let mut text = String::new();
                    let mut content = String::new();
                    for (i, o) in objects.iter().enumerate() {
                        let before = if i == 0 { format!("{}\n", texts[0]) } else { "\n".into() };
                        let after = match i + 1 == objects.len() {
                            true => format!("\n{}", texts[3]),
                            false => format!("\n{}", texts[1 + i % 2]),
                        };
                        text.push_str(&format!("{before}<tool_call>\n{o}\n</tool_call>{after}"));
                        content.push_str(&before);
                        content.push_str(&after);
                    }
                    (text, content.trim_end().to_string())
                }
                1 => (format!("{}\n{}", objects.join("\n"), texts[0]), texts[0].trim_end().to_string()),
                2 => (format!("[{}] {}", objects.join(", "), texts[0]), texts[0].trim_end().to_string()),
                3 => (format!("```json\n{}\n```\n", objects.join("\n")), String::new()),
                4 => (format!("  ```\n[{}]\n```\n{}", objects.join(",\n"), texts[0]), texts[0].trim_end().to_string()),
                5 => (format!("[TOOL_CALLS] [{}]", objects.join(", ")), String::new()),
                _ => (format!("<|python_tag|>{}", objects[0]), String::new()),
            };
            let (s, deltas) = fed_in_pieces(&text, &cuts);
            let mut got_content = String::new();
            let mut streamed: Vec<(String, String)> = Vec::new();
            for d in deltas {
                match d {
                    Delta::Content(t) => got_content.push_str(&t),
                    Delta::Call { index, name } => {
                        proptest::prop_assert_eq!(index, streamed.len());
                        streamed.push((name, String::new()));
                    }
                    Delta::Arguments { index, text } => streamed[index].1.push_str(&text),
                }
            }
            proptest::prop_assert_eq!(&got_content, &content, "{:?}", text);
            let whole: Vec<(String, String)> =
                s.calls().map(|c| (c.name.clone(), c.arguments.clone())).collect();
            let want: Vec<(String, String)> =
                calls.iter().map(|(n, a, _)| (n.to_string(), a.to_string())).collect();
            proptest::prop_assert_eq!(&whole, &want, "{:?}", text);
            proptest::prop_assert_eq!(&streamed, &want, "{:?}", text);
            for ((_, args), (_, value, _)) in whole.iter().zip(calls) {
                proptest::prop_assert_eq!(&serde_json::from_str::<Value>(args).unwrap(), value);
            }
            let parsed = crate::tools::parse_calls(&text, &["f", "g"]).unwrap();
            proptest::prop_assert_eq!(parsed.0, content);
            proptest::prop_assert_eq!(
                parsed.1.into_iter().map(|c| (c.name, c.arguments)).collect::<Vec<_>>(),
                want
            );
        }
    }
}
