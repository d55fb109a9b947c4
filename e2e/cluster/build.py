"""Build the control plane binaries from Kubernetes' published Go modules, once, into the cache.

`python -m e2e.cluster.build` builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
helm and etcd from the wrapper module in k8sbuild/, and Prometheus from prombuild/, into versions.BIN_DIR.
A stamp per module (hash of its files, the link flags and the Go version) makes a second run return at once.
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


def _ldflags(build: versions.GoBuild) -> str:
    """Version stamps, so `kubectl version` and Helm's kubeVersion checks see v1.37.2, not v0.0.0."""
    flags = ["-s", "-w"]
    if build.module_dir.name == "k8sbuild":
        major, minor = versions.KUBE_VERSION.lstrip("v").split(".")[:2]
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [
                f"-X {pkg}.gitVersion={versions.KUBE_VERSION}",
                f"-X {pkg}.gitMajor={major}",
                f"-X {pkg}.gitMinor={minor}",
                f"-X {pkg}.gitTreeState=clean",
            ]
        flags.append(f"-X helm.sh/helm/v3/internal/version.version={versions.HELM_VERSION}")
        flags.append("-X helm.sh/helm/v3/internal/version.gitTreeState=clean")
    else:
        # Module v0.316.0 is Prometheus 3.16.0.
        release = "3." + versions.PROMETHEUS_VERSION.split(".")[1][1:] + "." + versions.PROMETHEUS_VERSION.split(".")[2]
        flags.append(f"-X github.com/prometheus/common/version.Version={release}")
    return " ".join(flags)


def _stamp(build: versions.GoBuild, go_version: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(build.module_dir.rglob("*")):
        if path.is_file() and (path.suffix in (".go", ".mod", ".sum")):
            digest.update(path.relative_to(build.module_dir).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update(_ldflags(build).encode())
    digest.update(build.tags.encode())
    digest.update(go_version.encode())
    digest.update(" ".join(sorted(build.commands)).encode())
    return digest.hexdigest()


def _stamp_file(build: versions.GoBuild, bin_dir: Path) -> Path:
    return bin_dir / f".stamp-{build.module_dir.name}"


def _build_ready(build: versions.GoBuild, go_version: str | None, bin_dir: Path = versions.BIN_DIR) -> bool:
    stamp = _stamp_file(build, bin_dir)
    if not stamp.exists() or not all((bin_dir / n).exists() for n in build.commands):
        return False
    # Without Go the built binaries are still usable; the stamp only guards against stale ones.
    return go_version is None or stamp.read_text().strip() == _stamp(build, go_version)


def binaries_ready(bin_dir: Path = versions.BIN_DIR) -> bool:
    """True when every binary exists and was built from the current wrapper modules."""
    try:
        go_version: str | None = require_go()
    except PrerequisiteMissing:
        go_version = None
    return all(_build_ready(b, go_version, bin_dir) for b in versions.BUILDS)


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GOFLAGS"] = "-buildvcs=false -mod=readonly"
    env.setdefault("CGO_ENABLED", "0")
    # Never let go.mod's `go` line trigger a toolchain download behind the user's back.
    env["GOTOOLCHAIN"] = env.get("GOTOOLCHAIN", "local")
    return env


def _count_packages(build: versions.GoBuild, env: dict[str, str]) -> int | None:
    try:
        out = subprocess.run(
            ["go", "list", "-deps", *(["-tags", build.tags] if build.tags else []), *build.commands.values()],
            cwd=build.module_dir,
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


def _say(msg: str) -> None:
    print(msg, flush=True)


def build(force: bool = False, log=_say) -> Path:
    """Build (or reuse) every binary; returns the folder holding them."""
    go_version = require_go()
    todo = [b for b in versions.BUILDS if force or not _build_ready(b, go_version)]
    if not todo:
        log(f"control plane binaries: cached in {versions.BIN_DIR}")
        return versions.BIN_DIR
    log(
        f"building Kubernetes {versions.KUBE_VERSION}, etcd {versions.ETCD_VERSION}, helm {versions.HELM_VERSION},"
        f" Prometheus {versions.PROMETHEUS_VERSION} with {go_version}"
        " (first time only: about 20 minutes on 2 free cores, longer on a busy machine)"
    )
    versions.BIN_DIR.mkdir(parents=True, exist_ok=True)
    for b in todo:
        _build_one(b, go_version, log)
    return versions.BIN_DIR


def _build_one(build: versions.GoBuild, go_version: str, log) -> None:
    env = _build_env()
    names = ", ".join(build.commands)
    log(f"  {names}: listing packages (downloads modules on a fresh machine) ...")
    total = _count_packages(build, env)
    staging = versions.BIN_DIR.with_name(f"bin.partial-{build.module_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = ["go", "build", "-v", "-trimpath", f"-ldflags={_ldflags(build)}", "-o", str(staging) + "/"]
    if build.tags:
        cmd.insert(2, f"-tags={build.tags}")
    cmd += list(build.commands.values())
    log_path = versions.CACHE_ROOT / f"build-{build.module_dir.name}.log"
    started = time.monotonic()
    proc = subprocess.Popen(
        ["nice", "-n", "19", *cmd],
        cwd=build.module_dir,
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
    for name in build.commands:
        os.replace(staging / name, versions.BIN_DIR / name)
    _stamp_file(build, versions.BIN_DIR).write_text(_stamp(build, go_version) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    log(f"  {names}: built in {int(time.monotonic() - started)}s into {versions.BIN_DIR}")


def main() -> int:
    try:
        build(force="--force" in sys.argv)
    except (PrerequisiteMissing, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
