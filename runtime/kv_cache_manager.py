"""Paged KV-cache bookkeeping: a block pool with reference counts and exact automatic prefix caching.

Plain Python, no tensors: the runner owns the KV tensors, this module only decides which block ids
each request's tokens live in.

Prefix caching. A full block is cached under the key ``(parent_cache_id, token_ids)`` where
``parent_cache_id`` is the unique id given to the previous block of the chain when *it* was cached (0 for
the first block). Dict lookups compare keys by equality after the hash matches, so a lookup can never
return a block holding other tokens: there is no hash collision to confirm away. Cache ids are never
reused, so a chain whose parent was evicted simply stops matching.

Free blocks sit in an intrusive doubly linked list in eviction order (LRU): a freed request gives its
blocks back tail first, so the end of a sequence is evicted before its (more shareable) beginning.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from pagedserve.runtime.request import Request


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "cache_key", "cache_id", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.cache_key: tuple[int, tuple[int, ...]] | None = None
        self.cache_id = 0  # > 0 while this block is in the prefix cache
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.cache_id > 0})"


class FreeBlockQueue:
    """Doubly linked list of free blocks threaded through the blocks themselves: O(1) pop, append, remove."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.num_free_blocks = 0
        prev = self.head
        for block in blocks:
            prev.next_free = block
            block.prev_free = prev
            prev = block
        prev.next_free = self.tail
        self.tail.prev_free = prev
        self.num_free_blocks = len(blocks)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        block = self.head.next_free
        if block is self.tail or block is None:
            raise RuntimeError("no free KV-cache block left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        prev.next_free = nxt  # type: ignore[union-attr]
        nxt.prev_free = prev  # type: ignore[union-attr]
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free
        last.next_free = block  # type: ignore[union-attr]
        block.prev_free = last
        block.next_free = self.tail
        self.tail.prev_free = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        out, block = [], self.head.next_free
        while block is not self.tail:
            out.append(block.block_id)  # type: ignore[union-attr]
            block = block.next_free  # type: ignore[union-attr]
        return out


class KVCacheManager:
    """Allocates blocks to requests, shares cached prefixes, evicts unreferenced cached blocks LRU."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[tuple[int, tuple[int, ...]], KVCacheBlock] = {}
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request are already in the cache (or known uncacheable).
        self.num_cached_blocks: dict[str, int] = {}
        self._next_cache_id = itertools.count(1)
        # Prefix-cache statistics in tokens, as vLLM's vllm:prefix_cache_queries / _hits count them.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free), 0..1."""
        return 1.0 - self.free_queue.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    # ----------------------------------------------------------------------------- prefix cache
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of ``request`` in whole blocks, and its length in tokens.

        At least one token is always left to compute, so the last prompt token's logits exist.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // bs
        hits: list[KVCacheBlock] = []
        parent = 0
        cached = self.cached
        for i in range(max_blocks):
            block = cached.get((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            if block is None:
                break
            hits.append(block)
            parent = block.cache_id
        # Statistics are counted by the caller once the request is admitted, not per look-up.
        return hits, len(hits) * bs

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Enter into the cache every block of ``request`` that the first ``num_tokens`` tokens fill."""
        bs = self.block_size
        rid = request.request_id
        start = self.num_cached_blocks.get(rid, 0)
        end = num_tokens // bs
        if end <= start:
            return
        tokens = request.all_token_ids
        parent = blocks[start - 1].cache_id if start > 0 else 0
        cached = self.cached
        for i in range(start, end):
            block = blocks[i]
            if block.cache_id == 0:
                key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
                if (i > 0 and parent == 0) or key in cached:
                    # Either the chain above is not cached (nothing below could be found again), or an
                    # identical block was cached concurrently and that one is kept: this block and the
                    # ones after it in this request stay private.
                    self.num_cached_blocks[rid] = end
                    return
                block.cache_key = key
                block.cache_id = next(self._next_cache_id)
                cached[key] = block
            parent = block.cache_id
        self.num_cached_blocks[rid] = end

    # ----------------------------------------------------------------------------- allocation
    def _take_free_block(self) -> KVCacheBlock:
        block = self.free_queue.popleft()
        if block.cache_id:
            # Evict: the least recently freed cached block goes first.
            del self.cached[block.cache_key]  # type: ignore[arg-type]
            block.cache_key = None
            block.cache_id = 0
        block.ref_cnt = 1
        return block

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        ``new_computed_blocks`` are prefix-cache hits from :meth:`get_computed_blocks` for a request that
        holds no blocks yet (their tokens count as computed). Returns the ids of the blocks appended to
        the request's block table, or ``None`` (and changes nothing) when too few blocks are free.
        """
        rid = request.request_id
        req_blocks = self.req_to_blocks.get(rid)
        if req_blocks is None:
            req_blocks = self.req_to_blocks[rid] = []
        hits = new_computed_blocks or ()
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        total = num_computed + num_new_tokens
        num_required = -(-total // self.block_size)
        num_new_blocks = num_required - len(req_blocks) - len(hits)
        # Hit blocks sitting in the free queue stop being free when touched.
        num_evictable_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks + num_evictable_hits > self.free_queue.num_free_blocks:
            if not req_blocks:
                del self.req_to_blocks[rid]
            return None
        new_ids: list[int] = []
        for block in hits:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1
            req_blocks.append(block)
            new_ids.append(block.block_id)
        if hits:
            self.num_cached_blocks[rid] = len(req_blocks)
        for _ in range(num_new_blocks):
            block = self._take_free_block()
            req_blocks.append(block)
            new_ids.append(block.block_id)
        if self.enable_prefix_caching and total // self.block_size > self.num_cached_blocks.get(rid, 0):
            self._cache_full_blocks(request, req_blocks, min(total, request.num_tokens))
        return new_ids

    def free(self, request: Request) -> None:
        """Release a finished or preempted request's blocks, tail first."""
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        if not blocks:
            return
        self._release(reversed(blocks))

    def trim(self, request: Request, num_tokens: int) -> int | None:
        """Give back the blocks of ``request`` beyond those its first ``num_tokens`` tokens need (the slots of
        rejected speculative tokens). Returns how many blocks it keeps, or None when nothing was freed.

        The freed blocks are never in the prefix cache: blocks are cached only up to the request's verified
        tokens, which all lie below ``num_tokens``."""
        blocks = self.req_to_blocks.get(request.request_id)
        keep = -(-num_tokens // self.block_size)
        if not blocks or len(blocks) <= keep:
            return None
        extra = blocks[keep:]
        del blocks[keep:]
        self._release(reversed(extra))
        return keep

    def _release(self, blocks: Iterable[KVCacheBlock]) -> None:
        append = self.free_queue.append
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                append(block)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block that no request holds. Returns False if some are in use."""
        if self.free_queue.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.cache_key = None
            block.cache_id = 0
        self.cached.clear()
        return True
