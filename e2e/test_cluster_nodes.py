"""Node behaviour the product relies on: GPU scheduling, liveness restarts, Prometheus discovery."""

from __future__ import annotations

import json
import time
from pathlib import Path

from e2e.cluster.client import Cluster, container_pid, in_container, wait_for


def _sleeper(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "gpu"}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "main", "image": "ignored", "command": ["sleep", "600"],
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }],
        },
    }  # fmt: skip


def test_gpu_requests_are_scheduled_against_node_capacity(cluster: Cluster, namespace: str) -> None:
    """Two nodes x 4 GPUs: two 3-GPU pods fit (one per node), a third stays Pending as Unschedulable."""
    for name in ("gpu-a", "gpu-b", "gpu-c"):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_sleeper(name, 3)))
    running = cluster.wait_ready(namespace, "app=gpu", count=2, timeout_s=60)
    assert sorted(p["spec"]["nodeName"] for p in running) == ["node-a", "node-b"]

    def unschedulable() -> bool:
        pending = [p for p in cluster.pods(namespace, "app=gpu") if p["metadata"]["name"] not in {r["metadata"]["name"] for r in running}]
        conds = pending[0]["status"].get("conditions", []) if pending else []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    wait_for(unschedulable, 30, "the third pod to be reported Unschedulable by kube-scheduler")

    # Each running pod sees the GPUs the node agent assigned, as the NVIDIA device plugin would tell it.
    for pod in running:
        environ = Path(f"/proc/{container_pid(pod)}/environ").read_bytes().split(b"\0")
        assert b"NVIDIA_VISIBLE_DEVICES=0,1,2" in environ


LIVENESS_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "flaky", "labels": {"app": "flaky"}},
    "spec": {
        "terminationGracePeriodSeconds": 2,
        "initContainers": [{
            "name": "seed", "image": "ignored", "command": ["sh", "-c", "echo ok > /srv/data/alive"],
            "volumeMounts": [{"name": "data", "mountPath": "/srv/data"}],
        }],
        "containers": [{
            "name": "web", "image": "ignored",
            "command": ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080", "--directory", "/srv/data"],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "startupProbe": {"httpGet": {"path": "/alive", "port": 8080}, "periodSeconds": 1, "failureThreshold": 60},
            "livenessProbe": {"httpGet": {"path": "/alive", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2},
            "readinessProbe": {"httpGet": {"path": "/alive", "port": 8080}, "periodSeconds": 1},
            "volumeMounts": [{"name": "data", "mountPath": "/srv/data"}],
        }],
        "volumes": [{"name": "data", "emptyDir": {}}],
    },
}  # fmt: skip


def test_failing_liveness_probe_restarts_the_container(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(LIVENESS_POD))
    (pod,) = cluster.wait_ready(namespace, "app=flaky")
    first_pid = container_pid(pod)
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0

    # Remove the file the probes fetch, from inside the container's view of the emptyDir.
    in_container(first_pid, "rm", "/srv/data/alive")

    def restarted() -> dict | None:
        p = cluster.get_json("pod", "flaky", "-n", namespace)
        status = p["status"]["containerStatuses"][0]
        return p if status["restartCount"] >= 1 and status.get("lastState", {}).get("terminated") else None

    after = wait_for(restarted, 45, "a liveness restart")
    last = after["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] in (143, 137)  # SIGTERM, or SIGKILL after the grace period
    events = cluster.get_json("events", "-n", namespace, "--field-selector", "involvedObject.name=flaky")["items"]
    assert any(e["reason"] == "Unhealthy" and "Liveness" in e["message"] for e in events)
    # The restarted process serves nothing (the file is gone): its startup probe keeps failing, so it is
    # not started, liveness does not run yet (no second restart within the startup budget), not Ready.
    time.sleep(4)
    pod = cluster.get_json("pod", "flaky", "-n", namespace)
    status = pod["status"]["containerStatuses"][0]
    assert status["started"] is False and status["restartCount"] == after["status"]["containerStatuses"][0]["restartCount"]
    assert not any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])


METRICS_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "exporter",
        "labels": {"app": "exporter"},
        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": "/metrics.txt"},
    },
    "spec": {
        "terminationGracePeriodSeconds": 2,
        # Prometheus 3 insists on a text Content-Type: http.server gives text/plain for .txt files.
        "containers": [{
            "name": "main", "image": "ignored",
            "command": ["sh", "-c", "mkdir -p /tmp/m && printf 'pagedserve_e2e_answer 42\\n' > /tmp/m/metrics.txt && "
                        "exec python -m http.server --bind \"$POD_IP\" 9400 --directory /tmp/m"],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "readinessProbe": {"httpGet": {"path": "/metrics.txt", "port": 9400}, "periodSeconds": 1},
        }],
    },
}  # fmt: skip


def test_prometheus_discovers_pods_through_the_api_server(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(METRICS_POD))
    (pod,) = cluster.wait_ready(namespace, "app=exporter")
    query = f'pagedserve_e2e_answer{{namespace="{namespace}"}}'
    (sample,) = wait_for(lambda: cluster.prometheus_query(query), 60, "Prometheus to scrape the pod")
    assert sample["value"][1] == "42"
    assert sample["metric"]["pod"] == "exporter" and sample["metric"]["app"] == "exporter"
    assert sample["metric"]["instance"] == f"{pod['status']['podIP']}:9400"
