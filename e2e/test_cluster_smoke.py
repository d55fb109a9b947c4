"""The local cluster runs a Deployment like a real one: scheduled, probed, served, stopped.

Every assertion checks an answer the cluster gives (the API server's objects, the process table, the
bytes the pod serves) against what the manifest asked for.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.request
from pathlib import Path

from e2e.cluster.client import Cluster, container_pid, in_container, wait_for
from e2e.cluster.daemons import alive

CONTENT = "hello from a pod of the local cluster\n"

MANIFEST = """
apiVersion: v1
kind: ConfigMap
metadata: {{name: web-content}}
data:
  index.html: {content}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: web
        image: python:3.11-slim   # ignored: the node agent runs the command locally
        command: [python, -m, http.server]
        args: ["--bind", "$(POD_IP)", "8080", "--directory", "/srv/www"]
        env:
        - name: POD_IP
          valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /index.html, port: http}}, periodSeconds: 1}}
        livenessProbe: {{httpGet: {{path: /, port: http}}, periodSeconds: 2}}
        volumeMounts: [{{name: content, mountPath: /srv/www, readOnly: true}}]
      volumes: [{{name: content, configMap: {{name: web-content}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_deployment_runs_serves_and_stops(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=MANIFEST.format(content=json.dumps(CONTENT)))
    (pod,) = cluster.wait_ready(namespace, "app=web", timeout_s=90)

    # Scheduled by kube-scheduler onto one of our nodes, with a loopback pod IP from that node's range.
    node = next(n for n in cluster.layout.nodes if n.name == pod["spec"]["nodeName"])
    pod_ip = ipaddress.IPv4Address(pod["status"]["podIP"])
    assert ipaddress.IPv4Address(node.first_pod_ip) <= pod_ip <= ipaddress.IPv4Address(node.last_pod_ip)
    assert pod_ip in ipaddress.IPv4Network("127.0.0.0/8")
    assert pod["status"]["hostIP"] == node.host_ip
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["started"] and "running" in status["state"]

    # The process binds the pod IP it was given through $(POD_IP) and serves the mounted ConfigMap.
    assert _get(f"http://{pod_ip}:8080/index.html") == CONTENT
    pid = container_pid(pod)
    assert alive(pid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"http.server" in cmdline and str(pod_ip).encode() in cmdline

    # The ServiceAccount token sits at the standard path inside the process's own mount namespace, and
    # the API server accepts it as this pod's ServiceAccount.
    token = in_container(pid, "cat", "/var/run/secrets/kubernetes.io/serviceaccount/token")
    review = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}))  # fmt: skip
    user = json.loads(review.stdout)["status"]["user"]
    assert user["username"] == f"system:serviceaccount:{namespace}:default"
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    assert env[b"KUBERNETES_SERVICE_HOST"].decode() == cluster.layout.host
    assert env[b"KUBERNETES_SERVICE_PORT"].decode() == str(cluster.layout.apiserver_port)

    # Through the Service: its ClusterIP (a loopback address) answers via the service proxy.
    url = cluster.service_url(namespace, "web")
    assert ipaddress.IPv4Address(url.split("//")[1].split(":")[0]) in ipaddress.IPv4Network(cluster.layout.service_cidr)
    assert cluster.endpoints(namespace, "web") == [(str(pod_ip), 8080)]
    assert wait_for(lambda: _get(f"{url}/index.html"), 20, "the Service to answer") == CONTENT

    # Deleting the Deployment: SIGTERM, the pod object goes, and so does the process.
    cluster.kubectl("delete", "deployment", "web", "-n", namespace, "--wait=false")
    wait_for(lambda: not cluster.pods(namespace, "app=web"), 30, "the pod object to be deleted")
    assert not alive(pid)
    assert cluster.endpoints(namespace, "web") == []
