"""Build the control plane binaries from Kubernetes' published Go modules, once, into the cache.

`python -m e2e.cluster.build` builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
helm and etcd from the wrapper module in k8sbuild/ into versions.BIN_DIR. A stamp (hash of go.mod, go.sum,
the link flags and the Go version) makes a second run return at once.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import versions
from .prereqs import PrerequisiteMissing, require_go

# A build that prints nothing for this long is stuck (e.g. a module download with no network).
SILENCE_LIMIT_S = 900
PROGRESS_EVERY_S = 15


def _kube_ldflags() -> list[str]:
    """Version stamps so `kubectl version` and Helm's kubeVersion checks see v1.37.2, not v0.0.0."""
    major, minor = versions.KUBE_VERSION.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={versions.KUBE_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    flags.append(f"-X helm.sh/helm/v3/internal/version.version={versions.HELM_VERSION}")
    flags.append("-X helm.sh/helm/v3/internal/version.gitTreeState=clean")
    return flags


def ldflags() -> str:
    return " ".join(["-s", "-w", *_kube_ldflags()])


def _stamp(go_version: str) -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "cmd/etcd/main.go"):
        digest.update((versions.K8SBUILD_DIR / name).read_bytes())
    digest.update(ldflags().encode())
    digest.update(go_version.encode())
    digest.update(" ".join(sorted(versions.GO_COMMANDS)).encode())
    return digest.hexdigest()


def binaries_ready(bin_dir: Path = versions.BIN_DIR) -> bool:
    """True when every binary exists and was built from the current wrapper module."""
    stamp_file = bin_dir / ".stamp"
    if not stamp_file.exists() or not all((bin_dir / n).exists() for n in versions.GO_COMMANDS):
        return False
    try:
        go_version = require_go()
    except PrerequisiteMissing:
        # Built binaries are usable without Go; the stamp only guards against stale ones.
        return True
    return stamp_file.read_text().strip() == _stamp(go_version)


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GOFLAGS"] = "-buildvcs=false -mod=readonly"
    env.setdefault("CGO_ENABLED", "0")
    # Never let go.mod's `go` line trigger a toolchain download behind the user's back.
    env["GOTOOLCHAIN"] = env.get("GOTOOLCHAIN", "local")
    return env


def _count_packages(packages: list[str], env: dict[str, str]) -> int | None:
    try:
        out = subprocess.run(
            ["go", "list", "-deps", *packages],
            cwd=versions.K8SBUILD_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=SILENCE_LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        return None
    return len(out.stdout.split()) if out.returncode == 0 else None


def _stream(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def build(force: bool = False, log=print) -> Path:
    """Build (or reuse) every binary; returns the folder holding them."""
    go_version = require_go()
    if not force and binaries_ready():
        log(f"control plane binaries: cached in {versions.BIN_DIR}")
        return versions.BIN_DIR

    env = _build_env()
    packages = list(versions.GO_COMMANDS.values())
    log(
        f"building Kubernetes {versions.KUBE_VERSION}, etcd {versions.ETCD_VERSION}, helm {versions.HELM_VERSION}"
        f" with {go_version} (first time only: 20-40 minutes on 2 cores)"
    )
    log("  listing packages (downloads modules on a fresh machine) ...")
    total = _count_packages(packages, env)
    staging = versions.BIN_DIR.with_name("bin.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = ["go", "build", "-v", "-trimpath", f"-ldflags={ldflags()}", "-o", str(staging) + "/", *packages]
    log_path = versions.CACHE_ROOT / "build.log"
    started = time.monotonic()
    proc = subprocess.Popen(
        ["nice", "-n", "19", *cmd],
        cwd=versions.K8SBUILD_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = _stream(proc)
    done, last_report, tail = 0, started, []
    with open(log_path, "w") as log_file:
        while True:
            try:
                line = lines.get(timeout=SILENCE_LIMIT_S)
            except queue.Empty:
                proc.kill()
                raise RuntimeError(
                    f"go build printed nothing for {SILENCE_LIMIT_S}s; is the Go module proxy reachable? "
                    f"log: {log_path}"
                ) from None
            if line is None:
                break
            log_file.write(line + "\n")
            tail = (tail + [line])[-30:]
            if re.match(r"^[\w.\-]+(/[\w.\-~]+)*$", line):
                done += 1
            now = time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S:
                of = f"/{total}" if total else ""
                log(f"  compiled {done}{of} packages, {int(now - started)}s elapsed (log: {log_path})")
                last_report = now
    if proc.wait() != 0:
        sys.stderr.write("\n".join(tail) + "\n")
        raise RuntimeError(f"go build failed (exit {proc.returncode}); full log: {log_path}")
    (staging / ".stamp").write_text(_stamp(go_version) + "\n")
    shutil.rmtree(versions.BIN_DIR, ignore_errors=True)
    staging.rename(versions.BIN_DIR)
    log(f"  built in {int(time.monotonic() - started)}s into {versions.BIN_DIR}")
    return versions.BIN_DIR


def main() -> int:
    try:
        build(force="--force" in sys.argv)
    except (PrerequisiteMissing, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
