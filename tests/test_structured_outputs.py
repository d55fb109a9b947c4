"""Structured outputs: the engine's grammar-constrained greedy tokens equal a reference loop (HF transformers'
model, an independent llguidance matcher, llguidance's own mask kernel), outputs fit their constraint where the
unconstrained model's do not, and the grammar state survives batching, preemption, seeded sampling, async
scheduling and tensor parallelism."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

pytest.importorskip("llguidance")
import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402
import llguidance.torch as llt  # noqa: E402

from pagedserve.runtime import LLM, SamplingParams  # noqa: E402
from pagedserve.runtime.structured_outputs import StructuredOutputsParams, apply_bitmasks  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "color", "name"],
    "additionalProperties": False,
}
REGEX = r"[a-d]{2,4}-(yes|no)"
CHOICES = ["alpha", "beta gamma", "delta"]
LARK = 'start: item ("," item)*\nitem: "x" | "yy" | "zzz"'
CONSTRAINTS = {
    "json": {"json": SCHEMA},
    "regex": {"regex": REGEX},
    "choice": {"choice": CHOICES},
    "grammar": {"grammar": LARK},
    "json_object": {"json_object": True},
}
PROMPTS = ["The weather today", "Once upon a time there", "1 2 3"]


def fits(kind: str, text: str) -> bool:
    if kind in ("json", "json_object"):
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        if kind == "json_object":
            return isinstance(obj, dict)
        return (isinstance(obj, dict) and set(obj) == {"ok", "color", "name"} and isinstance(obj["ok"], bool)
                and obj["color"] in ("red", "green", "blue") and isinstance(obj["name"], str) and len(obj["name"]) <= 6)
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch(r"(x|yy|zzz)(,(x|yy|zzz))*", text) is not None


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[0], device="cpu", num_kv_cache_tokens=4096, max_model_len=256)


def reference_greedy(model, tok, prompt_ids: list[int], constraint: dict, eos: tuple[int, ...], max_tokens: int):
    """HF's model, one token at a time, its logits masked by a separate llguidance matcher with llguidance's
    own mask application; stops at EOS like the engine does."""
    vocab = model.config.vocab_size
    ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=list(eos))
    spec = StructuredOutputsParams.from_value(constraint).grammar_spec()
    matcher = llguidance.LLMatcher(ll_tok, spec)
    mask = llt.allocate_token_bitmask(1, vocab)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1:].float().clone()
            llt.fill_next_token_bitmask(matcher, mask, 0)
            llt.apply_token_bitmask_inplace(logits, mask)
            nxt = int(logits[0].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in eos:
                break
            assert matcher.consume_token(nxt)
    return out


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_greedy_with_a_grammar_matches_a_reference_loop_and_fits(tiny, llm, kind):
    _, model, tok = tiny
    eos = llm.engine.eos_token_ids
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=CONSTRAINTS[kind])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, o in zip(prompts, outs, strict=True):
        got = o.outputs[0]
        assert got.token_ids == reference_greedy(model, tok, p, CONSTRAINTS[kind], eos, 80)
        assert got.finish_reason == "stop", (kind, got.text)  # every constraint here is finite: EOS ends it
        assert fits(kind, got.text), (kind, got.text)
    # The same model without the constraint does not produce it (so the check above can fail).
    free = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=40))
    assert not any(fits(kind, o.outputs[0].text) for o in free)


def test_bitmask_application_matches_llguidance(tiny):
    _, _, tok = tiny
    vocab = 391  # not a multiple of 32
    ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    matchers = [llguidance.LLMatcher(ll_tok, StructuredOutputsParams.from_value(c).grammar_spec())
                for c in CONSTRAINTS.values()]
    matchers[1].consume_tokens(tok("ab", add_special_tokens=False)["input_ids"])  # a state past the start
    masks = llt.allocate_token_bitmask(len(matchers), vocab)
    for i, m in enumerate(matchers):
        llt.fill_next_token_bitmask(m, masks, i)
    logits = torch.randn(len(matchers) + 2, vocab, generator=torch.Generator().manual_seed(0))
    rows = [0, 2, 3, 4, 6][: len(matchers)]
    ours = logits.clone()
    apply_bitmasks(ours, rows, list(masks))
    ref = logits.clone()
    expanded = torch.full((ref.shape[0], masks.shape[1]), -1, dtype=torch.int32)  # untouched rows: all allowed
    expanded[rows] = masks
    llt.apply_token_bitmask_inplace(ref, expanded)
    assert torch.equal(ours, ref)
    assert (ours[rows] == float("-inf")).any(dim=1).all()  # every grammar forbids something


def test_seeded_sampling_with_a_grammar_is_reproducible_and_fits(tiny, llm):
    _, _, tok = tiny
    params = SamplingParams(temperature=1.0, seed=11, n=3, max_tokens=30, structured_outputs={"regex": REGEX})
    a = llm.generate(PROMPTS, params)
    b = llm.generate(PROMPTS[::-1], params)  # another batch composition, same seeds
    texts_a = [[c.text for c in o.outputs] for o in a]
    texts_b = [[c.text for c in o.outputs] for o in b][::-1]
    assert texts_a == texts_b
    assert all(fits("regex", t) for ts in texts_a for t in ts)
    assert len({t for ts in texts_a for t in ts}) > 1  # it does sample


def test_grammar_state_survives_preemption_and_mixed_batches(tiny, llm, monkeypatch):
    _, _, tok = tiny
    prompts = [tok(p * 2)["input_ids"] for p in PROMPTS] * 2
    kinds = ["json", "regex", "json", "grammar", "json", "json_object"]
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=CONSTRAINTS[k]) for k in kinds]
    params.append(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    prompts.append(prompts[0])
    alone = [llm.generate([{"prompt_token_ids": p}], sp)[0].outputs[0].token_ids
             for p, sp in zip(prompts, params, strict=True)]
    small = LLM(tiny[0], device="cpu", num_kv_cache_tokens=96, block_size=16, max_model_len=128,
                max_num_batched_tokens=32)
    sched, preempted = small.engine.scheduler, []
    real_preempt = sched._preempt

    def spy(req, *args, **kwargs):
        preempted.append((req.sampling_params.structured_outputs is not None, req.num_output_tokens))
        return real_preempt(req, *args, **kwargs)

    monkeypatch.setattr(sched, "_preempt", spy)
    together = small.generate([{"prompt_token_ids": p} for p in prompts], params)
    # A constrained request was preempted in the middle of its output and recomputed: its matcher was rebuilt
    # from the tokens it had, and every request still gets the tokens it gets alone.
    assert any(constrained and n >= 5 for constrained, n in preempted), preempted
    assert [o.outputs[0].token_ids for o in together] == alone
    assert all(fits(k, o.outputs[0].text) for k, o in zip(kinds, together, strict=False))


def test_async_scheduling_steps_aside_for_grammar_requests(tiny, llm):
    _, _, tok = tiny
    prompts = [{"prompt_token_ids": tok(p)["input_ids"]} for p in PROMPTS]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=80, structured_outputs={"json": SCHEMA}),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    sync = llm.generate(prompts, params)
    async_llm = LLM(tiny[0], device="cpu", num_kv_cache_tokens=4096, max_model_len=256, async_scheduling=True)
    assert async_llm.engine.async_scheduling
    got = async_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in sync]
    assert fits("json", got[1].outputs[0].text)


def test_bad_grammars_and_speculation_are_refused_before_anything_runs(tiny, llm):
    with pytest.raises(ValueError, match="structured_outputs: invalid regex"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(structured_outputs={"regex": "(a"})])
    assert not llm.engine.has_unfinished()  # the good prompt was not queued either
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "json_object": True})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=3, structured_outputs={"choice": ["a"]})
    spec = LLM(tiny[0], device="cpu", num_kv_cache_tokens=1024, max_model_len=128,
               speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="speculative decoding"):
        spec.generate(["a"], SamplingParams(structured_outputs={"choice": ["a"]}))


def test_tensor_parallel_grammar_outputs_match_tp1(tiny, llm):
    _, _, tok = tiny
    prompts = [{"prompt_token_ids": tok(p)["input_ids"]} for p in PROMPTS]
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=CONSTRAINTS[k])
              for k in ("json", "regex", "grammar")]
    tp1 = llm.generate(prompts, params)
    tp2 = LLM(tiny[0], device="cpu", num_kv_cache_tokens=4096, max_model_len=256, tensor_parallel_size=2)
    try:
        got = tp2.generate(prompts, params)
    finally:
        tp2.engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in tp1]


def test_a_complete_grammar_with_ignore_eos_repeats_eos_until_the_length(tiny, llm):
    eos = llm.engine.eos_token_ids
    out = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                 structured_outputs={"choice": CHOICES}))[0].outputs[0]
    first_eos = next(i for i, t in enumerate(out.token_ids) if t in eos)
    assert all(t in eos for t in out.token_ids[first_eos:]) and out.finish_reason == "length"
    assert out.text in CHOICES


def test_a_model_vocabulary_wider_than_the_tokenizer_never_yields_padding_ids(tiny_model_factory):
    path, _, tok = tiny_model_factory("llama", vocab_size=448)  # 64 embedding rows no token maps to
    llm = LLM(path, device="cpu", num_kv_cache_tokens=4096, max_model_len=256)
    params = SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=80, logit_bias={400: 100.0, 447: 100.0},
                            structured_outputs={"json": SCHEMA})
    for o in llm.generate(PROMPTS, params):
        for c in o.outputs:
            assert max(c.token_ids) < len(tok) and fits("json", c.text), c.text


def test_structured_outputs_unavailable_fail_the_request_not_the_engine(tiny, tiny_model_factory, monkeypatch):
    # A tokenizer with more entries than the model's vocabulary: llguidance refuses it; the engine still starts.
    path, _, tok = tiny_model_factory("llama", vocab_size=380)
    narrow = LLM(path, device="cpu", num_kv_cache_tokens=1024, max_model_len=128)
    with pytest.raises(ValueError, match="structured_outputs: not available for this model's tokenizer"):
        narrow.generate(["a"], SamplingParams(structured_outputs={"choice": ["a"]}))
    assert narrow.generate(["a"], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids
    # No llguidance installed (the GPU image has none): same, with the reason.
    for name in [m for m in sys.modules if m == "llguidance" or m.startswith("llguidance.")]:
        monkeypatch.setitem(sys.modules, name, None)
    bare = LLM(tiny[0], device="cpu", num_kv_cache_tokens=1024, max_model_len=128)
    with pytest.raises(ValueError, match="installed without llguidance"):
        bare.generate(["a"], SamplingParams(structured_outputs={"regex": "a+"}))
    assert bare.generate(["a"], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids


def test_a_grammar_request_joining_while_a_deferred_step_is_in_flight(tiny, llm):
    from test_async_scheduling import drive, spy_deferred
    from tiny_models import hf_greedy

    path, hf, tok = tiny
    eng_llm = LLM(path, device="cpu", num_kv_cache_tokens=4096, max_model_len=256, async_scheduling=True)
    calls = spy_deferred(eng_llm)
    eng = eng_llm.engine
    plain = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    for i, p in enumerate(prompts[:2]):
        eng.add_request(eng.make_request(f"p{i}", p, plain))
    out: dict[str, list[int]] = {}
    drive(eng, 4, out)
    assert calls[-1]  # a deferred step is on the device now
    constrained = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs={"json": SCHEMA})
    eng.add_request(eng.make_request("s", prompts[2], constrained))
    n_before = len(calls)
    while "s" in eng.scheduler.requests:
        drive(eng, 1, out)
    assert not any(calls[n_before:])  # synchronous while the grammar request lives
    while eng.has_unfinished():
        drive(eng, 1, out)
    assert out["p0"] == hf_greedy(hf, prompts[0], 30) and out["p1"] == hf_greedy(hf, prompts[1], 30)
    alone = llm.generate([{"prompt_token_ids": prompts[2]}], constrained)[0].outputs[0]
    assert out["s"] == alone.token_ids and fits("json", alone.text)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
