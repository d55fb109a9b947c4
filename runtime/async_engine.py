"""AsyncEngine: the asyncio front of the synchronous ``EngineCore``.

The engine loop runs in one dedicated thread that owns the engine (scheduler, KV manager, runner): it takes
commands (add, abort, finish) from a thread-safe queue and calls ``EngineCore.step()``. Each step's token
updates go to the event loop, which detokenizes them with the ``OutputProcessor`` (stop strings, logprobs)
and feeds the per-request streams, so that work overlaps the engine's next step. The event loop never runs
model code.

Every request gets a ``RequestStream``: an async iterator of ``RequestChunk`` (new text, token ids and
logprobs per choice since the last chunk). Closing a stream before it finished aborts the request, which
frees its KV blocks at the engine's next iteration. If the engine loop dies, every open stream raises
``EngineDeadError`` and ``liveness()`` turns false; if it stops making progress, ``liveness()`` turns false too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pagedserve.runtime.engine import EngineCore
from pagedserve.runtime.llm import LLM
from pagedserve.runtime.output_processor import OutputProcessor, child_request_id
from pagedserve.runtime.request import Request
from pagedserve.runtime.request_stream import ChoiceDelta, RequestChunk, RequestStream
from pagedserve.runtime.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop has died (or was shut down); nothing more will be served."""


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting_requests``; the client should retry later."""


class DrainingError(RuntimeError):
    """The server is shutting down and accepts no new requests."""


@dataclass
class EngineStats:
    """A consistent snapshot published by the engine thread after every loop iteration."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_requests: int = 0  # requests (parents) the engine thread is tracking
    num_steps: int = 0
    spec_decode: dict | None = None  # SpecDecodeStats.as_dict() while speculative decoding is on


class EngineListener(Protocol):
    """Receives per-request events from the engine thread (``metrics.ServerMetrics`` implements it)."""

    def on_step(self, duration_s: float) -> None: ...

    def on_first_token(self, ttft_s: float, queue_time_s: float | None, num_prompt_tokens: int) -> None: ...

    def on_tokens(self, num_tokens: int, inter_token_s: float | None) -> None: ...

    def on_finish(
        self, finish_reasons: list[str], e2e_s: float | None, num_prompt_tokens: int, num_generation_tokens: int
    ) -> None: ...


class _NullListener:
    def on_step(self, duration_s): pass
    def on_first_token(self, ttft_s, queue_time_s, num_prompt_tokens): pass
    def on_tokens(self, num_tokens, inter_token_s): pass
    def on_finish(self, finish_reasons, e2e_s, num_prompt_tokens, num_generation_tokens): pass


@dataclass
class _Track:
    """Engine-thread bookkeeping of one request (a parent of ``n`` engine requests)."""

    stream: RequestStream
    reqs: list[Request]
    arrival: float
    parent: Any = None  # the OutputProcessor's parent record (holds each child's detokenizer)
    num_emitted: list[int] = field(default_factory=list)  # tokens already delivered, per choice
    done: list[bool] = field(default_factory=list)
    last_token_time: list[float | None] = field(default_factory=list)
    first_token_time: float | None = None


class AsyncEngine:
    """Serve ``EngineCore`` to asyncio code. Call ``start()`` from inside the running event loop.

    Threads: the engine thread owns ``EngineCore`` (scheduler, KV manager, runner) and does nothing but
    admit, abort, finish and step. Everything per token after the step (detokenization, stop strings,
    logprobs, chunks, metrics) runs on the event loop, where it overlaps the next step's GPU work instead of
    delaying it. A stop string therefore reaches the engine one step late; the extra token is dropped.
    """

    def __init__(
        self,
        core: EngineCore,
        *,
        max_waiting_requests: int = 0,
        listener: EngineListener | None = None,
        idle_heartbeat_s: float = 0.5,
        hang_timeout_s: float = 60.0,
        step_delay_s: float = 0.0,
    ) -> None:
        self.core = core
        self.tokenizer = core.source.tokenizer
        self.max_model_len = core.max_model_len
        self.block_size = core.kv.block_size
        self.num_blocks = core.kv.num_blocks
        self.max_waiting_requests = max_waiting_requests
        self.listener: EngineListener = listener or _NullListener()
        self.idle_heartbeat_s = idle_heartbeat_s
        self.hang_timeout_s = hang_timeout_s
        # Test hook: sleep after each step so tests can observe a busy engine on a fast machine.
        self.step_delay_s = step_delay_s
        # Event-loop side: the output processor and per-request bookkeeping.
        self._processor = OutputProcessor(self.tokenizer)
        self._tracks: dict[str, _Track] = {}
        self._streams: dict[str, RequestStream] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Engine-thread side.
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()
        self._num_steps = 0
        self._stats = self._snapshot()
        self.dead_error: BaseException | None = None
        self.draining = False

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run_loop, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread and the engine's worker processes; open streams raise ``EngineDeadError``."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        release = getattr(self.core, "shutdown", None)
        if release is not None:
            release()

    def start_drain(self) -> None:
        """Refuse new requests from now on (``DrainingError``); running ones continue."""
        self.draining = True

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def liveness(self) -> tuple[bool, str]:
        """(alive, reason): the engine thread exists, has not died, and keeps making progress."""
        if self.dead_error is not None:
            return False, f"engine loop died: {self.dead_error!r}"
        if self._thread is None or not self._thread.is_alive():
            return False, "engine loop is not running"
        age = time.monotonic() - self._heartbeat
        if age > self.hang_timeout_s:
            return False, f"engine loop has made no progress for {age:.1f}s (limit {self.hang_timeout_s:g}s)"
        return True, "ok"

    def heartbeat_age(self) -> float:
        return time.monotonic() - self._heartbeat

    @property
    def stats(self) -> EngineStats:
        """The engine's latest snapshot, with the number of requests in flight here."""
        return dataclasses.replace(self._stats, num_requests=len(self._tracks))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def max_request_tokens(self) -> int:
        """Longest prompt + output one request may have: the context length, or the KV pool if smaller."""
        return min(self.max_model_len, self.num_blocks * self.block_size)

    # ----------------------------------------------------------------------------- front (event loop)
    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Validate and enqueue one request; raises ValueError (bad request), QueueFullError,
        DrainingError or EngineDeadError. Returns its stream once the engine thread has admitted it."""
        if self.draining:
            raise DrainingError("the server is shutting down and accepts no new requests")
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine loop has died: {self.dead_error!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        reqs = [
            self.core.make_request(
                child_request_id(request_id, i, params.n), prompt_token_ids, LLM._child_params(params, i),
                priority, arrival,
            )
            for i in range(params.n)
        ]
        need = len(prompt_token_ids) + reqs[0].max_tokens
        if need > self.num_blocks * self.block_size:
            raise ValueError(
                f"max_tokens: the request needs up to {need} tokens of KV cache ({len(prompt_token_ids)} prompt + "
                f"{reqs[0].max_tokens} output) but the whole cache holds {self.num_blocks * self.block_size}"
            )
        stream = RequestStream(self, request_id, len(prompt_token_ids))
        self._processor.add_request(request_id, prompt, list(prompt_token_ids), params)
        track = _Track(stream, reqs, arrival, parent=self._processor.parents[request_id],
                       num_emitted=[0] * params.n, done=[False] * params.n, last_token_time=[None] * params.n)
        self._tracks[request_id] = track
        self._streams[request_id] = stream
        self._idle.clear()
        admitted: asyncio.Future = self._loop.create_future()
        try:
            self._submit(("add", reqs, admitted))
            await admitted
        except BaseException:
            stream.finished = True
            self._drop(request_id, abort_in_engine=not admitted.done() or admitted.cancelled())
            self._forget(stream)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (frees its KV blocks at the engine's next iteration)."""
        self._drop(request_id, abort_in_engine=True, reason="abort")

    def abort_all(self) -> None:
        """Finish every in-flight request now with finish_reason ``abort`` (end of a drain timeout)."""
        for rid in list(self._tracks):
            track = self._tracks[rid]
            unfinished = [i for i, d in enumerate(track.done) if not d]
            self._drop(rid, abort_in_engine=True, reason="abort")
            with_lp = track.parent.params.logprobs is not None
            choices = [ChoiceDelta(i, "", [], [] if with_lp else None, "abort") for i in unfinished]
            track.stream._put(RequestChunk(rid, choices, True, len(track.reqs[0].prompt_token_ids)))

    def _drop(self, request_id: str, abort_in_engine: bool, reason: str | None = None) -> None:
        child_ids = self._processor.abort(request_id)
        track = self._tracks.pop(request_id, None)
        if abort_in_engine and child_ids:
            self._submit(("abort", child_ids), quiet=True)
        if track is not None and reason is not None:
            reasons = [c.finish_reason if track.done[c.index] else reason for c in track.parent.children.values()]
            gen_tokens = sum(track.num_emitted)
            self.listener.on_finish(reasons, None, len(track.reqs[0].prompt_token_ids), gen_tokens)
            logger.info("request aborted after %d generated tokens", gen_tokens, extra={"request_id": request_id})

    def _submit(self, cmd: tuple, quiet: bool = False) -> None:
        with self._submit_lock:
            if self.dead_error is not None or self._stop:
                if quiet:
                    return
                raise EngineDeadError(f"the engine loop is not running: {self.dead_error!r}")
            self._commands.put(cmd)
        self._wake.set()

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        if not self._streams:
            self._idle.set()

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    @staticmethod
    def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    # ----------------------------------------------------------------------------- outputs (event loop)
    def _on_updates(self, updates: list) -> None:
        """One step's updates: detokenize, cut at stop strings, hand each stream its chunk."""
        try:
            outputs, to_stop = self._processor.process(updates)
            if to_stop:
                self._submit(("finish", to_stop), quiet=True)
            now = time.monotonic()
            for out in outputs:
                track = self._tracks.get(out.request_id)
                if track is None:
                    continue
                chunk = self._make_chunk(track, out, now)
                if chunk is not None:
                    track.stream._put(chunk)
                if out.finished:
                    del self._tracks[out.request_id]
        except Exception as e:  # noqa: BLE001 - a bug here must fail requests, not hang them
            logger.exception("processing the engine's outputs failed")
            self._engine_died(e)

    def _make_chunk(self, track: _Track, out, now: float) -> RequestChunk | None:
        choices = []
        listener = self.listener
        for child in track.parent.children.values():
            i = child.index
            if track.done[i]:
                continue
            new_ids = child.token_ids[track.num_emitted[i]:]
            finished = child.finish_reason is not None
            if not new_ids and not finished:
                continue
            if new_ids:
                if track.first_token_time is None:
                    track.first_token_time = now
                    first_sched = track.reqs[0].first_scheduled_time
                    listener.on_first_token(
                        now - track.arrival, None if first_sched is None else first_sched - track.arrival,
                        len(track.reqs[0].prompt_token_ids),
                    )
                last = track.last_token_time[i]
                listener.on_tokens(len(new_ids), None if last is None else (now - last) / len(new_ids))
                track.last_token_time[i] = now
            lps = None if child.logprobs is None else child.logprobs[track.num_emitted[i]:]
            choices.append(ChoiceDelta(
                i, child.detok.delta(finished), new_ids, lps,
                child.finish_reason if finished else None, child.stop_reason if finished else None,
            ))
            track.num_emitted[i] = len(child.token_ids)
            track.done[i] = finished
        if out.finished:
            reasons = [c.finish_reason for c in out.outputs]
            listener.on_finish(reasons, now - track.arrival, len(out.prompt_token_ids), sum(track.num_emitted))
        if not choices and not out.finished:
            return None
        return RequestChunk(out.request_id, choices, out.finished, len(out.prompt_token_ids), out.num_cached_tokens)

    def _engine_died(self, err: BaseException, shutdown: bool = False) -> None:
        """On the event loop: every open request and pending admission fails with ``EngineDeadError``."""
        if self.dead_error is None and not shutdown:
            self.dead_error = err
        dead = err if isinstance(err, EngineDeadError) else EngineDeadError(f"the engine loop has died: {err!r}")
        if dead is not err:
            dead.__cause__ = err
        with self._submit_lock:
            self._stop = True
            self._wake.set()
            pending = []
            while True:
                try:
                    pending.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        for cmd in pending:
            if cmd[0] == "add":
                self._resolve(cmd[-1], dead)
        for rid, track in list(self._tracks.items()):
            self._processor.abort(rid)
            track.stream._put(dead)
        self._tracks.clear()

    # ----------------------------------------------------------------------------- engine thread
    def _run_loop(self) -> None:
        try:
            while not self._stop:
                self._heartbeat = time.monotonic()
                self._wake.clear()
                self._run_commands()
                if self.core.has_unfinished():
                    self._run_step()
                    if not self.core.has_unfinished():
                        self.core.step()  # let the runner drop the state of the requests that just ended
                else:
                    self._stats = self._snapshot()
                    check_health = getattr(self.core, "check_health", None)
                    if check_health is not None:
                        check_health()  # a dead tensor-parallel worker shows here even with no step to run
                    self._wake.wait(self.idle_heartbeat_s)
            err: BaseException = EngineDeadError("the engine was shut down")
            shutdown = True
        except BaseException as e:  # noqa: BLE001 - any failure kills the loop; requests must hear of it
            logger.exception("engine loop died")
            self.dead_error = err = e
            shutdown = False
        self._post(self._engine_died, err, shutdown)

    def _run_commands(self) -> None:
        core = self.core
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._admit(cmd[1], cmd[2])
            elif cmd[0] == "abort":
                core.abort_requests(cmd[1])
            elif cmd[0] == "finish":
                core.finish_requests(cmd[1])

    def _admit(self, reqs: list[Request], admitted: asyncio.Future) -> None:
        sched = self.core.scheduler
        limit = self.max_waiting_requests
        if limit and sched.num_waiting > 0 and sched.num_waiting + len(reqs) > limit:
            self._post(self._resolve, admitted, QueueFullError(
                f"the waiting queue is full ({sched.num_waiting} waiting, limit {limit}); retry later"
            ))
            return
        try:
            for req in reqs:
                self.core.add_request(req)
        except ValueError as e:
            self.core.abort_requests([r.request_id for r in reqs])
            self._post(self._resolve, admitted, e)
            return
        self._post(self._resolve, admitted, None)

    def _run_step(self) -> None:
        t0 = time.monotonic()
        updates = self.core.step()
        self._num_steps += 1
        self.listener.on_step(time.monotonic() - t0)
        self._stats = self._snapshot()
        if updates:
            self._post(self._on_updates, updates)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def _snapshot(self) -> EngineStats:
        sched, kv = self.core.scheduler, self.core.kv
        return EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_blocks=kv.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=sched.num_preemptions,
            num_steps=self._num_steps,
            spec_decode=sched.spec_stats.as_dict() if getattr(sched, "spec_stats", None) else None,
        )
