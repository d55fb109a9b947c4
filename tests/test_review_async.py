"""Review of async scheduling (7f0e760) and the q-token CUDA graphs (a1c16b7): failing reproductions of the
bugs found, marked xfail(strict=True) so the suite stays green until they are fixed."""

import random

import pytest

from pagedserve.runtime import LLM, SamplingParams


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=(
    "pre-existing (9122b0e), hit with and without async scheduling: a preempted request keeps its "
    "ModelRunner row (the runner never hears of the preemption), so running + preempted requests can need "
    "more than max_num_seqs rows; admitting another request then raises 'persistent batch is full'"))
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempted_request_does_not_hold_a_runner_row(tiny_model_factory, async_scheduling):
    path, _, tok = tiny_model_factory("llama")
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
    while eng.has_unfinished():
        eng.step()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
