"""Background processes of the cluster: start detached with a pid file and a log, wait, stop, sweep.

Every process the cluster starts, pods included, carries PAGEDSERVE_LOCAL_CLUSTER=<cluster id> in its
environment, so `down` can find and stop anything left over even when a pid file was lost.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .layout import Layout

MARKER_ENV = "PAGEDSERVE_LOCAL_CLUSTER"


class StartupError(RuntimeError):
    """A component did not come up; the message carries the end of its log."""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def alive(pid: int) -> bool:
    """True for a running process (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start(layout: Layout, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    layout.pids_dir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    full_env[MARKER_ENV] = layout.cluster_id
    with open(layout.logs_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=layout.root,
            start_new_session=True,
        )
    (layout.pids_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def wait_until(layout: Layout, name: str, check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` until true; fail fast with the log's tail if the process died or time ran out."""
    pid_file = layout.pids_dir / f"{name}.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        if pid is not None and not alive(pid):
            raise StartupError(f"{name} exited while waiting for {what}; its log ends:\n{log_tail(layout.logs_dir / f'{name}.log')}")
        time.sleep(0.2)
    raise StartupError(f"{name}: no {what} after {timeout_s:.0f}s; its log ends:\n{log_tail(layout.logs_dir / f'{name}.log')}")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    for target in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
        try:
            target()
            return
        except (ProcessLookupError, PermissionError):
            continue


def stop(layout: Layout, order: Sequence[str], grace_s: float = 20.0) -> list[str]:
    """SIGTERM each named daemon (in order, waiting for each), SIGKILL what outlives its grace."""
    stopped = []
    for name in order:
        pid_file = layout.pids_dir / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        if alive(pid):
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(pid):
                _signal_group(pid, signal.SIGKILL)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    return stopped


def marked_processes(cluster_id: str) -> list[int]:
    """Pids whose environment carries this cluster's marker (daemons, pods and anything they started)."""
    needle = f"{MARKER_ENV}={cluster_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def sweep(cluster_id: str) -> list[int]:
    """SIGKILL every process still marked with this cluster; returns those that were found."""
    if not cluster_id:
        return []
    pids = marked_processes(cluster_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids
