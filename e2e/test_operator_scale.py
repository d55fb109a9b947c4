"""Scenario 9 of issue 5: 200 LLMDeployments at 0 replicas (so no runtime process starts) reconciled by the one
chart-installed operator: the time until every child (Deployment, Service, PodDisruptionBudget) exists and
every status is written, and the operator process's memory.

The bounds asserted are generous (CI machines are slow and shared); the figures themselves are printed,
and written as JSON to $PAGEDSERVE_BENCH_OUT when set (bench/results/e2e_scale_200.json was made so).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from e2e import product
from e2e.cluster.client import Cluster, container_pid, wait_for

COUNT = 200
KINDS = ("deployments", "services", "poddisruptionbudgets")
MANAGED = "app.kubernetes.io/managed-by=pagedserve-operator"


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak resident) of one process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def children(cluster: Cluster, namespace: str) -> dict[str, int]:
    items = cluster.get_json(",".join(KINDS), "-n", namespace, "-l", MANAGED)["items"]
    counts = {kind: 0 for kind in ("Deployment", "Service", "PodDisruptionBudget")}
    for item in items:
        counts[item["kind"]] += 1
    return counts


def reconciled(cluster: Cluster, namespace: str) -> int:
    """LLMDeployments whose status reports their current generation, Ready at 0 replicas."""
    items = cluster.get_json("llmd", "-n", namespace)["items"]
    return sum(
        1 for o in items
        if (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
        and o["status"].get("phase") == "Ready"
    )  # fmt: skip


def test_scenario9_200_llmdeployments_at_zero_replicas_reconciled_by_one_operator(
    cluster: Cluster, namespace: str, operator
) -> None:
    (op_pod,) = cluster.ready_pods(product.OPERATOR_NAMESPACE, "app.kubernetes.io/name=pagedserve-operator")
    op_pid = container_pid(op_pod)
    before = memory_kib(op_pid)
    objects = [product.tiny_manifest(f"m{i:03d}", replicas=0) for i in range(COUNT)]

    started = time.monotonic()
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                            "items": objects}))  # fmt: skip
    created_s = time.monotonic() - started
    want = {"Deployment": COUNT, "Service": COUNT, "PodDisruptionBudget": COUNT}
    wait_for(lambda: children(cluster, namespace) == want, 300, f"{COUNT} of each child", interval_s=2)
    children_s = time.monotonic() - started
    wait_for(lambda: reconciled(cluster, namespace) == COUNT, 300, f"{COUNT} statuses Ready", interval_s=2)
    ready_s = time.monotonic() - started
    after = memory_kib(op_pid)
    assert not cluster.pods(namespace), "0 replicas must start no pod"

    # Deleting them all: the operator removes its finalizer from each, the garbage collector the children.
    deleting = time.monotonic()
    cluster.kubectl("delete", "llmd", "--all", "-n", namespace, "--wait=false")
    wait_for(lambda: not cluster.get_json("llmd", "-n", namespace)["items"], 300, "the LLMDeployments to go",
             interval_s=2)  # fmt: skip
    deleted_s = time.monotonic() - deleting

    result = {
        "scenario": "issue 5 scenario 9: LLMDeployments at 0 replicas reconciled by one chart-installed operator",
        "llmdeployments": COUNT,
        "seconds_until_all_children_exist": round(children_s, 1),
        "seconds_until_all_statuses_ready": round(ready_s, 1),
        "seconds_kubectl_create": round(created_s, 1),
        "seconds_until_all_deleted": round(deleted_s, 1),
        "operator_rss_mib_before": round(before["VmRSS"] / 1024, 1),
        "operator_rss_mib_after": round(after["VmRSS"] / 1024, 1),
        "operator_peak_rss_mib": round(after["VmHWM"] / 1024, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": "PAGEDSERVE_BENCH_OUT=bench/results/e2e_scale_200.json "
                   ".venv/bin/python -m pytest e2e/test_operator_scale.py -s",
    }
    print(f"\nscenario 9: {json.dumps(result)}")
    if os.environ.get("PAGEDSERVE_BENCH_OUT"):
        Path(os.environ["PAGEDSERVE_BENCH_OUT"]).write_text(json.dumps(result, indent=2) + "\n")
    # Generous bounds: the chart's memory limit, and minutes where this machine takes seconds.
    assert after["VmHWM"] < 512 * 1024, f"operator peak RSS {after['VmHWM'] // 1024} MiB over the chart's 512Mi"
    assert ready_s < 240, f"{ready_s:.0f}s to reconcile {COUNT} LLMDeployments"
