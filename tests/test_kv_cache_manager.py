"""KV-cache manager: exact block ids, reference counts, prefix hits and free-list order."""

import pytest

from pagedserve.runtime.kv_cache_manager import FreeBlockQueue, KVCacheBlock, KVCacheManager
from pagedserve.runtime.request import Request
from pagedserve.runtime.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_tokens=16)


def test_free_queue_is_a_linked_list_in_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.block_ids() == [0, 1, 2, 3, 4]
    q.remove(blocks[2])
    assert q.popleft().block_id == 0
    q.append(blocks[2])
    assert q.block_ids() == [1, 3, 4, 2]
    assert len(q) == 4


def test_allocation_block_ids_and_free_order():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = req("a", list(range(10)))  # 10 tokens -> 3 blocks
    assert kv.allocate_slots(a, 10) == [0, 1, 2]
    b = req("b", list(range(5)))
    assert kv.allocate_slots(b, 5) == [3, 4]
    assert kv.num_free_blocks == 3
    assert kv.usage == pytest.approx(5 / 8)
    a.num_computed_tokens = 10
    a.all_token_ids.extend([99, 98])  # 12 tokens: still 3 blocks
    assert kv.allocate_slots(a, 2) == []
    a.all_token_ids.append(97)  # 13th token needs block 4 of a
    a.num_computed_tokens = 12
    assert kv.allocate_slots(a, 1) == [5]
    kv.free(a)
    # Freed tail first: a's last block is evicted first.
    assert kv.free_queue.block_ids() == [6, 7, 5, 2, 1, 0]
    assert [blk.ref_cnt for blk in kv.blocks] == [0, 0, 0, 1, 1, 0, 0, 0]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    a = req("a", list(range(16)))
    assert kv.allocate_slots(a, 16) is None
    assert kv.num_free_blocks == 3
    assert kv.block_ids("a") == []


def test_prefix_cache_hits_share_blocks_with_ref_counts():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = req("a", prompt)
    hits, n = kv.get_computed_blocks(a)
    assert (hits, n) == ([], 0)
    assert kv.allocate_slots(a, 10) == [0, 1, 2]
    b = req("b", prompt + [7, 7])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert kv.allocate_slots(b, 4, hits) == [0, 1, 3]
    assert [kv.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    # A prompt that is exactly 2 blocks long must leave its last token to compute: only 1 block hits.
    c = req("c", prompt[:8])
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and n == 4


def test_cached_blocks_survive_free_and_are_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])  # blocks 0,1 full (cached), block 2 partial
    kv.allocate_slots(a, 5)
    kv.free(a)
    assert kv.free_queue.block_ids() == [3, 2, 1, 0]
    assert len(kv.cached) == 2
    # Same prefix again: hits blocks 0 and 1 (touched out of the free queue).
    a2 = req("a2", [1, 2, 3, 4, 9])
    hits, n = kv.get_computed_blocks(a2)
    assert [h.block_id for h in hits] == [0, 1] and n == 4
    assert kv.allocate_slots(a2, 1, hits) == [0, 1, 3]
    assert kv.free_queue.block_ids() == [2]
    kv.free(a2)
    assert kv.free_queue.block_ids() == [2, 3, 1, 0]
    # A new request needing 3 blocks takes 2 and 3 (uncached), then evicts cached block 1 (LRU order).
    b = req("b", [8] * 6)
    assert kv.allocate_slots(b, 6) == [2, 3, 1]
    assert kv.blocks[1].cache_key[1] == (8, 8)  # evicted, then cached again with b's tokens
    # Block 0 is still cached; block 1 went, so the chain [1,2],[3,4] now hits one block only.
    c = req("c", [1, 2, 3, 4, 5])
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and n == 2


def test_prefix_match_is_exact_across_chains():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = req("a", [1, 2, 3, 4, 0])
    kv.allocate_slots(a, 5)
    # Same second block content, different first block: must not hit the second block.
    b = req("b", [9, 9, 3, 4, 0])
    hits, n = kv.get_computed_blocks(b)
    assert hits == [] and n == 0
    c = req("c", [1, 2, 3, 5, 0])
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and n == 2


def test_decode_caches_block_when_it_fills():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = req("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    assert len(kv.cached) == 1
    a.num_computed_tokens = 3
    a.all_token_ids.append(4)
    kv.allocate_slots(a, 1)
    assert len(kv.cached) == 2
    b = req("b", [1, 2, 3, 4, 5])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    assert kv.reset_prefix_cache() is False
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.cached == {}
