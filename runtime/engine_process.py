"""The engine core in a process of its own, so the HTTP front end never takes the GIL from it.

vLLM v1's layout: the server process keeps the event loop (HTTP, JSON, detokenization, streams) and talks to an
engine process that owns the ``EngineCore`` (scheduler, KV manager, model runner, tensor-parallel rank 0 and
its workers). One socket pair carries pickled messages both ways:

    front -> engine:  ("add", [Request, ...], token) | ("abort", [ids]) | ("finish", [ids]) | ("shutdown",)
    engine -> front:  ("ready", EngineInfo) | ("failed", exception)              once, after the load
                      ("admitted", token, exception or None)
                      ("step", [RequestUpdate as a tuple], seconds, [(request id, first scheduled time)],
                       EngineStats)
                      ("beat", EngineStats)                                      every idle heartbeat
                      ("exit", exception, shutdown)                              last

The engine process is started like a tensor-parallel worker (``python -c`` with the parent's sys.path, not
multiprocessing's spawn, which would re-run the user's main script). It ignores SIGINT and SIGTERM: the server
decides when it stops (after draining) and says so; it exits on its own when the server process is gone.
A receiver thread moves commands from the socket into the ``EngineLoop``'s queue, so a burst of requests never
blocks the server's event loop on a full socket while a long step runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from pagedserve.runtime.distributed import describe_exit
from pagedserve.runtime.engine import EngineArgs, EngineInfo
from pagedserve.runtime.scheduler import RequestUpdate

logger = logging.getLogger("pagedserve.engine_process")

ENGINE_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[2]); "
    "from multiprocessing.connection import Connection; "
    "from pagedserve.runtime.engine_process import engine_main; engine_main(Connection(int(sys.argv[1])))"
)


class EngineProcess:
    """The server's handle on the engine process: start, wait for the load, send commands, receive results.

    ``send`` never blocks (a sender thread writes to the socket, so an engine that stops reading cannot stall the
    event loop); ``recv`` is for one reader thread; ``shutdown`` and ``close`` are safe to call twice, from any
    thread.
    """

    def __init__(self, args: EngineArgs, *, max_waiting_requests: int = 0, idle_heartbeat_s: float = 0.5,
                 step_delay_s: float = 0.0) -> None:
        from pagedserve.runtime.log_setup import current_setup

        self.step_delay_s = step_delay_s
        self.info: EngineInfo | None = None
        options = dict(max_waiting_requests=max_waiting_requests, idle_heartbeat_s=idle_heartbeat_s,
                       step_delay_s=step_delay_s, logging=current_setup())
        ours, theirs = socket.socketpair()
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ENGINE_BOOT, str(theirs.fileno()), json.dumps(sys.path)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            )
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self._closed = False  # no more commands
        self._conn_closed = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox.put((args, options))
        self._sender = threading.Thread(target=self._send_loop, name="engine-sender", daemon=True)
        self._sender.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> EngineInfo:
        """Block until the engine has loaded the model; raise what made the load fail."""
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the engine process {self.wait_exit_reason(5.0)} while loading the model") from None
        if msg[0] == "failed":
            raise msg[1]
        self.info = msg[1]
        return self.info

    def send(self, cmd: tuple) -> None:
        """Queue a command for the engine; OSError once it is shut down."""
        if self._closed:
            raise OSError("the engine process is shut down")
        self._outbox.put(cmd)

    def _send_loop(self) -> None:
        while True:
            cmd = self._outbox.get()
            if cmd is None:
                return
            try:
                self._conn.send(cmd)
            except (OSError, ValueError):  # the engine is gone (its reader on our side says why)
                return

    def recv(self) -> tuple:
        return self._conn.recv()

    def exit_reason(self) -> str | None:
        """None while the process runs; otherwise how it ended."""
        code = self.proc.poll()
        return None if code is None else f"the engine process (pid {self.proc.pid}) {describe_exit(code)}"

    def wait_exit_reason(self, timeout: float) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.exit_reason() or f"the engine process (pid {self.proc.pid}) stopped answering"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the engine to stop (it stops its tensor-parallel workers first), wait up to ``timeout``, then kill
        it. ``timeout`` 0: kill at once (a model still loading reads no command before it is done)."""
        with self._lock:
            first, self._closed = not self._closed, True
        if first:
            self._outbox.put(("shutdown",))
            self._outbox.put(None)
        if timeout > 0:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the engine process did not stop within %gs: killing it", timeout)
        self.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            logger.error("the engine process (pid %d) did not die within 10s of SIGKILL", self.proc.pid)

    def close(self) -> None:
        """Close our end of the socket; call once no thread reads from it any more."""
        with self._lock:
            if self._conn_closed:
                return
            self._conn_closed = True
        self._conn.close()


# A RequestUpdate as a plain tuple of its fields, in order: a step of 256 updates pickles in ~0.09 ms this way
# against ~0.54 ms as dataclass instances (the server rebuilds them with RequestUpdate(*t)).
pack_update = operator.attrgetter(*(f.name for f in dataclasses.fields(RequestUpdate)))


class _PipeSink:
    """``EngineSink`` of the engine process: every report is one message to the server."""

    def __init__(self, conn: Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock
        self.loop = None  # the EngineLoop, set once it exists
        self.exit: tuple | None = None  # (error, shutdown) once the loop has ended

    def _send(self, msg: tuple) -> None:
        try:
            with self.lock:
                self.conn.send(msg)
        except OSError:  # the server is gone: stop
            self.loop.request_stop()

    def admitted(self, token, error) -> None:
        self._send(("admitted", token, _picklable(error)))

    def stepped(self, updates, duration_s, first_scheduled) -> None:
        self._send(("step", [pack_update(u) for u in updates], duration_s, first_scheduled, self.loop.stats))

    def idle(self) -> None:
        self._send(("beat", self.loop.stats))

    def exited(self, error, shutdown) -> None:
        self.exit = (error, shutdown)  # engine_main sends it once the tensor-parallel workers are stopped


def _picklable(exc: BaseException | None) -> BaseException | None:
    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception type that does not survive pickling: keep its words
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _receive(conn: Connection, loop) -> None:
    """Receiver thread of the engine process: commands into the loop's queue until shutdown or EOF."""
    while True:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):  # the server closed its end: nobody is left to serve
            break
        except Exception:  # noqa: BLE001 - a command we cannot read: stop rather than leave requests waiting
            logger.exception("reading a command from the server failed")
            break
        if cmd[0] == "shutdown":
            break
        loop.put(cmd)
    loop.request_stop()


def engine_main(conn: Connection) -> None:
    """Entry point of the engine process: load, then run the engine loop until told to stop."""
    from pagedserve.runtime.worker import exit_with_parent

    exit_with_parent()
    # The server handles SIGINT/SIGTERM (drain, then shutdown); a Ctrl-C to the process group must not
    # kill the engine under requests that are still finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args, options = conn.recv()
    if options.get("logging") is not None:
        from pagedserve.runtime.log_setup import setup_logging

        setup_logging(*options["logging"])
    from pagedserve.runtime.async_engine import EngineDeadError, EngineLoop
    from pagedserve.runtime.engine import EngineCore

    lock = threading.Lock()
    try:
        core = EngineCore(args)
    except BaseException as e:  # noqa: BLE001 - the server reports it and exits non-zero
        logger.debug("the model failed to load", exc_info=True)
        conn.send(("failed", _picklable(e)))
        conn.close()
        logging.shutdown()
        os._exit(1)
    conn.send(("ready", core.info))
    sink = _PipeSink(conn, lock)
    loop = EngineLoop(
        core, sink, max_waiting_requests=options["max_waiting_requests"],
        idle_heartbeat_s=options["idle_heartbeat_s"], step_delay_s=options["step_delay_s"],
        report_first_scheduled=True,
    )
    sink.loop = loop
    threading.Thread(target=_receive, args=(conn, loop), name="engine-commands", daemon=True).start()
    loop.run()
    error, shutdown = sink.exit or (EngineDeadError("the engine loop ended"), True)
    t0 = time.monotonic()
    core.shutdown()
    logger.debug("engine stopped in %.2fs", time.monotonic() - t0)
    try:
        with lock:
            conn.send(("exit", _picklable(error), shutdown))
    except OSError:
        pass
    conn.close()
    # Skip the interpreter's teardown (seconds of torch finalizers; nothing is left to release).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if shutdown else 1)
