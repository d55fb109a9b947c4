"""Shared pieces of the GPU benchmarks: the card's two ceilings, environment facts, random models."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)


def environment() -> dict:
    import triton

    try:
        import transformers

        tver = transformers.__version__
    except ImportError:
        tver = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "gpu": gpu, "gpu_count": torch.cuda.device_count(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton.__version__, "transformers": tver,
        "python": platform.python_version(), "host": platform.node(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "driver": _driver(),
    }


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return None


def measure_ceilings() -> dict:
    """Device-to-device copy GB/s (read + write bytes) and a large bf16 matmul's TFLOP/s, medians."""
    from triton.testing import do_bench

    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    copy_gbs = 2 * n / (ms * 1e-3) / 1e9
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "matmul_bf16_TFLOPs": tflops}


def write_random_llama(path: str, shape: dict, seed: int = 0, std: float = 0.02, layers_per_shard: int = 4) -> None:
    """A Llama-shaped checkpoint of random bf16 weights, sharded safetensors + config + a small tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tiny_models import build_tokenizer

    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(**shape, architectures=["LlamaForCausalLM"], bos_token_id=0, eos_token_id=2,
                      torch_dtype="bfloat16")
    cfg.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    hd = h // shape["num_attention_heads"]
    kvd = shape["num_key_value_heads"] * hd

    def rnd(*s):
        return (torch.randn(*s, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    weight_map: dict[str, str] = {}
    num_layers = shape["num_hidden_layers"]
    shards = [list(range(i, min(i + layers_per_shard, num_layers))) for i in range(0, num_layers, layers_per_shard)]
    total = len(shards) + 1
    for si, layer_ids in enumerate(shards):
        tensors = {}
        for i in layer_ids:
            p = f"model.layers.{i}."
            tensors[p + "self_attn.q_proj.weight"] = rnd(h, h)
            tensors[p + "self_attn.k_proj.weight"] = rnd(kvd, h)
            tensors[p + "self_attn.v_proj.weight"] = rnd(kvd, h)
            tensors[p + "self_attn.o_proj.weight"] = rnd(h, h)
            tensors[p + "mlp.gate_proj.weight"] = rnd(inter, h)
            tensors[p + "mlp.up_proj.weight"] = rnd(inter, h)
            tensors[p + "mlp.down_proj.weight"] = rnd(h, inter)
            tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        name = f"model-{si + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    tensors = {
        "model.embed_tokens.weight": rnd(shape["vocab_size"], h),
        "lm_head.weight": rnd(shape["vocab_size"], h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def llama_param_bytes(shape: dict, dtype_bytes: int = 2) -> int:
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kvd = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * kvd * h + 3 * h * inter + 2 * h
    return dtype_bytes * (shape["num_hidden_layers"] * per_layer + 2 * v * h + h)


def graph_us_per_call(fn, calls: int, reps: int = 20) -> float:
    """Microseconds per call of a CUDA graph of ``fn()`` replayed ``reps`` times, where one ``fn()`` makes
    ``calls`` calls (the way a decode step meets them: back to back, no host launch cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and settle the allocator outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * calls)
