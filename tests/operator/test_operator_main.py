"""The `pagedserve operator` entry point and its /metrics endpoint."""

from __future__ import annotations

import aiohttp
import pytest
from operator_harness import DEPLOYMENTS, eventually, load_yaml
from prometheus_client import generate_latest

from pagedserve.operator import main, metrics


def test_cli_defaults_and_namespaces_from_env(monkeypatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_WATCH_NAMESPACES", raising=False)
    args = main.parse_args([])
    assert (args.namespace, args.health_port, args.metrics_port, args.peering) == ([], 8080, 8081,
                                                                                  "pagedserve-operator")
    monkeypatch.setenv("PAGEDSERVE_WATCH_NAMESPACES", "team-a, team-b")
    assert main.parse_args([]).namespace == ["team-a", "team-b"]
    assert main.parse_args(["-n", "x"]).namespace == ["x"]
    assert main.parse_args(["-A"]).namespace == []
    with pytest.raises(SystemExit):
        main.parse_args(["-A", "-n", "x"])


@pytest.mark.asyncio
async def test_metrics_endpoint_counts_reconciles(cluster, operator) -> None:
    cluster.llmd(load_yaml("examples/smollm2.yaml"))
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1"))
    # The pass is counted when it ends, just after its last write.
    await eventually(lambda: b'pagedserve_operator_reconcile_total{result="ok"}' in generate_latest(metrics.REGISTRY))
    runner = await metrics.start_server("127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    ok = [line for line in text.splitlines() if line.startswith('pagedserve_operator_reconcile_total{result="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    created = 'pagedserve_operator_child_writes_total{action="created",kind="Deployment"}'
    assert any(line.startswith(created) and float(line.split()[-1]) >= 1 for line in text.splitlines())
    assert "pagedserve_operator_reconcile_duration_seconds_bucket" in text
