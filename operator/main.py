"""`pagedserve operator`: run the LLMDeployment operator.

    pagedserve operator --all-namespaces
    pagedserve operator --namespace team-a --namespace team-b --metrics-port 8081
    python -m pagedserve.operator.main --standalone     (one replica, no peering resource needed)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf

from pagedserve.operator import handlers, metrics

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_TOKEN = f"{SERVICE_ACCOUNT_DIR}/token"


def in_cluster_connection() -> kopf.ConnectionInfo | None:
    """The API server as client-go's in-cluster config finds it: $KUBERNETES_SERVICE_HOST and _PORT.

    kopf's own service-account login assumes https://kubernetes.default.svc, which needs cluster DNS;
    the variables are set in every pod, DNS or not. None outside a pod (then kopf's logins apply).
    """
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not os.path.exists(SERVICE_ACCOUNT_TOKEN):
        return None
    with open(SERVICE_ACCOUNT_TOKEN) as f:
        token = f.read().strip()
    namespace = None
    if os.path.exists(f"{SERVICE_ACCOUNT_DIR}/namespace"):
        with open(f"{SERVICE_ACCOUNT_DIR}/namespace") as f:
            namespace = f.read().strip() or None
    ca_path = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
    server_host = f"[{host}]" if ":" in host else host  # IPv6 literal
    return kopf.ConnectionInfo(
        server=f"https://{server_host}:{port}",
        ca_path=ca_path if os.path.exists(ca_path) else None,
        token=token or None,
        default_namespace=namespace,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pagedserve operator", description="Run the LLMDeployment operator.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable; globs allowed); env PAGEDSERVE_WATCH_NAMESPACES")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--peering", default=os.environ.get("PAGEDSERVE_PEERING", "pagedserve-operator"),
                        help="kopf peering name shared by the replicas of one operator")
    parser.add_argument("--standalone", action="store_true", help="no peering: only ever run one replica")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument("--host", default=os.environ.get("POD_IP") or "0.0.0.0",
                        help="address the health and metrics servers bind (in a pod: its IP, env POD_IP)")
    parser.add_argument("--health-port", type=int, default=8080, help="GET /healthz (kopf liveness); 0: off")
    parser.add_argument("--metrics-port", type=int, default=8081, help="GET /metrics; 0: off")
    parser.add_argument("--resync-seconds", type=float, default=60.0, help="reconcile each object at least this often")
    parser.add_argument("--prometheus-url", default=os.environ.get("PAGEDSERVE_PROMETHEUS_URL"),
                        help="Prometheus the autoscaler queries (env PAGEDSERVE_PROMETHEUS_URL)")
    parser.add_argument("--log-level", default=os.environ.get("PAGEDSERVE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        env = os.environ.get("PAGEDSERVE_WATCH_NAMESPACES", "")
        args.namespace = [ns.strip() for ns in env.split(",") if ns.strip()]
    return args


async def run(args: argparse.Namespace) -> None:
    config = handlers.OperatorConfig(
        resync_seconds=args.resync_seconds,
        token_path=SERVICE_ACCOUNT_TOKEN if os.path.exists(SERVICE_ACCOUNT_TOKEN) else None,
        connection=in_cluster_connection(),
        prometheus_url=args.prometheus_url,
    )
    runner = await metrics.start_server(args.host, args.metrics_port) if args.metrics_port else None
    try:
        await kopf.operator(
            registry=handlers.make_registry(),
            memo=handlers.Memo(config=config),
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=args.standalone,
            priority=args.priority,
            peering_name=args.peering,
            liveness_endpoint=f"http://{args.host}:{args.health_port}/healthz" if args.health_port else None,
        )
    finally:
        if runner is not None:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pagedserve operator ARGS` (the runtime CLI dispatches here)."""
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.configure(verbose=args.log_level == "debug")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
