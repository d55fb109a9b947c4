"""The node agent: one per Node, standing in for a kubelet.

It registers its Node (with `nvidia.com/gpu` capacity), renews the node Lease, watches the pods bound
to it and hands each to a PodWorker thread. It also owns what the workers share: the pod-IP pool
(loopback addresses), the emulated GPUs, the pid records `cluster down` sweeps, events and status writes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import watch
from kubernetes.client.rest import ApiException

from . import kubeletapi
from .envs import service_env
from .kube import KubeApi
from .podworker import PodWorker
from .probes import run_check
from .status import rfc3339

log = logging.getLogger("nodeagent")
LEASE_RENEW_S = 10.0
STATUS_REPORT_S = 30.0
# Host variables a container also gets (an image would carry its own; these keep numerics sane here).
PASS_THROUGH_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
CLUSTER_MARKER_ENV = "PAGEDSERVE_LOCAL_CLUSTER"


@dataclass
class NodeConfig:
    name: str
    host_ip: str  # the Node's InternalIP, a loopback address
    pod_ips: list[str]  # the pool this node hands out as pod IPs
    gpus: int
    kubeconfig: str
    state_dir: Path  # this node's folder: pods/, pids/
    api_host: str
    api_port: int
    path_prefix: str  # prepended to PATH: stands in for the image's PATH (the project's venv)
    cluster_id: str
    kube_version: str = "v1.37.2"
    backoff_base_s: float = 2.0  # the kubelet uses 10s doubling to 300s; shorter keeps tests quick
    backoff_cap_s: float = 60.0
    labels: dict[str, str] = field(default_factory=dict)
    # Serving cert, key and CA of the kubelet API (`kubectl logs`); None leaves it off.
    kubelet_tls: tuple[Path, Path, Path] | None = None


def ip_range(first: str, last: str) -> list[str]:
    start, end = int(ipaddress.IPv4Address(first)), int(ipaddress.IPv4Address(last))
    return [str(ipaddress.IPv4Address(i)) for i in range(start, end + 1)]


class NodeAgent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.api = KubeApi(cfg.kubeconfig, cfg.name)
        self.host_ip = cfg.host_ip
        self.backoff_base_s, self.backoff_cap_s = cfg.backoff_base_s, cfg.backoff_cap_s
        self.pods_dir = cfg.state_dir / "pods"
        self.pids_dir = cfg.state_dir / "pids"
        # Mount points made on the host for containers; `cluster down` removes those left empty.
        self.created_paths_log = cfg.state_dir / "created-mount-points"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.workers: dict[str, PodWorker] = {}
        self.free_ips = list(cfg.pod_ips)
        self.ip_of: dict[str, str] = {}
        self.gpus_of: dict[tuple[str, str], list[int]] = {}
        self.finished: set[str] = set()  # pods whose worker is done: late watch events must not revive them
        self.stopping = threading.Event()

    # -- shared resources ----------------------------------------------------------------------------
    def allocate_ip(self, uid: str, previous: str | None, pod: dict) -> str:
        if pod["spec"].get("hostNetwork"):
            return self.host_ip
        with self.lock:
            if uid in self.ip_of:
                return self.ip_of[uid]
            if previous in self.free_ips:
                self.free_ips.remove(previous)
                ip = previous
            elif self.free_ips:
                ip = self.free_ips.pop(0)
            else:
                raise RuntimeError(f"node {self.cfg.name}: no free pod IPs")
            self.ip_of[uid] = ip
            return ip

    def allocate_gpus(self, uid: str, container: str, count: int) -> list[int]:
        if count <= 0:
            return []
        with self.lock:
            used = {g for gs in self.gpus_of.values() for g in gs}
            free = [g for g in range(self.cfg.gpus) if g not in used]
            if len(free) < count:
                raise RuntimeError(f"node {self.cfg.name}: {count} GPUs asked, {len(free)} free")
            self.gpus_of[(uid, container)] = free[:count]
            return free[:count]

    def release(self, uid: str) -> None:
        with self.lock:
            ip = self.ip_of.pop(uid, None)
            if ip is not None and ip != self.host_ip:
                self.free_ips.append(ip)  # reused last: recently freed addresses rest a while
            for key in [k for k in self.gpus_of if k[0] == uid]:
                del self.gpus_of[key]
            self.workers.pop(uid, None)
            if not self.stopping.is_set():
                self.finished.add(uid)

    def record_pid(self, uid: str, container: str, pid: int | None) -> None:
        path = self.pids_dir / f"{uid}_{container}.pid"
        if pid is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(f"{pid}\n")

    def base_env(self, pod: dict, gpus: list[int]) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ}
        env.update(
            PATH=f"{self.cfg.path_prefix}:{os.environ.get('PATH', os.defpath)}",
            HOME=os.environ.get("HOME", "/root"),
            LANG=os.environ.get("LANG", "C.UTF-8"),
            HOSTNAME=pod["spec"].get("hostname") or pod["metadata"]["name"],
        )
        env[CLUSTER_MARKER_ENV] = self.cfg.cluster_id
        services = []
        if pod["spec"].get("enableServiceLinks", True):
            try:
                services = self.api.list_services(pod["metadata"]["namespace"])
            except ApiException as err:
                log.warning("service links for %s: %s", pod["metadata"]["name"], err)
        env.update(service_env(services, self.cfg.api_host, self.cfg.api_port))
        if gpus:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        return env

    def event(self, pod: dict, kind: str, reason: str, message: str) -> None:
        self.api.event(pod, kind, reason, message)

    def run_hook(self, hook: dict, pod_ip: str, container: Any, timeout: float) -> None:
        if "sleep" in hook:
            self.stopping.wait(min(float(hook["sleep"]["seconds"]), timeout))
        elif "exec" in hook:
            prefix = container.proc.exec_prefix() if container.proc is not None else []
            subprocess.run([*prefix, *hook["exec"]["command"]], env=container.env, timeout=timeout, capture_output=True)
        elif "httpGet" in hook:
            run_check({"httpGet": hook["httpGet"], "timeoutSeconds": max(timeout, 1)}, pod_ip, container.ports, container.env)

    # -- pod status and deletion ---------------------------------------------------------------------
    def write_pod_status(self, worker: PodWorker, status: dict) -> bool:
        for _ in range(5):
            pod = dict(worker.current())
            pod["status"] = {**pod.get("status", {}), **status, "conditions": status["conditions"]}
            try:
                worker.update(self.api.replace_pod_status(pod))
                return True
            except ApiException as err:
                if err.status == 404:
                    worker.gone.set()
                    return False
                if err.status != 409:
                    log.warning("pod %s: status write failed: %s %s", worker.key, err.status, err.body)
                    return False
                meta = pod["metadata"]
                try:
                    worker.update(self.api.read_pod(meta["namespace"], meta["name"]))
                except ApiException:
                    worker.gone.set()
                    return False
        return False

    def delete_pod(self, pod: dict) -> None:
        try:
            self.api.delete_pod_now(pod)
        except ApiException as err:
            log.warning("pod %s: delete failed: %s", pod["metadata"]["name"], err)

    # -- node object and heartbeats -----------------------------------------------------------------
    def node_status(self) -> dict:
        now = rfc3339(time.time())
        resources = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi",
                     "nvidia.com/gpu": str(self.cfg.gpus)}  # fmt: skip

        def cond(ctype: str, status: str, reason: str, message: str) -> dict:
            return {"type": ctype, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self._started_at}  # fmt: skip

        return {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": self.host_ip}, {"type": "Hostname", "address": self.cfg.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": self.cfg.cluster_id,
                "kernelVersion": os.uname().release, "osImage": "pagedserve local node",
                "containerRuntimeVersion": "pagedserve-nodeagent://0.1", "kubeletVersion": self.cfg.kube_version,
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "pagedserve node agent is posting ready status"),
            ],
        }  # fmt: skip

    def register(self) -> None:
        self._started_at = rfc3339(time.time())
        labels = {
            "kubernetes.io/hostname": self.cfg.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.count": str(self.cfg.gpus),
            **self.cfg.labels,
        }
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.cfg.name, "labels": labels}}
        try:
            self.api.core.create_node(node, _preload_content=False)
        except ApiException as err:
            if err.status != 409:
                raise
            self.api.core.patch_node(self.cfg.name, {"metadata": {"labels": labels}}, _preload_content=False)
        self.report_status()

    def report_status(self) -> None:
        self.api.core.patch_node_status(self.cfg.name, {"status": self.node_status()}, _preload_content=False)

    def renew_lease(self) -> None:
        now = time.time()
        micro = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.cfg.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.cfg.name, "leaseDurationSeconds": 40, "renewTime": micro},
        }
        try:
            self.api.coord.patch_namespaced_lease(self.cfg.name, "kube-node-lease", {"spec": body["spec"]}, _preload_content=False)
        except ApiException as err:
            if err.status != 404:
                raise
            self.api.coord.create_namespaced_lease("kube-node-lease", body, _preload_content=False)

    def _heartbeat(self) -> None:
        next_status = time.monotonic() + STATUS_REPORT_S
        while not self.stopping.wait(LEASE_RENEW_S):
            try:
                self.renew_lease()
                if time.monotonic() >= next_status:
                    self.report_status()
                    next_status = time.monotonic() + STATUS_REPORT_S
            except Exception as err:
                log.warning("heartbeat failed: %s", err)

    # -- pods -------------------------------------------------------------------------------------------
    def kill_leftovers(self) -> None:
        """Processes recorded by a previous agent of this node: they have no worker any more."""
        for path in self.pids_dir.glob("*.pid"):
            try:
                os.killpg(int(path.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
            path.unlink(missing_ok=True)

    def _handle(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            if uid in self.finished:
                return
            worker = self.workers.get(uid)
            if worker is None:
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
                return
        worker.update(pod)

    def _gone(self, uid: str) -> None:
        with self.lock:
            worker = self.workers.get(uid)
        if worker is not None:
            worker.gone.set()

    def watch_pods(self) -> None:
        """List then watch this node's pods; re-list after any break, as an informer does."""
        while not self.stopping.is_set():
            try:
                listed = self.api.list_pods()
                present = {p["metadata"]["uid"] for p in listed["items"]}
                for pod in listed["items"]:
                    self._handle(pod)
                with self.lock:
                    vanished = [uid for uid in self.workers if uid not in present]
                for uid in vanished:
                    self._gone(uid)
                self._watch_from(listed["metadata"]["resourceVersion"])
            except Exception as err:
                if not self.stopping.is_set():
                    log.warning("pod watch restarting: %s", err)
                    self.stopping.wait(1.0)

    def _watch_from(self, resource_version: str) -> None:
        w = watch.Watch()
        stream = w.stream(
            self.api.core.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={self.cfg.name}",
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=240,
        )
        for event in stream:
            if self.stopping.is_set():
                w.stop()
                return
            kind, obj = event["type"], event["raw_object"]
            if kind in ("ADDED", "MODIFIED"):
                self._handle(obj)
            elif kind == "DELETED":
                self._gone(obj["metadata"]["uid"])
            elif kind == "ERROR":
                return  # e.g. 410 Gone: re-list

    def run(self) -> None:
        self.kill_leftovers()
        self.register()
        self.renew_lease()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        if self.cfg.kubelet_tls:
            kubeletapi.serve(self, *self.cfg.kubelet_tls)
        log.info("node %s registered (%s, %d GPUs, pod IPs %s..%s)", self.cfg.name, self.host_ip,
                 self.cfg.gpus, self.cfg.pod_ips[0], self.cfg.pod_ips[-1])  # fmt: skip
        watcher = threading.Thread(target=self.watch_pods, name="pod-watch", daemon=True)
        watcher.start()
        self.stopping.wait()
        self.stop_pods()

    def stop_pods(self) -> None:
        """Agent shutdown: stop every pod's processes (the pod objects stay, as with a stopped kubelet)."""
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.shutdown.set()
            w.gone.set()
        for w in workers:
            w.join(timeout=15)
