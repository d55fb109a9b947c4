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
