"""RMSNorm and fused residual-add + RMSNorm in Triton, with the reference's (HF's) numerics.

One program normalises one row. Statistics are fp32; the normalised row is rounded to the input's dtype
before the weight multiplies it, and the residual sum is rounded to its dtype before it is normalised,
exactly as ``reference.rms_norm`` / ``reference.fused_add_rms_norm`` do, so greedy outputs match HF's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.pdl import launch_kwargs, pdl_begin


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    n_cols, inner, eps,
    stride_xa, stride_xb, stride_ra, stride_rb,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    row = tl.program_id(0)
    # Rows are indexed as (a, b) so a [tokens, heads, head_dim] view of a fused qkv needs no copy.
    a = (row // inner).to(tl.int64)
    b = row % inner
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + a * stride_xa + b * stride_xb + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + a * stride_ra + b * stride_rb + cols, mask=mask, other=0.0)
        summed = (x + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row.to(tl.int64) * n_cols + cols, summed, mask=mask)
        x = summed.to(tl.float32)
        norm_dtype = residual_out_ptr.dtype.element_ty
    else:
        norm_dtype = x_ptr.dtype.element_ty
    variance = tl.sum(x * x, 0) / n_cols
    normed = (x * tl.math.rsqrt(variance + eps)).to(norm_dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * normed.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``t`` as (a, b) rows of its last dimension without copying where its strides allow."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t, 1, 0, 0
    if t.dim() == 2:
        return t, 1, t.stride(0), 0
    if t.dim() > 3:
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t, t.shape[1], t.stride(0), t.stride(1)


def _launch(x, residual, weight, eps):
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n_cols},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    norm_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=norm_dtype, device=x.device) if residual is not None else None
    num_rows = x.numel() // n_cols if n_cols else 0
    if num_rows == 0:
        return out, residual_out
    xr, inner, sxa, sxb = _rows(x)
    if residual is not None:
        rr, _, sra, srb = _rows(residual)  # same shape as x, so the same (a, b) split
    else:
        rr, sra, srb = xr, 0, 0
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(num_rows,)](
        xr, rr, weight, out, residual_out if residual_out is not None else out,
        n_cols, inner, float(eps), sxa, sxb, sra, srb,
        BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps,
        enable_fp_fusion=False,  # keep every rounding of the reference (see triton_pointwise.py)
        **launch_kwargs(x),
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm over the last dimension; see ``reference.rms_norm``."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rms_norm(residual), residual)`` in one pass over both inputs.

    Like the reference, the inputs are left untouched and the new residual is a fresh tensor.
    """
    return _launch(x, residual, weight, eps)


@triton.jit
def _tp_row(x_ptr, stride_x, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The tensor-parallel norms' prologue: after the PDL wait, this program's row of partial sums."""
    pdl_begin(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    return row, cols, mask, x


@triton.jit
def _tp_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, buffer_ptrs, signal_ptrs,
    slot_offset, region_numel, flag_offset, n_cols, eps, stride_x, stride_r,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """One row: push this rank's partial sum into every peer's buffer, meet the same row's program on every
    other rank, sum the partials in rank order (so every rank gets the same bits), then residual add + RMSNorm
    as above. Pushing (stores over NVLink, which the sender does not wait for) and reading the peers' rows
    from local memory costs one one-way trip instead of a remote load's round trip."""
    row, cols, mask, x = _tp_row(x_ptr, stride_x, n_cols, BLOCK, PDL)
    elem = x_ptr.dtype.element_ty
    # This slot holds one region per source rank; this rank writes its row into its own region on every peer.
    row_off = slot_offset + row.to(tl.int64) * n_cols
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer = tl.load(buffer_ptrs + r).to(tl.pointer_type(elem))
            tl.store(peer + row_off + RANK * region_numel + cols, x, mask=mask)
    # Every thread's store is issued before one thread's release-signal (bar.sync, then a system-scope release
    # that is cumulative over them). Flags are per (slot, row, source): a rank flips its flag in a peer's pad to
    # 1 and the peer flips it back after waiting for it. The same slot is used again only two calls later (the
    # model alternates slots), after this rank has waited for every peer's signal of the call in between, which
    # each peer sends only after finishing this call; so neither the region nor the flag can still be in use.
    tl.debug_barrier()
    flag = flag_offset + row * WORLD
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer_pad = tl.load(signal_ptrs + r).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_pad + flag + RANK, 1, sem="release", scope="sys")
    my_pad = tl.load(signal_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(WORLD):
        if r != RANK:
            while tl.atomic_cas(my_pad + flag + r, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()
    mine = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(elem))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK:
            acc += x.to(tl.float32)
        else:
            # .cg: from L2, where the peer's stores landed, never a stale L1 line.
            acc += tl.load(mine + row_off + r * region_numel + cols, mask=mask, other=0.0,
                           cache_modifier=".cg").to(tl.float32)
    _add_norm_store(acc.to(elem).to(tl.float32), row, cols, mask, residual_ptr, stride_r, weight_ptr, out_ptr,
                    residual_out_ptr, n_cols, eps)


@triton.jit
def _add_norm_store(reduced, row, cols, mask, residual_ptr, stride_r, weight_ptr, out_ptr, residual_out_ptr,
                    n_cols, eps):
    """The tail of the tensor-parallel norms: ``reduced`` (the all-reduced row, rounded to the input's dtype as an
    all-reduce would hand it over, in fp32) + residual, then RMSNorm, as ``_rms_norm_kernel`` does."""
    res = tl.load(residual_ptr + row.to(tl.int64) * stride_r + cols, mask=mask, other=0.0)
    summed = (reduced + res.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row.to(tl.int64) * n_cols + cols, summed, mask=mask)
    h = summed.to(tl.float32)
    variance = tl.sum(h * h, 0) / n_cols
    normed = (h * tl.math.rsqrt(variance + eps)).to(residual_out_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * normed.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tp_add_rms_norm_ll_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, ll_ptrs, epoch_ptr,
    slot_offset, region_words, row_words, epoch_offset, n_cols, eps, stride_x, stride_r,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """The same reduction for a few 16-bit rows, with the flag inside the data (NCCL's "LL" idea): every
    element travels as one 32-bit word, (epoch << 16) | bits, written with plain stores into this rank's
    region of the slot on every peer. A 32-bit store is never torn, so a word whose upper half is this call's
    epoch carries this call's element: the reader spins on its own memory until every word of every peer's
    row has it. No fence and no remote atomic on the sender's path (the flag version pays a system-scope
    release and a remote exchange after its stores).

    Epochs are 16-bit, per (slot, row), kept by each rank in ``epoch_ptr`` and stepped by one per call; all
    ranks make the same calls, so they agree. A word's stale epoch is the previous call's (the slot's regions
    start zeroed, and the first epoch is 1), never equal to the current one, including across the wrap. Slot
    reuse follows the flag version's argument: a rank writes a slot again only two calls later, after every
    peer has finished the call that read it."""
    row, cols, mask, x = _tp_row(x_ptr, stride_x, n_cols, BLOCK, PDL)
    elem = x_ptr.dtype.element_ty
    epoch = (tl.load(epoch_ptr + epoch_offset + row) + 1) & 0xFFFF
    word = (epoch << 16) | (x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
    row_off = slot_offset + row.to(tl.int64) * row_words
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer = tl.load(ll_ptrs + r).to(tl.pointer_type(tl.int32))
            # 16-byte aligned (the host checks offsets and sizes, PeerAllReduce the buffers): vector stores.
            dst = tl.max_contiguous(tl.multiple_of(peer + row_off + RANK * region_words + cols, 16), 16)
            tl.store(dst, word, mask=mask)
    mine = tl.load(ll_ptrs + RANK).to(tl.pointer_type(tl.int32))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK:
            acc += x.to(tl.float32)
        else:
            src = tl.max_contiguous(tl.multiple_of(mine + row_off + r * region_words + cols, 16), 16)
            got = tl.load(src, mask=mask, other=0, volatile=True)
            pending = tl.sum(((((got >> 16) & 0xFFFF) != epoch) & mask).to(tl.int32), 0)
            while pending > 0:
                got = tl.load(src, mask=mask, other=0, volatile=True)
                pending = tl.sum(((((got >> 16) & 0xFFFF) != epoch) & mask).to(tl.int32), 0)
            acc += (got & 0xFFFF).to(tl.int16).to(elem, bitcast=True).to(tl.float32)
    tl.store(epoch_ptr + epoch_offset + row, epoch)
    _add_norm_store(acc.to(elem).to(tl.float32), row, cols, mask, residual_ptr, stride_r, weight_ptr, out_ptr,
                    residual_out_ptr, n_cols, eps)


def tp_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    buffer_ptrs: torch.Tensor, signal_ptrs: torch.Tensor, slot_offset: int, region_numel: int, flag_offset: int,
    rank: int, world: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-parallel ``fused_add_rms_norm`` whose input is still a per-rank partial sum: the all-reduce,
    the residual add and the norm in one kernel (``fused_add_rms_norm(all_reduce(x), residual, ...)``).

    ``buffer_ptrs`` / ``signal_ptrs``: int64 device tensors with every rank's address of one symmetric buffer
    (of x's dtype) and of its zeroed int32 signal pad. The call uses the buffer's elements from
    ``slot_offset``: ``world`` regions of ``region_numel`` (at least ``rows * hidden``), one per source rank,
    and the pad's flags from ``flag_offset`` (``rows * world`` of them). Every rank must make the same call.
    Two calls in a row must use different slots (buffer regions and flags): a rank reuses a slot only after
    its peers have started the call that follows the one that read it (see ``parallel.PeerAllReduce``)."""
    out, residual_out, residual, rows, block, num_warps = _tp_prepare(x, residual, weight, region_numel)
    if rows:
        _tp_add_rms_norm_kernel[(rows,)](
            x, residual, weight, out, residual_out, buffer_ptrs, signal_ptrs,
            slot_offset, region_numel, flag_offset, x.shape[1], float(eps), x.stride(0), residual.stride(0),
            RANK=rank, WORLD=world, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False, **launch_kwargs(x),
        )
    return out, residual_out



def tp_add_rms_norm_ll(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    ll_ptrs: torch.Tensor, epochs: torch.Tensor, slot_offset: int, region_words: int, epoch_offset: int,
    rank: int, world: int, row_words: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tp_add_rms_norm`` for 16-bit rows with the flag inside each word (``_tp_add_rms_norm_ll_kernel``).

    ``ll_ptrs``: int64 device tensor with every rank's address of one symmetric int32 buffer, zeroed before its
    first use; the call uses its words from ``slot_offset``: ``world`` regions of ``region_words``, one per
    source rank, each row at ``row_words`` (default: hidden) from the one before. ``epochs``: this rank's int32
    counters (zeroed at first), one per (slot, row) from ``epoch_offset``. Every rank makes the same calls; two
    calls in a row use different slots. A row's words keep their position from call to call only if
    ``row_words`` and the width stay the same (``PeerAllReduce`` fixes both): a word left by an older call of
    another layout could carry the current epoch."""
    if x.element_size() != 2:
        raise ValueError(f"the LL all-reduce carries 16-bit elements, got {x.dtype}")
    row_words = x.shape[-1] if row_words is None else row_words
    if x.shape[-1] % 4 or region_words % 4 or slot_offset % 4 or row_words % 4 or ll_ptrs.numel() != world:
        raise ValueError(f"the LL all-reduce needs hidden ({x.shape[-1]}), region ({region_words}), row stride "
                         f"({row_words}) and slot offset ({slot_offset}) divisible by 4 words and one buffer "
                         f"address per rank")
    if row_words < x.shape[-1] or x.shape[0] and (x.shape[0] - 1) * row_words + x.shape[-1] > region_words:
        raise ValueError(f"{x.shape[0]} rows of {x.shape[-1]} words {row_words} apart do not fit a region of "
                         f"{region_words} words")
    out, residual_out, residual, rows, block, num_warps = _tp_prepare(x, residual, weight, region_words)
    if rows:
        _tp_add_rms_norm_ll_kernel[(rows,)](
            x, residual, weight, out, residual_out, ll_ptrs, epochs, slot_offset, region_words, row_words,
            epoch_offset, x.shape[1], float(eps), x.stride(0), residual.stride(0),
            RANK=rank, WORLD=world, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False, **launch_kwargs(x),
        )
    return out, residual_out


def _tp_prepare(x, residual, weight, region_numel):
    if x.dim() != 2 or not x.is_contiguous() or residual.shape != x.shape or weight.shape != (x.shape[1],):
        raise ValueError(f"expected contiguous x [rows, hidden] with residual alike and weight [hidden]; got "
                         f"{tuple(x.shape)}, {tuple(residual.shape)}, {tuple(weight.shape)}")
    rows, n_cols = x.shape
    if rows * n_cols > region_numel:
        raise ValueError(f"{rows} x {n_cols} partial sums do not fit a region of {region_numel} elements")
    norm_dtype = torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=norm_dtype, device=x.device)
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else (8 if block <= 8192 else 16)
    return out, residual_out, residual, rows, block, num_warps


__all__ = ["rms_norm", "fused_add_rms_norm", "tp_add_rms_norm", "tp_add_rms_norm_ll"]
