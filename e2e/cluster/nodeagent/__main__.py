"""`python -m e2e.cluster.nodeagent --name node-a ...`: run one node until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .agent import NodeAgent, NodeConfig, ip_range


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nodeagent", description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--host-ip", required=True, help="the Node's InternalIP (a loopback address)")
    p.add_argument("--pod-ips", required=True, help="FIRST-LAST loopback addresses handed out as pod IPs")
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--api-server", required=True, help="HOST:PORT in-cluster clients are given")
    p.add_argument("--path-prefix", default=str(Path(sys.executable).parent))
    p.add_argument("--cluster-id", required=True)
    p.add_argument("--kube-version", default="v1.37.2")
    p.add_argument("--backoff-base", type=float, default=2.0)
    p.add_argument("--backoff-cap", type=float, default=60.0)
    p.add_argument("--tls-cert", type=Path, help="kubelet API serving cert (enables `kubectl logs`)")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--client-ca", type=Path, help="CA of the API server's kubelet-client certificate")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    first, last = args.pod_ips.split("-")
    host, port = args.api_server.rsplit(":", 1)
    agent = NodeAgent(
        NodeConfig(
            name=args.name, host_ip=args.host_ip, pod_ips=ip_range(first, last), gpus=args.gpus,
            kubeconfig=args.kubeconfig, state_dir=args.state_dir, api_host=host, api_port=int(port),
            path_prefix=args.path_prefix, cluster_id=args.cluster_id, kube_version=args.kube_version,
            backoff_base_s=args.backoff_base, backoff_cap_s=args.backoff_cap,
            kubelet_tls=(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None,
        )
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
