# GPU serve check: prompt cache, scoring, tokenizer endpoints of `teal serve --device cuda:0`, a CPU
# server on the same model file as the reference. Usage: python3 serve_check.py [DIR] (DIR holds
# teal-head, smol4.gguf from examples/gguf_keep_layers, wiki20k.txt; default .devcarry).
import json, subprocess, sys, time, urllib.request
D = sys.argv[1] if len(sys.argv) > 1 else ".devcarry"  # teal-head, smol4.gguf, wiki20k.txt
def start(port, extra):
    p = subprocess.Popen([f"{D}/teal-head", "serve", "-m", f"{D}/smol4.gguf", "--port", str(port), "-c", "1024"] + extra,
                         stdout=subprocess.DEVNULL, stderr=open(f"/tmp/serve{port}.log", "w"))
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1); return p
        except Exception: time.sleep(0.2)
    raise SystemExit(f"server {port} did not start: " + open(f"/tmp/serve{port}.log").read()[-2000:])
def post(port, path, body):
    r = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        return json.load(urllib.request.urlopen(r, timeout=120))
    except urllib.error.HTTPError as e:
        return {"http_error": e.code, "body": e.read().decode()[:300]}
gpu = start(8081, ["--device", "cuda:0", "--gpu-dtype", "f16"])
cpu = start(8082, ["--kv-dtype", "f32"])
ok = True
def check(name, cond, info=""):
    global ok
    ok &= bool(cond); print(("PASS " if cond else "FAIL ") + name, info)
P = "The capital of France is"
def comp(port, **kw):
    b = {"prompt": P, "max_tokens": 16, "temperature": 0}; b.update(kw); return post(port, "/v1/completions", b)
a = comp(8081); print("gpu text:", repr(a["choices"][0]["text"]), a["usage"])
c = comp(8082); print("cpu text:", repr(c["choices"][0]["text"]))
check("gpu greedy text equals cpu", a["choices"][0]["text"] == c["choices"][0]["text"])
b = comp(8081); cached = b["usage"].get("prompt_tokens_details", {}).get("cached_tokens")
check("repeat reuses all but the last prompt token", cached == a["usage"]["prompt_tokens"] - 1, f"cached={cached}")
check("repeat gives the same text", b["choices"][0]["text"] == a["choices"][0]["text"])
n = comp(8081, cache_prompt=False)
check("cache_prompt false: same text, 0 cached", n["choices"][0]["text"] == a["choices"][0]["text"] and n["usage"].get("prompt_tokens_details", {}).get("cached_tokens") == 0)
P2 = P + a["choices"][0]["text"] + " And the capital of Spain is"
x = comp(8081, prompt=P2); y = comp(8081, prompt=P2, cache_prompt=False)
check("continued prompt: cached text equals fresh", x["choices"][0]["text"] == y["choices"][0]["text"], f"cached={x['usage'].get('prompt_tokens_details')} timings={x.get('timings')}")
W = open(f"{D}/wiki20k.txt").read()[:3000]
def score(port, **kw):
    return post(port, "/v1/completions", dict(prompt=W, max_tokens=0, echo=True, logprobs=3, **kw))
g1 = score(8081); g2 = score(8081); cs = score(8082)
def lps(r): return r["choices"][0]["logprobs"]["token_logprobs"]
l1, l2, lc = lps(g1), lps(g2), lps(cs)
check("echo twice on gpu: identical entries (second from the cache)", l1 == l2, f"n={len(l1)} cached={g2['usage'].get('prompt_tokens_details')}")
d = max(abs(p - q) for p, q in zip(l1[1:], lc[1:]))
nll_g = -sum(l1[1:]) / (len(l1) - 1); nll_c = -sum(lc[1:]) / (len(lc) - 1)
check("gpu echo log-probs near cpu (f16 weights vs f32)", len(l1) == len(lc) and d < 0.1, f"max|diff|={d:.4g} mean nll gpu {nll_g:.5f} cpu {nll_c:.5f}")
t = post(8081, "/tokenize", {"content": P}); dt = post(8081, "/detokenize", {"tokens": t.get("tokens", [])})
check("tokenize/detokenize round trip", dt.get("content") == P, f"{t} {dt}")
ch = post(8081, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2})
check("chat with logprobs", "choices" in ch and len(ch["choices"][0]["logprobs"]["content"]) > 0, json.dumps(ch)[:300])
st = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:8081/v1/completions", json.dumps({"prompt": P, "max_tokens": 8, "stream": True, "temperature": 0}).encode(), {"Content-Type": "application/json"}), timeout=60).read().decode()
check("stream ends with [DONE]", st.strip().endswith("[DONE]"), st[:200].replace("\n", " | "))
def stream_lp(port, body):
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(dict(body, stream=True)).encode(), {"Content-Type": "application/json"})
    ev = [l[6:] for l in urllib.request.urlopen(r, timeout=60).read().decode().splitlines() if l.startswith("data: ")]
    chunks = [json.loads(e) for e in ev[:-1]]
    return sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks if c["choices"][0].get("logprobs")), [])
body = {"prompt": P, "max_tokens": 12, "temperature": 0, "logprobs": 2, "cache_prompt": False}
whole = post(8081, "/v1/completions", body)["choices"][0]["logprobs"]["tokens"]
check("stream with logprobs: the same tokens as the whole answer", stream_lp(8081, body) == whole, str(whole))
pen = {"prompt": P, "max_tokens": 16, "temperature": 0, "repeat_penalty": 1.3, "presence_penalty": 0.4, "cache_prompt": False}
pg, pc = post(8081, "/v1/completions", pen), post(8082, "/v1/completions", pen)
check("penalized greedy: gpu text equals cpu", pg["choices"][0]["text"] == pc["choices"][0]["text"], repr(pg["choices"][0]["text"]))
mp = {"prompt": P, "max_tokens": 16, "temperature": 0.8, "min_p": 0.2, "seed": 3, "cache_prompt": False}
mg, mc = post(8081, "/v1/completions", mp), post(8082, "/v1/completions", mp)
check("seeded min-p sampling: gpu text equals cpu (device sampler)", mg["choices"][0]["text"] == mc["choices"][0]["text"], repr(mg["choices"][0]["text"]) + " / " + repr(mc["choices"][0]["text"]))
nat = {"prompt": P, "n_predict": 12, "temperature": 0, "n_probs": 2, "return_tokens": True, "cache_prompt": False}
ng, nc = post(8081, "/completion", nat), post(8082, "/completion", nat)
check("llama.cpp /completion: gpu content and tokens equal cpu", ng.get("content") == nc.get("content") and ng.get("tokens") == nc.get("tokens") and len(ng.get("completion_probabilities", [])) == 12, repr(ng.get("content")))
ban = dict(nat, logit_bias=[[ng["tokens"][0], False]])
bg, bc = post(8081, "/completion", ban), post(8082, "/completion", ban)
check("logit_bias ban: gpu equals cpu and avoids the greedy token", bg.get("content") == bc.get("content") and bg.get("tokens", [None])[0] != ng["tokens"][0], repr(bg.get("content")))
js = {"prompt": "A JSON object describing Paris:", "max_tokens": 60, "temperature": 0, "response_format": {"type": "json_object"}, "cache_prompt": False}
jg, jc = post(8081, "/v1/completions", js), post(8082, "/v1/completions", js)
check("json mode (host sampling): gpu text equals cpu", jg["choices"][0]["text"] == jc["choices"][0]["text"], repr(jg["choices"][0]["text"][:80]))
inf = {"prompt": P, "n_predict": 16, "seed": 4, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": False}
ig, ic = post(8081, "/completion", inf), post(8082, "/completion", inf)
check("infill sampler stage (host sampling): gpu text equals cpu", ig.get("content") == ic.get("content"), repr(ig.get("content")))
gr = {"prompt": "Is Paris in France? Answer:", "n_predict": 24, "temperature": 0, "cache_prompt": False,
      "grammar": 'root ::= ("Yes" | "No") ", because " [a-z ]{1,20} "."'}
gg, gc = post(8081, "/completion", gr), post(8082, "/completion", gr)
check("grammar (host sampling): gpu content equals cpu and follows it", gg.get("content") == gc.get("content") and gg.get("stop_type") == "eos", repr(gg.get("content")))
sch = {"messages": [{"role": "user", "content": "A person as JSON."}], "max_tokens": 60, "temperature": 0, "cache_prompt": False,
       "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object",
           "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}, "required": ["name", "age"]}}}}
sg, sc = post(8081, "/v1/chat/completions", sch), post(8082, "/v1/chat/completions", sch)
check("json schema: gpu text equals cpu", sg["choices"][0]["message"]["content"] == sc["choices"][0]["message"]["content"], repr(sg["choices"][0]["message"]["content"]))
tl = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 160, "temperature": 0, "cache_prompt": False, "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}
tg, tc = post(8081, "/v1/chat/completions", tl), post(8082, "/v1/chat/completions", tl)
def calls(r):
    m = r["choices"][0]["message"]
    return r["choices"][0]["finish_reason"], m.get("content"), [c["function"] for c in m.get("tool_calls") or []]
check("required tool call: gpu answer equals cpu", calls(tg) == calls(tc), repr(calls(tg)))
em = {"input": [P, W[:2000]]}
eg, ec = post(8081, "/v1/embeddings", em), post(8082, "/v1/embeddings", em)
ed = [sum((a - b) ** 2 for a, b in zip(x["embedding"], y["embedding"])) ** 0.5 for x, y in zip(eg.get("data", []), ec.get("data", []))]
check("embeddings (GEMV and GEMM chunks): gpu near cpu (f16 weights vs f32)", len(ed) == 2 and max(ed) < 0.05, f"distances {ed} tokens {eg.get('usage')}")
gpu.terminate()
g2 = start(8083, ["--device", "cuda:0", "--gpu-dtype", "f16", "--slots", "2"])
QA, QB = "The capital of France is", "Once upon a time, in a small village,"
ra = comp(8083, prompt=QA); rb = comp(8083, prompt=QB)
QA2 = QA + ra["choices"][0]["text"] + " And"
rc = comp(8083, prompt=QA2)
ca, cb, cc = comp(8082, prompt=QA), comp(8082, prompt=QB), comp(8082, prompt=QA2, cache_prompt=False)
same = [x["choices"][0]["text"] == y["choices"][0]["text"] for x, y in ((ra, ca), (rb, cb), (rc, cc))]
kept = rc["usage"].get("prompt_tokens_details", {}).get("cached_tokens")
check("two GPU slots: texts equal cpu, the first conversation's cache kept across the second", all(same) and (kept or 0) >= ra["usage"]["prompt_tokens"], f"same={same} cached={kept}")
# Requests on the two slots at once (the engine interleaves them a token each): a short request
# sent once a long streamed one has started finishes first, and both answers are those of each
# run alone. (The 4-layer model decodes thousands of tokens a second on a GPU: the long request
# takes most of the context.)
import threading
long_kw = dict(prompt=QB, max_tokens=1000, ignore_eos=True, temperature=0, cache_prompt=False)
started, res = threading.Event(), {}
def run_long():
    r = urllib.request.Request("http://127.0.0.1:8083/v1/completions", json.dumps(dict(long_kw, stream=True)).encode(), {"Content-Type": "application/json"})
    text = ""
    for line in urllib.request.urlopen(r, timeout=120):
        line = line.decode().strip()
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0]["text"]; started.set()
    res["long"] = (text, time.time())
th = threading.Thread(target=run_long); th.start()
started.wait(60)
sl = json.load(urllib.request.urlopen("http://127.0.0.1:8083/slots", timeout=10))
res["short"] = (comp(8083, prompt=QA, max_tokens=8, cache_prompt=False)["choices"][0]["text"], time.time())
th.join()
alone_long = post(8083, "/v1/completions", long_kw)["choices"][0]["text"]
alone_short = comp(8083, prompt=QA, max_tokens=8, cache_prompt=False)["choices"][0]["text"]
first = res["short"][1] < res["long"][1]
same = (res["long"][0] == alone_long, res["short"][0] == alone_short)
check("two GPU slots at once: the short request ends first, both answers as run alone", first and all(same),
      f"short ended {res['long'][1] - res['short'][1]:.3f} s before the long; same={same}; /slots during: {[s.get('is_processing') for s in sl]}")
g2.terminate(); cpu.terminate()
print("ALL PASS" if ok else "SOME FAILED")
