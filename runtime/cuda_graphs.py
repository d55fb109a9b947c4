"""Decode steps replayed as CUDA graphs, one per bucketed batch size (gpt-fast's static buffers).

A pure-decode step (one query token per request) has the same kernels and shapes for every batch of the
same bucket size, so its whole forward pass is captured once and replayed: the CPU launches one graph
instead of hundreds of kernels. Attention reads its sequence lengths from a device buffer, and its grid
is sized for ``max_model_len``, so one graph serves every context length.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pagedserve.runtime.layers import AttentionMetadata

logger = logging.getLogger("pagedserve.cuda_graphs")


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    def __init__(self, model, max_bs: int, max_blocks_per_seq: int, max_model_len: int, device) -> None:
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.ids = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.slots = torch.full((self.max_bs,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(self.max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            self.slots[:bs], self.block_tables[:bs], self.seq_lens[:bs], self.query_start_loc[: bs + 1],
            max_query_len=1, max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.monotonic()
        pool = None
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            for _ in range(2):  # compile Triton kernels and settle the allocator outside the capture
                self.model(self.ids[:bs], self.positions[:bs], meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.ids[:bs], self.positions[:bs], meta)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch %s) in %.1fs", len(self.sizes),
                    f"{self.sizes[0]}..{self.sizes[-1]}", time.monotonic() - t0)

    def bucket(self, n: int) -> int | None:
        if n > self.max_bs:
            return None
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def run(
        self, input_ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray, block_tables: np.ndarray,
        seq_lens: np.ndarray,
    ) -> torch.Tensor:
        n = len(seq_lens)
        bs = self.bucket(n)
        graph, out = self.graphs[bs]
        self.ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(torch.from_numpy(positions), non_blocking=True)
        self.slots[:n].copy_(torch.from_numpy(slots), non_blocking=True)
        width = block_tables.shape[1]
        self.block_tables[:n, :width].copy_(torch.from_numpy(block_tables), non_blocking=True)
        self.seq_lens[:n].copy_(torch.from_numpy(seq_lens.astype(np.int32)), non_blocking=True)
        if bs > n:  # padding rows write nothing and attend to one (ignored) token
            self.slots[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        graph.replay()
        return out[:n]
