"""Memory-bound per-token kernels in Triton: KV-cache write by slot, rotary embedding, SiLU-and-multiply.

Each reads its inputs once and writes its outputs once: K and V of a token go to the cache in one program,
q and k of a token are rotated in one program, and the gate/up halves are combined in one pass. Rotary and
SiLU round intermediate results to the activation dtype where the reference (HF) does, so outputs match it.
They launch with ``enable_fp_fusion=False``: otherwise the compiler folds ``a * b`` rounded to bf16 plus
``c * d`` into one bf16 FMA (seen in the PTX of triton 3.6/3.9), dropping a rounding the reference makes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.pdl import launch_kwargs, pdl_begin


# ------------------------------------------------------------------------------------------ KV cache
@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_begin(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < num_kv_heads) & (d < HEAD_DIM)
    t = token.to(tl.int64)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kct + h * stride_kch + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vct + h * stride_vch + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the paged cache by slot.

    A negative slot skips its token (padding in a CUDA-graph batch, say).
    """
    if key.dim() != 3 or value.shape != key.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected key/value [num_tokens, num_kv_heads, head_dim] and caches "
            f"[num_blocks, block_size, num_kv_heads, head_dim]; got {tuple(key.shape)}, "
            f"{tuple(value.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key heads/head_dim {tuple(key.shape[1:])} != cache {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim), num_warps=4, **launch_kwargs(key),
    )


# ------------------------------------------------------------------------------------------- rotary
@triton.jit
def _rotate_heads(x_ptr, out_ptr, num_heads, stride_h, cos, sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  HEADS_PAD: tl.constexpr, OUT_STRIDE_H: tl.constexpr, PAIRED: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (j < HALF)
    dtype = out_ptr.dtype.element_ty
    # Where dims j and j + HALF of a head live: HALF apart, or side by side (PAIRED: reference.pair_heads).
    first = 2 * j if PAIRED else j
    second = first + 1 if PAIRED else j + HALF
    x1 = tl.load(x_ptr + h * stride_h + first, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + h * stride_h + second, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product rounded to the activation dtype as in the reference.
    o1 = (x1f * cos).to(dtype).to(tl.float32) + (-x2f * sin).to(dtype).to(tl.float32)
    o2 = (x2f * cos).to(dtype).to(tl.float32) + (x1f * sin).to(dtype).to(tl.float32)
    out_row = out_ptr + h * OUT_STRIDE_H
    tl.store(out_row + first, o1.to(dtype), mask=mask)
    tl.store(out_row + second, o2.to(dtype), mask=mask)


@triton.jit
def _load_cos_sin(cos_sin_ptr, pos, stride_cache, dtype, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """cos and sin of one position, rounded to the activation dtype first as the reference does."""
    j = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cache + j, mask=j < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cache + HALF + j, mask=j < HALF, other=0.0)
    return cos, sin.to(dtype).to(tl.float32)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr,
    num_q_heads, num_k_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, PAIRED: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_begin(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos, sin = _load_cos_sin(cos_sin_ptr, pos, stride_cache, q_out_ptr.dtype.element_ty, HALF, HALF_PAD)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * num_q_heads * 2 * HALF, num_q_heads,
                  stride_qh, cos, sin, HALF, HALF_PAD, QH_PAD, 2 * HALF, PAIRED)
    _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * num_k_heads * 2 * HALF, num_k_heads,
                  stride_kh, cos, sin, HALF, HALF_PAD, KH_PAD, 2 * HALF, PAIRED)


@triton.jit
def _rotary_cache_kernel(
    positions_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_q_heads, num_k_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache,
    stride_kcb, stride_kct, stride_vcb, stride_vct,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, CACHE_STRIDE_H: tl.constexpr, PAIRED: tl.constexpr, PDL: tl.constexpr,
):
    """Rotary on q (to q_out) and k (straight into the paged cache at the token's slot), v copied into its
    cache: one launch per layer instead of two, and rotated k never round-trips through memory."""
    pdl_begin(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos, sin = _load_cos_sin(cos_sin_ptr, pos, stride_cache, q_out_ptr.dtype.element_ty, HALF, HALF_PAD)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * num_q_heads * 2 * HALF, num_q_heads,
                  stride_qh, cos, sin, HALF, HALF_PAD, QH_PAD, 2 * HALF, PAIRED)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        _rotate_heads(k_ptr + token * stride_kt, k_cache_ptr + block * stride_kcb + offset * stride_kct,
                      num_k_heads, stride_kh, cos, sin, HALF, HALF_PAD, KH_PAD, CACHE_STRIDE_H, PAIRED)
        h = tl.arange(0, KH_PAD)[:, None]
        d = tl.arange(0, 2 * HALF_PAD)[None, :]
        mask = (h < num_k_heads) & (d < 2 * HALF)
        v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vct + h * CACHE_STRIDE_H + d,
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                               paired: bool = False) -> torch.Tensor:
    """``rotary_embedding`` on q and k, then ``write_kv_cache`` of the rotated k and of v, in one launch;
    returns the rotated q. A negative slot writes nothing for its token. ``paired``: heads in
    ``reference.pair_heads`` layout."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D], k and v [T, Hk, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not hold k {tuple(k.shape)}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or k_cache.stride(2) != v_cache.stride(2):
        raise ValueError("k_cache and v_cache must be contiguous in head_dim with equal head strides")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or head_dim % 2:
        raise ValueError(f"cos_sin_cache must be [max_position, {head_dim}], got {tuple(cos_sin_cache.shape)}")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions and slot_mapping must be [{num_tokens}]")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    _rotary_cache_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin_cache, q_out, k_cache, v_cache, slot_mapping,
        num_q_heads, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), QH_PAD=triton.next_power_of_2(num_q_heads),
        KH_PAD=triton.next_power_of_2(k.shape[1]), BLOCK_SIZE=k_cache.shape[1], CACHE_STRIDE_H=k_cache.stride(2),
        PAIRED=paired, num_warps=4, enable_fp_fusion=False, **launch_kwargs(q),
    )
    return q_out


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    paired: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) RoPE on ``q [T, Hq, D]`` and ``k [T, Hk, D]``; returns new tensors (``paired``:
    heads in ``reference.pair_heads`` layout).

    ``q`` and ``k`` may be strided views (slices of a fused qkv projection); see ``reference.rotary_embedding``.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k [T, Hk, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or head_dim % 2:
        raise ValueError(f"cos_sin_cache must be [max_position, {head_dim}], got {tuple(cos_sin_cache.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must be [{num_tokens}], got {tuple(positions.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q_out, k_out,
        num_q_heads, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), QH_PAD=triton.next_power_of_2(num_q_heads),
        KH_PAD=triton.next_power_of_2(k.shape[1]), PAIRED=paired, num_warps=4, enable_fp_fusion=False,
        **launch_kwargs(q),
    )
    return q_out, k_out


# ------------------------------------------------------------------------------------- SiLU and mul
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr, INTERLEAVED: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dtype = out_ptr.dtype.element_ty
    if INTERLEAVED:  # gate, up, gate, up, ...
        gate = tl.load(x_ptr + row * stride_x + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
    else:  # gate | up
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # rounded, as torch's silu in bf16
    tl.store(out_ptr + row * d + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` (the fused gate/up projection); ``interleaved``:
    ``silu(x[..., 0::2]) * x[..., 1::2]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dimension must be even (gate|up), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, 2 * d) if x.dim() != 2 else x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] == 0 or d == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
        rows, out, d, rows.stride(0), BLOCK=block, INTERLEAVED=interleaved, num_warps=4, enable_fp_fusion=False,
        **launch_kwargs(x),
    )
    return out


# ----------------------------------------------------------------------------------------- greedy argmax
@triton.jit
def _argmax_split_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, SPLITS, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Each (row, split): the largest value of BLOCK columns and its first column."""
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cols = split * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
    # NaN counts as +inf: the first NaN or +inf wins where torch takes the first NaN (either is garbage).
    x = tl.where(x != x, float("inf"), x)
    m = tl.max(x, 0)
    first = tl.min(tl.where(x == m, cols, 2147483647), 0)
    tl.store(val_ptr + row * SPLITS + split, m)
    tl.store(idx_ptr + row * SPLITS + split, first)


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, SPLITS, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    """Each row: the splits' largest value, and the smallest column holding it (ties: the first, as torch)."""
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    mask = s < SPLITS
    v = tl.load(val_ptr + row * SPLITS + s, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * SPLITS + s, mask=mask, other=2147483647)
    m = tl.max(v, 0)
    tl.store(out_ptr + row, tl.min(tl.where(v == m, i, 2147483647), 0).to(tl.int64))


def argmax(logits: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for [rows, V] logits of any float dtype, read once in their own dtype (no
    fp32 copy first): every split of ``block`` columns finds its maximum in one launch, a second one merges
    the splits; ties go to the first column, as torch's. A whole-vocabulary torch argmax of one row runs on
    few blocks; here a 128k vocabulary is 32 programs."""
    if logits.dim() != 2 or logits.shape[1] == 0 or not logits.dtype.is_floating_point:
        raise ValueError(f"expected float logits [rows, V] with V > 0, got {logits.dtype} {tuple(logits.shape)}")
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    splits = triton.cdiv(vocab, block)
    vals = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _argmax_split_kernel[(rows, splits)](logits, vals, idxs, vocab, logits.stride(0), splits, BLOCK=block,
                                         num_warps=8 if block >= 2048 else 4, **launch_kwargs(logits))
    _argmax_merge_kernel[(rows,)](vals, idxs, out, splits, SPLITS_PAD=max(16, triton.next_power_of_2(splits)),
                                  num_warps=1, **launch_kwargs(logits))
    return out


__all__ = ["write_kv_cache", "rotary_embedding", "silu_and_mul", "argmax"]
