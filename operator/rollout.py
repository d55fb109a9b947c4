"""Rollout arithmetic: from what the cluster shows to the next step. Pure; no I/O, no clock.

Two kinds of rollout, both level-based (the next step follows from observed state alone, so an operator
restarted mid-rollout carries on):

* same TP degree (model, args, image change): the Deployment's own rolling update, with surge and no
  unavailability; we only read its progress, and its progress deadline;
* new TP degree: blue/green. A second Deployment at the new degree is scaled up beside the serving one;
  once all its pods are Ready the Service switches to it; the next step deletes the old Deployment.
  Which degree serves is read back from the Service selector, so no state lives anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Reasons the Deployment controller writes on its Progressing condition.
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
NEW_REPLICA_SET_AVAILABLE = "NewReplicaSetAvailable"


@dataclass(frozen=True)
class DeploymentState:
    """What one runtime Deployment reports, reduced to what the rollout decisions need."""

    tp: int
    replicas: int = 0  # spec.replicas
    status_replicas: int = 0  # pods of any template, not terminating
    updated_replicas: int = 0
    ready_replicas: int = 0
    available_replicas: int = 0
    up_to_date: bool = True  # the template carries the config hash we want now
    observed: bool = True  # status.observedGeneration caught up with metadata.generation
    deadline_exceeded: bool = False
    steady: bool = False  # the Deployment controller last called it complete (NewReplicaSetAvailable)

    @classmethod
    def from_object(cls, tp: int, obj: dict[str, Any], wanted_hash: str | None) -> DeploymentState:
        meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
        conditions = status.get("conditions") or []
        progress = next((c.get("reason") for c in conditions if c.get("type") == "Progressing"), None)
        current_hash = (meta.get("annotations") or {}).get("pagedserve.io/config-hash")
        return cls(
            tp=tp,
            replicas=int(spec.get("replicas", 1)),
            status_replicas=int(status.get("replicas", 0)),
            updated_replicas=int(status.get("updatedReplicas", 0)),
            ready_replicas=int(status.get("readyReplicas", 0)),
            available_replicas=int(status.get("availableReplicas", 0)),
            up_to_date=wanted_hash is None or current_hash == wanted_hash,
            observed=int(status.get("observedGeneration", 0)) >= int(meta.get("generation", 0)),
            deadline_exceeded=progress == PROGRESS_DEADLINE_EXCEEDED,
            steady=progress == NEW_REPLICA_SET_AVAILABLE,
        )


def template_current(dep: DeploymentState, desired_replicas: int) -> bool:
    """Every wanted pod runs the current template, and no pod of an older template is left."""
    return (
        dep.up_to_date
        and dep.observed
        and dep.replicas == desired_replicas
        and dep.updated_replicas >= desired_replicas
        and dep.status_replicas <= dep.updated_replicas
    )


def available(dep: DeploymentState | None, desired_replicas: int) -> bool:
    return dep is not None and dep.ready_replicas >= desired_replicas


@dataclass(frozen=True)
class Verdict:
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """The next step: what to serve, what to delete, and the Ready/Progressing/Degraded verdicts."""

    target_tp: int
    serving_tp: int
    delete_tps: tuple[int, ...]
    blue_green: bool
    ready: Verdict
    progressing: Verdict
    degraded: Verdict
    notes: tuple[str, ...] = field(default=())  # one-line events: what this step does


def plan(
    target_tp: int,
    desired_replicas: int,
    service_tp: int | None,
    deployments: dict[int, DeploymentState],
) -> Plan:
    """Decide the next rollout step from the observed Service selector and Deployments."""
    target = deployments.get(target_tp)
    old = deployments.get(service_tp) if service_tp is not None else None
    blue_green = service_tp is not None and service_tp != target_tp and old is not None
    notes: list[str] = []

    green_ready = target is not None and template_current(target, desired_replicas) and available(target, desired_replicas)
    if not blue_green:
        serving_tp, serving = target_tp, target
        if service_tp is not None and service_tp != target_tp:
            notes.append(f"TP {service_tp} has no Deployment left; serving TP {target_tp} directly")
    elif green_ready:
        serving_tp, serving = target_tp, target
        notes.append(f"switching traffic from TP {service_tp} to TP {target_tp}: {desired_replicas} replicas Ready")
    else:
        serving_tp, serving = service_tp, old
    # The blue generation outlives the switch by one pass, so endpoints move before its pods are told to stop.
    keep = {target_tp, service_tp} if blue_green else {target_tp}
    delete_tps = tuple(sorted(tp for tp in deployments if tp not in keep))
    notes.extend(f"removing the Deployment of TP {tp}" for tp in delete_tps)

    ready_now = serving is not None and (desired_replicas == 0 or available(serving, desired_replicas))
    waiting = _waiting(target, desired_replicas)
    exceeded = target is not None and target.deadline_exceeded and not green_ready
    if exceeded:
        progressing = Verdict(False, PROGRESS_DEADLINE_EXCEEDED, waiting)
    elif serving_tp != target_tp:
        progressing = Verdict(True, "BlueGreen", f"TP {service_tp} -> {target_tp}: {waiting}")
    elif target is None:
        progressing = Verdict(True, "Creating", f"creating the Deployment of TP {target_tp}")
    elif not template_current(target, desired_replicas):
        progressing = Verdict(True, "RollingUpdate", waiting)
    elif not ready_now and not target.steady:
        progressing = Verdict(True, "Scaling", waiting)
    else:
        progressing = Verdict(False, "RolloutComplete", f"{desired_replicas} replicas at TP {target_tp} up to date")

    if ready_now:
        ready = Verdict(True, "ReplicasReady", f"{desired_replicas} replicas Ready at TP {serving_tp}")
    else:
        have = serving.ready_replicas if serving is not None else 0
        ready = Verdict(False, "ReplicasNotReady", f"{have}/{desired_replicas} replicas Ready at TP {serving_tp}")

    if exceeded:
        degraded = Verdict(True, PROGRESS_DEADLINE_EXCEEDED, f"new pods not Ready in time ({waiting}); old pods keep serving")
    elif not ready_now and not progressing.status:
        degraded = Verdict(True, "ReplicasUnavailable", ready.message)
    else:
        degraded = Verdict(False, "AsExpected", "")
    return Plan(target_tp, serving_tp, delete_tps, blue_green, ready, progressing, degraded, tuple(notes))


def _waiting(dep: DeploymentState | None, desired_replicas: int) -> str:
    if dep is None:
        return f"0/{desired_replicas} new replicas Ready"
    return f"{min(dep.updated_replicas, dep.ready_replicas)}/{desired_replicas} new replicas Ready"


def phase(p: Plan) -> str:
    """One word for `kubectl get llmd`."""
    if p.degraded.status:
        return "Degraded"
    if p.progressing.status:
        return "Progressing"
    return "Ready" if p.ready.status else "Pending"
