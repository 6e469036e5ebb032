#!/usr/bin/env python3
"""Checks `teal serve` with the official OpenAI Python SDK (`openai`), used as people use it
against local servers: it starts the server on the given model(s), runs each check, prints
PASS or FAIL with the reason, stops the server and exits 1 if any check failed.

    python check.py --teal target/release/teal \
        --model ~/.cache/teal/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --tool-model ~/.cache/teal/models/Qwen2.5-Coder-0.5B-Instruct.gguf

The tool-call checks run on --tool-model (a model whose chat template takes tools); without
it they are skipped. See README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Callable, Optional

import openai
from pydantic import BaseModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from teal_serve import TealServer  # noqa: E402

API_KEY = "sk-teal-check"


class Checks:
    """Runs named checks, recording which failed."""

    def __init__(self, only: Optional[str]):
        self.only = only
        self.passed: list[str] = []
        self.failed: list[str] = []

    def run(self, name: str, fn: Callable[[], None]) -> None:
        if self.only and not re.search(self.only, name):
            return
        t = time.time()
        try:
            fn()
        except Exception as e:  # a check fails on any error, the SDK's included
            self.failed.append(name)
            print(f"FAIL {name} ({time.time() - t:.1f}s): {type(e).__name__}: {e}", flush=True)
            if os.environ.get("CHECK_TRACEBACK"):
                traceback.print_exc()
        else:
            self.passed.append(name)
            print(f"PASS {name} ({time.time() - t:.1f}s)", flush=True)


class Recorded(dict):
    """What a check records for later ones; a later check run without it (`--only`) runs it
    first."""

    def __init__(self, fill: Callable[[], None]):
        super().__init__()
        self.fill = fill

    def __missing__(self, key: str) -> object:
        self.fill()
        if key not in self:
            raise KeyError(key)
        return self[key]


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def expect_eq(got: object, want: object, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def expect_bad_request(fn: Callable[[], object], *words: str) -> None:
    """`fn` raises openai.BadRequestError whose message has each of `words`."""
    try:
        fn()
    except openai.BadRequestError as e:
        expect_eq(e.status_code, 400, "status")
        body = e.body if isinstance(e.body, dict) else {}
        msg = body.get("message") or ""
        expect(bool(msg), f"no error.message in the body: {e.body!r}")
        for w in words:
            expect(w.lower() in msg.lower(), f"error message {msg!r} does not mention {w!r}")
        return
    raise AssertionError("no openai.BadRequestError raised")


GREEDY = {"temperature": 0, "seed": 1}
HAIKU = [{"role": "user", "content": "Write one sentence about the sea."}]


def general_checks(c: Checks, client: openai.OpenAI, model: str, base_url: str, ctx: int) -> None:
    chat = client.chat.completions

    def models() -> None:
        page = client.models.list()
        ids = [m.id for m in page]
        expect_eq(ids, [model], "model ids")

    c.run("models.list", models)

    def models_retrieve() -> None:
        expect_eq(client.models.retrieve(model).id, model, "models.retrieve(id).id")

    c.run("models.retrieve", models_retrieve)

    def auth() -> None:
        bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
        try:
            bad.chat.completions.create(model=model, messages=HAIKU, max_tokens=2)
        except openai.AuthenticationError as e:
            expect_eq(e.status_code, 401, "status")
            return
        raise AssertionError("no openai.AuthenticationError with a wrong key")

    c.run("auth: wrong key raises AuthenticationError", auth)

    base = Recorded(lambda: plain())

    def plain() -> None:
        r = chat.create(model=model, messages=HAIKU, max_tokens=32, **GREEDY)
        expect_eq(r.object, "chat.completion", "object")
        expect_eq(r.model, model, "model")
        expect_eq(len(r.choices), 1, "choices")
        ch = r.choices[0]
        expect_eq(ch.index, 0, "index")
        expect_eq(ch.message.role, "assistant", "role")
        expect(isinstance(ch.message.content, str) and ch.message.content, "empty content")
        expect(ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}")
        u = r.usage
        expect(u is not None and u.prompt_tokens > 0, f"usage {u!r}")
        assert u is not None
        expect(0 < u.completion_tokens <= 32, f"completion_tokens {u.completion_tokens}")
        expect_eq(u.total_tokens, u.prompt_tokens + u.completion_tokens, "total_tokens")
        base["text"], base["reason"], base["usage"] = ch.message.content, ch.finish_reason, u

    c.run("chat: non-streamed", plain)

    def streamed() -> None:
        text, reasons, roles, ids = "", [], [], set()
        for chunk in chat.create(model=model, messages=HAIKU, max_tokens=32, stream=True, **GREEDY):
            ids.add((chunk.id, chunk.created, chunk.model))
            expect_eq(chunk.object, "chat.completion.chunk", "object")
            expect(chunk.usage is None, "usage in a chunk without include_usage")
            for ch in chunk.choices:
                if ch.delta.role:
                    roles.append(ch.delta.role)
                text += ch.delta.content or ""
                if ch.finish_reason:
                    reasons.append(ch.finish_reason)
        expect_eq(len(ids), 1, "chunks' (id, created, model)")
        expect_eq(roles, ["assistant"], "delta roles")
        expect_eq(text, base["text"], "streamed text vs non-streamed")
        expect_eq(reasons, [base["reason"]], "finish_reason")

    c.run("chat: streamed text equals non-streamed", streamed)

    def include_usage() -> None:
        chunks = list(
            chat.create(
                model=model,
                messages=HAIKU,
                max_tokens=32,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        )
        last = chunks[-1]
        expect_eq(last.choices, [], "last chunk's choices")
        expect(last.usage is not None, "no usage in the last chunk")
        assert last.usage is not None
        expect_eq(last.usage.completion_tokens, base["usage"].completion_tokens, "completion_tokens")
        expect_eq(last.usage.prompt_tokens, base["usage"].prompt_tokens, "prompt_tokens")
        for ch in chunks[:-1]:
            expect(ch.usage is None, f"usage before the last chunk: {ch.usage!r}")

    c.run("chat: stream_options.include_usage", include_usage)

    def n2() -> None:
        r = chat.create(model=model, messages=HAIKU, max_tokens=16, n=2, temperature=1.0, seed=7)
        expect_eq([ch.index for ch in r.choices], [0, 1], "choice indexes")
        for ch in r.choices:
            expect(bool(ch.message.content), "empty content")
        assert r.usage is not None
        expect(r.usage.completion_tokens <= 32, f"completion_tokens {r.usage.completion_tokens}")

    c.run("chat: n=2", n2)

    def stop() -> None:
        text = base["text"]
        words = text.split()
        expect(len(words) >= 3, f"answer too short to pick a stop word: {text!r}")
        word = words[len(words) // 2]
        r = chat.create(model=model, messages=HAIKU, max_tokens=32, stop=[word, "\n\n\n"], **GREEDY)
        ch = r.choices[0]
        expect_eq(ch.message.content, text[: text.index(word)], f"text cut at {word!r}")
        expect_eq(ch.finish_reason, "stop", "finish_reason")
        # Streamed, the same cut.
        got = "".join(
            (k.choices[0].delta.content or "") if k.choices else ""
            for k in chat.create(
                model=model, messages=HAIKU, max_tokens=32, stop=word, stream=True, **GREEDY
            )
        )
        expect_eq(got, text[: text.index(word)], "streamed text cut")

    c.run("chat: stop", stop)

    def max_tokens() -> None:
        for field in ("max_tokens", "max_completion_tokens"):
            r = chat.create(model=model, messages=HAIKU, **{field: 3}, **GREEDY)
            assert r.usage is not None
            expect_eq(r.usage.completion_tokens, 3, f"{field}=3: completion_tokens")
            expect_eq(r.choices[0].finish_reason, "length", f"{field}=3: finish_reason")

    c.run("chat: max_tokens / max_completion_tokens", max_tokens)

    def logprobs() -> None:
        r = chat.create(
            model=model, messages=HAIKU, max_tokens=12, logprobs=True, top_logprobs=3, **GREEDY
        )
        ch = r.choices[0]
        expect(ch.logprobs is not None and ch.logprobs.content is not None, "no logprobs.content")
        assert ch.logprobs is not None and ch.logprobs.content is not None
        entries = ch.logprobs.content
        assert r.usage is not None
        expect_eq(len(entries), r.usage.completion_tokens, "entries vs completion_tokens")
        expect_eq("".join(e.token for e in entries), ch.message.content, "joined tokens")
        for e in entries:
            expect(isinstance(e, openai.types.chat.ChatCompletionTokenLogprob), "entry type")
            expect(e.logprob <= 0, f"logprob {e.logprob}")
            expect_eq(len(e.top_logprobs), 3, "top_logprobs")
            expect_eq(e.top_logprobs[0].token, e.token, "greedy token is the most likely")
            expect(e.bytes is not None and bytes(e.bytes).decode("utf-8", "replace") != "", "bytes")
            lps = [t.logprob for t in e.top_logprobs]
            expect(lps == sorted(lps, reverse=True), f"top_logprobs not sorted: {lps}")
        # Streamed: the chunks' entries join to the same tokens.
        got = []
        for k in chat.create(
            model=model,
            messages=HAIKU,
            max_tokens=12,
            logprobs=True,
            top_logprobs=3,
            stream=True,
            **GREEDY,
        ):
            for kc in k.choices:
                if kc.logprobs and kc.logprobs.content:
                    got += [e.token for e in kc.logprobs.content]
        expect_eq(got, [e.token for e in entries], "streamed logprobs tokens")

    c.run("chat: logprobs + top_logprobs", logprobs)

    def seed() -> None:
        def sample(s: int) -> str:
            r = chat.create(model=model, messages=HAIKU, max_tokens=16, temperature=1.0, seed=s)
            return r.choices[0].message.content or ""

        a, b = sample(1234), sample(1234)
        expect_eq(b, a, "same seed, same text")
        others = {sample(s) for s in (1, 2, 3)}
        expect(len(others | {a}) > 1, "different seeds all gave the same text")

    c.run("chat: seed", seed)

    def json_mode() -> None:
        r = chat.create(
            model=model,
            messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
            response_format={"type": "json_object"},
            max_tokens=64,
            **GREEDY,
        )
        ch = r.choices[0]
        if ch.finish_reason == "stop":
            expect(isinstance(json.loads(ch.message.content or ""), dict), "not a JSON object")
        else:
            expect((ch.message.content or "").lstrip().startswith("{"), "not a JSON object start")

    c.run("chat: response_format json_object", json_mode)

    class City(BaseModel):
        name: str
        country: str
        population: int

    def parse() -> None:
        parse_fn = getattr(chat, "parse", None) or client.beta.chat.completions.parse
        r = parse_fn(
            model=model,
            messages=[{"role": "user", "content": "Give the name, country and population of Paris."}],
            response_format=City,
            max_tokens=96,
            **GREEDY,
        )
        msg = r.choices[0].message
        expect(isinstance(msg.parsed, City), f"parsed is {type(msg.parsed).__name__}: {msg.content!r}")

    c.run("chat: parse(response_format=pydantic model)", parse)

    def parse_stream() -> None:
        stream_fn = getattr(chat, "stream", None) or client.beta.chat.completions.stream
        with stream_fn(
            model=model,
            messages=[{"role": "user", "content": "Give the name, country and population of Paris."}],
            response_format=City,
            max_tokens=96,
            **GREEDY,
        ) as s:
            kinds = {ev.type for ev in s}
            final = s.get_final_completion()
        expect("content.done" in kinds, f"no content.done event: {sorted(kinds)}")
        msg = final.choices[0].message
        expect(isinstance(msg.parsed, City), f"parsed is {type(msg.parsed).__name__}: {msg.content!r}")

    c.run("chat: stream(response_format=pydantic model)", parse_stream)

    def content_parts() -> None:
        parts = [{"type": "text", "text": "Write one sentence"}, {"type": "text", "text": "about the sea."}]
        r = chat.create(
            model=model,
            messages=[
                {"role": "developer", "content": "You are a helpful assistant."},
                {"role": "user", "content": parts},
            ],
            max_tokens=8,
            **GREEDY,
        )
        expect(bool(r.choices[0].message.content), "empty content")

    c.run("chat: developer role and content parts", content_parts)

    def ignored_fields() -> None:
        # Fields a real client sends that a local server has no use for.
        r = chat.create(
            model=model,
            messages=HAIKU,
            max_tokens=4,
            user="someone",
            metadata={"k": "v"},
            store=False,
            service_tier="auto",
            parallel_tool_calls=False,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias={"0": -100},
            top_p=0.9,
            **GREEDY,
        )
        expect(bool(r.choices[0].message.content), "empty content")

    c.run("chat: fields the server ignores or maps", ignored_fields)

    def stream_n() -> None:
        # Several choices are not streamed (a documented limit): a clear 400, not a broken stream.
        expect_bad_request(
            lambda: chat.create(model=model, messages=HAIKU, max_tokens=4, n=2, stream=True), "n"
        )

    c.run("chat: n=2 with stream -> BadRequestError", stream_n)

    def raw_response() -> None:
        raw = chat.with_raw_response.create(model=model, messages=HAIKU, max_tokens=4, **GREEDY)
        expect(raw.headers.get("content-type", "").startswith("application/json"), "content-type")
        expect(bool(raw.parse().choices[0].message.content), "empty content")
        with chat.with_streaming_response.create(
            model=model, messages=HAIKU, max_tokens=4, stream=True, **GREEDY
        ) as resp:
            ctype = resp.headers.get("content-type", "")
            expect(ctype.startswith("text/event-stream"), f"stream content-type {ctype!r}")
            lines = [l for l in resp.iter_lines() if l.startswith("data: ")]
        expect_eq(lines[-1], "data: [DONE]", "last event")

    c.run("chat: with_raw_response / with_streaming_response", raw_response)

    def async_stream() -> None:
        import asyncio

        async def go() -> str:
            ac = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
            text = ""
            stream = await ac.chat.completions.create(
                model=model, messages=HAIKU, max_tokens=32, stream=True, **GREEDY
            )
            async for k in stream:
                for ch in k.choices:
                    text += ch.delta.content or ""
            await ac.close()
            return text

        expect_eq(asyncio.run(go()), base["text"], "AsyncOpenAI streamed text")

        # Several requests at once (queued for the server's slots): each its own answer.
        async def together() -> list:
            ac = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
            asks = [HAIKU, [{"role": "user", "content": "Name a colour."}], HAIKU]
            rs = await asyncio.gather(
                *(ac.chat.completions.create(model=model, messages=m, max_tokens=32, **GREEDY) for m in asks)
            )
            await ac.close()
            return [r.choices[0].message.content for r in rs]

        got = asyncio.run(together())
        expect_eq((got[0], got[2]), (base["text"], base["text"]), "concurrent answers")
        expect(got[1] != base["text"], "the other question got the same answer")

    c.run("chat: AsyncOpenAI streamed, and concurrent requests", async_stream)

    # Legacy completions.
    comp = client.completions
    prompt = "The capital of France is"
    cbase = Recorded(lambda: completion())

    def completion() -> None:
        r = comp.create(model=model, prompt=prompt, max_tokens=16, **GREEDY)
        expect_eq(r.object, "text_completion", "object")
        ch = r.choices[0]
        expect(bool(ch.text), "empty text")
        expect(ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}")
        assert r.usage is not None
        expect_eq(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens, "total")
        cbase["text"], cbase["reason"] = ch.text, ch.finish_reason

    c.run("completions: non-streamed", completion)

    def completion_stream() -> None:
        text, reasons, usage = "", [], None
        for k in comp.create(
            model=model,
            prompt=prompt,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        ):
            if k.usage is not None:
                expect_eq(k.choices, [], "choices of the usage chunk")
                usage = k.usage
            for ch in k.choices:
                text += ch.text
                if ch.finish_reason:
                    reasons.append(ch.finish_reason)
        expect(usage is not None and usage.completion_tokens > 0, f"include_usage: {usage!r}")
        expect_eq(text, cbase["text"], "streamed text vs non-streamed")
        expect_eq(reasons, [cbase["reason"]], "finish_reason")

    c.run("completions: streamed text equals non-streamed", completion_stream)

    def completion_echo() -> None:
        r = comp.create(model=model, prompt=prompt, max_tokens=4, echo=True, logprobs=2, **GREEDY)
        ch = r.choices[0]
        expect(ch.text.startswith(prompt), f"echo: text {ch.text!r}")
        lp = ch.logprobs
        expect(lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs, f"{lp!r}")
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
        assert lp.text_offset is not None
        expect_eq(len(lp.token_logprobs), len(lp.tokens), "token_logprobs")
        expect_eq(len(lp.text_offset), len(lp.tokens), "text_offset")
        expect(lp.token_logprobs[0] is None, "first prompt token has a logprob")
        expect(all(x <= 0 for x in lp.token_logprobs[1:] if x is not None), "logprob > 0")
        expect(all(t is None or len(t) <= 2 for t in lp.top_logprobs), "more than 2 alternatives")
        expect_eq("".join(lp.tokens), ch.text, "joined tokens")
        # max_tokens 0 with echo scores the prompt only.
        r = comp.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=0, **GREEDY)
        expect_eq(r.choices[0].text, prompt, "echo, max_tokens 0")

    c.run("completions: echo + logprobs=2", completion_echo)

    def completion_list() -> None:
        r = comp.create(model=model, prompt=[prompt, "One, two, three,"], max_tokens=4, **GREEDY)
        expect_eq([ch.index for ch in r.choices], [0, 1], "choice indexes")

    c.run("completions: a list of prompts", completion_list)

    def completion_stream_logprobs() -> None:
        want = comp.create(model=model, prompt=prompt, max_tokens=8, logprobs=2, **GREEDY)
        toks: list = []
        offsets: list = []
        for k in comp.create(model=model, prompt=prompt, max_tokens=8, logprobs=2, stream=True, **GREEDY):
            for ch in k.choices:
                if ch.logprobs and ch.logprobs.tokens:
                    toks += ch.logprobs.tokens
                    offsets += ch.logprobs.text_offset or []
        lp = want.choices[0].logprobs
        assert lp is not None
        expect_eq(toks, lp.tokens, "streamed logprobs tokens")
        expect_eq(offsets, lp.text_offset, "streamed text_offset")

    c.run("completions: streamed logprobs", completion_stream_logprobs)

    # Embeddings.
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]

    def embeddings() -> None:
        f = client.embeddings.create(model=model, input=texts, encoding_format="float")
        expect_eq([d.index for d in f.data], [0, 1], "indexes")
        dims = len(f.data[0].embedding)
        expect(dims > 0 and len(f.data[1].embedding) == dims, "dims")
        expect(all(isinstance(x, float) for x in f.data[0].embedding), "floats")
        expect(f.usage.prompt_tokens > 0, f"usage {f.usage!r}")
        # The SDK's default: it asks for base64 and decodes it itself.
        d = client.embeddings.create(model=model, input=texts)
        for a, b in zip(f.data, d.data):
            expect_eq(len(b.embedding), dims, "default (base64) dims")
            err = max(abs(x - y) for x, y in zip(a.embedding, b.embedding))
            expect(err < 1e-6, f"default (base64) vs float: max diff {err}")
        # Asked explicitly, the SDK leaves the base64 text as it is.
        e = client.embeddings.create(model=model, input=texts, encoding_format="base64")
        raw = e.data[0].embedding
        expect(isinstance(raw, str), f"base64 embedding is {type(raw).__name__}")
        import array

        vec = array.array("f", base64.b64decode(raw)).tolist()  # type: ignore[arg-type]
        expect_eq(len(vec), dims, "base64 dims")
        err = max(abs(x - y) for x, y in zip(vec, f.data[0].embedding))
        expect(err < 1e-6, f"base64 vs float: max diff {err}")
        one = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
        err = max(abs(x - y) for x, y in zip(one.data[0].embedding, f.data[0].embedding))
        expect(err < 1e-4, f"single input vs list: max diff {err}")
        expect(all(math.isfinite(x) for x in f.data[0].embedding), "non-finite values")
        ids = client.embeddings.create(model=model, input=[[1, 2, 3], [4, 5]], encoding_format="float")
        expect_eq(len(ids.data), 2, "token-id inputs")
        expect_eq(ids.usage.prompt_tokens, 5, "token-id inputs: prompt_tokens")
        same = client.embeddings.create(model=model, input=texts, dimensions=dims, encoding_format="float")
        expect_eq(len(same.data[0].embedding), dims, "dimensions = the model's")
        expect_bad_request(
            lambda: client.embeddings.create(model=model, input=texts, dimensions=dims // 2), "dimensions"
        )

    c.run("embeddings: float, base64 (SDK default) and explicit base64", embeddings)

    # Errors.
    def too_long() -> None:
        long = "word " * (ctx * 2)
        expect_bad_request(
            lambda: chat.create(model=model, messages=[{"role": "user", "content": long}], max_tokens=4),
            "context",
        )
        expect_bad_request(
            lambda: chat.create(
                model=model, messages=[{"role": "user", "content": long}], max_tokens=4, stream=True
            ),
            "context",
        )
        expect_bad_request(lambda: comp.create(model=model, prompt=long, max_tokens=4), "context")

    c.run("errors: prompt longer than the context -> BadRequestError", too_long)

    def bad_values() -> None:
        expect_bad_request(
            lambda: chat.create(model=model, messages=HAIKU, top_logprobs=3), "logprobs"
        )
        expect_bad_request(
            lambda: chat.create(model=model, messages=HAIKU, max_tokens=4, temperature=-1),
            "temperature",
        )
        expect_bad_request(lambda: chat.create(model=model, messages=[], max_tokens=4), "messages")

    c.run("errors: invalid options -> BadRequestError", bad_values)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def check_call(call: object, names: list[str]) -> dict:
    """A tool call as the SDK parsed it: id, type function, a declared name, JSON arguments."""
    expect(bool(getattr(call, "id", None)), f"call without id: {call!r}")
    expect_eq(getattr(call, "type", None), "function", "call type")
    fn = getattr(call, "function")
    expect(fn.name in names, f"call names {fn.name!r}, not one of {names}")
    args = json.loads(fn.arguments)
    expect(isinstance(args, dict), f"arguments {fn.arguments!r} are not an object")
    return args


def accumulate(stream: object) -> tuple[str, dict[int, dict], list[str]]:
    """A streamed chat's content, tool calls by index (as the SDK docs accumulate them) and
    finish reasons; the first delta of each call must carry id, type and name."""
    content, calls, reasons = "", {}, []
    for chunk in stream:  # type: ignore[attr-defined]
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    expect(bool(tc.id), f"first delta of call {tc.index} has no id: {tc!r}")
                    expect_eq(tc.type, "function", f"first delta of call {tc.index}: type")
                    expect(
                        tc.function is not None and bool(tc.function.name),
                        f"first delta of call {tc.index} has no name: {tc!r}",
                    )
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    expect(
                        tc.id is None or tc.id == calls[tc.index]["id"],
                        f"call {tc.index}: id changed to {tc.id!r}",
                    )
                if tc.function and tc.function.arguments:
                    calls[tc.index]["arguments"] += tc.function.arguments
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    return content, calls, reasons


def tool_checks(c: Checks, client: openai.OpenAI, model: str) -> None:
    chat = client.chat.completions
    names = ["get_weather", "get_time"]
    first = Recorded(lambda: required())

    def required() -> None:
        r = chat.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY)
        ch = r.choices[0]
        expect(bool(ch.message.tool_calls), f"no tool_calls: {ch.message!r}")
        assert ch.message.tool_calls
        for call in ch.message.tool_calls:
            check_call(call, names)
        expect_eq(ch.finish_reason, "tool_calls", "finish_reason")
        first["message"] = ch.message

    c.run("tools: tool_choice=required", required)

    def named() -> None:
        r = chat.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            **GREEDY,
        )
        ch = r.choices[0]
        assert ch.message.tool_calls, f"no tool_calls: {ch.message!r}"
        for call in ch.message.tool_calls:
            check_call(call, ["get_time"])
        expect_eq(ch.finish_reason, "tool_calls", "finish_reason")

    c.run("tools: named tool_choice", named)

    def auto() -> None:
        r = chat.create(model=model, messages=ASK, tools=TOOLS, **GREEDY)
        ch = r.choices[0]
        if ch.message.tool_calls:
            for call in ch.message.tool_calls:
                check_call(call, names)
            expect_eq(ch.finish_reason, "tool_calls", "finish_reason")
        else:
            expect(bool(ch.message.content), "neither content nor tool_calls")

    c.run("tools: tool_choice auto (default)", auto)

    def streamed() -> None:
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            want = chat.create(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, **GREEDY)
            wcalls = want.choices[0].message.tool_calls or []
            stream = chat.create(
                model=model, messages=ASK, tools=TOOLS, tool_choice=choice, stream=True, **GREEDY
            )
            content, calls, reasons = accumulate(stream)
            expect(bool(calls), "no streamed tool calls")
            expect_eq(sorted(calls), list(range(len(calls))), "call indexes")
            for i in sorted(calls):
                args = json.loads(calls[i]["arguments"])
                expect(isinstance(args, dict), f"arguments {calls[i]['arguments']!r}")
                expect(calls[i]["name"] in names, f"name {calls[i]['name']!r}")
            got = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
            exp = [(w.function.name, json.loads(w.function.arguments)) for w in wcalls]
            expect_eq(got, exp, f"tool_choice={choice}: streamed calls vs non-streamed")
            expect_eq(reasons, ["tool_calls"], "finish_reason")

    c.run("tools: streamed tool_calls deltas", streamed)

    def single() -> None:
        kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY)
        r = chat.create(parallel_tool_calls=False, **kw)
        expect_eq(len(r.choices[0].message.tool_calls or []), 1, "calls without parallel_tool_calls")
        _, calls, reasons = accumulate(chat.create(parallel_tool_calls=False, stream=True, **kw))
        expect_eq(len(calls), 1, "streamed calls without parallel_tool_calls")
        expect_eq(reasons, ["tool_calls"], "finish_reason")

    c.run("tools: parallel_tool_calls=False", single)

    def roundtrip() -> None:
        msg = first["message"]
        assert msg.tool_calls
        # As the SDK's docs do: the assistant message object itself, then one result per call.
        messages: list = list(ASK) + [msg]
        for call in msg.tool_calls:
            args = json.loads(call.function.arguments)
            result = {"city": args.get("city", "Paris"), "temperature_c": 18, "sky": "sunny"}
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
        before = chat.create(model=model, messages=ASK, tools=TOOLS, max_tokens=1, **GREEDY)
        r = chat.create(model=model, messages=messages, tools=TOOLS, max_tokens=64, **GREEDY)
        assert r.usage is not None and before.usage is not None
        expect(
            r.usage.prompt_tokens > before.usage.prompt_tokens + 10,
            f"prompt_tokens {r.usage.prompt_tokens}: the call and its result are not in the prompt",
        )
        ch = r.choices[0]
        # A small model may well call again (Qwen2.5-Coder-0.5B does, whatever the result):
        # either way the answer must be well-formed.
        if ch.message.tool_calls:
            for call in ch.message.tool_calls:
                check_call(call, names)
        else:
            expect(bool(ch.message.content), f"neither content nor tool_calls: {ch.message!r}")
        # Streamed, the same answer.
        content, calls, _ = accumulate(
            chat.create(
                model=model, messages=messages, tools=TOOLS, max_tokens=64, stream=True, **GREEDY
            )
        )
        got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
        want = [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls or []]
        expect_eq((content or None, got), (ch.message.content or None, want), "streamed answer")
        # tool_choice none: a text answer.
        r = chat.create(
            model=model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=32, **GREEDY
        )
        expect(not r.choices[0].message.tool_calls, "tool_calls with tool_choice none")
        expect(bool(r.choices[0].message.content), "no content with tool_choice none")

    c.run("tools: tool result sent back (role tool, tool_call_id)", roundtrip)

    def helper_stream() -> None:
        stream_fn = getattr(chat, "stream", None) or client.beta.chat.completions.stream
        for tools in (TOOLS, [openai.pydantic_function_tool(GetWeather, name="get_weather")]):
            whole = chat.create(model=model, messages=ASK, tools=tools, tool_choice="required", **GREEDY)
            with stream_fn(
                model=model, messages=ASK, tools=tools, tool_choice="required", **GREEDY
            ) as s:
                done = []
                for ev in s:
                    if ev.type == "tool_calls.function.arguments.done":
                        done.append((ev.name, ev.arguments))
                final = s.get_final_completion()
            calls = final.choices[0].message.tool_calls or []
            expect(bool(calls), "no tool calls in the final completion")
            for call in calls:
                check_call(call, [t["function"]["name"] for t in tools])
            expect_eq(len(done), len(calls), "arguments.done events")
            expect_eq(final.choices[0].finish_reason, "tool_calls", "finish_reason")
            # The helper's message is the unstreamed one: null content (calls only), same calls.
            wm = whole.choices[0].message
            expect_eq(final.choices[0].message.content, wm.content, "content vs unstreamed")
            expect_eq(
                [(t.function.name, t.function.arguments) for t in calls],
                [(t.function.name, t.function.arguments) for t in wm.tool_calls or []],
                "calls vs unstreamed",
            )
            if tools is not TOOLS:
                parsed = calls[0].function.parsed_arguments
                expect(isinstance(parsed, GetWeather), f"parsed_arguments {parsed!r}")

    c.run("tools: SDK stream() helper (plain and strict pydantic tools)", helper_stream)

    def parse_tools() -> None:
        parse_fn = getattr(chat, "parse", None) or client.beta.chat.completions.parse
        r = parse_fn(
            model=model,
            messages=ASK,
            tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")],
            tool_choice="required",
            **GREEDY,
        )
        calls = r.choices[0].message.tool_calls or []
        expect(bool(calls), "no tool calls")
        expect(isinstance(calls[0].function.parsed_arguments, GetWeather), "parsed_arguments")

    c.run("tools: parse() with a strict pydantic tool", parse_tools)

    def unknown() -> None:
        expect_bad_request(
            lambda: chat.create(
                model=model,
                messages=ASK,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            ),
            "nope",
        )

    c.run("errors: unknown tool in tool_choice -> BadRequestError", unknown)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teal", required=True, help="the teal binary")
    ap.add_argument("--model", required=True, help="model for the general checks")
    ap.add_argument("--tool-model", help="model whose chat template takes tools (tool checks)")
    ap.add_argument("--ctx", type=int, default=1024, help="context length to serve with")
    ap.add_argument("--only", help="run only checks whose name matches this regex")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra teal serve argument")
    a = ap.parse_args()
    print(f"openai {openai.__version__}, teal {a.teal}", flush=True)
    c = Checks(a.only)

    def with_server(model: str, body: Callable[[openai.OpenAI, str, str], None]) -> None:
        with TealServer(
            a.teal, os.path.expanduser(model), a.ctx, ["--api-key", API_KEY, *a.serve_arg]
        ) as s:
            assert s.url is not None
            base_url = s.url + "/v1"
            client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=300)
            served = client.models.list().data[0].id
            try:
                body(client, served, base_url)
            finally:
                if c.failed and os.environ.get("CHECK_SERVER_LOG"):
                    print("\n".join(s.log[-40:]))

    try:
        with_server(a.model, lambda cl, m, url: general_checks(c, cl, m, url, a.ctx))
        if a.tool_model:
            with_server(a.tool_model, lambda cl, m, url: tool_checks(c, cl, m))
        else:
            print("SKIP tool checks (no --tool-model)")
    except (OSError, RuntimeError, openai.APIError) as e:
        print(f"FAIL starting the server: {type(e).__name__}: {e}")
        return 1
    print(f"\n{len(c.passed)} passed, {len(c.failed)} failed")
    for name in c.failed:
        print(f"  failed: {name}")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
