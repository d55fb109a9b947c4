"""Which pods serve a Service: the EndpointSlice controller's rule, as pure functions over JSON.

The API server refuses loopback addresses in EndpointSlices ("may not be in the loopback range"), and
our pod IPs are loopback addresses, so the real controller cannot publish slices here. The service
proxy and the tests derive the same answer from the Service and its pods instead: a pod is an endpoint
when the selector matches, it has an IP, it is Ready and not terminating (or the Service publishes
not-ready addresses), and the Service port's targetPort resolves on it.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def selector_matches(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    if not selector:
        return False  # a Service without selector has manually managed endpoints, none here
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def pod_is_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def target_port(service_port: Obj, pod: Obj) -> int | None:
    """The pod port a Service port forwards to; a named targetPort is looked up in the pod's containers."""
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in pod.get("spec", {}).get("containers", []):
        for port in container.get("ports", []):
            if port.get("name") == target and port.get("protocol", "TCP") == service_port.get("protocol", "TCP"):
                return int(port["containerPort"])
    return None


def service_endpoints(service: Obj, pods: list[Obj], port_key: str | int | None = None) -> list[tuple[str, int]]:
    """(pod IP, port) of every serving pod, for the Service port named or numbered `port_key`
    (the first port when None), in a stable order."""
    ports = service.get("spec", {}).get("ports") or []
    if not ports:
        return []
    if port_key is None:
        sport = ports[0]
    else:
        matches = [p for p in ports if p.get("name") == port_key or p["port"] == port_key]
        if not matches:
            raise KeyError(f"service {service['metadata']['name']} has no port {port_key!r}")
        sport = matches[0]
    publish_not_ready = service.get("spec", {}).get("publishNotReadyAddresses", False)
    namespace = service["metadata"]["namespace"]
    out = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status", {})
        if meta.get("namespace") != namespace or not status.get("podIP"):
            continue
        if not selector_matches(service.get("spec", {}).get("selector"), meta.get("labels")):
            continue
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        if not publish_not_ready and (meta.get("deletionTimestamp") or not pod_is_ready(pod)):
            continue
        port = target_port(sport, pod)
        if port is not None:
            out.append((status["podIP"], port))
    return sorted(out)
