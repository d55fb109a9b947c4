"""Prerequisites of the local cluster, each checked with a message that says what to install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

MIN_GO = (1, 26)
APT_TIMEOUT_S = 900


class PrerequisiteMissing(RuntimeError):
    """A tool the cluster needs is absent; the message names what to install."""


def require_go() -> str:
    """Returns `go1.x.y`; the build needs Go >= 1.26 (k8s.io/kubernetes v1.37's go.mod says so)."""
    go = shutil.which("go")
    if go is None:
        raise PrerequisiteMissing(
            "Go is not on PATH: install Go 1.26 or newer (https://go.dev/doc/install) to build the control plane"
        )
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60).stdout.strip()
    match = re.match(r"go(\d+)\.(\d+)", out)
    if not match or (int(match[1]), int(match[2])) < MIN_GO:
        raise PrerequisiteMissing(f"{out or 'go'} is too old: install Go {MIN_GO[0]}.{MIN_GO[1]} or newer")
    return out


def require_openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise PrerequisiteMissing("openssl is not on PATH: install it (Debian: apt-get install openssl)")
    return path


def _apt_install(package: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing Debian package {package} (apt-get) ...", flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PrerequisiteMissing(f"`{' '.join(cmd)}` took over {APT_TIMEOUT_S}s; install {package} by hand") from None
        if done.returncode != 0:
            raise PrerequisiteMissing(
                f"`{' '.join(cmd)}` failed; install the Debian package {package} by hand:\n{done.stderr[-2000:]}"
            )


def require_debian_binary(binary: str, package: str, candidates: tuple[str, ...] = ()) -> str:
    """Path of `binary`; installs Debian's `package` when running as root, else says to install it."""
    for path in (shutil.which(binary), *candidates):
        if path and os.access(path, os.X_OK):
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install(package)
        for path in (shutil.which(binary), *candidates):
            if path and os.access(path, os.X_OK):
                return path
    raise PrerequisiteMissing(f"{binary} is not installed: install the Debian package {package} (apt-get install {package})")


def require_prometheus() -> str:
    return require_debian_binary("prometheus", "prometheus", ("/usr/bin/prometheus",))
