"""Model building blocks: tensor-parallel linears and embeddings, RMSNorm, RoPE and paged attention.

Weights are sharded as they are loaded: every parameter carries a ``weight_loader(param, loaded, shard)``
that copies only this rank's slice of a checkpoint tensor (nano-vllm's and vLLM's scheme). ``loaded`` is a
tensor or a lazy handle (``loader.LazyTensor``): loaders narrow it first and read it last, so a rank
copies, converts or dequantizes only its own shard, never the whole tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve import kernels
from pagedserve.runtime.parallel import SINGLE, TPGroup, divide


def read_weight(loaded) -> torch.Tensor:
    """The values of a checkpoint tensor: ``loaded`` itself, or what a lazy handle reads (its region only)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.read()


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(read_weight(loaded))


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE):
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.weight.weight_loader = default_weight_loader
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W split by output rows across ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.out_per_rank = divide(out_features, tp.size, "output features")
        self.weight = _param(self.out_per_rank, in_features)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(self.out_per_rank) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = param.shape[0]
        param.data.copy_(read_weight(loaded.narrow(0, self.tp.rank * n, n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TPGroup = SINGLE,
                 interleave: bool = False):
        """``interleave``: the projections' output rows alternate (equal sizes only): gate, up, gate, up, ...
        for ``kernels.gate_up_silu``."""
        if interleave and len(set(out_sizes)) != 1:
            raise ValueError(f"interleaved projections must have equal sizes, got {out_sizes}")
        self.out_sizes = out_sizes
        self.interleave = interleave
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = self.out_sizes[shard_id] // self.tp.size
        shard = read_weight(loaded.narrow(0, self.tp.rank * size, size))
        if self.interleave:
            param.data[shard_id::len(self.out_sizes)].copy_(shard)
        else:
            param.data.narrow(0, sum(self.out_sizes[:shard_id]) // self.tp.size, size).copy_(shard)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q, K and V projections. When ranks outnumber KV heads, each KV head is replicated."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPGroup = SINGLE,
        paired: bool = False,
    ):
        """``paired``: q and k rows of each head stored with dims j and j + head_dim / 2 side by side
        (``kernels.reference.pair_heads``), for ``kernels.qkv_rotary_cache``; v rows as they come."""
        self.head_dim = head_dim
        self.paired = paired
        self.num_heads = divide(num_heads, tp.size, "attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp.size, "KV heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp.size, num_kv_heads, "tensor-parallel size over KV heads")
        self.tp = tp
        nn.Module.__init__(self)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        self.weight = _param(out, hidden)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(out) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, src = 0, q_size, self.tp.rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size = kv_size
            src = (self.tp.rank // self.kv_replicas) * kv_size
        shard = read_weight(loaded.narrow(0, src, size))
        if self.paired and shard_id in ("q", "k"):  # per head: rows j, j + D/2 -> 2j, 2j + 1
            half = self.head_dim // 2
            heads = shard.reshape(size // self.head_dim, 2, half, *shard.shape[1:])
            shard = heads.transpose(1, 2).reshape(shard.shape)
        param.data.narrow(0, offset, size).copy_(shard)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with W split by input columns; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE,
                 reduce_in_norm: bool = False):
        super().__init__()
        self.tp = tp
        # The next layer is an RMSNorm built with a reduce_slot that all-reduces inside its kernel when it can
        # (TPGroup.reduces_in_norm); never with a bias, which must be added once, after the reduction (the
        # model gives the norm a slot only when this is True).
        self.reduce_in_norm = reduce_in_norm and not bias and tp.size > 1
        self.in_per_rank = divide(in_features, tp.size, "input features")
        self.weight = _param(out_features, self.in_per_rank)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = param.shape[1]
        param.data.copy_(read_weight(loaded.narrow(1, self.tp.rank * n, n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight)
        if self.reduce_in_norm and self.tp.reduces_in_norm(y):
            return y  # a partial sum: the norm that follows reduces it
        # The bias is added once, after the reduction, not once per rank.
        y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = _param(self.per_rank, hidden)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()
        if n:  # the last ranks of a small vocabulary may hold only padding rows
            param.data[:n].copy_(read_weight(loaded.narrow(0, self.start, n)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0; None on the other ranks (only rank 0 samples)."""
        logits = kernels.linear(hidden, self.weight)  # batch 1: the GEMV
        if self.tp.size > 1:
            logits = self.tp.gather_last_dim(logits)
            if logits is None:
                return None
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, tp: TPGroup = SINGLE, reduce_slot: int | None = None):
        """``reduce_slot`` (0 or 1): with a residual, ``x`` is the output of a row-parallel layer built with
        ``reduce_in_norm`` and may still be a partial sum, reduced here in the norm's kernel; norms that
        follow each other in the model must alternate slots."""
        super().__init__()
        self.eps = eps
        self.weight = _param(dim)
        self.weight.weight_loader = default_weight_loader
        self.tp = tp
        self.reduce_slot = reduce_slot if tp.size > 1 else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.reduce_slot is not None and residual is not None and self.tp.reduces_in_norm(x):
            return self.tp.add_rms_norm(x, residual, self.weight, self.eps, self.reduce_slot)
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


# --------------------------------------------------------------------------------------- rotary
def rope_parameters(config) -> dict:
    """Rope settings from a transformers config of any recent version (v5 ``rope_parameters`` or v4 fields)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_inv_freq(head_dim: int, params: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the rope types we support, as HF computes them."""
    base = float(params["rope_theta"])
    partial = float(params.get("partial_rotary_factor", 1.0))
    dim = int(head_dim * partial)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, linear, llama3)")


def build_cos_sin_cache(head_dim: int, max_position: int, params: dict, device=None) -> torch.Tensor:
    inv_freq, scaling = rope_inv_freq(head_dim, params)
    if inv_freq.numel() * 2 != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    t = torch.arange(max_position, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    cache = torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)
    return cache.to(device) if device is not None else cache


# --------------------------------------------------------------------------------------- attention
@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged cache and what each query attends to."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends over it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q, k, v, meta: AttentionMetadata | None) -> torch.Tensor:
        if meta is None or self.k_cache is None:
            # Profiling run before the cache exists: plain causal attention over the batch as one sequence.
            group = self.num_heads // self.num_kv_heads
            qh = q.transpose(0, 1)
            kh = k.transpose(0, 1).repeat_interleave(group, 0)
            vh = v.transpose(0, 1).repeat_interleave(group, 0)
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
            return out.transpose(0, 1)
        kernels.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def attend(self, q, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of ``q`` over the cache, this step's K/V already written into it."""
        return kernels.paged_attention(
            q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            self.scale, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
        )
