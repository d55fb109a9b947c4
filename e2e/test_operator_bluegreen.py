"""Tensor-parallel changes on the real control plane (issue 5, scenarios 5 and 7): blue/green under a constant
request stream, and an operator restarted in the middle of one.

The LLMDeployment serves the tiny random Llama of `product.prepare_tiny_model_dir()` (4 query, 2 KV heads),
which TP 2 can split and a pod loads in seconds; TP 2 runs as two CPU processes joined by gloo. The two tests
share it and run in file order: 5 switches TP 1 -> 2, 7 switches back to 1 while the operator is restarted.
"""

from __future__ import annotations

import json
import time

import pytest

from e2e import product
from e2e.cluster.client import Cluster, container_pid, wait_for
from e2e.cluster.daemons import alive

NAME = "tiny"
OPERATOR_SELECTOR = "app.kubernetes.io/name=pagedserve-operator"


@pytest.fixture(scope="module")
def tiny(cluster: Cluster, operator) -> str:
    """A namespace holding `tiny` at TP 1, Ready; removed at the end of the module."""
    with product.llmd_namespace(cluster, "e2e-bluegreen") as namespace:
        product.apply(cluster, namespace, product.tiny_manifest(NAME, tensorParallelSize=1))
        product.wait_phase(cluster, namespace, NAME, "Ready", ready_replicas=1, timeout_s=120)
        yield namespace


def deployments(cluster: Cluster, namespace: str) -> dict[str, dict]:
    return product.runtime_deployments(cluster, namespace, NAME)


def service_tp(cluster: Cluster, namespace: str) -> str:
    return product.service_tp(cluster, namespace, NAME)


def runtime_pods(cluster: Cluster, namespace: str, tp: int) -> list[dict]:
    return product.runtime_pods(cluster, namespace, NAME, tp)


def set_tp(cluster: Cluster, namespace: str, tp: int) -> None:
    cluster.kubectl("patch", "llmd", NAME, "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"tensorParallelSize": tp}}))  # fmt: skip


def wait_switched(cluster: Cluster, namespace: str, old_tp: int, new_tp: int, timeout_s: float = 180) -> dict:
    return product.wait_tp_switched(cluster, namespace, NAME, old_tp, new_tp, timeout_s)


def test_scenario5_tp_change_is_blue_green_with_zero_failed_requests(cluster: Cluster, tiny: str) -> None:
    url = cluster.service_url(tiny, NAME)
    product.wait_serving_completions(url)
    (blue_pod,) = runtime_pods(cluster, tiny, 1)
    blue_pid = container_pid(blue_pod)
    started = time.monotonic()
    with product.Load(url, product.TINY_MODEL, streams=2) as load:
        time.sleep(2)
        set_tp(cluster, tiny, 2)
        # Blue/green: the TP 2 Deployment runs beside the serving TP 1 one until its pods are Ready.
        both = wait_for(lambda: len(d := deployments(cluster, tiny)) == 2 and d, 30, "the green Deployment")
        assert set(both) == {f"{NAME}-tp1", f"{NAME}-tp2"}
        assert service_tp(cluster, tiny) == "1", "traffic moved before the green pods were Ready"
        obj = wait_switched(cluster, tiny, old_tp=1, new_tp=2)
        time.sleep(2)  # requests after the switch, served by TP 2 only
    switched_after = time.monotonic() - started

    assert service_tp(cluster, tiny) == "2"
    assert obj["spec"]["tensorParallelSize"] == 2 and obj["status"]["readyReplicas"] == 1
    assert "targetTensorParallelSize" not in obj["status"]
    (green_pod,) = runtime_pods(cluster, tiny, 2)
    args = green_pod["spec"]["containers"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    wait_for(lambda: not alive(blue_pid), 30, "the TP 1 runtime process to stop")
    failures = load.failures()
    assert len(load.results) >= 10 and not failures, f"{len(failures)} of {len(load.results)} failed: {failures[:3]}"
    print(f"\nscenario 5: TP 1 -> 2 switched and old Deployment gone {switched_after:.0f}s after the patch; "
          f"{len(load.results)} requests, none failed")  # fmt: skip


def test_scenario7_operator_restarted_mid_rollout_finishes_it(cluster: Cluster, tiny: str) -> None:
    product.wait_phase(cluster, tiny, NAME, "Ready", ready_replicas=1)
    assert service_tp(cluster, tiny) == "2"
    (old_operator,) = cluster.ready_pods(product.OPERATOR_NAMESPACE, OPERATOR_SELECTOR)
    old_operator_pid = container_pid(old_operator)
    url = cluster.service_url(tiny, NAME)
    started = time.monotonic()
    with product.Load(url, product.TINY_MODEL, streams=2) as load:
        time.sleep(1)
        set_tp(cluster, tiny, 1)
        wait_for(lambda: f"{NAME}-tp1" in deployments(cluster, tiny), 30, "the green Deployment")
        # The rollout is under way (both generations exist, TP 2 still serves): restart the operator now.
        assert service_tp(cluster, tiny) == "2" and len(deployments(cluster, tiny)) == 2
        cluster.kubectl("delete", "pod", old_operator["metadata"]["name"], "-n", product.OPERATOR_NAMESPACE,
                        "--wait=false")  # fmt: skip
        wait_for(lambda: not alive(old_operator_pid), 60, "the old operator process to stop")
        step_at_restart = f"serving TP {service_tp(cluster, tiny)}, Deployments {sorted(deployments(cluster, tiny))}"
        new_operator = wait_for(
            lambda: [p for p in cluster.ready_pods(product.OPERATOR_NAMESPACE, OPERATOR_SELECTOR)
                     if p["metadata"]["uid"] != old_operator["metadata"]["uid"]],
            90, "the chart's Deployment to bring a new operator pod",
        )  # fmt: skip
        obj = wait_switched(cluster, tiny, old_tp=2, new_tp=1)
        time.sleep(2)
    finished_after = time.monotonic() - started

    assert len(new_operator) == 1
    assert service_tp(cluster, tiny) == "1" and obj["status"]["readyReplicas"] == 1
    assert set(deployments(cluster, tiny)) == {f"{NAME}-tp1"}
    failures = load.failures()
    assert len(load.results) >= 10 and not failures, f"{len(failures)} of {len(load.results)} failed: {failures[:3]}"
    print(f"\nscenario 7: operator restarted while {step_at_restart}; TP 2 -> 1 finished {finished_after:.0f}s "
          f"after the patch; {len(load.results)} requests, none failed")  # fmt: skip
