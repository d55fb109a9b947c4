"""Triton implementations of every kernel in ``reference.py``, with the same signatures and semantics.

``pagedserve.kernels`` dispatches here for CUDA tensors. The kernels themselves live in
``triton_attention.py`` (paged attention), ``triton_norm.py`` (RMSNorm) and ``triton_pointwise.py``
(KV-cache write, rotary embedding, SiLU-and-mul). On CPU tensors they run only under ``TRITON_INTERPRET=1``
(the tests use that); the engine uses the torch reference there.
"""

from __future__ import annotations

from pagedserve.kernels.triton_attention import paged_attention
from pagedserve.kernels.triton_norm import fused_add_rms_norm, rms_norm
from pagedserve.kernels.triton_pointwise import (
    argmax,
    rotary_embedding,
    rotary_embedding_and_cache,
    silu_and_mul,
    write_kv_cache,
)

__all__ = [
    "argmax",
    "write_kv_cache",
    "paged_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "rotary_embedding_and_cache",
    "silu_and_mul",
]
