"""RBAC is really enforced: a pod's ServiceAccount gets exactly the rights its Role grants.

The pod runs the official Python client's in-cluster login (as the operator will), so this also checks
the token mount, the CA bundle and the KUBERNETES_SERVICE_* variables the node agent provides.
"""

from __future__ import annotations

import json

import pytest

from e2e.cluster.client import Cluster, wait_for

# Lists pods of its own namespace with in-cluster credentials; prints the HTTP status it got.
PROBE = """
import sys
from kubernetes import client, config
config.load_incluster_config()
ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
try:
    client.CoreV1Api().list_namespaced_pod(ns)
    print("status=200")
except client.exceptions.ApiException as err:
    print(f"status={err.status}")
"""


def _run_probe_pod(cluster: Cluster, namespace: str, name: str, service_account: str) -> str:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": service_account,
            "restartPolicy": "Never",
            "containers": [{"name": "probe", "image": "ignored", "command": ["python", "-c", PROBE]}],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    phase = wait_for(
        lambda: cluster.get_json("pod", name, "-n", namespace)["status"].get("phase") in ("Succeeded", "Failed")
        and cluster.get_json("pod", name, "-n", namespace)["status"]["phase"],
        60,
        f"pod {name} to finish",
    )
    assert phase == "Succeeded"
    log = next((cluster.layout.root / "nodes").glob(f"*/pods/{namespace}_{name}_*/logs/probe/0.log"))
    return log.read_text().strip().splitlines()[-1]


def test_service_account_without_rights_is_refused(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    assert _run_probe_pod(cluster, namespace, "before-grant", "nobody") == "status=403"

    # The API server's own authorizer agrees, asked directly.
    can = cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace,
                          f"--as=system:serviceaccount:{namespace}:nobody", check=False)  # fmt: skip
    assert can.stdout.strip() == "no"

    cluster.kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "nobody-reads", "--role=pod-reader",
                    f"--serviceaccount={namespace}:nobody", "-n", namespace)  # fmt: skip
    assert _run_probe_pod(cluster, namespace, "after-grant", "nobody") == "status=200"


@pytest.mark.parametrize("verb", ["get", "list"])
def test_node_identity_cannot_read_secrets_of_other_nodes_pods(cluster: Cluster, namespace: str, verb: str) -> None:
    """The Node authorizer is on: a node may only read what pods bound to it reference."""
    cluster.kubectl("create", "secret", "generic", "unrelated", "--from-literal=k=v", "-n", namespace)
    args = ["get", "secrets", "-n", namespace] if verb == "list" else ["get", "secret", "unrelated", "-n", namespace]
    denied = cluster.kubectl(*args, "--as=system:node:node-a", "--as-group=system:nodes", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
