"""Kernel entry points of pagedserve.

Every public function here picks the Triton kernel when its tensors live on CUDA and Triton is usable,
and the pure-torch reference (``pagedserve.kernels.reference``) otherwise, so the engine runs unchanged on
CPU. Set ``PAGEDSERVE_KERNELS=reference`` to force the reference everywhere (useful to bisect a mismatch).
See ``reference.py`` for the tensor layouts every implementation shares.
"""

from __future__ import annotations

if __name__ == "kernels":
    # This folder is ``pagedserve.kernels`` (pyproject's package-dir). With the repository root on sys.path
    # (``python -m`` run from the root puts it there) Python also finds it as a top-level ``kernels``, which
    # shadows Hugging Face's ``kernels`` distribution: transformers >= 5.25 depends on it and imports it
    # (``from kernels import CUDAProperties``). Hand the name to an installed distribution when there is one;
    # the rest of this file then runs in a module object nobody keeps (its imports are absolute).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _here = _os.path.realpath(_os.path.dirname(__file__))
    _root = _os.path.dirname(_here)
    _path = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.origin and _os.path.realpath(_os.path.dirname(_spec.origin)) != _here:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # what this import returns, as it is re-read after this file runs
        _spec.loader.exec_module(_module)

import json
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
    "gate_up_silu",
    "qkv_rotary_cache",
    "argmax",
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


def rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                               paired: bool = False):
    """RoPE on q and k, and this step's rotated K and V written into the paged cache by slot (one launch on
    the GPU); returns the rotated q. ``paired``: heads in ``reference.pair_heads`` layout."""
    return _impl(q).rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                               paired)


def rotary_embedding(positions, q, k, cos_sin_cache, paired: bool = False):
    """Rotate-half RoPE on ``q [T, Hq, D]`` and ``k [T, Hk, D]`` from a ``[max_pos, D]`` cos|sin cache."""
    return _impl(q).rotary_embedding(positions, q, k, cos_sin_cache, paired)


# "triton": greedy sampling's argmax on CUDA in kernels.triton_pointwise.argmax (one read of the logits in their
# dtype, 32 programs for a 128k vocabulary) instead of torch's fp32 copy and argmax; an experiment knob (not yet
# measured on a GPU), read once at import.
_ARGMAX = os.environ.get("PAGEDSERVE_ARGMAX", "")


def argmax(logits):
    """Greedy sampling: ``logits.argmax(dim=-1)`` of [rows, V] logits (their own dtype; exact)."""
    if _ARGMAX == "triton" and use_triton(logits):
        from pagedserve.kernels import triton_ops

        return triton_ops.argmax(logits)
    return reference.argmax(logits)


def silu_and_mul(x, interleaved: bool = False):
    """``silu(gate) * up`` of a fused ``[..., 2d]`` gate/up projection (``interleaved``: gate, up alternate)."""
    return _impl(x).silu_and_mul(x, interleaved)


# "1": q and k heads are loaded with their dims paired (reference.pair_heads; attention scores do not change), so
# that batch-1 decode's qkv GEMV rotates q and k and writes K/V into the cache in its epilogue (qkv_rotary_cache)
# and the separate rotary kernel goes away. Models with per-head q/k norms keep the usual layout. An experiment
# knob (not yet measured on a GPU), read once at import; the model reads it when it is built.
FUSED_ROTARY = os.environ.get("PAGEDSERVE_FUSED_ROTARY", "") == "1"


def qkv_rotary_cache(x, weight, bias, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q_size: int,
                     kv_size: int, head_dim: int) -> torch.Tensor | None:
    """One token's qkv projection, RoPE and cache write in the GEMV (heads paired): the rotated q [1, q_size],
    or None where the GEMV does not take this product (the caller projects and rotates as usual)."""
    cfg = gemv_launch(x, weight, bias)
    if cfg is None or cfg["block_n"] % 2 or head_dim % cfg["block_n"] or x.dtype != k_cache.dtype:
        return None
    from pagedserve.kernels.triton_gemv import gemv_qkv_rotary

    return gemv_qkv_rotary(x, weight, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q_size, kv_size,
                           head_dim, **cfg)


# "1": the fused gate/up projection is loaded with gate and up rows alternating, so that batch-1 decode's GEMV
# computes silu(gate) * up in its epilogue (gate_up_silu) and the separate SiLU kernel goes away. An experiment
# knob (not yet measured on a GPU), read once at import; the model reads it when it is built.
FUSED_SILU = os.environ.get("PAGEDSERVE_FUSED_SILU", "") == "1"


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``F.linear(x, weight, bias)`` for a gate/up weight whose rows alternate gate, up:
    one GEMV with the SiLU in its epilogue for one row on CUDA, else the product and ``silu_and_mul``."""
    cfg = gemv_launch(x, weight, bias)
    if cfg is not None and cfg["block_n"] % 2 == 0:
        from pagedserve.kernels.triton_gemv import gemv

        return gemv(x, weight, **cfg, silu=True)
    return silu_and_mul(linear(x, weight, bias), interleaved=True)


# One-row matmuls on the Triton GEMV. Launches per (N, K) from bench/bench_gemv.py's sweep on an H200 (session 6,
# results/gemv_h200x2_s6_sweep2.json: Llama-3.1-8B's projections and their TP=2 halves, all faster than cuBLAS, up to
# K = 14336); other shapes get the rule in _gemv_launch, never more than 13% behind the sweep's best there.
GEMV_MAX_K = 16384
GEMV_TUNED = {  # (N, K): "BLOCK_NxBLOCK_KwWARPS"
    (6144, 4096): "4x2048w8", (4096, 4096): "2x1024w4", (28672, 4096): "2x2048w8", (4096, 14336): "2x2048w8",
    (3072, 4096): "2x2048w4", (4096, 2048): "2x1024w4", (14336, 4096): "2x2048w8", (4096, 7168): "2x1024w4",
}
# Experiment knobs, read once at import (worker ranks inherit them): PAGEDSERVE_GEMV_CONFIG, a spec such as
# "4x512w4" (parse_gemv_spec), launches every GEMV up to GEMV_MAX_K so; PAGEDSERVE_GEMV_TABLE names a JSON file {"N,K": spec or
# "cublas"} (bench_gemv.py --table-out writes one from a sweep) that overrides both.
_GEMV_CONFIG = os.environ.get("PAGEDSERVE_GEMV_CONFIG", "")
_GEMV_TABLE_PATH = os.environ.get("PAGEDSERVE_GEMV_TABLE", "")


def parse_gemv_spec(spec: str) -> dict:
    """"2x1024w4" -> block_n 2, block_k 1024, 4 warps ("wWARPS" optional: 4)."""
    import re

    m = re.fullmatch(r"(\d+)x(\d+)(?:w(\d+))?", spec)
    if not m:
        raise ValueError(f"GEMV spec {spec!r}: expected BLOCK_NxBLOCK_K[wWARPS], e.g. 2x1024w4")
    return dict(block_n=int(m[1]), block_k=int(m[2]), num_warps=int(m[3] or 4), num_stages=3)


def _load_gemv_table(path: str) -> dict:
    if not path:
        return {}
    with open(path) as f:
        raw = json.load(f)
    return {tuple(int(v) for v in key.split(",")): (None if spec == "cublas" else parse_gemv_spec(spec))
            for key, spec in raw.items()}


_GEMV_TABLE = _load_gemv_table(_GEMV_TABLE_PATH)
_GEMV_SPEC = parse_gemv_spec(_GEMV_CONFIG) if _GEMV_CONFIG else None
_GEMV_TUNED = {shape: parse_gemv_spec(spec) for shape, spec in GEMV_TUNED.items()}


def _gemv_launch(n: int, k: int) -> dict | None:
    """The GEMV's launch configuration for a [1, k] x [n, k]^T product, or None for cuBLAS."""
    if (n, k) in _GEMV_TABLE:
        return _GEMV_TABLE[(n, k)]
    if k > GEMV_MAX_K:
        return None
    if _GEMV_SPEC is not None:
        return _GEMV_SPEC
    if (n, k) in _GEMV_TUNED:
        return _GEMV_TUNED[(n, k)]
    # Untuned shapes: wide outputs (gate/up-like, the LM head) took 2048-column tiles on 8 warps in the sweep.
    return _GEMV_TUNED[(14336, 4096)] if n >= 14336 else _GEMV_TUNED[(4096, 4096)]


def gemv_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict | None:
    """The Triton GEMV's launch for ``F.linear(x, weight, bias)`` when it takes the product, else None."""
    if (bias is None and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and x.stride(1) == 1
            and weight.stride(1) == 1 and use_triton(x)):
        return _gemv_launch(*weight.shape)
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with batch-1 decode's single-row products on the Triton GEMV on CUDA."""
    cfg = gemv_launch(x, weight, bias)
    if cfg is not None:
        from pagedserve.kernels.triton_gemv import gemv

        return gemv(x, weight, **cfg)
    return torch.nn.functional.linear(x, weight, bias)
