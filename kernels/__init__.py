"""Kernel entry points of pagedserve.

Every public function here picks the Triton kernel when its tensors live on CUDA and Triton is usable,
and the pure-torch reference (``pagedserve.kernels.reference``) otherwise, so the engine runs unchanged on
CPU. Set ``PAGEDSERVE_KERNELS=reference`` to force the reference everywhere (useful to bisect a mismatch).
See ``reference.py`` for the tensor layouts every implementation shares.
"""

from __future__ import annotations

import os

import torch

from pagedserve.kernels import reference

__all__ = [
    "write_kv_cache",
    "paged_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "rotary_embedding_and_cache",
    "silu_and_mul",
    "linear",
    "use_triton",
]


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton implementation should handle a tensor on this device."""
    if not t.is_cuda or os.environ.get("PAGEDSERVE_KERNELS") == "reference":
        return False
    try:
        from pagedserve.kernels import triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def _impl(t: torch.Tensor):
    if use_triton(t):
        from pagedserve.kernels import triton_ops

        return triton_ops
    return reference


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write this step's K/V ``[num_tokens, num_kv_heads, head_dim]`` into the paged cache by slot."""
    _impl(key).write_kv_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=None,
    max_query_len=None, max_seq_len=None,
):
    """Causal attention of packed variable-length queries over paged K/V (decode, prefill, extend).

    ``max_query_len`` / ``max_seq_len`` are host-side upper bounds the caller already knows; GPU kernels use
    them to pick a decode or prefill path and size their grid without a device-to-host sync.
    """
    return _impl(q).paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
        max_query_len=max_query_len, max_seq_len=max_seq_len,
    )


def rms_norm(x, weight, eps):
    """RMSNorm over the last dimension, fp32 statistics."""
    return _impl(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    """``residual += x``; returns ``(rms_norm(residual), residual)``."""
    return _impl(x).fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping):
    """RoPE on q and k, and this step's rotated K and V written into the paged cache by slot (one launch on
    the GPU); returns the rotated q."""
    return _impl(q).rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)


def rotary_embedding(positions, q, k, cos_sin_cache):
    """Rotate-half RoPE on ``q [T, Hq, D]`` and ``k [T, Hk, D]`` from a ``[max_pos, D]`` cos|sin cache."""
    return _impl(q).rotary_embedding(positions, q, k, cos_sin_cache)


def silu_and_mul(x):
    """``silu(gate) * up`` of a fused ``[..., 2d]`` gate/up projection."""
    return _impl(x).silu_and_mul(x)


# One-row matmuls where the Triton GEMV beat cuBLAS on an H200 (bench/results/gemv_h200.json, Llama-8B's
# projections at TP 1 and 2: 3-13% faster up to K = 7168; cuBLAS stays ahead at K = 14336 and for 2+ rows).
GEMV_MAX_K = 8192
# "inflight": launch the GEMV with triton_gemv.inflight_config, a candidate not yet measured (an experiment
# knob, read once at import; worker ranks inherit it). Anything else: the configurations below.
_GEMV_CONFIG = os.environ.get("PAGEDSERVE_GEMV_CONFIG", "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with batch-1 decode's single-row products on the Triton GEMV on CUDA."""
    if (bias is None and x.dim() == 2 and x.shape[0] == 1 and weight.shape[1] <= GEMV_MAX_K
            and x.dtype == weight.dtype and x.stride(1) == 1 and weight.stride(1) == 1 and use_triton(x)):
        from pagedserve.kernels.triton_gemv import gemv, inflight_config

        if _GEMV_CONFIG == "inflight" and weight.shape[0] < 14336:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            return gemv(x, weight, **inflight_config(*weight.shape, sms=sms))
        if weight.shape[0] >= 14336:  # wide outputs: more rows per program, deeper pipeline (the sweep's best)
            return gemv(x, weight, block_n=8, block_k=256, num_stages=5)
        return gemv(x, weight, block_n=4, block_k=512, num_stages=3)
    return torch.nn.functional.linear(x, weight, bias)
