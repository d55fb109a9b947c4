"""The autoscaler inside the running operator, against the kmock API emulator and a fake metrics source.

What is checked is what the API server receives: a PATCH of the `/scale` subresource for replicas, a spec
patch for the TP degree (then the blue/green Deployment from the reconcile pass), status.autoscaler and
the ScalingActive condition, the events, and the decision counter on the operator's /metrics registry.
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
from operator_harness import DEPLOYMENTS, LLMD, NS, Cluster, eventually, load_yaml
from operator_thread import OperatorThread

from pagedserve.operator import metrics
from pagedserve.operator.prometheus import PodMetrics

pytestmark = pytest.mark.asyncio


class FakeMetrics:
    """Stands in for Prometheus; the test sets what the pods report. (Read from the operator's thread.)"""

    def __init__(self) -> None:
        self.waiting, self.kv, self.age = 0.0, 0.5, 0.0
        self.asked: list[tuple[str, str, int]] = []

    async def pod_metrics(self, namespace: str, name: str, tp: int) -> PodMetrics:
        self.asked.append((namespace, name, tp))
        now = time.time()
        return PodMetrics(waiting=self.waiting, running=3.0, kv_cache_usage=self.kv, pods_reporting=1,
                          sample_time=now - self.age, query_time=now)

    async def close(self) -> None:
        pass


@pytest_asyncio.fixture()
async def scaled(cluster: Cluster) -> AsyncIterator[tuple[OperatorThread, FakeMetrics]]:
    fake = FakeMetrics()
    op = OperatorThread(str(cluster.server.url))
    op.memo.config = replace(op.memo.config, autoscale_interval_seconds=0.2, prometheus_url="http://prometheus:9090",
                             metrics_source=lambda url: fake)
    await op.start()
    try:
        yield op, fake
    finally:
        await op.stop()


def autoscaled_manifest(**autoscaling) -> dict:
    manifest = copy.deepcopy(load_yaml("examples/smollm2.yaml"))
    manifest["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 4, **autoscaling}
    return manifest


def scale_patches(cluster: Cluster) -> list[dict]:
    return [r.data for r in list(cluster.server)
            if r.method == "PATCH" and r.url.path.endswith("/llmdeployments/smollm2/scale")]


async def ready(cluster: Cluster, manifest: dict) -> None:
    cluster.llmd(manifest)
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1"))
    await cluster.set_deployment_status("smollm2-tp1")
    await eventually(lambda: cluster.get(LLMD, "smollm2").get("status", {}).get("phase") == "Ready")


async def test_queue_scales_up_through_the_scale_subresource(cluster: Cluster, scaled) -> None:
    _, fake = scaled
    before = metrics.REGISTRY.get_sample_value("pagedserve_operator_autoscaler_decisions_total",
                                               {"action": "scale_up", "reason": "Panic"}) or 0
    fake.waiting, fake.kv = 0.0, 0.8  # on target: nothing happens
    await ready(cluster, autoscaled_manifest())
    await eventually(lambda: cluster.get(LLMD, "smollm2")["status"]["autoscaler"]["lastDecisionReason"]
                     == "WithinTolerance")
    assert scale_patches(cluster) == []

    # 10 waiting on 1 replica, target 4: ceil(10 / 4) = 3, twice the ready replicas or more: panic, step limit 2.
    fake.waiting = 10.0
    await eventually(lambda: cluster.get(LLMD, "smollm2")["spec"]["replicas"] == 2)
    assert scale_patches(cluster)[0]["spec"] == {"replicas": 2}  # (the emulator adds the generation bump)
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1")["spec"]["replicas"] == 2)
    status = await eventually(lambda: (a := cluster.get(LLMD, "smollm2")["status"]["autoscaler"])["lastDecision"]
                              == "scale_up" and a)
    assert (status["desiredReplicas"], status["lastDecisionReason"]) == (2, "Panic")
    # Ticks are 0.2 s apart here, so both windows still hold the earlier readings of 0 waiting.
    assert 0 < status["metrics"]["waiting"] <= 10 and status["metrics"]["panic_desired"] >= 2
    assert status["metrics"]["panic"] == 1 and status["lastChangeTime"]
    events = await eventually(lambda: [e for e in cluster.events() if e.get("reason") == "ScaledUp"])
    assert "-> 2 replicas" in events[0]["message"]
    after = metrics.REGISTRY.get_sample_value("pagedserve_operator_autoscaler_decisions_total",
                                              {"action": "scale_up", "reason": "Panic"})
    assert after == before + 1
    assert all(asked == (NS, "smollm2", 1) for asked in fake.asked)

    # Still panicking (a stable window long): the next step goes on to the 3 that 10 waiting need, no further.
    await eventually(lambda: cluster.get(LLMD, "smollm2")["spec"]["replicas"] == 3)
    assert [p["spec"]["replicas"] for p in scale_patches(cluster)] == [2, 3]


async def test_stale_metrics_hold_and_say_so(cluster: Cluster, scaled) -> None:
    _, fake = scaled
    fake.waiting, fake.kv, fake.age = 50.0, 1.0, 120.0  # heavy load, but two minutes old
    await ready(cluster, autoscaled_manifest())
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"]).get("autoscaler") and s)
    assert status["autoscaler"]["lastDecision"] == "hold"
    assert status["autoscaler"]["lastDecisionReason"] == "MetricsStale"
    cond = next(c for c in status["conditions"] if c["type"] == "ScalingActive")
    assert (cond["status"], cond["reason"]) == ("False", "MetricsStale")
    assert {"Ready", "Progressing", "Degraded"} <= {c["type"] for c in status["conditions"]}
    assert scale_patches(cluster) == [] and cluster.get(LLMD, "smollm2")["spec"]["replicas"] == 1

    fake.age = 0.0  # fresh again: it acts, and the condition turns True
    await eventually(lambda: cluster.get(LLMD, "smollm2")["spec"]["replicas"] == 2)
    await eventually(lambda: next(c for c in cluster.get(LLMD, "smollm2")["status"]["conditions"]
                                  if c["type"] == "ScalingActive")["status"] == "True")


async def test_tp_steps_up_when_replicas_are_exhausted(cluster: Cluster, scaled) -> None:
    _, fake = scaled
    # No 2-minute pressure window in a test (the spec sets it to 0): the policy's timing is tested on its own.
    fake.waiting, fake.kv = 6.0, 0.95
    await ready(cluster, autoscaled_manifest(maxReplicas=1, allowedTensorParallelSizes=[1, 2], gpuBudget=4,
                                             numKeyValueHeads=3, numAttentionHeads=9,
                                             tensorParallelUpWindowSeconds=0))
    # SmolLM2-135M's 3 KV heads split neither 2 ways nor replicate 2 ways: no TP change.
    await eventually(lambda: cluster.get(LLMD, "smollm2")["status"]["autoscaler"]["lastDecisionReason"]
                     == "AtMaxReplicas")
    await cluster.edit_spec("smollm2", {"autoscaling": {"numKeyValueHeads": 8, "numAttentionHeads": 32}})
    await eventually(lambda: cluster.get(LLMD, "smollm2")["spec"]["tensorParallelSize"] == 2)
    assert cluster.get(LLMD, "smollm2")["spec"]["replicas"] == 1
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp2"))  # blue/green: the reconcile pass
    events = await eventually(lambda: [e for e in cluster.events() if e.get("reason") == "TensorParallelIncreased"])
    assert "TP 2 x 1" in events[0]["message"]
    # While the switch runs, the metrics read are the serving degree's, and TP holds.
    status = cluster.get(LLMD, "smollm2")["status"]
    assert status["autoscaler"]["desiredTensorParallelSize"] == 2
    assert (NS, "smollm2", 1) in fake.asked
