"""Turns the last-position logits of a batch into tokens, honouring each request's sampling parameters.

Batched where it pays (temperature, top-k/top-p/min-p, penalties are tensor ops over the rows that need
them). Random draws use the exponential-race trick, ``argmax(p / q)`` with ``q ~ Exp(1)``, which samples
from ``p`` exactly; a request with a ``seed`` draws its ``q`` from its own generator, so its tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from pagedserve import kernels
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.structured_outputs import apply_bitmasks

# The model runner's pinned staging (runtime/staging.py) while it runs a step: the sampler's small per-step
# copies (temperatures, top-k/top-p, min-p, logit bias) then come from pinned memory too, as the step's inputs do.
_staging: contextvars.ContextVar = contextvars.ContextVar("pagedserve_staging", default=None)


@contextlib.contextmanager
def staging_scope(staging):
    """Inside the block, :func:`to_device` copies through ``staging`` (a ``HostStaging``) for its device."""
    token = _staging.set(staging)
    try:
        yield
    finally:
        _staging.reset(token)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a device synchronisation (``torch.tensor(..., device=)``
    synchronises). Inside a :func:`staging_scope` for ``device`` the copy comes from pinned memory; otherwise
    from pageable memory, which CUDA may make wait for the stream."""
    staging = _staging.get()
    if staging is not None and staging.enabled and staging.device == device:
        return staging.to_device(values, dtype)
    t = torch.tensor(values, dtype=dtype)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t


def suppressed_token_ids(params: SamplingParams, num_outputs: int, eos_token_ids: tuple[int, ...]) -> list[int]:
    """Token ids masked while fewer than ``min_tokens`` outputs exist: stop ids, and EOS unless ignored."""
    if num_outputs >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))


def warped_probs(logits: torch.Tensor, rows: list, temperatures: list[float]) -> torch.Tensor:
    """Temperature, then top-k/top-p, softmax, then min-p: the distribution each row samples from
    (unnormalised after min-p; callers that need a distribution renormalise)."""
    device = logits.device
    temps = to_device(temperatures, logits.dtype, device)
    scaled = logits / temps.unsqueeze(1)
    top_ks = [r.params.top_k for r in rows]
    top_ps = [r.params.top_p for r in rows]
    min_ps = [r.params.min_p for r in rows]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
        scaled = Sampler._top_k_top_p(scaled, top_ks, top_ps)
    probs = torch.softmax(scaled, dim=-1)
    if any(m > 0.0 for m in min_ps):
        min_p = to_device(min_ps, probs.dtype, device).unsqueeze(1)
        probs = probs.masked_fill(probs < probs.max(dim=-1, keepdim=True).values * min_p, 0.0)
    return probs


class SamplingRow:
    """What the sampler needs of one request for one step."""

    __slots__ = ("params", "generator", "prompt_token_ids", "output_token_ids", "suppressed_token_ids",
                 "process", "allowed")

    def __init__(
        self,
        params: SamplingParams,
        generator: torch.Generator | None,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        suppressed_token_ids: list[int],  # EOS/stop ids while min_tokens is not reached
    ) -> None:
        self.params = params
        self.generator = generator
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids = output_token_ids
        self.suppressed_token_ids = suppressed_token_ids
        # Structured outputs: this step's allowed tokens as an int32 bitmask on the CPU (structured_outputs.py).
        self.allowed: torch.Tensor | None = None
        # Whether the logits of this row need any processing before sampling (most rows need none).
        self.process = bool(suppressed_token_ids) or params.needs_logit_processing


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: (chosen logprob, chosen rank, [(token id, logprob)...] top-N) or None
    logprobs: list[tuple[float, int, list[tuple[int, float]]] | None]


def compute_logprobs(
    logprobs_all: torch.Tensor, chosen: torch.Tensor, num: int
) -> tuple[float, int, list[tuple[int, float]]]:
    """Chosen token's logprob and 1-based rank, plus the top-``num`` (token, logprob) pairs of one row."""
    chosen_lp = logprobs_all[chosen]
    rank = int((logprobs_all > chosen_lp).sum().item()) + 1
    top: list[tuple[int, float]] = []
    if num > 0:
        vals, ids = torch.topk(logprobs_all, num)
        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return float(chosen_lp.item()), rank, top


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample_ids(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The sampled token ids, left on the device (no host synchronisation)."""
        greedy = [r.params.temperature == 0.0 for r in rows]
        if all(greedy) and not any(r.process for r in rows):
            return kernels.argmax(logits)  # in the logits' own dtype: the same ids as of their fp32 copy
        logits = self._apply_logit_processors(logits.float(), rows)
        if all(greedy):
            return logits.argmax(dim=-1)
        return self._sample(logits, rows, greedy)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        raw_logits = logits.float()
        num_rows = len(rows)
        need_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        sampled = self.sample_ids(raw_logits, rows)
        token_ids = sampled.tolist()
        logprobs: list = [None] * num_rows
        if need_logprobs:
            # OpenAI/vLLM semantics: logprobs of the model's raw distribution, before any processing.
            lp = torch.log_softmax(raw_logits[need_logprobs], dim=-1)
            for j, i in enumerate(need_logprobs):
                logprobs[i] = compute_logprobs(lp[j], sampled[i], rows[i].params.logprobs or 0)
        return SamplerOutput(token_ids, logprobs)

    # ----------------------------------------------------------------------------- processors
    def _apply_logit_processors(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        cloned = False
        for i in [i for i, row in enumerate(rows) if row.process]:
            row = rows[i]
            p = row.params
            if not cloned:
                logits = logits.clone()
                cloned = True
            if p.logit_bias:
                ids = [t for t in p.logit_bias if 0 <= t < self.vocab_size]
                if ids:
                    bias = to_device([p.logit_bias[t] for t in ids], logits.dtype, logits.device)
                    logits[i, to_device(ids, torch.long, logits.device)] += bias
            if p.needs_penalties:
                logits[i] = self._penalize(logits[i], row)
            if row.suppressed_token_ids:
                logits[i, row.suppressed_token_ids] = float("-inf")
        grammar_rows = [i for i, row in enumerate(rows) if row.allowed is not None]
        if grammar_rows:  # last: a grammar's mask is never undone by a bias
            if not cloned:
                logits = logits.clone()
            apply_bitmasks(logits, grammar_rows, [rows[i].allowed for i in grammar_rows])
        return logits

    def _penalize(self, row_logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
        p = row.params
        device = row_logits.device
        out_ids = torch.tensor(row.output_token_ids, dtype=torch.long, device=device)
        if p.repetition_penalty != 1.0:
            # HF/vLLM: tokens seen in the prompt or the output; positive logits divided, negative multiplied.
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            if row.prompt_token_ids:
                seen[torch.tensor(row.prompt_token_ids, dtype=torch.long, device=device)] = True
            if out_ids.numel():
                seen[out_ids] = True
            penalized = torch.where(
                row_logits > 0, row_logits / p.repetition_penalty, row_logits * p.repetition_penalty
            )
            row_logits = torch.where(seen, penalized, row_logits)
        if (p.frequency_penalty or p.presence_penalty) and out_ids.numel():
            counts = torch.bincount(out_ids, minlength=self.vocab_size).to(row_logits.dtype)
            row_logits = row_logits - p.frequency_penalty * counts
            row_logits = row_logits - p.presence_penalty * (counts > 0).to(row_logits.dtype)
        return row_logits

    # ----------------------------------------------------------------------------- sampling
    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        device = logits.device
        probs = warped_probs(logits, rows, [1.0 if g else r.params.temperature for r, g in zip(rows, greedy, strict=True)])
        q = torch.ones_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None and not greedy[i]]
        if unseeded:
            q[to_device(unseeded, torch.long, device)] = torch.empty(
                len(unseeded), probs.shape[1], dtype=probs.dtype, device=device
            ).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None and not greedy[i]:
                q[i].exponential_(generator=r.generator)
        sampled = (probs / q).argmax(dim=-1)
        if any(greedy):
            mask = to_device(greedy, torch.bool, device)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        device = logits.device
        k = to_device([kk if kk > 0 else vocab for kk in top_ks], torch.long, device).clamp(max=vocab)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        mask = ranks >= k.unsqueeze(1)
        p = to_device(top_ps, logits.dtype, device).unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing the line is kept).
        cum_before = probs.cumsum(dim=-1) - probs
        mask |= cum_before >= p
        mask[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
