#!/usr/bin/env node
// Independent reference numbers for teal, produced with llama.cpp through node-llama-cpp 3.21.1
// (prebuilt CPU binaries, nothing compiled). See docs/reference-values.md.
//
//   node reference.mjs --model out/smollm2-f32.gguf --label f32 [options]
//
// (out/smollm2-f32.gguf: the default model dequantized to F32, written by
//  python3 dequantize_gguf.py "$(../../../scripts/fetch-assets.sh default)" out/smollm2-f32.gguf)
//
// Options:
//   --model PATH        GGUF file (required)
//   --label NAME        key under which the result is stored in --results (default: file name)
//   --text PATH         perplexity text (default ../../../../shared/data/wikitext-2-raw-test.raw)
//   --windows K         number of 512-token windows (default 32)
//   --window N          window length in tokens (default 512)
//   --protocol P        p512 (default) or llama-perplexity (see below)
//   --threads T         CPU threads (default 2)
//   --kv f32|f16        KV cache type for K and V (default f32; llama.cpp's own default is f16)
//   --flash-attn on|off|auto (default off; llama.cpp's own default is auto)
//   --log-level L       node-llama-cpp / llama.cpp log level (default warn; "info" shows llama.cpp's context setup)
//   --prompt STR        greedy prompt (default "The capital of France is")
//   --n-predict N       greedy tokens (default 12)
//   --skip-greedy / --skip-ppl
//   --results PATH      JSON file to merge the result into (default results.json beside this script)
//   --full-out PATH     also write the full, unabridged result of this run (all windows' NLLs)
//
// Protocol P512 (DESIGN.md section 4): the whole text file is tokenized exactly as stored (UTF-8,
// CRLF kept, no BOS, special tokens not parsed); it is cut into non-overlapping windows of 512
// tokens; each of the first K windows is evaluated from an empty KV cache (no BOS prepended) in one
// batch of 512 tokens with logits at every position; tokens 1..511 are scored:
// NLL_i = -log softmax(logits_{i-1})[tok_i].  PPL = exp(mean NLL over K*511 tokens).
//
// Protocol llama-perplexity (--protocol llama-perplexity): what llama.cpp's `llama-perplexity -f FILE
// -c W` computes (tools/perplexity/perplexity.cpp, function perplexity, no --ppl-stride), on the same
// llama.cpp tokenizer and logits: the file is read as `-f` reads it (one trailing '\n' dropped) and
// tokenized with add_special (BOS in front where llama_vocab_get_add_bos says so; parse_special off);
// at least 2W tokens are required; the windows are [W*i, W*i+W) for i < min(K, floor(n_tokens/W));
// each is evaluated from an empty cache with its first token replaced by BOS (where the model adds
// BOS), and only the predictions made at positions first..W-2, first = floor(W/2), are scored
// (W - 1 - first tokens a window: 255 of 512). PPL = exp(sum NLL / count) over all scored tokens,
// printed with llama.cpp's uncertainty sqrt((mean(NLL^2) - mean^2) / (count - 1)) * PPL.
//
// Where the probabilities come from: LlamaContextSequence.controlledEvaluate() with
// generateNext.probabilities = true at every position. With temperature 0 node-llama-cpp's native
// sampler chain is only the greedy sampler (no top-k / top-p / min-p stage), so the returned map is
// the softmax over the FULL vocabulary of the raw logits (the script checks that the map has n_vocab
// entries at every position). The addon normalizes in float32; we renormalize in double
// (NLL = -log p_tok + log(sum_j p_j)) to remove the float32 summation error of the normalizer.

import fs from "node:fs";
import path from "node:path";
import crypto from "node:crypto";
import {fileURLToPath} from "node:url";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const here = path.dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
    const a = {
        model: null, label: null,
        text: path.resolve(here, "../../../../shared/data/wikitext-2-raw-test.raw"),
        windows: 32, window: 512, protocol: "p512", threads: 2, kv: "f32", flashAttn: "off",
        prompt: "The capital of France is", nPredict: 12,
        skipGreedy: false, logLevel: "warn", skipPpl: false,
        results: path.join(here, "results.json"), fullOut: null
    };
    for (let i = 2; i < argv.length; i++) {
        const k = argv[i];
        const v = () => argv[++i];
        switch (k) {
            case "--model": a.model = v(); break;
            case "--label": a.label = v(); break;
            case "--text": a.text = v(); break;
            case "--windows": a.windows = parseInt(v(), 10); break;
            case "--window": a.window = parseInt(v(), 10); break;
            case "--protocol": a.protocol = v(); break;
            case "--threads": a.threads = parseInt(v(), 10); break;
            case "--kv": a.kv = v().toLowerCase(); break;
            case "--flash-attn": a.flashAttn = v(); break;
            case "--prompt": a.prompt = v(); break;
            case "--log-level": a.logLevel = v(); break;
            case "--n-predict": a.nPredict = parseInt(v(), 10); break;
            case "--skip-greedy": a.skipGreedy = true; break;
            case "--skip-ppl": a.skipPpl = true; break;
            case "--results": a.results = v(); break;
            case "--full-out": a.fullOut = v(); break;
            default: throw new Error(`unknown argument ${k}`);
        }
    }
    if (!a.model) throw new Error("--model is required");
    if (!["f32", "f16"].includes(a.kv)) throw new Error("--kv must be f32 or f16");
    if (!["p512", "llama-perplexity"].includes(a.protocol)) throw new Error("--protocol must be p512 or llama-perplexity");
    if (!["on", "off", "auto"].includes(a.flashAttn)) throw new Error("--flash-attn must be on, off or auto");
    a.label ??= path.basename(a.model, ".gguf");
    return a;
}

function sha256File(p) {
    const h = crypto.createHash("sha256");
    const fd = fs.openSync(p, "r");
    const buf = Buffer.alloc(1 << 24);
    let n;
    while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) h.update(buf.subarray(0, n));
    fs.closeSync(fd);
    return h.digest("hex");
}

const r6 = (x) => Math.round(x * 1e6) / 1e6;
const r8 = (x) => Math.round(x * 1e8) / 1e8;

async function newContext(model, args, contextSize) {
    return model.createContext({
        contextSize,
        batchSize: Math.max(args.window, 512),
        sequences: 1,
        threads: {ideal: args.threads, min: args.threads},
        flashAttention: args.flashAttn === "auto" ? "auto" : args.flashAttn === "on",
        experimentalKvCacheKeyType: args.kv.toUpperCase(),
        experimentalKvCacheValueType: args.kv.toUpperCase()
    });
}

function describeContext(ctx) {
    return {
        context_size: ctx.contextSize,
        batch_size: ctx.batchSize,
        kv_cache_key_type: ctx.kvCacheKeyType,
        kv_cache_value_type: ctx.kvCacheValueType,
        flash_attention: ctx.flashAttention,
        threads: ctx.currentThreads ?? ctx.idealThreads
    };
}

// Evaluate one window in one batch with logits at positions first..W-2, and score tokens
// first+1..W-1 (P512: first = 0). Each full-vocabulary probability map is consumed in the
// onTokenResult callback and dropped right away (512 maps of 49152 entries would otherwise be held
// until the window ends).
async function evalWindow(sequence, toks, nVocab, first = 0) {
    const W = toks.length;
    const n = W - 1 - first;
    const nll = new Array(n).fill(NaN);
    const argmax = new Array(n).fill(-1);
    let maxSumDev = 0, seen = 0, error = null;
    const gen = {generateNext: {probabilities: true, token: true, options: {temperature: 0, topK: 0}}};
    const input = toks.map((t, i) => (i >= first && i < W - 1 ? [t, gen] : t));
    const onTokenResult = (i, out) => {
        try {
            if (i < first || i >= W - 1) throw new Error(`a result at position ${i}, outside ${first}..${W - 2}`);
            const probs = out?.next?.probabilities;
            if (probs == null) throw new Error(`no probabilities at position ${i}`);
            if (probs.size !== nVocab)
                throw new Error(`probabilities at position ${i} cover ${probs.size} tokens, not the full vocabulary (${nVocab})`);
            const p = probs.get(toks[i + 1]);
            if (p == null) throw new Error(`token ${toks[i + 1]} missing at position ${i}`);
            let s = 0;
            for (const v of probs.values()) s += v;
            maxSumDev = Math.max(maxSumDev, Math.abs(s - 1));
            nll[i - first] = -Math.log(p) + Math.log(s); // renormalized in double
            argmax[i - first] = out.next.token;
            seen++;
        } catch (e) {
            error ??= e;
        }
        if (out?.next) delete out.next.probabilities;
    };
    await sequence.controlledEvaluate(input, {onTokenResult});
    if (error) throw error;
    if (seen !== n) throw new Error(`got ${seen} probability maps, expected ${n}`);
    return {nll, argmax, maxSumDev};
}

// JSON with one key per line but every array of scalars on a single line (keeps results.json small
// and diff-friendly). Safe: JSON strings never contain a raw newline, so only whitespace between
// tokens changes.
function formatJson(obj) {
    return JSON.stringify(obj, null, 1)
        .replace(/\[\s*([^\[\]{}]*?)\s*\]/g, (_, inner) => "[" + inner.replace(/\n\s*/g, " ") + "]") + "\n";
}

async function main() {
    const args = parseArgs(process.argv);
    const llama = await getLlama({gpu: false, build: "never", maxThreads: args.threads, logLevel: args.logLevel});
    const model = await llama.loadModel({modelPath: args.model, gpuLayers: 0});
    const md = model.fileInfo.metadata;
    const nVocab = md?.tokenizer?.ggml?.tokens?.length ?? md?.[md?.general?.architecture]?.vocab_size;
    if (!(nVocab > 0)) throw new Error("cannot determine the vocabulary size from the GGUF metadata");
    const pkg = JSON.parse(fs.readFileSync(path.join(here, "node_modules/node-llama-cpp/package.json"), "utf8"));
    const llamaInfo = JSON.parse(fs.readFileSync(path.join(here, "node_modules/node-llama-cpp/llama/llama.cpp.info.json"), "utf8"));

    const result = {
        model: path.basename(args.model),
        model_sha256: sha256File(args.model),
        runtime: {
            node_llama_cpp: pkg.version,
            llama_cpp_release: llamaInfo.tag,
            llama_cpp_repo: llamaInfo.llamaCppGithubRepo,
            gpu: llama.gpu,
            build_type: llama.buildType,
            llama_cpp_release_info: llama.llamaCppRelease,
            system_info: llama.systemInfo,
            threads: args.threads,
            kv_cache_type: args.kv.toUpperCase(),
            flash_attention: args.flashAttn,
            n_vocab: nVocab
        }
    };
    console.error(`[ref] model ${args.model} sha256 ${result.model_sha256} n_vocab ${nVocab}`);

    if (!args.skipGreedy) {
        const tg = Date.now();
        const addBos = model.tokens.shouldPrependBosToken;
        const promptIds = [...(addBos && model.tokens.bos != null ? [model.tokens.bos] : []),
            ...model.tokenize(args.prompt, false)];
        const ctx = await newContext(model, args, 512);
        const seq = ctx.getSequence();
        const ids = [];
        const topProb = [];
        const runnerUp = [];
        // prompt in one batch, logits only at its last position; then one token at a time
        let input = promptIds.map((t, i) => i === promptIds.length - 1
            ? [t, {generateNext: {token: true, probabilities: true, options: {temperature: 0, topK: 0}}}]
            : t);
        for (let step = 0; step < args.nPredict; step++) {
            const out = await seq.controlledEvaluate(input);
            const last = out[out.length - 1];
            const tok = last.next.token;
            ids.push(tok);
            const it = last.next.probabilities.entries(); // sorted, highest first
            const [t1, p1] = it.next().value;
            const [t2, p2] = it.next().value;
            if (t1 !== tok) throw new Error(`greedy token ${tok} is not the top of the probability map (${t1})`);
            topProb.push(r6(p1));
            runnerUp.push([t2, r6(p2)]);
            input = [[tok, {generateNext: {token: true, probabilities: true, options: {temperature: 0, topK: 0}}}]];
        }
        await ctx.dispose();
        result.greedy = {
            prompt: args.prompt,
            add_bos: addBos,
            prompt_ids: promptIds,
            n_predict: args.nPredict,
            ids,
            pieces: ids.map((t) => model.detokenize([t], true)),
            text: model.detokenize(ids, true),
            greedy_prob: topProb,
            runner_up: runnerUp
        };
        result.greedy_seconds = (Date.now() - tg) / 1000;
        console.error(`[ref] greedy add_bos=${addBos} prompt_ids=${JSON.stringify(promptIds)}`);
        console.error(`[ref] greedy ids=${JSON.stringify(ids)} text=${JSON.stringify(result.greedy.text)}`);
    }

    if (!args.skipPpl) {
        const tp = Date.now();
        const llamaPpl = args.protocol === "llama-perplexity";
        let text = fs.readFileSync(args.text, "utf8");
        const textBytes = fs.statSync(args.text).size;
        // llama-perplexity reads its -f file as common's --file does: one trailing '\n' dropped.
        const droppedNewline = llamaPpl && text.endsWith("\n");
        if (droppedNewline) text = text.slice(0, -1);
        // ... and tokenizes it with add_special: BOS in front where the model adds one (add_eos
        // is asserted false there).
        const addBos = llamaPpl && model.tokens.shouldPrependBosToken;
        const bos = model.tokens.bos;
        if (llamaPpl && model.tokens.shouldAppendEosToken) throw new Error("the model adds EOS; llama-perplexity refuses it");
        const tT = Date.now();
        const all = [...(addBos ? [bos] : []), ...Array.from(model.tokenize(text, false))];
        console.error(`[ref] tokenized ${textBytes} bytes -> ${all.length} tokens in ${(Date.now() - tT) / 1000}s` +
            (llamaPpl ? ` (protocol llama-perplexity: BOS ${addBos ? bos : "none"}, trailing newline ${droppedNewline ? "dropped" : "none"})` : ""));
        const W = args.window;
        const nWin = Math.floor(all.length / W);
        let K = args.windows;
        if (llamaPpl) {
            if (all.length < 2 * W) throw new Error(`llama-perplexity needs at least ${2 * W} tokens for windows of ${W}; the text has ${all.length}`);
            K = Math.min(K, nWin);
        } else if (nWin < K) throw new Error(`only ${nWin} windows available`);
        const first = llamaPpl ? Math.floor(W / 2) : 0;
        if (W - 1 - first < 1) throw new Error(`a window of ${W} tokens scores nothing`);
        // node-llama-cpp keeps one free cell (freeSpace = contextSize - 1 - used) and would context-shift
        // a 512-token window in a 512-cell context, so the context has 2*W cells; the window still
        // goes in as one batch of W tokens starting at position 0 (checked below).
        const ctx = await newContext(model, args, 2 * W);
        const seq = ctx.getSequence();
        result.runtime.context = describeContext(ctx);
        console.error(`[ref] context ${JSON.stringify(result.runtime.context)}`);
        const perWindow = [];
        const allNll = [];
        const running = [];
        let sumNll = 0, sumNll2 = 0, nScored = 0, top1 = 0, maxSumDev = 0;
        let win0 = null;
        for (let w = 0; w < K; w++) {
            const tw = Date.now();
            await seq.clearHistory();
            if (seq.nextTokenIndex !== 0) throw new Error("sequence not empty after clearHistory");
            const toks = all.slice(w * W, (w + 1) * W);
            if (addBos) toks[0] = bos;
            const {nll: nlls, argmax, maxSumDev: dev} = await evalWindow(seq, toks, nVocab, first);
            if (seq.nextTokenIndex !== W) throw new Error(`sequence holds ${seq.nextTokenIndex} tokens after the window, expected ${W} (context shift?)`);
            maxSumDev = Math.max(maxSumDev, dev);
            for (let i = first; i < W - 1; i++) if (argmax[i - first] === toks[i + 1]) top1++;
            const m = nlls.reduce((a, b) => a + b, 0) / nlls.length;
            perWindow.push(m);
            allNll.push(nlls);
            sumNll += nlls.reduce((a, b) => a + b, 0);
            sumNll2 += nlls.reduce((a, b) => a + b * b, 0);
            nScored += nlls.length;
            running.push(Math.exp(sumNll / nScored));
            if (w === 0) win0 = {ids: toks, nll: nlls, argmax};
            console.error(`[ref] window ${w}: mean NLL ${m.toFixed(6)} (running PPL ${Math.exp(sumNll / nScored).toFixed(4)}) ${(Date.now() - tw) / 1000}s`);
        }
        await ctx.dispose();
        const meanNll = sumNll / nScored;
        const ppl = Math.exp(meanNll);
        // llama-perplexity's "+/-": the standard error of the mean NLL, times PPL.
        const varNll = sumNll2 / nScored - meanNll * meanNll;
        const pplUnc = varNll > 0 ? Math.sqrt(varNll / (nScored - 1)) * ppl : NaN;
        result.ppl = {
            protocol: llamaPpl ? "llama-perplexity" : "P512",
            text: path.basename(args.text),
            text_bytes: textBytes,
            ...(llamaPpl ? {add_bos: addBos, bos: addBos ? bos : null, trailing_newline_dropped: droppedNewline} : {}),
            text_tokens: all.length,
            windows_available: nWin,
            K,
            window: W,
            first_scored_prediction: first,
            scored_per_window: W - 1 - first,
            tokens_scored: nScored,
            mean_nll: r8(meanNll),
            ppl: r6(ppl),
            ppl_uncertainty: r6(pplUnc),
            top1_agreement_with_text: r6(top1 / nScored),
            max_abs_prob_sum_deviation: maxSumDev,
            per_window_mean_nll: perWindow.map(r8),
            per_window_ppl: perWindow.map((x) => r6(Math.exp(x))),
            window0_ids: win0.ids,
            window0_nll: win0.nll.map(r8),
            window0_argmax: win0.argmax
        };
        result.ppl_seconds = (Date.now() - tp) / 1000;
        if (args.fullOut) {
            fs.mkdirSync(path.dirname(path.resolve(args.fullOut)), {recursive: true});
            fs.writeFileSync(args.fullOut, JSON.stringify({...result, all_windows_nll: allNll.map((a) => a.map(r8)), text_ids_first_windows: all.slice(0, K * W)}) + "\n");
        }
        if (llamaPpl) {
            // llama-perplexity's own lines: the running PPL after each window, then the estimate.
            console.error(running.map((x, i) => `[${i + 1}]${x.toFixed(4)}`).join(",") + ",");
            console.error(`[ref] Final estimate: PPL = ${ppl.toFixed(4)} +/- ${pplUnc.toFixed(5)}`);
        }
        console.error(`[ref] PPL ${result.ppl.ppl} mean NLL ${result.ppl.mean_nll} over ${nScored} tokens (K=${K}, protocol ${result.ppl.protocol})`);
    }
    await model.dispose();
    await llama.dispose();

    let merged = {};
    if (fs.existsSync(args.results)) merged = JSON.parse(fs.readFileSync(args.results, "utf8"));
    merged[args.label] = {...(merged[args.label] ?? {}), ...result};
    fs.writeFileSync(args.results, formatJson(merged));
    console.log(JSON.stringify({label: args.label, greedy: result.greedy?.ids, ppl: result.ppl?.ppl, tokens_scored: result.ppl?.tokens_scored}));
}

main().catch((e) => {
    console.error(e);
    process.exit(1);
});
