"""Pod status as the kubelet reports it, built by pure functions from per-container facts.

Kept free of processes and API calls so the phase and condition rules are unit-tested directly.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

OWN_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Terminated:
    exit_code: int
    reason: str
    started_at: float | None
    finished_at: float
    message: str = ""

    def as_dict(self, container_id: str) -> dict[str, Any]:
        out = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": rfc3339(self.started_at),
            "finishedAt": rfc3339(self.finished_at),
            "containerID": container_id,
        }
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class ContainerFacts:
    """What the agent knows about one container right now."""

    name: str
    image: str
    restart_count: int = 0
    running_since: float | None = None  # wall clock start of the live process
    waiting_reason: str | None = "ContainerCreating"
    waiting_message: str = ""
    terminated: Terminated | None = None  # current state when it exited and will not (yet) restart
    last_terminated: Terminated | None = None
    ready: bool = False
    started: bool = False
    container_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_status(self) -> dict[str, Any]:
        if self.running_since is not None:
            state: dict[str, Any] = {"running": {"startedAt": rfc3339(self.running_since)}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated.as_dict(self.container_id)}
        else:
            waiting: dict[str, Any] = {"reason": self.waiting_reason or "ContainerCreating"}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            state = {"waiting": waiting}
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image or "ignored",
            "imageID": "",
            "ready": self.ready and self.running_since is not None,
            "started": self.started and self.running_since is not None,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated.as_dict(self.container_id)} if self.last_terminated else {},
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


def pod_phase(restart_policy: str, init_done: bool, init_failed: bool, containers: list[ContainerFacts]) -> str:
    """The kubelet's getPhase, reduced to what local processes can show."""
    if init_failed:
        return "Failed"
    if not init_done:
        return "Pending"
    running = sum(c.running_since is not None for c in containers)
    exited = [c for c in containers if c.running_since is None and (c.terminated or c.last_terminated)]
    waiting = len(containers) - running - len(exited)
    if waiting:
        return "Pending"
    if running:
        return "Running"
    last = [c.terminated or c.last_terminated for c in exited]
    succeeded = all(t is not None and t.exit_code == 0 for t in last)
    if restart_policy == "Always":
        return "Running"
    if restart_policy == "OnFailure":
        return "Succeeded" if succeeded else "Running"
    return "Succeeded" if succeeded else "Failed"


def _condition(ctype: str, ok: bool, now: float, previous: dict[str, dict], reason: str = "") -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(ctype)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else rfc3339(now)
    cond = {"type": ctype, "status": status, "lastTransitionTime": since, "lastProbeTime": None}
    if not ok and reason:
        cond["reason"] = reason
    return cond


def pod_conditions(
    existing: list[dict],
    *,
    sandbox_ready: bool,
    init_done: bool,
    containers: list[ContainerFacts],
    readiness_gates: list[str],
    terminal: bool,
    now: float,
) -> list[dict]:
    """Our four conditions updated in place; conditions others own (PodScheduled, ...) kept as they are."""
    previous = {c["type"]: c for c in existing}
    containers_ready = bool(containers) and all(c.ready and c.running_since is not None for c in containers)
    if terminal:
        containers_ready = False
    gates_ok = all(previous.get(g, {}).get("status") == "True" for g in readiness_gates)
    ours = {
        "PodReadyToStartContainers": _condition("PodReadyToStartContainers", sandbox_ready and not terminal, now, previous),
        "Initialized": _condition("Initialized", init_done, now, previous, "ContainersNotInitialized"),
        "ContainersReady": _condition("ContainersReady", containers_ready, now, previous, "ContainersNotReady"),
        "Ready": _condition(
            "Ready", containers_ready and gates_ok, now, previous,
            "ContainersNotReady" if not containers_ready else "ReadinessGatesNotReady",
        ),
    }  # fmt: skip
    out = [ours.pop(c["type"]) if c["type"] in ours else c for c in existing]
    return out + [ours[t] for t in OWN_CONDITIONS if t in ours]
