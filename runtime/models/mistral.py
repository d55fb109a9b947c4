"""Mistral: the Llama decoder (sliding-window attention is handled by capping max_model_len to the window)."""

from pagedserve.runtime.models import register
from pagedserve.runtime.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass


register("MistralForCausalLM", MistralForCausalLM)
