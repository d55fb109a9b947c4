"""Issue 6's TP step-up on the real control plane: replicas exhausted (minReplicas = maxReplicas = 1), the KV
cache full and requests queueing, so the operator's autoscaler raises the tensor-parallel degree 1 -> 2 and
its blue/green path carries the change out (new generation Ready, Service switched, old generation gone).

The tiny Llama (4 query, 2 KV heads: TP 2 splits them; TP 2 is two CPU processes joined by gloo) serves with
a 128-token KV cache, so eight client streams of 100-token completions keep it full and the rest queued.
Measured on the runtime alone before writing this (`pagedserve serve` with the same flags, 8 streams, 40
readings of /metrics 0.5 s apart): KV use 0.625..1.0 and 2..7 waiting in every reading, so a 0.5 target
counts as pinned on every tick. The windows are shortened through the spec: a 10 s stable window (shorter
than the operator's 15 s tick, so each tick's reading stands alone) and a 15 s up-window, so the step comes
on the second pinned tick in a row; the down-window (1 h) and cooldown keep TP 2 while the test looks.
"""

from __future__ import annotations

import calendar
import json
import re
import time

import pytest

from e2e import product
from e2e.cluster.client import Cluster, container_pid, wait_for
from e2e.cluster.daemons import alive

NAME = "tpauto"
TARGET_KV = 0.5
UP_WINDOW_S = 15


def autoscaling() -> dict:
    config = json.loads((product.prepare_tiny_model_dir() / "config.json").read_text())
    return {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 1,  # replicas are exhausted from the start: more load can only be met by a larger degree
        "targetQueueDepth": 1,
        "targetKvCacheUsage": TARGET_KV,
        "allowedTensorParallelSizes": [1, 2],
        "gpuBudget": 3,  # the switch runs 1 x TP 1 beside 1 x TP 2: exactly 3 GPUs
        "numKeyValueHeads": config["num_key_value_heads"],
        "numAttentionHeads": config["num_attention_heads"],
        "stableWindowSeconds": 10,
        "tensorParallelUpWindowSeconds": UP_WINDOW_S,
        "tensorParallelDownWindowSeconds": 3600,
        "tensorParallelCooldownSeconds": 600,
    }


@pytest.fixture
def pinned(cluster: Cluster, operator) -> str:
    with product.llmd_namespace(cluster, "e2e-autoscale-tp") as namespace:
        manifest = product.tiny_manifest(NAME, replicas=1, tensorParallelSize=1, autoscaling=autoscaling())
        manifest["spec"]["engine"].update({"maxModelLen": 128, "numKvCacheTokens": 128})
        product.apply(cluster, namespace, manifest)
        yield namespace


def autoscaler_status(cluster: Cluster, namespace: str) -> dict:
    return product.llmd(cluster, namespace, NAME).get("status", {}).get("autoscaler") or {}


def samples_before(cluster: Cluster, namespace: str, metric: str, tp: int, stamp: str) -> list[float]:
    """Every value Prometheus scraped of `metric` from the TP `tp` pods in the 30 s up to just after `stamp`."""
    at = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) + 3
    answer = cluster.prometheus_query(f'{metric}{{namespace="{namespace}",pod=~"{NAME}-tp{tp}-.+"}}[30s]', at=at)
    return [float(v) for series in answer for _, v in series["values"]]


def test_tp_steps_up_when_replicas_are_exhausted(cluster: Cluster, pinned: str) -> None:
    namespace = pinned
    product.wait_phase(cluster, namespace, NAME, "Ready", ready_replicas=1, timeout_s=120)
    wait_for(lambda: autoscaler_status(cluster, namespace).get("lastDecisionReason") == "AtMinReplicas", 90,
             "the autoscaler to read the idle pod's metrics")  # fmt: skip
    url = cluster.service_url(namespace, NAME)
    product.wait_serving_completions(url)
    (blue_pod,) = product.runtime_pods(cluster, namespace, NAME, 1)
    blue_pid = container_pid(blue_pod)

    started = time.monotonic()
    with product.Load(url, product.TINY_MODEL, streams=8, max_tokens=100, limit_s=300) as load:
        # Caught between its tick and the next, which reports the rollout's hold instead.
        decided = wait_for(lambda: (a := autoscaler_status(cluster, namespace)).get("lastDecision") == "tp_up" and a,
                           150, "the autoscaler to decide tp_up", interval_s=0.3)  # fmt: skip
        decided_after = time.monotonic() - started
        spec = product.llmd(cluster, namespace, NAME)["spec"]
        # Blue/green: the TP 2 Deployment runs beside the serving TP 1 one until its pod is Ready.
        both = wait_for(lambda: len(d := product.runtime_deployments(cluster, namespace, NAME)) == 2 and d, 30,
                        "the TP 2 Deployment beside the TP 1 one")  # fmt: skip
        serving_while_both = product.service_tp(cluster, namespace, NAME)
        obj = product.wait_tp_switched(cluster, namespace, NAME, old_tp=1, new_tp=2)
        switched_after = time.monotonic() - started
        time.sleep(2)  # requests after the switch, served by TP 2 only

    # The decision, as status.autoscaler explains it.
    assert (spec["tensorParallelSize"], spec["replicas"]) == (2, 1)
    assert decided["lastDecisionReason"] == "ReplicasExhausted", decided
    assert (decided["desiredTensorParallelSize"], decided["desiredReplicas"]) == (2, 1)
    assert (decided["currentTensorParallelSize"], decided["currentReplicas"]) == (1, 1)
    used = decided["metrics"]
    assert used["from_tensor_parallel_size"] == 1
    assert used["kv_cache_usage"] >= TARGET_KV and used["waiting"] > 0, used
    # Those values are what Prometheus had scraped from the TP 1 pod just before the decision.
    assert used["waiting"] in samples_before(cluster, namespace, "vllm:num_requests_waiting", 1,
                                             decided["lastDecisionTime"])  # fmt: skip
    assert used["kv_cache_usage"] in samples_before(cluster, namespace, "vllm:kv_cache_usage_perc", 1,
                                                    decided["lastDecisionTime"])  # fmt: skip
    # Pressure lasted the spec's up-window (not the policy's 120 s default, and not one tick only).
    pressure_s = int(re.search(r"waiting for (\d+)s; TP 2 x 1$", decided["lastDecisionMessage"]).group(1))
    assert UP_WINDOW_S <= pressure_s < 120, decided["lastDecisionMessage"]
    (event,) = product.events(cluster, namespace, NAME, "TensorParallelIncreased")
    assert event["type"] == "Normal" and event["message"] == decided["lastDecisionMessage"]

    # Carried out blue/green: both generations at once with traffic on TP 1, then TP 2 only.
    assert set(both) == {f"{NAME}-tp1", f"{NAME}-tp2"} and serving_while_both == "1"
    assert product.service_tp(cluster, namespace, NAME) == "2"
    assert obj["status"]["readyReplicas"] == 1 and "targetTensorParallelSize" not in obj["status"]
    assert set(product.runtime_deployments(cluster, namespace, NAME)) == {f"{NAME}-tp2"}
    (green_pod,) = product.runtime_pods(cluster, namespace, NAME, 2)
    args = green_pod["spec"]["containers"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    wait_for(lambda: not alive(blue_pid), 30, "the TP 1 runtime process to stop")
    failures = load.failures()
    assert len(load.results) >= 10 and not failures, f"{len(failures)} of {len(load.results)} failed: {failures[:3]}"
    # The autoscaler now reads the TP 2 pod and reports the new degree as current; no TP 1 again.
    after = wait_for(lambda: (a := autoscaler_status(cluster, namespace)).get("currentTensorParallelSize") == 2 and a,
                     60, "status.autoscaler at TP 2")  # fmt: skip
    assert after["desiredTensorParallelSize"] == 2 and after["lastChangeTime"] == decided["lastDecisionTime"]
    assert len(product.events(cluster, namespace, NAME, "TensorParallelIncreased")) == 1
    assert product.events(cluster, namespace, NAME, "TensorParallelDecreased") == []
    print(f"\nTP step-up: tp_up decided {decided_after:.0f}s after the load started ({pressure_s}s of pressure; "
          f"KV use {used['kv_cache_usage']:.2f}, {used['waiting']:.0f} waiting), TP 2 serving and TP 1 gone at "
          f"{switched_after:.0f}s; {len(load.results)} requests, none failed")  # fmt: skip
