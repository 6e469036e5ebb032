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
//! which [`parse_calls`] reads back ([`stream::CallStream`] as the answer is generated). With `tool_choice` `required` or a named function, the
//! answer is constrained by [`call_grammar`]: only such blocks, each naming a declared tool
//! with arguments that meet its JSON Schema (through [`crate::json_schema`]).

pub mod stream;

use crate::chat::Message;
use crate::grammar::{Grammar, Trigger};
use crate::json_schema::{literal, Documents};
use serde_json::{json, Value};

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
/// schema; with `parallel`, one or more blocks on separate lines. Lazy (for `tool_choice`
/// `auto`), the answer is free text until `<tool_call>`, and from it on (that block and any
/// after it) the grammar's.
pub fn call_grammar(
    tools: &[Tool],
    only: Option<&str>,
    parallel: bool,
    lazy: bool,
) -> Result<Grammar, String> {
    // Each tool's parameters are a schema document of their own (their `#` and `$defs`), the
    // call object `{"name": ..., "arguments": ...}` around them.
    let mut docs = Documents::new(&["root", "block", "body", "call"]);
    let mut calls = Vec::new();
    for t in tools.iter().filter(|t| only.is_none_or(|n| n == t.name)) {
        docs.set_lenient(!t.strict);
        let args = docs
            .add(&t.parameters, "args")
            .map_err(|e| format!("tool arguments schema of '{}': {e}", t.name))?;
        let name = literal(&Value::String(t.name.clone()).to_string());
        calls.push(format!(
            r#""{{" ws "\"name\"" ws ":" ws {name} ws "," ws "\"arguments\"" ws ":" ws {args} "}}" ws"#
        ));
    }
    if calls.is_empty() {
        return Err("no tool to call".into());
    }
    let rules = format!("call ::= {}\n{}", calls.join(" | "), docs.text());
    let more = if parallel { " (\"\\n\" block)*" } else { "" };
    let text = format!(
        "root ::= block{more}\nblock ::= \"<tool_call>\" body\n\
         body ::= \"\\n\" call \"\\n</tool_call>\"\n{rules}"
    );
    let g = Grammar::parse(&text).map_err(|e| format!("tool arguments schema: {e}"))?;
    // Lazy, the grammar reads the answer from the trigger `<tool_call>` on.
    Ok(match lazy {
        true => g.lazy(vec![Trigger::Word(stream::OPEN.into())]),
        false => g,
    })
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
/// (small models leave them out), also as arrays of them, in a Markdown code block
/// (```` ```json ````, as llama.cpp reads them too), and after the markers other model
/// families put first (Mistral's `[TOOL_CALLS]`, Llama 3.1's `<|python_tag|>`). A block that
/// holds no such call is content; a call cut short (the answer hit its token limit) is
/// dropped.
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
    use crate::grammar::GrammarState;
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
        let mut m = crate::grammar::GrammarMode::from_parts(
            Arc::new(lazy),
            Arc::new(
                [
                    "Let me look. ",
                    "<tool_call>",
                    "\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
                    "\nok",
                ]
                .iter()
                .map(|t| Some(t.as_bytes().to_vec()))
                .collect(),
            ),
            vec![],
        );
        assert!(m.allows(0) && m.allows(3));
        m.accept(0);
        m.accept(1);
        assert!(m.allows(2) && !m.allows(3) && !m.allows(0));
        // What the grammar takes, parse_calls reads.
        let (_, calls) =
            parse_calls(&format!("{paris}\n{time}"), &["get_weather", "get_time"]).unwrap();
        assert_eq!(calls.len(), 2);
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
