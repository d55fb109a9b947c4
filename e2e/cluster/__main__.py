"""`python -m e2e.cluster up|down|status`: the local Kubernetes cluster of the e2e tests and `make demo`."""

from __future__ import annotations

import argparse
import sys

from . import controlplane, versions
from .build import build
from .daemons import StartupError
from .layout import Layout
from .prereqs import PrerequisiteMissing


def _print_usage_hint(layout: Layout) -> None:
    print()
    print("Use it with:")
    print(f"  export KUBECONFIG={layout.kubeconfig()}")
    print(f"  export PATH={versions.BIN_DIR}:$PATH   # kubectl {versions.KUBE_VERSION}, helm {versions.HELM_VERSION}")
    print(f"Prometheus: {layout.prometheus_url}   state and logs: {layout.root}")
    print("Stop it with: make cluster-down")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a fresh cluster (builds the binaries the first time)")
    up.add_argument("--no-prometheus", action="store_true")
    sub.add_parser("down", help="stop everything the cluster started")
    sub.add_parser("status", help="say whether a cluster runs, and how to use it")
    sub.add_parser("build", help="only build (or check) the control plane binaries")
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            layout = controlplane.up(with_prometheus=not args.no_prometheus)
            _print_usage_hint(layout)
        elif args.cmd == "down":
            controlplane.down()
        elif args.cmd == "build":
            build()
        elif args.cmd == "status":
            if not (versions.STATE_DIR / "cluster.json").exists():
                print("no local cluster (start one with `make cluster`)")
                return 1
            layout = Layout.load()
            if not controlplane.running(layout):
                print(f"cluster state in {layout.root}, but the API server does not answer")
                return 1
            print(f"local cluster running at {layout.apiserver_url}")
            _print_usage_hint(layout)
    except (PrerequisiteMissing, StartupError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
