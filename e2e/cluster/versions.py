"""Pinned versions and cache locations of the local cluster's components.

Bump KUBE_VERSION together with k8sbuild/go.mod (k8s.io/kubernetes and every staging `replace`).
"""

from __future__ import annotations

import os
from pathlib import Path

KUBE_VERSION = "v1.37.2"  # k8s.io/kubernetes; staging modules at v0.37.2
HELM_VERSION = "v3.22.0"  # helm.sh/helm/v3
ETCD_VERSION = "v3.7.0"  # go.etcd.io/etcd/server/v3, as k8s.io/kubernetes requires it
PROMETHEUS_DEBIAN_PACKAGE = "prometheus"  # Debian's build (2.42 on bookworm)

# Everything built or generated lives under one folder so a second run reuses it.
CACHE_ROOT = Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))
BIN_DIR = CACHE_ROOT / f"k8s-{KUBE_VERSION}" / "bin"
# Runtime state of a running cluster: certs, kubeconfigs, etcd data, logs, pod folders, pids.
STATE_DIR = Path(os.environ.get("PAGEDSERVE_CLUSTER_DIR", CACHE_ROOT / "cluster"))

K8SBUILD_DIR = Path(__file__).resolve().parent / "k8sbuild"

# Binaries built by build.py from k8sbuild/, name -> Go package.
GO_COMMANDS = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "helm": "helm.sh/helm/v3/cmd/helm",
    "etcd": "./cmd/etcd",
}
