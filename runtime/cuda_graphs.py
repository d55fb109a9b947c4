"""Decode steps replayed as CUDA graphs, one per bucketed batch size (gpt-fast's static buffers).

A pure-decode step (one query token per request) has the same kernels and shapes for every batch of the
same bucket size, so its whole forward pass is captured once and replayed: the CPU launches one graph
instead of hundreds of kernels. Attention reads its sequence lengths from a device buffer, and its grid
is sized for ``max_model_len``, so one graph serves every context length.

Speculative decoding adds graphs of ``q`` query tokens per request (``q = k + 1``: a verification, or a
draft model's catch-up). A request with fewer than ``q`` tokens is padded at its end: the padding tokens
write no KV (slot -1), sit after the real ones (causal attention keeps the real queries from seeing them)
and their outputs are ignored. Without these graphs a verification step ran the 8B model eagerly, ~30 ms
of host launch work on an H200 against ~5 ms of device time.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pagedserve.runtime.layers import AttentionMetadata
from pagedserve.runtime.staging import HostStaging

logger = logging.getLogger("pagedserve.cuda_graphs")


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    def __init__(self, model, max_bs: int, max_blocks_per_seq: int, max_model_len: int, device,
                 query_lens: tuple[int, ...] = (1,), staging: HostStaging | None = None) -> None:
        self.model = model
        self.staging = staging or HostStaging(torch.device(device))  # the runner's, shared by its graphs
        self.device = device
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = max_blocks_per_seq
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.query_lens = tuple(sorted(set(query_lens)))
        max_tokens = self.max_bs * self.query_lens[-1]
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slots = torch.full((max_tokens,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(self.max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=device)
        self.query_start_locs = {
            q: torch.arange(0, q * (self.max_bs + 1), q, dtype=torch.int32, device=device) for q in self.query_lens
        }
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, bs: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            self.slots[:bs * q], self.block_tables[:bs], self.seq_lens[:bs], self.query_start_locs[q][: bs + 1],
            max_query_len=q, max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.monotonic()
        pool = None
        for q in reversed(self.query_lens):
            self.seq_lens.fill_(q)  # every query of a (padding) row sits at a valid position
            for bs in reversed(self.sizes):
                meta = self._meta(bs, q)
                n = bs * q
                for _ in range(2):  # compile Triton kernels and settle the allocator outside the capture
                    self.model(self.ids[:n], self.positions[:n], meta)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(self.ids[:n], self.positions[:n], meta)
                if pool is None:
                    pool = graph.pool()
                self.graphs[bs, q] = (graph, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs (batch %s, query tokens per request %s) in %.1fs", len(self.graphs),
                    f"{self.sizes[0]}..{self.sizes[-1]}", "/".join(map(str, self.query_lens)),
                    time.monotonic() - t0)

    def query_len_for(self, num_sched: np.ndarray, starts: np.ndarray) -> int | None:
        """The captured query length a step with these per-request token counts can be padded to, if any."""
        n = len(num_sched)
        if n > self.max_bs:
            return None
        longest = int(num_sched.max())
        for q in self.query_lens:
            if q >= longest:
                if q > 1 and int(starts.max()) + q > self.max_model_len:
                    return None  # padding would run past the last position
                return q
        return None

    def bucket(self, n: int) -> int | None:
        if n > self.max_bs:
            return None
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def run(
        self, input_ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray, block_tables: np.ndarray,
        seq_lens: np.ndarray, q: int = 1,
    ) -> torch.Tensor:
        """Replay the (bucket, q) graph; inputs hold exactly ``q`` tokens per request (padded by the caller),
        ``seq_lens`` counts each request's padding. Returns ``[len(seq_lens) * q, hidden]``."""
        n = len(seq_lens)
        bs = self.bucket(n)
        t = n * q
        host = self.staging.host
        self.ids[:t].copy_(input_ids, non_blocking=True)
        self.positions[:t].copy_(host(positions, torch.long), non_blocking=True)
        self.slots[:t].copy_(host(slots, torch.long), non_blocking=True)
        width = block_tables.shape[1]
        self.block_tables[:n, :width].copy_(host(block_tables, torch.int32), non_blocking=True)
        self.seq_lens[:n].copy_(host(seq_lens, torch.int32), non_blocking=True)
        if bs > n:  # padding rows write nothing and attend to q (ignored) tokens
            self.slots[t:bs * q].fill_(-1)
            self.seq_lens[n:bs].fill_(q)
        return self._replay(bs, q)[:t]

    def _replay(self, bs: int, q: int) -> torch.Tensor:
        graph, out = self.graphs[bs, q]
        graph.replay()
        return out
