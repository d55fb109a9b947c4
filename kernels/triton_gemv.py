"""Batch-1 decode's matmul: ``y = x @ w.T`` for a single row ``x``, bandwidth-bound on ``w``.

One program owns ``BLOCK_N`` output features and walks the whole K dimension, so there is no split-K
reduction kernel. Accumulation in fp32, one rounding at the end, like cuBLAS. The launch per shape is chosen in
``kernels/__init__.py`` (``GEMV_TUNED``) from bench/bench_gemv.py's sweep on an H200 (session 6,
results/gemv_h200x2_s6_sweep2.json): two rows per program with 1024- or 2048-column tiles run the 8B model's
projections at 94-103% of the copy rate (the copy counts read + write; a GEMV only reads), 4-43% faster than
cuBLAS at every shape up to K = 14336; four rows and 512 columns, the earlier default, left the
small-N projections 30-60% over their floor. From two rows on cuBLAS wins (an earlier multi-row version of this
kernel was 2-8x slower there).

With programmatic dependent launch (``pdl.py``) a program loads the first ``PRE_K`` columns of its rows before
it waits for the kernel that produces ``x`` (default: one ``BLOCK_K`` tile). Triton does not software-pipeline
loads that feed no dot (``num_stages`` changes nothing here: ptxas reports the same code), so a program has one
tile in flight. Measured and not done: requesting each tile one iteration ahead by hand (session 6: 0.6-1.5 us
slower per call at every shape); at TP=2, the o and down projections' programs pushing their outputs into the
peers' LL all-reduce slot themselves, so the fused norm only waits (session 6: batch-1 ITL 2.75 vs 2.59 ms); asking L2 for more of the weights before the wait, either with per-thread
``prefetch.global.L2::evict_last`` (session 4: TP=1 5.10 vs 4.52 ms) or with one bulk
``cp.async.bulk.prefetch.L2`` of each program's rows (session 5: TP=1 5.23 vs 4.40 ms, TP=2 3.61 vs 3.10 ms);
and computing silu_and_mul while loading the down projection's input instead of in its own kernel (TP=2
3.29 vs 3.09 ms). A wider first tile (``pre_k`` 2048) helped TP=2 a little in one run (2.94 vs 3.03 ms) and
cost TP=1 a lot (4.70 vs 4.33 ms: 91-168 registers per thread instead of 40, so fewer programs in flight);
it stays a parameter for benchmarks (``bench/bench_gemv.py --pre-k``), off in the engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.pdl import launch_kwargs, pdl_launch_dependents, pdl_wait


@triton.jit
def _gemv_rows(x_ptr, w_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE_K: tl.constexpr,
               PDL: tl.constexpr):
    """This program's BLOCK_N rows of ``w @ x``: (row indices, their mask, fp32 sums)."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    pdl_launch_dependents(PDL)
    # The weights are never written by a kernel: with PDL the first PRE_K columns are loaded while the kernel
    # that produces x is still finishing; x itself only after the wait.
    k0 = tl.arange(0, PRE_K)
    w0 = tl.load(w_rows + k0[None, :], mask=n_mask[:, None] & (k0 < K)[None, :], other=0.0)
    pdl_wait(PDL)
    x0 = tl.load(x_ptr + k0, mask=k0 < K, other=0.0).to(tl.float32)
    acc = tl.sum(w0.to(tl.float32) * x0[None, :], axis=1)
    k = tl.arange(0, BLOCK_K)
    for start in range(PRE_K, K, BLOCK_K):
        kk = start + k
        k_mask = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    return n, n_mask, acc


@triton.jit
def _row_pairs(acc, dtype, BLOCK_N: tl.constexpr):
    """A program's sums rounded to the output dtype (as a GEMV stores them), as (even rows, odd rows) in fp32."""
    return tl.split(tl.reshape(acc.to(dtype).to(tl.float32), [BLOCK_N // 2, 2]))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRE_K: tl.constexpr, SILU: tl.constexpr, PDL: tl.constexpr):
    n, n_mask, acc = _gemv_rows(x_ptr, w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, PRE_K, PDL)
    pid = tl.program_id(0)
    dtype = y_ptr.dtype.element_ty
    if SILU:
        # w's rows alternate gate, up (a fused gate/up projection loaded interleaved): each pair of outputs
        # becomes silu(gate) * up, rounded as the separate GEMV and silu_and_mul kernels round them.
        gate, up = _row_pairs(acc, dtype, BLOCK_N)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        h = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + h, (silu * up).to(dtype), mask=h < N // 2)
    else:
        tl.store(y_ptr + n, acc.to(dtype), mask=n_mask)


@triton.jit
def _gemv_qkv_rotary_kernel(
    x_ptr, w_ptr, q_ptr, N, K, stride_wn, positions_ptr, cos_sin_ptr, stride_cache,
    k_cache_ptr, v_cache_ptr, slot_ptr, stride_kcb, stride_kct, stride_vcb, stride_vct, stride_ch, Q_SIZE, KV_SIZE,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE_K: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):
    """One token's fused q|k|v projection whose q and k heads are stored as pairs (reference.pair_heads, as
    PAGEDSERVE_FUSED_ROTARY loads them), so each pair of a program's rows is one rotation: the epilogue rotates
    q into ``q_ptr`` and k straight into the paged cache at the token's slot, and copies v into its cache. The
    rotation rounds as ``rotary_embedding_and_cache(paired=True)`` does, which needs fp fusion off (with it
    ptxas gets a bf16 FMA there); that also keeps the loop's products and sums apart, so the fp32 sums may
    differ from the plain GEMV's in their last bits."""
    n, n_mask, acc = _gemv_rows(x_ptr, w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, PRE_K, PDL)
    dtype = q_ptr.dtype.element_ty
    x1, x2 = _row_pairs(acc, dtype, BLOCK_N)
    first = tl.program_id(0) * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)  # the pair's first row
    ok = first < N
    j = (first % HEAD_DIM) // 2  # the pair's frequency
    pos = tl.load(positions_ptr).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cache + j).to(dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cache + HEAD_DIM // 2 + j).to(dtype).to(tl.float32)
    is_v = first >= Q_SIZE + KV_SIZE
    o1 = tl.where(is_v, x1, (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = tl.where(is_v, x2, (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    is_q = first < Q_SIZE
    tl.store(q_ptr + first, o1, mask=ok & is_q)
    tl.store(q_ptr + first + 1, o2, mask=ok & is_q)
    slot = tl.load(slot_ptr).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        is_k = ~is_q & ~is_v
        kv = tl.where(is_v, first - Q_SIZE - KV_SIZE, first - Q_SIZE)  # row within k (or v)
        at = (kv // HEAD_DIM) * stride_ch + kv % HEAD_DIM
        k_at = k_cache_ptr + block * stride_kcb + offset * stride_kct + at
        v_at = v_cache_ptr + block * stride_vcb + offset * stride_vct + at
        tl.store(k_at, o1.to(k_cache_ptr.dtype.element_ty), mask=ok & is_k)
        tl.store(k_at + 1, o2.to(k_cache_ptr.dtype.element_ty), mask=ok & is_k)
        tl.store(v_at, o1.to(v_cache_ptr.dtype.element_ty), mask=ok & is_v)
        tl.store(v_at + 1, o2.to(v_cache_ptr.dtype.element_ty), mask=ok & is_v)


def gemv_qkv_rotary(x: torch.Tensor, w: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_size: int,
                    kv_size: int, head_dim: int, block_n: int = 2, block_k: int = 1024, num_warps: int = 4,
                    num_stages: int = 3, pre_k: int | None = None) -> torch.Tensor:
    """``rotary_embedding_and_cache(paired=True)`` of one token's ``x @ w.T`` (``w`` the [q | k | v] rows, q and
    k heads in ``reference.pair_heads`` layout) in one kernel: writes k and v into the caches at
    ``slot_mapping[0]`` (nothing if negative) and returns the rotated q [1, q_size]."""
    n, k = w.shape
    if x.shape != (1, k) or x.stride(1) != 1 or w.stride(1) != 1 or n != q_size + 2 * kv_size:
        raise ValueError(f"expected x [1, {k}] and w [q + 2 kv = {q_size + 2 * kv_size}, K]; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")
    if block_n % 2 or head_dim % block_n or q_size % head_dim or kv_size % head_dim:
        raise ValueError(f"block_n ({block_n}) must be even and divide head_dim ({head_dim}), which divides the "
                         f"q ({q_size}) and kv ({kv_size}) sizes")
    if (positions.shape != (1,) or slot_mapping.shape != (1,) or cos_sin_cache.shape[-1] != head_dim
            or cos_sin_cache.stride(-1) != 1 or k_cache.shape != v_cache.shape or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1 or k_cache.stride(2) != v_cache.stride(2)
            or k_cache.shape[2] * head_dim != kv_size or k_cache.shape[3] != head_dim):
        raise ValueError("positions and slot_mapping must be [1], cos_sin_cache [max_pos, head_dim], and the "
                         "caches [blocks, block_size, kv_heads, head_dim] alike, contiguous in head_dim")
    pre_k = block_k if pre_k is None else pre_k
    q = torch.empty(1, q_size, dtype=x.dtype, device=x.device)
    _gemv_qkv_rotary_kernel[(triton.cdiv(n, block_n),)](
        x, w, q, n, k, w.stride(0), positions, cos_sin_cache, cos_sin_cache.stride(0), k_cache, v_cache,
        slot_mapping, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), k_cache.stride(2),
        q_size, kv_size, BLOCK_N=block_n, BLOCK_K=block_k, PRE_K=pre_k, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], num_warps=num_warps, num_stages=num_stages,
        enable_fp_fusion=False,  # the rotation's roundings, as in triton_pointwise
        **launch_kwargs(x),
    )
    return q


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int = 4, block_k: int = 512, num_warps: int = 4,
         num_stages: int = 3, pre_k: int | None = None, silu: bool = False) -> torch.Tensor:
    """``x @ w.T`` for one row ``x`` [1, K] and ``w`` [N, K] contiguous in K; returns [1, N]. ``pre_k`` (a
    power of two, a multiple of ``block_k``, at least ``block_k``; default ``block_k``): how many columns of
    its rows a program loads before the PDL wait. ``silu``: ``w``'s rows alternate gate, up; returns
    ``silu_and_mul(x @ w.T, interleaved=True)`` [1, N / 2] without writing the product (``block_n`` even)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"expected x [1, K] and w [N, K] contiguous in K; got {tuple(x.shape)}, {tuple(w.shape)}")
    if x.shape[0] != 1:
        raise ValueError(f"gemv takes one row (cuBLAS is faster from two rows on), got {x.shape[0]} rows")
    pre_k = block_k if pre_k is None else pre_k
    if pre_k < block_k or pre_k % block_k or pre_k & (pre_k - 1):
        raise ValueError(f"pre_k ({pre_k}) must be a power of two and a multiple of block_k ({block_k})")
    n, k = w.shape
    if silu and (n % 2 or block_n % 2):
        raise ValueError(f"gemv silu pairs rows: N ({n}) and block_n ({block_n}) must be even")
    y = torch.empty(1, n // 2 if silu else n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, PRE_K=pre_k, SILU=silu,
        num_warps=num_warps, num_stages=num_stages, **launch_kwargs(x),
    )
    return y


__all__ = ["gemv", "gemv_qkv_rotary"]
