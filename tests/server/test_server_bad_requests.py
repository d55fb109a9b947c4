"""Bad requests get OpenAI's error body with the right status, a message naming the problem and the param;
none of them disturbs the engine."""

from __future__ import annotations

import json

import pytest

OK = {"model": "tiny", "prompt": "The capital", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def c(**kw):
    return json.dumps({**OK, **kw}).encode()


def chat(**kw):
    return json.dumps({**CHAT, **kw}).encode()


def without(base: dict, key: str) -> bytes:
    return json.dumps({k: v for k, v in base.items() if k != key}).encode()


CASES = [
    # (id, method, path, body, status, message fragment, param)
    ("malformed json", "POST", "/v1/completions", b'{"model": "tiny", "prompt":', 400, "not valid JSON", None),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", 400, "must be a JSON object, got list", None),
    ("NaN literal", "POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "not valid JSON", None),
    ("not utf-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "not valid JSON", None),
    ("empty body", "POST", "/v1/chat/completions", b"", 400, "not valid JSON", None),
    ("no prompt", "POST", "/v1/completions", without(OK, "prompt"), 400, "prompt: is required", "prompt"),
    ("prompt type", "POST", "/v1/completions", c(prompt=5), 400, "prompt: must be a string", "prompt"),
    ("empty prompt list", "POST", "/v1/completions", c(prompt=[]), 400, "prompt: must be", "prompt"),
    ("mixed prompt list", "POST", "/v1/completions", c(prompt=[1, "a"]), 400, "prompt: must be", "prompt"),
    ("bool token ids", "POST", "/v1/completions", c(prompt=[True, 3]), 400, "prompt: must be", "prompt"),
    ("token outside vocab", "POST", "/v1/completions", c(prompt=[1, 100000]), 400,
     "token id 100000 is outside the vocabulary [0, 384)", "prompt"),
    ("max_tokens 0", "POST", "/v1/completions", c(max_tokens=0), 400, "max_tokens: must be in [1,", "max_tokens"),
    ("max_tokens string", "POST", "/v1/completions", c(max_tokens="10"), 400, "max_tokens: must be an integer",
     "max_tokens"),
    ("context overflow", "POST", "/v1/completions", c(prompt=[5] * 10, max_tokens=250), 400,
     "maximum context length is 256 tokens. However, you requested 260 tokens (10 in the prompt, 250 for the "
     "completion)", "max_tokens"),
    ("prompt too long", "POST", "/v1/completions", c(prompt=[5] * 300), 400,
     "maximum context length is 256 tokens, but the prompt has 300 tokens", "prompt"),
    ("chat context overflow", "POST", "/v1/chat/completions", chat(max_completion_tokens=1000), 400,
     "maximum context length is 256 tokens. However, you requested", "max_tokens"),
    ("temperature negative", "POST", "/v1/completions", c(temperature=-1), 400, "temperature: must be in [0",
     "temperature"),
    ("temperature infinite", "POST", "/v1/completions", b'{"prompt": "x", "temperature": 1e400}', 400,
     "temperature: must be a finite number", "temperature"),
    ("top_p zero", "POST", "/v1/completions", c(top_p=0), 400, "top_p: must be in (0, 1]", "top_p"),
    ("top_p above one", "POST", "/v1/completions", c(top_p=1.5), 400, "top_p: must be in (0, 1]", "top_p"),
    ("top_k huge", "POST", "/v1/completions", c(top_k=2**40), 400, "top_k: must be in [-1,", "top_k"),
    ("n zero", "POST", "/v1/completions", c(n=0), 400, "n: must be in [1, 128]", "n"),
    ("n huge", "POST", "/v1/completions", c(n=1000), 400, "n: must be in [1, 128]", "n"),
    ("logprobs too many", "POST", "/v1/completions", c(logprobs=21), 400, "logprobs: must be in [0, 20]",
     "logprobs"),
    ("logprobs bool in completions", "POST", "/v1/completions", c(logprobs=True), 400,
     "logprobs: must be an integer", "logprobs"),
    ("presence penalty", "POST", "/v1/completions", c(presence_penalty=3), 400, "presence_penalty: must be in [-2, 2]",
     "presence_penalty"),
    ("repetition penalty", "POST", "/v1/completions", c(repetition_penalty=0), 400,
     "repetition_penalty: must be in (0, 2]", "repetition_penalty"),
    ("stop type", "POST", "/v1/completions", c(stop=5), 400, "stop: must be a string or a list of strings", "stop"),
    ("empty stop", "POST", "/v1/completions", c(stop=[""]), 400, "stop: each stop string", "stop"),
    ("seed type", "POST", "/v1/completions", c(seed="abc"), 400, "seed: must be an integer", "seed"),
    ("seed range", "POST", "/v1/completions", c(seed=2**70), 400, "seed: must be in", "seed"),
    ("logit_bias key", "POST", "/v1/completions", c(logit_bias={"abc": 1}), 400, "logit_bias: key 'abc' is not a token id",
     "logit_bias"),
    ("logit_bias value", "POST", "/v1/completions", c(logit_bias={"1": 200}), 400,
     "logit_bias: bias for token 1 must be a number in [-100, 100]", "logit_bias"),
    ("logit_bias vocab", "POST", "/v1/completions", c(logit_bias={"99999": 1}), 400, "outside the vocabulary",
     "logit_bias"),
    ("unknown field", "POST", "/v1/completions", c(frobnicate=1), 400, "unrecognized request argument(s): 'frobnicate'",
     "frobnicate"),
    ("stream_options alone", "POST", "/v1/completions", c(stream_options={"include_usage": True}), 400,
     "stream_options: only allowed when stream is true", "stream_options"),
    ("min_tokens above max", "POST", "/v1/completions", c(min_tokens=5, max_tokens=2), 400,
     "min_tokens: must be <= max_tokens (2)", "min_tokens"),
    ("best_of", "POST", "/v1/completions", c(best_of=3), 400, "best_of: only best_of == n", "best_of"),
    ("suffix", "POST", "/v1/completions", c(suffix="end"), 400, "suffix: is not supported", "suffix"),
    ("echo with logprobs", "POST", "/v1/completions", c(echo=True, logprobs=1), 400, "echo: cannot be combined",
     "echo"),
    ("too many choices", "POST", "/v1/completions", c(prompt=["a"] * 20, n=100), 400, "exceeds 1024 choices", "prompt"),
    ("no messages", "POST", "/v1/chat/completions", without(CHAT, "messages"), 400, "messages: must be a non-empty list",
     "messages"),
    ("empty messages", "POST", "/v1/chat/completions", chat(messages=[]), 400, "messages: must be a non-empty list",
     "messages"),
    ("bad role", "POST", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), 400,
     "messages[0].role: must be one of", "messages"),
    ("bad content", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content: must be a string", "messages"),
    ("image part", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "only text parts", "messages"),
    ("tools", "POST", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools: tool and function calling",
     "tools"),
    ("top_logprobs alone", "POST", "/v1/chat/completions", chat(top_logprobs=2), 400,
     "top_logprobs: requires logprobs to be true", "top_logprobs"),
    ("response format type", "POST", "/v1/chat/completions", chat(response_format={"type": "xml"}), 400,
     "response_format: type must be text, json_object or json_schema", "response_format"),
    ("json_schema without schema", "POST", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "json_schema.schema must be a JSON schema object", "response_format"),
    ("two constraints", "POST", "/v1/completions", c(structured_outputs={"regex": "a", "choice": ["a"]}), 400,
     "exactly one of json, regex, choice, grammar, json_object", "structured_outputs"),
    ("unknown constraint", "POST", "/v1/completions", c(structured_outputs={"ebnf": "x"}), 400,
     "unknown key(s) ebnf", "structured_outputs"),
    ("both response_format and structured_outputs", "POST", "/v1/chat/completions",
     chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), 400,
     "cannot be combined with a json response_format", "structured_outputs"),
    ("regex that does not compile", "POST", "/v1/completions", c(structured_outputs={"regex": "[a-"}), 400,
     "structured_outputs: invalid regex", "structured_outputs"),
    ("lark grammar that does not compile", "POST", "/v1/completions", c(structured_outputs={"grammar": "start: nope"}),
     400, "structured_outputs: invalid grammar", "structured_outputs"),
    ("grammar with min_tokens", "POST", "/v1/completions", c(structured_outputs={"choice": ["a"]}, min_tokens=2), 400,
     "min_tokens: cannot be combined with structured_outputs", "min_tokens"),
    ("tokenize both", "POST", "/tokenize", b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', 400,
     "exactly one of", "prompt"),
    ("detokenize vocab", "POST", "/detokenize", b'{"tokens": [1, -1]}', 400, "token id -1 is outside", "tokens"),
    ("unknown model", "POST", "/v1/completions", c(model="gpt-9"), 404, "The model `gpt-9` does not exist", "model"),
    ("unknown chat model", "POST", "/v1/chat/completions", chat(model="gpt-9"), 404, "does not exist", "model"),
    ("unknown model card", "GET", "/v1/models/gpt-9", None, 404, "does not exist", "model"),
    ("unknown route", "POST", "/v1/embeddings", c(), 404, "no such route: POST /v1/embeddings", None),
    ("wrong method", "GET", "/v1/completions", None, 405, "method GET is not allowed", None),
    ("oversized body", "POST", "/v1/completions", c(prompt="x" * (2 << 20)), 413,
     "larger than the limit of 1048576 bytes", None),
]


@pytest.mark.parametrize("name,method,path,body,status,fragment,param", CASES, ids=[x[0] for x in CASES])
def test_bad_request(api_server, name, method, path, body, status, fragment, param):
    from server_harness import API_KEY, http

    got_status, got = http(method, api_server.url(path), body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert got_status == status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}, got
    assert fragment in got["error"]["message"], got
    assert got["error"]["param"] == param, got
    assert got["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                                    413: "invalid_request_error"}[status]


def test_bad_requests_left_the_engine_serving(api_server):
    """Runs after the table (same module): the engine is idle, every block free, and it still serves."""
    api_server.wait_idle_and_free()
    status, body = api_server.post("/v1/completions", {**OK, "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert api_server.get("/health")[0] == 200
