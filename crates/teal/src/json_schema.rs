//! JSON Schema to GBNF: a grammar ([`crate::grammar`]) whose matches are the JSON documents valid
//! under a schema, for constrained sampling of JSON output (the job of llama.cpp's
//! `json_schema_to_grammar`).
//!
//! The mapping, one rule per schema that needs one (named from the path to it: `root`,
//! `root-name`, `root-name-kv`, `root-tags-item`, `ref-Address`, ...) plus shared rules for the
//! plain JSON values (`value`, `object`, `array`, `string`, `number`, `integer`, `boolean`, `null`,
//! `ws`):
//!
//! - `true` or `{}`: any JSON value. A schema without `type` takes its type from its keywords
//!   (`properties` means an object, `items` an array, `minLength` a string, ...); with none, any
//!   value. `type` may be a list: its alternatives. Keywords of a type that is not allowed are
//!   ignored, as JSON Schema does (`format` beside `"type": "integer"`).
//! - Objects: the `properties` in the schema's order (serde_json's `preserve_order` is on, as
//!   llama.cpp and OpenAI keep it), those in `required` always, the others possibly left out. `additionalProperties` absent or `false`
//!   means no other keys, as OpenAI's structured outputs do; `true` or a schema lets further
//!   `"key": value` pairs (any key but the listed names as written, as llama.cpp does; values of
//!   that schema) follow the listed ones. Without `properties` and `additionalProperties`, any object. A property
//!   whose schema is `false` is left out.
//! - Arrays: `items` (a schema, or the older list form: a tuple), `prefixItems` (a tuple: its
//!   items come first; then items of the `items` schema if given, none if `items` is absent or
//!   `false`), `minItems` (for a tuple, by default its length) and `maxItems`, up to 1000.
//! - Strings: JSON string syntax, `minLength` and `maxLength` (characters, up to 1000), and
//!   `format` `date`, `time` (with its offset), `date-time` and `uuid`; other formats are
//!   annotations (JSON Schema's default; llama.cpp's choice too): any string.
//! - Numbers: JSON syntax with at most 16 integral digits (for `number` also a fraction of at
//!   most 24 digits and an exponent of at most 3). On `integer`, `minimum`, `maximum`,
//!   `exclusiveMinimum` and `exclusiveMaximum` (numbers; a fractional bound allows the integers
//!   inside it): the grammar writes exactly the integers in range, without leading zeros.
//! - `enum` and `const` (any JSON values, filtered by `type` when given): their compact
//!   serializations, exactly (the other keywords beside them are not checked against them).
//! - `anyOf` and `oneOf` (both as alternatives: `oneOf`'s "exactly one" is not enforced), `allOf`
//!   with one schema, and `$ref` to `#`, `#/$defs/NAME` or `#/definitions/NAME` (recursion
//!   included), each alone in its schema beside annotations.
//!
//! Whitespace between tokens is bounded: nothing, one space, or a line break and up to 20
//! spaces or tabs (llama.cpp's choice), so a model cannot stall in it. None is needed at the
//! ends of the document; some may follow it.
//!
//! Refused, with an error naming the keyword and the schema's place as a JSON pointer (`/` for
//! the root), e.g. `/properties/name: keyword 'pattern' is not supported`: any keyword not above
//! besides the annotations (`title`, `description`, `$schema`, `$id`, `$comment`, `default`,
//! `examples`, `deprecated`, `readOnly`, `writeOnly`, and the `$defs`/`definitions` containers),
//! so `pattern`, `not`, `if`, `patternProperties`, `minProperties`, `uniqueItems`,
//! `contains`, ...; `multipleOf`, and the bounds on `number`; `allOf` with several schemas;
//! other references; counts over 1000; and schemas that allow nothing. [`Documents::set_lenient`]
//! skips the keywords it cannot express instead (tools not asked to be `strict`).

use crate::grammar::{Grammar, MAX_REPEAT};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// The largest `minItems`, `maxItems`, `minLength` or `maxLength` (each unit is a copy in the
/// grammar's rules).
const MAX_COUNT: u64 = MAX_REPEAT as u64;

/// Keywords that do not change which documents are valid.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
];

/// Keywords that change validity and are read (some refused in some places).
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "format",
    "enum",
    "const",
    "$ref",
    "anyOf",
    "oneOf",
    "allOf",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// Keywords that stand for other schemas: each must be alone beside annotations.
const COMPOSITIONS: &[&str] = &["$ref", "anyOf", "oneOf", "allOf"];

/// Numeric bounds (on integers all but `multipleOf`; refused on numbers).
const BOUNDS: &[&str] = &[
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// The types, each with the keywords that imply it when `type` is absent.
const TYPES: &[(&str, &[&str])] = &[
    (
        "object",
        &["properties", "required", "additionalProperties"],
    ),
    ("array", &["items", "prefixItems", "minItems", "maxItems"]),
    ("string", &["minLength", "maxLength", "format"]),
    ("number", BOUNDS),
    ("integer", &[]),
    ("boolean", &[]),
    ("null", &[]),
];

/// Shared rules: name, body and the shared rules it uses. Each value ends with its whitespace.
const HELPERS: &[(&str, &str, &[&str])] = &[
    (
        "value",
        "object | array | string | number | boolean | null",
        &["object", "array", "string", "number", "boolean", "null"],
    ),
    (
        "object",
        r#""{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws"#,
        &["string", "value", "ws"],
    ),
    (
        "array",
        r#""[" ws ( value ( "," ws value )* )? "]" ws"#,
        &["value", "ws"],
    ),
    ("string", r#""\"" char* "\"" ws"#, &["char", "ws"]),
    ("char", r#"[^"\\\x00-\x1f] | escape"#, &["escape"]),
    // A `\u` escape of a UTF-16 surrogate only as a pair, high then low: a lone one is no
    // character, and parsers (serde_json among them) refuse it.
    (
        "escape",
        r#""\\" ( ["\\/bfnrt] | "u" ( [0-9a-cA-CefEF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2} | [dD] [89abAB] [0-9a-fA-F]{2} "\\u" [dD] [c-fC-F] [0-9a-fA-F]{2} ) )"#,
        &[],
    ),
    (
        "number",
        r#""-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,24} )? ( [eE] [-+]? [0-9]{1,3} )? ws"#,
        &["ws"],
    ),
    ("integer", r#""-"? ( "0" | [1-9] [0-9]{0,15} ) ws"#, &["ws"]),
    ("boolean", r#"( "true" | "false" ) ws"#, &["ws"]),
    ("null", r#""null" ws"#, &["ws"]),
    (
        "date",
        r#"[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )"#,
        &[],
    ),
    (
        "time",
        r#"( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" ( [0-5] [0-9] | "60" ) ( "." [0-9]{1,9} )? ( [Zz] | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )"#,
        &[],
    ),
    ("date-time", "date [Tt] time", &["date", "time"]),
    (
        "uuid",
        r#"[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}"#,
        &[],
    ),
    ("date-string", r#""\"" date "\"" ws"#, &["date", "ws"]),
    ("time-string", r#""\"" time "\"" ws"#, &["time", "ws"]),
    (
        "date-time-string",
        r#""\"" date-time "\"" ws"#,
        &["date-time", "ws"],
    ),
    ("uuid-string", r#""\"" uuid "\"" ws"#, &["uuid", "ws"]),
    ("ws", r#"( " " | "\n" [ \t]{0,20} )?"#, &[]),
];

/// The schema `true`: any value.
static ANY: Value = Value::Bool(true);

/// The GBNF text (root rule `root`) whose matches are the JSON documents valid under `schema`
/// (for the supported keywords), with bounded whitespace between tokens.
///
/// See the module documentation for the mapping; an unsupported keyword or value is an error
/// naming it and the place of its schema as a JSON pointer.
pub fn schema_to_gbnf(schema: &Value) -> Result<String, String> {
    let text = schema_rules(schema, "root", &[])?;
    Grammar::parse(&text).map_err(|e| {
        at(
            "",
            format!("the schema gives an unusable grammar (a circular '$ref'?): {e}"),
        )
    })?;
    Ok(text)
}

/// The rules for `schema` as [`schema_to_gbnf`] writes them, its own rule named `top` (and
/// the rules made for its parts `top-...`), for a larger grammar whose rules take the names in
/// `taken`: the caller writes `root` and checks the whole.
pub fn schema_rules(schema: &Value, top: &str, taken: &[&str]) -> Result<String, String> {
    let mut d = Documents::new(taken);
    d.add(schema, top)?;
    Ok(d.text())
}

/// The rules for several schemas in one grammar, each a document of its own (its own `#` and
/// `$defs`), their rules' names kept apart: the caller writes the rules that use them and
/// checks the whole.
pub struct Documents<'a>(Gen<'a>);

impl<'a> Documents<'a> {
    /// No schema yet; the caller's own rules take the names in `taken`.
    pub fn new(taken: &[&str]) -> Documents<'a> {
        Documents(Gen {
            root: &Value::Null,
            rules: Vec::new(),
            taken: HELPERS
                .iter()
                .map(|h| h.0.to_string())
                .chain(taken.iter().map(|t| t.to_string()))
                .collect(),
            refs: HashMap::new(),
            helpers: HashSet::from(["ws"]),
            lenient: false,
        })
    }

    /// With `on`, the schemas added next have the keywords the grammar cannot express
    /// (`pattern`, `uniqueItems`, `not`, bounds on numbers, `multipleOf`, ...) skipped instead
    /// of refused: their documents meet the schema except for those (llama.cpp's choice; for
    /// tools not asked to be `strict`).
    pub fn set_lenient(&mut self, on: bool) {
        self.0.lenient = on;
    }

    /// Adds the rules for `schema` as [`schema_to_gbnf`] writes them; the name of its own rule
    /// (like `top`, with a suffix where taken).
    pub fn add(&mut self, schema: &'a Value, top: &str) -> Result<String, String> {
        let g = &mut self.0;
        g.root = schema;
        g.refs.clear();
        let slot = g.take(top);
        let name = g.rules[slot].0.clone();
        g.refs.insert("#".to_string(), name.clone());
        let body = g.body(schema, &name, "")?;
        g.rules[slot].1 = Some(body);
        Ok(name)
    }

    /// The rules' text, the shared rules used included.
    pub fn text(&self) -> String {
        self.0.text()
    }
}

/// `msg` at the schema `ptr` (a JSON pointer; the root shown as `/`).
fn at(ptr: &str, msg: impl std::fmt::Display) -> String {
    format!("{}: {msg}", if ptr.is_empty() { "/" } else { ptr })
}

/// The JSON pointer `ptr` extended by one key or index.
fn join(ptr: &str, key: &str) -> String {
    format!("{ptr}/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// A part of a rule name from any text: `[A-Za-z0-9_]` only, never all digits (the grammar's
/// own rules are named `name-N`), at most 40 characters.
fn segment(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if out.bytes().all(|b| b.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Whether a rule body is only a rule's name (then it can stand for itself).
fn is_name(body: &str) -> bool {
    !body.is_empty()
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A GBNF literal matching exactly `s`.
pub fn literal(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `item` repeated from `min` to `max` (unbounded: `None`) times; empty for none.
fn repeat(item: &str, min: u64, max: Option<u64>) -> String {
    match (min, max) {
        (0, Some(0)) => String::new(),
        (1, Some(1)) => item.to_string(),
        (0, Some(1)) => format!("{item}?"),
        (0, None) => format!("{item}*"),
        (1, None) => format!("{item}+"),
        (m, Some(n)) if m == n => format!("{item}{{{m}}}"),
        (m, Some(n)) => format!("{item}{{{m},{n}}}"),
        (m, None) => format!("{item}{{{m},}}"),
    }
}

/// The non-empty parts joined by spaces.
fn seq(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `v` is of the JSON Schema type `t`.
fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        _ => v.is_null(),
    }
}

/// The count keyword `kw` of `m`, if there, at most [`MAX_COUNT`].
fn count(m: &Map<String, Value>, kw: &str, ptr: &str) -> Result<Option<u64>, String> {
    let Some(v) = m.get(kw) else {
        return Ok(None);
    };
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| *f >= 0.0 && f.fract() == 0.0)
            .map(|f| f as u64)
    });
    match n {
        Some(n) if n <= MAX_COUNT => Ok(Some(n)),
        Some(n) => Err(at(
            ptr,
            format!("keyword '{kw}' is {n}, over the supported {MAX_COUNT}"),
        )),
        None => Err(at(
            ptr,
            format!("keyword '{kw}' must be a non-negative integer"),
        )),
    }
}

/// The largest magnitude the integer rules write: 16 digits.
const INT_LIMIT: i128 = 9_999_999_999_999_999;

/// The integer bound keyword `kw` of `m` as the bound it sets on integers (`minimum` 2.5 allows
/// 3 and above, `exclusiveMaximum` 10 allows 9 and below), clamped to the written range.
fn int_bound(m: &Map<String, Value>, kw: &str, ptr: &str) -> Result<Option<i128>, String> {
    let Some(v) = m.get(kw) else {
        return Ok(None);
    };
    let exact = v.as_i64().map(i128::from).or(v.as_u64().map(i128::from));
    let f = v
        .as_f64()
        .ok_or_else(|| at(ptr, format!("keyword '{kw}' must be a number")))?;
    let round = |r: f64| exact.unwrap_or(r.clamp(-1e17, 1e17) as i128);
    let b = match kw {
        "minimum" => round(f.ceil()),
        "exclusiveMinimum" => round(f.floor()) + 1,
        "maximum" => round(f.floor()),
        _ => round(f.ceil()) - 1,
    };
    Ok(Some(b.clamp(-INT_LIMIT - 1, INT_LIMIT + 1)))
}

/// The decimal digits of the naturals from `lo` to `hi` (`lo <= hi`), without leading zeros.
/// Lengths whose every number is in the range share one alternative.
fn natural_range(lo: u64, hi: u64) -> Vec<String> {
    let (lo, hi) = (lo.to_string(), hi.to_string());
    let mut alts = Vec::new();
    let mut full: Option<(usize, usize)> = None;
    let flush = |full: &mut Option<(usize, usize)>, alts: &mut Vec<String>| {
        if let Some((a, b)) = full.take() {
            let rest = repeat("[0-9]", a as u64 - 1, Some(b as u64 - 1));
            alts.push(seq(&["[1-9]", &rest]));
        }
    };
    for len in lo.len()..=hi.len() {
        let from = match len == lo.len() {
            true => lo.clone(),
            false => format!("1{}", "0".repeat(len - 1)),
        };
        let to = match len == hi.len() {
            true => hi.clone(),
            false => "9".repeat(len),
        };
        if from.starts_with('1') && from[1..].bytes().all(|d| d == b'0') && to == "9".repeat(len) {
            full = Some((full.map_or(len, |f| f.0), len));
        } else {
            flush(&mut full, &mut alts);
            same_length(from.as_bytes(), to.as_bytes(), &mut alts, "");
        }
    }
    flush(&mut full, &mut alts);
    alts
}

/// Pushes onto `alts`, each after `head`, sequences matching the digit strings from `lo` to
/// `hi` (of one length, `lo <= hi`).
fn same_length(lo: &[u8], hi: &[u8], alts: &mut Vec<String>, head: &str) {
    let digits = |a: u8, b: u8| match b - a {
        0 => format!("\"{}\"", a as char),
        _ => format!("[{}-{}]", a as char, b as char),
    };
    let Some((&a, lo_rest)) = lo.split_first() else {
        alts.push(head.to_string());
        return;
    };
    let (&b, hi_rest) = hi.split_first().expect("same length");
    if a == b {
        same_length(lo_rest, hi_rest, alts, &seq(&[head, &digits(a, a)]));
        return;
    }
    let any = repeat("[0-9]", lo_rest.len() as u64, Some(lo_rest.len() as u64));
    let low_full = lo_rest.iter().all(|&d| d == b'0');
    let high_full = hi_rest.iter().all(|&d| d == b'9');
    let first = if low_full { a } else { a + 1 };
    let last = if high_full { b } else { b - 1 };
    if !low_full {
        let nines = vec![b'9'; lo_rest.len()];
        same_length(lo_rest, &nines, alts, &seq(&[head, &digits(a, a)]));
    }
    if first <= last {
        alts.push(seq(&[head, &digits(first, last), &any]));
    }
    if !high_full {
        let zeros = vec![b'0'; hi_rest.len()];
        same_length(&zeros, hi_rest, alts, &seq(&[head, &digits(b, b)]));
    }
}

/// The alternatives matching the integers from `lo` to `hi` (`lo <= hi`, both within
/// [`INT_LIMIT`]) in JSON's form: no leading zeros, no `-0`.
fn int_range(lo: i128, hi: i128) -> Vec<String> {
    let mut alts = Vec::new();
    if lo < 0 {
        let neg = natural_range(hi.min(-1).unsigned_abs() as u64, lo.unsigned_abs() as u64);
        alts.extend(neg.iter().map(|a| seq(&["\"-\"", a])));
    }
    if hi >= 0 {
        alts.extend(natural_range(lo.max(0) as u64, hi as u64));
    }
    alts
}

/// The contents of an object after `{`: `items` (each a key-value rule, and whether required)
/// from `from` on, nothing before them; then pairs of `extra` (a key-value rule) if allowed.
fn object_first(items: &[(String, bool)], from: usize, extra: Option<&str>) -> String {
    let Some((kv, required)) = items.get(from) else {
        return extra
            .map(|a| format!(r#"( {a} ( "," ws {a} )* )?"#))
            .unwrap_or_default();
    };
    let head = seq(&[kv, &object_rest(items, from + 1, extra)]);
    if *required {
        return head;
    }
    match object_first(items, from + 1, extra) {
        rest if rest.is_empty() => format!("( {head} )?"),
        rest => format!("( {head} | {rest} )"),
    }
}

/// The contents of an object from `items[from]` on, after something (so each after a comma).
fn object_rest(items: &[(String, bool)], from: usize, extra: Option<&str>) -> String {
    let mut parts: Vec<String> = items[from..]
        .iter()
        .map(|(kv, required)| {
            if *required {
                format!(r#""," ws {kv}"#)
            } else {
                format!(r#"( "," ws {kv} )?"#)
            }
        })
        .collect();
    if let Some(a) = extra {
        parts.push(format!(r#"( "," ws {a} )*"#));
    }
    parts.join(" ")
}

/// The contents of an array after `[`, from item `i` (0-based) on: `elems` (the tuple's rules)
/// first, then `extra` items if allowed; between `lo` and `hi` (unbounded: `None`) items.
fn array_items(
    elems: &[String],
    extra: Option<&str>,
    i: usize,
    lo: u64,
    hi: Option<u64>,
) -> String {
    let n = i as u64;
    if hi.is_some_and(|h| n >= h) {
        return String::new();
    }
    let sep = if i == 0 { "" } else { r#""," ws"# };
    if let Some(e) = elems.get(i) {
        let piece = seq(&[sep, e, &array_items(elems, extra, i + 1, lo, hi)]);
        return if n < lo {
            piece
        } else {
            format!("( {piece} )?")
        };
    }
    let Some(x) = extra else {
        return String::new();
    };
    let (need, room) = (lo.saturating_sub(n), hi.map(|h| h - n));
    let more = format!(r#"( "," ws {x} )"#);
    if i > 0 {
        return repeat(&more, need, room);
    }
    let piece = seq(&[
        x,
        &repeat(&more, need.saturating_sub(1), room.map(|r| r - 1)),
    ]);
    if need == 0 {
        format!("( {piece} )?")
    } else {
        piece
    }
}

/// The grammar being made.
struct Gen<'a> {
    /// The whole schema (the document being made), for `$ref`.
    root: &'a Value,
    /// Each rule's name and body in the order the names were taken (`None`: taken, unused).
    rules: Vec<(String, Option<String>)>,
    /// The names in use, the shared rules' included.
    taken: HashSet<String>,
    /// The rule made for each `$ref` target.
    refs: HashMap<String, String>,
    /// The shared rules used.
    helpers: HashSet<&'static str>,
    /// Keywords that cannot be written into the grammar are skipped, not refused (the
    /// documents then meet the schema but for them).
    lenient: bool,
}

impl Gen<'_> {
    /// Takes a rule name like `want` (made unique with a suffix `_2`, `_3`, ...); its slot.
    fn take(&mut self, want: &str) -> usize {
        let mut name = want.to_string();
        let mut k = 2;
        while !self.taken.insert(name.clone()) {
            name = format!("{want}_{k}");
            k += 1;
        }
        self.rules.push((name, None));
        self.rules.len() - 1
    }

    /// The shared rule `h`, marked as used.
    fn helper(&mut self, h: &'static str) -> String {
        self.helpers.insert(h);
        h.to_string()
    }

    /// A rule named like `hint` with the body `make` gives (called with the rule's name); a
    /// body that is only a name stands for itself, no rule made.
    fn rule(
        &mut self,
        hint: &str,
        make: impl FnOnce(&mut Self, &str) -> Result<String, String>,
    ) -> Result<String, String> {
        let slot = self.take(hint);
        let name = self.rules[slot].0.clone();
        let body = make(self, &name)?;
        if is_name(&body) {
            return Ok(body);
        }
        self.rules[slot].1 = Some(body);
        Ok(name)
    }

    /// A rule name for the schema `s` at `ptr`, a rule named like `hint` made if needed.
    fn schema(&mut self, s: &Value, hint: &str, ptr: &str) -> Result<String, String> {
        self.rule(hint, |g, name| g.body(s, name, ptr))
    }

    /// The body of a rule `name` for the schema `s` at `ptr` (its values with whitespace after).
    fn body(&mut self, s: &Value, name: &str, ptr: &str) -> Result<String, String> {
        let m = match s {
            Value::Bool(true) => return Ok(self.helper("value")),
            Value::Bool(false) => return Err(at(ptr, "the schema 'false' allows no value")),
            Value::Object(m) => m,
            _ => return Err(at(ptr, "a schema must be an object or a boolean")),
        };
        if let Some(k) = m
            .keys()
            .find(|k| !ANNOTATIONS.contains(&k.as_str()) && !KEYWORDS.contains(&k.as_str()))
            .filter(|_| !self.lenient)
        {
            return Err(at(ptr, format!("keyword '{k}' is not supported")));
        }
        if let Some(&c) = COMPOSITIONS.iter().find(|c| m.contains_key(**c)) {
            if let Some(k) = m.keys().find(|k| KEYWORDS.contains(&k.as_str()) && *k != c) {
                return Err(at(
                    ptr,
                    format!("keyword '{k}' beside '{c}' is not supported"),
                ));
            }
            return self.composition(c, &m[c], name, ptr);
        }
        if m.contains_key("enum") || m.contains_key("const") {
            return self.literals(m, ptr);
        }
        let types = self.types(m, ptr)?;
        if types.is_empty() {
            return Ok(self.helper("value"));
        }
        if let [t] = types[..] {
            return self.typed(t, m, name, ptr);
        }
        let mut alts = Vec::new();
        for t in types {
            alts.push(self.rule(&format!("{name}-{t}"), |g, sub| g.typed(t, m, sub, ptr))?);
        }
        Ok(alts.join(" | "))
    }

    /// The types a schema allows (none: any value), from `type` or else from its keywords;
    /// `integer` dropped beside `number`.
    fn types(&self, m: &Map<String, Value>, ptr: &str) -> Result<Vec<&'static str>, String> {
        let known = |t: &Value| {
            TYPES
                .iter()
                .map(|(name, _)| *name)
                .find(|name| t.as_str() == Some(name))
                .ok_or_else(|| at(ptr, format!("keyword 'type': unknown type {t}")))
        };
        let mut types = match m.get("type") {
            None => TYPES
                .iter()
                .filter(|(_, kws)| kws.iter().any(|k| m.contains_key(*k)))
                .map(|(name, _)| *name)
                .collect(),
            Some(t @ Value::String(_)) => vec![known(t)?],
            Some(Value::Array(list)) if !list.is_empty() => {
                let mut types = Vec::new();
                for t in list {
                    let t = known(t)?;
                    if !types.contains(&t) {
                        types.push(t);
                    }
                }
                types
            }
            Some(_) => {
                return Err(at(
                    ptr,
                    "keyword 'type' must be a type name or a non-empty list of them",
                ))
            }
        };
        if types.contains(&"number") {
            types.retain(|t| *t != "integer");
        }
        Ok(types)
    }

    /// A `$ref`, `anyOf`, `oneOf` or `allOf` (`kw`) with its value `v`.
    fn composition(
        &mut self,
        kw: &str,
        v: &Value,
        name: &str,
        ptr: &str,
    ) -> Result<String, String> {
        if kw == "$ref" {
            return self.reference(v, ptr);
        }
        let Value::Array(list) = v else {
            return Err(at(ptr, format!("keyword '{kw}' must be a list of schemas")));
        };
        let here = join(ptr, kw);
        if kw == "allOf" {
            return match &list[..] {
                [one] => self.body(one, name, &join(&here, "0")),
                _ => Err(at(
                    ptr,
                    "keyword 'allOf' is supported only with exactly one schema",
                )),
            };
        }
        let mut alts: Vec<String> = Vec::new();
        for (i, s) in list.iter().enumerate() {
            if *s == Value::Bool(false) {
                continue;
            }
            let alt = self.schema(s, &format!("{name}-alt{i}"), &join(&here, &i.to_string()))?;
            if !alts.contains(&alt) {
                alts.push(alt);
            }
        }
        if alts.is_empty() {
            return Err(at(ptr, format!("keyword '{kw}' allows no value")));
        }
        Ok(alts.join(" | "))
    }

    /// The rule for the `$ref` value `v` (made on first use; recursion refers to it).
    fn reference(&mut self, v: &Value, ptr: &str) -> Result<String, String> {
        let Value::String(r) = v else {
            return Err(at(ptr, "keyword '$ref' must be a string"));
        };
        if let Some(name) = self.refs.get(r) {
            return Ok(name.clone());
        }
        let parts: Vec<&str> = r.strip_prefix("#/").unwrap_or("").split('/').collect();
        let (container, def) = match parts[..] {
            [c @ ("$defs" | "definitions"), d] => (c, d.replace("~1", "/").replace("~0", "~")),
            _ => {
                return Err(at(
                    ptr,
                    format!(
                        "keyword '$ref': only '#', '#/$defs/NAME' and '#/definitions/NAME' \
                         are supported, not '{r}'"
                    ),
                ))
            }
        };
        let root = self.root;
        let Some(target) = root.get(container).and_then(|defs| defs.get(&def)) else {
            return Err(at(ptr, format!("keyword '$ref': '{r}' is not defined")));
        };
        let slot = self.take(&format!("ref-{}", segment(&def)));
        let name = self.rules[slot].0.clone();
        self.refs.insert(r.clone(), name.clone());
        let body = self.body(target, &name, &join(&join("", container), &def))?;
        self.rules[slot].1 = Some(body);
        Ok(name)
    }

    /// `enum` and/or `const`: their values (of the `type`, if given) as literals.
    fn literals(&mut self, m: &Map<String, Value>, ptr: &str) -> Result<String, String> {
        let mut values: Vec<&Value> = match m.get("enum") {
            None => Vec::new(),
            Some(Value::Array(list)) if !list.is_empty() => list.iter().collect(),
            Some(_) => return Err(at(ptr, "keyword 'enum' must be a non-empty list")),
        };
        if let Some(c) = m.get("const") {
            if m.contains_key("enum") && !values.contains(&c) {
                return Err(at(ptr, "keyword 'const': its value is not in 'enum'"));
            }
            values = vec![c];
        }
        if m.contains_key("type") {
            let types = self.types(m, ptr)?;
            values.retain(|v| types.iter().any(|t| has_type(v, t)));
            if values.is_empty() {
                let kw = if m.contains_key("const") {
                    "const"
                } else {
                    "enum"
                };
                return Err(at(
                    ptr,
                    format!("keyword '{kw}' has no value of the 'type'"),
                ));
            }
        }
        let mut lits: Vec<String> = Vec::new();
        for v in values {
            let l = literal(&v.to_string());
            if !lits.contains(&l) {
                lits.push(l);
            }
        }
        Ok(match &lits[..] {
            [one] => format!("{one} ws"),
            _ => format!("( {} ) ws", lits.join(" | ")),
        })
    }

    /// The body for the type `t` of the schema `m`.
    fn typed(
        &mut self,
        t: &str,
        m: &Map<String, Value>,
        name: &str,
        ptr: &str,
    ) -> Result<String, String> {
        match t {
            "object" => self.object(m, name, ptr),
            "array" => self.array(m, name, ptr),
            "string" => self.string(m, ptr),
            "integer" => self.integer(m, ptr),
            "number" => match BOUNDS
                .iter()
                .find(|k| m.contains_key(**k))
                .filter(|_| !self.lenient)
            {
                Some(k) => Err(at(
                    ptr,
                    format!("keyword '{k}' is not supported on numbers (only on integers)"),
                )),
                None => Ok(self.helper("number")),
            },
            "boolean" => Ok(self.helper("boolean")),
            _ => Ok(self.helper("null")),
        }
    }

    /// An integer, between its bounds if it has any.
    fn integer(&mut self, m: &Map<String, Value>, ptr: &str) -> Result<String, String> {
        if m.contains_key("multipleOf") && !self.lenient {
            return Err(at(ptr, "keyword 'multipleOf' is not supported"));
        }
        let lows = [
            int_bound(m, "minimum", ptr)?,
            int_bound(m, "exclusiveMinimum", ptr)?,
        ];
        let highs = [
            int_bound(m, "maximum", ptr)?,
            int_bound(m, "exclusiveMaximum", ptr)?,
        ];
        let (lo, hi) = (
            lows.into_iter().flatten().max(),
            highs.into_iter().flatten().min(),
        );
        if lo.is_none() && hi.is_none() {
            return Ok(self.helper("integer"));
        }
        let (lo, hi) = (
            lo.unwrap_or(-INT_LIMIT).max(-INT_LIMIT),
            hi.unwrap_or(INT_LIMIT).min(INT_LIMIT),
        );
        if lo > hi {
            return Err(at(
                ptr,
                "the integer bounds allow no value of at most 16 digits",
            ));
        }
        self.helper("ws");
        Ok(format!("( {} ) ws", int_range(lo, hi).join(" | ")))
    }

    /// An object: the `properties` in order, then further pairs if allowed.
    fn object(&mut self, m: &Map<String, Value>, name: &str, ptr: &str) -> Result<String, String> {
        let props = match m.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return Err(at(ptr, "keyword 'properties' must be an object")),
        };
        let mut required: Vec<&str> = Vec::new();
        match m.get("required") {
            None => {}
            Some(Value::Array(list)) => {
                for r in list {
                    let Some(r) = r.as_str() else {
                        return Err(at(ptr, "keyword 'required' must be a list of names"));
                    };
                    if !props.is_some_and(|p| p.contains_key(r)) {
                        return Err(at(
                            ptr,
                            format!("keyword 'required': property '{r}' is not in 'properties'"),
                        ));
                    }
                    required.push(r);
                }
            }
            Some(_) => return Err(at(ptr, "keyword 'required' must be a list of names")),
        }
        let extra = match m.get("additionalProperties") {
            None if props.is_none() => Some(&ANY),
            None | Some(Value::Bool(false)) => None,
            Some(v) => Some(v),
        };
        let mut items: Vec<(String, bool)> = Vec::new();
        for (key, v) in props.into_iter().flatten() {
            let here = join(&join(ptr, "properties"), key);
            let req = required.contains(&key.as_str());
            if *v == Value::Bool(false) {
                if req {
                    return Err(at(
                        &here,
                        "the property is required but its schema is 'false'",
                    ));
                }
                continue;
            }
            let hint = format!("{name}-{}", segment(key));
            let value = self.schema(v, &hint, &here)?;
            let kv = self.rule(&format!("{hint}-kv"), |_, _| {
                Ok(format!(
                    r#"{} ws ":" ws {value}"#,
                    literal(&Value::String(key.clone()).to_string())
                ))
            })?;
            items.push((kv, req));
        }
        let extra = match extra {
            None => None,
            Some(x) => {
                let here = join(ptr, "additionalProperties");
                let value = self.schema(x, &format!("{name}-extra"), &here)?;
                let listed: Vec<&str> = props.into_iter().flatten().map(|p| p.0.as_str()).collect();
                let key = self.other_key(&listed, &format!("{name}-extra-key"));
                Some(self.rule(&format!("{name}-extra-kv"), |_, _| {
                    Ok(format!(r#"{key} ":" ws {value}"#))
                })?)
            }
        };
        Ok(seq(&[
            r#""{" ws"#,
            &object_first(&items, 0, extra.as_deref()),
            r#""}" ws"#,
        ]))
    }

    /// The rule of a JSON string (and the whitespace after it) that is none of `names` as
    /// written, for the keys of further properties (llama.cpp's `_not_strings`): a trie of the
    /// names, a rule named like `hint` for each of its nodes. As there, a name spelled with an
    /// escape (`"\u0061"` for `a`), or one holding `"`, `\` or a control character, is not
    /// excluded.
    fn other_key(&mut self, names: &[&str], hint: &str) -> String {
        self.helper("char");
        let names: Vec<Vec<char>> = names
            .iter()
            .filter(|n| {
                !n.chars()
                    .any(|c| c == '"' || c == '\\' || (c as u32) < 0x20)
            })
            .map(|n| n.chars().collect())
            .collect();
        let top = self.take(hint);
        // Each node: the names with its prefix, the prefix's length and the node's slot.
        let mut todo: Vec<(Vec<&[char]>, usize, usize)> =
            vec![(names.iter().map(|n| n.as_slice()).collect(), 0, top)];
        while let Some((group, depth, slot)) = todo.pop() {
            let mut ends = false;
            let mut children: Vec<(char, Vec<&[char]>)> = Vec::new();
            for n in group {
                match n.get(depth) {
                    None => ends = true,
                    Some(&c) => match children.iter_mut().find(|k| k.0 == c) {
                        Some(k) => k.1.push(n),
                        None => children.push((c, vec![n])),
                    },
                }
            }
            let mut alts = Vec::new();
            let mut class = String::new();
            for (c, names) in children {
                let next = self.take(hint);
                alts.push(format!(
                    "{} {}",
                    literal(&c.to_string()),
                    self.rules[next].0
                ));
                if matches!(c, ']' | '[' | '-' | '^') {
                    class.push('\\');
                }
                class.push(c);
                todo.push((names, depth + 1, next));
            }
            alts.push(format!(r#"( [^"\\\x00-\x1f{class}] | escape ) char* "\"""#));
            if !ends {
                alts.push(r#""\"""#.to_string());
            }
            self.rules[slot].1 = Some(alts.join(" | "));
        }
        let first = self.rules[top].0.clone();
        format!(r#""\"" {first} ws"#)
    }

    /// An array: the tuple's items, then items of the `items` schema if allowed.
    fn array(&mut self, m: &Map<String, Value>, name: &str, ptr: &str) -> Result<String, String> {
        let none: &[Value] = &[];
        let (prefix, prefix_kw, extra) = match (m.get("prefixItems"), m.get("items")) {
            (Some(Value::Array(p)), None | Some(Value::Bool(false))) => {
                (&p[..], "prefixItems", None)
            }
            (Some(Value::Array(p)), Some(x)) => (&p[..], "prefixItems", Some(x)),
            (Some(_), _) => {
                return Err(at(ptr, "keyword 'prefixItems' must be a list of schemas"));
            }
            (None, Some(Value::Array(p))) => (&p[..], "items", None),
            (None, Some(Value::Bool(false))) => (none, "items", None),
            (None, Some(x)) => (none, "items", Some(x)),
            (None, None) => (none, "items", Some(&ANY)),
        };
        let k = prefix.len() as u64;
        let max = count(m, "maxItems", ptr)?;
        let hi = match (max, extra) {
            (Some(h), Some(_)) => Some(h),
            (Some(h), None) => Some(h.min(k)),
            (None, Some(_)) => None,
            (None, None) => Some(k),
        };
        let lo = match count(m, "minItems", ptr)? {
            Some(lo) => lo,
            None => hi.map_or(k, |h| h.min(k)),
        };
        if let Some(h) = hi.filter(|h| lo > *h) {
            return Err(at(
                ptr,
                format!("keyword 'minItems' asks for {lo} items, more than the {h} allowed"),
            ));
        }
        let mut elems = Vec::new();
        for (i, s) in prefix
            .iter()
            .enumerate()
            .take(hi.map_or(prefix.len(), |h| h as usize))
        {
            let here = join(&join(ptr, prefix_kw), &i.to_string());
            elems.push(self.schema(s, &format!("{name}-item{i}"), &here)?);
        }
        let extra = match extra {
            Some(x) if hi.is_none_or(|h| h > k) => {
                Some(self.schema(x, &format!("{name}-item"), &join(ptr, "items"))?)
            }
            _ => None,
        };
        Ok(seq(&[
            r#""[" ws"#,
            &array_items(&elems, extra.as_deref(), 0, lo, hi),
            r#""]" ws"#,
        ]))
    }

    /// A string: of a `format`, or of bounded length.
    fn string(&mut self, m: &Map<String, Value>, ptr: &str) -> Result<String, String> {
        let lo = count(m, "minLength", ptr)?;
        let hi = count(m, "maxLength", ptr)?;
        let format = match m.get("format") {
            None => None,
            Some(Value::String(f)) => Some(f.as_str()),
            Some(_) => return Err(at(ptr, "keyword 'format' must be a string")),
        };
        // Other formats are annotations, as JSON Schema's default vocabulary has them (and
        // llama.cpp): any string.
        let helper = match format {
            Some("date") => Some("date-string"),
            Some("time") => Some("time-string"),
            Some("date-time") => Some("date-time-string"),
            Some("uuid") => Some("uuid-string"),
            _ => None,
        };
        if let Some(helper) = helper {
            if let Some(k) = ["minLength", "maxLength"]
                .iter()
                .find(|k| m.contains_key(**k))
            {
                return Err(at(
                    ptr,
                    format!("keyword '{k}' beside 'format' is not supported"),
                ));
            }
            return Ok(self.helper(helper));
        }
        let lo = lo.unwrap_or(0);
        if hi.is_some_and(|h| lo > h) {
            return Err(at(ptr, "keyword 'minLength' is greater than 'maxLength'"));
        }
        if lo == 0 && hi.is_none() {
            return Ok(self.helper("string"));
        }
        self.helper("char");
        Ok(seq(&[r#""\"""#, &repeat("char", lo, hi), r#""\"" ws"#]))
    }

    /// The grammar's text: the rules in the order their names were taken, then the shared
    /// rules used.
    fn text(&self) -> String {
        let mut out = String::new();
        for (name, body) in &self.rules {
            if let Some(body) = body {
                out.push_str(&format!("{name} ::= {body}\n"));
            }
        }
        let mut need: HashSet<&str> = self.helpers.iter().copied().collect();
        let mut todo: Vec<&str> = need.iter().copied().collect();
        while let Some(h) = todo.pop() {
            for (name, _, deps) in HELPERS {
                if *name == h {
                    for d in *deps {
                        if need.insert(d) {
                            todo.push(d);
                        }
                    }
                }
            }
        }
        for (name, body, _) in HELPERS {
            if need.contains(name) {
                out.push_str(&format!("{name} ::= {body}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::GrammarState;
    use proptest::prelude::*;
    use serde_json::json;
    use std::sync::Arc;

    /// The grammar for `schema` (which must parse).
    fn grammar(schema: &Value) -> Arc<Grammar> {
        let text = schema_to_gbnf(schema).unwrap_or_else(|e| panic!("{schema}: {e}"));
        Arc::new(Grammar::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}")))
    }

    fn accepts(g: &Arc<Grammar>, doc: &str) -> bool {
        let mut s = GrammarState::new(g.clone());
        s.push_bytes(doc.as_bytes()) && s.accepting()
    }

    /// Checks that `schema`'s grammar accepts each of `good` (valid JSON) and none of `bad`.
    fn check(schema: Value, good: &[&str], bad: &[&str]) {
        let g = grammar(&schema);
        for doc in good {
            assert!(
                serde_json::from_str::<Value>(doc).is_ok(),
                "test data: {doc}"
            );
            assert!(accepts(&g, doc), "{schema} should accept {doc}");
        }
        for doc in bad {
            assert!(!accepts(&g, doc), "{schema} should refuse {doc}");
        }
    }

    fn error(schema: Value) -> String {
        schema_to_gbnf(&schema).expect_err("should be refused")
    }

    #[test]
    fn any_value() {
        let good = [
            "1",
            "-0.5e+10",
            "\"a\"",
            "true",
            "false",
            "null",
            "[]",
            "{}",
            "[1, \"a\", {\"b\": [null, {}]}]",
            "{\"a\":{\"b\":[1,2,{\"c\":false}]}, \"d\": \"\\u00e9\\n\"}",
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}",
            "{ }",
            "[ ]",
            "1 ",
            "{\"a\":1}\n",
        ];
        let bad = [
            "",
            " 1",
            "[1,]",
            "[,1]",
            "{\"a\":1,}",
            "{a:1}",
            "'a'",
            "01",
            "1.",
            ".5",
            "-",
            "+1",
            "tru",
            "nul",
            "[1  ,2]",
            "{\"a\" :  1}",
            "[1,\n                     2]",
            "\"a\nb\"",
            "\"\\x\"",
            "\"\\u12\"",
            "[1][2]",
        ];
        check(json!(true), &good, &bad);
        check(json!({}), &good, &bad);
        check(
            json!({"title": "x", "description": "y", "default": 1}),
            &good,
            &bad,
        );
        // At most 20 spaces or tabs of indentation after a line break.
        let g = grammar(&json!({}));
        assert!(accepts(&g, &format!("[1,\n{}2]", " ".repeat(20))));
        assert!(!accepts(&g, &format!("[1,\n{}2]", " ".repeat(21))));
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_value_accepts_serialized_json(v in any_json()) {
            let g = grammar(&json!(true));
            let compact = v.to_string();
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            prop_assert!(accepts(&g, &compact), "{}", compact);
            prop_assert!(accepts(&g, &pretty), "{}", pretty);
        }
    }

    #[test]
    fn primitive_types() {
        check(
            json!({"type": "string"}),
            &[
                "\"\"",
                "\"a b\"",
                "\"é世界\"",
                "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00E9\"",
                // A surrogate pair (U+1F600), the last code units before and after the
                // surrogates.
                "\"\\ud83d\\uDE00\"",
                "\"\\uD7FF\\uE000\"",
            ],
            &[
                "1",
                "null",
                "\"a",
                "\"\t\"",
                "\"\\a\"",
                "\"\\u00G0\"",
                // Lone surrogates, and a pair in the wrong order.
                "\"\\uD800\"",
                "\"\\udfff\"",
                "\"\\uD83D x\"",
                "\"\\uDE00\\uD83D\"",
            ],
        );
        check(
            json!({"type": "number"}),
            &[
                "0",
                "-0",
                "1.5",
                "-12.25e-3",
                "1E+2",
                "1e10",
                "1234567890123456",
            ],
            &[
                "01",
                "00",
                "-01",
                "1.",
                "1e",
                "+1",
                "\"1\"",
                "12345678901234567",
                "1.e3",
            ],
        );
        check(
            json!({"type": "integer"}),
            &["0", "-0", "7", "-42", "1234567890123456"],
            &["1.5", "1e3", "01", "-", "true", "12345678901234567"],
        );
        check(
            json!({"type": "integer", "minimum": 0}),
            &["0", "7", "42", "1234567890123456"],
            &["-1", "-0", "1.5", "01", "12345678901234567"],
        );
        check(
            json!({"type": "boolean"}),
            &["true", "false"],
            &["null", "1", "\"true\""],
        );
        check(
            json!({"type": "null"}),
            &["null"],
            &["false", "0", "\"null\""],
        );
    }

    #[test]
    fn string_lengths_count_characters() {
        check(
            json!({"type": "string", "minLength": 2, "maxLength": 3}),
            &[
                "\"ab\"",
                "\"abc\"",
                "\"éé\"",
                "\"\\n\\u0041x\"",
                "\"世界!\"",
            ],
            &["\"a\"", "\"abcd\"", "\"\"", "\"éééé\"", "\"\\n\\n\\n\\n\""],
        );
        check(json!({"maxLength": 0}), &["\"\""], &["\"a\"", "1"]);
        check(
            json!({"type": "string", "minLength": 3}),
            &["\"abc\"", "\"abcdefgh\""],
            &["\"ab\""],
        );
        let g = grammar(&json!({"type": "string", "maxLength": 1000}));
        assert!(accepts(&g, &format!("\"{}\"", "x".repeat(1000))));
        assert!(!accepts(&g, &format!("\"{}\"", "x".repeat(1001))));
    }

    #[test]
    fn string_formats() {
        check(
            json!({"type": "string", "format": "date"}),
            &["\"2024-02-29\"", "\"1999-12-31\""],
            &[
                "\"2024-13-01\"",
                "\"2024-00-10\"",
                "\"2024-1-1\"",
                "\"2024-01-32\"",
                "2024",
            ],
        );
        check(
            json!({"type": "string", "format": "time"}),
            &[
                "\"23:59:59Z\"",
                "\"00:00:00.123+02:00\"",
                "\"12:30:00-05:30\"",
            ],
            &[
                "\"24:00:00Z\"",
                "\"12:60:00Z\"",
                "\"12:00:00\"",
                "\"12:00Z\"",
            ],
        );
        check(
            json!({"format": "date-time"}),
            &[
                "\"2024-05-01T12:00:00Z\"",
                "\"2024-05-01t12:00:00.5+01:00\"",
            ],
            &["\"2024-05-01 12:00\"", "\"2024-05-01\""],
        );
        check(
            json!({"type": "string", "format": "uuid"}),
            &["\"123e4567-e89b-12d3-a456-426614174000\""],
            &[
                "\"123e4567e89b12d3a456426614174000\"",
                "\"123e4567-e89b-12d3-a456-42661417400g\"",
            ],
        );
        // `format` of another type is ignored, as JSON Schema does.
        check(
            json!({"type": "integer", "format": "int32"}),
            &["5"],
            &["\"5\""],
        );
    }

    #[test]
    fn properties_keep_the_schema_order() {
        let schema = json!({
            "type": "object",
            "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
            "required": ["zeta", "alpha"],
        });
        let text = schema_to_gbnf(&schema).unwrap();
        let g = std::sync::Arc::new(Grammar::parse(&text).unwrap());
        let ok = |doc: &str| {
            let mut s = crate::grammar::GrammarState::new(g.clone());
            s.push_bytes(doc.as_bytes()) && s.accepting()
        };
        assert!(ok(r#"{"zeta": 1, "alpha": 2}"#), "{text}");
        assert!(!ok(r#"{"alpha": 2, "zeta": 1}"#), "{text}");
    }

    #[test]
    fn objects_with_required_and_optional_properties() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": {"type": "integer"},
                "b": {"type": "string"},
                "c": {"type": "boolean"}
            },
            "required": ["b"]
        });
        let g = grammar(&schema);
        let parts = ["\"a\": 1", "\"b\": \"x\"", "\"c\": true"];
        for mask in 0..8u32 {
            let present: Vec<&str> = (0..3)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| parts[i])
                .collect();
            let doc = format!("{{{}}}", present.join(", "));
            assert_eq!(accepts(&g, &doc), mask & 2 != 0, "{doc}");
        }
        for doc in [
            "{\"b\": \"x\", \"a\": 1}",
            "{\"a\": 1,, \"b\": \"x\"}",
            "{, \"b\": \"x\"}",
            "{\"b\": \"x\",}",
            "{\"b\": \"x\", \"d\": 1}",
            "{\"b\": 1}",
            "{\"a\": 1}",
            "{\"b\": \"x\", \"b\": \"y\"}",
            "[]",
        ] {
            assert!(!accepts(&g, doc), "{doc}");
        }
        assert!(accepts(&g, "{\n  \"a\": 1,\n  \"b\": \"x\"\n}"));
        assert!(accepts(&g, "{ \"a\" : 1 , \"b\" : \"x\" }"));

        // All optional: any subset in order, the empty object included.
        let schema = json!({"properties": {"a": {}, "b": {}, "c": {}}});
        let g = grammar(&schema);
        let parts = ["\"a\":1", "\"b\":[2]", "\"c\":{}"];
        for mask in 0..8u32 {
            let present: Vec<&str> = (0..3)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| parts[i])
                .collect();
            let doc = format!("{{{}}}", present.join(","));
            assert!(accepts(&g, &doc), "{doc}");
        }
        assert!(!accepts(&g, "{\"c\":1,\"a\":1}"));
        assert!(!accepts(&g, "{\"d\":1}"));

        // All required.
        check(
            json!({"properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                   "required": ["x", "y"], "additionalProperties": false}),
            &["{\"x\": 1, \"y\": 2.5}"],
            &[
                "{\"x\": 1}",
                "{\"y\": 1}",
                "{}",
                "{\"x\": 1, \"y\": 2, \"z\": 3}",
            ],
        );
    }

    #[test]
    fn additional_properties() {
        check(
            json!({"properties": {"a": {"type": "integer"}}, "required": ["a"],
                   "additionalProperties": true}),
            &["{\"a\": 1}", "{\"a\": 1, \"zz\": \"x\", \"q\": [1]}"],
            &["{\"zz\": 1}", "{\"zz\": 1, \"a\": 1}", "{\"a\": 1,}"],
        );
        check(
            json!({"properties": {"a": {"type": "integer"}},
                   "additionalProperties": {"type": "number"}}),
            &[
                "{}",
                "{\"a\": 1}",
                "{\"a\": 1, \"x\": 2.5}",
                "{\"x\": 2, \"y\": 3}",
            ],
            &["{\"a\": 1, \"x\": \"s\"}", "{\"x\": true}"],
        );
        // Further keys are any strings but the listed ones (llama.cpp's `_not_strings`).
        let g = grammar(
            &json!({"properties": {"a": {"type": "integer"}, "ab": {}, "b-]": {}},
                                "additionalProperties": {"type": "number"}}),
        );
        for doc in [
            "{\"a\": 1.5}",
            "{\"ab\": 1, \"a\": 1.5}",
            "{\"b-]\": 1, \"b-]\": 2}",
        ] {
            assert!(!accepts(&g, doc), "{doc}");
        }
        for doc in [
            "{\"a\": 1, \"\": 1.5}",
            "{\"abc\": 1, \"b\": 2, \"b-\": 3, \"c\": 4}",
            "{\"b-]x\": 1}",
        ] {
            assert!(accepts(&g, doc), "{doc}");
        }
        let g = grammar(
            &json!({"properties": {"a": {"type": "integer"}}, "required": ["a"],
                                "additionalProperties": true}),
        );
        assert!(
            !accepts(&g, "{\"a\": 1, \"a\": \"x\"}") && accepts(&g, "{\"a\": 1, \"x\": \"a\"}")
        );
        check(
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
            &["{}", "{\"k\": \"v\", \"\": \"w\"}"],
            &["{\"k\": 1}", "[]"],
        );
        check(
            json!({"type": "object"}),
            &["{}", "{\"k\": [1, {\"z\": null}]}"],
            &["[]", "1", "{\"k\"}"],
        );
        check(
            json!({"type": "object", "additionalProperties": false}),
            &["{}", "{ }"],
            &["{\"a\": 1}"],
        );
        check(
            json!({"type": "object", "properties": {}}),
            &["{}"],
            &["{\"a\": 1}"],
        );
        // A property whose schema is `false` must be absent.
        check(
            json!({"properties": {"a": false, "b": {}}, "additionalProperties": false}),
            &["{}", "{\"b\": 1}"],
            &["{\"a\": 1}"],
        );
    }

    #[test]
    fn arrays() {
        check(
            json!({"type": "array", "items": {"type": "integer"}}),
            &["[]", "[1]", "[1, 2, 3]", "[\n  1,\n  2\n]"],
            &["[1,]", "[,]", "[1 2]", "[\"a\"]", "[1.5]", "{}"],
        );
        check(
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}),
            &["[1, 2]", "[1, 2, 3]"],
            &["[]", "[1]", "[1, 2, 3, 4]"],
        );
        check(
            json!({"items": {"type": "integer"}, "minItems": 1}),
            &["[1]", "[1, 2, 3, 4, 5]"],
            &["[]"],
        );
        check(json!({"items": {}, "maxItems": 0}), &["[]"], &["[1]"]);
        check(
            json!({"minItems": 2, "maxItems": 2}),
            &["[1, \"a\"]"],
            &["[1]", "[1, 2, 3]"],
        );
        check(json!({"type": "array", "items": false}), &["[]"], &["[1]"]);
        let g = grammar(&json!({"items": {"type": "null"}, "maxItems": 1000}));
        assert!(accepts(&g, &format!("[{}]", vec!["null"; 1000].join(","))));
        assert!(!accepts(&g, &format!("[{}]", vec!["null"; 1001].join(","))));
    }

    #[test]
    fn tuples() {
        let tuple = json!([{"type": "string"}, {"type": "integer"}]);
        check(
            json!({"prefixItems": tuple}),
            &["[\"a\", 1]"],
            &["[\"a\"]", "[]", "[1, \"a\"]", "[\"a\", 1, 2]"],
        );
        check(
            json!({"prefixItems": tuple, "items": {"type": "boolean"}}),
            &["[\"a\", 1]", "[\"a\", 1, true, false]"],
            &["[\"a\"]", "[\"a\", 1, 2]"],
        );
        check(
            json!({"prefixItems": tuple, "minItems": 0}),
            &["[]", "[\"a\"]", "[\"a\", 1]"],
            &["[1]", "[\"a\", 1, 2]"],
        );
        check(
            json!({"prefixItems": tuple, "items": {"type": "null"}, "minItems": 3, "maxItems": 4}),
            &["[\"a\", 1, null]", "[\"a\", 1, null, null]"],
            &["[\"a\", 1]", "[\"a\", 1, null, null, null]"],
        );
        check(
            json!({"prefixItems": tuple, "maxItems": 1}),
            &["[\"a\"]"],
            &["[\"a\", 1]", "[]"],
        );
        // The older list form of `items`.
        check(
            json!({"items": tuple}),
            &["[\"a\", 1]"],
            &["[\"a\", 1, 2]", "[\"a\"]"],
        );
    }

    #[test]
    fn nested_object_with_an_array_of_objects() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 10},
                "people": {
                    "type": "array",
                    "maxItems": 2,
                    "items": {
                        "type": "object",
                        "properties": {
                            "age": {"type": "integer", "minimum": 0},
                            "email": {"type": "string"}
                        },
                        "required": ["age"]
                    }
                }
            },
            "required": ["name", "people"]
        });
        check(
            schema,
            &[
                "{\"name\": \"team\", \"people\": []}",
                "{\"name\": \"team\", \"people\": [{\"age\": 3}, {\"age\": 40, \"email\": \"a@b\"}]}",
                "{\n  \"name\": \"t\",\n  \"people\": [\n    {\n      \"age\": 3\n    }\n  ]\n}",
            ],
            &[
                "{\"name\": \"team\"}",
                "{\"name\": \"team\", \"people\": [{}]}",
                "{\"name\": \"team\", \"people\": [{\"age\": -1}]}",
                "{\"name\": \"team\", \"people\": [{\"age\": 1}, {\"age\": 2}, {\"age\": 3}]}",
                "{\"name\": \"a very long name\", \"people\": []}",
                "{\"name\": \"team\", \"people\": [{\"age\": 1, \"x\": 1}]}",
            ],
        );
    }

    #[test]
    fn recursive_ref_tree() {
        let schema = json!({
            "$defs": {"node": {"type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"
        });
        let text = schema_to_gbnf(&schema).unwrap();
        assert!(text.contains("ref-node ::="), "{text}");
        check(
            schema,
            &[
                "{}",
                "{\"children\": []}",
                "{\"children\": [{}, {\"children\": [{\"children\": []}]}]}",
            ],
            &[
                "{\"children\": [1]}",
                "{\"child\": []}",
                "[]",
                "{\"children\": [{\"x\": 1}]}",
            ],
        );
        // `definitions`, a reference to the root, and a name to clean.
        check(
            json!({"definitions": {"a b": {"type": "integer"}},
                   "properties": {"n": {"$ref": "#/definitions/a b"},
                                  "self": {"$ref": "#"}}}),
            &["{\"n\": 1, \"self\": {\"self\": {}}}"],
            &["{\"n\": \"x\"}", "{\"self\": 1}"],
        );
    }

    #[test]
    fn type_lists_and_alternatives() {
        check(
            json!({"type": ["string", "null"]}),
            &["\"a\"", "null"],
            &["1", "{}", "\"a"],
        );
        check(
            json!({"type": ["integer", "array"], "items": {"type": "string"}, "maxItems": 1}),
            &["1", "[]", "[\"a\"]"],
            &["[1]", "[\"a\", \"b\"]", "1.5"],
        );
        check(
            json!({"type": ["number", "integer"]}),
            &["1", "1.5"],
            &["\"1\""],
        );
        check(
            json!({"anyOf": [{"type": "string", "maxLength": 1}, {"type": "integer"}]}),
            &["\"a\"", "7"],
            &["\"ab\"", "null", "1.5"],
        );
        check(
            json!({"oneOf": [{"properties": {"a": {}}, "required": ["a"]},
                              {"properties": {"b": {}}, "required": ["b"]}, false]}),
            &["{\"a\": 1}", "{\"b\": 2}"],
            &["{}", "{\"a\": 1, \"b\": 2}"],
        );
        check(
            json!({"allOf": [{"type": "boolean"}], "description": "pydantic style"}),
            &["true"],
            &["1"],
        );
        check(
            json!({"$defs": {"Pet": {"enum": ["cat", "dog"]}},
                   "properties": {"pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}],
                                          "default": null}},
                   "required": ["pet"]}),
            &["{\"pet\": \"cat\"}", "{\"pet\": null}"],
            &["{\"pet\": \"cow\"}", "{}"],
        );
    }

    #[test]
    fn enums_and_consts() {
        check(
            json!({"enum": ["red", "a\"b", "back\\slash", "é世", "line\nbreak", 1, 2.5, null, true,
                            [1, "x"], {"k": "v"}]}),
            &[
                "\"red\"",
                "\"a\\\"b\"",
                "\"back\\\\slash\"",
                "\"é世\"",
                "\"line\\nbreak\"",
                "1",
                "2.5",
                "null",
                "true",
                "[1,\"x\"]",
                "{\"k\":\"v\"}",
            ],
            &[
                "\"blue\"",
                "\"Red\"",
                "2",
                "false",
                "\"a\"",
                "\"line\nbreak\"",
            ],
        );
        check(json!({"const": "x"}), &["\"x\""], &["\"y\"", "x"]);
        check(json!({"const": 3, "enum": [1, 3]}), &["3"], &["1"]);
        check(
            json!({"type": "string", "enum": ["a", 1, "b"]}),
            &["\"a\"", "\"b\""],
            &["1"],
        );
        check(
            json!({"type": "integer", "enum": [1, 1.5, "2"]}),
            &["1"],
            &["1.5", "\"2\""],
        );
    }

    #[test]
    fn rule_names_are_clean_and_unique() {
        let schema = json!({
            "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}}},
            "properties": {
                "a b": {"type": "string", "maxLength": 1},
                "a_b": {"type": "string", "maxLength": 2},
                "1": {"type": "string", "maxLength": 3},
                "a-1": {"type": "string", "maxLength": 4},
                "quo\"te": {"type": "string", "maxLength": 5},
                "é": {"type": "string", "maxLength": 6},
                "": {"type": "string", "maxLength": 7},
                "home": {"$ref": "#/$defs/Address"}
            },
            "additionalProperties": false
        });
        let text = schema_to_gbnf(&schema).unwrap();
        assert!(text.starts_with("root ::= "), "{text}");
        assert!(text.contains("ref-Address ::="), "{text}");
        assert!(
            text.contains("root-a_b ::=") && text.contains("root-a_b_2 ::="),
            "{text}"
        );
        let mut names = HashSet::new();
        for line in text.lines() {
            let (name, _) = line.split_once(" ::= ").unwrap();
            assert!(is_name(name), "{name}");
            assert!(names.insert(name), "{name} twice");
        }
        check(
            schema,
            &[
                "{\"a b\": \"x\", \"a_b\": \"x\", \"1\": \"x\", \"a-1\": \"x\", \
               \"quo\\\"te\": \"x\", \"é\": \"x\", \"\": \"x\", \"home\": {\"city\": \"Paris\"}}",
            ],
            &[
                "{\"quo\"te\": \"x\"}",
                "{\"home\": {\"city\": \"Londres\"}}",
            ],
        );
    }

    /// The integers `lo..=hi` and a few written otherwise, each with whether `(min, max)`
    /// allows it.
    fn integer_cases(lo: i64, hi: i64, min: i64, max: i64) -> Vec<(String, bool)> {
        let mut cases: Vec<(String, bool)> = (lo..=hi)
            .map(|n| (n.to_string(), (min..=max).contains(&n)))
            .collect();
        cases.extend(["-0", "00", "007", "-01", "1.0", "+1", "-"].map(|t| (t.to_string(), false)));
        cases
    }

    #[test]
    fn integer_bounds_allow_exactly_the_integers_in_range() {
        let bounds = [
            (0, 0),
            (0, 9),
            (1, 9),
            (7, 7),
            (5, 123),
            (-5, 5),
            (-123, -7),
            (-1000, -1000),
            (10, 99),
            (99, 1000),
            (-99, 1099),
            (101, 199),
            (190, 1010),
            (-1, 0),
        ];
        for (min, max) in bounds {
            let g = grammar(&json!({"type": "integer", "minimum": min, "maximum": max}));
            for (doc, ok) in integer_cases(-1200, 1200, min, max) {
                assert_eq!(accepts(&g, &doc), ok, "[{min}, {max}] on {doc}");
            }
        }
        // Exclusive and fractional bounds, and each side alone.
        let cases = [
            (json!({"exclusiveMinimum": 2, "exclusiveMaximum": 10}), 3, 9),
            (json!({"minimum": 2.5, "maximum": 9.5}), 3, 9),
            (
                json!({"exclusiveMinimum": 2.5, "exclusiveMaximum": 9.5}),
                3,
                9,
            ),
            (json!({"minimum": -2.5, "exclusiveMaximum": -0.5}), -2, -1),
            (
                json!({"minimum": 0, "exclusiveMinimum": 4, "maximum": 8}),
                5,
                8,
            ),
            (json!({"maximum": 3}), -9_999_999_999_999_999, 3),
            (json!({"minimum": -3}), -3, 9_999_999_999_999_999),
        ];
        for (mut schema, min, max) in cases {
            schema["type"] = json!("integer");
            let g = grammar(&schema);
            for (doc, ok) in integer_cases(-1200, 1200, min, max) {
                assert_eq!(accepts(&g, &doc), ok, "{schema} on {doc}");
            }
        }
        let g = grammar(&json!({"type": "integer", "maximum": 3}));
        assert!(accepts(&g, "-9999999999999999"));
        assert!(!accepts(&g, "-10000000000000000"));
    }

    proptest! {
        #[test]
        fn integer_bounds_match_brute_force(a in -30_000i64..30_000, w in 0i64..3_000, n in -40_000i64..40_000) {
            let (min, max) = (a, a + w);
            let g = grammar(&json!({"type": "integer", "minimum": min, "maximum": max}));
            prop_assert_eq!(accepts(&g, &n.to_string()), (min..=max).contains(&n));
            prop_assert_eq!(accepts(&g, &min.to_string()), true);
            prop_assert_eq!(accepts(&g, &max.to_string()), true);
        }
    }

    #[test]
    fn unknown_formats_are_annotations() {
        check(
            json!({"type": "string", "format": "email", "maxLength": 3}),
            &["\"a@b\"", "\"\""],
            &["\"abcd\"", "1"],
        );
    }

    #[test]
    fn errors_name_the_keyword_and_the_place() {
        let cases = [
            (
                json!({"properties": {"name": {"type": "string", "pattern": "^a"}}}),
                "/properties/name: keyword 'pattern' is not supported",
            ),
            (
                json!({"type": "string", "format": 7}),
                "/: keyword 'format' must be a string",
            ),
            (
                json!({"type": "number", "minimum": 0}),
                "/: keyword 'minimum' is not supported on numbers",
            ),
            (
                json!({"type": "integer", "minimum": "1"}),
                "/: keyword 'minimum' must be a number",
            ),
            (
                json!({"type": "integer", "minimum": 3, "exclusiveMaximum": 3}),
                "/: the integer bounds allow no value",
            ),
            (
                json!({"type": "integer", "minimum": 1e17}),
                "/: the integer bounds allow no value",
            ),
            (
                json!({"type": "integer", "multipleOf": 2}),
                "/: keyword 'multipleOf' is not supported",
            ),
            (
                json!({"type": "number", "multipleOf": 2}),
                "/: keyword 'multipleOf'",
            ),
            (
                json!({"type": "number", "exclusiveMaximum": 2}),
                "/: keyword 'exclusiveMaximum'",
            ),
            (
                json!({"items": {"maxItems": 1001}}),
                "/items: keyword 'maxItems' is 1001",
            ),
            (
                json!({"type": "array", "minItems": -1}),
                "/: keyword 'minItems' must be",
            ),
            (
                json!({"minItems": 3, "maxItems": 2}),
                "/: keyword 'minItems'",
            ),
            (
                json!({"prefixItems": [{}], "minItems": 2}),
                "/: keyword 'minItems'",
            ),
            (
                json!({"type": "string", "maxLength": 2000}),
                "/: keyword 'maxLength' is 2000",
            ),
            (
                json!({"minLength": 3, "maxLength": 2}),
                "/: keyword 'minLength'",
            ),
            (
                json!({"format": "date", "maxLength": 20}),
                "/: keyword 'maxLength' beside 'format'",
            ),
            (json!({"allOf": [{}, {}]}), "/: keyword 'allOf'"),
            (json!({"$ref": "http://x/y.json"}), "/: keyword '$ref'"),
            (
                json!({"properties": {"a": {"$ref": "#/properties/b"}}}),
                "/properties/a: keyword '$ref'",
            ),
            (
                json!({"$ref": "#/$defs/missing"}),
                "/: keyword '$ref': '#/$defs/missing'",
            ),
            (
                json!({"$defs": {"x": {"not": {}}}, "items": {"$ref": "#/$defs/x"}}),
                "/$defs/x: keyword 'not' is not supported",
            ),
            (json!(false), "/: the schema 'false'"),
            (
                json!({"items": false, "minItems": 1}),
                "/: keyword 'minItems'",
            ),
            (json!(3), "/: a schema must be"),
            (json!({"type": "text"}), "/: keyword 'type'"),
            (json!({"type": []}), "/: keyword 'type'"),
            (json!({"enum": []}), "/: keyword 'enum'"),
            (
                json!({"type": "string", "enum": [1, 2]}),
                "/: keyword 'enum'",
            ),
            (json!({"const": 1, "enum": [2]}), "/: keyword 'const'"),
            (
                json!({"properties": {"a": {}}, "required": ["b"]}),
                "/: keyword 'required'",
            ),
            (
                json!({"properties": {"a": false}, "required": ["a"]}),
                "/properties/a: the property is required",
            ),
            (json!({"properties": []}), "/: keyword 'properties'"),
            (
                json!({"type": "object", "anyOf": [{}]}),
                "/: keyword 'type' beside 'anyOf' is not supported",
            ),
            (json!({"anyOf": [false]}), "/: keyword 'anyOf'"),
            (json!({"oneOf": {}}), "/: keyword 'oneOf'"),
            (
                json!({"anyOf": [{"type": "string"}, {"if": {}}]}),
                "/anyOf/1: keyword 'if' is not supported",
            ),
            (
                json!({"patternProperties": {"a": {}}}),
                "/: keyword 'patternProperties' is not supported",
            ),
            (
                json!({"uniqueItems": true}),
                "/: keyword 'uniqueItems' is not supported",
            ),
            (
                json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
                "/: the schema",
            ),
            (json!({"$ref": "#"}), "/: the schema"),
            (
                json!({"properties": {"a/b": {"prefixItems": [{"minProperties": 1}]}}}),
                "/properties/a~1b/prefixItems/0: keyword 'minProperties' is not supported",
            ),
        ];
        for (schema, want) in cases {
            let e = error(schema.clone());
            assert!(e.starts_with(want), "{schema}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn every_grammar_parses() {
        let schemas = [
            json!(true),
            json!({}),
            json!({"type": "object"}),
            json!({"type": "array"}),
            json!({"type": ["object", "array", "string", "number", "integer", "boolean", "null"]}),
            json!({"type": "string", "minLength": 1000}),
            json!({"items": {}, "minItems": 1000, "maxItems": 1000}),
            json!({"prefixItems": [{}, {}, {}], "items": {}, "minItems": 1, "maxItems": 1000}),
            json!({"properties": {"a": {"properties": {"a": {"properties": {"a": {}}}}}}}),
            json!({"$defs": {"a": {"items": {"$ref": "#/$defs/b"}},
                             "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
                   "$ref": "#/$defs/b"}),
            json!({"type": "string", "maxLength": 0}),
            json!({"enum": ["\u{1}\u{7f}\u{2028}", "#", "[", "]", "\\u0000"]}),
        ];
        for s in schemas {
            grammar(&s);
        }
    }
}
