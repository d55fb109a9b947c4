"""Prerequisites of the local cluster, each checked with a message that says what to install."""

from __future__ import annotations

import re
import shutil
import subprocess

MIN_GO = (1, 26)


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
