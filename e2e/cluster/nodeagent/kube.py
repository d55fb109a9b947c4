"""The node agent's calls to the API server, as a node identity (system:node:<name>).

Everything is plain JSON dicts (the API's own field names), not the client's generated models, so the
pod objects the workers hold are exactly what the API server sent.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .status import rfc3339

log = logging.getLogger("nodeagent.kube")
RETRYABLE = (403, 404)  # the node authorizer learns about a new pod's objects asynchronously


def _json(resp: Any) -> dict:
    return json.loads(resp.data)


class KubeApi:
    def __init__(self, kubeconfig: str, node_name: str) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.retries = 2
        self.client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.client)
        self.coord = client.CoordinationV1Api(self.client)
        self.node_name = node_name
        self._events: queue.Queue[dict] = queue.Queue(maxsize=1000)
        threading.Thread(target=self._event_sender, name="events", daemon=True).start()

    # -- objects a pod refers to --------------------------------------------------------------------
    def _get(self, kind: str, namespace: str, name: str) -> dict | None:
        read = self.core.read_namespaced_config_map if kind == "ConfigMap" else self.core.read_namespaced_secret
        for attempt in range(5):
            try:
                return _json(read(name, namespace, _preload_content=False))
            except ApiException as err:
                if err.status not in RETRYABLE:
                    raise
                if attempt == 4:
                    return None
                time.sleep(0.2 * (attempt + 1))
        return None

    def get_data(self, kind: str, namespace: str, name: str) -> Mapping[str, str] | None:
        obj = self._get(kind, namespace, name)
        if obj is None:
            return None
        if kind == "Secret":
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def get_binary_data(self, kind: str, namespace: str, name: str) -> Mapping[str, bytes] | None:
        obj = self._get(kind, namespace, name)
        if obj is None:
            return None
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def request_token(self, pod: dict, audience: str | None, expiration_seconds: int) -> tuple[str, float]:
        """A token of the pod's ServiceAccount bound to the pod (dies with it), via TokenRequest."""
        meta = pod["metadata"]
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else None,
                "expirationSeconds": max(expiration_seconds, 600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            },
        }
        sa = pod["spec"].get("serviceAccountName") or "default"
        for attempt in range(10):
            try:
                resp = self.core.create_namespaced_service_account_token(
                    sa, meta["namespace"], body, _preload_content=False
                )
                status = _json(resp)["status"]
                return status["token"], time.time() + expiration_seconds
            except ApiException as err:
                if err.status not in RETRYABLE or attempt == 9:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def list_services(self, namespace: str) -> list[dict]:
        return _json(self.core.list_namespaced_service(namespace, _preload_content=False))["items"]

    # -- pods ---------------------------------------------------------------------------------------
    def list_pods(self) -> dict:
        return _json(
            self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node_name}", _preload_content=False
            )
        )

    def read_pod(self, namespace: str, name: str) -> dict:
        return _json(self.core.read_namespaced_pod(name, namespace, _preload_content=False))

    def replace_pod_status(self, pod: dict) -> dict:
        meta = pod["metadata"]
        return _json(
            self.core.replace_namespaced_pod_status(meta["name"], meta["namespace"], pod, _preload_content=False)
        )

    def delete_pod_now(self, pod: dict) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body, grace_period_seconds=0)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    # -- events ---------------------------------------------------------------------------------------
    def event(self, pod: dict, kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        now = rfc3339(time.time())
        ev = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }  # fmt: skip
        try:
            self._events.put_nowait(ev)
        except queue.Full:
            pass

    def _event_sender(self) -> None:
        while True:
            ev = self._events.get()
            try:
                self.core.create_namespaced_event(ev["metadata"]["namespace"], ev, _preload_content=False)
            except Exception as err:  # events are best effort, like the kubelet's
                log.debug("event dropped: %s", err)
