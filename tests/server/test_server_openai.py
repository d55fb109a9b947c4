"""The official ``openai`` client against a live server on loopback, checked against independent references:
Hugging Face transformers (greedy tokens, logprobs) and the offline ``LLM`` (sampled text with seeds)."""

from __future__ import annotations

import json

import openai
import pytest
import tiny_models
import torch
from server_harness import API_KEY

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.openai_format import TokenTexts

PROMPTS = ["The capital of France is", "Paged attention stores", "def add(a, b):"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(tiny, one_thread):
    return LLM(tiny[0], device="cpu", num_kv_cache_tokens=4096, max_model_len=256)


def _hf_text(tiny, ids: list[int], n: int) -> tuple[list[int], str]:
    _, model, tok = tiny
    out = tiny_models.hf_greedy(model, ids, n)
    return out, tok.decode(out, skip_special_tokens=True)


def test_greedy_completion_matches_transformers(client, tiny):
    tok = tiny[2]
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=NO_EOS)
        _, expected = _hf_text(tiny, ids, 12)
        assert r.choices[0].text == expected
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
        assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")


def test_token_id_prompts_several_at_once_with_n(client, tiny):
    tok = tiny[2]
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    r = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text == _hf_text(tiny, prompts[c.index // 2], 6)[1]
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert r.usage.completion_tokens == 4 * 6


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], object, int]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage, num_chunks = None, 0
    for chunk in stream:
        num_chunks += 1
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage, num_chunks


@pytest.mark.parametrize("stop", [None, "e"])
def test_streamed_completion_deltas_equal_the_non_streamed_text(client, api_server, stop):
    api_server.engine.step_delay_s = 0.005  # slower than the reader: no chunks get merged
    try:
        for prompt in PROMPTS:
            kw = dict(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=stop, extra_body=NO_EOS)
            full = client.completions.create(**kw)
            texts, finish, usage, num_chunks = _stream_text(client.completions.create(
                **kw, stream=True, stream_options={"include_usage": True}))
            assert texts[0] == full.choices[0].text
            assert finish[0] == full.choices[0].finish_reason
            assert usage.model_dump() == full.usage.model_dump()
            if stop is None:
                assert num_chunks >= 9  # one chunk per token unless the reader fell behind
    finally:
        api_server.engine.step_delay_s = 0.0


def test_streamed_chat_deltas_equal_the_non_streamed_text(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, n=2, extra_body=NO_EOS)
    full = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    first = next(iter(stream))
    assert [c.delta.role for c in first.choices] == ["assistant", "assistant"]
    texts, finish, usage, _ = _stream_text(stream)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == full.usage.completion_tokens == 32


def test_chat_matches_the_offline_chat_api(client, offline, tiny):
    tok = tiny[2]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                       extra_body=NO_EOS)
    ref = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    ids = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(ids, add_special_tokens=False)) == len(ref.prompt_token_ids)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_n2_with_a_seed_matches_offline_sampling_and_reproduces(client, offline):
    kw = dict(model="tiny", prompt=PROMPTS[1], n=2, max_tokens=10, temperature=1.0, seed=1234, extra_body=NO_EOS)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    ref = offline.generate(PROMPTS[1], SamplingParams(n=2, max_tokens=10, temperature=1.0, seed=1234,
                                                      ignore_eos=True))[0]
    got = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert got == [o.text for o in ref.outputs]
    assert got == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert got[0] != got[1]  # two independent samples from a near-uniform random model
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != got


def test_completion_logprobs_match_transformers(client, tiny):
    _, model, tok = tiny
    texts = TokenTexts(tok)
    ids = tok(PROMPTS[0])["input_ids"]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                  extra_body=NO_EOS)
    out, _ = _hf_text(tiny, ids, 6)
    ref = tiny_models.hf_logprobs(model, ids + out)
    lp = r.choices[0].logprobs
    assert lp.tokens == [texts.text(t) for t in out]
    offset = 0
    for i, t in enumerate(out):
        row = ref[len(ids) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(row[t].item(), abs=1e-4)
        top_vals = torch.topk(row, 3).values.tolist()
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top_vals[0], abs=1e-4)
        for v in lp.top_logprobs[i].values():
            assert any(v == pytest.approx(x, abs=1e-4) for x in top_vals)
        assert lp.text_offset[i] == offset
        offset += len(lp.tokens[i])


def test_chat_logprobs_match_transformers(client, tiny):
    _, model, tok = tiny
    texts = TokenTexts(tok)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=4, extra_body=NO_EOS)
    prompt = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    out, _ = _hf_text(tiny, prompt, 5)
    ref = tiny_models.hf_logprobs(model, prompt + out)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for i, entry in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert entry.token == texts.text(out[i]) and entry.bytes == list(texts.raw(out[i]))
        assert entry.logprob == pytest.approx(row[out[i]].item(), abs=1e-4)
        vals, top_ids = torch.topk(row, 4)
        assert [t.bytes for t in entry.top_logprobs] == [list(texts.raw(t)) for t in top_ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-4)


def test_stop_strings_cut_the_text(client):
    base = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                     extra_body=NO_EOS).choices[0].text
    # A two-character stop string that first occurs after the start of the text.
    k = next(k for k in range(1, len(base) - 2) if base.find(base[k:k + 2]) == k)
    stop = base[k:k + 2]
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "\x00zz"],
                                  extra_body=NO_EOS)
    assert r.choices[0].text == base[:k]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    kept = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop,
                                     extra_body={**NO_EOS, "include_stop_str_in_output": True})
    assert kept.choices[0].text == base[:k + 2]
    texts, finish, _, _ = _stream_text(client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop, stream=True, extra_body=NO_EOS))
    assert texts[0] == base[:k] and finish[0] == "stop"


def test_echo_returns_the_prompt_first(client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True,
                                  extra_body=NO_EOS)
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, extra_body=NO_EOS)
    assert r.choices[0].text == PROMPTS[0] + plain.choices[0].text


def test_api_key_is_required_on_v1_routes_only(api_server):
    bad = openai.OpenAI(base_url=api_server.url("/v1"), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert e.value.status_code == 401
    for path in ("/v1/models", "/v1/completions", "/v1/nonexistent"):
        status, body = api_server.post(path, {"model": "tiny", "prompt": "x"}, auth=False)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, body)
    status, _ = api_server.get("/v1/models", headers={"Authorization": "Basic dGVzdC1rZXk="})
    assert status == 401
    for path in ("/health", "/ready", "/metrics", "/version"):
        assert api_server.get(path)[0] == 200, path


def test_models_tokenize_detokenize_version(client, api_server, tiny):
    tok = tiny[2]
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == 256
    assert client.models.retrieve("tiny").id == "tiny"
    status, body = api_server.post("/tokenize", {"model": "tiny", "prompt": PROMPTS[0]})
    assert status == 200
    assert body["tokens"] == tok(PROMPTS[0])["input_ids"] and body["count"] == len(body["tokens"])
    status, body2 = api_server.post("/detokenize", {"model": "tiny", "tokens": body["tokens"]})
    assert status == 200 and body2["prompt"] == tok.decode(body["tokens"])
    status, chat = api_server.post("/tokenize", {"messages": MESSAGES})
    expect = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    assert status == 200 and chat["tokens"] == expect
    status, version = api_server.get("/version")
    assert status == 200 and version["version"]


def test_request_ids_are_echoed(api_server):
    status, _ = api_server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1},
                                headers={"X-Request-Id": "abc-123"})
    assert status == 200
    import urllib.request

    req = urllib.request.Request(api_server.url("/v1/models"), headers={
        "Authorization": f"Bearer {API_KEY}", "X-Request-Id": "abc-123"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"


JSON_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "blue"]}},
               "required": ["ok", "color"], "additionalProperties": False}


def test_response_format_json_schema_matches_offline_structured_outputs(client, offline):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": JSON_SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=60, temperature=0,
                                       response_format=fmt)
    ref = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=60,
                                                structured_outputs={"json": JSON_SCHEMA}))[0].outputs[0]
    text = r.choices[0].message.content
    assert text == ref.text and r.choices[0].finish_reason == ref.finish_reason == "stop"
    obj = json.loads(text)
    assert set(obj) == {"ok", "color"} and isinstance(obj["ok"], bool) and obj["color"] in ("red", "blue")
    # Streamed, the deltas add up to the same JSON.
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=60, temperature=0,
                                            response_format=fmt, stream=True)
    texts, finish, _, _ = _stream_text(stream)
    assert texts == {0: text} and finish == {0: "stop"}


def test_structured_outputs_choice_and_json_object_on_completions(client, offline):
    choices = ["Paris", "Lyon", "Nice"]
    r = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"choice": choices}})
    ref = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20,
                                                   structured_outputs={"choice": choices}))
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.outputs[0].text for o in ref]
    assert all(c.text in choices for c in r.choices)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)
