//! Tool calling, as OpenAI's chat API does it (`tools`, `tool_choice`, `tool_calls`).
//!
//! The tools are given to the model's chat template where it writes them (Qwen2.5, Hermes and
//! others: `{% if tools %}` ... `<tools>` ... `</tools>`); for templates that do not,
//! [`generic_messages`] describes them in the system message in the same format. Either way
//! the model calls a tool by writing a block
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! which [`parse_calls`] reads back ([`stream::CallStream`] as the answer is generated), as
//! well as calls without the tags at the answer's start. With `tool_choice` `required` or a
//! named function, the answer is constrained by [`call_grammar`]: only such blocks, each
//! naming a declared tool with arguments that meet its JSON Schema (through
//! [`crate::json_schema`]); with `auto`, by its lazy form: free text until a call begins (a
//! block, or a call without the tags at the answer's start), then well-formed calls only.

pub mod stream;

use crate::chat::Message;
use crate::grammar::{Grammar, Trigger};
use crate::json_schema::{literal, Documents};
use serde_json::{json, Value};
use std::sync::Arc;

/// A declared tool: its name and the JSON Schema of its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub parameters: Value,
    /// OpenAI's `strict`: the arguments must meet the whole schema, so a keyword the grammar
    /// cannot express is an error; otherwise such keywords are skipped.
    pub strict: bool,
}

/// What the answer may or must do with the tools (OpenAI's `tool_choice`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// No tool calls: the tools are not shown to the model.
    None,
    /// The model chooses between text and calls.
    Auto,
    /// At least one call, of any tool.
    Required,
    /// A call of this tool.
    Function(String),
}

/// The most tools a request may declare.
pub const MAX_TOOLS: usize = 128;

/// Reads OpenAI's `tools` list (`{"type": "function", "function": {"name", "description",
/// "parameters"}}` entries), each tool's `parameters` checked as [`call_grammar`] takes them
/// (with its `strict`); errors name the entry (`tools[2].function.name: ...`) and for a schema
/// the tool.
pub fn parse_tools(tools: &[Value]) -> Result<Vec<Tool>, String> {
    if tools.len() > MAX_TOOLS {
        return Err(format!("tools: at most {MAX_TOOLS} tools"));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") | None => {}
            Some(other) => {
                return Err(format!(
                    "tools[{i}].type: '{other}' is not supported (function)"
                ))
            }
        }
        let Some(f) = t.get("function").filter(|f| f.is_object()) else {
            return Err(format!("tools[{i}]: no 'function' object"));
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n)
                if (1..=64).contains(&n.len())
                    && n.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
                    }) =>
            {
                n.to_string()
            }
            _ => {
                return Err(format!(
                    "tools[{i}].function.name: 1 to 64 letters, digits, '_', '-' or '.'"
                ))
            }
        };
        if out.iter().any(|o| o.name == name) {
            return Err(format!(
                "tools[{i}].function.name: '{name}' is declared twice"
            ));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            // The arguments are an object (OpenAI's rule): calls of another type are not calls.
            Some(p) if p.get("type").is_some_and(|t| t != "object") => {
                return Err(format!(
                    "tools[{i}].function.parameters: 'type' must be \"object\" (the arguments \
                     are an object)"
                ))
            }
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(format!(
                    "tools[{i}].function.parameters: must be a JSON Schema object"
                ))
            }
        };
        let strict = match f.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(format!("tools[{i}].function.strict: must be a boolean")),
        };
        let tool = Tool {
            name,
            parameters,
            strict,
        };
        // Every declared tool's schema as the call grammar takes it, also where no grammar
        // uses it (a named call of another tool, `none`, a request's own grammar).
        call_grammar(std::slice::from_ref(&tool), None, false, false)
            .map_err(|e| format!("tools[{i}].function.parameters: {e}"))?;
        out.push(tool);
    }
    Ok(out)
}

/// Reads OpenAI's `tool_choice`: absent or `auto`, `none`, `required`, or `{"type":
/// "function", "function": {"name": ...}}` naming a declared tool. Without tools, `None`.
pub fn parse_tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, String> {
    let choice = match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(format!(
                    "tool_choice: '{other}' is not one of auto, none, required"
                ))
            }
        },
        Some(o) => match o.pointer("/function/name").and_then(Value::as_str) {
            Some(n) if tools.iter().any(|t| t.name == n) => ToolChoice::Function(n.to_string()),
            Some(n) => return Err(format!("tool_choice: no tool named '{n}' in tools")),
            None => {
                return Err(
                    "tool_choice: expected auto, none, required or {\"type\": \"function\", \
                     \"function\": {\"name\": ...}}"
                        .into(),
                )
            }
        },
    };
    match choice {
        ToolChoice::Required if tools.is_empty() => {
            Err("tool_choice: no tools are declared".into())
        }
        _ if tools.is_empty() => Ok(ToolChoice::None),
        c => Ok(c),
    }
}

/// The grammar of an answer that calls a tool: a `<tool_call>` block holding `{"name": ...,
/// "arguments": ...}` for one of `tools` (only `only` if given) with arguments that meet its
/// schema; with `parallel`, one or more blocks on separate lines.
///
/// Lazy (for `tool_choice` `auto`, as llama.cpp's lazy grammars), the answer is free text until
/// a call begins, and from the start of the call on it must be well-formed calls and nothing
/// after them: where `<tool_call>` comes, the blocks above; where the answer's start is the
/// start of a bare call of one of the tools, as [`stream::CallStream`] reads one (whitespace,
/// optionally a code fence and a marker, optionally `[`, then `{"name": "NAME"` with JSON's
/// whitespace between its tokens: [`bare_start`]), bare calls from the answer's start: call
/// objects (`parallel`: one or more, one per line) or an array of them, after the code fence
/// and marker that began them, the fence closed after them.
pub fn call_grammar(
    tools: &[Tool],
    only: Option<&str>,
    parallel: bool,
    lazy: bool,
) -> Result<Grammar, String> {
    // Each tool's parameters are a schema document of their own (their `#` and `$defs`), the
    // call object `{"name": ..., "arguments": ...}` around them.
    let mut docs = Documents::new(&[
        "root",
        "tagged",
        "block",
        "call",
        "named",
        "bare",
        "bare-calls",
        "bare-call",
        "sp",
        "jws",
    ]);
    let mut named = Vec::new();
    let mut names = Vec::new();
    for t in tools.iter().filter(|t| only.is_none_or(|n| n == t.name)) {
        docs.set_lenient(!t.strict);
        let args = docs
            .add(&t.parameters, "args")
            .map_err(|e| format!("tool arguments schema of '{}': {e}", t.name))?;
        let name = literal(&Value::String(t.name.clone()).to_string());
        named.push(format!(
            r#"{name} ws "," ws "\"arguments\"" ws ":" ws {args} "}}" ws"#
        ));
        names.push(name);
    }
    if named.is_empty() {
        return Err("no tool to call".into());
    }
    // A call object from its start (`call`), or from its name on (`named`).
    let calls = format!(
        "call ::= \"{{\" ws \"\\\"name\\\"\" ws \":\" ws named\nnamed ::= {}\n{}",
        named.join(" | "),
        docs.text()
    );
    let (blocks, objects, items) = match parallel {
        true => (
            r#" ( "\n" block )*"#,
            r#" ( "\n" call )*"#,
            r#" ( "," ws call )*"#,
        ),
        false => ("", "", ""),
    };
    let tagged = format!(
        "tagged ::= block{blocks}\nblock ::= \"<tool_call>\\n\" call \"\\n</tool_call>\"\n"
    );
    let grammar =
        |text: String| Grammar::parse(&text).map_err(|e| format!("tool arguments schema: {e}"));
    if !lazy {
        return grammar(format!("root ::= tagged\n{tagged}{calls}"));
    }
    // The first call object's start is the trigger's end: its whitespace as the trigger's,
    // the later calls' as the grammar's JSON (bounded, as after the trigger the model could
    // otherwise write whitespace without end).
    let (fence, marker) = (words(&stream::FENCES), words(&stream::MARKERS));
    let bare = format!(
        "bare ::= sp ( {fence} sp bare-calls \"```\" \"\\n\"? | bare-calls )\n\
         bare-calls ::= ( {marker} sp )? ( bare-call{objects} | \"[\" sp bare-call{items} \"]\" ws )\n\
         bare-call ::= {BARE_HEAD} named\n{BARE_SPACE}"
    );
    let text = format!("root ::= tagged | bare\n{tagged}{bare}{calls}");
    let triggers = vec![
        Trigger::Word(stream::OPEN.into()),
        Trigger::Start(Arc::new(bare_start(&names)?)),
    ];
    Ok(grammar(text)?.lazy(triggers))
}

/// GBNF for whitespace where [`stream::CallStream`] reads it around a bare call's start
/// (`sp`: `char::is_whitespace`) and inside a call object (`jws`: JSON's).
const BARE_SPACE: &str =
    "sp ::= [\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]*\n\
                          jws ::= [ \\t\\n\\r]*\n";

/// GBNF for a bare call object's start up to its name.
const BARE_HEAD: &str = r#""{" jws "\"name\"" jws ":" jws"#;

/// GBNF for one of `words`.
fn words(words: &[&str]) -> String {
    let alts: Vec<String> = words.iter().map(|w| literal(w)).collect();
    format!("( {} )", alts.join(" | "))
}

/// The trigger of bare calls: the answer's start as [`stream::CallStream`] reads a bare call
/// up to its name (`names`: GBNF literals of the JSON strings): whitespace, optionally a code
/// fence and whitespace, a marker and whitespace, `[` and whitespace, then `{"name": "NAME"`
/// with JSON's whitespace between its tokens.
fn bare_start(names: &[String]) -> Result<Grammar, String> {
    let (fence, marker) = (words(&stream::FENCES), words(&stream::MARKERS));
    let text = format!(
        "root ::= sp ( {fence} sp )? ( {marker} sp )? ( \"[\" sp )? {BARE_HEAD} ( {} )\n\
         {BARE_SPACE}",
        names.join(" | ")
    );
    Grammar::parse(&text).map_err(|e| format!("bare call trigger: {e}"))
}

/// A tool call read from an answer: the tool's name and its arguments, the JSON text of an
/// object as serde_json writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

/// The tool calls in a model's answer and its content (the text around them), as
/// [`stream::CallStream`] reads them; `None` if there is no whole call (the answer is then
/// plain text). Calls are `<tool_call>` blocks anywhere, each holding a JSON object with a
/// `name` of `names` and an `arguments` (or `parameters`) object, the last one possibly
/// without its `</tool_call>`; or, at the start of the answer, such objects without the tags
/// (small models leave them out) that name their tool first, also as arrays of them, in a
/// Markdown code block (```` ```json ````, as llama.cpp reads them too), and after the markers
/// other model families put first (Mistral's `[TOOL_CALLS]`, Llama 3.1's `<|python_tag|>`). A
/// block that holds no such call is content; a call cut short (the answer hit its token limit)
/// is dropped.
pub fn parse_calls(text: &str, names: &[&str]) -> Option<(String, Vec<Call>)> {
    let mut s = stream::CallStream::new(names);
    let mut deltas = s.push(text);
    deltas.extend(s.finish());
    let content = deltas
        .into_iter()
        .filter_map(|d| match d {
            stream::Delta::Content(t) => Some(t),
            _ => None,
        })
        .collect();
    let calls: Vec<Call> = s.calls().cloned().collect();
    (!calls.is_empty()).then_some((content, calls))
}

/// A call object's `{"name": ..., "arguments": {...}}` naming one of `names` (arguments also as
/// the JSON text of an object, or named `parameters`).
fn call(v: Value, names: &[String]) -> Option<Call> {
    let name = v
        .get("name")?
        .as_str()
        .filter(|n| names.iter().any(|m| m == n))?
        .to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a) => a.clone(),
        None => json!({}),
    };
    arguments.is_object().then(|| Call {
        name,
        arguments: arguments.to_string(),
    })
}

/// The messages for a template that does not write tools: the tools and how to call them are
/// added to the system message (one is made if there is none), an assistant's calls become
/// `<tool_call>` blocks in its text and a tool's result a user message in a `<tool_response>`
/// block, the format of Qwen2.5's template.
pub fn generic_messages(messages: &[Message], tools: &[Value]) -> Vec<Message> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let (system, rest) = match messages.split_first() {
        Some((m, rest)) if m.role == "system" => (Some(m.content.as_str()), rest),
        _ => (None, messages),
    };
    if tools.is_empty() {
        out.extend(system.map(|s| Message::new("system", s)));
    } else {
        let mut list = String::new();
        for t in tools {
            list.push('\n');
            list.push_str(&t.to_string());
        }
        let about = format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n\
             <tools>{list}\n</tools>\n\nFor each function call, return a json object with \
             function name and arguments within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n\
             </tool_call>"
        );
        out.push(Message::new(
            "system",
            match system {
                Some(s) => format!("{s}\n\n{about}"),
                None => about,
            },
        ));
    }
    for m in rest {
        let mut text = m.content.clone();
        for c in &m.tool_calls {
            if !text.is_empty() {
                text.push('\n');
            }
            let call = json!({"name": c.function.name, "arguments": c.function.arguments});
            text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
        }
        out.push(match m.role.as_str() {
            "tool" => Message::new("user", format!("<tool_response>\n{text}\n</tool_response>")),
            role => Message::new(role, text),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::{GrammarMode, GrammarState};
    use std::sync::Arc;

    fn weather() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "get_time"}}),
        ]
    }

    #[test]
    fn tools_and_choices_are_read_with_named_errors() {
        let tools = parse_tools(&weather()).unwrap();
        assert_eq!(tools[0].name, "get_weather");
        assert_eq!(
            tools[1].parameters,
            json!({"type": "object", "properties": {}})
        );
        let e = |v: Value| parse_tools(v.as_array().unwrap()).unwrap_err();
        assert!(e(json!([{"type": "retrieval"}])).contains("tools[0].type"));
        assert!(e(json!([{"type": "function"}])).contains("no 'function' object"));
        assert!(e(json!([{"function": {"name": "a b"}}])).contains("tools[0].function.name"));
        assert!(
            e(json!([{"function": {"name": "a"}}, {"function": {"name": "a"}}]))
                .contains("tools[1].function.name: 'a' is declared twice")
        );
        assert!(e(json!([{"function": {"name": "a", "parameters": 3}}])).contains("parameters"));
        // The arguments are an object: a schema of another type could only give calls that
        // no client can read (and that are not read back as calls).
        for t in [json!("string"), json!("array"), json!(["object", "null"])] {
            let params = json!([{"function": {"name": "a", "parameters": {"type": t}}}]);
            assert!(
                e(params).contains("tools[0].function.parameters: 'type' must be \"object\""),
                "{t}"
            );
        }
        assert!(
            parse_tools(&[json!({"function": {"name": "a", "parameters": {
            "properties": {"x": {"type": "string"}}}}})])
            .is_ok()
        );
        let c = |v: Value| parse_tool_choice(Some(&v), &tools);
        assert_eq!(parse_tool_choice(None, &tools), Ok(ToolChoice::Auto));
        assert_eq!(c(json!("none")), Ok(ToolChoice::None));
        assert_eq!(c(json!("required")), Ok(ToolChoice::Required));
        assert_eq!(
            c(json!({"type": "function", "function": {"name": "get_time"}})),
            Ok(ToolChoice::Function("get_time".into()))
        );
        assert!(c(json!({"type": "function", "function": {"name": "nope"}}))
            .unwrap_err()
            .contains("no tool named 'nope'"));
        assert!(c(json!("sometimes")).unwrap_err().contains("'sometimes'"));
        assert_eq!(parse_tool_choice(None, &[]), Ok(ToolChoice::None));
        assert!(parse_tool_choice(Some(&json!("required")), &[])
            .unwrap_err()
            .contains("no tools"));
    }

    #[test]
    fn calls_are_parsed_from_blocks() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{}\"}\n</tool_call>";
        let (content, calls) = parse_calls(text, &["get_weather", "get_time"]).unwrap();
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(calls[1].arguments, "{}");
        // An unclosed last block (the answer hit its limit after the object) still counts.
        let (_, calls) = parse_calls(
            "<tool_call>{\"name\": \"f\", \"parameters\": {\"x\": 1}}",
            &["f"],
        )
        .unwrap();
        assert_eq!(calls[0].arguments, r#"{"x":1}"#);
        // A block cut short after a whole one is dropped; alone, the text is no call.
        let cut = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"f";
        assert_eq!(parse_calls(cut, &["f"]).unwrap().1.len(), 1);
        assert!(parse_calls("<tool_call>\n{\"name\": \"f", &["f"]).is_none());
        assert!(parse_calls("no calls here", &["f"]).is_none());
        // Bare objects naming declared tools (the last cut short), and only those.
        let bare = "{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n{\"name\": \"f\", \"";
        let (content, calls) = parse_calls(bare, &["f"]).unwrap();
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        assert!(parse_calls(bare, &["g"]).is_none());
        assert!(parse_calls("{\"a\": 1}", &["f"]).is_none());
        assert!(parse_calls("<tool_call>{\"name\": 3}</tool_call>", &["f"]).is_none());
        assert!(parse_calls("<tool_call>not json</tool_call>", &["f"]).is_none());
        // Text after bare calls is content (a streamed call cannot be taken back).
        let (content, calls) = parse_calls("{\"name\": \"f\"} and more", &["f"]).unwrap();
        assert_eq!(
            (content.as_str(), calls[0].arguments.as_str()),
            ("and more", "{}")
        );
        // A block calling an undeclared tool is no call (no grammar held the model to them).
        let rm = "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}\n</tool_call>";
        assert!(parse_calls(rm, &["f"]).is_none());
        // Arguments are an object, also when written as JSON text.
        for args in ["\"[1]\"", "\"5\"", "\"\\\"x\\\"\"", "[1]", "null"] {
            let block =
                format!("<tool_call>{{\"name\": \"f\", \"arguments\": {args}}}</tool_call>");
            assert!(parse_calls(&block, &["f"]).is_none(), "{block}");
            let bare = format!("{{\"name\": \"f\", \"arguments\": {args}}}");
            assert!(parse_calls(&bare, &["f"]).is_none(), "{bare}");
        }
        // In a code block, as small models write them (Qwen2.5-Coder-0.5B with `auto`).
        let fenced = "```json\n{\n  \"name\": \"f\",\n  \"arguments\": {\"x\": 1}\n}\n```";
        let (content, calls) = parse_calls(fenced, &["f"]).unwrap();
        assert_eq!(
            (content.as_str(), calls[0].arguments.as_str()),
            ("", r#"{"x":1}"#)
        );
        let plain = "```\n[{\"name\": \"f\", \"arguments\": {}}]\n```\n";
        assert_eq!(parse_calls(plain, &["f"]).unwrap().1.len(), 1);
        assert!(parse_calls(fenced, &["g"]).is_none());
        assert!(parse_calls("```json\n{\"a\": 1}\n```", &["f"]).is_none());
        // Mistral's marker and array, Llama 3.1's marker and `parameters`.
        let mistral = "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"x\": 1}}, {\"name\": \"g\", \"arguments\": {}}]";
        let (_, calls) = parse_calls(mistral, &["f", "g"]).unwrap();
        assert_eq!((calls[0].name.as_str(), calls[1].name.as_str()), ("f", "g"));
        assert_eq!(calls[0].arguments, r#"{"x":1}"#);
        // An undeclared tool after a declared one: the call stands, the rest is content.
        let (content, calls) = parse_calls(mistral, &["f"]).unwrap();
        assert_eq!(calls.len(), 1);
        assert!(content.contains("\"g\""), "{content}");
        assert!(parse_calls(mistral, &["h"]).is_none());
        assert!(parse_calls("[TOOL_CALLS] []", &["f"]).is_none());
        let llama = "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 2}}";
        assert_eq!(
            parse_calls(llama, &["f"]).unwrap().1[0].arguments,
            r#"{"x":2}"#
        );
    }

    #[test]
    fn the_call_grammar_takes_only_declared_tools_with_valid_arguments() {
        let tools = parse_tools(&weather()).unwrap();
        let ok = |g: &Grammar, doc: &str| {
            let mut s = GrammarState::new(Arc::new(g.clone()));
            s.push_bytes(doc.as_bytes()) && s.accepting()
        };
        let one = call_grammar(&tools, None, false, false).unwrap();
        let paris = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let time = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        assert!(ok(&one, paris) && ok(&one, time));
        assert!(!ok(&one, &format!("{paris}\n{time}")), "one call only");
        assert!(
            !ok(
                &one,
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"
            ),
            "city is required"
        );
        assert!(!ok(
            &one,
            "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}\n</tool_call>"
        ));
        assert!(!ok(&one, "Sure!"));
        let many = call_grammar(&tools, None, true, false).unwrap();
        assert!(ok(&many, &format!("{paris}\n{time}")));
        let named = call_grammar(&tools, Some("get_time"), false, false).unwrap();
        assert!(ok(&named, time) && !ok(&named, paris));
        // Lazy: free text, then from `<tool_call>` on only calls.
        let lazy = call_grammar(&tools, None, false, true).unwrap();
        let mut m = GrammarMode::over_texts(
            Arc::new(lazy),
            &[
                "Let me look. ",
                "<tool_call>",
                "\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
                "\nok",
            ],
        );
        assert!(m.allows(1) && m.allows(4));
        m.accept(1);
        m.accept(2);
        assert!(m.allows(3) && !m.allows(4) && !m.allows(1));
        // What the grammar takes, parse_calls reads.
        let (_, calls) =
            parse_calls(&format!("{paris}\n{time}"), &["get_weather", "get_time"]).unwrap();
        assert_eq!(calls.len(), 2);
    }

    /// Whether `g` lets `next` follow the answer `before` (as tokens, each of which it must
    /// let by); `None` for the end of the answer.
    fn follows(g: &Grammar, before: &[&str], next: Option<&str>) -> bool {
        let mut tokens = before.to_vec();
        tokens.extend(next);
        let mut m = GrammarMode::over_texts(Arc::new(g.clone()), &tokens);
        for t in 1..=before.len() as u32 {
            assert!(m.allows(t), "{before:?}: {}", tokens[t as usize - 1]);
            m.accept(t);
        }
        m.allows(match next {
            Some(_) => tokens.len() as u32,
            None => 0,
        })
    }

    /// The tools of [`weather`] for the lazy grammar, with and without parallel calls.
    fn auto_grammars() -> [Grammar; 2] {
        let tools = parse_tools(&weather()).unwrap();
        [false, true].map(|parallel| call_grammar(&tools, None, parallel, true).unwrap())
    }

    const TIME: &str = "{\"name\": \"get_time\", \"arguments\": {}}";

    /// With `auto`, a call the answer begins bare (without `<tool_call>`) is held to the
    /// grammar from the answer's start, as llama.cpp's start-anchored triggers do: it cannot
    /// break mid-object, where the stream has sent its name and part of its arguments and the
    /// unstreamed answer would have no such call.
    #[test]
    fn a_bare_call_cannot_break_mid_object() {
        let head = "{\"name\": \"get_weather\", \"arguments\": {\"city\": ";
        for g in &auto_grammars() {
            assert!(!follows(g, &[head], Some("oops")));
            assert!(!follows(g, &[head], Some("\"Paris\"}\nmore")));
            assert!(!follows(g, &[head, "\"Paris\"", "}"], None));
            assert!(follows(g, &[head], Some("\"Paris\"}}")));
            let weather = "{\"name\": \"get_weather\"";
            assert!(
                !follows(g, &[weather], Some(", \"arguments\": {}}")),
                "city is required"
            );
            // In a code block, with the whitespace Qwen2.5-Coder writes.
            let fenced = [
                "```json\n",
                "{\n  \"name\": \"get_weather\",\n  \"arguments\": {",
            ];
            assert!(!follows(g, &fenced, Some("\n  }")));
        }
    }

    /// Nothing but calls follows bare calls: no array item that is no call, no code fence
    /// that was never opened (Qwen2.5-Coder wrote one after a call it began without).
    #[test]
    fn nothing_but_calls_follows_bare_calls() {
        for g in &auto_grammars() {
            assert!(!follows(g, &["[", TIME], Some(", 5]")));
            assert!(follows(g, &["[", TIME], Some("]")));
            assert!(!follows(g, &[TIME], Some("\n```")) && !follows(g, &[TIME], Some(" ok")));
            assert!(follows(g, &[TIME], None) && follows(g, &[TIME, "\n"], None));
            assert!(follows(g, &["```json\n", TIME, "\n```"], None));
            assert!(
                !follows(g, &["```json\n", TIME], None),
                "the fence is closed"
            );
        }
        // Several calls: one per line, or in an array; one only without parallel calls.
        let [one, many] = auto_grammars();
        let calls = [TIME, "\n", TIME];
        assert!(follows(&many, &calls, None) && !follows(&one, &calls[..2], Some(TIME)));
        let array = ["[", TIME, ", ", TIME, "]"];
        assert!(follows(&many, &array, None) && !follows(&one, &array[..2], Some(", ")));
    }

    /// A bare call gives its name once (the stream took the first name of a call written
    /// name first, and serde_json the last of one held whole).
    #[test]
    fn a_bare_call_names_its_tool_once() {
        for g in &auto_grammars() {
            let before = ["{\"name\": \"get_time\", \"arguments\": {}"];
            assert!(!follows(g, &before, Some(", \"name\": \"get_weather\"}")));
            assert!(follows(g, &before, Some("}")));
        }
    }

    /// Each form the stream reads at an answer's start begins a bare call as far as the
    /// grammar goes (whitespace, a code fence, a marker, an array, JSON's whitespace in the
    /// object, the trigger across tokens); text that only starts like one (a name not
    /// declared, or not first, or written with escapes), or that comes later in the answer,
    /// is free; `<tool_call>` is held anywhere, as before.
    #[test]
    fn bare_calls_are_held_in_each_form_the_stream_reads_and_only_there() {
        for g in &auto_grammars() {
            for before in [
                vec![
                    "\n ",
                    "```",
                    "json",
                    "\n",
                    "{\n  \"name\"",
                    " :\t\"get_time\"",
                ],
                vec![
                    "```xml",
                    " [TOOL_CALLS] [ {",
                    "\"name\"",
                    ":",
                    "\"get_",
                    "time\"",
                ],
                vec!["<|python_tag|>", "{\"name\": \"get_time\""],
            ] {
                assert!(!follows(g, &before, Some(", \"x\": 1}")), "{before:?}");
                assert!(
                    follows(g, &before, Some(", \"arguments\": {}}")),
                    "{before:?}"
                );
            }
            for before in [
                "{\"name\": \"rm\"",
                "{\"answer\": 1",
                "{\"arguments\": {}, \"name\": \"get_time\"",
                "Sure: {\"name\": \"get_time\"",
                "{\"name\": \"get\\u005ftime\"",
                "```py\n{\"name\": \"get_time\"",
            ] {
                assert!(follows(g, &[before], Some(", oops")), "{before}");
                assert!(follows(g, &[before], None), "{before}");
            }
            assert!(!follows(g, &["Let me see. ", "<tool_call>"], Some("{")));
            assert!(follows(g, &["Let me see. ", "<tool_call>"], Some("\n{")));
        }
    }

    /// The trigger of bare calls takes whitespace where the stream does: any (Rust's
    /// `char::is_whitespace`) before the call object, JSON's in it.
    #[test]
    fn the_bare_call_trigger_takes_the_stream_s_whitespace() {
        let g = Arc::new(bare_start(&[literal("\"f\"")]).unwrap());
        let start = GrammarState::new(g.clone());
        for c in (0..=0x10ffffu32).filter_map(char::from_u32) {
            let mut s = start.clone();
            let took = s.push_char(c as u32) && s.push_bytes(b"{\"name\":\"f\"") && s.accepting();
            assert_eq!(took, c.is_whitespace() || c == '[', "{c:?}");
        }
        for c in (0..0x3100u32).filter_map(char::from_u32) {
            let mut s = start.clone();
            let text = format!("{{{c}\"name\"{c}:{c}\"f\"");
            let took = s.push_bytes(text.as_bytes()) && s.accepting();
            assert_eq!(took, matches!(c, ' ' | '\t' | '\n' | '\r'), "{c:?}");
        }
    }

    /// Pieces of the starts of answers: of bare calls of `f` and `fo`, and near them.
    const STARTS: &[&str] = &[
        " ",
        "\n",
        "\u{a0}",
        "\t",
        "```",
        "```json",
        "json",
        "```xml",
        "[TOOL_CALLS]",
        "<|python_tag|>",
        "[",
        "]",
        "{",
        "}",
        "\"",
        "\"name\"",
        "name",
        ":",
        "\"f\"",
        "\"fo",
        "f",
        "\"g\"",
        "\\",
        "\\u0061",
        "1",
        ",",
        "\"arguments\"",
        "{}",
        "<",
        "`",
        "x",
        "<tool",
        "{\"name\": \"f\"",
        "{\"answer\"",
    ];

    /// What [`stream::CallStream`] has given of `text` as content when it is all content: the
    /// text but for what it holds at its end (whitespace, and before it what may begin
    /// `<tool_call>`).
    fn given(text: &str) -> &str {
        let tag = (1..stream::OPEN.len())
            .rev()
            .find(|&n| text.ends_with(&stream::OPEN[..n]))
            .unwrap_or(0);
        text[..text.len() - tag].trim_end()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// The stream reads a bare call's start as the grammar's trigger matches it: a call
        /// begins only once the trigger matched; while the trigger may still match, nothing
        /// is given; once it cannot, the text held is given as content at once.
        #[test]
        fn the_stream_holds_a_bare_call_s_start_as_the_trigger_matches_it(
            parts in proptest::collection::vec(0..STARTS.len(), 0..16),
        ) {
            let text: String = parts.iter().map(|&i| STARTS[i]).collect();
            proptest::prop_assume!(!text.contains(stream::OPEN));
            let names = ["f", "fo"];
            let literals: Vec<String> =
                names.iter().map(|n| literal(&Value::String(n.to_string()).to_string())).collect();
            let mut trigger = Some(GrammarState::new(Arc::new(bare_start(&literals).unwrap())));
            let mut matched = false;
            let mut s = stream::CallStream::new(&names);
            let mut content = String::new();
            for (at, c) in text.char_indices() {
                let end = at + c.len_utf8();
                let deltas = s.push(&c.to_string());
                for d in &deltas {
                    match d {
                        stream::Delta::Content(t) => content.push_str(t),
                        _ => proptest::prop_assert!(matched, "{:?}", &text[..end]),
                    }
                }
                let Some(t) = trigger.as_mut() else { continue };
                let mut buf = [0; 4];
                if !t.push_bytes(c.encode_utf8(&mut buf).as_bytes()) {
                    trigger = None;
                    proptest::prop_assert_eq!(&content, given(&text[..end]), "{:?}", &text[..end]);
                    continue;
                }
                proptest::prop_assert!(content.is_empty(), "{:?}", &text[..end]);
                if t.accepting() {
                    matched = true;
                    trigger = None;
                }
            }
        }
    }

    /// Tokens of answers with calls of `f` (an integer `x`) and `g`, and near them.
    const TOKENS: &[&str] = &[
        "{\"name\": \"f\", \"arguments\": {",
        "\"x\"",
        ": ",
        "1",
        "}",
        "}}",
        "\n",
        " ",
        "```json\n",
        "```",
        "[",
        "]",
        ", ",
        "[TOOL_CALLS]",
        "<|python_tag|>",
        "<tool_call>",
        "\n</tool_call>",
        "Hi",
        "{\"name\": \"g\", \"arguments\": {}}",
        "{\"a\": 1}",
        "{\"name\": \"",
        "f\"",
        "g\"",
        "h\"",
        ", \"arguments\": {}}",
        ", \"arguments\": {\"x\": 2}}",
        "oops",
        "5",
        "\"name\"",
        "\"",
        "{",
        ":",
        "\"f\"",
        "<tool",
        "_call>",
        ", \"name\": \"g\"",
        "\n{",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Answers sampled under the `auto` grammar (any token it allows, the end included):
        /// once one ends, every call the stream began is whole (so the streamed and the
        /// unstreamed answer have the same calls at the same indices), one at most without
        /// parallel calls, and the content is the text before the calls only (none for bare
        /// calls, which begin the answer).
        #[test]
        fn answers_under_the_auto_grammar_have_whole_calls_only(
            picks in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 1..32),
            parallel in proptest::prelude::any::<bool>(),
        ) {
            let tools = parse_tools(&[
                json!({"function": {"name": "f", "parameters": {"type": "object",
                    "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}),
                json!({"function": {"name": "g"}}),
            ]).unwrap();
            let g = call_grammar(&tools, None, parallel, true).unwrap();
            let mut m = GrammarMode::over_texts(Arc::new(g), TOKENS);
            let mut answer: Vec<&str> = Vec::new();
            let mut ended = false;
            for pick in &picks {
                // The end (as likely as four tokens) where it is allowed; with no token allowed
                // (tokens this vocabulary lacks), no answer.
                let mut allowed: Vec<u32> =
                    (0..=TOKENS.len() as u32).filter(|&t| m.allows(t)).collect();
                if allowed.first() == Some(&0) {
                    allowed.extend([0; 3]);
                }
                if allowed.is_empty() {
                    break;
                }
                let t = *pick.get(&allowed);
                if t == 0 {
                    ended = true;
                    break;
                }
                m.accept(t);
                answer.push(TOKENS[t as usize - 1]);
            }
            if !ended {
                return Ok(());
            }
            let text = answer.concat();
            let mut s = stream::CallStream::new(&["f", "g"]);
            let mut deltas: Vec<stream::Delta> = answer.iter().flat_map(|t| s.push(t)).collect();
            deltas.extend(s.finish());
            let begun = deltas.iter().filter(|d| matches!(d, stream::Delta::Call { .. })).count();
            let content: String = deltas
                .iter()
                .filter_map(|d| match d {
                    stream::Delta::Content(t) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            proptest::prop_assert_eq!(s.calls().count(), begun, "{:?}", text);
            proptest::prop_assert!(parallel || begun <= 1, "{:?}", text);
            let literals = [literal("\"f\""), literal("\"g\"")];
            let mut start = GrammarState::new(Arc::new(bare_start(&literals).unwrap()));
            let bare = text.chars().any(|c| {
                let mut buf = [0; 4];
                start.push_bytes(c.encode_utf8(&mut buf).as_bytes()) && start.accepting()
            });
            let want = match (bare, text.find(stream::OPEN)) {
                (true, _) => "",
                (false, Some(at)) => text[..at].trim_end(),
                (false, None) => &text,
            };
            proptest::prop_assert_eq!(content.as_str(), want, "{:?}", text);
            proptest::prop_assert_eq!(begun > 0, bare || want != text, "{:?}", text);
        }
    }

    /// Whether `g` takes one `<tool_call>` block calling `f` with `args`.
    fn calls_f(g: &Arc<Grammar>, args: &str) -> bool {
        let doc = format!("<tool_call>\n{{\"name\": \"f\", \"arguments\": {args}}}\n</tool_call>");
        let mut s = GrammarState::new(g.clone());
        s.push_bytes(doc.as_bytes()) && s.accepting()
    }

    #[test]
    fn each_tool_s_parameters_are_a_document_of_their_own() {
        let tool = |name: &str, params: Value| json!({"type": "function", "function": {"name": name, "parameters": params}});
        // Pydantic's shape: `$defs` and `$ref` in the parameters; two tools' `Point` apart.
        let point = |t: &str| {
            json!({
                "type": "object",
                "$defs": {"Point": {"type": "object", "properties": {"x": {"type": t}},
                                    "required": ["x"]}},
                "properties": {"p": {"$ref": "#/$defs/Point"}},
                "required": ["p"]
            })
        };
        let tools = parse_tools(&[tool("f", point("number")), tool("g", point("string"))]).unwrap();
        let g = Arc::new(call_grammar(&tools, None, false, false).unwrap());
        assert!(calls_f(&g, r#"{"p": {"x": 1.5}}"#));
        assert!(!calls_f(&g, r#"{"p": {"x": "a"}}"#) && !calls_f(&g, r#"{"p": {}}"#));
        let g_call =
            "<tool_call>\n{\"name\": \"g\", \"arguments\": {\"p\": {\"x\": \"a\"}}}\n</tool_call>";
        let mut s = GrammarState::new(g.clone());
        assert!(s.push_bytes(g_call.as_bytes()) && s.accepting());
        // `#` is the parameters, not the call object around them.
        let params = json!({"type": "object",
                            "properties": {"child": {"$ref": "#"}, "v": {"type": "integer"}}});
        let tools = parse_tools(&[tool("f", params)]).unwrap();
        let g = Arc::new(call_grammar(&tools, None, false, false).unwrap());
        assert!(calls_f(&g, r#"{"child": {"v": 1}}"#));
        assert!(!calls_f(&g, r#"{"child": {"name": "f", "arguments": {}}}"#));
        // An undefined `$ref` names the tool.
        let params = json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/Nope"}}});
        let e = parse_tools(&[tool("f", params)]).unwrap_err();
        assert!(e.contains("of 'f': /properties/p: keyword '$ref'"), "{e}");
    }

    /// Every declared tool's schema is checked as a grammar would take it, also where no
    /// grammar uses it (a named call of another tool, `tool_choice` `none`, a request's own
    /// grammar): the error names the tool and the problem; keywords a grammar cannot express
    /// are skipped for tools not `strict` and refused for `strict` ones.
    #[test]
    fn every_declared_tool_s_schema_is_checked() {
        let tool = |name: &str, params: Value, strict: bool| {
            json!({"type": "function",
                   "function": {"name": name, "parameters": params, "strict": strict}})
        };
        let used = tool("f", json!({"type": "object"}), false);
        let dangling = json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/Nope"}}});
        let e = parse_tools(&[used.clone(), tool("g", dangling, false)]).unwrap_err();
        assert!(
            e.contains("tools[1].function.parameters")
                && e.contains("'g'")
                && e.contains("/properties/p: keyword '$ref'"),
            "{e}"
        );
        let typo = json!({"type": "object", "properties": {"n": {"type": "integr"}}});
        let e = parse_tools(&[used.clone(), tool("g", typo, false)]).unwrap_err();
        assert!(e.contains("'g'") && e.contains("/properties/n"), "{e}");
        let pattern =
            json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a$"}}});
        assert!(parse_tools(&[used.clone(), tool("h", pattern.clone(), false)]).is_ok());
        let e = parse_tools(&[used, tool("h", pattern, true)]).unwrap_err();
        assert!(
            e.contains("tools[1].function.parameters")
                && e.contains("'h'")
                && e.contains("keyword 'pattern' is not supported"),
            "{e}"
        );
    }

    /// Keywords the grammar cannot express (pydantic's `uniqueItems` for sets, `pattern`, bounds
    /// on numbers) are skipped for a tool that is not `strict` (llama.cpp accepts them too), and
    /// refused for one that is; what the grammar can express still holds.
    #[test]
    fn only_strict_tools_refuse_keywords_the_grammar_cannot_express() {
        let params = json!({"type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
            "code": {"type": "string", "pattern": "^[A-Z]+$"},
            "x": {"type": "number", "minimum": 0, "multipleOf": 0.5},
            "n": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["tags", "code", "x", "n"]});
        let tool = |strict: Value| {
            json!({"type": "function",
                   "function": {"name": "f", "parameters": params, "strict": strict}})
        };
        let tools = parse_tools(&[tool(Value::Null)]).unwrap();
        let g = Arc::new(call_grammar(&tools, None, false, false).unwrap());
        assert!(calls_f(
            &g,
            r#"{"tags": ["a", "a"], "code": "abc", "x": -1, "n": 3}"#
        ));
        assert!(!calls_f(
            &g,
            r#"{"tags": ["a"], "code": "A", "x": 1, "n": 10}"#
        ));
        assert!(!calls_f(
            &g,
            r#"{"tags": "a", "code": "A", "x": 1, "n": 3}"#
        ));
        let e = parse_tools(&[tool(json!(true))]).unwrap_err();
        assert!(e.contains("keyword 'uniqueItems' is not supported"), "{e}");
        let e = parse_tools(&[tool(json!("yes"))]).unwrap_err();
        assert!(
            e.contains("tools[0].function.strict: must be a boolean"),
            "{e}"
        );
    }

    #[test]
    fn generic_messages_describe_tools_and_write_calls_as_text() {
        let mut asked = Message::new("assistant", "");
        asked.tool_calls.push(crate::chat::ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: crate::chat::FunctionCall {
                name: "get_time".into(),
                arguments: json!({}),
            },
        });
        let mut result = Message::new("tool", "12:00");
        result.tool_call_id = Some("call_1".into());
        let msgs = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Time?"),
            asked,
            result,
        ];
        let out = generic_messages(&msgs, &weather());
        assert_eq!(out.len(), 4);
        assert!(
            out[0].content.starts_with("Be brief.\n\n# Tools")
                && out[0].content.contains("get_weather")
        );
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\":\"get_time\",\"arguments\":{}}\n</tool_call>"
        );
        assert_eq!(
            (out[3].role.as_str(), out[3].content.as_str()),
            ("user", "<tool_response>\n12:00\n</tool_response>")
        );
        let out = generic_messages(&msgs[1..2], &weather());
        assert_eq!(out[0].role, "system");
        assert_eq!(out[1].content, "Time?");
    }
}
