"""One reconcile pass of one LLMDeployment: observe, plan, act, report. Level-based and idempotent.

Every pass starts from what the API server shows (the object, its Deployments, its Service), so it
does the same whether it follows a spec change, a child deleted by hand, or an operator restart.
A pass that finds everything as wanted writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
import pydantic

from pagedserve.operator import builders, conditions, rollout
from pagedserve.operator.api import GROUP, PLURAL, VERSION, LLMDeploymentSpec, served_model_name
from pagedserve.operator.kube import Conflict, Kube, object_path, path

logger = logging.getLogger(__name__)

# (event type, reason, message) -> posted as a Kubernetes Event on the LLMDeployment.
Emit = Callable[[str, str, str], None]

REQUEUE_WHILE_PROGRESSING = 5.0


@dataclass
class Result:
    plan: rollout.Plan | None = None
    writes: list[str] = field(default_factory=list)  # "created Deployment/x", "updated Service/y", ...
    status_written: bool = False
    requeue_after: float | None = None


def is_subset(want: Any, have: Any) -> bool:
    """Does `have` already hold everything in `want`? (Extra fields are server defaults; they don't count.)"""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    return want == have


# Maps that must equal ours exactly, not merely contain it: an extra selector key would route nowhere.
EXACT_MAPS = {"Service": [("spec", "selector")]}


def stray_keys_patch(want: dict[str, Any], have: dict[str, Any]) -> dict[str, Any] | None:
    """A merge patch removing keys someone else added to a map we own exactly (SSA would keep them)."""
    patch: dict[str, Any] = {}
    for keys in EXACT_MAPS.get(want["kind"], []):
        wanted, current = want, have
        for key in keys:
            wanted, current = (wanted or {}).get(key) or {}, (current or {}).get(key) or {}
        stray = {k: None for k in current if k not in wanted}
        if stray:
            node = patch
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = stray
    return patch or None


async def apply_child(kube: Kube, want: dict[str, Any], have: dict[str, Any] | None, result: Result) -> None:
    """Create the child, or server-side-apply it when it drifted from what we want."""
    ref = f"{want['kind']}/{want['metadata']['name']}"
    if have is None:
        try:
            await kube.create(want)
            result.writes.append(f"created {ref}")
            return
        except Conflict:  # created meanwhile (another writer, or our cache was stale): compare with it
            have = await kube.get_or_none(object_path(want))
    stray = stray_keys_patch(want, have) if have is not None else None
    # Items of a list response carry no apiVersion/kind (the real API server's, unlike a mock's).
    fields = {k: v for k, v in want.items() if k not in ("apiVersion", "kind")}
    if have is not None and is_subset(fields, have) and stray is None:
        return
    if stray is not None:
        await kube.merge_patch(want, stray)
    await kube.apply(want)
    result.writes.append(f"updated {ref}")


def llmd_path(namespace: str, name: str) -> str:
    return path(f"{GROUP}/{VERSION}", PLURAL, namespace, name)


def deployment_tp(obj: dict[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(builders.LABEL_TP, "")
    return int(value) if value.isdigit() else None


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return not refs or any(ref.get("uid") == uid for ref in refs)


async def reconcile(kube: Kube, namespace: str, name: str, emit: Emit, now: Callable[[], str]) -> Result:
    """Bring the children of one LLMDeployment one step closer to its spec, and report in its status."""
    result = Result()
    body = await kube.get_or_none(llmd_path(namespace, name))
    if body is None or body["metadata"].get("deletionTimestamp"):
        return result  # gone or going: the garbage collector removes the children
    meta = body["metadata"]
    generation = int(meta.get("generation", 1))
    old_status = body.get("status") or {}
    try:
        spec = LLMDeploymentSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        await write_invalid(kube, body, old_status, generation, str(exc), now, result)
        return result

    # Observe.
    deployments = await kube.list(path("apps/v1", "deployments", namespace), builders.instance_labels(name))
    deployments = [d for d in deployments if owned_by(d, meta.get("uid", "")) and deployment_tp(d) is not None]
    by_tp = {deployment_tp(d): d for d in deployments}
    service = await kube.get_or_none(path("v1", "services", namespace, name))
    service_tp = None
    if service is not None:
        value = (service.get("spec", {}).get("selector") or {}).get(builders.LABEL_TP, "")
        service_tp = int(value) if value.isdigit() else None

    target_tp, desired = spec.tensor_parallel_size, spec.replicas
    want_deployment = adopt(builders.build_deployment(name, namespace, spec, target_tp, desired), body)
    want_hash = want_deployment["metadata"]["annotations"][builders.ANNOTATION_CONFIG_HASH]
    states = {
        tp: rollout.DeploymentState.from_object(tp, d, want_hash if tp == target_tp else None)
        for tp, d in by_tp.items()
    }
    plan = rollout.plan(target_tp, desired, service_tp, states)
    result.plan = plan

    # Act: the target generation, the Service (possibly switching traffic), the PDB, then retire the old.
    await apply_child(kube, want_deployment, by_tp.get(target_tp), result)
    await apply_child(kube, adopt(builders.build_service(name, namespace, spec, plan.serving_tp), body), service,
                      result)
    pdb = await kube.get_or_none(path("policy/v1", "poddisruptionbudgets", namespace, name))
    await apply_child(kube, adopt(builders.build_pdb(name, namespace), body), pdb, result)
    for tp in plan.delete_tps:
        await kube.delete(by_tp[tp])
    for note in plan.notes:
        emit("Normal", "Rollout", note)
    for write in result.writes:
        emit("Normal", "Reconciled", write)

    # Report.
    serving = by_tp.get(plan.serving_tp) or {}
    serving_status = serving.get("status") or {}
    annotations = (serving.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations")) or {}
    stamp = now()
    wanted_conditions = [
        conditions.condition(conditions.READY, plan.ready.status, plan.ready.reason, plan.ready.message, generation,
                             stamp),
        conditions.condition(conditions.PROGRESSING, plan.progressing.status, plan.progressing.reason,
                             plan.progressing.message, generation, stamp),
        conditions.condition(conditions.DEGRADED, plan.degraded.status, plan.degraded.reason,
                             plan.degraded.message, generation, stamp),
    ]
    status = {
        **old_status,
        "observedGeneration": generation,
        "phase": rollout.phase(plan),
        "conditions": conditions.merge(old_status.get("conditions") or [], wanted_conditions),
        "replicas": int(serving_status.get("replicas", 0)),
        "readyReplicas": int(serving_status.get("readyReplicas", 0)),
        "tensorParallelSize": plan.serving_tp,
        "targetTensorParallelSize": target_tp if plan.serving_tp != target_tp else None,
        "selector": builders.selector_string(builders.instance_labels(name)),
        "endpoint": builders.service_endpoint(name, namespace, spec),
        "servedModel": annotations.get(builders.ANNOTATION_SERVED_MODEL, served_model_name(spec, name)),
        "modelRevision": annotations.get(builders.ANNOTATION_MODEL_REVISION, spec.model.revision),
    }
    if status.get("targetTensorParallelSize") is None:
        status.pop("targetTensorParallelSize")
    await write_status(kube, body, old_status, status, emit, result)
    if plan.progressing.status or result.writes or plan.delete_tps:
        result.requeue_after = REQUEUE_WHILE_PROGRESSING
    return result


def adopt(child: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """Controller owner reference to the LLMDeployment (deleting it deletes the child), and its labels."""
    kopf.adopt(child, owner=owner)
    return child


async def write_status(
    kube: Kube, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any], emit: Emit, result: Result
) -> None:
    if new == old:
        return
    # A key we no longer report (e.g. targetTensorParallelSize after a switch) is removed by a null.
    patch = {**{key: None for key in old if key not in new}, **new}
    await kube.patch_status(body, patch)
    result.status_written = True
    old_phase, new_phase = old.get("phase"), new.get("phase")
    if old_phase != new_phase:
        kind = "Warning" if new_phase == "Degraded" else "Normal"
        message = next((c["message"] for c in new["conditions"] if c["type"] == "Degraded" and c["status"] == "True"),
                       "")
        emit(kind, new_phase or "Unknown", message or f"phase {old_phase or 'none'} -> {new_phase}")


async def write_invalid(
    kube: Kube, body: dict[str, Any], old: dict[str, Any], generation: int, error: str, now: Callable[[], str],
    result: Result,
) -> None:
    cond = conditions.condition(conditions.DEGRADED, True, "InvalidSpec", error[:1000], generation, now())
    status = {**old, "observedGeneration": generation, "phase": "Degraded",
              "conditions": conditions.merge(old.get("conditions") or [], [cond])}
    await write_status(kube, body, old, status, lambda *a: None, result)
