"""Sampling parameters of one request, validated up front (vLLM-compatible names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pagedserve.runtime.structured_outputs import StructuredOutputsParams


@dataclass
class SamplingParams:
    """How to sample one request's output. Field names and defaults follow vLLM's ``SamplingParams``."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # A grammar the output must follow (JSON schema, regex, choice, Lark); a dict of its fields is accepted.
    structured_outputs: StructuredOutputsParams | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        self._validate()
        # Read on every step by the sampler; params are not mutated after construction (clone() re-derives it).
        self.needs_logit_processing = bool(self.logit_bias) or self.needs_penalties
        # Whether sampling this request needs its previous token on the host (penalties, the min_tokens
        # mask, a grammar) or returns host data each step (logprobs): such requests turn async scheduling off
        # while they run (engine.py).
        self.needs_host_sync = (
            self.needs_penalties or self.min_tokens > 0 or self.logprobs is not None
            or self.prompt_logprobs is not None or self.structured_outputs is not None
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from a plain dict, refusing unknown keys with a message that names them."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**d)

    def _validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {msg}, got {getattr(self, name)!r}")

        check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be -1, 0 (disabled) or >= 1")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens",
            "must be an integer >= 1 or None",
        )
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens")
        check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            "logprobs",
            "must be an integer in [0, 20] or None",
        )
        check(
            self.prompt_logprobs is None
            or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
            "prompt_logprobs",
            "must be an integer in [0, 20] or None",
        )
        check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer or None")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        if self.structured_outputs is not None:
            check(self.min_tokens == 0, "min_tokens", "cannot be combined with structured_outputs (the grammar "
                  "decides where the output may end)")
        if self.logit_bias:
            check(
                all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                "logit_bias",
                "values must be in [-100, 100]",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)
