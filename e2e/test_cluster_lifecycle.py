"""Termination as the kubelet does it, and a Helm-installed controller running on its ServiceAccount.

The chart test is the pattern the operator's chart follows: ServiceAccount + Role + Deployment whose
process logs in with the mounted token and works through the API, only as far as its Role allows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from e2e.cluster.client import Cluster, container_pid, wait_for
from e2e.cluster.daemons import alive

STUBBORN = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "stubborn", "labels": {"app": "stubborn"}},
    "spec": {
        "terminationGracePeriodSeconds": 3,
        "containers": [{
            "name": "main", "image": "ignored",
            "command": ["python", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                        "print('ready', flush=True); time.sleep(600)"],
            "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo prestop > $MARKER"]}}},
            "env": [{"name": "MARKER", "value": "/tmp/pagedserve-e2e-prestop-$(HOSTNAME)"}],
        }],
    },
}  # fmt: skip


def test_sigterm_ignored_means_sigkill_after_the_grace_period(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(STUBBORN))
    (pod,) = cluster.wait_ready(namespace, "app=stubborn")
    pid = container_pid(pod)
    marker = Path("/tmp/pagedserve-e2e-prestop-stubborn")
    marker.unlink(missing_ok=True)

    started = time.monotonic()
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    wait_for(lambda: not alive(pid), 15, "the process to be killed")
    killed_after = time.monotonic() - started
    wait_for(lambda: not cluster.pods(namespace, "app=stubborn"), 15, "the pod object to go")
    assert 2.5 <= killed_after <= 8, f"SIGKILL came {killed_after:.1f}s after deletion; grace period is 3s"
    assert marker.read_text().strip() == "prestop"
    marker.unlink()


CHART_YAML = """apiVersion: v2
name: mini-operator
version: 0.1.0
kubeVersion: ">=1.30.0-0"
"""

TEMPLATE = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: {{ .Release.Name }}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: {{ .Release.Name }}}
rules:
- {apiGroups: [""], resources: [configmaps], verbs: [get, list, watch, create, update]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: {{ .Release.Name }}}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: {{ .Release.Name }}}
subjects: [{kind: ServiceAccount, name: {{ .Release.Name }}, namespace: {{ .Release.Namespace }}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: {{ .Release.Name }}}
spec:
  replicas: 1
  selector: {matchLabels: {app: {{ .Release.Name }}}}
  template:
    metadata: {labels: {app: {{ .Release.Name }}}}
    spec:
      serviceAccountName: {{ .Release.Name }}
      terminationGracePeriodSeconds: 5
      containers:
      - name: controller
        image: example.invalid/mini-operator:0.1.0
        command: [python, -c, {{ .Values.program | quote }}]
"""

# Watches ConfigMaps named greeting-*, and records what it saw in ConfigMap "seen" (a tiny reconcile).
PROGRAM = """
from kubernetes import client, config, watch
config.load_incluster_config()
ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
api = client.CoreV1Api()
seen = set()
for ev in watch.Watch().stream(api.list_namespaced_config_map, ns):
    name = ev["object"].metadata.name
    if not name.startswith("greeting-") or name in seen:
        continue
    seen.add(name)
    body = {"metadata": {"name": "seen"}, "data": {"names": ",".join(sorted(seen))}}
    try:
        api.replace_namespaced_config_map("seen", ns, body)
    except client.exceptions.ApiException:
        api.create_namespaced_config_map(ns, body)
"""


def test_helm_chart_controller_runs_on_its_service_account(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "mini-operator"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(CHART_YAML)
    (chart / "templates" / "all.yaml").write_text(TEMPLATE)
    (chart / "values.yaml").write_text(json.dumps({"program": PROGRAM}))
    cluster.helm("install", "mini", str(chart), "-n", namespace, "--wait", "--timeout", "90s")
    (pod,) = cluster.wait_ready(namespace, "app=mini")
    pid = container_pid(pod)

    cluster.kubectl("create", "configmap", "greeting-hello", "--from-literal=x=1", "-n", namespace)
    seen = wait_for(lambda: cluster.get_json("configmap", "seen", "-n", namespace)["data"]["names"], 30,
                    "the controller to record the ConfigMap")  # fmt: skip
    assert seen == "greeting-hello"

    # Its Role covers ConfigMaps only: the same token may not read Secrets.
    can = cluster.kubectl("auth", "can-i", "list", "secrets", "-n", namespace,
                          f"--as=system:serviceaccount:{namespace}:mini", check=False)  # fmt: skip
    assert can.stdout.strip() == "no"
    assert cluster.helm("list", "-n", namespace, "-q").stdout.split() == ["mini"]

    cluster.helm("uninstall", "mini", "-n", namespace, "--wait", "--timeout", "60s")
    wait_for(lambda: not cluster.pods(namespace, "app=mini"), 30, "the controller pod to go")
    assert not alive(pid)


ROLLING = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: roll}
spec:
  replicas: 2
  strategy: {rollingUpdate: {maxUnavailable: 0, maxSurge: 1}}
  selector: {matchLabels: {app: roll}}
  template:
    metadata: {labels: {app: roll}}
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: web
        image: ignored
        command: [python, -m, http.server, --bind, $(POD_IP), "8080", --directory, /tmp]
        env:
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        - {name: VERSION, value: "%s"}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
        lifecycle: {preStop: {sleep: {seconds: 2}}}
---
apiVersion: v1
kind: Service
metadata: {name: roll}
spec:
  selector: {app: roll}
  ports: [{port: 80, targetPort: http}]
"""


def test_rolling_update_through_the_service_drops_no_request(cluster: Cluster, namespace: str) -> None:
    """Ready-gated endpoints plus a preStop pause: clients of the Service see no failure in a rollout."""
    import threading
    import urllib.request

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ROLLING % "1")
    old = {p["metadata"]["name"] for p in cluster.wait_ready(namespace, "app=roll", count=2)}
    url = cluster.service_url(namespace, "roll")
    wait_for(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 20, "the Service")
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 90  # bounded, whatever happens to the test
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    results.append("ok" if resp.status == 200 else f"status {resp.status}")
            except Exception as err:
                results.append(f"error {err}")
            time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ROLLING % "2")
        cluster.kubectl("rollout", "status", "deployment/roll", "-n", namespace, "--timeout=60s")
        wait_for(lambda: not ({p["metadata"]["name"] for p in cluster.pods(namespace, "app=roll")} & old), 30,
                 "the old pods to be gone")  # fmt: skip
        time.sleep(1)
    finally:
        stop.set()
        worker.join()
    failures = [r for r in results if r != "ok"]
    assert len(results) > 50 and not failures, f"{len(failures)} of {len(results)} failed: {failures[:3]}"
