"""Weights are sharded as they are read: under tensor parallelism each rank reads from disk only its own
slice of every sharded checkpoint tensor (never the whole tensor), and what it loads is exactly what the
eager path (whole tensors, then narrowed) loads.

Ranks are built in this process with ``TPGroup(rank, 2)``: loading runs no collectives, and the bytes each
rank reads are counted at the library boundary: the tensors safetensors' ``safe_open`` hands out (mmap-backed,
so these are the bytes the loader copies, and converts when the checkpoint's dtype is not the model's) and the
bytes gguf's ``dequantize`` is given."""

from __future__ import annotations

import os

import gguf.quants
import pytest
import safetensors
import safetensors.torch
import tiny_models
import torch
from gguf import GGMLQuantizationType
from gguf_util import TINY, random_llama_weights, tiny_tokenizer, write_tiny_gguf
from transformers import AutoModelForCausalLM

from pagedserve.runtime.gguf_loader import load_gguf
from pagedserve.runtime.loader import LazyTensor, load_model_source
from pagedserve.runtime.models import get_model_class
from pagedserve.runtime.parallel import TPGroup

TP = 2
# Checkpoint tensors split across ranks; everything else (norms, a replicated KV head) is read whole.
SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")


class CountingSlice:
    def __init__(self, real, name: str, reads: list):
        self._real, self._name, self._reads = real, name, reads

    def get_shape(self):
        return self._real.get_shape()

    def get_dtype(self):
        return self._real.get_dtype()

    def __getitem__(self, index):
        tensor = self._real[index]
        self._reads.append((self._name, index, tensor.nbytes))
        return tensor


class CountingFile:
    """safe_open, recording every read: (name, region or "whole", bytes)."""

    def __init__(self, real, reads: list):
        self._real, self._reads = real, reads

    def __enter__(self):
        self._real.__enter__()
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)

    def keys(self):
        return self._real.keys()

    def get_tensor(self, name):
        tensor = self._real.get_tensor(name)
        self._reads.append((name, "whole", tensor.nbytes))
        return tensor

    def get_slice(self, name):
        return CountingSlice(self._real.get_slice(name), name, self._reads)


def build(config, rank: int):
    return get_model_class(config.architectures)(config, TPGroup(rank, TP))


def is_sharded(name: str, config) -> bool:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if any(p in name for p in ("k_proj", "v_proj")) and kv_heads < TP:
        return False  # each rank needs its KV head whole
    return any(p in name for p in SHARDED)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("llama", {"num_key_value_heads": 1}),  # fewer KV heads than ranks: the KV head is read whole
        ("qwen2", {}),  # q/k/v biases
        ("qwen3", {}),  # per-head q/k norms
        ("llama", {"vocab_size": 385}),  # a vocabulary that does not split evenly: 193 + 192 rows
    ],
    ids=["llama", "llama-1kv", "qwen2", "qwen3", "llama-odd-vocab"],
)
def test_each_rank_reads_only_its_shard_of_safetensors(tiny_model_factory, tmp_path, monkeypatch, arch, overrides):
    if "vocab_size" in overrides:  # more rows than the tiny tokenizer's: the factory cannot build it
        path = str(tmp_path)
        torch.manual_seed(5)
        config = tiny_models.make_config(arch, **overrides)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tiny_models.build_tokenizer().save_pretrained(path)
    else:
        path, _, _ = tiny_model_factory(arch, **overrides)
    source = load_model_source(path)
    config = source.config
    real_open = safetensors.safe_open
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    full = {}
    for f in files:
        full.update(safetensors.torch.load_file(os.path.join(path, f)))

    reads: dict[int, list] = {}
    for rank in range(TP):
        reads[rank] = []
        def counting_open(*args, log=reads[rank], **kwargs):
            return CountingFile(real_open(*args, **kwargs), log)

        monkeypatch.setattr(safetensors, "safe_open", counting_open)
        model = build(config, rank)
        model.load_weights(source.iter_weights())
        monkeypatch.setattr(safetensors, "safe_open", real_open)

        # Independent reference: whole tensors, narrowed by torch.
        eager = build(config, rank)
        eager.load_weights(full.items())
        for name, p in eager.named_parameters():
            assert torch.equal(dict(model.named_parameters())[name], p), f"rank {rank}: {name}"

    sharded_bytes = sum(t.nbytes for n, t in full.items() if is_sharded(n, config))
    replicated_bytes = sum(t.nbytes for n, t in full.items() if not is_sharded(n, config))
    assert sharded_bytes > 0.9 * (sharded_bytes + replicated_bytes)
    for rank in range(TP):
        names = [name for name, _, _ in reads[rank]]
        assert sorted(names) == sorted(full), f"rank {rank} read a tensor twice or missed one"
        for name, index, _ in reads[rank]:
            if is_sharded(name, config):
                assert index != "whole", f"rank {rank} read the whole of sharded tensor {name}"
        rank_sharded = sum(b for n, _, b in reads[rank] if is_sharded(n, config))
        rank_replicated = sum(b for n, _, b in reads[rank] if not is_sharded(n, config))
        assert rank_replicated == replicated_bytes
        assert rank_sharded <= 0.51 * sharded_bytes, f"rank {rank}: {rank_sharded} of {sharded_bytes} bytes"
    # Together the ranks read every sharded tensor exactly once: disjoint regions that cover it.
    for name, tensor in full.items():
        if is_sharded(name, config):
            times_read = torch.zeros(tensor.shape, dtype=torch.int32)
            for rank in range(TP):
                for _, index, _ in (r for r in reads[rank] if r[0] == name):
                    times_read[index] += 1
            assert bool((times_read == 1).all()), name


# --------------------------------------------------------------------------------------------------- GGUF
Q = GGMLQuantizationType
GGUF_CFG = dict(TINY, intermediate_size=128)  # 64 down_proj columns per rank: whole Q8_0/Q4_1 blocks


def gguf_model(tmp_path, qtype):
    weights = random_llama_weights(tiny_tokenizer().get_vocab_size(), GGUF_CFG, tied=False, seed=int(qtype))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, weights, cfg=GGUF_CFG, tensor_type=qtype)
    return path


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_each_rank_dequantizes_only_its_shard_of_gguf(tmp_path, monkeypatch, qtype):
    path = gguf_model(tmp_path, qtype)
    source = load_model_source(path)
    config = source.config
    assert config.vocab_size % TP  # the embedding and LM head split unevenly
    plans = load_gguf(path)._plans
    sharded = sum(p.tensor.n_bytes for p in plans if is_sharded(p.hf_name, config))
    replicated = sum(p.tensor.n_bytes for p in plans if not is_sharded(p.hf_name, config))
    real = gguf.quants.dequantize
    per_rank = []
    for rank in range(TP):
        log: list[int] = []

        def counting(data, qt, log=log):
            log.append(data.nbytes)
            return real(data, qt)

        monkeypatch.setattr(gguf.quants, "dequantize", counting)
        model = build(config, rank)
        model.load_weights(source.iter_weights())
        monkeypatch.setattr(gguf.quants, "dequantize", real)
        per_rank.append(sum(log))

        eager = build(config, rank)  # whole dequantized tensors (rope rows un-permuted whole), then narrowed
        eager.load_weights(load_gguf(path).iter_weights())
        for name, p in eager.named_parameters():
            assert torch.equal(dict(model.named_parameters())[name], p), f"rank {rank}: {name}"
    for rank, nbytes in enumerate(per_rank):
        assert nbytes - replicated <= 0.51 * sharded, f"rank {rank} dequantized {nbytes} bytes"
    assert sum(per_rank) == TP * replicated + sharded  # disjoint shards that cover every sharded tensor


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=lambda q: q.name)
def test_gguf_lazy_regions_equal_the_whole_tensor_narrowed(tmp_path, qtype):
    """Regions our loaders never ask for still read right: rows cutting a rope head (q/k), columns cutting
    a quantization block."""
    path = gguf_model(tmp_path, qtype)
    model = load_gguf(path)
    whole = dict(model.iter_weights())
    for name, lazy in model.iter_lazy_weights():
        assert lazy.shape == whole[name].shape
        cuts = [(0, 1, 5), (0, 16, 16)] + ([(1, 3, 40), (1, 32, 32)] if lazy.dim() == 2 else [])
        for dim, start, length in cuts:
            expected = whole[name].narrow(dim, start, length)
            assert torch.equal(lazy.narrow(dim, start, length).read(), expected), (name, dim, start, length)
        if lazy.dim() == 2:
            got = lazy.narrow(0, 8, 16).narrow(1, 32, 32).read()
            assert torch.equal(got, whole[name][8:24, 32:64]), name


def test_lazy_tensor_narrowing_composes_and_checks_bounds():
    t = torch.arange(7 * 11, dtype=torch.float32).reshape(7, 11)
    lazy = LazyTensor(t.shape, lambda region: t[region].clone())
    assert torch.equal(lazy.narrow(1, 2, 6).narrow(0, 1, 4).narrow(1, 3, 2).read(), t[1:5, 5:7])
    assert torch.equal(lazy.narrow(-1, 10, 1).read(), t[:, 10:])
    assert lazy.narrow(0, 7, 0).shape == (0, 11)
    with pytest.raises(IndexError, match="outside"):
        lazy.narrow(0, 5, 3)
    with pytest.raises(IndexError, match="outside"):
        lazy.narrow(1, 2, 6).narrow(1, 1, 6)
