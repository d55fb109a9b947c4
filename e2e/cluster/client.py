"""What a test holds of a running local cluster: API clients, kubectl/helm, waits, Service URLs."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kubernetes import client, config

from . import versions
from .endpoints import service_endpoints
from .layout import Layout

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_for(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Poll until `check` returns something truthy; fail with `what` and the last error otherwise."""
    deadline, last_err = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # the object may not exist yet
            last_err = err
        time.sleep(interval_s)
    raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))


@dataclass
class Cluster:
    layout: Layout
    api_client: client.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        self.api_client = config.new_client_from_config(config_file=str(self.kubeconfig))

    @property
    def kubeconfig(self) -> str:
        return str(self.layout.kubeconfig())

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    def tool(self, name: str, args: Sequence[str], input: str | None = None, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run kubectl or helm (the pinned builds) against this cluster."""
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        done = subprocess.run([str(versions.BIN_DIR / name), *args], input=input, capture_output=True,
                              text=True, env=env, timeout=timeout)  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tool("kubectl", args, input=input, check=check)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tool("helm", args, check=check, timeout=300)

    def get_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    # -- pods and services ---------------------------------------------------------------------------
    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        return self.get_json("pods", "-n", namespace, *(["-l", selector] if selector else []))["items"]

    def ready_pods(self, namespace: str, selector: str = "") -> list[dict]:
        def ready(p: dict) -> bool:
            conds = p.get("status", {}).get("conditions") or []
            return not p["metadata"].get("deletionTimestamp") and any(
                c["type"] == "Ready" and c["status"] == "True" for c in conds
            )

        return [p for p in self.pods(namespace, selector) if ready(p)]

    def wait_ready(self, namespace: str, selector: str, count: int = 1, timeout_s: float = 90) -> list[dict]:
        return wait_for(lambda: (lambda ps: ps if len(ps) >= count else None)(self.ready_pods(namespace, selector)),
                        timeout_s, f"{count} Ready pod(s) {selector!r} in {namespace}")  # fmt: skip

    def service_url(self, namespace: str, name: str, port: str | int | None = None, scheme: str = "http") -> str:
        """`scheme://<clusterIP>:<port>`: the Service's own address, answered by the local service proxy."""
        svc = self.get_json("service", name, "-n", namespace)
        ports = svc["spec"]["ports"]
        chosen = ports[0] if port is None else next(p for p in ports if p.get("name") == port or p["port"] == port)
        return f"{scheme}://{svc['spec']['clusterIP']}:{chosen['port']}"

    def endpoints(self, namespace: str, name: str, port: str | int | None = None) -> list[tuple[str, int]]:
        """The Service's serving (pod IP, port) pairs, by the EndpointSlice controller's rule."""
        svc = self.get_json("service", name, "-n", namespace)
        return service_endpoints(svc, self.pods(namespace), port)

    def prometheus_query(self, promql: str, at: float | None = None) -> list[dict]:
        """An instant query (at Unix time `at`, else now): a range selector gives every sample of its range."""
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        url = f"{self.layout.prometheus_url}/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        return body["data"]["result"]


def container_pid(pod: dict, container: str | None = None) -> int:
    """The local pid of a container (the node agent puts it at the end of containerID)."""
    statuses = pod["status"]["containerStatuses"]
    status = statuses[0] if container is None else next(s for s in statuses if s["name"] == container)
    return int(status["containerID"].rsplit("-", 1)[1])


def in_container(pid: int, *command: str) -> str:
    """Run a command in a container's mount namespace (so its volumes are where the manifest put them)."""
    done = subprocess.run(["nsenter", "-t", str(pid), "-m", *command], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in pid {pid}: {done.stderr.strip()}")
    return done.stdout
