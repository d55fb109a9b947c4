"""Pinned versions and cache locations of the local cluster's components.

Bump KUBE_VERSION together with k8sbuild/go.mod (k8s.io/kubernetes and every staging `replace`),
PROMETHEUS_VERSION together with prombuild/go.mod.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

KUBE_VERSION = "v1.37.2"  # k8s.io/kubernetes; staging modules at v0.37.2
HELM_VERSION = "v3.22.0"  # helm.sh/helm/v3
ETCD_VERSION = "v3.7.0"  # go.etcd.io/etcd/server/v3, as k8s.io/kubernetes requires it

# Everything built or generated lives under one folder so a second run reuses it.
CACHE_ROOT = Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))
BIN_DIR = CACHE_ROOT / f"k8s-{KUBE_VERSION}" / "bin"
# Runtime state of a running cluster: certs, kubeconfigs, etcd data, logs, pod folders, pids.
STATE_DIR = Path(os.environ.get("PAGEDSERVE_CLUSTER_DIR", CACHE_ROOT / "cluster"))

PROMETHEUS_VERSION = "v0.316.0"  # github.com/prometheus/prometheus module = Prometheus 3.16.0


@dataclass(frozen=True)
class GoBuild:
    """One wrapper module of ours and the commands built from it into BIN_DIR."""

    module_dir: Path
    commands: dict[str, str]  # binary name -> Go package
    tags: str = ""


_HERE = Path(__file__).resolve().parent
BUILDS = (
    GoBuild(
        _HERE / "k8sbuild",
        {
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
            "kubectl": "k8s.io/kubernetes/cmd/kubectl",
            "helm": "helm.sh/helm/v3/cmd/helm",
            "etcd": "./cmd/etcd",
        },
    ),
    # Debian's prometheus is built without kubernetes_sd; this build has it and no other cloud SD.
    GoBuild(
        _HERE / "prombuild",
        {"prometheus": "github.com/prometheus/prometheus/cmd/prometheus"},
        tags="remove_all_sd,enable_kubernetes_sd",
    ),
)
BINARIES = [name for b in BUILDS for name in b.commands]
