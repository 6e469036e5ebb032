// Tokenizes texts with llama.cpp's tokenizer (node-llama-cpp 3.21.1, vocabulary only), exactly as
// llama.cpp does for plain text: common_tokenize(vocab, text, add_special=false, parse_special=false),
// i.e. no BOS and special-token text not parsed. Writes int32 .npy files.
//
//   node tokenize.mjs --model PATH --out DIR NAME=TEXTFILE [NAME=TEXTFILE ...] [--prompt "text"]
//
// node-llama-cpp is resolved from tools/reference/node_modules (cd tools/reference && npm install),
// or from a local `npm install` here (package.json pins the same version).
import fs from "node:fs";
import path from "node:path";
import { createHash } from "node:crypto";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const argv = process.argv.slice(2);
let modelPath = null, outDir = null, prompt = null;
const files = [];
for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--model") modelPath = argv[++i];
    else if (argv[i] === "--out") outDir = argv[++i];
    else if (argv[i] === "--prompt") prompt = argv[++i];
    else {
        const eq = argv[i].indexOf("=");
        if (eq < 0) throw new Error(`expected NAME=TEXTFILE, got ${argv[i]}`);
        files.push([argv[i].slice(0, eq), argv[i].slice(eq + 1)]);
    }
}
if (!modelPath || !outDir) throw new Error("usage: node tokenize.mjs --model PATH --out DIR NAME=FILE ...");
fs.mkdirSync(outDir, { recursive: true });

function writeNpyInt32(file, ids) {
    const arr = Int32Array.from(ids);
    let header = `{'descr': '<i4', 'fortran_order': False, 'shape': (${arr.length},), }`;
    const pre = 10; // magic(6) + version(2) + header_len(2)
    const total = Math.ceil((pre + header.length + 1) / 64) * 64;
    header = header + " ".repeat(total - pre - header.length - 1) + "\n";
    const head = Buffer.alloc(pre);
    head.write("\x93NUMPY", 0, "latin1");
    head[6] = 1; head[7] = 0; head.writeUInt16LE(header.length, 8);
    fs.writeFileSync(file, Buffer.concat([head, Buffer.from(header, "latin1"), Buffer.from(arr.buffer)]));
}

const llama = await getLlama({ gpu: false, logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath, vocabOnly: true });
const meta = { model: path.basename(modelPath), call: "model.tokenize(text, false) = common_tokenize(vocab, text, add_special=false, parse_special=false)", texts: {} };
for (const [name, file] of files) {
    const buf = fs.readFileSync(file);
    const text = buf.toString("utf8");
    const ids = model.tokenize(text, false);
    writeNpyInt32(path.join(outDir, `${name}.npy`), ids);
    meta.texts[name] = { file, bytes: buf.length, sha256: createHash("sha256").update(buf).digest("hex"), n_tokens: ids.length };
    console.error(`[tok] ${name}: ${buf.length} bytes -> ${ids.length} tokens`);
}
if (prompt != null) {
    meta.prompt = { text: prompt, ids: Array.from(model.tokenize(prompt, false)) };
    console.error(`[tok] prompt ${JSON.stringify(prompt)} -> ${JSON.stringify(meta.prompt.ids)}`);
}
fs.writeFileSync(path.join(outDir, "tokens.json"), JSON.stringify(meta, null, 1));
await model.dispose();
await llama.dispose();
