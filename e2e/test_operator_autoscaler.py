"""Scenario 3 of issue 5 with the operator's own autoscaler (issue 6): load through the Service queues requests,
Prometheus (kubernetes_sd, scraping every 5 s) sees `vllm:num_requests_waiting` rise, the autoscaler scales
the LLMDeployment up through `/scale`; when the load stops it scales back down after its window.

The LLMDeployment serves the tiny model (pods load in seconds) with one sequence per step
(`maxNumSeqs: 1`), so a few concurrent clients keep requests waiting; its scale-down window is shortened
to 15 s in the manifest. Scaling down still waits for one calm 60 s stable window (Knative's, fixed in
the policy): the peak of that window must fit on the replicas that would remain.
"""

from __future__ import annotations

import time

import pytest

from e2e import product
from e2e.cluster.client import Cluster, wait_for

NAME = "auto"
AUTOSCALING = {
    "enabled": True,
    "minReplicas": 1,
    "maxReplicas": 2,
    "targetQueueDepth": 1,
    "scaleDownStabilizationSeconds": 15,
}


@pytest.fixture
def autoscaled(cluster: Cluster, operator) -> str:
    with product.llmd_namespace(cluster, "e2e-autoscale") as namespace:
        manifest = product.tiny_manifest(NAME, replicas=1, autoscaling=AUTOSCALING)
        manifest["spec"]["engine"]["maxNumSeqs"] = 1
        product.apply(cluster, namespace, manifest)
        yield namespace


def waiting_in_prometheus(cluster: Cluster, namespace: str) -> float:
    answer = cluster.prometheus_query(f'sum(vllm:num_requests_waiting{{namespace="{namespace}"}})')
    return float(answer[0]["value"][1]) if answer else -1.0


def events(cluster: Cluster, namespace: str, reason: str) -> list[dict]:
    return product.events(cluster, namespace, NAME, reason)


def test_scenario3_autoscaler_scales_up_on_queue_depth_and_down_after_the_window(
    cluster: Cluster, autoscaled: str
) -> None:
    namespace = autoscaled
    product.wait_phase(cluster, namespace, NAME, "Ready", ready_replicas=1, timeout_s=120)
    # Prometheus scrapes the pod and the autoscaler acts on its (idle) metrics before any load.
    wait_for(lambda: waiting_in_prometheus(cluster, namespace) == 0, 60, "the pod's series in Prometheus")
    wait_for(
        lambda: product.condition(product.llmd(cluster, namespace, NAME), "ScalingActive").get("status") == "True",
        60, "ScalingActive=True",
    )  # fmt: skip
    url = cluster.service_url(namespace, NAME)
    product.wait_serving_completions(url)

    started = time.monotonic()
    with product.Load(url, product.TINY_MODEL, streams=6, max_tokens=48, limit_s=240) as load:
        peak = wait_for(lambda: (w := waiting_in_prometheus(cluster, namespace)) >= 2 and w, 60,
                        "vllm:num_requests_waiting to rise in Prometheus")  # fmt: skip
        queued_after = time.monotonic() - started
        wait_for(lambda: product.llmd(cluster, namespace, NAME)["spec"]["replicas"] == 2, 60,
                 "the autoscaler to scale up")  # fmt: skip
        scaled_up_after = time.monotonic() - started
        product.wait_phase(cluster, namespace, NAME, "Ready", ready_replicas=2, timeout_s=120)
        ready_after = time.monotonic() - started
        time.sleep(5)  # both replicas serve the stream
    stopped = time.monotonic()

    obj = product.llmd(cluster, namespace, NAME)
    (up,) = events(cluster, namespace, "ScaledUp")
    assert "1 -> 2" in up["message"] or "2" in up["message"], up["message"]
    assert obj["status"]["autoscaler"]["currentReplicas"] in (1, 2)
    assert not load.failures(), load.failures()[:3]

    # Load stopped: back to minReplicas once a calm stable window has passed, and not much later.
    wait_for(lambda: product.llmd(cluster, namespace, NAME)["spec"]["replicas"] == 1, 180,
             "the autoscaler to scale down")  # fmt: skip
    scaled_down_after = time.monotonic() - stopped
    assert scaled_down_after >= 15, f"scaled down {scaled_down_after:.0f}s after the load stopped: inside the window"
    product.wait_phase(cluster, namespace, NAME, "Ready", ready_replicas=1, timeout_s=90)
    selector = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=runtime"
    wait_for(lambda: len(cluster.pods(namespace, selector)) == 1, 90, "one runtime pod left")
    assert len(events(cluster, namespace, "ScaledDown")) == 1
    # status.autoscaler reports the spec's replicas as of its last tick: the one after the scale-down says 1.
    wait_for(lambda: (a := product.llmd(cluster, namespace, NAME)["status"]["autoscaler"])["desiredReplicas"] == 1
             and a["currentReplicas"] == 1, 60, "status.autoscaler at 1 desired and current replica")  # fmt: skip
    print(f"\nscenario 3 (autoscaler): queue {peak:.0f} in Prometheus {queued_after:.0f}s after the load started, "
          f"scaled up at {scaled_up_after:.0f}s, 2 Ready at {ready_after:.0f}s; {len(load.results)} requests, "
          f"none failed; scaled down {scaled_down_after:.0f}s after the load stopped")  # fmt: skip
