"""Build tiny Llama GGUF files for tests, the way llama.cpp's converter lays them out.

Written from the GGUF side (llama.cpp names, ggml shapes, llama.cpp's Q/K row permutation) so the
loader's inverse mapping is checked against an independent forward mapping.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 50000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Paged attention keeps the KV cache in fixed-size blocks; a block table maps positions to blocks.",
    "What is the capital of France? It is Paris, a city on the Seine.",
    "Numbers like 12345 and 2024 appear too, with punctuation: (a), [b], {c}!",
] * 20

_LAYER_NAMES = {  # HF module -> llama.cpp tensor
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE trained here with `tokenizers`: the reference for the GGUF-built tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=333, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def random_llama_weights(vocab_size: int, cfg: dict = TINY, *, tied: bool = True, seed: int = 0) -> dict:
    """HF-layout float32 weights; rows get different scales so quantization blocks differ."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim

    def matrix(rows, cols):
        scale = torch.rand(rows, 1, generator=g) * 0.2 + 0.01
        return torch.randn(rows, cols, generator=g) * scale

    weights = {"model.embed_tokens.weight": matrix(vocab_size, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = matrix(hidden, hidden)
        weights[p + "self_attn.k_proj.weight"] = matrix(kv, hidden)
        weights[p + "self_attn.v_proj.weight"] = matrix(kv, hidden)
        weights[p + "self_attn.o_proj.weight"] = matrix(hidden, hidden)
        weights[p + "mlp.gate_proj.weight"] = matrix(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = matrix(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = matrix(hidden, inter)
        weights[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        weights[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    weights["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    if not tied:
        weights["lm_head.weight"] = matrix(vocab_size, hidden)
    return weights


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows (first half, second half) become interleaved pairs."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_layout(hf_name: str, w: torch.Tensor, cfg: dict = TINY) -> np.ndarray:
    array = w.numpy().astype(np.float32)
    if hf_name.endswith("q_proj.weight"):
        return llama_cpp_permute(array, cfg["num_attention_heads"])
    if hf_name.endswith("k_proj.weight"):
        return llama_cpp_permute(array, cfg["num_key_value_heads"])
    return array


def encode_tensor(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The bytes (or float array) a GGUF file stores for `array` in format `qtype`."""
    if qtype == GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return quantize(array, qtype)


def write_tiny_gguf(
    path: Path,
    weights: dict,
    *,
    cfg: dict = TINY,
    tensor_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    architecture: str = "llama",
    extra: Callable[[GGUFWriter], None] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Write `weights` (HF names/layout) as llama.cpp would; 2-D tensors in `tensor_type`, norms F32.

    Returns what was stored per GGUF tensor name (floats or quantized bytes), for exact checks.
    """
    tokenizer = tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in _merges(tokenizer)]

    writer = GGUFWriter(str(path), architecture)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    if extra is not None:
        extra(writer)

    stored = {}
    for hf_name, w in weights.items():
        name = gguf_name(hf_name)
        if name in skip:
            continue
        array = gguf_layout(hf_name, w, cfg)
        qtype = tensor_type if array.ndim == 2 else GGMLQuantizationType.F32
        stored[name] = encode_tensor(array, qtype)
        writer.add_tensor(name, stored[name], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _merges(tokenizer) -> list:
    return json.loads(tokenizer.to_str())["model"]["merges"]


def reference_dequantize(stored: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> np.ndarray:
    """ggml's block formats decoded straight from their definition (ggml-common.h), block by block."""
    rows = stored.shape[0]
    if qtype == GGMLQuantizationType.F32:
        return stored.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return stored.astype(np.float32)
    if qtype == GGMLQuantizationType.BF16:
        bits = stored.reshape(rows, cols, 2).view(np.uint16)[..., 0].astype(np.uint32) << 16
        return bits.view(np.float32)
    block_bytes = {GGMLQuantizationType.Q8_0: 34, GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}
    blocks = stored.reshape(-1, block_bytes[qtype])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    if qtype == GGMLQuantizationType.Q8_0:
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(rows, cols)
    packed = blocks[:, -16:]
    # element j of a block is the low nibble of byte j, element j + 16 its high nibble
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    if qtype == GGMLQuantizationType.Q4_0:
        return (d * (q - 8)).reshape(rows, cols)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (d * q + m).reshape(rows, cols)


def quantization_error_bound(original: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Per-element worst-case |dequantized - original| for round-to-nearest block quantization.

    Includes the fp16 rounding of each block's scale (and minimum, for Q4_1).
    """
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        raise ValueError("float formats are checked exactly")
    blocks = original.reshape(-1, 32).astype(np.float64)
    fp16_rel = 2.0**-11
    if qtype == GGMLQuantizationType.Q8_0:
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = d * (0.5 + 127 * fp16_rel)
    elif qtype == GGMLQuantizationType.Q4_0:
        d = np.abs(blocks).max(axis=1, keepdims=True) / 8
        # the scale is set by the signed extreme (level -8); values near minus that extreme would need
        # level +8, which does not exist, so they clip to +7 and may lose a whole step
        bound = d * (1 + 8 * fp16_rel)
    else:
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (hi - lo) / 15
        bound = d * (0.5 + 15 * fp16_rel) + np.abs(lo) * fp16_rel
    return np.broadcast_to(bound + 1e-7, blocks.shape).reshape(original.shape)
