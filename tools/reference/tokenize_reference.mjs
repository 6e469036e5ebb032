// Generates the tokenizer fixtures of crates/teal/tests/fixtures/tokenizer/ from llama.cpp,
// through node-llama-cpp (pinned in package.json; prebuilt binaries, nothing is compiled).
//
//   cd tools/reference && npm install
//   node tokenize_reference.mjs \
//       --model smollm2-135m-instruct="$(../../scripts/fetch-assets.sh default)" \
//       --model qwen2.5-coder-0.5b-instruct="$(../../scripts/fetch-assets.sh qwen)" \
//       --model spm-from-smollm2=/tmp/spm-from-smollm2.gguf \
//       --model-no-wikitext tiny-spm=/tmp/tiny-spm.gguf
//
// (the last two GGUF files are written by make_spm_gguf.py, which says how)
//
// For every model it loads the GGUF vocabulary only (`vocabOnly`), tokenizes a list of tricky
// strings and byte ranges of WikiText-2 (read here, at run time, from
// ../shared/data/wikitext-2-raw-test.raw beside the workspace; the fixture records only the byte
// range and its SHA-256, the Rust test reads the same bytes) exactly the way llama.cpp does for a
// prompt without BOS: `llama_tokenize(vocab, text, add_special = false, parse_special = true)`.
// The ids are written to <out>/<name>.json.

import { createHash } from "node:crypto";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const here = path.dirname(fileURLToPath(import.meta.url));
const workspaceRoot = path.resolve(here, "..", "..");

const args = process.argv.slice(2);
const models = [];
let outDir = path.join(workspaceRoot, "crates", "teal", "tests", "fixtures", "tokenizer");
let dataPath = path.resolve(workspaceRoot, "..", "shared", "data", "wikitext-2-raw-test.raw");
for (let i = 0; i < args.length; i++) {
    if (args[i] === "--model" || args[i] === "--model-no-wikitext") {
        const spec = args[i + 1];
        const eq = spec.indexOf("=");
        if (eq < 0) throw new Error(`${args[i]} wants NAME=PATH, got ${spec}`);
        models.push({ name: spec.slice(0, eq), path: spec.slice(eq + 1), wikitext: args[i] === "--model" });
        i++;
    } else if (args[i] === "--out") {
        outDir = path.resolve(args[++i]);
    } else if (args[i] === "--data") {
        dataPath = path.resolve(args[++i]);
    } else {
        throw new Error(`unknown argument ${args[i]}`);
    }
}
if (models.length === 0) {
    throw new Error("usage: node tokenize_reference.mjs --model NAME=PATH [--model ...] [--out DIR] [--data FILE]");
}

const sha256 = (buf) => createHash("sha256").update(buf).digest("hex");

// Tricky strings: leading/multiple spaces, newlines, CRLF, digits, unicode, emoji, contractions,
// special tokens written in the text, the empty string.
const cases = [
    ["empty", ""],
    ["hello", "Hello world"],
    ["leading_space", " Hello"],
    ["two_leading_spaces", "  Hello  world"],
    ["many_spaces", "a    b        c  "],
    ["only_spaces", "     "],
    ["trailing_space", "end "],
    ["tabs", "\tindent\t\tme"],
    ["newlines", "line one\nline two\n\nline four\n"],
    ["crlf", "first\r\nsecond\r\n\r\nthird"],
    ["leading_newline", "\nHi"],
    ["digits", "12345"],
    ["digits_mixed", "In 2024, 3.14159 x 1,000,000 = 42e10 and 0x1F."],
    ["unicode_latin", "café naïve Ōsaka Zürich façade – “quoted” — ok"],
    ["unicode_cjk", "日本語のテキストと中文文本"],
    ["unicode_misc", "Привет мир; γειά σου; مرحبا; שלום; नमस्ते"],
    ["emoji", "I ❤️ Rust 🦀🚀! 👩‍👩‍👧‍👦"],
    ["contractions", "don't I'm you're we've they'll he'd it's DON'T I'M"],
    ["punctuation", "Hello!!! What?? (yes) [no] {maybe} <tag> a/b\\c @user #hash $5 %20 ^_^ ~~"],
    ["code", "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n"],
    ["python_code", "def f(x):\n\treturn x**2  # square\n\nprint(f(3))\n"],
    ["chatml", "<|im_start|>user\nHi<|im_end|>\n"],
    ["chatml_full", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"],
    ["special_adjacent", "<|im_start|><|im_end|>x<|endoftext|> y"],
    ["special_spaces", "  <|im_start|>  user  <|im_end|>  "],
    ["fake_special", "<|im_start |> <im_start> <|not_a_token|>"],
    ["other_specials", "a</s>b <s>x</s> <reponame> <filename>x<|endoftext|>"],
    ["tool_call", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"],
    ["fim", "<|fim_prefix|>def f(<|fim_suffix|>)\n<|fim_middle|>"],
    ["gpt2_ctrl", "a\u0000b\u0001c\u007f"],
    ["long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism"],
    ["url", "https://example.com/path?query=1&x=y#frag"],
    ["mixed_ws", " \n \t\n  x \r\n"],
];

// Byte ranges of WikiText-2 (cut back to a UTF-8 character boundary).
const data = readFileSync(dataPath);
const dataSha = sha256(data);
const charBoundary = (buf, pos) => {
    while (pos > 0 && pos < buf.length && (buf[pos] & 0xc0) === 0x80) pos--;
    return pos;
};
const wikiRanges = [
    ["wikitext_first_2000_bytes", 0, 2000],
    ["wikitext_first_64k", 0, 65536],
    ["wikitext_arabic_region", 942000, 946000],
].map(([name, start, end]) => {
    const s = charBoundary(data, start);
    const e = charBoundary(data, Math.min(end, data.length));
    return { name, start: s, end: e };
});

const llama = await getLlama({ gpu: false, logLevel: LlamaLogLevel.error, build: "never" });
mkdirSync(outDir, { recursive: true });

for (const m of models) {
    const gguf = readFileSync(m.path);
    const modelSha = sha256(gguf);
    const model = await llama.loadModel({ modelPath: m.path, vocabOnly: true });
    const tok = (text) => Array.from(model.tokenize(text, true));
    const detok = (ids) => model.detokenize(ids, true);

    const out = {
        generator: "tools/reference/tokenize_reference.mjs",
        node_llama_cpp: "3.21.1",
        llama_cpp_release: JSON.parse(
            readFileSync(path.join(here, "node_modules", "node-llama-cpp", "llama", "llama.cpp.info.json"), "utf8"),
        ),
        call: "llama_tokenize(vocab, text, add_special=false, parse_special=true)",
        model: { name: m.name, file: path.basename(m.path), sha256: modelSha },
        bos: model.tokens.bos,
        eos: model.tokens.eos,
        eot: model.tokens.eot,
        cases: [],
        wikitext: {
            path: "../shared/data/wikitext-2-raw-test.raw",
            sha256: dataSha,
            ranges: [],
        },
    };
    for (const [name, text] of cases) {
        const ids = tok(text);
        const back = detok(ids);
        const entry = { name, text, ids };
        if (back !== text) entry.llama_detokenize = back;
        out.cases.push(entry);
    }
    for (const r of m.wikitext ? wikiRanges : []) {
        const text = data.subarray(r.start, r.end).toString("utf8");
        const ids = tok(text);
        const entry = { name: r.name, start: r.start, end: r.end, ids };
        if (detok(ids) !== text) entry.llama_detokenize_differs = true;
        out.wikitext.ranges.push(entry);
    }
    await model.dispose();

    // One id array per line keeps the file diffable.
    const json = JSON.stringify(out, null, 1).replace(/\[\s*([0-9,\s]*?)\s*\]/g, (_, inner) =>
        "[" + inner.split(/\s*,\s*/).filter((x) => x !== "").join(",") + "]");
    const file = path.join(outDir, `${m.name}.json`);
    writeFileSync(file, json + "\n");
    console.log(`${m.name}: ${out.cases.length} strings, ${out.wikitext.ranges.length} wikitext ranges -> ${file}`);
}
