"""1,200 seeded random and malformed requests against one live server: every answer is 2xx or 4xx (well-formed
requests exactly 200), streams that clients drop are aborted, and afterwards the engine is idle with its whole
KV pool free and still serving."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
from server_harness import API_KEY

NUM_REQUESTS = 1200
CONCURRENCY = 16
WORDS = "the capital of France is Paris paged attention stores keys and values in blocks def add return".split()
JUNK = [None, True, False, 0, -1, 1, 3, 21, 129, 2**31, 2**64, 10**30, 0.5, -0.5, 1e308, -1e308, "", "x", "1",
        "a" * 5000, [], [1], [[]], {}, {"a": 1}, [None], ["a", 1], {"include_usage": "yes"}, [[1, 2], [3]]]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "logit_bias", "echo",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "priority",
          "user", "best_of", "suffix", "tools", "response_format", "tokens", "nonsense_field"]
ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models", "/v1/models/tiny",
          "/v1/nothing", "/metrics", "/health", "/ready", "/version", "/stats", "/"]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def _sampling(rng: random.Random, body: dict, max_tokens: int) -> None:
    options = {
        "temperature": [0, 0.7, 1.0, 1.5], "top_p": [0.5, 0.9, 1.0], "top_k": [-1, 0, 5, 50], "min_p": [0, 0.1],
        "presence_penalty": [-1, 0, 1.5], "frequency_penalty": [-0.5, 0, 2], "repetition_penalty": [0.8, 1, 1.3],
        "n": [1, 2, 3], "seed": [0, 42, 2**40], "stop": ["e", ["a", "b"], "the"], "logit_bias": [{"5": 10}, {"7": -100}],
        "min_tokens": list(range(max_tokens + 1)), "ignore_eos": [True, False], "user": ["fuzz"],
        "priority": [0, 5, -3], "skip_special_tokens": [True, False], "include_stop_str_in_output": [True, False],
    }
    for key in rng.sample(sorted(options), rng.randint(0, 6)):
        body[key] = rng.choice(options[key])
    if rng.random() < 0.3:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": rng.random() < 0.5}


def valid_request(rng: random.Random) -> tuple[str, dict]:
    max_tokens = rng.randint(1, 8)
    if rng.random() < 0.6:
        kind = rng.random()
        if kind < 0.5:
            prompt = _text(rng)
        elif kind < 0.8:
            prompt = [rng.randrange(384) for _ in range(rng.randint(1, 20))]
        else:
            prompt = [_text(rng) for _ in range(rng.randint(1, 3))]
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens}
        _sampling(rng, body, max_tokens)
        if rng.random() < 0.3:
            body["logprobs"] = rng.choice([0, 1, 5])
        elif rng.random() < 0.1:
            body["echo"] = True
        return "/v1/completions", body
    messages = []
    for _ in range(rng.randint(1, 3)):
        content = _text(rng) if rng.random() < 0.8 else [{"type": "text", "text": _text(rng)}]
        messages.append({"role": rng.choice(["system", "user", "assistant", "developer"]), "content": content})
    body = {"model": "tiny", "messages": messages, rng.choice(["max_tokens", "max_completion_tokens"]): max_tokens}
    _sampling(rng, body, max_tokens)
    if rng.random() < 0.3:
        body["logprobs"] = True
        if rng.random() < 0.5:
            body["top_logprobs"] = rng.choice([0, 2, 20])
    return "/v1/chat/completions", body


def mutate(rng: random.Random, body: dict) -> bytes:
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.55:
            body[rng.choice(FIELDS)] = rng.choice(JUNK)
        elif op < 0.75 and body:
            body.pop(rng.choice(sorted(body)))
        elif op < 0.85:
            body["model"] = rng.choice(["", "TINY", "gpt-4", "tiny ", "x" * 600])
        else:
            body[rng.choice(["prompt", "messages"])] = rng.choice(JUNK)
    raw = json.dumps(body).encode()
    op = rng.random()
    if op < 0.1:
        raw = raw[: rng.randrange(len(raw))]  # truncated
    elif op < 0.15:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    elif op < 0.18:
        raw = b"[" * 50000 + b"]" * 50000  # deep nesting
    elif op < 0.2:
        raw = json.dumps([body]).encode()
    return raw


def make_cases(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        path, body = valid_request(rng)
        clean = rng.random() < 0.45
        raw = json.dumps(body).encode() if clean else mutate(rng, body)
        method = "POST"
        if rng.random() < 0.08:
            path, method, clean = rng.choice(ROUTES), rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"]), False
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        auth = rng.random()
        if auth < 0.03:
            headers.pop("Authorization")
            clean = False
        elif auth < 0.05:
            headers["Authorization"] = rng.choice(["Bearer nope", "Basic x", "Bearer", API_KEY])
            clean = False
        drop = body.get("stream") is True and rng.random() < 0.3
        cases.append({"method": method, "path": path, "raw": raw, "headers": headers, "clean": clean, "drop": drop})
    return cases


async def _send(session: aiohttp.ClientSession, base: str, case: dict) -> tuple[int, str]:
    async with session.request(case["method"], base + case["path"], data=case["raw"], headers=case["headers"]) as r:
        if r.status == 200 and r.headers.get("Content-Type", "").startswith("text/event-stream"):
            if case["drop"]:
                await r.content.readline()
                r.close()  # hang up mid-stream: the server must abort the request
                return r.status, "dropped"
            text = (await r.read()).decode()
            assert text.endswith("data: [DONE]\n\n"), text[-200:]
            assert '"error"' not in text, text[:500]
            return r.status, "stream"
        body = await r.read()
        if r.status >= 400:
            err = json.loads(body)["error"]
            assert err["message"] and err["type"], err
        return r.status, ""


async def _fuzz(base: str, cases: list[dict]) -> list[tuple[dict, int, str]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
        async def one(case):
            async with limit:
                status, kind = await _send(session, base, case)
                return case, status, kind

        return await asyncio.gather(*(one(c) for c in cases))


def test_fuzz_random_and_malformed_requests(api_server):
    cases = make_cases(seed=20251125, count=NUM_REQUESTS)
    results = asyncio.run(_fuzz(api_server.base_url, cases))
    assert len(results) >= 1000
    statuses = [s for _, s, _ in results]
    assert all(200 <= s < 300 or 400 <= s < 500 for s in statuses), sorted(set(statuses))
    clean = [(c, s) for c, s, _ in results if c["clean"]]
    assert len(clean) > 400
    assert all(s == 200 for _, s in clean), [(c["raw"][:300], s) for c, s in clean if s != 200][:3]
    assert sum(1 for _, _, k in results if k == "dropped") >= 10
    assert sum(1 for s in statuses if 400 <= s < 500) > 300

    stats = api_server.wait_idle_and_free()
    assert stats["kv_cache_usage"] == 0.0
    assert api_server.get("/health")[0] == 200 and api_server.get("/ready")[0] == 200
    server_errors = sum(v for (name, labels), v in api_server.metrics().items()
                        if name == "pagedserve_http_requests_total" and dict(labels)["code"].startswith("5"))
    assert server_errors == 0
    status, body = api_server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4,
                                                       "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
