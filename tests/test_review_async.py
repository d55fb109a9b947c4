"""Found in the review of async scheduling (7f0e760) and the q-token CUDA graphs (a1c16b7): a bug older than
both. A preempted request kept its ModelRunner row (the runner never heard of the preemption), so running +
preempted requests could need more than max_num_seqs rows, and admitting another request raised 'persistent
batch is full' and killed the engine. The scheduler now reports preemptions and the runner frees the rows
(keeping a seeded request's generator for its resumption)."""

import random

import pytest
from tiny_models import hf_greedy

from pagedserve.runtime import LLM, SamplingParams


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempted_request_does_not_hold_a_runner_row(tiny_model_factory, async_scheduling):
    path, hf, tok = tiny_model_factory("llama")
    a, b, c = random_prompts(len(tok), [20, 20, 10], seed=11)
    # 8 blocks of 16: A and B grow until B (the lower priority) is preempted; then C (higher priority than B)
    # is admitted next to A while B still holds the second of the max_num_seqs=2 rows.
    llm = LLM(path, num_kv_cache_tokens=128, max_model_len=128, max_num_seqs=2, scheduling_policy="priority",
              async_scheduling=async_scheduling)
    eng = llm.engine
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    eng.add_request(eng.make_request("A", a, long, priority=0))
    eng.add_request(eng.make_request("B", b, long, priority=1))
    while eng.scheduler.num_preemptions == 0:
        eng.step()
    eng.add_request(eng.make_request("C", c, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                     priority=0))
    out: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for u in eng.step():
            out.setdefault(u.req_id, []).extend(u.new_token_ids)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    assert out["C"] == hf_greedy(hf, c, 5)
    eng.step()  # as the server's loop does: the runner drops the state of the requests that just ended
    assert eng.runner.requests == {} and len(eng.runner.free_rows) == 2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_request_preempted_keeps_its_random_stream(tiny_model_factory, async_scheduling):
    path, _, tok = tiny_model_factory("llama")
    a, b = random_prompts(len(tok), [20, 20], seed=12)
    seeded = SamplingParams(temperature=1.0, max_tokens=60, ignore_eos=True, seed=7)
    alone = LLM(path, num_kv_cache_tokens=4096, async_scheduling=async_scheduling).generate(
        {"prompt_token_ids": b}, seeded)[0].outputs[0].token_ids
    llm = LLM(path, num_kv_cache_tokens=96, max_model_len=96, max_num_seqs=2, scheduling_policy="priority",
              async_scheduling=async_scheduling)
    outs = llm.generate([{"prompt_token_ids": a}, {"prompt_token_ids": b}],
                        [SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True), seeded], priority=[0, 1])
    assert llm.engine.scheduler.num_preemptions > 0
    assert outs[1].outputs[0].token_ids == alone
