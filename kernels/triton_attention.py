"""Paged attention in Triton: split-KV decode with a merge step, and causal prefill/extend over paged K/V.

Layouts are those of ``reference.py``. One public entry point, :func:`paged_attention`, launches

- ``_decode_kernel`` for every sequence whose query length is 1: one program per (sequence, KV head, split of
  the context). The program loads the query rows of all ``group`` query heads sharing that KV head, so each K/V
  byte is read once per step (GQA), and walks its share of the context in tiles of ``BLOCK_N`` tokens gathered
  from the block table (flash-decoding). With more than one split, each writes a normalised partial output
  and its log-sum-exp, and ``_merge_kernel`` combines them.
- ``_prefill_kernel`` for every sequence whose query length is above 1: one program per (query head, tile of
  ``BLOCK_M`` queries, sequence). Query ``j`` of a sequence sits at position ``seq_len - q_len + j``, so a
  cached prefix (prefix-cache hit or earlier chunks) is simply the keys before the first query.

Both are launched in one call for a mixed batch; each program checks its sequence's query length on the
device and returns at once if the sequence belongs to the other kernel, so nothing needs a host sync when the
caller passes ``max_query_len`` and ``max_seq_len``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pagedserve.kernels.pdl import launch_kwargs, pdl_begin

LOG2E = 1.4426950408889634

# How decode attention uses programmatic dependent launch (kernels/pdl.py), read at import:
#   "early" (default): the decode kernel and its merge both launch early, like every other kernel;
#   "late": the decode kernel only starts once the kernel before it has finished (it still lets the merge
#           launch early);
#   "off": no attention kernel launches early or lets the next kernel launch early.
# On an H100, decode attention called back to back read 15-16% fewer GB/s at batch 32 with "early" than with
# "off" (bench/NOTES_kernels.md, session 7); not yet measured inside the model, so the default is unchanged.
# With "late", prefill still launches early (a decode kernel after it in the same call waits for it to finish).
ATTN_PDL = os.environ.get("PAGEDSERVE_ATTN_PDL", "early")
if ATTN_PDL not in ("early", "late", "off"):
    raise ValueError(f"PAGEDSERVE_ATTN_PDL={ATTN_PDL!r}: expected early, late or off")


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    # The Triton interpreter (CPU) multiplies bf16 operands as raw integers (seen with triton 3.9), so
    # interpreted runs upcast to fp32 first; the rounding of the operands is the same either way.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _kv_tile_offsets(block_table_row, tok, tok_mask, stride_b, stride_t, PAGE_SIZE: tl.constexpr):
    """Element offsets (int64) of tokens ``tok`` of one sequence inside a paged cache."""
    page = tl.load(block_table_row + tok // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
    return page * stride_b + (tok % PAGE_SIZE) * stride_t


# Integer arguments that change from step to step (split sizes, block-table widths, tile counts) are not
# specialised: Triton would otherwise compile a variant for each of "== 1", "divisible by 16" and "other"
# of every such value, in the middle of serving (about a second each; seen on an H200 as 2x slower
# prefill steps and a draft model 13x slower than its kernels). Constexpr variants stay, and
# ModelRunner.warm_up compiles them before the first request.
@triton.jit(do_not_specialize=["partition_size", "stride_bt", "num_splits"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    qk_scale, partition_size, group, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ps, stride_ph,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr, UPCAST_DOT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    # KV heads fastest: the heads of one (sequence, split) read neighbouring rows of the same cache blocks
    # side by side (measured no faster than sequence-fastest on an H100, run 2, but no slower either).
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = split * partition_size
    hi = tl.minimum(lo + partition_size, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * group + g
    head_mask = g < group
    q = tl.load(
        q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=head_mask[:, None], other=0.0,
    )
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)
        tok_mask = tok < hi
        k_off = _kv_tile_offsets(block_table_row, tok, tok_mask, stride_kb, stride_kt, PAGE_SIZE)
        v_off = _kv_tile_offsets(block_table_row, tok, tok_mask, stride_vb, stride_vt, PAGE_SIZE)
        k = tl.load(k_base + k_off[:, None] + d[None, :], mask=tok_mask[:, None], other=0.0)
        qk = _mma(q, tl.trans(k), tl.zeros([GROUP_PAD, BLOCK_N], tl.float32), UPCAST_DOT) * qk_scale
        qk = tl.where(tok_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_off[:, None] + d[None, :], mask=tok_mask[:, None], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
        m_i = m_new

    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + q_start.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None],
        )
    else:
        # An empty split (past the end of a short sequence) leaves l_i == 0: it gets weight exp2(-inf) = 0.
        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        # part_out is [num_seqs, num_heads, num_splits, HEAD_DIM] and part_lse the same without HEAD_DIM.
        part = seq.to(tl.int64) * stride_ps + heads * stride_ph + split * HEAD_DIM
        tl.store(part_out_ptr + part[:, None] + d[None, :], out, mask=head_mask[:, None])
        tl.store(part_lse_ptr + part // HEAD_DIM, lse, mask=head_mask)
        if FUSED_MERGE:
            # The last split of this (sequence, KV head) to finish merges all of them: no second launch.
            # The counter's acq_rel atomic orders every split's stores before the merger's loads, which
            # bypass L1 (.cg); the merger puts the counter back to 0 for the next launch (or graph replay).
            counter = counter_ptr + seq * tl.num_programs(0) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
                den = tl.zeros([GROUP_PAD], tl.float32)
                num = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
                base = seq.to(tl.int64) * stride_ps + heads * stride_ph
                for s in range(0, num_splits):
                    lse_s = tl.load(part_lse_ptr + (base + s * HEAD_DIM) // HEAD_DIM, mask=head_mask,
                                    other=float("-inf"), cache_modifier=".cg")
                    part_s = tl.load(part_out_ptr + (base + s * HEAD_DIM)[:, None] + d[None, :],
                                     mask=head_mask[:, None], other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m, lse_s)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m - m_safe)
                    w = tl.exp2(lse_s - m_safe)
                    den = den * alpha + w
                    num = num * alpha[:, None] + part_s * w[:, None]
                    m = m_new
                merged = num / tl.where(den > 0.0, den, 1.0)[:, None]
                tl.store(
                    out_ptr + q_start.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                    merged.to(out_ptr.dtype.element_ty), mask=head_mask[:, None],
                )
                tl.atomic_xchg(counter, 0)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    query_start_loc_ptr, part_out_ptr, part_lse_ptr, out_ptr,
    num_splits, stride_ps, stride_ph, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_start != 1:
        return
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    part = seq.to(tl.int64) * stride_ps + head * stride_ph + s * HEAD_DIM
    lse = tl.load(part_lse_ptr + part // HEAD_DIM, mask=s < num_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    partial = tl.load(part_out_ptr + part[:, None] + d[None, :], mask=(s < num_splits)[:, None], other=0.0)
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, k_base, v_base, block_table_row, lo, hi, q_pos, seq_len, qk_scale,
    stride_kb, stride_kt, stride_vb, stride_vt,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Online-softmax accumulation over key tiles ``[lo, hi)``; masks only when ``CAUSAL_MASK``."""
    d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)
        if CAUSAL_MASK:
            tok_mask = tok < seq_len
            k_off = _kv_tile_offsets(block_table_row, tok, tok_mask, stride_kb, stride_kt, PAGE_SIZE)
            v_off = _kv_tile_offsets(block_table_row, tok, tok_mask, stride_vb, stride_vt, PAGE_SIZE)
            k = tl.load(k_base + k_off[:, None] + d[None, :], mask=tok_mask[:, None], other=0.0)
            v = tl.load(v_base + v_off[:, None] + d[None, :], mask=tok_mask[:, None], other=0.0)
        else:
            page = tl.load(block_table_row + tok // PAGE_SIZE).to(tl.int64)
            k = tl.load(k_base + (page * stride_kb + (tok % PAGE_SIZE) * stride_kt)[:, None] + d[None, :])
            v = tl.load(v_base + (page * stride_vb + (tok % PAGE_SIZE) * stride_vt)[:, None] + d[None, :])
        qk = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST_DOT) * qk_scale
        if CAUSAL_MASK:
            visible = (tok[None, :] <= q_pos[:, None]) & (tok[None, :] < seq_len)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_m_blocks", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    qk_scale, group, num_m_blocks,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    head = tl.program_id(0)
    m_block = num_m_blocks - 1 - tl.program_id(1)  # the longest (most keys) tiles start first
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if (q_len < 2) | (m_block * BLOCK_M >= q_len):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    d = tl.arange(0, HEAD_DIM)
    q_offs = (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None], other=0.0)
    q_pos = prefix + rows

    kv_head = head // group
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before the first row's position are visible to every row of the tile: no mask needed there.
    unmasked_end = ((prefix + m_block * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, block_table_row, 0, unmasked_end, q_pos, seq_len, qk_scale,
        stride_kb, stride_kt, stride_vb, stride_vt,
        HEAD_DIM, PAGE_SIZE, BLOCK_M, BLOCK_N, False, UPCAST_DOT,
    )
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, block_table_row, unmasked_end, hi, q_pos, seq_len, qk_scale,
        stride_kb, stride_kt, stride_vb, stride_vt,
        HEAD_DIM, PAGE_SIZE, BLOCK_M, BLOCK_N, True, UPCAST_DOT,
    )
    out = acc / l_i[:, None]
    o_offs = (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


# ------------------------------------------------------------------------------------------- launchers
@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _split_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head), for the decode kernel's fused merge; the kernel
    leaves them at zero. One buffer per device, never freed: CUDA graphs keep the address they captured, so a
    larger request adds a buffer instead of replacing it."""
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))
    return bufs[-1]


def decode_partition_size(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device,
    min_partition: int = 64, programs_per_sm: int = 4,
) -> int:
    """Tokens per split: enough splits to give the device ``programs_per_sm`` programs per SM, but none
    shorter than ``min_partition`` tokens (each split pays a query load and a partial-output write)."""
    if device.type == "cuda":
        target = programs_per_sm * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 8  # interpreted: a few splits are enough to exercise the merge
    base = max(1, num_seqs * num_kv_heads)
    splits = max(1, min(-(-target // base), -(-max_seq_len // min_partition)))
    per_split = -(-max_seq_len // splits)
    return max(block_n, -(-per_split // block_n) * block_n)


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected q [num_tokens, num_heads, head_dim] and k_cache/v_cache "
            f"[num_blocks, block_size, num_kv_heads, head_dim]; got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"head_dim {head_dim} vs cache {k_cache.shape[3]}, or num_heads {num_heads} not a multiple "
            f"of num_kv_heads {num_kv_heads}"
        )
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {head_dim} is not supported (a power of two from 16 to 256)")
    block_size = k_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1)")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be [num_seqs, max_blocks_per_seq] with contiguous rows")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError("seq_lens must be [num_seqs] and query_start_loc [num_seqs + 1]")
    if out.shape != q.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)}")


def _config(head_dim: int, interpreted: bool, max_query_len: int):
    """Tile shapes and launch settings of both kernels (``dec_*``: decode, ``pf_*``: prefill)."""
    if interpreted:
        # Small tiles so that small test shapes still cross many tile and page boundaries.
        return dict(dec_block_n=16, dec_warps=4, dec_stages=1, dec_min_partition=32, dec_programs_per_sm=4,
                    dec_fused_merge=True, pf_block_m=16, pf_block_n=16, pf_warps=4, pf_stages=1, pdl=False,
                    dec_early=True)
    # Prefill tiles from the run-2 sweep on an H100 (bench/NOTES_kernels.md): 64x64 with 4 warps is best up
    # to a few thousand queries; 128x128 with 8 warps wins on very long prompts.
    if max_query_len <= 16:
        pf_block_m, pf_block_n, pf_warps = 16, 64, 4
    elif max_query_len <= 4096 or head_dim < 128:
        pf_block_m, pf_block_n, pf_warps = 64, 64, 4
    else:
        pf_block_m, pf_block_n, pf_warps = 128, 128, 8
    return dict(
        # 64-token splits at small batch: batch-1 decode of a 600-token sequence on 4 KV heads ran 12 programs of
        # 256 tokens (9.8 us per layer on an H200, latency-bound); large batches still get 1-2 splits.
        dec_block_n=64, dec_warps=4, dec_stages=3, dec_min_partition=64, dec_programs_per_sm=2,
        dec_fused_merge=False, pf_block_m=pf_block_m, pf_block_n=pf_block_n, pf_warps=pf_warps, pf_stages=3,
        # Programmatic dependent launch where the device has it (kernels/pdl.py), unless PAGEDSERVE_ATTN_PDL=off.
        # dec_early=False: the decode kernel still lets the merge (or the next kernel) launch early, but is
        # itself launched only once the kernel before it has finished.
        pdl=ATTN_PDL != "off",
        dec_early=ATTN_PDL == "early",
    )


def paged_attention_launch(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=None,
    max_query_len=None, max_seq_len=None, decode_partition=None, **overrides,
):
    """:func:`paged_attention` with tuning knobs (decode split size, tile shapes) for tests and benchmarks."""
    if out is None:
        out = torch.empty_like(q)
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    num_seqs = block_tables.shape[0]
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    if max_query_len is None:  # host syncs: callers on the hot path pass both hints
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if max_query_len <= 0 or max_seq_len <= 0:
        return out

    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    interpreted = q.device.type != "cuda"
    cfg = _config(head_dim, interpreted, max_query_len)
    cfg.update(overrides)
    qk_scale = float(scale) * LOG2E
    pdl = launch_kwargs(q) if cfg["pdl"] else {"PDL": False}
    common_strides = (
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
    )

    if max_query_len > 1:
        num_m_blocks = triton.cdiv(max_query_len, cfg["pf_block_m"])
        _prefill_kernel[(num_heads, num_m_blocks, num_seqs)](
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
            qk_scale, group, num_m_blocks,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *common_strides, block_tables.stride(0),
            HEAD_DIM=head_dim, PAGE_SIZE=block_size, BLOCK_M=cfg["pf_block_m"], BLOCK_N=cfg["pf_block_n"],
            UPCAST_DOT=interpreted, num_warps=cfg["pf_warps"], num_stages=cfg["pf_stages"], **pdl,
        )

    block_n = cfg["dec_block_n"]
    if decode_partition is None:
        decode_partition = decode_partition_size(
            num_seqs, num_kv_heads, max_seq_len, block_n, q.device,
            cfg["dec_min_partition"], cfg["dec_programs_per_sm"],
        )
    elif decode_partition % block_n:
        raise ValueError(f"decode_partition {decode_partition} must be a multiple of {block_n}")
    num_splits = triton.cdiv(max_seq_len, decode_partition)
    fused = cfg["dec_fused_merge"]
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    # dec_early=False: keep the PDL instructions (the merge may still launch early) but not the early launch.
    dec_pdl = {**pdl, "launch_pdl": False} if not cfg["dec_early"] and "launch_pdl" in pdl else pdl
    counter = _split_counters(num_seqs * num_kv_heads, q.device) if num_splits > 1 and fused else out
    _decode_kernel[(num_kv_heads, num_splits, num_seqs)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_lse, counter,
        qk_scale, decode_partition, group, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *common_strides, block_tables.stride(0),
        num_heads * num_splits * head_dim, num_splits * head_dim,
        HEAD_DIM=head_dim, GROUP_PAD=max(16, triton.next_power_of_2(group)), PAGE_SIZE=block_size,
        BLOCK_N=block_n, SINGLE_SPLIT=num_splits == 1, FUSED_MERGE=fused, UPCAST_DOT=interpreted,
        num_warps=cfg["dec_warps"], num_stages=cfg["dec_stages"], **dec_pdl,
    )
    if num_splits > 1 and not fused:
        _merge_kernel[(num_seqs, num_heads)](
            query_start_loc, part_out, part_lse, out,
            num_splits, num_heads * num_splits * head_dim, num_splits * head_dim,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4, **pdl,
        )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed variable-length queries over paged K/V; see ``reference.paged_attention``.

    ``max_query_len`` and ``max_seq_len`` are host-side upper bounds (they size the grid and pick the decode
    split); when ``None`` they are read from the device, which costs a synchronisation.
    """
    return paged_attention_launch(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
        max_query_len=max_query_len, max_seq_len=max_seq_len,
    )


__all__ = ["paged_attention", "paged_attention_launch", "decode_partition_size"]
