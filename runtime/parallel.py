"""Tensor-parallel state of this process: rank, world size, and the collectives the model layers use.

With one rank everything here is a no-op, so the single-GPU and CPU paths pay nothing for it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("pagedserve.parallel")

# "auto" (the default): one-shot all-reduces over peer-mapped memory on CUDA when the GPUs can map each other's
# memory, NCCL otherwise; "nccl": always NCCL.
ALLREDUCE_ENV = "PAGEDSERVE_TP_ALLREDUCE"
# Messages up to this size take the one-shot path (a decode step's activations: batch x hidden x 2 bytes is
# 2 MiB at batch 256 for a 4096-wide model); larger ones (prefill chunks) go to NCCL's bandwidth-optimal rings.
PEER_ALLREDUCE_MAX_BYTES = 4 << 20
# Rows up to which the all-reduce runs inside the RMSNorm kernel (one cross-GPU signal per row; fewer where the
# signal pad holds fewer rows of flags: PeerAllReduce.norm_max_rows). Measured on two H200s (bench/results/allreduce_h200x2.json), per
# all-reduce + add + norm against the one-shot all-reduce and a separate norm: 4.4 vs 8.5 us for 1 row, 5.5 vs
# 11.5 for 32, 10.7 vs 17.5 for 128, 15.0 vs 24.6 for 256. (With the first, pulling version of the kernel the
# fused path lost from 32 rows on, and this was 16.)
FUSED_NORM_MAX_ROWS = 256
# Up to this many rows (and LL_MAX_COLS columns) of a 16-bit model the fused norm carries its flag inside each
# 32-bit word instead of signalling after its stores (kernels.triton_norm.tp_add_rms_norm_ll): no system-scope
# fence or remote atomic on the way. Measured on two H200s (bench/results/allreduce_h200x2_s6.json): 3.2 vs 4.4 us
# for 1 row, 3.4 vs 4.7 for 8. PAGEDSERVE_TP_LL=0 turns it off (read by each rank at start; the ranks agree).
LL_MAX_ROWS = 8
LL_MAX_COLS = 16384
LL_ENV = "PAGEDSERVE_TP_LL"


class PeerAllReduce:
    """All-reduce for small messages over memory every rank maps (torch symmetric memory: NVLink or PCIe P2P).

    Each rank copies its input into its own slot of a symmetric buffer and one kernel reads every peer's
    slot and sums them (torch's ``one_shot_all_reduce``, with a signal-pad barrier before the reads and
    after them, so the buffer can be reused by the next call at once). For decode-sized messages this is a
    few microseconds against NCCL's ring at roughly 10-20, and a tensor-parallel decode step makes two per
    layer. It captures into CUDA graphs. NVLink multicast (multimem) is not used: it stays off on shared hosts.
    """

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = PEER_ALLREDUCE_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.group_name = group.group_name
        self.max_numel = max_bytes // torch.tensor([], dtype=dtype).element_size()
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed by older torch; deprecated (and a no-op) in newer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(self.group_name)
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        ops = torch.ops.symm_mem
        self._copy_out = getattr(ops, "one_shot_all_reduce_copy_out", None)  # copy and reduce in one kernel
        self._out = ops.one_shot_all_reduce_out
        # The fused all-reduce + residual add + RMSNorm (kernels.triton_norm.tp_add_rms_norm) has a buffer and
        # signal pad of its own, in two slots: the model alternates them (after attention: slot 0, after the
        # MLP: slot 1), so a rank writes a slot again only after its peers have entered the next call, which
        # they do only after they finished reading that slot. A slot has one region per source rank (ranks
        # push their rows into each other's buffers) and its own flags in the pad.
        self.rank, self.world = group.rank(), group.size()
        self.slot_numel = self.max_numel
        self.region_numel = self.slot_numel // self.world
        self.norm_buffer = symm_mem.empty(2 * self.slot_numel, dtype=dtype, device=device)
        norm = symm_mem.rendezvous(self.norm_buffer, self.group_name)
        self.norm_handle = norm
        self.norm_buffer_ptrs = torch.tensor(list(norm.buffer_ptrs), dtype=torch.int64, device=device)
        self.norm_signal_ptrs = torch.tensor(list(norm.signal_pad_ptrs), dtype=torch.int64, device=device)
        # torch 2.11 pads are 9 KiB; a torch that does not say gets the smallest size seen (2 KiB, older torch).
        pad_bytes = int(getattr(norm, "signal_pad_size", 0) or 2048)
        self.norm_max_rows = pad_bytes // (4 * self.world * 2)
        # The LL variant's own buffer (never shared with the flag version, whose data could look like a flag):
        # two slots of one region per source rank, LL_MAX_ROWS x LL_MAX_COLS 32-bit words each, zeroed; and
        # this rank's epoch per (slot, row).
        self.ll = os.environ.get(LL_ENV, "1").strip() != "0" and torch.tensor([], dtype=dtype).element_size() == 2
        self.ll = _all_agree(self.ll, group, device)  # a rank without it would skip the rendezvous below
        self.ll_cols = None  # the one width the LL rows take (the first seen), so rows keep their positions
        if self.ll:
            self.ll_region = LL_MAX_ROWS * LL_MAX_COLS
            self.ll_buffer = symm_mem.empty(2 * self.world * self.ll_region, dtype=torch.int32, device=device)
            self.ll_buffer.zero_()
            self.ll_handle = symm_mem.rendezvous(self.ll_buffer, self.group_name)
            self.ll_ptrs = torch.tensor(list(self.ll_handle.buffer_ptrs), dtype=torch.int64, device=device)
            if any(p % 16 for p in self.ll_handle.buffer_ptrs):  # the kernel's vector stores need 16 bytes
                raise RuntimeError(f"LL buffers not 16-byte aligned: {list(self.ll_handle.buffer_ptrs)}")
            self.ll_epochs = torch.zeros(2 * LL_MAX_ROWS, dtype=torch.int32, device=device)
        # Zeroed pads and LL buffer on this rank before make_peer_all_reduce's agreement (a collective every rank
        # joins, so no rank can signal or push into a peer's memory before it is ready).
        torch.cuda.synchronize(device)

    def fits(self, x: torch.Tensor) -> bool:
        # torch's one-shot kernel needs a byte count divisible by 4 (bf16: an even number of elements).
        return (x.dtype == self.dtype and x.is_cuda and x.is_contiguous() and 0 < x.numel() <= self.max_numel
                and (x.numel() * x.element_size()) % 4 == 0)

    def fuses_norm(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (a row-parallel layer's partial output) can be reduced inside the norm that follows."""
        return (x.dim() == 2 and x.dtype == self.dtype and x.is_cuda and x.is_contiguous()
                and 0 < x.shape[0] <= min(self.norm_max_rows, FUSED_NORM_MAX_ROWS) and x.numel() <= self.region_numel)

    def _takes_ll(self, rows: int, cols: int) -> bool:
        """Same answer on every rank for the same call (shape only, and the width first seen, which every rank
        sees first)."""
        if not (self.ll and rows <= LL_MAX_ROWS and cols <= LL_MAX_COLS and cols % 4 == 0):
            return False
        if self.ll_cols is None:
            self.ll_cols = cols
        return cols == self.ll_cols

    def add_rms_norm(self, x, residual, weight, eps: float, slot: int):
        from pagedserve.kernels.triton_norm import tp_add_rms_norm, tp_add_rms_norm_ll

        if self._takes_ll(*x.shape):
            return tp_add_rms_norm_ll(x, residual, weight, eps, self.ll_ptrs, self.ll_epochs,
                                      slot * self.world * self.ll_region, self.ll_region, slot * LL_MAX_ROWS,
                                      self.rank, self.world, row_words=LL_MAX_COLS)
        return tp_add_rms_norm(x, residual, weight, eps, self.norm_buffer_ptrs, self.norm_signal_ptrs,
                               slot * self.slot_numel, self.region_numel, slot * self.norm_max_rows * self.world,
                               self.rank, self.world)

    def all_reduce_(self, x: torch.Tensor) -> None:
        flat = x.view(-1)
        buf = self.buffer[: flat.numel()]
        if self._copy_out is not None:
            self._copy_out(buf, flat, "sum", self.group_name, flat)
        else:
            buf.copy_(flat)
            self._out(buf, "sum", self.group_name, flat)


def make_peer_all_reduce(group, device: torch.device, dtype: torch.dtype) -> PeerAllReduce | None:
    """A PeerAllReduce for ``group`` if every rank can make one (they agree), else None (NCCL for all).

    Collective: every rank of ``group`` must call it."""
    mode = os.environ.get(ALLREDUCE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "nccl"):
        raise ValueError(f"{ALLREDUCE_ENV}: must be 'auto' or 'nccl', got {mode!r}")
    # torch's one-shot kernel is built for bf16 and fp32 only; fp16 models keep NCCL.
    if mode == "nccl" or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float32):
        return None
    # First what each rank can tell alone (the rendezvous below is itself a collective: a rank that skipped
    # it would leave the others waiting in it), agreed by all; then the set-up, agreed again.
    reason = _local_peer_problem(device, group.size())
    if not _all_agree(reason is None, group, device):
        if reason is not None:
            logger.warning("one-shot peer all-reduce unavailable (%s); using NCCL for every all-reduce", reason)
        return None
    peer, error = None, None
    try:
        peer = PeerAllReduce(group, device, dtype)
    except Exception as e:  # noqa: BLE001 - the mapping failed after all: NCCL serves instead
        error = e
    if not _all_agree(peer is not None, group, device):
        if error is not None:
            logger.warning("one-shot peer all-reduce unavailable (%r); using NCCL for every all-reduce", error)
        return None
    logger.info("tensor-parallel all-reduces up to %d KiB: one-shot over peer memory; larger: NCCL",
                peer.max_numel * peer.buffer.element_size() >> 10)
    return peer


def _local_peer_problem(device: torch.device, world: int) -> str | None:
    """Why this rank cannot use the one-shot path, as far as it can tell alone (ranks use cuda:0..world-1)."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401

        torch.ops.symm_mem.one_shot_all_reduce_out  # noqa: B018 - raises on a torch without the op
    except Exception as e:  # noqa: BLE001
        return f"torch symmetric memory is missing: {e!r}"
    for other in range(world):
        if other != device.index and not torch.cuda.can_device_access_peer(device.index, other):
            return f"cuda:{device.index} cannot map cuda:{other}'s memory (no peer access)"
    return None


def _all_agree(ok: bool, group, device: torch.device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    # The process group the model's collectives run on (None: the default group). Tensor-parallel engines
    # give it a short timeout of its own, so a hung rank is reported within seconds, not after the default's.
    group: Any = None
    # One-shot all-reduce for small messages (CUDA, GPUs that map each other's memory); None: NCCL/gloo only.
    peer: PeerAllReduce | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        if self.size > 1:
            if self.peer is not None and self.peer.fits(x):
                self.peer.all_reduce_(x)
            else:
                dist.all_reduce(x, group=self.group)
        return x

    def reduces_in_norm(self, x: torch.Tensor) -> bool:
        """True when a row-parallel output ``x`` should be left unreduced for the fused all-reduce + add +
        RMSNorm that follows it (``add_rms_norm``). Depends on the shape only, so every rank agrees."""
        return self.peer is not None and self.peer.fuses_norm(x)

    def add_rms_norm(self, x, residual, weight, eps: float, slot: int):
        """``fused_add_rms_norm(all_reduce(x), residual)`` in one kernel (when ``reduces_in_norm(x)``)."""
        return self.peer.add_rms_norm(x, residual, weight, eps, slot)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Like :meth:`all_gather_last_dim`, but only rank 0 receives the result (the others get None)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None


SINGLE = TPGroup()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
