#!/usr/bin/env node
// Decode and prompt speed of llama.cpp (node-llama-cpp 3.21.1, prebuilt CPU binaries) on one GGUF,
// in the form of llama-bench, for scripts/bench-vs-llamacpp.sh.
//
//   node bench.mjs --model PATH [--threads 2] [-p 64] [-n 128] [-r 5]
//
// Prints one JSON object: {"decode_tok_s": {median,min,max}, "prompt_tok_s": {...}, ...}.
// Each repetition: a fresh context; the prompt (ordinary prose, repeated to p tokens) in one batch;
// then n tokens greedily, one controlledEvaluate call per token. One untimed warm-up repetition.
// llama.cpp's own defaults otherwise (f16 KV cache, flash attention auto).

import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const TEXT = "The history of the city begins with a small settlement on the river, " +
    "where traders met to exchange grain, salt and cloth. Over the following centuries the town grew " +
    "into a regional centre, with a market square, a cathedral and a university whose library still " +
    "holds many of the manuscripts copied by its first students. ";

const a = {model: null, threads: 2, p: 64, n: 128, r: 5};
for (let i = 2; i < process.argv.length; i++) {
    const k = process.argv[i];
    const v = () => process.argv[++i];
    if (k === "--model" || k === "-m") a.model = v();
    else if (k === "--threads" || k === "-t") a.threads = parseInt(v(), 10);
    else if (k === "-p") a.p = parseInt(v(), 10);
    else if (k === "-n") a.n = parseInt(v(), 10);
    else if (k === "-r") a.r = parseInt(v(), 10);
    else throw new Error(`unknown argument ${k}`);
}
if (!a.model) throw new Error("--model is required");

const stat = (v) => {
    const s = [...v].sort((x, y) => x - y);
    const m = s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
    return {median: m, min: s[0], max: s[s.length - 1]};
};

const llama = await getLlama({gpu: false, build: "never", maxThreads: a.threads, logLevel: LlamaLogLevel.warn});
const model = await llama.loadModel({modelPath: a.model, gpuLayers: 0});
const base = Array.from(model.tokenize(TEXT, false));
const prompt = Array.from({length: a.p}, (_, i) => base[i % base.length]);
const gen = {generateNext: {token: true, options: {temperature: 0}}};
const decode = [], pre = [];
for (let rep = 0; rep <= a.r; rep++) {
    const ctx = await model.createContext({
        contextSize: a.p + a.n + 16, batchSize: Math.max(a.p, 1), sequences: 1,
        threads: {ideal: a.threads, min: a.threads}
    });
    const seq = ctx.getSequence();
    const t0 = process.hrtime.bigint();
    let out = await seq.controlledEvaluate(prompt.map((t, i) => i === prompt.length - 1 ? [t, gen] : t));
    let tok = out[out.length - 1].next.token;
    const t1 = process.hrtime.bigint();
    for (let i = 0; i < a.n; i++) {
        out = await seq.controlledEvaluate([[tok, gen]]);
        tok = out[0].next.token;
    }
    const t2 = process.hrtime.bigint();
    await ctx.dispose();
    if (rep > 0) {
        pre.push(a.p / (Number(t1 - t0) / 1e9));
        decode.push(a.n / (Number(t2 - t1) / 1e9));
    }
}
console.log(JSON.stringify({
    engine: "llama.cpp (node-llama-cpp 3.21.1)", model: a.model, threads: a.threads,
    n_prompt: a.p, n_gen: a.n, reps: a.r, decode_tok_s: stat(decode), prompt_tok_s: stat(pre)
}));
await model.dispose();
