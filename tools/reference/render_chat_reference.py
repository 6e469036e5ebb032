#!/usr/bin/env python3
"""Renders chat templates with Python's jinja2 exactly as Hugging Face transformers'
`apply_chat_template` does (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, `raise_exception`, `strftime_now`, json.dumps-style `tojson`), and writes the
expected renderings to crates/teal/tests/fixtures/tokenizer/chat_templates.json, which
crates/teal/tests/chat_templates.rs compares teal's minijinja rendering against.

  cd tools/reference
  python3 render_chat_reference.py \
      --gguf smollm2="$(../../scripts/fetch-assets.sh default)" \
      --gguf qwen2.5-coder="$(../../scripts/fetch-assets.sh qwen)" \
      --file mistral-small-3.1=mistralai-Mistral-Small-3.1-24B-Instruct-2503.jinja \
      --file phi-4-mini=llama-cpp-microsoft-Phi-4-mini-instruct.jinja

--gguf reads `tokenizer.chat_template` from a GGUF file; --file reads a template file (the two above
are from github.com/ggml-org/llama.cpp, models/templates/); --templates-from takes every template of
an earlier output (so the fixture can be remade without the files). The conversations of
TOOL_CONVERSATIONS are rendered with `tools=TOOLS` (as `apply_chat_template(tools=...)` passes
them), the others without `tools`. The built-in ChatML and Llama-3
templates of teal's chat.rs are copied below (the Rust test checks they are still identical).
`strftime_now` returns the marker @@TODAY:<format>@@, which the Rust test replaces with today's date.
Needs jinja2 (pip install jinja2) and, for --gguf, gguf.
"""

import argparse
import json
import os

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"

SPECIAL = {
    "chatml": ("", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5-coder": ("<|endoftext|>", "<|im_end|>"),
    "mistral-small-3.1": ("<s>", "</s>"),
    "phi-4-mini": ("<|endoftext|>", "<|endoftext|>"),
}

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "Hi"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "whitespace_unicode": [
        {"role": "system", "content": "  Réponds en français.\n"},
        {"role": "user", "content": "\n Quelle heure est-il ? 🕰️  \n"},
        {"role": "assistant", "content": "Il est midi.\n\n"},
        {"role": "user", "content": "Merci {{ not a template }} {% raw %}"},
    ],
    "not_alternating": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
}

# OpenAI-style tools, and conversations with a call and its result (arguments as objects, as
# transformers expects them).
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]

TOOL_CONVERSATIONS = {
    "tools_user": [{"role": "user", "content": "Weather in Paris?"}],
    "tools_call_result": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ],
}


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return f"@@TODAY:{fmt}@@"

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--templates-from", metavar="FIXTURE")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument(
        "--out",
        default=os.path.join(here, "..", "..", "crates", "teal", "tests", "fixtures", "tokenizer", "chat_templates.json"),
    )
    args = ap.parse_args()

    templates = {"chatml": CHATML, "llama3": LLAMA3}
    if args.templates_from:
        with open(args.templates_from, encoding="utf-8") as fh:
            templates.update(json.load(fh)["templates"])
    for spec in args.gguf:
        import gguf

        name, path = spec.split("=", 1)
        f = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
        templates[name] = f.contents()
    for spec in args.file:
        name, path = spec.split("=", 1)
        with open(path, encoding="utf-8") as fh:
            templates[name] = fh.read()

    env = make_env()
    cases = []
    for tname, source in templates.items():
        tmpl = env.from_string(source)
        bos, eos = SPECIAL.get(tname, ("<s>", "</s>"))
        for cname, messages in list(CONVERSATIONS.items()) + list(TOOL_CONVERSATIONS.items()):
            with_tools = cname in TOOL_CONVERSATIONS
            for agp in (True, False):
                case = {
                    "template": tname,
                    "conversation": cname,
                    "add_generation_prompt": agp,
                    "bos_token": bos,
                    "eos_token": eos,
                    "tools": with_tools,
                }
                extra = {"tools": TOOLS} if with_tools else {}
                try:
                    case["expected"] = tmpl.render(
                        messages=messages, add_generation_prompt=agp, bos_token=bos, eos_token=eos, **extra
                    )
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                cases.append(case)
    out = {
        "generator": "tools/reference/render_chat_reference.py",
        "jinja2": jinja2.__version__,
        "templates": templates,
        "conversations": {**CONVERSATIONS, **TOOL_CONVERSATIONS},
        "tools": TOOLS,
        "cases": cases,
    }
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(out, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    print(f"{args.out}: {len(templates)} templates, {len(cases)} renderings")


if __name__ == "__main__":
    main()
