"""Per-request output streams: what the engine produced for one request since the last read.

``RequestStream`` is an async iterator of ``RequestChunk``; a reader that falls behind gets the waiting chunks
merged into one. Closing a stream that has not finished asks its owner (the ``AsyncEngine``) to abort it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from pagedserve.runtime.outputs import Logprob


class StreamOwner(Protocol):
    def abort(self, request_id: str) -> None: ...

    def _forget(self, stream: RequestStream) -> None: ...


@dataclass
class ChoiceDelta:
    """What one choice (one of ``n``) produced since its previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per token in ``token_ids``
    finish_reason: str | None = None  # set on the choice's last delta
    stop_reason: int | str | None = None


@dataclass
class RequestChunk:
    request_id: str
    choices: list[ChoiceDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0


class RequestStream:
    """Async iterator over one request's chunks. ``close()`` aborts the request if it is unfinished.

    A reader that falls behind gets the chunks waiting for it merged into one (fewer events to encode and
    write when the server is busy; every token, text piece and logprob is still there, in order).
    """

    def __init__(self, engine: StreamOwner, request_id: str, num_prompt_tokens: int) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.finished = False
        self._engine = engine
        self._items: deque = deque()
        self._ready = asyncio.Event()

    def _put(self, item: RequestChunk | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestChunk:
        if self.finished:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            self._engine._forget(self)
            raise item
        while self._items and not item.finished and not isinstance(self._items[0], BaseException):
            item = merge_chunks(item, self._items.popleft())
        if item.finished:
            self.finished = True
            self._engine._forget(self)
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)
        self._engine._forget(self)


def merge_chunks(a: RequestChunk, b: RequestChunk) -> RequestChunk:
    """``a`` followed by ``b`` as one chunk."""
    choices = {c.index: c for c in a.choices}
    for c in b.choices:
        prev = choices.get(c.index)
        if prev is None:
            choices[c.index] = c
            continue
        logprobs = None if prev.logprobs is None and c.logprobs is None else (prev.logprobs or []) + (c.logprobs or [])
        choices[c.index] = ChoiceDelta(c.index, prev.text + c.text, prev.token_ids + c.token_ids, logprobs,
                                       c.finish_reason, c.stop_reason)
    return RequestChunk(b.request_id, [choices[i] for i in sorted(choices)], b.finished, b.num_prompt_tokens,
                        b.num_cached_tokens)
