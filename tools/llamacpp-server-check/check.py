#!/usr/bin/env python3
"""Checks `teal serve` against what llama.cpp's own server tests (tools/server/tests/unit in
ggml-org/llama.cpp) assert about its native endpoints: /completion, /infill, /tokenize,
/detokenize, /apply-template, /embeddings, /props, /health, /slots and /metrics.

The requests are those of llama.cpp's tests; the assertions are about the answers' shapes and
semantics (field names and types, stop types, token counts, probabilities, streaming events,
error bodies). Checks on the text of llama.cpp's test models (stories260K) do not transfer and
are replaced by semantic ones (greedy answers repeat, `n_predict: 4` gives 4 tokens, ...).

Standard library only. Starts and stops the servers itself; exits 1 on any failure.

    python3 tools/llamacpp-server-check/check.py --teal target/release/teal \
        --model ~/.cache/teal/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --infill-model ~/.cache/teal/models/Qwen2.5-Coder-0.5B-Instruct.gguf
"""

import argparse
import base64
import http.client
import json
import os
import re
import struct
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from teal_serve import TealServer  # noqa: E402

N_CTX = 1024
N_SLOTS = 2
PROMPT = "I believe the meaning of life is"


class Server(TealServer):
    """A `teal serve` process on a free port, with the requests the checks make."""

    def __init__(self, binary, model, extra=()):
        super().__init__(binary, model, N_CTX, extra)

    def request(self, method, path, data=None, timeout=600, raw=None):
        """Status and body (JSON where it parses, else text)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        body = raw if raw is not None else (None if data is None else json.dumps(data))
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        text = res.read().decode("utf-8")
        conn.close()
        try:
            return res.status, json.loads(text)
        except ValueError:
            return res.status, text

    def stream(self, path, data, timeout=600):
        """Status and the JSON payloads of the `data:` lines of a server-sent event stream."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.request("POST", path, body=json.dumps(data),
                     headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        events = []
        for line in res:
            line = line.decode("utf-8").rstrip("\r\n")
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        conn.close()
        return res.status, events


class Checks:
    def __init__(self):
        self.failures = []
        self.passed = 0
        self.section = ""

    def ok(self, cond, what):
        if cond:
            self.passed += 1
        else:
            self.failures.append(f"[{self.section}] {what}")
            print(f"  FAIL {what}")
        return cond

    def run(self, name, fn, *args):
        self.section = name
        print(f"- {name}")
        before = len(self.failures)
        try:
            fn(self, *args)
        except Exception as e:  # a crash in one check must not hide the others
            self.failures.append(f"[{name}] exception: {e!r}")
            print(f"  FAIL exception: {e!r}")
            traceback.print_exc()
        if len(self.failures) == before:
            print("  ok")


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def error_shape(c, status, body, want_status, what):
    """llama.cpp's error answer: the status, and {"error": {"code", "message", "type"}}."""
    c.ok(status == want_status, f"{what}: status {status}, want {want_status} ({body})")
    err = body.get("error") if isinstance(body, dict) else None
    if c.ok(isinstance(err, dict), f"{what}: no error object in {body!r}"):
        c.ok(err.get("code") == status, f"{what}: error.code {err.get('code')} != {status}")
        c.ok(isinstance(err.get("message"), str) and err["message"],
             f"{what}: error.message missing")
        c.ok(isinstance(err.get("type"), str), f"{what}: error.type missing")


# --- test_basic.py -----------------------------------------------------------------------

def check_health(c, s):
    status, body = s.request("GET", "/health")
    c.ok(status == 200, f"/health status {status}")
    c.ok(body == {"status": "ok"}, f"/health body {body}")


def check_props(c, s, model):
    status, body = s.request("GET", "/props")
    c.ok(status == 200, f"/props status {status}")
    c.ok(".gguf" in str(body.get("model_path")), f"model_path {body.get('model_path')!r} has no .gguf")
    c.ok(body.get("total_slots") == N_SLOTS, f"total_slots {body.get('total_slots')} != {N_SLOTS}")
    d = body.get("default_generation_settings", {})
    # llama.cpp: the context per slot (its slots share one context; teal's have one each).
    c.ok(d.get("n_ctx") in (N_CTX, N_CTX // N_SLOTS), f"default_generation_settings.n_ctx {d.get('n_ctx')}")
    params = d.get("params", {})
    for k in ("n_predict", "seed", "temperature", "top_k", "top_p", "min_p", "repeat_last_n",
              "repeat_penalty", "presence_penalty", "frequency_penalty", "stop", "n_probs",
              "samplers", "ignore_eos"):
        c.ok(k in params, f"default_generation_settings.params.{k} missing")
    c.ok(isinstance(body.get("chat_template"), str), "chat_template not a string")
    c.ok(isinstance(body.get("build_info"), str), "build_info not a string")
    c.ok(isinstance(body.get("modalities"), dict), "modalities not an object")


def check_models(c, s):
    status, body = s.request("GET", "/models")
    c.ok(status == 200, f"/models status {status}")
    c.ok(len(body.get("data", [])) == 1 and "id" in body["data"][0], f"/models data {body}")


def check_slots(c, s):
    status, body = s.request("GET", "/slots")
    c.ok(status == 200, f"/slots status {status}")
    c.ok(isinstance(body, list) and len(body) == N_SLOTS, f"/slots: {body}")
    for slot in body:
        c.ok(is_int(slot.get("id")), f"slot id {slot}")
        c.ok(slot.get("n_ctx") in (N_CTX, N_CTX // N_SLOTS), f"slot n_ctx {slot.get('n_ctx')}")
        c.ok(slot.get("is_processing") is False, f"idle slot is_processing {slot.get('is_processing')}")


def check_errors(c, s):
    status, body = s.request("GET", "/no-such-endpoint")
    error_shape(c, status, body, 404, "unknown endpoint")
    status, body = s.request("POST", "/completion", raw="{not json")
    error_shape(c, status, body, 400, "malformed JSON")
    status, body = s.request("POST", "/completion", {"n_predict": 4})
    error_shape(c, status, body, 400, "no prompt")
    status, body = s.request("POST", "/completion", {"prompt": "x", "n_predict": "four"})
    error_shape(c, status, body, 400, "n_predict of the wrong type")
    # test_nocache_long_input_prompt: a prompt longer than the context is refused.
    status, body = s.request("POST", "/completion", {
        "prompt": PROMPT * 200, "seed": 42, "temperature": 1.0, "cache_prompt": False})
    error_shape(c, status, body, 400, "prompt longer than the context")


# --- test_completion.py ------------------------------------------------------------------

def completion_fields(c, body, what):
    for k, t in (("content", str), ("tokens", list), ("stop", bool), ("stop_type", str),
                 ("stopping_word", str), ("tokens_predicted", int), ("tokens_evaluated", int),
                 ("tokens_cached", int), ("truncated", bool), ("has_new_line", bool),
                 ("generation_settings", dict), ("timings", dict), ("prompt", str),
                 ("model", str), ("id_slot", int), ("index", int)):
        c.ok(isinstance(body.get(k), t) and (t is not int or is_int(body.get(k))),
             f"{what}: {k} = {body.get(k)!r}, want {t.__name__}")
    for k in ("prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
              "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
              "cache_n"):
        c.ok(is_num(body.get("timings", {}).get(k)), f"{what}: timings.{k} missing")


def check_completion(c, s):
    for n_predict, return_tokens in ((8, False), (32, True)):
        req = {"n_predict": n_predict, "prompt": PROMPT, "return_tokens": return_tokens,
               "ignore_eos": True}
        status, body = s.request("POST", "/completion", req)
        what = f"/completion n_predict={n_predict} return_tokens={return_tokens}"
        if not c.ok(status == 200, f"{what}: status {status} {body}"):
            continue
        completion_fields(c, body, what)
        t = body["timings"]
        c.ok(t["predicted_n"] == n_predict, f"{what}: timings.predicted_n {t['predicted_n']}")
        c.ok(body["tokens_predicted"] == n_predict, f"{what}: tokens_predicted {body['tokens_predicted']}")
        c.ok(body["truncated"] is False, f"{what}: truncated {body['truncated']}")
        c.ok(body["stop"] is True, f"{what}: stop {body['stop']}")
        c.ok(body["stop_type"] == "limit", f"{what}: stop_type {body['stop_type']}")
        c.ok(body["generation_settings"].get("n_predict") == n_predict,
             f"{what}: generation_settings.n_predict {body['generation_settings'].get('n_predict')}")
        c.ok(t["prompt_n"] + t["cache_n"] == body["tokens_evaluated"],
             f"{what}: prompt_n {t['prompt_n']} + cache_n {t['cache_n']} != tokens_evaluated {body['tokens_evaluated']}")
        if return_tokens:
            c.ok(len(body["tokens"]) == n_predict and all(is_int(x) for x in body["tokens"]),
                 f"{what}: tokens {body['tokens']}")
            status, d = s.request("POST", "/detokenize", {"tokens": body["tokens"]})
            c.ok(d.get("content") == body["content"], f"{what}: detokenized tokens != content")
        else:
            c.ok(body["tokens"] == [], f"{what}: tokens {body['tokens']} without return_tokens")
    # /completions is the same endpoint.
    status, body = s.request("POST", "/completions", {"prompt": PROMPT, "n_predict": 4})
    c.ok(status == 200 and isinstance(body.get("content"), str), f"/completions: {status} {body}")


def check_completion_stream(c, s):
    req = {"n_predict": 8, "prompt": PROMPT, "stream": True, "seed": 42, "ignore_eos": True}
    status, events = s.stream("/completion", req)
    c.ok(status == 200, f"stream status {status}")
    c.ok(events and "[DONE]" not in events, "/completion stream ends without [DONE] (llama.cpp's)")
    content = ""
    for data in events:
        c.ok(isinstance(data.get("stop"), bool), f"event without bool stop: {data}")
        if data.get("stop"):
            continue
        c.ok(len(data.get("tokens", [])) > 0 and all(is_int(t) for t in data["tokens"]),
             f"piece without tokens: {data}")
        content += data.get("content", "")
    last = events[-1]
    c.ok(last.get("stop") is True, f"last event stop {last.get('stop')}")
    c.ok(sum(1 for e in events if e.get("stop")) == 1, "more than one event with stop: true")
    c.ok(last.get("timings", {}).get("predicted_n") == 8, f"last timings {last.get('timings')}")
    c.ok(is_int(last.get("timings", {}).get("prompt_n")), "last timings.prompt_n")
    c.ok(last.get("truncated") is False, f"truncated {last.get('truncated')}")
    c.ok(last.get("stop_type") == "limit", f"stop_type {last.get('stop_type')}")
    c.ok(isinstance(last.get("has_new_line"), bool), "has_new_line")
    gs = last.get("generation_settings", {})
    c.ok(gs.get("n_predict") == 8, f"generation_settings.n_predict {gs.get('n_predict')}")
    c.ok(gs.get("seed") == 42, f"generation_settings.seed {gs.get('seed')}")
    c.ok(last.get("tokens_predicted") == 8, f"tokens_predicted {last.get('tokens_predicted')}")

    # test_completion_stream_vs_non_stream (greedy, so that both sample the same).
    req = {"n_predict": 8, "prompt": PROMPT, "temperature": 0.0}
    _, events = s.stream("/completion", dict(req, stream=True))
    streamed = "".join(e.get("content", "") for e in events)
    _, whole = s.request("POST", "/completion", req)
    c.ok(streamed == whole.get("content"), f"streamed {streamed!r} != whole {whole.get('content')!r}")


def check_seed(c, s):
    # test_consistent_result_same_seed
    last = None
    for _ in range(3):
        _, body = s.request("POST", "/completion", {
            "prompt": PROMPT, "seed": 42, "temperature": 0.0, "cache_prompt": False,
            "n_predict": 16})
        if last is not None:
            c.ok(body.get("content") == last, "same seed, temperature 0: different text")
        last = body.get("content")
    # The same seed at temperature 1 samples the same text too.
    texts = set()
    for _ in range(2):
        _, body = s.request("POST", "/completion", {
            "prompt": PROMPT, "seed": 7, "temperature": 1.0, "cache_prompt": False,
            "n_predict": 16, "ignore_eos": True})
        texts.add(body.get("content"))
    c.ok(len(texts) == 1, f"same seed, temperature 1: different texts {texts}")
    # test_different_result_different_seed
    last = None
    for seed in range(4):
        _, body = s.request("POST", "/completion", {
            "prompt": PROMPT, "seed": seed, "temperature": 1.0, "cache_prompt": False,
            "n_predict": 16, "ignore_eos": True})
        if last is not None:
            c.ok(body.get("content") != last, f"seeds {seed - 1} and {seed}: same text {last!r}")
        last = body.get("content")


def check_n_predict(c, s):
    status, body = s.request("POST", "/completion", {"prompt": PROMPT, "n_predict": 4, "ignore_eos": True})
    c.ok(body.get("tokens_predicted") == 4, f"n_predict 4: tokens_predicted {body.get('tokens_predicted')}")
    # 0: the prompt runs, nothing is generated.
    status, body = s.request("POST", "/completion", {"prompt": PROMPT, "n_predict": 0})
    c.ok(status == 200 and body.get("content") == "" and body.get("tokens_predicted") == 0,
         f"n_predict 0: {status} {body.get('content')!r} {body.get('tokens_predicted')}")
    # -1: no limit; greedy on a chat prompt the model ends its answer (eos).
    _, t = s.request("POST", "/apply-template", {"messages": [{"role": "user", "content": "Say hi."}]})
    status, body = s.request("POST", "/completion", {"prompt": t.get("prompt"), "n_predict": -1,
                                                     "temperature": 0.0})
    c.ok(status == 200, f"n_predict -1: {status} {body}")
    c.ok(body.get("stop_type") == "eos", f"n_predict -1 on a chat prompt: stop_type {body.get('stop_type')}")
    c.ok(body.get("generation_settings", {}).get("n_predict") == -1,
         f"n_predict -1: generation_settings.n_predict {body.get('generation_settings', {}).get('n_predict')}")


def check_stop_words(c, s):
    base = {"prompt": PROMPT, "n_predict": 24, "temperature": 0.0, "return_tokens": True}
    _, whole = s.request("POST", "/completion", base)
    text = whole.get("content", "")
    words = re.findall(r"[A-Za-z]{3,}", text)
    if not c.ok(words, f"no word to stop at in {text!r}"):
        return
    word = words[len(words) // 2]
    _, body = s.request("POST", "/completion", dict(base, stop=["zzzz", word]))
    c.ok(body.get("stop_type") == "word", f"stop word: stop_type {body.get('stop_type')}")
    c.ok(body.get("stopping_word") == word, f"stopping_word {body.get('stopping_word')!r} != {word!r}")
    c.ok(body.get("content") == text[:text.find(word)],
         f"stop word: content {body.get('content')!r}, want the text before {word!r}")
    _, events = s.stream("/completion", dict(base, stop=[word], stream=True))
    streamed = "".join(e.get("content", "") for e in events)
    c.ok(streamed == text[:text.find(word)], f"streamed stop word: {streamed!r}")
    c.ok(events[-1].get("stop_type") == "word" and events[-1].get("stopping_word") == word,
         f"streamed stop word: last event {events[-1]}")


def check_tokens_input(c, s):
    # test_completion_with_tokens_input
    status, res = s.request("POST", "/tokenize", {"content": PROMPT, "add_special": True})
    c.ok(status == 200, f"/tokenize {status}")
    tokens = res["tokens"]
    base = {"temperature": 0.0, "n_predict": 8}
    status, body = s.request("POST", "/completion", dict(base, prompt=tokens))
    c.ok(status == 200 and isinstance(body.get("content"), str), f"token prompt: {status} {body}")
    status, body = s.request("POST", "/completion", dict(base, prompt=[tokens, tokens]))
    c.ok(status == 200 and isinstance(body, list) and len(body) == 2, f"two token prompts: {status} {body}")
    if isinstance(body, list) and len(body) == 2:
        c.ok(body[0]["content"] == body[1]["content"], "two same token prompts: different text")
        c.ok([b.get("index") for b in body] == [0, 1], f"indices {[b.get('index') for b in body]}")
    status, body = s.request("POST", "/completion", dict(base, prompt=[tokens, PROMPT]))
    c.ok(status == 200 and isinstance(body, list) and len(body) == 2, f"tokens and text: {status} {body}")
    if isinstance(body, list) and len(body) == 2:
        c.ok(body[0]["content"] == body[1]["content"], "tokens vs text of the same prompt: different text")
    # Mixed token ids and text in one prompt.
    status, body = s.request("POST", "/completion",
                             dict(base, prompt=[1, 2, 3, 4, 5, 6, PROMPT, 7, 8, 9, 10, PROMPT]))
    c.ok(status == 200 and isinstance(body, dict) and isinstance(body.get("content"), str),
         f"mixed ids and text in one prompt: {status} {body}")
    # The mixed prompt is the ids with the texts' tokens in their places.
    _, t = s.request("POST", "/tokenize", {"content": "Hello world"})
    mixed = [tokens[-1], "Hello world", tokens[-1]]
    flat = [tokens[-1]] + t.get("tokens", []) + [tokens[-1]]
    _, a = s.request("POST", "/completion", dict(base, prompt=mixed))
    _, b = s.request("POST", "/completion", dict(base, prompt=flat))
    c.ok(isinstance(a, dict) and a.get("content") == b.get("content")
         and a.get("tokens_evaluated") == len(flat),
         f"mixed prompt != its tokens: {a} vs {b}")
    # n_cmpl: several completions of one prompt, as a list.
    status, body = s.request("POST", "/completion", dict(base, prompt=PROMPT, n_cmpl=2))
    c.ok(status == 200 and isinstance(body, list) and len(body) == 2, f"n_cmpl 2: {status} {body}")


def check_response_fields(c, s):
    # test_completion_response_fields
    fields = ["content", "generation_settings/n_predict", "prompt"]
    status, body = s.request("POST", "/completion", {
        "n_predict": 8, "prompt": PROMPT, "response_fields": fields})
    c.ok(status == 200, f"status {status}")
    c.ok(body.get("generation_settings/n_predict") == 8,
         f"response_fields: 'generation_settings/n_predict' missing: {body}")
    c.ok(isinstance(body.get("content"), str), "response_fields: content")
    c.ok(PROMPT in str(body.get("prompt")), f"response_fields: prompt {body.get('prompt')!r}")
    c.ok(len(body) == len(fields), f"response_fields: {sorted(body)} != {sorted(fields)}")
    status, body = s.request("POST", "/completion", {"n_predict": 8, "prompt": PROMPT, "response_fields": []})
    c.ok("content" in body and "generation_settings" in body, f"response_fields []: all fields ({sorted(body)})")


def prob_entry(c, tok, what, post):
    c.ok(is_int(tok.get("id")) and tok["id"] >= 0, f"{what}: id {tok.get('id')}")
    c.ok(isinstance(tok.get("token"), str), f"{what}: token {tok.get('token')!r}")
    c.ok(isinstance(tok.get("bytes"), list), f"{what}: bytes {tok.get('bytes')!r}")
    if post:
        c.ok(is_num(tok.get("prob")) and 0.0 <= tok["prob"] <= 1.0, f"{what}: prob {tok.get('prob')}")
    else:
        c.ok(is_num(tok.get("logprob")) and tok["logprob"] <= 0.0, f"{what}: logprob {tok.get('logprob')}")


def check_n_probs(c, s):
    req = {"prompt": PROMPT, "n_probs": 10, "temperature": 0.0, "n_predict": 5, "ignore_eos": True}
    status, body = s.request("POST", "/completion", req)
    probs = body.get("completion_probabilities")
    c.ok(isinstance(probs, list) and len(probs) == 5, f"completion_probabilities {probs}")
    for tok in probs or []:
        prob_entry(c, tok, "n_probs", False)
        c.ok(len(tok.get("top_logprobs", [])) == 10, f"top_logprobs {len(tok.get('top_logprobs', []))}")
        for p in tok.get("top_logprobs", []):
            prob_entry(c, p, "top_logprobs", False)
        # Greedy: the chosen token is the most likely.
        c.ok(tok["top_logprobs"][0]["id"] == tok["id"], "greedy token is not the most likely")
    # test_n_probs_stream: one entry per event.
    _, events = s.stream("/completion", dict(req, stream=True))
    for data in events:
        if data.get("stop") is False:
            cp = data.get("completion_probabilities")
            c.ok(isinstance(cp, list) and len(cp) == 1, f"streamed completion_probabilities {cp}")
            for tok in cp or []:
                prob_entry(c, tok, "streamed n_probs", False)
                c.ok(len(tok.get("top_logprobs", [])) == 10, "streamed top_logprobs")
    # test_n_probs_post_sampling
    status, body = s.request("POST", "/completion", dict(req, post_sampling_probs=True))
    if status == 400:
        print("  note: post_sampling_probs refused (400): teal does not implement it (documented)")
        error_shape(c, status, body, 400, "post_sampling_probs")
        return
    probs = body.get("completion_probabilities", [])
    c.ok(len(probs) == 5, "post_sampling_probs: 5 entries")
    for tok in probs:
        prob_entry(c, tok, "post_sampling_probs", True)
        for p in tok.get("top_probs", []):
            prob_entry(c, p, "top_probs", True)


def check_logit_bias(c, s):
    # test_logit_bias: the four ways to ban words.
    exclude = ["i", "I", "the", "The", "to", "a", "an", "be", "is", "was", "but", "But", "and",
               "And", "so", "So", "you", "You", "he", "He", "she", "She", "we", "We", "they",
               "They", "it", "It", "his", "His", "her", "Her", "book", "Book"]
    _, res = s.request("POST", "/tokenize", {"content": " " + " ".join(exclude) + " "})
    for tokenize in (False, True):
        for openai_style in (False, True):
            if tokenize:
                bias = [[tok, -100] for tok in res["tokens"]]
            else:
                bias = [[" " + tok + " ", -100] for tok in exclude]
            if openai_style:
                bias = {str(el[0]): -100 for el in bias}
            status, body = s.request("POST", "/completion", {
                "n_predict": 64, "prompt": "What is the best book", "logit_bias": bias,
                "temperature": 0.0})
            what = f"logit_bias tokenize={tokenize} openai_style={openai_style}"
            if c.ok(status == 200, f"{what}: {status} {body}"):
                out = body["content"]
                c.ok(all(out.find(" " + tok + " ") == -1 for tok in exclude), f"{what}: banned word in {out!r}")
    # false bans a token.
    status, body = s.request("POST", "/completion", {
        "n_predict": 1, "prompt": PROMPT, "temperature": 0.0, "return_tokens": True})
    first = body["tokens"][0]
    status, body = s.request("POST", "/completion", {
        "n_predict": 1, "prompt": PROMPT, "temperature": 0.0, "return_tokens": True,
        "logit_bias": [[first, False]]})
    c.ok(status == 200 and body["tokens"][0] != first, f"logit_bias false: {status} {body.get('tokens')}")


def check_cache_prompt(c, s):
    # test_prompt_cache_metrics (first half) and tokens_cached.
    req = {"prompt": PROMPT + " to be happy and", "temperature": 0.0, "top_k": 1, "n_predict": 8,
           "cache_prompt": True, "id_slot": 0}
    s.request("POST", "/completion", req)
    _, body = s.request("POST", "/completion", req)
    c.ok(body.get("timings", {}).get("cache_n", 0) > 0, f"cache_prompt: timings.cache_n {body.get('timings')}")
    c.ok(body.get("tokens_cached", 0) > 0, f"cache_prompt: tokens_cached {body.get('tokens_cached')}")
    c.ok(body.get("id_slot") == 0, f"id_slot {body.get('id_slot')}")
    _, nocache = s.request("POST", "/completion", dict(req, cache_prompt=False))
    c.ok(nocache.get("timings", {}).get("cache_n") == 0, f"cache_prompt false: cache_n {nocache.get('timings')}")
    c.ok(nocache.get("content") == body.get("content"), "cached and uncached greedy text differ")


def check_metrics(c, s):
    status, text = s.request("GET", "/metrics")
    c.ok(status == 200 and isinstance(text, str), f"/metrics {status}")
    for name in ("prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total",
                 "tokens_predicted_seconds_total", "prompt_tokens_seconds",
                 "predicted_tokens_seconds", "requests_processing", "requests_deferred"):
        c.ok(re.search(rf"^llamacpp:{name} ", text, re.M), f"/metrics: llamacpp:{name} missing")
    c.ok(re.search(r"llamacpp:prompt_tokens_cache_total\s+[1-9]", text),
         "/metrics: llamacpp:prompt_tokens_cache_total missing or 0 after cached prompts")
    c.ok("llamacpp:prompt_cache_hit_ratio" in text, "/metrics: llamacpp:prompt_cache_hit_ratio missing")


def check_parallel_slots(c, s):
    # test_completion_parallel_slots: both slots busy at once; test_cancel_request after.
    results = {}

    def go(i):
        results[i] = s.request("POST", "/completion", {
            "prompt": ["Write a very long book.", "Write another a poem."][i], "seed": 42,
            "temperature": 1.0, "n_predict": 64, "ignore_eos": True, "cache_prompt": False})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    _, slots = s.request("GET", "/slots")
    busy = sum(1 for sl in slots if sl.get("is_processing"))
    c.ok(busy == N_SLOTS, f"two requests, {busy} busy slot(s): {slots}")
    for t in threads:
        t.join()
    for i in range(2):
        status, body = results[i]
        c.ok(status == 200 and len(body.get("content", "")) > 10, f"parallel request {i}: {status}")
    # test_cancel_request: a client that goes frees its slot.
    try:
        s.request("POST", "/completion", {"prompt": PROMPT, "n_predict": -1, "ignore_eos": True},
                  timeout=0.5)
    except (TimeoutError, OSError):
        pass
    time.sleep(1.5)
    _, slots = s.request("GET", "/slots")
    c.ok(all(sl.get("is_processing") is False for sl in slots), f"after a cancelled request: {slots}")


# --- test_tokenize.py, test_template.py ---------------------------------------------------

def check_tokenize(c, s):
    content = "What is the capital of France ?"
    status, tok = s.request("POST", "/tokenize", {"content": content})
    c.ok(status == 200 and len(tok.get("tokens", [])) > 5, f"/tokenize {status} {tok}")
    status, detok = s.request("POST", "/detokenize", {"tokens": tok["tokens"]})
    c.ok(status == 200 and detok.get("content", "").strip() == content, f"/detokenize {detok}")
    # add_special: BOS first where the model adds one.
    _, info = s.request("POST", "/tokenize", {"content": content, "add_special": True})
    _, props = s.request("GET", "/props")
    _, plain = s.request("POST", "/tokenize", {"content": content, "add_special": False})
    bos = props.get("bos_token")
    if bos:
        _, bos_ids = s.request("POST", "/tokenize", {"content": bos})
        adds = info["tokens"][: len(info["tokens"]) - len(plain["tokens"])]
        c.ok(adds in ([], bos_ids["tokens"]), f"add_special added {adds}")
    # with_pieces
    content = "This is a test string with unicode 媽 and emoji 🤗"
    status, res = s.request("POST", "/tokenize", {"content": content, "with_pieces": True})
    c.ok(status == 200, f"with_pieces {status}")
    for token in res.get("tokens", []):
        c.ok(isinstance(token, dict) and is_int(token.get("id")) and "piece" in token
             and len(token["piece"]) > 0, f"with_pieces entry {token}")
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                      for p in res.get("tokens", []))
    c.ok(joined.decode("utf-8", "replace") == content, f"pieces join to {joined!r}")
    # parse_special (default true): a special token's text is that token.
    if bos:
        _, res = s.request("POST", "/tokenize", {"content": bos})
        c.ok(len(res["tokens"]) == 1, f"special token text {bos!r} -> {res['tokens']}")
        _, res = s.request("POST", "/tokenize", {"content": bos, "parse_special": False})
        c.ok(len(res.get("tokens", [])) > 1, f"parse_special false: {bos!r} -> {res.get('tokens')}")


def check_apply_template(c, s):
    msgs = [{"role": "user", "content": "What is today?"}]
    status, body = s.request("POST", "/apply-template", {"messages": msgs})
    c.ok(status == 200 and "What is today?" in body.get("prompt", ""), f"/apply-template {status} {body}")
    with_gen = body.get("prompt", "")
    status, body = s.request("POST", "/apply-template", {"messages": msgs, "add_generation_prompt": False})
    without = body.get("prompt", "")
    c.ok(status == 200 and len(without) < len(with_gen) and with_gen.startswith(without),
         f"add_generation_prompt false: {without!r} vs {with_gen!r}")


# --- test_embedding.py --------------------------------------------------------------------

def check_embeddings(c, s):
    def norm(v):
        return sum(x * x for x in v)

    status, body = s.request("POST", "/v1/embeddings", {"input": PROMPT})
    c.ok(status == 200 and len(body.get("data", [])) == 1, f"/v1/embeddings {status}")
    vec0 = body["data"][0]["embedding"]
    c.ok(len(vec0) > 1 and abs(norm(vec0) - 1) < 1e-3, "single embedding: not unit length")
    c.ok(body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0, f"usage {body.get('usage')}")
    n_tokens = body["usage"]["prompt_tokens"]
    _, tok = s.request("POST", "/tokenize", {"content": PROMPT, "add_special": True})
    c.ok(n_tokens == len(tok["tokens"]), f"usage.prompt_tokens {n_tokens} != {len(tok['tokens'])} tokens")
    inputs = [PROMPT, "Write a joke about AI from a very long prompt which will not be truncated",
              "This is a test", "This is another test"]
    status, body = s.request("POST", "/v1/embeddings", {"input": inputs})
    c.ok(status == 200 and len(body.get("data", [])) == 4, f"four inputs {status}")
    c.ok([d.get("index") for d in body.get("data", [])] == [0, 1, 2, 3], "indices")
    # Same prompt, same result.
    status, body = s.request("POST", "/v1/embeddings", {"input": [PROMPT] * 3})
    c.ok(all(max(abs(x - y) for x, y in zip(vec0, d["embedding"])) < 1e-3 for d in body["data"]),
         "same input, different embeddings")
    c.ok(body["usage"]["prompt_tokens"] == 3 * n_tokens, f"usage of three {body['usage']}")
    # test_embedding_mixed_input
    for inp, multi in (("string", False), ([12, 34, 56], False), ([12, 34, "string", 56, 78], False),
                       (["string1", "string2"], True), (["string1", [12, 34, 56]], True),
                       ([[12, 34, 56], [12, 34, 56]], True),
                       ([[12, 34, 56], [12, "string", 34, 56]], True)):
        status, body = s.request("POST", "/v1/embeddings", {"input": inp})
        what = f"input {json.dumps(inp)}"
        if c.ok(status == 200, f"{what}: {status} {body}"):
            want = len(inp) if multi else 1
            c.ok(len(body["data"]) == want and all(len(d["embedding"]) > 1 for d in body["data"]),
                 f"{what}: {len(body['data'])} embeddings, want {want}")
    # test_embedding_invalid_input
    for inp in ([], {"content": "string"}):
        status, body = s.request("POST", "/v1/embeddings", {"input": inp})
        error_shape(c, status, body, 400, f"invalid input {json.dumps(inp)}")
    # base64
    status, body = s.request("POST", "/v1/embeddings", {"input": PROMPT, "encoding_format": "base64"})
    raw = base64.b64decode(body["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    c.ok(len(floats) == len(vec0) and max(abs(x - y) for x, y in zip(floats, vec0)) < 1e-3, "base64 != float")
    # Native /embeddings: a list of {index, embedding: [[...]]} (one pooled vector per input).
    for path in ("/embeddings", "/embedding"):
        status, body = s.request("POST", path, {"content": PROMPT})
        ok = (status == 200 and isinstance(body, list) and len(body) == 1
              and body[0].get("index") == 0 and isinstance(body[0].get("embedding"), list)
              and len(body[0]["embedding"]) == 1 and isinstance(body[0]["embedding"][0], list))
        if c.ok(ok, f"{path}: want [{{index, embedding: [[...]]}}], got {status} {str(body)[:200]}"):
            v = body[0]["embedding"][0]
            c.ok(max(abs(x - y) for x, y in zip(v, vec0)) < 1e-3, f"{path}: vector != /v1/embeddings'")
    status, body = s.request("POST", "/embeddings", {"input": ["a", "b"]})
    c.ok(status == 200 and isinstance(body, list) and [b.get("index") for b in body] == [0, 1],
         f"/embeddings two inputs: {status} {str(body)[:200]}")


# --- test_infill.py -----------------------------------------------------------------------

INFILL = {
    "input_prefix": "#include <cstdio>\n#include \"llama.h\"\n\nint main() {\n",
    "prompt": "    int n_threads = llama_",
    "input_suffix": "}\n",
    "n_predict": 16,
    "temperature": 0.0,
}


def check_infill(c, s):
    status, body = s.request("POST", "/infill", INFILL)
    if c.ok(status == 200, f"/infill {status} {body}"):
        completion_fields(c, body, "/infill")
    status, body = s.request("POST", "/infill", dict(INFILL, input_extra=[
        {"filename": "llama.h", "text": "LLAMA_API int32_t llama_n_threads();\n"}]))
    c.ok(status == 200 and isinstance(body.get("content"), str), f"/infill with input_extra {status} {body}")
    for extra in ({}, {"filename": "ok"}, {"filename": 123}, {"filename": 123, "text": "abc"},
                  {"filename": 123, "text": 456}):
        status, body = s.request("POST", "/infill", dict(INFILL, input_extra=[extra]))
        error_shape(c, status, body, 400, f"input_extra {json.dumps(extra)}")
    _, events = s.stream("/infill", dict(INFILL, stream=True))
    c.ok(events and events[-1].get("stop") is True, "/infill stream ends with stop: true")


def check_infill_without_fim(c, s):
    status, body = s.request("POST", "/infill", INFILL)
    error_shape(c, status, body, 400, "/infill on a model without FIM tokens")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teal", required=True, help="the teal binary")
    ap.add_argument("--model", required=True, help="a small chat GGUF (SmolLM2-135M-Instruct)")
    ap.add_argument("--infill-model", help="a GGUF with FIM tokens for /infill (Qwen2.5-Coder)")
    a = ap.parse_args()
    c = Checks()
    s = Server(a.teal, os.path.expanduser(a.model), ["--slots", str(N_SLOTS), "--metrics"])
    try:
        c.run("health", check_health, s)
        c.run("props", check_props, s, a.model)
        c.run("models", check_models, s)
        c.run("slots", check_slots, s)
        c.run("errors", check_errors, s)
        c.run("completion", check_completion, s)
        c.run("completion stream", check_completion_stream, s)
        c.run("seed", check_seed, s)
        c.run("n_predict", check_n_predict, s)
        c.run("stop words", check_stop_words, s)
        c.run("token prompts", check_tokens_input, s)
        c.run("response_fields", check_response_fields, s)
        c.run("n_probs", check_n_probs, s)
        c.run("logit_bias", check_logit_bias, s)
        c.run("cache_prompt", check_cache_prompt, s)
        c.run("metrics", check_metrics, s)
        c.run("parallel slots and cancel", check_parallel_slots, s)
        c.run("tokenize", check_tokenize, s)
        c.run("apply-template", check_apply_template, s)
        c.run("embeddings", check_embeddings, s)
        c.run("infill without FIM tokens", check_infill_without_fim, s)
    finally:
        s.stop()
    if a.infill_model:
        s = Server(a.teal, os.path.expanduser(a.infill_model))
        try:
            c.run("infill", check_infill, s)
        finally:
            s.stop()
    print(f"\n{c.passed} checks passed, {len(c.failures)} failed")
    for f in c.failures:
        print("  " + f)
    sys.exit(1 if c.failures else 0)


if __name__ == "__main__":
    main()
