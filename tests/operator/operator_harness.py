"""Helpers for the operator tests: a kmock Kubernetes API emulator standing in for the API server and controllers."""

from __future__ import annotations

import asyncio
import copy
import pathlib
from collections.abc import Callable
from typing import Any

import kmock
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
LLMD = "pagedserve.io/v1alpha1/llmdeployments"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
PDBS = "policy/v1/poddisruptionbudgets"
EVENTS = "v1/events"
NS = "team-a"


def load_yaml(relpath: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / relpath).read_text())


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the bookkeeping the real API server does on writes.

    Creation fills in uid, resourceVersion, generation 1, creationTimestamp and a name from generateName;
    a merge patch that changes `spec` bumps `metadata.generation`. (kmock itself only stores the JSON.)
    """

    _counter = 0

    async def _handle(self, request: Any) -> Any:
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None and request.method == "POST":
            meta = data.setdefault("metadata", {})
            ApiServer._counter += 1
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{ApiServer._counter:05d}"
            meta.setdefault("uid", f"uid-{ApiServer._counter}")
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        elif request.resource is not None and data is not None and request.method == "PATCH" and "spec" in data:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted and data["spec"] is not None:
                current = self.objects[key].raw
                merged = copy.deepcopy(current)
                merged = _merge(merged, {"spec": data["spec"]})
                if merged.get("spec") != current.get("spec"):
                    generation = int(current.get("metadata", {}).get("generation", 1)) + 1
                    data.setdefault("metadata", {})["generation"] = generation
        return await super()._handle(request)


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(base.get(key), value)
    return out


def declare_resources(server: kmock.KubernetesEmulator) -> None:
    verbs = ["get", "list", "watch", "create", "patch", "update", "delete"]
    server.resources[LLMD] = kmock.ResourceInfo(
        kind="LLMDeployment", namespaced=True, verbs=verbs, subresources=["status", "scale"], shortnames=["llmd"]
    )
    server.resources[DEPLOYMENTS] = kmock.ResourceInfo(kind="Deployment", namespaced=True, verbs=verbs,
                                                      subresources=["status", "scale"])
    server.resources[SERVICES] = kmock.ResourceInfo(kind="Service", namespaced=True, verbs=verbs,
                                                   subresources=["status"])
    server.resources[PDBS] = kmock.ResourceInfo(kind="PodDisruptionBudget", namespaced=True, verbs=verbs,
                                               subresources=["status"])
    server.resources[EVENTS] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=verbs)
    # kopf's backbone: it waits for these to be discoverable before it starts watching anything.
    server.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs)
    server.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)


async def eventually(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy without raising; fail with its last error."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
            error: BaseException = AssertionError(f"still falsy: {value!r}")
        except (AssertionError, KeyError, LookupError) as exc:
            error = exc
        if asyncio.get_running_loop().time() > deadline:
            raise error
        await asyncio.sleep(interval)


class Cluster:
    """The emulator plus helpers that stand in for the API server's and controllers' own bookkeeping."""

    def __init__(self, server: kmock.KubernetesEmulator):
        self.server = server
        self._uids = 0

    def get(self, resource: str, name: str, namespace: str = NS) -> dict[str, Any]:
        obj = self.server.objects[resource, namespace, name]
        if obj.deleted:
            raise KeyError(name)
        return copy.deepcopy(obj.raw)

    def exists(self, resource: str, name: str, namespace: str = NS) -> bool:
        try:
            return not self.server.objects[resource, namespace, name].deleted
        except KeyError:
            return False

    def names(self, resource: str, namespace: str = NS) -> list[str]:
        group_version, plural = resource.rsplit("/", 1)
        return sorted(
            name for (res, ns, name), obj in self.server.objects.items()
            if res.plural == plural and ns == namespace and not obj.deleted
        )

    def events(self, namespace: str = NS) -> list[dict[str, Any]]:
        return [copy.deepcopy(obj.raw) for (res, ns, _), obj in self.server.objects.items()
                if res.plural == "events" and ns == namespace and not obj.deleted]

    def llmd(self, manifest: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
        """Store an LLMDeployment as the API server would: uid, generation 1, namespace."""
        self._uids += 1
        obj = copy.deepcopy(manifest)
        obj["metadata"].update(namespace=namespace, uid=f"llmd-uid-{self._uids}", generation=1, resourceVersion="1")
        self.server.objects[LLMD, namespace, obj["metadata"]["name"]] = obj
        return obj

    async def edit_spec(self, name: str, patch: dict[str, Any], namespace: str = NS) -> None:
        """A spec change through the API (the emulator bumps metadata.generation)."""
        url = f"/apis/pagedserve.io/v1alpha1/namespaces/{namespace}/llmdeployments/{name}"
        resp = await self.server.patch(url, json={"spec": patch})
        assert resp.status == 200, await resp.text()

    async def set_deployment_status(self, name: str, namespace: str = NS, *, ready: int | None = None,
                                    updated: int | None = None, total: int | None = None,
                                    progress: str = "NewReplicaSetAvailable") -> None:
        """Play the Deployment controller: `total` pods, `updated` of them on the current template, `ready` Ready.

        The defaults describe a finished rollout: every wanted pod current and Ready.
        """
        dep = self.get(DEPLOYMENTS, name, namespace)
        replicas = dep["spec"]["replicas"]
        ready = replicas if ready is None else ready
        updated = replicas if updated is None else updated
        total = replicas if total is None else total
        generation = int(dep["metadata"].get("generation", 1))
        status = {
            "observedGeneration": generation, "replicas": total, "updatedReplicas": updated,
            "readyReplicas": ready, "availableReplicas": ready,
            "conditions": [{"type": "Progressing", "status": "False" if progress.endswith("Exceeded") else "True",
                            "reason": progress}],
        }
        url = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/status"
        resp = await self.server.patch(url, json={"status": status})
        assert resp.status == 200, await resp.text()

    async def delete(self, resource: str, name: str, namespace: str = NS) -> None:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        resp = await self.server.delete(f"{prefix}/namespaces/{namespace}/{plural}/{name}")
        assert resp.status == 200, await resp.text()


