"""Finds and opens a model: a Hugging Face directory (config, safetensors, tokenizer) or a GGUF file.

transformers provides configs, tokenizers and chat templates; weights are streamed from safetensors (or
dequantized from GGUF) straight into our own model classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pagedserve.runtime.models import get_model_class


@dataclass
class ModelSource:
    path: str
    config: object
    tokenizer: object
    generation_config: dict = field(default_factory=dict)
    iter_weights: Callable[[], Iterator[tuple[str, torch.Tensor]]] = lambda: iter(())

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        for src in (self.generation_config.get("eos_token_id"), getattr(self.config, "eos_token_id", None)):
            if src is None:
                continue
            ids.extend(src if isinstance(src, list | tuple) else [src])
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if not ids and tok_eos is not None:
            ids.append(tok_eos)
        return tuple(dict.fromkeys(int(i) for i in ids))


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path} (other formats are not supported)")
    return [os.path.join(path, f) for f in files]


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_hf_dir(path: str) -> ModelSource:
    from transformers import AutoConfig, AutoTokenizer

    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    get_model_class(getattr(config, "architectures", None))  # fail early on an unknown architecture
    files = _safetensors_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer from {path}: {e}") from e
    gen_cfg: dict = {}
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            gen_cfg = json.load(f)
    return ModelSource(path, config, tokenizer, gen_cfg, lambda: _iter_safetensors(files))


def load_model_source(model: str | os.PathLike) -> ModelSource:
    """Open a local model: a directory in Hugging Face layout, or a ``.gguf`` file."""
    model = os.fspath(model)
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model path {model!r} does not exist (only local paths are supported: no hub downloads)"
        )
    if os.path.isfile(model):
        if model.endswith(".gguf"):
            from pagedserve.runtime.gguf_loader import load_gguf

            m = load_gguf(model)
            return ModelSource(model, m.config, m.tokenizer, dict(m.generation_config), m.iter_weights)
        raise ValueError(f"{model!r} is a file but not a .gguf file; pass a model directory or a GGUF file")
    return load_hf_dir(model)
