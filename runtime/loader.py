"""Finds and opens a model: a Hugging Face directory (config, safetensors, tokenizer) or a GGUF file.

transformers provides configs, tokenizers and chat templates; weights are streamed from safetensors (or
dequantized from GGUF) straight into our own model classes. They stream as :class:`LazyTensor` handles, not
tensors: each parameter's weight loader narrows a handle to this rank's shard before reading it, so under
tensor parallelism a rank copies (dtype-converts, dequantizes) only its ~1/N of every sharded tensor.
safetensors' tensors are views of a memory map, so pages outside the shard are never touched either, except
where a column shard shares pages with its neighbours' columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pagedserve.runtime.models import get_model_class

Region = tuple[slice, ...]


class LazyTensor:
    """A checkpoint tensor not read yet: :meth:`narrow` is free and :meth:`read` copies only the region left.

    It offers the two things weight loaders use of a tensor, ``shape`` and ``narrow``, so a loader that
    narrows to its rank's shard and then reads (``layers.read_weight``) never materialises the whole tensor.
    ``read_region`` is given one ``slice(start, stop)`` per dimension and returns that region as a tensor.
    """

    __slots__ = ("shape", "_read_region", "_region")

    def __init__(self, shape, read_region: Callable[[Region], torch.Tensor], region: Region | None = None):
        self.shape = torch.Size(shape)
        self._read_region = read_region
        self._region = region if region is not None else tuple(slice(0, n) for n in self.shape)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = dim + len(self.shape) if dim < 0 else dim
        if not (0 <= dim < len(self.shape)) or start < 0 or length < 0 or start + length > self.shape[dim]:
            raise IndexError(f"narrow({dim}, {start}, {length}) is outside a tensor of shape {tuple(self.shape)}")
        base = self._region[dim].start + start
        region = self._region[:dim] + (slice(base, base + length),) + self._region[dim + 1 :]
        shape = self.shape[:dim] + (length,) + self.shape[dim + 1 :]
        return LazyTensor(shape, self._read_region, region)

    def dim(self) -> int:
        return len(self.shape)

    def read(self) -> torch.Tensor:
        return self._read_region(self._region)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, region={self._region})"


def is_whole(region: Region, shape) -> bool:
    return all(s.start == 0 and s.stop == n for s, n in zip(region, shape, strict=True))


@dataclass
class ModelSource:
    path: str
    config: object
    tokenizer: object
    generation_config: dict = field(default_factory=dict)
    # (checkpoint name, LazyTensor or torch.Tensor); a handle is valid until the iterator moves on.
    iter_weights: Callable[[], Iterator[tuple[str, LazyTensor | torch.Tensor]]] = lambda: iter(())

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


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, LazyTensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, _safetensors_handle(f, name)


def _safetensors_handle(f, name: str) -> LazyTensor:
    tensor_slice = f.get_slice(name)  # metadata only: nothing is read until it is indexed
    shape = tuple(tensor_slice.get_shape())

    def read_region(region: Region) -> torch.Tensor:
        # A whole tensor (TP=1, norms, biases of row-parallel layers) takes get_tensor's one-copy path.
        if is_whole(region, shape):
            return f.get_tensor(name)
        return tensor_slice[region]

    return LazyTensor(shape, read_region)


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
            return ModelSource(model, m.config, m.tokenizer, dict(m.generation_config), m.iter_lazy_weights)
        raise ValueError(f"{model!r} is a file but not a .gguf file; pass a model directory or a GGUF file")
    return load_hf_dir(model)
