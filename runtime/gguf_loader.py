"""Load Llama-architecture GGUF files (llama.cpp's format) as Hugging Face-named tensors.

A GGUF file carries everything a serving engine needs: hyper-parameters and tokenizer as key/value
metadata, weights as (often block-quantized) tensors under llama.cpp's names. `load_gguf` reads the
metadata into a transformers `LlamaConfig`, a fast tokenizer with the file's chat template and a
generation-config dict; `GGUFModel.iter_weights` then streams the weights one tensor at a time,
dequantized to the requested dtype, renamed to the Hugging Face Llama names and with llama.cpp's
Q/K row permutation undone, so the engine's rotate-half RoPE matches HF transformers.

The `gguf` package (llama.cpp's own Python reader) parses the file and memory-maps the tensor data;
its `gguf.quants.dequantize` does the block dequantization, so there is no hand-written bit
unpacking here to drift from llama.cpp's definition of each format.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Formats llama.cpp uses for dense Llama checkpoints and their common quantizations. Others
# (K-quants, I-quants) are rejected by name rather than silently mis-read.
SUPPORTED_TENSOR_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"})
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Llama 3.x files store their rope scaling as per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
_SPECIAL_TOKEN_KEYS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
_GENERATION_KEYS = {  # GGUF sampling defaults -> HF generation_config names
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.temp": "temperature",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


@dataclass
class _TensorPlan:
    hf_name: str
    tensor: Any  # gguf.ReaderTensor
    rope_heads: int | None  # set for q/k projections: rows to un-permute, in this many heads


@dataclass
class GGUFModel:
    """A GGUF file opened for loading: metadata decoded, weights still on disk (memory-mapped)."""

    path: Path
    config: Any  # transformers.LlamaConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    generation_config: dict[str, Any]
    dtype: torch.dtype
    metadata: dict[str, Any] = field(repr=False)
    _plans: list[_TensorPlan] = field(repr=False)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` in file order, one dequantized tensor alive at a time."""
        for plan in self._plans:
            yield plan.hf_name, _read_plan(plan, self.dtype, _whole(plan))

    def iter_lazy_weights(self) -> Iterator[tuple[str, Any]]:
        """Yield `(hf_name, LazyTensor)`: a weight loader's narrowing picks the rows (and, on block
        boundaries, the columns) to dequantize, so a tensor-parallel rank dequantizes only its shard."""
        from pagedserve.runtime.loader import LazyTensor

        for plan in self._plans:
            shape = tuple(int(d) for d in reversed(plan.tensor.shape.tolist()))
            yield plan.hf_name, LazyTensor(shape, lambda region, plan=plan: _read_plan(plan, self.dtype, region))


def _whole(plan: _TensorPlan) -> tuple[slice, ...]:
    return tuple(slice(0, int(d)) for d in reversed(plan.tensor.shape.tolist()))


def _read_plan(plan: _TensorPlan, dtype: torch.dtype, region: tuple[slice, ...]) -> torch.Tensor:
    """Dequantize ``region`` (one slice per HF dimension) of a planned tensor, rope rows un-permuted."""
    rows, cols = region[0], region[1] if len(region) > 1 else None
    if plan.rope_heads is not None:
        num_rows = int(plan.tensor.shape[-1])  # ggml lists dims innermost first: rows are the last
        head_dim = num_rows // plan.rope_heads
        if rows.start % head_dim or rows.stop % head_dim:
            # Only whole heads can be un-permuted on their own; our weight loaders never ask for less.
            return _read_plan(plan, dtype, (slice(0, num_rows), *region[1:]))[rows].contiguous()
        weight = _dequantize(plan.tensor, rows, cols)
        weight = _unpermute_rope_rows(weight, (rows.stop - rows.start) // head_dim)
    else:
        weight = _dequantize(plan.tensor, rows, cols)
    return weight.to(dtype).contiguous()


def _dequantize(tensor, rows: slice, cols: slice | None) -> torch.Tensor:
    """Dequantize rows ``rows`` (and columns ``cols``) of a GGUF tensor, touching only their bytes when the
    columns fall on quantization-block boundaries."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    data = tensor.data[rows]  # a view of the memory map: nothing is read yet
    late_cols = None
    if cols is not None:
        if data.dtype != np.uint8:  # F32/F16 are typed arrays: one column per element
            data = data[:, cols]
        else:
            block, nbytes = GGML_QUANT_SIZES[tensor.tensor_type]
            if cols.start % block == 0 and cols.stop % block == 0:
                data = data[:, cols.start // block * nbytes : cols.stop // block * nbytes]
            else:
                late_cols = cols
    values = dequantize(data, tensor.tensor_type)
    # F32 comes back as a read-only view of the memory map: copy it; dequantized arrays are fresh and
    # torch adopts them without a copy.
    weight = torch.from_numpy(values) if values.flags.writeable else torch.tensor(values)
    return weight[:, late_cols] if late_cols is not None else weight


def load_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Open a Llama-architecture GGUF file: config, tokenizer and generation config now, weights lazily.

    Raises `FileNotFoundError` for a missing file and `ValueError` naming the problem for anything
    the engine cannot serve faithfully: another architecture, an unsupported tensor type, a
    truncated or corrupt file, missing or mis-shaped tensors, or a `dtype` other than fp32/fp16/bf16.
    """
    path = Path(path)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype!r}")
    reader = _open_reader(path)
    metadata = _read_metadata(reader)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"{path.name}: GGUF architecture {architecture!r} is not supported; only 'llama' GGUF files "
            "can be loaded (other architectures: use a Hugging Face model directory)"
        )
    if metadata.get("llama.expert_count", 0):
        raise ValueError(f"{path.name}: mixture-of-experts 'llama' GGUF files (Mixtral) are not supported")

    tensors = {t.name: t for t in reader.tensors}
    _check_extents(path, tensors.values())
    config = _build_config(path, metadata, tensors)
    plans = _plan_tensors(path, tensors, config)
    return GGUFModel(
        path=path,
        config=config,
        tokenizer=_build_tokenizer(path, metadata),
        generation_config=_generation_config(metadata),
        dtype=dtype,
        metadata=metadata,
        _plans=plans,
    )


def _open_reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if len(magic) < 4:
        raise ValueError(f"{path} is truncated: it has {len(magic)} bytes")
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader fails with whatever numpy raises on short or bad bytes
        raise ValueError(
            f"{path} ({path.stat().st_size} bytes) is truncated or corrupt, e.g. an interrupted download; "
            f"download it again (gguf reader: {exc})"
        ) from exc


def _read_metadata(reader) -> dict[str, Any]:
    """Decode every key/value field into plain Python values (str, int, float, bool, lists)."""
    from gguf import GGUFValueType

    def scalar(part, value_type):
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part[0].item()

    metadata = {}
    for key, fld in reader.fields.items():
        if not fld.types:
            continue
        if fld.types[0] == GGUFValueType.ARRAY:
            if len(fld.types) > 1 and fld.types[1] == GGUFValueType.ARRAY:
                continue  # nested arrays: no Llama key uses them
            metadata[key] = [scalar(fld.parts[i], fld.types[-1]) for i in fld.data]
        else:
            metadata[key] = scalar(fld.parts[fld.data[0]], fld.types[0])
    return metadata


def _check_extents(path: Path, tensors) -> None:
    # Today's reader already fails on short tensor data; this keeps the check if it ever maps lazily.
    size = path.stat().st_size
    for t in tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise ValueError(
                f"{path.name} is truncated: tensor {t.name} ends at byte {end} but the file has {size} bytes"
            )


def _build_config(path: Path, metadata: dict[str, Any], tensors: dict[str, Any]):
    from transformers import LlamaConfig

    def required(key: str):
        if key not in metadata:
            raise ValueError(f"{path.name}: required metadata key {key!r} is missing")
        return metadata[key]

    hidden_size = int(required("llama.embedding_length"))
    num_heads = int(required("llama.attention.head_count"))
    num_kv_heads = int(metadata.get("llama.attention.head_count_kv", num_heads))
    head_dim = int(metadata.get("llama.attention.key_length", hidden_size // num_heads))
    rotary_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(f"{path.name}: partial rotary embedding ({rotary_dim} of {head_dim}) is not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path.name}: tensor 'token_embd.weight' is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # ggml order: (hidden, vocab)
    rope_theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(required("llama.feed_forward_length")),
        num_hidden_layers=int(required("llama.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(metadata.get("llama.context_length", 2048)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(path, metadata, tensors, rope_theta, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    # transformers 5 folds rope_theta into config.rope_parameters; keep the flat name readable too.
    if getattr(config, "rope_theta", None) is None:
        config.rope_theta = rope_theta
    return config


def _rope_scaling(path: Path, metadata, tensors, rope_theta: float, head_dim: int) -> dict | None:
    """HF `rope_scaling` from the `llama.rope.scaling.*` keys or a Llama 3 `rope_freqs` tensor."""
    kind = metadata.get("llama.rope.scaling.type", "none")
    factor = metadata.get("llama.rope.scaling.factor")
    original = metadata.get("llama.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor is None:
        raise ValueError(f"{path.name}: rope scaling type {kind!r} without llama.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if f"llama.rope.scaling.{gguf_key}" in metadata:
                scaling[hf_key] = float(metadata[f"llama.rope.scaling.{gguf_key}"])
        return scaling
    if kind != "none":
        raise ValueError(f"{path.name}: rope scaling type {kind!r} is not supported for llama")
    if _ROPE_FREQS not in tensors:
        return None
    from gguf.quants import dequantize

    divisors = dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type).astype(np.float64)
    return _llama3_scaling_from_divisors(path, divisors.ravel(), rope_theta, head_dim, original or 8192)


def _llama3_scaling_from_divisors(path: Path, divisors, rope_theta, head_dim, original: int) -> dict | None:
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency divisors.

    In the band between the two wavelength thresholds 1/divisor is linear in 1/wavelength; two points
    of that band fix low/high_freq_factor for the chosen original context (any choice of it gives the
    same frequencies). The recovered parameters are checked by recomputing every divisor.
    """
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inv_freq.shape:
        raise ValueError(f"{path.name}: {_ROPE_FREQS} has {divisors.size} entries, expected {inv_freq.size}")
    factor = float(divisors.max())
    if math.isclose(factor, 1.0, rel_tol=1e-6) and math.isclose(divisors.min(), 1.0, rel_tol=1e-6):
        return None
    band = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if band.sum() < 2:
        raise ValueError(f"{path.name}: {_ROPE_FREQS} has too few smoothed frequencies to recover llama3 scaling")
    x = inv_freq[band] / (2 * math.pi)  # 1 / wavelength
    smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(x, smooth, 1)
    low_freq_factor = -intercept * original / slope
    high_freq_factor = low_freq_factor + original / slope
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low_freq_factor),
        "high_freq_factor": float(high_freq_factor),
        "original_max_position_embeddings": int(original),
    }
    if not np.allclose(_llama3_divisors(inv_freq, scaling), divisors, rtol=1e-4):
        raise ValueError(f"{path.name}: {_ROPE_FREQS} does not follow Llama 3 rope scaling; unsupported")
    return scaling


def _llama3_divisors(inv_freq, scaling: dict):
    wavelen = 2 * math.pi / inv_freq
    original = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _plan_tensors(path: Path, tensors: dict[str, Any], config) -> list[_TensorPlan]:
    """Map, type-check and shape-check every tensor up front so errors surface at load, not mid-stream."""
    expected = _expected_tensors(config)
    unknown = sorted(set(tensors) - set(expected) - {_ROPE_FREQS})
    if unknown:
        raise ValueError(f"{path.name}: tensors with no Llama counterpart: {', '.join(unknown)}")
    missing = sorted(set(expected) - set(tensors) - {"output.weight"})
    if missing:
        raise ValueError(f"{path.name}: missing tensors: {', '.join(missing)}")
    plans = []
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:
            continue
        hf_name, shape = expected[name]
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"{path.name}: tensor {name} has type {type_name}, which is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_TENSOR_TYPES))})"
            )
        stored_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists dims innermost first
        if stored_shape != shape:
            raise ValueError(f"{path.name}: tensor {name} has shape {stored_shape}, expected {shape}")
        rope_heads = None
        if hf_name.endswith("q_proj.weight"):
            rope_heads = config.num_attention_heads
        elif hf_name.endswith("k_proj.weight"):
            rope_heads = config.num_key_value_heads
        plans.append(_TensorPlan(hf_name, tensor, rope_heads))
    return plans


def _expected_tensors(config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """llama.cpp tensor name -> (HF name, HF shape) for every tensor a Llama GGUF may hold."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    expected = {
        "token_embd.weight": ("model.embed_tokens.weight", (config.vocab_size, hidden)),
        "output_norm.weight": ("model.norm.weight", (hidden,)),
        "output.weight": ("lm_head.weight", (config.vocab_size, hidden)),
    }
    per_layer = {
        "attn_q": ("self_attn.q_proj", (q_rows, hidden)),
        "attn_k": ("self_attn.k_proj", (kv_rows, hidden)),
        "attn_v": ("self_attn.v_proj", (kv_rows, hidden)),
        "attn_output": ("self_attn.o_proj", (hidden, q_rows)),
        "ffn_gate": ("mlp.gate_proj", (inter, hidden)),
        "ffn_up": ("mlp.up_proj", (inter, hidden)),
        "ffn_down": ("mlp.down_proj", (hidden, inter)),
        "attn_norm": ("input_layernorm", (hidden,)),
        "ffn_norm": ("post_attention_layernorm", (hidden,)),
    }
    for i in range(config.num_hidden_layers):
        for gguf_module, (hf_module, shape) in per_layer.items():
            expected[f"blk.{i}.{gguf_module}.weight"] = (f"model.layers.{i}.{hf_module}.weight", shape)
    return expected


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order for interleaved RoPE (pairs 2i, 2i+1) back to HF's halves (i, i+d/2)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _build_tokenizer(path: Path, metadata: dict[str, Any]):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        model = metadata.get("tokenizer.ggml.model")
        raise ValueError(f"{path.name}: cannot build a tokenizer (tokenizer.ggml.model={model!r}): {exc}") from exc
    # Set special tokens and template ourselves: transformers releases differ in what they carry over
    # (5.17 makes `<|im_start|>` the eos token of a ChatML file and drops its pad token).
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    for attribute, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            setattr(tokenizer, attribute, tokens[token_id])
    template = metadata.get("tokenizer.chat_template")
    named = {
        key.removeprefix("tokenizer.chat_template."): value
        for key, value in metadata.items()
        if key.startswith("tokenizer.chat_template.")
    }
    if template is not None and named:
        tokenizer.chat_template = {"default": template, **named}
    elif template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids and sampling defaults; eos also lists end-of-turn/message tokens, as HF configs do."""
    generation: dict[str, Any] = {}
    if "tokenizer.ggml.bos_token_id" in metadata:
        generation["bos_token_id"] = metadata["tokenizer.ggml.bos_token_id"]
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if "tokenizer.ggml.padding_token_id" in metadata:
        generation["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    for gguf_key, hf_key in _GENERATION_KEYS.items():
        if gguf_key in metadata:
            generation[hf_key] = metadata[gguf_key]
    if any(key in generation for key in ("temperature", "top_k", "top_p", "min_p")):
        generation["do_sample"] = True
    return generation
