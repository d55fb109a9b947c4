"""Async scheduling (step N+1 scheduled and launched before step N's tokens reach the host): outputs identical
to HF transformers (greedy) and to the synchronous engine (stops, seeded sampling), through chunked prefill,
prefix hits, preemption with a token in flight, aborts, a reused request id, and a request that needs the host
every step joining mid-run. Run on CPU, where the same code path runs with the device copy replaced by the
tensor itself; the GPU run (bench/bench_offline.py) exercises the overlap."""

import random

import pytest
from tiny_models import hf_greedy

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.scheduler import Scheduler


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def spy_deferred(llm: LLM) -> list[bool]:
    """Record, per executed step, whether it ran deferred (async)."""
    calls: list[bool] = []
    runner = llm.engine.runner
    real = runner.execute

    def execute(so, deferred=False):
        calls.append(deferred)
        return real(so, deferred=deferred)

    runner.execute = execute
    return calls


def greedy_vs_hf(llm, hf, prompts, max_tokens=24):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, o in zip(prompts, outs, strict=True):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, max_tokens), f"prompt of {len(p)} tokens"
        assert o.outputs[0].finish_reason == "length"
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_identical_to_hf(tiny_model_factory, arch):
    path, hf, tok = tiny_model_factory(arch)
    llm = LLM(path, num_kv_cache_tokens=4096, async_scheduling=True)
    calls = spy_deferred(llm)
    greedy_vs_hf(llm, hf, random_prompts(len(tok), [1, 7, 16, 17, 33, 60], seed=1))
    assert calls and all(calls)  # every step ran deferred


def test_chunked_prefill_and_prefix_hits(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    llm = LLM(path, num_kv_cache_tokens=4096, max_num_batched_tokens=8, max_num_seqs=8, async_scheduling=True)
    greedy_vs_hf(llm, hf, random_prompts(len(tok), [5, 19, 40, 3], seed=2), max_tokens=12)
    prefix = random_prompts(len(tok), [70], seed=3)[0]
    greedy_vs_hf(llm, hf, [prefix + [5]])
    greedy_vs_hf(llm, hf, [prefix + s for s in random_prompts(len(tok), [1, 16, 23], seed=4)])
    assert llm.engine.kv.prefix_cache_hits >= 3 * 64


def test_preemption_with_a_token_in_flight(tiny_model_factory, monkeypatch):
    path, hf, tok = tiny_model_factory("llama")
    seen = []
    real = Scheduler._append_to_preempted

    def spy(self, req, token):
        seen.append(req.request_id)
        return real(self, req, token)

    monkeypatch.setattr(Scheduler, "_append_to_preempted", spy)
    # 8 blocks of 16 for 4 requests needing ~60 tokens each: preemption by recompute must happen.
    llm = LLM(path, num_kv_cache_tokens=128, max_model_len=128, async_scheduling=True)
    greedy_vs_hf(llm, hf, random_prompts(len(tok), [30, 25, 33, 20], seed=5), max_tokens=30)
    assert llm.engine.scheduler.num_preemptions > 0
    assert seen, "no request was preempted while its last token was still in flight"


def test_stops_and_lengths_identical_to_sync(tiny_model_factory):
    path, _, tok = tiny_model_factory("llama")
    prompts = random_prompts(len(tok), [4, 9, 15, 22, 31, 40], seed=6)
    sync = LLM(path, num_kv_cache_tokens=4096, async_scheduling=False)
    free = sync.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    # Stop ids taken from the free-running outputs, so stops land mid-sequence; lengths from 1 token up.
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, stop_token_ids=[o.outputs[0].token_ids[s]])
        for o, m, s in zip(free, [1, 2, 30, 17, 30, 5], [5, 1, 9, 3, 20, 12], strict=True)
    ]
    want = sync.generate([{"prompt_token_ids": p} for p in prompts], params)
    llm = LLM(path, num_kv_cache_tokens=4096, async_scheduling=True)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    reasons = set()
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert (g.outputs[0].finish_reason, g.outputs[0].stop_reason) == (w.outputs[0].finish_reason,
                                                                          w.outputs[0].stop_reason)
        reasons.add(w.outputs[0].finish_reason)
    assert reasons == {"stop", "length"}
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_seeded_sampling_identical_to_sync(tiny_model_factory):
    path, _, tok = tiny_model_factory("llama")
    prompts = random_prompts(len(tok), [6, 13, 27], seed=7)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=30, max_tokens=20, seed=s, ignore_eos=True)
              for s in (1, 2, 3)]
    want = LLM(path, num_kv_cache_tokens=4096, async_scheduling=False).generate(
        [{"prompt_token_ids": p} for p in prompts], params)
    got = LLM(path, num_kv_cache_tokens=4096, async_scheduling=True).generate(
        [{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def drive(engine, steps: int, out: dict) -> None:
    for _ in range(steps):
        for u in engine.step():
            out.setdefault(u.req_id, []).extend(u.new_token_ids)


def test_host_sync_request_joining_mid_run_aborts_and_reused_ids(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    llm = LLM(path, num_kv_cache_tokens=4096, async_scheduling=True)
    calls = spy_deferred(llm)
    eng = llm.engine
    prompts = random_prompts(len(tok), [8, 14, 21, 5], seed=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(prompts[:3]):
        eng.add_request(eng.make_request(f"g{i}", p, greedy))
    out: dict[str, list[int]] = {}
    drive(eng, 4, out)
    # A request with a repetition penalty needs its previous token on the host: the engine drains and runs
    # synchronously while it lives.
    penal = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3)
    eng.add_request(eng.make_request("pen", prompts[3], penal))
    n_before = len(calls)
    drive(eng, 3, out)
    assert not any(calls[n_before:])  # synchronous while "pen" runs
    # Abort g1 while it has a token in flight, then reuse its id at once for another prompt.
    while "pen" in eng.scheduler.requests:
        drive(eng, 1, out)
    drive(eng, 2, out)
    assert calls[-1]  # back to async
    n_g1 = len(out["g1"])
    eng.abort_requests(["g1"])
    drive(eng, 1, out)
    assert len(out["g1"]) == n_g1  # nothing after the abort
    del out["g1"]
    eng.add_request(eng.make_request("g1", prompts[0][:5], greedy))
    while eng.has_unfinished():
        drive(eng, 1, out)
    assert out["g0"] == hf_greedy(hf, prompts[0], 20)
    assert out["g2"] == hf_greedy(hf, prompts[2], 20)
    assert out["g1"] == hf_greedy(hf, prompts[0][:5], 20)
    alone = LLM(path, num_kv_cache_tokens=4096, async_scheduling=False).generate(
        {"prompt_token_ids": prompts[3]}, penal)
    assert out["pen"] == alone[0].outputs[0].token_ids
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_async_scheduling_refused_with_speculation_or_a_non_boolean(tiny_model_factory):
    path, _, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(path, num_kv_cache_tokens=4096, async_scheduling=True,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="async_scheduling: must be true, false or null"):
        LLM(path, num_kv_cache_tokens=4096, async_scheduling="false")
