"""The running operator against a Kubernetes API emulator (kmock): children, idempotence, repair, rollouts."""

from __future__ import annotations

import pytest
from operator_harness import DEPLOYMENTS, LLMD, NS, PDBS, SERVICES, Cluster, eventually, load_yaml

pytestmark = pytest.mark.asyncio


async def test_creates_children_and_reports_status(cluster: Cluster, operator) -> None:
    cluster.llmd(load_yaml("examples/smollm2.yaml"))
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1"))
    await eventually(lambda: cluster.get(SERVICES, "smollm2"))
    await eventually(lambda: cluster.get(PDBS, "smollm2"))
    status = await eventually(lambda: cluster.get(LLMD, "smollm2").get("status"))
    assert status["phase"] in ("Progressing", "Pending")
    await cluster.set_deployment_status("smollm2-tp1")
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["phase"] == "Ready" and s)
    assert status["readyReplicas"] == 1
    assert NS
