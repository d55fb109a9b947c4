"""Speculative decoding, engine side: the configuration, the n-gram (prompt-lookup) proposer, the counters.

A proposer guesses the next few tokens of a decoding request cheaply. The guesses ride along as more tokens
to compute in the next step (the scheduler's token budget covers them), the target model computes logits at
every guessed position in one forward, and ``rejection_sampler`` keeps the longest prefix the target agrees
with plus one token of its own. Guesses never enter ``Request.all_token_ids`` before they are verified, so
neither the prefix cache nor the output can ever see a rejected token.

Plain Python, no tensors.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

_METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    """vLLM's ``speculative_config`` keys: ``method``, ``num_speculative_tokens``, ``prompt_lookup_max``,
    ``prompt_lookup_min`` (ngram) and ``model`` (draft_model)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 1
    model: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> SpeculativeConfig:
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config: must be a JSON object, got {type(d).__name__}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        method = d.get("method", "ngram")
        if method == "[ngram]":  # vLLM's old spelling
            method = "ngram"
        return cls(
            method=method,
            num_speculative_tokens=d["num_speculative_tokens"],
            prompt_lookup_max=d.get("prompt_lookup_max", 5),
            prompt_lookup_min=d.get("prompt_lookup_min", 1),
            model=d.get("model"),
        )

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"speculative_config.method: must be one of {', '.join(_METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise ValueError(f"speculative_config.num_speculative_tokens: must be an integer in [1, 32], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(
                "speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, "
                f"got prompt_lookup_min={lo!r}, prompt_lookup_max={hi!r}"
            )
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model: the draft_model method needs the draft model's path")
        if self.method == "ngram" and self.model:
            raise ValueError("speculative_config.model: only the draft_model method takes a model")


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    ``prompt_lookup_max`` down to ``prompt_lookup_min``) and propose the tokens that followed it.

    The search runs on the tokens packed as 4-byte words with ``bytes.rfind`` (C speed); a hit that does not
    start on a word boundary is skipped.
    """

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: list[int], max_num_tokens: int | None = None) -> list[int]:
        k = self.k if max_num_tokens is None else min(self.k, max_num_tokens)
        n_tokens = len(token_ids)
        if k <= 0 or n_tokens <= self.min_n:
            return []
        buf = array("I", token_ids).tobytes()
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            pattern = buf[-4 * n:]
            # Prefer a match with k tokens after it; else the latest match of all (fewer tokens follow).
            start = _rfind_aligned(buf, pattern, 4 * (n_tokens - k))
            if start < 0:
                start = _rfind_aligned(buf, pattern, 4 * (n_tokens - 1))
            if start >= 0:
                first = start // 4 + n
                return token_ids[first:first + k]
        return []


def _rfind_aligned(buf: bytes, pattern: bytes, end: int) -> int:
    """Latest start of ``pattern`` in ``buf[:end]`` on a 4-byte boundary, or -1."""
    while end >= len(pattern):
        i = buf.rfind(pattern, 0, end)
        if i < 0 or i % 4 == 0:
            return i
        end = i + len(pattern) - 1
    return -1


@dataclass
class SpecDecodeStats:
    """Cumulative counters, named after vLLM's ``vllm:spec_decode_*`` metrics."""

    num_spec_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        for j in range(num_accepted):
            per_pos[j] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens produced per verification (accepted drafts + the target's own token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict:
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
            "spec_decode_acceptance_rate": self.acceptance_rate,
            "spec_decode_mean_acceptance_length": self.mean_acceptance_length,
        }
