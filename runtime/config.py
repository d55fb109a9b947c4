"""Engine configuration: small validated dataclasses, one per concern."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, config_dtype, device: torch.device) -> torch.dtype:
    """vLLM's rule: ``auto`` takes the checkpoint's dtype on GPU (fp32 becomes bf16), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype.replace("torch.", ""), torch.bfloat16)
        if config_dtype in (torch.float16, torch.bfloat16):
            return config_dtype
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_cache_tokens: int | None = None  # explicit KV size (CPU default: 64k tokens' worth of blocks)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size: must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_cache_tokens is not None and self.num_kv_cache_tokens < self.block_size:
            raise ValueError(
                f"num_kv_cache_tokens: must be >= block_size ({self.block_size}), got {self.num_kv_cache_tokens}"
            )


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    policy: str = "fcfs"  # or "priority"
    long_prefill_token_threshold: int = 0  # 0: no per-request cap beyond the step budget

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy: must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1, got {self.max_model_len}")
