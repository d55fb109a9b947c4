"""OpenAI response shapes: logprobs (one shape per endpoint), usage, SSE framing, accumulated choices."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from pagedserve.runtime.detokenizer import TokenDecoder
from pagedserve.runtime.outputs import Logprob
from pagedserve.runtime.request_stream import ChoiceDelta

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def clamp_logprob(x: float) -> float:
    """JSON has no -inf; OpenAI clients expect a number (vLLM uses the same floor)."""
    return -9999.0 if math.isnan(x) or x < -9999.0 else float(x)


class TokenTexts:
    """The text and raw bytes of single tokens, for logprobs (partial UTF-8 shows as U+FFFD in ``text``)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        tables = TokenDecoder(tokenizer).tables
        self.table = tables[False] if tables else None

    def raw(self, token_id: int) -> bytes:
        if self.table is not None and 0 <= token_id < len(self.table):
            return self.table[token_id]
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.raw(token_id).decode("utf-8", errors="replace")


def _by_rank(entries: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, kv[0]))


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], texts: TokenTexts, text_offset: int
) -> tuple[dict, int]:
    """The legacy completions shape: parallel lists, ``top_logprobs`` as {token text: logprob}.
    Returns it and the text offset after the last token (for the next streamed chunk)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, d in zip(token_ids, entries, strict=True):
        s = texts.text(tid)
        tokens.append(s)
        token_lps.append(clamp_logprob(d[tid].logprob))
        tops.append({texts.text(t): clamp_logprob(lp.logprob) for t, lp in _by_rank(d)})
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, text_offset


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int, texts: TokenTexts) -> dict:
    """The chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...top_n]}]}``."""
    content = []
    for tid, d in zip(token_ids, entries, strict=True):
        top = [(t, lp) for t, lp in _by_rank(d) if lp.rank is not None and lp.rank <= top_n][:top_n]
        content.append({
            "token": texts.text(tid),
            "logprob": clamp_logprob(d[tid].logprob),
            "bytes": list(texts.raw(tid)),
            "top_logprobs": [
                {"token": texts.text(t), "logprob": clamp_logprob(lp.logprob), "bytes": list(texts.raw(t))}
                for t, lp in top
            ],
        })
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class ChoiceAccumulator:
    """One choice of a non-streamed response, grown from its deltas."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)
