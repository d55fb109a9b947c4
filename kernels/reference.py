"""Pure-torch reference implementations of every kernel.

These are the ground truth the Triton kernels are tested against, and what the engine runs on CPU.
They follow Hugging Face transformers' numerics (fp32 accumulation in RMSNorm, rotate-half RoPE) so the
engine's greedy outputs on CPU match HF token for token.

Tensor conventions (shared with the Triton kernels):
- ``k_cache`` / ``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
- ``slot_mapping``: ``[num_tokens]`` int, slot = block_id * block_size + offset; a negative slot is skipped.
- ``block_tables``: ``[num_seqs, max_blocks_per_seq]`` int32, padded with any value past a sequence's blocks.
- ``seq_lens``: ``[num_seqs]`` int32, the context length of each sequence *including* this step's tokens.
- ``query_start_loc``: ``[num_seqs + 1]`` int32, cumulative query lengths; query token ``j`` of sequence ``i``
  sits at position ``seq_lens[i] - q_len_i + j`` and attends causally to every position up to its own.
"""

from __future__ import annotations

import torch


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the paged cache by slot."""
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    slots = slot_mapping.to(torch.long)
    valid = slots >= 0
    if not bool(valid.all()):
        key, value, slots = key[valid], value[valid], slots[valid]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_flat.index_copy_(0, slots, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value.to(v_cache.dtype))


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence's K or V as a contiguous ``[seq_len, H, D]`` tensor."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].to(torch.long))
    return blocks.reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


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
    """Causal attention of packed variable-length queries ``[num_tokens, num_heads, head_dim]`` over paged K/V.

    Covers decode (one query per sequence), prefill, chunked prefill and prefill after a prefix-cache hit:
    the K/V of this step's tokens must already be in the cache.
    """
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len).to(q.dtype)
        v = gather_kv(v_cache, block_tables[i], seq_len).to(q.dtype)
        # [H, q_len, D] x [H, D, seq_len]; KV heads repeated for GQA exactly as HF's repeat_kv does.
        qi = q[q_start:q_end].transpose(0, 1)
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qi, k.transpose(1, 2)) * scale
        if q_len > 1:
            q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            k_pos = torch.arange(seq_len).unsqueeze(0)
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(variance + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rms_norm(residual), residual)``."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                               paired: bool = False) -> torch.Tensor:
    """``rotary_embedding`` of q and k, then ``write_kv_cache`` of the rotated k and of v; the rotated q."""
    q_rot, k_rot = rotary_embedding(positions, q, k, cos_sin_cache, paired)
    write_kv_cache(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    paired: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) RoPE on ``q [T, Hq, D]`` and ``k [T, Hk, D]``.

    ``cos_sin_cache`` is ``[max_position, D]`` fp32: the first ``D/2`` columns hold cos, the last ``D/2`` sin,
    of ``position * inv_freq`` (already multiplied by any attention scaling). ``paired``: each head's dims are
    stored as pairs ``(j, j + D/2)`` side by side (``unpair_heads`` undoes it); the same rotation, in that layout.
    """
    if paired:
        q_out, k_out = rotary_embedding(positions, unpair_heads(q), unpair_heads(k), cos_sin_cache)
        return pair_heads(q_out), pair_heads(k_out)
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.to(torch.long))
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1).unsqueeze(1)
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1).unsqueeze(1)
    dtype = q.dtype
    cos, sin = cos.to(dtype), sin.to(dtype)
    q_out = q * cos + rotate_half(q) * sin
    k_out = k * cos + rotate_half(k) * sin
    return q_out, k_out


def pair_heads(x: torch.Tensor) -> torch.Tensor:
    """The last dimension [x_0 .. x_{D/2-1} | x_{D/2} .. x_{D-1}] as pairs: x_0, x_{D/2}, x_1, x_{D/2+1}, ..."""
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)


def unpair_heads(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pair_heads``."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy sampling: each row's first index of its largest value, int64 (``torch.argmax(dim=-1)``)."""
    return logits.argmax(dim=-1)


def silu_and_mul(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` (the fused gate/up projection); ``interleaved``:
    gate and up alternate, ``silu(x[..., 0::2]) * x[..., 1::2]``."""
    if interleaved:
        return torch.nn.functional.silu(x[..., 0::2]) * x[..., 1::2]
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]
