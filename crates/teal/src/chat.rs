//! Chat templates: the Jinja templates shipped with models (`tokenizer.chat_template` in GGUF,
//! `chat_template` in `tokenizer_config.json`), rendered with minijinja the way Hugging Face's
//! `apply_chat_template` renders them: `trim_blocks` and `lstrip_blocks` on, `raise_exception`,
//! `strftime_now`, a Python-style `tojson`, and Python string / dict methods (`.strip()`,
//! `.startswith()`, `.items()`, ... through `minijinja-contrib`'s pycompat).

use crate::tokenizer::Tokenizer;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

/// One chat message. An assistant's may carry tool calls, a `tool` message the id of the call
/// it answers (OpenAI's fields, passed to the template as Hugging Face's are).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A call of a tool in an assistant message: OpenAI's `tool_calls` entry, with the arguments
/// as a JSON value (the templates write them with `tojson`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function a [`ToolCall`] calls and its arguments.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: serde_json::Value,
}

/// Errors from compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

const NAME: &str = "chat_template";

/// The ChatML template (SmolLM2, Qwen2.5 and many others use this format).
pub const CHATML: &str = r"{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}";

/// Meta's Llama-3 Instruct template (as in Meta-Llama-3-8B-Instruct's tokenizer_config.json).
pub const LLAMA3: &str = r"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

fn render_error(e: minijinja::Error) -> ChatError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    ChatError::Render(msg)
}

impl ChatTemplate {
    /// Compiles a Jinja chat template.
    pub fn new(source: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, python_string_continuations(source))
            .map_err(|e| match render_error(e) {
                ChatError::Render(m) | ChatError::Syntax(m) => ChatError::Syntax(m),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
        })
    }

    /// The built-in ChatML template.
    pub fn chatml() -> Self {
        Self::new(CHATML).expect("built-in ChatML template compiles")
    }

    /// The built-in Llama-3 Instruct template.
    pub fn llama3() -> Self {
        Self::new(LLAMA3).expect("built-in Llama-3 template compiles")
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` into the prompt text. With `add_generation_prompt`, the text ends with
    /// the header of an assistant turn. `bos_token` / `eos_token` are the tokens' texts (templates
    /// that start with `{{ bos_token }}` emit BOS themselves: don't add another when encoding).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatError> {
        self.render_with_tools(messages, &[], add_generation_prompt, bos_token, eos_token)
    }

    /// [`ChatTemplate::render`] with the tools the model may call (OpenAI's `tools` entries,
    /// passed as Hugging Face's `apply_chat_template(tools=...)` passes them; none: undefined).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template(NAME).map_err(render_error)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        };
        // Without tools, `tools` stays undefined (templates test `tools is defined`).
        let ctx = match tools {
            [] => ctx,
            _ => minijinja::context! { tools => tools, ..ctx },
        };
        tmpl.render(ctx).map_err(render_error)
    }

    /// Whether the template writes the `tools` it is given.
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }
}

/// What the model is asked: plain text to continue, token ids to continue (as given: no BOS
/// is added), token ids and texts in one sequence, a chat to answer, or the middle between a
/// prefix and a suffix (code infilling).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    /// Token ids and texts in one prompt (llama.cpp's `[12, 34, "text", 56]`): each text's
    /// tokens in its place, BOS and EOS (where the tokenizer adds them) only around the first
    /// piece's text, if the first piece is a text, as llama.cpp's server tokenizes it.
    Mixed(Vec<Piece>),
    Chat(Vec<Message>),
    /// A chat with tools the model may call (see [`crate::tools`]).
    ToolChat {
        messages: Vec<Message>,
        tools: Vec<serde_json::Value>,
    },
    Infill(Infill),
}

/// A piece of a [`Prompt::Mixed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Token(u32),
    Text(String),
}

/// A fill-in-the-middle request, as llama.cpp's `/infill` takes it: the text before and after
/// the gap, the start of the middle already written, and other files of the project.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Infill {
    pub prefix: String,
    pub suffix: String,
    /// Text after the middle token: the part of the middle the user has already typed.
    pub middle: String,
    /// Other files' text (file name, text), given before the prefix.
    pub extra: Vec<(String, String)>,
    /// The most tokens the prompt may take; `None`: no limit. With a limit the parts are cut
    /// to fit: of `b = min(budget, 2048)`, the prefix keeps at most its last `3b/4` tokens
    /// (less BOS) and the suffix its first `b/4 - 3 - middle` (less the three FIM tokens and
    /// the middle's), about as llama.cpp's server does with batch size `b`, so that the
    /// prompt without extra files takes at most `b`; the extra context keeps only its last
    /// tokens that still fit in `budget`.
    pub budget: Option<usize>,
}

impl Infill {
    /// The gap between `prefix` and `suffix`, nothing else.
    pub fn new(prefix: impl Into<String>, suffix: impl Into<String>) -> Infill {
        Infill {
            prefix: prefix.into(),
            suffix: suffix.into(),
            ..Infill::default()
        }
    }
}

/// The project name written after the repository token (llama.cpp's).
const FIM_REPO_NAME: &str = "myproject\n";
/// The current file's name after the last file separator (llama.cpp has none either).
const FIM_FILE_NAME: &str = "filename\n";
/// Between extra files where the model has no file-separator token.
const FIM_SNIPPET: &str = "\n\n--- snippet ---\n\n";

/// An infill's tokens in prefix-suffix-middle order, as llama.cpp's `/infill` writes them and
/// Qwen2.5-Coder's documentation describes: `[BOS] [extra] <PRE> prefix <SUF> suffix <MID>
/// middle`. The code (prefix, suffix, extra files and their names) is tokenized without
/// special-token parsing, as llama.cpp does: `<|endoftext|>` in it stays text. Extra files, where there are any, come first: where the model has repository and
/// file-separator tokens, `<REPO>myproject\n`, `<SEP>name\ntext` per file and
/// `<SEP>filename\n` for the current one (Qwen2.5-Coder's repository-level format, as
/// llama.cpp writes it); otherwise each file's text after a snippet line. (llama.cpp writes the
/// repository header even without extra files; here a single file keeps the plain format.)
fn encode_infill(tok: &Tokenizer, f: &Infill) -> crate::Result<Vec<u32>> {
    let [pre, suf, mid] = tok.fim_ids().ok_or_else(|| {
        crate::Error::Invalid(
            "this model's vocabulary has no fill-in-the-middle tokens (prefix, suffix and \
             middle), which infilling needs"
                .into(),
        )
    })?;
    let code = |text: &str| tok.encode_with(text, false, false);
    let mut prefix = code(&f.prefix)?;
    let mut suffix = code(&f.suffix)?;
    let middle = tok.encode(&f.middle, false)?;
    let bos: Vec<u32> = tok
        .bos_id()
        .filter(|_| tok.add_bos_default())
        .into_iter()
        .collect();
    let budget = f.budget.unwrap_or(usize::MAX);
    let b = budget.min(2048);
    prefix.drain(
        ..prefix
            .len()
            .saturating_sub((3 * (b / 4)).saturating_sub(bos.len())),
    );
    suffix.truncate((b / 4).saturating_sub(3 + middle.len()));
    let mut extra = Vec::new();
    let repo = tok.fim_repo_ids();
    if !f.extra.is_empty() {
        if let Some([rep, _]) = repo {
            extra.push(rep);
            extra.extend(code(FIM_REPO_NAME)?);
        }
        for (name, text) in &f.extra {
            match repo {
                Some([_, sep]) => {
                    extra.push(sep);
                    extra.extend(code(&format!("{name}\n"))?);
                }
                None => extra.extend(code(FIM_SNIPPET)?),
            }
            extra.extend(code(text)?);
        }
        if let Some([_, sep]) = repo {
            extra.push(sep);
            extra.extend(code(FIM_FILE_NAME)?);
        }
    }
    let core = bos.len() + prefix.len() + suffix.len() + middle.len() + 3;
    extra.drain(..extra.len().saturating_sub(budget.saturating_sub(core)));
    let parts: [&[u32]; 8] = [
        &bos,
        &extra,
        &[pre],
        &prefix,
        &[suf],
        &suffix,
        &[mid],
        &middle,
    ];
    Ok(parts.concat())
}

/// The tokens of `prompt`. Plain text gets BOS and EOS where the tokenizer adds them
/// ([`Tokenizer::encode_special`]). A chat is rendered with the tokenizer's own template
/// (ChatML where the model has none), ending with the header of the assistant's turn, and gets
/// them too, each only once: BOS is added only where the rendered text does not already start
/// with it (templates that write `{{ bos_token }}` themselves), EOS only where it does not
/// already end with it (llama.cpp strips the template's own and adds the tokenizer's). An
/// infill: see [`Infill`] (BOS only); a model without the prefix, suffix and middle tokens is
/// an error.
pub fn encode_prompt(tok: &Tokenizer, prompt: &Prompt) -> crate::Result<Vec<u32>> {
    let text = match prompt {
        Prompt::Text(t) => return Ok(tok.encode_special(t)?),
        Prompt::Tokens(ids) => return Ok(ids.clone()),
        Prompt::Mixed(pieces) => {
            let mut ids = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                match piece {
                    Piece::Token(id) => ids.push(*id),
                    Piece::Text(t) if i == 0 => ids.extend(tok.encode_special(t)?),
                    Piece::Text(t) => ids.extend(tok.encode(t, false)?),
                }
            }
            return Ok(ids);
        }
        Prompt::Infill(f) => return encode_infill(tok, f),
        Prompt::Chat(messages) => render_chat(tok, messages)?,
        Prompt::ToolChat { messages, tools } => render_chat_with_tools(tok, messages, tools)?,
    };
    let text_of = |id: Option<u32>| id.and_then(|i| tok.token_str(i));
    let bos_written = text_of(tok.bos_id()).is_some_and(|b| text.starts_with(&b));
    let eos_written = text_of(tok.eos_id()).is_some_and(|e| text.ends_with(&e));
    let mut ids = tok.encode(&text, tok.add_bos_default() && !bos_written)?;
    if tok.add_eos_default() && !eos_written {
        ids.extend(tok.eos_id());
    }
    Ok(ids)
}

/// A chat rendered with the tokenizer's own template (ChatML where the model has none), ending
/// with the header of the assistant's turn (or the text of a final assistant message, which
/// the answer continues: see [`render_chat_with_tools`]): the text [`encode_prompt`] encodes.
pub fn render_chat(tok: &Tokenizer, messages: &[Message]) -> crate::Result<String> {
    render_chat_with_tools(tok, messages, &[])
}

/// [`render_chat`] with tools the model may call: given to the template where it writes them
/// (Qwen2.5's, Hermes', ...), else described in the system message and the calls and results
/// written as text ([`crate::tools::generic_messages`]), in the same `<tool_call>` format.
///
/// A chat that ends with an assistant message (without tool calls) is continued, as llama.cpp's
/// server prefills it: the messages before it are rendered up to the assistant's header, and
/// its text follows, unended. Two assistant messages at the end are an error.
pub fn render_chat_with_tools(
    tok: &Tokenizer,
    messages: &[Message],
    tools: &[serde_json::Value],
) -> crate::Result<String> {
    match messages.split_last() {
        Some((last, before)) if last.role == "assistant" && last.tool_calls.is_empty() => {
            if before.last().is_some_and(|m| m.role == "assistant") {
                return Err(crate::Error::Invalid(
                    "messages: two or more assistant messages at the end (only the last one \
                     can be continued)"
                        .into(),
                ));
            }
            Ok(render_turns(tok, before, tools, true)? + &last.content)
        }
        _ => render_turns(tok, messages, tools, true),
    }
}

/// `messages` rendered with the tokenizer's own template as they are: without the header of
/// the assistant's turn after them, and a final assistant message ended as the others
/// (llama.cpp's `/apply-template` with `add_generation_prompt: false`).
pub fn render_chat_as_is(tok: &Tokenizer, messages: &[Message]) -> crate::Result<String> {
    render_turns(tok, messages, &[], false)
}

/// `messages` rendered with the template, ending with the header of the assistant's turn if
/// `generation_prompt`.
fn render_turns(
    tok: &Tokenizer,
    messages: &[Message],
    tools: &[serde_json::Value],
    generation_prompt: bool,
) -> crate::Result<String> {
    let template = match tok.chat_template() {
        Some(src) => ChatTemplate::new(src)?,
        None => ChatTemplate::chatml(),
    };
    let bos = tok.bos_id().and_then(|i| tok.token_str(i));
    let eos = tok.eos_ids().first().and_then(|&i| tok.token_str(i));
    let (bos, eos) = (
        bos.as_deref().unwrap_or_default(),
        eos.as_deref().unwrap_or_default(),
    );
    let uses_tools = !tools.is_empty() || messages.iter().any(|m| !m.tool_calls.is_empty());
    if uses_tools && !template.takes_tools() {
        let generic = crate::tools::generic_messages(messages, tools);
        return Ok(template.render(&generic, generation_prompt, bos, eos)?);
    }
    Ok(template.render_with_tools(messages, tools, generation_prompt, bos, eos)?)
}

/// Python's Jinja treats a backslash before a newline inside a string literal as a line
/// continuation (both vanish; Mistral's templates rely on it), minijinja does not: drop such
/// pairs inside `{{ }}` / `{% %}` tags. Other escapes are left for minijinja.
fn python_string_continuations(source: &str) -> String {
    if !source.contains("\\\n") {
        return source.to_string();
    }
    let b = source.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let mut close: Option<&[u8]> = None; // inside a tag: its closing delimiter
    let mut quote: Option<u8> = None; // inside a string literal in a tag: its quote
    while i < b.len() {
        match (close, quote) {
            (None, _) => {
                if b[i] == b'{' && matches!(b.get(i + 1), Some(b'{') | Some(b'%')) {
                    close = Some(if b[i + 1] == b'{' { b"}}" } else { b"%}" });
                    out.extend_from_slice(&b[i..i + 2]);
                    i += 2;
                    continue;
                }
            }
            (Some(end), None) => {
                if b[i..].starts_with(end) {
                    close = None;
                    out.extend_from_slice(end);
                    i += 2;
                    continue;
                }
                if b[i] == b'"' || b[i] == b'\'' {
                    quote = Some(b[i]);
                }
            }
            (Some(_), Some(q)) => {
                if b[i] == b'\\' {
                    match b.get(i + 1) {
                        Some(b'\n') => i += 2,
                        Some(b'\r') if b.get(i + 2) == Some(&b'\n') => i += 3,
                        Some(&c) => {
                            out.push(b'\\');
                            out.push(c);
                            i += 2;
                        }
                        None => i += 1,
                    }
                    continue;
                }
                if b[i] == q {
                    quote = None;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| source.to_string())
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC time, formatted with the common strftime codes.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime(&format, secs))
}

/// Formats a Unix time (UTC) with strftime codes `%Y %y %m %d %e %b %B %a %A %H %I %M %S %p %j %%`.
pub fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + if leap && month > 2 { 1 } else { 0 };
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&day.to_string()),
                Some('m') => out.push_str(&month.to_string()),
                Some('H') => out.push_str(&hour.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!(
                "{:02}",
                if hour % 12 == 0 { 12 } else { hour % 12 }
            )),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as Hugging Face's templates expect it (Python `json.dumps`: `", "` and `": "`
/// separators, no HTML escaping, non-ASCII kept, optional `indent`).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    // Accepted and ignored: ensure_ascii (always false here), sort_keys, separators.
    let _ = kwargs.get::<Option<Value>>("ensure_ascii")?;
    let _ = kwargs.get::<Option<Value>>("sort_keys")?;
    let _ = kwargs.get::<Option<Value>>("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_json(&json, indent, 0, &mut out);
    Ok(Value::from(out))
}

fn write_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}
