"""AsyncEngine: the asyncio front of the synchronous ``EngineCore``.

An ``EngineLoop`` owns the engine (scheduler, KV manager, runner): it takes commands (add, abort, finish) from a
thread-safe queue and calls ``EngineCore.step()``. It runs either on a dedicated thread of the server process
or as the main loop of an engine process of its own (``runtime/engine_process.py``; commands and results
cross a socket), so that the HTTP front end never takes the GIL from the engine. Each step's token updates go
to the event loop, which detokenizes them with the ``OutputProcessor`` (stop strings, logprobs) and feeds the
per-request streams, so that work overlaps the engine's next step. The event loop never runs model code.

Every request gets a ``RequestStream``: an async iterator of ``RequestChunk`` (new text, token ids and
logprobs per choice since the last chunk). Closing a stream before it finished aborts the request, which
frees its KV blocks at the engine's next iteration. If the engine loop (or its process) dies, every open
stream raises ``EngineDeadError`` and ``liveness()`` turns false; if it stops making progress, ``liveness()``
turns false too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pagedserve.runtime.engine import EngineCore, EngineInfo
from pagedserve.runtime.llm import LLM
from pagedserve.runtime.output_processor import OutputProcessor, child_request_id
from pagedserve.runtime.request import Request
from pagedserve.runtime.request_stream import ChoiceDelta, RequestChunk, RequestStream
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.scheduler import RequestUpdate

logger = logging.getLogger("pagedserve.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop has died (or was shut down); nothing more will be served."""


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting_requests``; the client should retry later."""


class DrainingError(RuntimeError):
    """The server is shutting down and accepts no new requests."""


@dataclass
class EngineStats:
    """A consistent snapshot published by the engine loop after every iteration."""

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
    """Front-end bookkeeping of one request (a parent of ``n`` engine requests)."""

    stream: RequestStream
    reqs: list[Request]
    arrival: float
    parent: Any = None  # the OutputProcessor's parent record (holds each child's detokenizer)
    num_emitted: list[int] = field(default_factory=list)  # tokens already delivered, per choice
    done: list[bool] = field(default_factory=list)
    last_token_time: list[float | None] = field(default_factory=list)
    first_token_time: float | None = None


class EngineSink(Protocol):
    """Where an ``EngineLoop`` reports; called on the loop's own thread."""

    def admitted(self, token: int, error: BaseException | None) -> None: ...

    def stepped(self, updates: list, duration_s: float, first_scheduled: list[tuple[str, float]]) -> None: ...

    def idle(self) -> None: ...

    def exited(self, error: BaseException, shutdown: bool) -> None: ...


class EngineLoop:
    """The engine side: owns ``EngineCore`` and does nothing but admit, abort, finish and step.

    Commands arrive through ``put`` from any thread: ``("add", requests, token)``, ``("abort", ids)``,
    ``("finish", ids)``. ``run()`` loops until ``request_stop()`` or a failure and reports through the sink.
    With ``report_first_scheduled`` it also reports when each request was first scheduled (the front end's
    copies of the requests do not see the scheduler's changes when the loop runs in another process).
    """

    def __init__(
        self,
        core: EngineCore,
        sink: EngineSink,
        *,
        max_waiting_requests: int = 0,
        idle_heartbeat_s: float = 0.5,
        step_delay_s: float = 0.0,
        report_first_scheduled: bool = False,
    ) -> None:
        self.core = core
        self.sink = sink
        self.max_waiting_requests = max_waiting_requests
        self.idle_heartbeat_s = idle_heartbeat_s
        # Test hook: sleep after each step so tests can observe a busy engine on a fast machine.
        self.step_delay_s = step_delay_s
        self.report_first_scheduled = report_first_scheduled
        self.heartbeat = time.monotonic()
        self.num_steps = 0
        self.stats = self.snapshot()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._unscheduled: dict[str, Request] = {}

    def put(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def request_stop(self) -> None:
        self._stop = True
        self._wake.set()

    def run(self) -> None:
        """Loop until stopped or failed; the sink hears why (``exited``) either way."""
        try:
            while not self._stop:
                self.heartbeat = time.monotonic()
                self._wake.clear()
                self._run_commands()
                if self.core.has_unfinished():
                    self._run_step()
                    if not self.core.has_unfinished():
                        self.core.step()  # let the runner drop the state of the requests that just ended
                else:
                    self.stats = self.snapshot()
                    self.sink.idle()
                    check_health = getattr(self.core, "check_health", None)
                    if check_health is not None:
                        check_health()  # a dead tensor-parallel worker shows here even with no step to run
                    self._wake.wait(self.idle_heartbeat_s)
            err: BaseException = EngineDeadError("the engine was shut down")
            shutdown = True
        except BaseException as e:  # noqa: BLE001 - any failure kills the loop; requests must hear of it
            logger.exception("engine loop died")
            err, shutdown = e, False
        self.sink.exited(err, shutdown)

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

    def _admit(self, reqs: list[Request], token: int) -> None:
        sched = self.core.scheduler
        limit = self.max_waiting_requests
        if limit and sched.num_waiting > 0 and sched.num_waiting + len(reqs) > limit:
            self.sink.admitted(token, QueueFullError(
                f"the waiting queue is full ({sched.num_waiting} waiting, limit {limit}); retry later"
            ))
            return
        try:
            for req in reqs:
                self.core.add_request(req)
        except Exception as e:  # noqa: BLE001 - a request the engine cannot take fails alone (ValueError: a 400)
            if not isinstance(e, ValueError):
                logger.exception("admitting a request failed")
            self.core.abort_requests([r.request_id for r in reqs])
            self.sink.admitted(token, e)
            return
        if self.report_first_scheduled:
            for req in reqs:
                self._unscheduled[req.request_id] = req
        self.sink.admitted(token, None)

    def _run_step(self) -> None:
        t0 = time.monotonic()
        updates = self.core.step()
        self.num_steps += 1
        duration = time.monotonic() - t0
        self.stats = self.snapshot()
        first_scheduled = []
        if self._unscheduled:
            for rid, req in list(self._unscheduled.items()):
                if req.first_scheduled_time is not None:
                    first_scheduled.append((rid, req.first_scheduled_time))
                    del self._unscheduled[rid]
                elif req.is_finished:
                    del self._unscheduled[rid]
        self.sink.stepped(updates, duration, first_scheduled)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def snapshot(self) -> EngineStats:
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
            num_steps=self.num_steps,
            spec_decode=sched.spec_stats.as_dict() if getattr(sched, "spec_stats", None) else None,
        )


class AsyncEngine:
    """Serve an engine to asyncio code. Call ``start()`` from inside the running event loop.

    Two ways to run the engine, same behaviour seen from here:
    - ``AsyncEngine(core)``: an ``EngineLoop`` on a thread of this process, sharing its GIL;
    - ``AsyncEngine(process=EngineProcess(...), tokenizer=...)``: the loop in a process of its own.

    Everything per token after the step (detokenization, stop strings, logprobs, chunks, metrics) runs on the
    event loop, where it overlaps the next step's work instead of delaying it. A stop string therefore
    reaches the engine one step late; the extra token is dropped.
    """

    def __init__(
        self,
        core: EngineCore | None = None,
        *,
        process: Any = None,  # an engine_process.EngineProcess that has answered wait_ready()
        tokenizer: Any = None,  # with ``process``: the model's tokenizer, loaded in this process
        max_waiting_requests: int = 0,
        listener: EngineListener | None = None,
        idle_heartbeat_s: float = 0.5,
        hang_timeout_s: float = 60.0,
        step_delay_s: float = 0.0,
    ) -> None:
        if (core is None) == (process is None):
            raise ValueError("AsyncEngine takes either an EngineCore or an engine process")
        self.core = core
        self.process = process
        if core is not None:
            self.info: EngineInfo = core.info
            self.tokenizer = core.source.tokenizer
            self._engine_loop: EngineLoop | None = EngineLoop(
                core, _ThreadSink(self), max_waiting_requests=max_waiting_requests,
                idle_heartbeat_s=idle_heartbeat_s, step_delay_s=step_delay_s,
            )
        else:
            self.info = process.info
            self.tokenizer = tokenizer
            self._engine_loop = None
        self.max_model_len = self.info.max_model_len
        self.block_size = self.info.block_size
        self.num_blocks = self.info.num_blocks
        self.vocab_size = self.info.vocab_size
        self.max_waiting_requests = max_waiting_requests
        self.listener: EngineListener = listener or _NullListener()
        self.idle_heartbeat_s = idle_heartbeat_s
        self.hang_timeout_s = hang_timeout_s
        # Event-loop side: the output processor and per-request bookkeeping.
        self._processor = OutputProcessor(self.tokenizer)
        self._tracks: dict[str, _Track] = {}
        self._streams: dict[str, RequestStream] = {}
        self._admits: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._unscheduled: dict[str, Request] = {}  # engine process: first requests not yet scheduled
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._submit_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()  # engine process: when its last message arrived
        self._stats = EngineStats(num_blocks=self.num_blocks, num_free_blocks=self.num_blocks)
        self.dead_error: BaseException | None = None
        self.draining = False

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._heartbeat = time.monotonic()
        if self._engine_loop is not None:
            self._thread = threading.Thread(target=self._engine_loop.run, name="engine-loop", daemon=True)
        else:
            self._thread = threading.Thread(target=self._read_process, name="engine-reader", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine loop and the engine's processes; open streams raise ``EngineDeadError``."""
        with self._submit_lock:
            self._closed = True
        if self._engine_loop is not None:
            self._engine_loop.request_stop()
            if self._thread is not None:
                self._thread.join(timeout)
            release = getattr(self.core, "shutdown", None)
            if release is not None:
                release()
        else:
            self.process.shutdown(timeout)
            if self._thread is not None:
                self._thread.join(timeout)
            self.process.close()

    @property
    def step_delay_s(self) -> float:
        """Test hook: the engine sleeps this long after each step (set at start for an engine process)."""
        return self._engine_loop.step_delay_s if self._engine_loop is not None else self.process.step_delay_s

    @step_delay_s.setter
    def step_delay_s(self, value: float) -> None:
        if self._engine_loop is None:
            raise AttributeError("step_delay_s of an engine process is fixed when it starts")
        self._engine_loop.step_delay_s = value

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
        """(alive, reason): the engine loop (and its process) exists, has not died, and keeps making progress."""
        if self.dead_error is not None:
            return False, f"engine loop died: {self.dead_error!r}"
        if self._thread is None or not self._thread.is_alive():
            return False, "engine loop is not running"
        if self.process is not None:
            gone = self.process.exit_reason()
            if gone is not None:
                return False, gone
        age = self.heartbeat_age()
        if age > self.hang_timeout_s:
            return False, f"engine loop has made no progress for {age:.1f}s (limit {self.hang_timeout_s:g}s)"
        return True, "ok"

    def heartbeat_age(self) -> float:
        beat = self._engine_loop.heartbeat if self._engine_loop is not None else self._heartbeat
        return time.monotonic() - beat

    @property
    def stats(self) -> EngineStats:
        """The engine's latest snapshot, with the number of requests in flight here."""
        snap = self._engine_loop.stats if self._engine_loop is not None else self._stats
        return dataclasses.replace(snap, num_requests=len(self._tracks))

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
        DrainingError or EngineDeadError. Returns its stream once the engine has admitted it."""
        if self.draining:
            raise DrainingError("the server is shutting down and accepts no new requests")
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine loop has died: {self.dead_error!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        reqs = [
            self.info.make_request(
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
        if self.process is not None:
            self._unscheduled[reqs[0].request_id] = reqs[0]
        self._idle.clear()
        admitted: asyncio.Future = self._loop.create_future()
        token = next(self._tokens)
        self._admits[token] = admitted
        try:
            self._submit(("add", reqs, token))
            await admitted
        except BaseException:
            self._admits.pop(token, None)
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
        if track is not None:
            self._unscheduled.pop(track.reqs[0].request_id, None)
        if abort_in_engine and child_ids:
            self._submit(("abort", child_ids), quiet=True)
        if track is not None and reason is not None:
            reasons = [c.finish_reason if track.done[c.index] else reason for c in track.parent.children.values()]
            gen_tokens = sum(track.num_emitted)
            self.listener.on_finish(reasons, None, len(track.reqs[0].prompt_token_ids), gen_tokens)
            logger.info("request aborted after %d generated tokens", gen_tokens, extra={"request_id": request_id})

    def _submit(self, cmd: tuple, quiet: bool = False) -> None:
        with self._submit_lock:
            if self.dead_error is None and not self._closed:
                try:
                    if self._engine_loop is not None:
                        self._engine_loop.put(cmd)
                    else:
                        self.process.send(cmd)
                    return
                except OSError:  # the engine process is gone; its reader reports why
                    pass
        if not quiet:
            raise EngineDeadError(f"the engine loop is not running: {self.dead_error!r}")

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

    def _on_admitted(self, token: int, exc: BaseException | None) -> None:
        fut = self._admits.pop(token, None)
        if fut is None or fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    # ----------------------------------------------------------------------------- the engine process
    def _read_process(self) -> None:
        """Reader thread: hand each message of the engine process to the event loop, in order."""
        proc = self.process
        while True:
            try:
                msg = proc.recv()
            except (EOFError, OSError):
                break
            except Exception as e:  # noqa: BLE001 - a message we cannot read: the engine is unusable
                logger.exception("reading a message from the engine process failed")
                self._post(self._engine_died, e, False)
                return
            self._heartbeat = time.monotonic()
            self._post(self._on_process_message, msg)
            if msg[0] == "exit":
                return
        if self._closed:
            return
        reason = proc.wait_exit_reason(5.0)
        self._post(self._engine_died, EngineDeadError(reason), False)

    def _on_process_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            _, packed, duration, first_scheduled, stats = msg
            self._stats = stats
            self.listener.on_step(duration)
            for rid, t in first_scheduled:
                req = self._unscheduled.pop(rid, None)
                if req is not None:
                    req.first_scheduled_time = t
            if packed:
                self._on_updates([RequestUpdate(*t) for t in packed])
        elif kind == "beat":
            self._stats = msg[1]
        elif kind == "admitted":
            self._on_admitted(msg[1], msg[2])
        elif kind == "exit":
            _, err, shutdown = msg
            self._engine_died(err, shutdown)

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
            self._closed = True
        if self._engine_loop is not None:
            self._engine_loop.request_stop()
        elif not shutdown:
            self.process.kill()  # a front-end failure or a hung engine: nothing may keep serving behind us
        admits, self._admits = self._admits, {}
        for fut in admits.values():
            if not fut.done():
                fut.set_exception(dead)
        for rid, track in list(self._tracks.items()):
            self._processor.abort(rid)
            track.stream._put(dead)
        self._tracks.clear()
        self._unscheduled.clear()


class _ThreadSink:
    """``EngineSink`` of an engine loop on a thread of the server process: hand everything to the event loop."""

    def __init__(self, front: AsyncEngine) -> None:
        self.front = front

    def admitted(self, token: int, error: BaseException | None) -> None:
        self.front._post(self.front._on_admitted, token, error)

    def stepped(self, updates: list, duration_s: float, first_scheduled: list) -> None:
        self.front.listener.on_step(duration_s)
        if updates:
            self.front._post(self.front._on_updates, updates)

    def idle(self) -> None:
        pass

    def exited(self, error: BaseException, shutdown: bool) -> None:
        if not shutdown and self.front.dead_error is None:
            self.front.dead_error = error  # liveness says why at once, before the event loop hears of it
        self.front._post(self.front._engine_died, error, shutdown)
