"""The Llama decoder (also the base of Mistral, Qwen2 and Qwen3): ~200 lines, gpt-fast style.

Architecture switches read from the HF config: ``attention_bias`` (bias on q/k/v), ``qk_norm`` (per-head
RMSNorm on q and k before RoPE, Qwen3), ``mlp_bias``, ``tie_word_embeddings``, ``head_dim``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedserve import kernels
from pagedserve.runtime.layers import (
    AttentionMetadata,
    MergedColumnParallelLinear,
    PagedAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    build_cos_sin_cache,
    default_weight_loader,
    rope_parameters,
)
from pagedserve.runtime.models import register
from pagedserve.runtime.parallel import SINGLE, TPGroup


class LlamaAttention(nn.Module):
    qkv_bias_default = False
    qk_norm_default = False

    def __init__(self, config, tp: TPGroup, cos_sin_cache: torch.Tensor):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bias = getattr(config, "attention_bias", self.qkv_bias_default) or self.qkv_bias_default
        # PAGEDSERVE_FUSED_ROTARY: heads paired for the qkv GEMV's rotary epilogue (not with per-head q/k norms,
        # whose weights would need the same order).
        self.paired = kernels.FUSED_ROTARY and not self.qk_norm_default
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, num_kv_heads, bias, tp,
            paired=self.paired,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        o_bias = bool(getattr(config, "attention_bias", False)) and not self.qkv_bias_default
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, o_bias, tp,
                                        reduce_in_norm=True)
        self.qk_norm = self.qk_norm_default
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.cos_sin_cache = cos_sin_cache
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata | None) -> torch.Tensor:
        attn = self.attn
        q = None
        if self.paired and meta is not None and attn.k_cache is not None and x.shape[0] == 1:
            # projected, rotated and K/V cached in one kernel; None where the GEMV does not take the product
            q = kernels.qkv_rotary_cache(x, self.qkv_proj.weight, self.qkv_proj.bias, positions, self.cos_sin_cache,
                                         attn.k_cache, attn.v_cache, meta.slot_mapping, self.q_size, self.kv_size,
                                         self.head_dim)
        if q is not None:
            out = attn.attend(q.view(1, self.num_heads, self.head_dim), meta)
        else:
            out = self._project_and_attend(positions, x, meta)
        return self.o_proj(out.reshape(-1, self.q_size))

    def _project_and_attend(self, positions, x, meta):
        attn = self.attn
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if meta is not None and attn.k_cache is not None:
            # Rotary and the cache write of this step's K/V in one kernel, then attention over the cache.
            q = kernels.rotary_embedding_and_cache(positions, q, k, v, self.cos_sin_cache, attn.k_cache,
                                                   attn.v_cache, meta.slot_mapping, self.paired)
            return attn.attend(q, meta)
        q, k = kernels.rotary_embedding(positions, q, k, self.cos_sin_cache, self.paired)
        return attn(q, k, v, meta)


class LlamaMLP(nn.Module):
    def __init__(self, config, tp: TPGroup):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias, tp,
                                                       interleave=kernels.FUSED_SILU)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, tp, reduce_in_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj.interleave:
            return self.down_proj(kernels.gate_up_silu(x, self.gate_up_proj.weight, self.gate_up_proj.bias))
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, tp: TPGroup, cos_sin_cache: torch.Tensor):
        super().__init__()
        self.self_attn = self.attention_cls(config, tp, cos_sin_cache)
        self.mlp = LlamaMLP(config, tp)
        # With tensor parallelism the o_proj and down_proj outputs are all-reduced inside the norm that
        # follows them where they can be (RMSNorm.reduce_slot), but only when that projection leaves its output
        # unreduced (no bias). Consecutive fused norms alternate slots: post-attention 0, the next layer's
        # input norm (or the final norm) 1; when only one kind is fused, the all-reduce of the other kind
        # between two calls is a full barrier, which protects the shared slot as well.
        down_deferred = self.mlp.down_proj.reduce_in_norm  # feeds the next layer's input norm (same config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp,
                                       reduce_slot=1 if down_deferred else None)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp,
                                                reduce_slot=0 if self.self_attn.o_proj.reduce_in_norm else None)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config, tp: TPGroup):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = build_cos_sin_cache(head_dim, config.max_position_embeddings, rope_parameters(config))
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            [self.layer_cls(config, tp, self.cos_sin_cache) for _ in range(config.num_hidden_layers)]
        )
        last_down = self.layers[-1].mlp.down_proj if len(self.layers) else None
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp,
                            reduce_slot=1 if last_down is not None and last_down.reduce_in_norm else None)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """Our own Llama: HF checkpoint names in, paged attention inside, logits out."""

    model_cls = LlamaModel
    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config, tp: TPGroup = SINGLE):
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = self.model_cls(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | None):
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def layers_attention(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors or lazy handles (``loader.LazyTensor``), each sharded for this rank as it is
        read (dtype converted by the copy); raise naming any missing or unknown one."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard = name, None
            for frag, (ours, shard_id) in self.stacked_params.items():
                if frag in name:
                    target, shard = name.replace(frag, ours), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor, shard)  # a lazy handle: the loader reads only this rank's shard
            loaded.add(f"{target}#{shard}")
        expected = set()
        for name, _ in self.named_parameters():
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            shards = [s for frag, (ours, s) in self.stacked_params.items() if ours in name]
            for s in shards or [None]:
                expected.add(f"{name}#{s}")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(m.split('#')[0] for m in missing[:8])}")


register("LlamaForCausalLM", LlamaForCausalLM)
