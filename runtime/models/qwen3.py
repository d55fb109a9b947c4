"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE."""

from pagedserve.runtime.models import register
from pagedserve.runtime.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
)


class Qwen3Attention(LlamaAttention):
    qk_norm_default = True


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model


register("Qwen3ForCausalLM", Qwen3ForCausalLM)
