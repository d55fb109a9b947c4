"""A container's environment, resolved as the kubelet does: pure functions over the pod's JSON.

Order (later wins): the service variables (KUBERNETES_SERVICE_HOST/PORT and, with enableServiceLinks,
one set per Service of the namespace), then `envFrom`, then `env` in order; each `env` value may
refer to variables defined before it as `$(NAME)`, and so may the container's command and args.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

Pod = dict[str, Any]
# (kind, namespace, name) -> data dict, or None when the object does not exist.
Lookup = Callable[[str, str, str], "Mapping[str, str] | None"]


class EnvError(Exception):
    """The env cannot be built yet (a missing ConfigMap or Secret key that is not optional)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: unknown names stay as written, `$$` escapes a `$`."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 == n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : close]
            out.append(env[name] if name in env else text[i : close + 1])
            i = close + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: Pod, path: str, pod_ip: str, host_ip: str) -> str:
    """Downward API `fieldRef` value of `pod` (status fields come from the agent, not the stale object)."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return simple[path]
    match = _LABEL_REF.match(path)
    if match:
        return meta.get(match[1], {}).get(match[2], "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise EnvError(f"unsupported fieldRef {path!r}")


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "m": 1e-3}


def parse_quantity(q: str | int | float) -> float:
    text = str(q)
    for suffix, factor in _SUFFIX.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def resource_field_ref(container: dict, ref: dict) -> str:
    """`resourceFieldRef`: the limit (or request) divided by `divisor`, rounded up like the kubelet."""
    kind, _, resource = ref["resource"].partition(".")
    section = container.get("resources", {}).get(kind, {})
    if resource not in section and kind == "limits":
        section = container.get("resources", {}).get("requests", {})
    if resource not in section:
        return "0"
    value = parse_quantity(section[resource]) / parse_quantity(ref.get("divisor", "1") or "1")
    return str(math.ceil(value))


def _key_ref(ns: str, ref: dict, kind: str, lookup: Lookup) -> str | None:
    data = lookup(kind, ns, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise EnvError(f"{kind} {ns}/{ref['name']} key {ref['key']!r} not found")
    return data[ref["key"]]


def service_env(services: list[dict], api_host: str, api_port: int) -> dict[str, str]:
    """KUBERNETES_SERVICE_* pointing at the API server, plus docker-link style vars per Service."""
    env: dict[str, str] = {}
    for svc in sorted(services, key=lambda s: s["metadata"]["name"]):
        ip = svc.get("spec", {}).get("clusterIP")
        ports = svc.get("spec", {}).get("ports", [])
        if not ip or ip == "None" or not ports:
            continue
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
        for port in ports:
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
    # In-cluster clients reach the API server directly (no proxy hop), over TLS with the pod's token.
    env["KUBERNETES_SERVICE_HOST"] = api_host
    env["KUBERNETES_SERVICE_PORT"] = str(api_port)
    env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(api_port)
    env["KUBERNETES_PORT"] = f"tcp://{api_host}:{api_port}"
    return env


def container_env(
    pod: Pod,
    container: dict,
    *,
    pod_ip: str,
    host_ip: str,
    base: Mapping[str, str],
    lookup: Lookup,
) -> dict[str, str]:
    """The full environment of one container process, `base` (PATH, HOME, service vars) first."""
    ns = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in source:
                continue
            data = lookup(kind, ns, source[key]["name"])
            if data is None:
                if source[key].get("optional"):
                    continue
                raise EnvError(f"{kind} {ns}/{source[key]['name']} not found")
            env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env", []):
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value", ""), env)
        elif "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "resourceFieldRef" in source:
            env[name] = resource_field_ref(container, source["resourceFieldRef"])
        elif "configMapKeyRef" in source:
            value = _key_ref(ns, source["configMapKeyRef"], "ConfigMap", lookup)
            if value is not None:
                env[name] = value
        elif "secretKeyRef" in source:
            value = _key_ref(ns, source["secretKeyRef"], "Secret", lookup)
            if value is not None:
                env[name] = value
    return env


def container_argv(container: dict, env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded. The image is never run, so a command is required."""
    command = container.get("command") or []
    if not command:
        raise EnvError(
            f"container {container['name']!r} has no command: the node agent runs command+args as a local "
            "process and ignores the image, so the manifest must set `command`"
        )
    return [expand(part, env) for part in [*command, *container.get("args", [])]]
