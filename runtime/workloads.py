"""Serving-benchmark workloads: which requests to send (prompt and output lengths) and when (arrivals).

Pure and seeded, so ``pagedserve bench serve`` and the GPU benchmarks in ``bench/`` replay exactly the same
workload from the same arguments.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Plain English for the random workload's token pool: tokenizing it gives ordinary, non-special token ids.
POOL_TEXT = (
    "The history of computing is a story of abstractions built on abstractions. Engineers who once wired "
    "programs by hand learned to write assemblers, then compilers, then operating systems that shared one "
    "machine among many users. Networks joined the machines, and the web joined the networks. Today a "
    "language model answers questions in a data centre far away, and the request that reaches it passes "
    "through load balancers, gateways and schedulers before a single matrix is multiplied. Each layer hides "
    "the one below it, and each layer has its own failures, its own queues and its own latency. Measuring "
    "the whole path, from the first byte sent to the last token received, is the only honest benchmark."
)


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (exact prompt length)
    prompt_len: int
    output_len: int


def _lengths(rng: random.Random, mean: int, range_ratio: float) -> int:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_requests(
    num: int, input_len: int, output_len: int, token_pool: Sequence[int], range_ratio: float = 0.0, seed: int = 0,
) -> list[BenchRequest]:
    """``num`` prompts of random tokens from ``token_pool``; lengths uniform in mean * [1-r, 1+r]."""
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num, input_len and output_len must be >= 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio: must be in [0, 1), got {range_ratio}")
    if not token_pool:
        raise ValueError("token_pool: must not be empty")
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n_in = _lengths(rng, input_len, range_ratio)
        n_out = _lengths(rng, output_len, range_ratio)
        out.append(BenchRequest([rng.choice(token_pool) for _ in range(n_in)], n_in, n_out))
    return out


def file_requests(
    path: str, num: int, seed: int = 0, default_output_len: int = 128,
    count_tokens: Callable[[str], int] | None = None,
) -> list[BenchRequest]:
    """Requests from a JSONL file (or a JSON list): ``{"prompt": str | [ids], "output_len": int}`` per entry.

    Entries are shuffled with ``seed`` and repeated as needed to reach ``num``. Text prompts are measured
    with ``count_tokens`` when given (otherwise their length is reported as 0 until the server says).
    """
    with open(path) as f:
        text = f.read()
    stripped = text.lstrip()
    rows = json.loads(text) if stripped.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no requests in the file")
    base = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str | list) or not prompt:
            raise ValueError(f"{path}: entry {i} has no 'prompt' (a string or a list of token ids)")
        n_out = int(row.get("output_len", default_output_len))
        n_in = len(prompt) if isinstance(prompt, list) else (count_tokens(prompt) if count_tokens else 0)
        base.append(BenchRequest(prompt, n_in, n_out))
    rng = random.Random(seed)
    rng.shuffle(base)
    return [base[i % len(base)] for i in range(num)]


def arrival_offsets(num: int, request_rate: float, pattern: str = "poisson", burst_size: int = 8,
                    seed: int = 0) -> list[float]:
    """Send times in seconds from the start. ``inf`` rate: everything at once.

    poisson: exponential gaps with mean 1/rate. burst: ``burst_size`` requests at once, bursts spaced so the
    average rate is ``request_rate``.
    """
    if num < 1:
        raise ValueError("num must be >= 1")
    if math.isinf(request_rate):
        return [0.0] * num
    if request_rate <= 0:
        raise ValueError(f"request_rate: must be > 0 or inf, got {request_rate}")
    if pattern == "poisson":
        rng = random.Random(seed)
        t, out = 0.0, []
        for _ in range(num):
            out.append(t)
            t += rng.expovariate(request_rate)
        return out
    if pattern == "burst":
        if burst_size < 1:
            raise ValueError("burst_size must be >= 1")
        return [(i // burst_size) * burst_size / request_rate for i in range(num)]
    raise ValueError(f"pattern: must be 'poisson' or 'burst', got {pattern!r}")
