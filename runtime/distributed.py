"""Tensor parallelism seen from the engine: rank 0 lives in the engine process, ranks 1..N-1 are workers.

``TensorParallelRunner`` stands in for ``ModelRunner`` inside ``EngineCore`` (same methods): it starts one
worker process per extra rank, joins them in a torch.distributed group (gloo on CPU, NCCL on CUDA, the
rendezvous on a port the OS picks), builds rank 0's shard, and for every step sends the pickled
``SchedulerOutput`` to each worker before running rank 0's part. With async scheduling the step returns once
rank 0 has launched it: the next step's inputs that are this step's samples are placeholders, which every rank
fills from the sampled ids rank 0 broadcasts on the device (``ModelRunner.execute``).

Failure is loud and quick. Rank 0's work runs on a thread of its own while the caller waits on it and polls
the workers: a worker that exits (or is killed) or a step that makes no progress for ``step_timeout_s``
raises ``TensorParallelError`` from ``execute`` — or, for an async step, from waiting on its output, which
polls the device event and the workers instead of blocking — (so ``EngineCore.step()`` raises and the server
reports the engine dead), and the workers are killed. ``shutdown()`` — also run at interpreter exit and when the runner
is garbage-collected — stops every worker; workers also exit by themselves when the engine process is gone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from pagedserve.runtime.config import CacheConfig, SchedulerConfig
from pagedserve.runtime.model_runner import DeferredOutput
from pagedserve.runtime.worker import (
    SHUTDOWN,
    STORE_HOST,
    WORKER_BOOT,
    RankSpec,
    agree_num_blocks,
    build_runner,
    init_rank,
    leave_process_group,
)

logger = logging.getLogger("pagedserve.distributed")

STEP_TIMEOUT_ENV = "PAGEDSERVE_TP_STEP_TIMEOUT_S"
SETUP_TIMEOUT_ENV = "PAGEDSERVE_TP_SETUP_TIMEOUT_S"
# NVLink multicast (NVLS / symmetric-memory multimem) can put a shared host's GPUs out of service; keep it off
# unless the operator of the machine says otherwise.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung or failed: the engine cannot go on."""


def check_tensor_parallel_size(hf_config, size: int, device_type: str) -> None:
    """Refuse, before anything starts, a TP size the model's shapes (or the machine) cannot be split into."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size: must be >= 1, got {size}")
    problems = _split_problems(hf_config, size)
    if problems:
        heads = hf_config.num_attention_heads
        valid = [n for n in range(1, heads + 1) if not _split_problems(hf_config, n)]
        raise ValueError(
            f"tensor_parallel_size={size} cannot split this model: {'; '.join(problems)}. "
            f"Sizes that work for it: {', '.join(map(str, valid))}"
        )
    if device_type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} GPUs (one per rank) but {torch.cuda.device_count()} "
            f"are visible"
        )


def _split_problems(cfg, size: int) -> list[str]:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    problems = []
    if heads % size:
        problems.append(f"{heads} attention heads are not divisible by {size}")
    if kv >= size and kv % size:
        problems.append(f"{kv} KV heads are not divisible by {size}")
    if kv < size and size % kv:
        problems.append(f"with fewer KV heads ({kv}) than ranks, the size must be a multiple of {kv}")
    if cfg.intermediate_size % size:
        problems.append(f"the MLP's {cfg.intermediate_size} intermediate features are not divisible by {size}")
    return problems


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name}: must be > 0, got {raw!r}")
    return value


class _Rank0Thread:
    """Runs rank 0's calls one at a time on a daemon thread, so the caller can wait with a deadline and
    watch the workers meanwhile (a collective blocked on a dead peer never returns on its own)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="tp-rank0", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)
            del job, fut, fn, args  # a finished job must not keep its runner alive until the next one

    def submit(self, fn, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _start_worker(spec: RankSpec, rank: int) -> tuple[subprocess.Popen, Connection]:
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_BOOT, str(theirs.fileno()), json.dumps(sys.path)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
        )
    conn = Connection(ours.detach())
    conn.send((spec, rank))
    return proc, conn


def _stop_workers(procs, conns, graceful_s: float) -> None:
    """Ask each worker to stop, wait up to ``graceful_s``, then kill what is left. Safe to call twice."""
    for conn in conns:
        try:
            conn.send_bytes(SHUTDOWN)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + graceful_s
    for p in procs:
        _wait(p, deadline - time.monotonic())
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        _wait(p, 5.0)
    for conn in conns:
        conn.close()


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(max(0.0, timeout))
    except subprocess.TimeoutExpired:
        pass


class TensorParallelRunner:
    """Rank 0 of a tensor-parallel group, with ``ModelRunner``'s interface (see the module docstring)."""

    def __init__(
        self,
        source,
        dtype: torch.dtype,
        device: torch.device,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        tensor_parallel_size: int,
        seed: int = 0,
        capture_cuda_graphs: bool = False,
        spec_query_len: int | None = None,
    ) -> None:
        check_tensor_parallel_size(source.config, tensor_parallel_size, device.type)
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process: only one tensor-parallel engine "
                "can run per process (shut the other one down first)"
            )
        self.size = tensor_parallel_size
        self.step_timeout_s = _env_seconds(STEP_TIMEOUT_ENV, 30.0)
        # Seconds rank 0's host spent waiting for its GPU in wait_for_device (async steps): next to the wall
        # time it tells whether decode is bound by the GPU (large) or by the host's own work per step (~0).
        self.device_wait_s = 0.0
        setup_timeout_s = _env_seconds(SETUP_TIMEOUT_ENV, 1800.0)
        if device.type == "cuda":
            for key, value in NO_MULTICAST_ENV.items():
                os.environ.setdefault(key, value)  # inherited by the workers, read by rank 0's NCCL
            # When a collective times out, NCCL's watchdog aborts the communicators but leaves the process
            # alive (2 = CleanUpOnly): the engine has already reported itself dead, and an offline LLM user's
            # Python process should not be killed under them.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        self.dead_reason: str | None = None
        self._closed = False
        # Port 0: the OS picks a free port for the rendezvous store; the workers are told which.
        store = dist.TCPStore(
            STORE_HOST, 0, self.size, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=setup_timeout_s),
        )
        self.spec = RankSpec(
            model=source.path, dtype=dtype, device_type=device.type, cache_config=cache_config,
            scheduler_config=scheduler_config, seed=seed, capture_cuda_graphs=capture_cuda_graphs,
            spec_query_len=spec_query_len,
            size=self.size, store_port=store.port, setup_timeout_s=setup_timeout_s,
            step_timeout_s=self.step_timeout_s,
        )
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        for rank in range(1, self.size):
            proc, conn = _start_worker(self.spec, rank)
            self._procs.append(proc)
            self._conns.append(conn)
        self._thread = _Rank0Thread()
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self._conns, self._thread)
        logger.info("started %d tensor-parallel worker(s): pids %s; rendezvous on %s:%d", self.size - 1,
                    [p.pid for p in self._procs], STORE_HOST, store.port)
        self._call(self._setup_rank0, store, source, timeout=setup_timeout_s, what="start-up")
        self.model = self.runner.model
        self.tp = self.runner.tp

    def _setup_rank0(self, store, source) -> None:
        tp = init_rank(self.spec, 0, store)
        self.runner = build_runner(self.spec, tp, source.config, source.iter_weights())

    # ----------------------------------------------------------------------------- ModelRunner's interface
    @property
    def grammars(self):
        """Structured outputs' grammar compiler: rank 0's, the only rank that samples."""
        return self.runner.grammars

    @grammars.setter
    def grammars(self, compiler) -> None:
        self.runner.grammars = compiler

    def determine_num_blocks(self) -> int:
        """The KV pool every rank can hold: the minimum over ranks."""
        return self._call(agree_num_blocks, self.runner, timeout=self.spec.setup_timeout_s, what="KV sizing")

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call(self.runner.allocate_kv_cache, num_blocks, timeout=self.spec.setup_timeout_s,
                   what="KV allocation")

    def capture_cuda_graphs(self, spec_query_len: int | None = None) -> None:
        # The workers capture theirs on their own (spec.capture_cuda_graphs, spec.spec_query_len); the
        # collectives pair them up, so every rank must capture the same shapes.
        if spec_query_len != self.spec.spec_query_len:
            raise ValueError(f"spec_query_len {spec_query_len} differs from the workers' {self.spec.spec_query_len}")
        self._call(self.runner.capture_cuda_graphs, spec_query_len, timeout=self.spec.setup_timeout_s,
                   what="CUDA graph capture")

    def execute(self, so, deferred: bool = False):
        """Send the step to every worker, run rank 0's part. ``deferred`` (async scheduling): return as soon
        as rank 0 has launched it; the returned output's ``get()`` waits for the device while watching the
        workers, so a rank that dies mid-step is still reported within the poll interval."""
        self._raise_if_dead()
        # The scheduler's Request objects (so.reqs, async scheduling's bookkeeping) stay in this process.
        step = dataclasses.replace(so, reqs=None) if so.reqs is not None else so
        payload = pickle.dumps((step, deferred), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(payload)
            except OSError as e:
                self._fail(f"could not send the step to worker rank {rank}", e, wait_for_exit_s=2.0)
        out = self._call(self.runner.execute, so, deferred, timeout=self.step_timeout_s, what="step")
        return _WatchedOutput(self, out) if deferred and isinstance(out, DeferredOutput) else out

    def wait_for_device(self, event) -> None:
        """Wait for ``event`` (a step rank 0 launched), raising TensorParallelError if a worker dies or the
        step makes no progress for the step timeout (a blocking wait would never return from a dead peer)."""
        start = time.perf_counter()
        stopped = self._poll(event, self.step_timeout_s, self._query)
        self.device_wait_s += time.perf_counter() - start
        if stopped == "dead":
            self._fail("step interrupted", None, wait_for_exit_s=0.0)
        if stopped == "timeout":
            self._fail(
                f"step made no progress for {self.step_timeout_s:g}s: a tensor-parallel rank is hung "
                f"(timeout from {STEP_TIMEOUT_ENV})", None,
            )

    def _poll(self, event, timeout: float, query) -> str | None:
        """Poll ``query(event)`` until it is done (None), a worker has died ("dead") or ``timeout`` has passed
        ("timeout"). Spins (yielding the GIL) for the first milliseconds, a decode step being a few ms long,
        then sleeps 0.2 ms between polls; the workers are checked every 50 ms."""
        if event is None or query(event):
            return None
        start = time.monotonic()
        next_check = start + 0.05
        while not query(event):
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.05
                if self._dead_workers():
                    return "dead"
                if now - start > timeout:
                    return "timeout"
            time.sleep(0 if now - start < 0.005 else 0.0002)
        return None

    def _query(self, event) -> bool:
        try:
            return event.query()
        except Exception as e:  # noqa: BLE001 - a CUDA error on rank 0: the engine cannot go on
            self._fail("step failed on rank 0's device", e, wait_for_exit_s=0.5)

    def _drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``, while every worker lives) for the work rank 0 has queued on its GPU: a step
        still in flight at shutdown needs its peers, and a worker that left first would leave rank 0's
        collective kernels waiting for it forever. Best effort: any failure just ends the wait."""
        if self.spec.device_type != "cuda" or self.dead_reason is not None:
            return
        try:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.runner.device))
            self._poll(event, timeout, lambda e: e.query())
        except Exception:  # noqa: BLE001 - best effort at shutdown
            return

    # ----------------------------------------------------------------------------- failure and shutdown
    def _call(self, fn, *args, timeout: float, what: str):
        """Run ``fn`` on rank 0's thread; raise TensorParallelError if a worker dies or ``timeout`` passes."""
        self._raise_if_dead()
        fut = self._thread.submit(fn, *args)
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Returns the moment fn finishes; the poll interval only bounds how late a death is seen.
                return fut.result(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                pass
            except Exception as e:  # noqa: BLE001 - rank 0 failed: often because a peer vanished
                self._fail(f"{what} failed on rank 0", e, wait_for_exit_s=2.0)
            if self._dead_workers():
                self._fail(f"{what} interrupted", None)
            if time.monotonic() >= deadline:
                self._fail(
                    f"{what} made no progress for {timeout:g}s: a tensor-parallel rank is hung "
                    f"(timeout from {STEP_TIMEOUT_ENV if what == 'step' else SETUP_TIMEOUT_ENV})", None,
                )

    def _dead_workers(self) -> list[tuple[int, subprocess.Popen]]:
        return [(rank, p) for rank, p in enumerate(self._procs, start=1) if p.poll() is not None]

    def _fail(self, what: str, cause: BaseException | None, wait_for_exit_s: float = 0.0):
        deadline = time.monotonic() + wait_for_exit_s
        dead = self._dead_workers()
        while not dead and time.monotonic() < deadline:  # a peer's death reaches rank 0 before its exit code
            time.sleep(0.05)
            dead = self._dead_workers()
        parts = [what]
        for rank, p in dead:
            parts.append(f"worker rank {rank} (pid {p.pid}) {describe_exit(p.returncode)}")
            report = self._worker_report(rank)
            if report:
                parts.append(report.strip().splitlines()[-1])
        if cause is not None:
            parts.append(f"rank 0: {cause!r}")
        self.dead_reason = "tensor-parallel engine is dead: " + "; ".join(parts)
        logger.error("%s", self.dead_reason)
        self.shutdown(graceful_s=0.0)
        raise TensorParallelError(self.dead_reason) from cause

    def _worker_report(self, rank: int) -> str | None:
        conn = self._conns[rank - 1]
        try:
            if conn.poll(0):
                kind, text = conn.recv()
                if kind == "error":
                    logger.error("worker rank %d failed:\n%s", rank, text)
                    return text
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            pass
        return None

    def _raise_if_dead(self) -> None:
        if self.dead_reason is not None:
            raise TensorParallelError(self.dead_reason)
        if self._closed:
            raise TensorParallelError("tensor-parallel engine has been shut down")

    def check_health(self) -> None:
        """Raise TensorParallelError if a worker has died, even while no step runs (cheap: one waitpid each)."""
        self._raise_if_dead()
        if self._dead_workers():
            self._fail("health check", None)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self, graceful_s: float = 5.0) -> None:
        """Stop every worker (killing those that do not stop within ``graceful_s``) and leave the group."""
        if self._closed:
            return
        self._closed = True
        if graceful_s > 0:
            self._drain(graceful_s)
        _stop_workers(self._procs, self._conns, graceful_s)
        # Leave the process group on rank 0's thread (after any call stuck there has failed, now that its
        # peers are gone), so a later engine in this process can form a new one.
        fut = self._thread.submit(_leave_group)
        try:
            fut.result(timeout=max(2.0, 2 * graceful_s))
        except Exception as e:  # noqa: BLE001 - best effort at shutdown
            logger.warning("leaving the tensor-parallel process group failed: %r", e)
        self._thread.stop()
        self._finalizer.detach()


class _WatchedOutput:
    """A deferred step's output whose ``get()`` waits through ``TensorParallelRunner.wait_for_device``."""

    def __init__(self, runner: TensorParallelRunner, inner: DeferredOutput) -> None:
        self._runner = runner
        self._inner = inner

    def get(self):
        self._runner.wait_for_device(self._inner.event)
        try:
            return self._inner.get()
        except Exception as e:  # noqa: BLE001 - reading the sampled ids back failed: report the engine dead
            self._runner._fail("reading a step's sampled tokens failed on rank 0", e, wait_for_exit_s=0.5)


def _leave_group() -> None:
    leave_process_group()


def _cleanup(procs, conns, thread: _Rank0Thread) -> None:
    """Finalizer (garbage collection or interpreter exit) of a runner nobody shut down."""
    _stop_workers(procs, conns, graceful_s=2.0)
    try:
        thread.submit(_leave_group).result(timeout=5.0)
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
    thread.stop()
