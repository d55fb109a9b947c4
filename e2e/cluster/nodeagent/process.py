"""One container instance as a local process group, in its own mount namespace when we may make one.

With mount namespaces (root + util-linux `unshare`), each volume is bind-mounted at its mountPath inside a
namespace private to the process, so /var/run/secrets/kubernetes.io/serviceaccount/token is the pod's own
token and in-cluster clients work unchanged. Without them the process runs with no mounts (a warning).
The process leads its own session, so stopping a container stops everything it started.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from .volumes import Mount


@cache
def mount_namespaces_available() -> bool:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return False
    probe = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "--", "true"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


# The checkout this agent runs from (its .venv holds every container's command). A volume mounted over one
# of its parents (an emptyDir at /tmp while the checkout is under /tmp, as a CI clone may be) must not hide it.
REPO_ROOT = Path(__file__).resolve().parents[3]
KEEP_DIR = Path("/run/pagedserve-keep")


def shadowed(path: Path, mounts: Sequence[Mount]) -> bool:
    return any(path == Path(m.target) or Path(m.target) in path.parents for m in mounts)


def mount_script(mounts: Sequence[Mount], keep: Sequence[Path] = ()) -> str:
    """Shell that bind-mounts each volume at its target, then execs the container command ("$@").

    Each path in ``keep`` is bound aside first and bound back after the volumes, so a volume mounted over
    one of its parents leaves it visible."""
    lines = ["set -e"]
    for i, path in enumerate(keep):
        stash = shlex.quote(str(KEEP_DIR / str(i)))
        lines.append(f"mkdir -p {stash}; mount --bind {shlex.quote(str(path))} {stash}")
    for m in mounts:
        src, dst = shlex.quote(str(m.source)), shlex.quote(m.target)
        if m.source.is_dir():
            lines.append(f"mkdir -p {dst}")
        else:
            lines.append(f"mkdir -p $(dirname {dst}); [ -e {dst} ] || touch {dst}")
        lines.append(f"mount --bind {src} {dst}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {dst}")
    for i, path in enumerate(keep):
        dst = shlex.quote(str(path))
        lines.append(f"mkdir -p {dst}; mount --bind {shlex.quote(str(KEEP_DIR / str(i)))} {dst}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def exit_code(returncode: int) -> int:
    """Popen's -SIGNUM as a container runtime reports it (128 + SIGNUM, e.g. 137 for SIGKILL)."""
    return 128 - returncode if returncode < 0 else returncode


class ContainerProcess:
    """A started container: its process group, log file and exit."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        mounts: Sequence[Mount],
        log_path: Path,
        created_paths_log: Path | None = None,
    ) -> None:
        self.argv, self.env, self.cwd, self.mounts, self.log_path = list(argv), dict(env), cwd, list(mounts), log_path
        self.created_paths_log = created_paths_log
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.kill_at: float | None = None

    def _make_mount_points(self) -> None:
        """Create missing mount points on the host (a mount needs one) and note them for `cluster down`."""
        created = []
        for m in self.mounts:
            target = Path(m.target)
            missing = [p for p in (target, *target.parents) if not p.exists()]
            if not missing:
                continue
            if m.source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch(exist_ok=True)
            created += [str(p) for p in missing]
        if created and self.created_paths_log is not None:
            with open(self.created_paths_log, "a") as f:
                f.write("".join(f"{p}\n" for p in created))

    def start(self) -> None:
        """Spawns the process; raises FileNotFoundError when the command is not on the pod's PATH."""
        exe = self.argv[0]
        resolved = exe if "/" in exe else shutil.which(exe, path=self.env.get("PATH", os.defpath))
        if resolved is None or not os.access(resolved, os.X_OK):
            raise FileNotFoundError(f'exec: "{exe}": executable file not found in $PATH')
        argv = [resolved, *self.argv[1:]]
        if self.mounts and mount_namespaces_available():
            self._make_mount_points()
            keep = [REPO_ROOT] if shadowed(REPO_ROOT, self.mounts) else []
            if keep:
                KEEP_DIR.mkdir(parents=True, exist_ok=True)
            argv = ["unshare", "--mount", "--propagation", "private", "--",
                    "/bin/sh", "-c", mount_script(self.mounts, keep), "container-entry", *argv]  # fmt: skip
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.time()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def poll(self) -> int | None:
        """The exit code once the process has exited; its leftover children are killed then."""
        if self.popen is None:
            return None
        rc = self.popen.poll()
        if rc is None:
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                self._signal_group(signal.SIGKILL)
            return None
        # Like a container's PID 1 exiting: whatever it left in its group goes too.
        self._signal_group(signal.SIGKILL)
        return exit_code(rc)

    def terminate(self, grace_s: float) -> None:
        """SIGTERM now; poll() sends SIGKILL once `grace_s` has passed."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + max(grace_s, 0.0)
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command where this container's volumes are (exec probes and hooks)."""
        if self.popen is None or self.popen.poll() is not None or not (self.mounts and mount_namespaces_available()):
            return []
        return ["nsenter", "-t", str(self.popen.pid), "-m", "--"]

    def kill_now(self) -> None:
        self._signal_group(signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
