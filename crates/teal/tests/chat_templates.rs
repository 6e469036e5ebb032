//! Chat templates rendered with minijinja against Python jinja2 renderings made the way Hugging
//! Face's `apply_chat_template` makes them (`tools/reference/render_chat_reference.py` ->
//! `tests/fixtures/tokenizer/chat_templates.json`): the real SmolLM2 and Qwen2.5-Coder templates
//! (from the GGUF files), Mistral-Small-3.1 and Phi-4-mini, and teal's ChatML / Llama-3 built-ins,
//! with and without tools (OpenAI-style `tools`, assistant `tool_calls` and `tool` results).

use std::path::Path;

use serde_json::Value;
use teal::chat::{strftime, ChatError, ChatTemplate, Message};

fn fixture() -> Value {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/chat_templates.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Replaces the reference's `@@TODAY:<format>@@` markers with `strftime_now(<format>)`.
fn with_today(s: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("@@TODAY:") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 8..];
        let j = after.find("@@").unwrap();
        out.push_str(&strftime(&after[..j], now));
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn templates_render_like_jinja2() {
    let fx = fixture();
    let mut failures = Vec::new();
    let mut n = 0;
    for case in fx["cases"].as_array().unwrap() {
        let tname = case["template"].as_str().unwrap();
        let conv = case["conversation"].as_str().unwrap();
        let source = fx["templates"][tname].as_str().unwrap();
        let t = ChatTemplate::new(source).unwrap_or_else(|e| panic!("{tname}: {e}"));
        let msgs = messages(&fx["conversations"][conv]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        // Conversations with tool calls are rendered with the fixture's tools.
        let tools: Vec<Value> = match case["tools"].as_bool() {
            Some(true) => fx["tools"].as_array().unwrap().clone(),
            _ => Vec::new(),
        };
        let got = t.render_with_tools(
            &msgs,
            &tools,
            agp,
            case["bos_token"].as_str().unwrap(),
            case["eos_token"].as_str().unwrap(),
        );
        n += 1;
        match (
            &got,
            case.get("expected").and_then(Value::as_str),
            case.get("error").and_then(Value::as_str),
        ) {
            (Ok(g), Some(want), _) => {
                let want = with_today(want);
                if *g != want {
                    failures.push(format!(
                        "{tname}/{conv}/agp={agp}:\n   got  {g:?}\n   want {want:?}"
                    ));
                }
            }
            (Err(e), _, Some(msg)) => {
                if !e.to_string().contains(msg) {
                    failures.push(format!(
                        "{tname}/{conv}: error {e} does not contain {msg:?}"
                    ));
                }
            }
            (g, want, err) => failures.push(format!(
                "{tname}/{conv}/agp={agp}: got {g:?}, want {want:?} / error {err:?}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} renderings differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn builtins_are_the_reference_sources() {
    let fx = fixture();
    assert_eq!(
        ChatTemplate::chatml().source(),
        fx["templates"]["chatml"].as_str().unwrap()
    );
    assert_eq!(
        ChatTemplate::llama3().source(),
        fx["templates"]["llama3"].as_str().unwrap()
    );
}

#[test]
fn builtins_render() {
    let msgs = vec![
        Message::new("system", "Be brief."),
        Message::new("user", " Hi "),
    ];
    let chatml = ChatTemplate::chatml()
        .render(&msgs, true, "", "<|im_end|>")
        .unwrap();
    assert_eq!(
        chatml,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"
    );
    let llama3 = ChatTemplate::llama3()
        .render(&msgs, true, "<|begin_of_text|>", "<|eot_id|>")
        .unwrap();
    assert_eq!(
        llama3,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let no_prompt = ChatTemplate::chatml()
        .render(&msgs[1..], false, "", "")
        .unwrap();
    assert_eq!(no_prompt, "<|im_start|>user\n Hi <|im_end|>\n");
}

#[test]
fn hf_features() {
    let msgs = vec![
        Message::new("user", "  padded  "),
        Message::new("assistant", "ok"),
    ];
    // raise_exception
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no users here') }}{% endif %}",
    )
    .unwrap();
    let e = t.render(&msgs, false, "", "").unwrap_err();
    assert!(matches!(e, ChatError::Render(_)));
    assert!(e.to_string().contains("no users here"), "{e}");
    // Python string / dict methods, loop variables, slicing, tojson (keys in the dict's own
    // order, as transformers' tojson, which does not sort them).
    let t = ChatTemplate::new(
        "{% for m in messages[-1:] %}{{ loop.index }}/{{ loop.length }}{% endfor %}|{{ messages[0].content.strip() }}|\
         {{ messages[0]['content'].upper().startswith('  PAD') }}|{{ messages[1] | tojson }}|\
         {{ {'a': [1, 2], 'b': 'é<'} | tojson }}|{{ {'a': 1} | tojson(indent=2) }}|{{ messages[0].get('role') }}",
    )
    .unwrap();
    assert_eq!(
        t.render(&msgs, false, "", "").unwrap(),
        "1/1|padded|True|{\"role\": \"assistant\", \"content\": \"ok\"}|{\"a\": [1, 2], \"b\": \"é<\"}|{\n  \"a\": 1\n}|user"
    );
    // trim_blocks / lstrip_blocks as in transformers.
    let t = ChatTemplate::new("  {% if true %}\nyes\n  {% endif %}\nend").unwrap();
    assert_eq!(t.render(&[], false, "", "").unwrap(), "yes\nend");
    // strftime_now exists.
    let t = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
    assert_eq!(t.render(&[], false, "", "").unwrap().len(), 4);
    // Syntax errors are reported at construction.
    assert!(matches!(
        ChatTemplate::new("{% if %}"),
        Err(ChatError::Syntax(_))
    ));
}

#[test]
fn strftime_formats() {
    // 2024-07-26 13:05:09 UTC, a Friday.
    let t = 1_721_999_109;
    assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-07-26 13:05:09");
    assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
    assert_eq!(
        strftime("%A %B %-d, %I %p, day %j, %%", t),
        "Friday July 26, 01 PM, day 208, %"
    );
    assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    assert_eq!(strftime("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
}

/// The tokenizer of the SmolLM2 GGUF named by TEAL_SMOLLM2_GGUF (`None`, with a note: not set).
fn smollm2_tokenizer() -> Option<teal::tokenizer::Tokenizer> {
    let Some(path) = std::env::var_os("TEAL_SMOLLM2_GGUF") else {
        eprintln!("skipping: set TEAL_SMOLLM2_GGUF to the GGUF file to run this test");
        return None;
    };
    let g = teal::gguf::GgufFile::open(Path::new(&path)).unwrap();
    Some(teal::tokenizer::Tokenizer::from_gguf(&g).unwrap())
}

/// The SmolLM2 GGUF's own template, rendered and tokenized, gives llama.cpp's ids for the same
/// prompt (the `chatml_full` string of the tokenizer fixture).
#[test]
fn smollm2_template_from_gguf_tokenizes_like_llama_cpp() {
    let Some(tok) = smollm2_tokenizer() else {
        return;
    };
    let source = tok.chat_template().unwrap();
    assert_eq!(source, fixture()["templates"]["smollm2"].as_str().unwrap());
    let t = ChatTemplate::new(source).unwrap();
    let bos = tok.token_str(tok.bos_id().unwrap()).unwrap();
    let eos = tok.token_str(tok.eos_ids()[0]).unwrap();
    let text = t
        .render(&[Message::new("user", "What is 2+2?")], true, &bos, &eos)
        .unwrap();
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer/smollm2-135m-instruct.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "chatml_full")
        .unwrap();
    assert_eq!(text, case["text"].as_str().unwrap());
    let want: Vec<u32> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tok.encode(&text, tok.add_bos_default()).unwrap(), want);
}

/// A chat ending with an assistant message is continued (llama.cpp's server prefills it): the
/// messages before it up to the assistant's header, then its text, unended; two at the end are
/// an error.
#[test]
fn a_final_assistant_message_is_continued() {
    let Some(tok) = smollm2_tokenizer() else {
        return;
    };
    let user = Message::new("user", "Name a color.");
    let head = teal::chat::render_chat(&tok, std::slice::from_ref(&user)).unwrap();
    assert!(head.ends_with("<|im_start|>assistant\n"), "{head}");
    let prefilled = [user.clone(), Message::new("assistant", "The color")];
    let text = teal::chat::render_chat(&tok, &prefilled).unwrap();
    assert_eq!(text, head + "The color");
    let two = [
        user,
        Message::new("assistant", "Blue."),
        Message::new("assistant", "And"),
    ];
    let e = teal::chat::render_chat(&tok, &two).unwrap_err().to_string();
    assert!(e.contains("two or more assistant messages"), "{e}");
}
