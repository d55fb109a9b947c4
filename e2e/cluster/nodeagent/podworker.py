"""The life of one pod on this node, in one thread: set up, run, probe, restart, report, terminate.

The worker ticks a few times a second. Each tick it folds process exits and probe results into
`ContainerFacts`, restarts per restartPolicy with an exponential back-off, and writes the pod status
when it changed. Deletion (deletionTimestamp) runs preStop hooks, sends SIGTERM, waits out the grace
period, sends SIGKILL, reports the terminal status and deletes the pod object, as the kubelet does.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .envs import EnvError, container_argv, container_env
from .probes import ProbeTracker, run_check
from .process import ContainerProcess, mount_namespaces_available
from .status import ContainerFacts, Terminated, pod_conditions, pod_phase, rfc3339
from .volumes import PodVolumes, VolumeError

if TYPE_CHECKING:
    from .agent import NodeAgent

TICK_S = 0.25
log = logging.getLogger("nodeagent.pod")


@dataclass
class Container:
    """Runtime state of one container of the pod (the spec and its current instance)."""

    spec: dict
    init: bool = False
    facts: ContainerFacts = field(init=False)
    proc: ContainerProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    restart_at: float = 0.0  # monotonic time before which a crashed container waits (back-off)
    backoff_s: float = 0.0
    startup: ProbeTracker | None = None
    liveness: ProbeTracker | None = None
    readiness: ProbeTracker | None = None
    succeeded: bool = False  # init containers: ran to completion
    starts: int = 0  # process starts so far; every one after the first is a restart
    gpus: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.facts = ContainerFacts(self.spec["name"], self.spec.get("image", ""))

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.spec.get("ports", []) if p.get("name")}


class PodWorker(threading.Thread):
    def __init__(self, agent: NodeAgent, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent, self.pod = agent, pod
        self.uid = meta["uid"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.dir = agent.pods_dir / f"{meta['namespace']}_{meta['name']}_{self.uid[:8]}"
        self.lock = threading.Lock()
        self.gone = threading.Event()  # the pod object no longer exists
        self.shutdown = threading.Event()  # the agent is stopping: stop processes, keep the pod
        self.pod_ip = ""
        self.volumes: PodVolumes | None = None
        self.init = [Container(c, init=True) for c in pod["spec"].get("initContainers", [])]
        self.main = [Container(c) for c in pod["spec"]["containers"]]
        self.sandbox_ready = False
        self.terminating_since: float | None = None
        self.last_status: dict | None = None
        self.start_time = time.time()

    # -- inputs from the agent's watch ------------------------------------------------------------
    def update(self, pod: dict[str, Any]) -> None:
        with self.lock:
            self.pod = pod

    def current(self) -> dict[str, Any]:
        with self.lock:
            return self.pod

    # -- main loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s: worker failed", self.key)
        finally:
            self._stop_all(grace_s=2.0)
            if self.volumes:
                self.volumes.cleanup()
            self.agent.release(self.uid)

    def _run(self) -> None:
        status = self.current().get("status", {})
        self.pod_ip = self.agent.allocate_ip(self.uid, status.get("podIP"), self.current())
        if status.get("startTime"):
            self.start_time = _parse_time(status["startTime"]) or self.start_time
        if status.get("phase") in ("Succeeded", "Failed"):
            return self._wait_deleted_after_terminal()
        self.sandbox_ready = True
        self._write_status()
        while not (self.gone.is_set() or self.shutdown.is_set()):
            pod = self.current()
            if pod["metadata"].get("deletionTimestamp"):
                return self._terminate(pod)
            if self.volumes is None and not self._setup_volumes(pod):
                self._sleep(1.0)
                continue
            self._tick(pod)
            self._write_status()
            if self._terminal_phase():
                return self._wait_deleted_after_terminal()
            self._sleep(TICK_S)

    def _sleep(self, seconds: float) -> None:
        self.gone.wait(seconds)

    def _setup_volumes(self, pod: dict) -> bool:
        volumes = PodVolumes(pod, self.dir, self.agent.api, self.pod_ip, self.agent.host_ip)
        try:
            volumes.prepare()
        except (VolumeError, OSError) as err:
            for c in self.init + self.main:
                c.facts.waiting_reason, c.facts.waiting_message = "ContainerCreating", str(err)
            self.agent.event(pod, "Warning", "FailedMount", str(err))
            self._write_status()
            return False
        self.volumes = volumes
        return True

    def _tick(self, pod: dict) -> None:
        assert self.volumes is not None
        try:
            self.volumes.refresh()
        except (VolumeError, OSError) as err:
            log.warning("pod %s: volume refresh failed: %s", self.key, err)
        if not all(c.succeeded for c in self.init):
            self._step_init(pod)
            return
        for c in self.main:
            self._step_container(pod, c)

    # -- init containers run one at a time to completion --------------------------------------------
    def _step_init(self, pod: dict) -> None:
        c = next(c for c in self.init if not c.succeeded)
        self._step_container(pod, c)
        if c.facts.terminated and c.facts.terminated.exit_code == 0:
            c.succeeded = True
        for m in self.main:
            m.facts.waiting_reason = "PodInitializing"

    def _init_failed(self) -> bool:
        policy = self.current()["spec"].get("restartPolicy", "Always")
        return policy == "Never" and any(
            c.facts.terminated and c.facts.terminated.exit_code != 0 for c in self.init
        )

    # -- one container: start, watch, probe, restart -------------------------------------------------
    def _step_container(self, pod: dict, c: Container) -> None:
        now = time.monotonic()
        if c.proc is None:
            if c.facts.terminated is not None:
                return  # exited for good (restartPolicy); a restart would have cleared `terminated`
            if now < c.restart_at:
                return
            self._start(pod, c)
            return
        rc = c.proc.poll()
        if rc is not None:
            self._exited(pod, c, rc)
            return
        self._probe(pod, c, now)

    def _should_restart(self, pod: dict, c: Container) -> bool:
        policy = pod["spec"].get("restartPolicy", "Always")
        if c.init and c.facts.terminated and c.facts.terminated.exit_code == 0:
            return False
        if policy == "Never":
            return False
        if policy == "OnFailure" and c.facts.terminated and c.facts.terminated.exit_code == 0:
            return False
        return True

    def _start(self, pod: dict, c: Container) -> None:
        assert self.volumes is not None
        agent = self.agent
        try:
            if not c.gpus:
                c.gpus = agent.allocate_gpus(self.uid, c.name, _gpu_count(c.spec))
            base = agent.base_env(pod, c.gpus)
            c.env = container_env(pod, c.spec, pod_ip=self.pod_ip, host_ip=agent.host_ip, base=base, lookup=agent.api.get_data)
            argv = container_argv(c.spec, c.env)
            mounts = self.volumes.mounts_for(c.spec, c.env)
        except (EnvError, VolumeError) as err:
            c.facts.waiting_reason, c.facts.waiting_message = "CreateContainerConfigError", str(err)
            c.restart_at = time.monotonic() + 2.0
            return
        if c.starts:
            c.facts.restart_count += 1
        c.starts += 1
        cwd = Path(c.spec["workingDir"]) if c.spec.get("workingDir") else self.dir / "root" / c.name
        log_path = self.dir / "logs" / c.name / f"{c.facts.restart_count}.log"
        c.proc = ContainerProcess(argv, c.env, cwd, mounts, log_path, agent.created_paths_log)
        try:
            c.proc.start()
        except OSError as err:
            c.proc = None
            now = time.time()
            c.facts.terminated = Terminated(128, "StartError", now, now, str(err))
            c.facts.running_since, c.facts.ready, c.facts.started = None, False, False
            if self._should_restart(pod, c):
                self._schedule_restart(c, ran_s=0.0)
            agent.event(pod, "Warning", "Failed", f"Error: failed to start container {c.name!r}: {err}")
            return
        if mounts and not mount_namespaces_available():
            agent.event(pod, "Warning", "VolumesNotMounted",
                        f"container {c.name}: no mount namespaces here (needs root and `unshare`), volumes are not mounted")  # fmt: skip
        c.facts.running_since, c.facts.waiting_reason, c.facts.waiting_message = c.proc.started_at, None, ""
        c.facts.container_id = f"pagedserve://{self.uid[:8]}-{c.name}-{c.facts.restart_count}-{c.proc.pid}"
        agent.record_pid(self.uid, c.name, c.proc.pid)
        started = time.monotonic()
        spec = c.spec
        c.startup = ProbeTracker(spec["startupProbe"], started, healthy=False) if spec.get("startupProbe") else None
        c.liveness = ProbeTracker(spec["livenessProbe"], started, healthy=True) if spec.get("livenessProbe") else None
        c.readiness = ProbeTracker(spec["readinessProbe"], started, healthy=False) if spec.get("readinessProbe") else None
        c.facts.started = c.startup is None
        c.facts.ready = c.readiness is None and not c.init
        agent.event(pod, "Normal", "Started", f"Started container {c.name} (pid {c.proc.pid}, ip {self.pod_ip})")

    def _exited(self, pod: dict, c: Container, rc: int) -> None:
        assert c.proc is not None
        ran_s = time.time() - c.proc.started_at
        reason = "Completed" if rc == 0 else "Error"
        c.facts.terminated = Terminated(rc, reason, c.proc.started_at, time.time())
        c.facts.running_since, c.facts.ready, c.facts.started = None, False, False
        c.proc = None
        self.agent.record_pid(self.uid, c.name, None)
        if self._should_restart(pod, c) and not pod["metadata"].get("deletionTimestamp"):
            self._schedule_restart(c, ran_s)

    def _schedule_restart(self, c: Container, ran_s: float) -> None:
        """Kubelet-style back-off: doubles per crash, resets after a long enough run."""
        base, cap = self.agent.backoff_base_s, self.agent.backoff_cap_s
        c.backoff_s = base if (c.backoff_s == 0 or ran_s > 10 * cap) else min(c.backoff_s * 2, cap)
        c.restart_at = time.monotonic() + c.backoff_s
        # While backing off the container is Waiting(CrashLoopBackOff) with the exit as lastState.
        c.facts.last_terminated, c.facts.terminated = c.facts.terminated, None
        c.facts.waiting_reason = "CrashLoopBackOff"
        c.facts.waiting_message = f"back-off {c.backoff_s:.0f}s restarting failed container={c.name} pod={self.key}"

    def _probe(self, pod: dict, c: Container, now: float) -> None:
        assert c.proc is not None
        if c.startup is not None and not c.facts.started:
            if c.startup.due(now):
                result = run_check(c.startup.probe, self.pod_ip, c.ports, c.env, c.proc.exec_prefix())
                c.startup.record(result, now)
                if result.ok:
                    c.facts.started = True
                    # Liveness and readiness start counting once the startup probe passed.
                    for t in (c.liveness, c.readiness):
                        if t is not None:
                            t.next_at = now
                elif c.startup.failures >= int(c.startup.probe.get("failureThreshold", 3)):
                    self._kill_for_probe(pod, c, "Startup", result.message, c.startup.probe)
            return
        if c.liveness is not None and c.liveness.due(now):
            result = run_check(c.liveness.probe, self.pod_ip, c.ports, c.env, c.proc.exec_prefix())
            c.liveness.record(result, now)
            if not c.liveness.healthy:
                return self._kill_for_probe(pod, c, "Liveness", result.message, c.liveness.probe)
        if c.readiness is not None and c.readiness.due(now):
            result = run_check(c.readiness.probe, self.pod_ip, c.ports, c.env, c.proc.exec_prefix())
            if c.readiness.record(result, now) and not c.readiness.healthy:
                self.agent.event(pod, "Warning", "Unhealthy", f"Readiness probe failed: {result.message}")
            c.facts.ready = c.readiness.healthy

    def _kill_for_probe(self, pod: dict, c: Container, kind: str, message: str, probe: dict) -> None:
        assert c.proc is not None
        self.agent.event(pod, "Warning", "Unhealthy", f"{kind} probe failed: {message}")
        self.agent.event(pod, "Normal", "Killing", f"Container {c.name} failed {kind.lower()} probe, will be restarted")
        grace = probe.get("terminationGracePeriodSeconds", pod["spec"].get("terminationGracePeriodSeconds", 30))
        c.proc.terminate(float(grace))
        c.facts.ready = False
        c.startup = c.liveness = c.readiness = None  # no more probes for this instance

    # -- termination ------------------------------------------------------------------------------------
    def _terminate(self, pod: dict) -> None:
        meta = pod["metadata"]
        grace = float(meta.get("deletionGracePeriodSeconds", pod["spec"].get("terminationGracePeriodSeconds", 30)))
        deadline = time.monotonic() + grace
        self.agent.event(pod, "Normal", "Killing", f"Stopping pod (grace period {grace:.0f}s)")
        hooks = [threading.Thread(target=self._pre_stop_then_term, args=(pod, c, deadline), daemon=True)
                 for c in self.main if c.proc is not None]  # fmt: skip
        for c in self.init:
            if c.proc is not None:
                c.proc.terminate(0)
        for t in hooks:
            t.start()
        while any(c.proc is not None for c in self.init + self.main) and not self.gone.is_set():
            for c in self.init + self.main:
                if c.proc is not None and (rc := c.proc.poll()) is not None:
                    self._exited(pod, c, rc)
            self._write_status()
            self._sleep(TICK_S)
        if self.gone.is_set():
            return
        self._write_status(final=True)
        self.agent.delete_pod(pod)

    def _pre_stop_then_term(self, pod: dict, c: Container, deadline: float) -> None:
        hook = c.spec.get("lifecycle", {}).get("preStop")
        if hook and c.proc is not None:
            try:
                self.agent.run_hook(hook, self.pod_ip, c, timeout=max(deadline - time.monotonic(), 0))
            except Exception as err:  # a failing hook must not block termination
                self.agent.event(pod, "Warning", "FailedPreStopHook", str(err))
        proc = c.proc
        if proc is not None:
            proc.terminate(max(deadline - time.monotonic(), 0.0))

    def _stop_all(self, grace_s: float) -> None:
        for c in self.init + self.main:
            if c.proc is not None:
                c.proc.terminate(grace_s)
        end = time.monotonic() + grace_s + 5
        for c in self.init + self.main:
            if c.proc is None:
                continue
            while c.proc.poll() is None and time.monotonic() < end:
                time.sleep(0.05)
            c.proc.kill_now()
            self.agent.record_pid(self.uid, c.name, None)
            c.proc = None

    def _wait_deleted_after_terminal(self) -> None:
        """A Succeeded/Failed pod keeps its status until someone deletes it; then we delete it for good."""
        while not (self.gone.is_set() or self.shutdown.is_set()):
            pod = self.current()
            if pod["metadata"].get("deletionTimestamp"):
                self.agent.delete_pod(pod)
                return
            self._sleep(0.5)

    # -- status ------------------------------------------------------------------------------------------
    def _terminal_phase(self) -> bool:
        return self._phase() in ("Succeeded", "Failed")

    def _phase(self, final: bool = False) -> str:
        pod = self.current()
        if final:
            codes = [(c.facts.terminated or c.facts.last_terminated) for c in self.main]
            return "Succeeded" if all(t is not None and t.exit_code == 0 for t in codes) else "Failed"
        init_done = all(c.succeeded for c in self.init)
        return pod_phase(pod["spec"].get("restartPolicy", "Always"), init_done, self._init_failed(), [c.facts for c in self.main])

    def _write_status(self, final: bool = False) -> None:
        pod = self.current()
        phase = self._phase(final)
        status = dict(pod.get("status", {}))
        status.update(
            phase=phase,
            hostIP=self.agent.host_ip,
            hostIPs=[{"ip": self.agent.host_ip}],
            startTime=rfc3339(self.start_time),
        )
        if self.pod_ip:
            status.update(podIP=self.pod_ip, podIPs=[{"ip": self.pod_ip}])
        status["conditions"] = pod_conditions(
            status.get("conditions", []),
            sandbox_ready=self.sandbox_ready,
            init_done=all(c.succeeded for c in self.init),
            containers=[c.facts for c in self.main],
            readiness_gates=[g["conditionType"] for g in pod["spec"].get("readinessGates", [])],
            terminal=phase in ("Succeeded", "Failed"),
            now=time.time(),
        )
        status["containerStatuses"] = [c.facts.as_status() for c in self.main]
        if self.init:
            status["initContainerStatuses"] = [c.facts.as_status() for c in self.init]
        comparable = {k: v for k, v in status.items() if k != "conditions"}
        comparable["conditions"] = [(c["type"], c["status"]) for c in status["conditions"]]
        if comparable == self.last_status:
            return
        if self.agent.write_pod_status(self, status):
            self.last_status = comparable


def _gpu_count(container: dict) -> int:
    resources = container.get("resources", {})
    value = resources.get("limits", {}).get("nvidia.com/gpu") or resources.get("requests", {}).get("nvidia.com/gpu")
    return int(value or 0)


def _parse_time(text: str) -> float | None:
    import datetime as dt

    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None
