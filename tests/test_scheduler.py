"""Scheduler policy on CPU with no model: token budget, FCFS vs priority, preemption victims, abort."""

from pagedserve.runtime.config import SchedulerConfig
from pagedserve.runtime.kv_cache_manager import KVCacheManager
from pagedserve.runtime.request import Request, RequestStatus
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.scheduler import Scheduler


def make(policy="fcfs", blocks=64, max_seqs=8, budget=64, block_size=4):
    kv = KVCacheManager(blocks, block_size, enable_prefix_caching=False)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256, policy=policy)
    return Scheduler(cfg, kv), kv


def req(rid, n, priority=0, arrival=0.0, max_tokens=8):
    return Request(rid, list(range(1, n + 1)), SamplingParams(), max_tokens, (), arrival, priority)


def step(s, token=7):
    out = s.schedule()
    return out, s.update(out, [token] * len(out.req_ids))


def test_token_budget_chunks_prefill_and_mixes_decodes():
    s, _ = make(budget=10)
    s.add_request(req("a", 3))
    s.add_request(req("b", 25))
    out, _ = step(s)
    assert out.req_ids == ["a", "b"] and out.num_scheduled_tokens == [3, 7]
    assert out.do_sample == [True, False]
    out, _ = step(s)
    # a decodes one token, b gets the rest of the budget as its next chunk.
    assert out.req_ids == ["a", "b"] and out.num_scheduled_tokens == [1, 9]
    assert out.num_computed_tokens == [3, 7]


def test_priority_policy_admits_lowest_priority_value_first():
    s, _ = make(policy="priority", max_seqs=1)
    s.add_request(req("low", 4, priority=5, arrival=1.0))
    s.add_request(req("high", 4, priority=0, arrival=2.0))
    s.add_request(req("high-late", 4, priority=0, arrival=3.0))
    out, _ = step(s)
    assert out.req_ids == ["high"]
    fcfs, _ = make(policy="fcfs", max_seqs=1)
    for r in (req("low", 4, 5, 1.0), req("high", 4, 0, 2.0)):
        fcfs.add_request(r)
    out, _ = step(fcfs)
    assert out.req_ids == ["low"]


def test_preemption_takes_the_last_running_request_fcfs_and_the_lowest_priority_otherwise():
    for policy, expect_victim in (("fcfs", "c"), ("priority", "a")):
        s, kv = make(policy=policy, blocks=6, block_size=4, budget=64)
        s.add_request(req("a", 7, priority=9, arrival=0.0, max_tokens=50))
        s.add_request(req("b", 7, priority=0, arrival=1.0, max_tokens=50))
        s.add_request(req("c", 7, priority=1, arrival=2.0, max_tokens=50))
        step(s)  # prefill: each holds 2 of the 6 blocks (7 prompt tokens, 8 slots)
        assert kv.num_free_blocks == 0
        step(s)  # the 8th token still fits
        assert s.num_preemptions == 0
        # The 9th token of each needs a third block: the first in line preempts a victim.
        out, _ = step(s)
        victim = s.requests[expect_victim]
        assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
        assert expect_victim not in out.req_ids
        assert s.num_preemptions >= 1


def test_abort_frees_blocks_of_waiting_and_running_requests():
    s, kv = make(max_seqs=1)
    s.add_request(req("run", 9))
    s.add_request(req("wait", 9))
    step(s)
    assert s.requests["run"].status == RequestStatus.RUNNING
    assert s.requests["wait"].status == RequestStatus.WAITING
    s.abort_requests(["run", "wait", "unknown"])
    assert kv.num_free_blocks == kv.num_blocks
    assert not s.has_unfinished() and s.num_waiting == 0 and s.num_running == 0
    out = s.schedule()
    assert sorted(out.finished_req_ids) == ["run", "wait"]


def test_max_tokens_and_max_model_len_finish_with_length():
    s, kv = make()
    s.add_request(req("a", 5, max_tokens=3))
    finished = None
    for _ in range(5):
        _, ups = step(s)
        finished = [u for u in ups if u.finish_reason] or finished
    assert finished[0].finish_reason == "length"
    assert kv.num_free_blocks == kv.num_blocks
