"""One autoscaler tick of one LLMDeployment: read metrics, decide (autoscale_policy), act, explain.

It runs inside the object's reconcile loop (handlers.py), just before a reconcile pass, so the two never
race on the object: a replica change goes through the `/scale` subresource (the path `kubectl scale`,
HPA and KEDA use, so a user who turns this off can use those instead), a TP change patches
`spec.tensorParallelSize` (and the replicas of the new degree) in one write, and the reconcile pass
right after carries it out (blue/green for TP). `status.autoscaler` says what was decided, why, from which
metric values and when; every change is also a Kubernetes event and a count in the operator's /metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydantic
from prometheus_client import Counter, Gauge

from pagedserve.operator import conditions, metrics
from pagedserve.operator.api import LLMDeploymentSpec
from pagedserve.operator.autoscale_policy import Decision, Observation, Policy, ScalerState, decide
from pagedserve.operator.kube import Kube, object_path
from pagedserve.operator.prometheus import PodMetrics, Prometheus, PrometheusError

logger = logging.getLogger(__name__)

Emit = Callable[[str, str, str], None]

DECISIONS = Counter(
    "pagedserve_operator_autoscaler_decisions_total", "Autoscaler decisions by action and reason.",
    ["action", "reason"], registry=metrics.REGISTRY,
)
DESIRED_REPLICAS = Gauge(
    "pagedserve_operator_autoscaler_desired_replicas", "Replicas the autoscaler last wanted.",
    ["namespace", "name"], registry=metrics.REGISTRY,
)

SCALING_ACTIVE = "ScalingActive"  # False while metrics are missing or stale (as the HPA's condition of that name)
STATUS_REFRESH_SECONDS = 60.0  # rewrite status.autoscaler at least this often while nothing changes
EVENT_REASONS = {"scale_up": "ScaledUp", "scale_down": "ScaledDown", "tp_up": "TensorParallelIncreased",
                 "tp_down": "TensorParallelDecreased"}


class MetricsSource(Protocol):
    async def pod_metrics(self, namespace: str, name: str, tp: int) -> PodMetrics: ...

    async def close(self) -> None: ...


def prometheus_source(url: str) -> MetricsSource:
    return Prometheus(url)


@dataclass
class Memory:
    """Per-object autoscaler memory, kept by the reconcile loop for the life of the loop."""

    state: ScalerState = field(default_factory=ScalerState)
    source: MetricsSource | None = None
    source_url: str | None = None
    last_status: dict[str, Any] | None = None
    last_status_time: float = -math.inf
    last_change_stamp: str | None = None

    async def close(self) -> None:
        if self.source is not None:
            await self.source.close()
            self.source = None


def policy_from_spec(spec: LLMDeploymentSpec) -> Policy:
    a = spec.autoscaling
    return Policy(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_queue_depth=a.target_queue_depth,
        target_kv_cache_usage=a.target_kv_cache_usage,
        scale_up_stabilization_s=a.scale_up_stabilization_seconds,
        scale_down_stabilization_s=a.scale_down_stabilization_seconds,
        scale_down_cooldown_s=a.scale_down_stabilization_seconds,
        stable_window_s=a.stable_window_seconds,
        tensor_parallel_size=spec.tensor_parallel_size,
        allowed_tp=tuple(a.allowed_tensor_parallel_sizes),
        gpu_budget=a.gpu_budget,
        num_kv_heads=a.num_key_value_heads,
        num_attention_heads=a.num_attention_heads,
        tp_cooldown_s=a.tensor_parallel_cooldown_seconds,
        tp_up_window_s=a.tensor_parallel_up_window_seconds,
        tp_down_window_s=a.tensor_parallel_down_window_seconds,
    )


def observe(spec: LLMDeploymentSpec, status: dict[str, Any], pods: PodMetrics | None, now: float) -> Observation:
    """The policy's input from the object's status and the metrics (None: they could not be read)."""
    serving_tp = int(status.get("tensorParallelSize") or spec.tensor_parallel_size)
    rolling = status.get("targetTensorParallelSize") is not None or serving_tp != spec.tensor_parallel_size
    if pods is None:
        waiting = kv = running = None
        sample_time: float | None = None
        reporting = 0
    else:
        waiting, kv, running, reporting = pods.waiting, pods.kv_cache_usage, pods.running, pods.pods_reporting
        # Ages on Prometheus' clock, moved onto ours; no timestamp at all counts as very old.
        sample_time = now - (pods.query_time - pods.sample_time) if pods.sample_time is not None else now - 1e9
    return Observation(
        time=now, current_replicas=spec.replicas, ready_replicas=int(status.get("readyReplicas") or 0),
        waiting=waiting, running=running, kv_cache_usage=kv, pods_reporting=reporting, sample_time=sample_time,
        tp_rollout_in_progress=rolling,
    )


async def read_metrics(memory: Memory, url: str, factory: Callable[[str], MetricsSource], namespace: str, name: str,
                       tp: int) -> tuple[PodMetrics | None, str | None]:
    if memory.source is None or memory.source_url != url:
        await memory.close()
        memory.source, memory.source_url = factory(url), url
    try:
        return await memory.source.pod_metrics(namespace, name, tp), None
    except PrometheusError as exc:
        return None, str(exc)


async def tick(
    kube: Kube, body: dict[str, Any], memory: Memory, *, default_url: str | None,
    factory: Callable[[str], MetricsSource], emit: Emit, now: float, stamp: str,
) -> Decision | None:
    """Decide for the object in `body` (fresh from the API server) and act. None when autoscaling is off."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        spec = LLMDeploymentSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError:
        return None  # reconcile reports the invalid spec
    if not spec.autoscaling.enabled or meta.get("deletionTimestamp"):
        return None
    status = body.get("status") or {}
    url = spec.autoscaling.prometheus_url or default_url
    serving_tp = int(status.get("tensorParallelSize") or spec.tensor_parallel_size)
    error = "no Prometheus URL: set spec.autoscaling.prometheusUrl or the chart's prometheusUrl"
    pods = None
    if url:
        pods, error = await read_metrics(memory, url, factory, namespace, name, serving_tp)
    decision = decide(policy_from_spec(spec), memory.state, observe(spec, status, pods, now))
    if error is not None:
        decision = Decision("hold", decision.replicas, decision.tensor_parallel_size, "MetricsUnavailable",
                            f"{error}; holding at {spec.replicas}", {}, decision.state)
    memory.state = decision.state
    DECISIONS.labels(decision.action, decision.reason).inc()
    DESIRED_REPLICAS.labels(namespace, name).set(decision.replicas)

    if decision.action in ("scale_up", "scale_down"):
        await kube.request("PATCH", object_path(body, "scale"), body={"spec": {"replicas": decision.replicas}},
                           content_type="application/merge-patch+json")
    elif decision.action in ("tp_up", "tp_down"):
        await kube.merge_patch(body, {"spec": {"tensorParallelSize": decision.tensor_parallel_size,
                                               "replicas": decision.replicas}})
    if decision.changed:
        memory.last_change_stamp = stamp
        emit("Normal", EVENT_REASONS[decision.action], decision.message)
        logger.info("%s/%s: %s (%s)", namespace, name, decision.message, decision.reason)
    await write_status(kube, body, spec, status, decision, memory, now, stamp)
    return decision


def upsert_condition(existing: list[dict[str, Any]], cond: dict[str, Any]) -> list[dict[str, Any]]:
    """Ours replaced in place (or appended), others' order kept: reconcile then finds its list unchanged."""
    merged = conditions.merge([c for c in existing if c.get("type") == cond["type"]], [cond])[0]
    if any(c.get("type") == cond["type"] for c in existing):
        return [merged if c.get("type") == cond["type"] else c for c in existing]
    return [*existing, merged]


HOLD_REASONS_WITHOUT_METRICS = ("MetricsMissing", "MetricsStale", "MetricsUnavailable", "NoReadyReplicas")


async def write_status(kube: Kube, body: dict[str, Any], spec: LLMDeploymentSpec, status: dict[str, Any],
                       decision: Decision, memory: Memory, now: float, stamp: str) -> None:
    """status.autoscaler and the ScalingActive condition, when the verdict changed or once a minute."""
    verdict = {
        "desiredReplicas": decision.replicas,
        "desiredTensorParallelSize": decision.tensor_parallel_size,
        "currentReplicas": spec.replicas,
        "readyReplicas": int(status.get("readyReplicas") or 0),
        "currentTensorParallelSize": int(status.get("tensorParallelSize") or spec.tensor_parallel_size),
        "lastDecision": decision.action,
        "lastDecisionReason": decision.reason,
    }
    if verdict == memory.last_status and now - memory.last_status_time < STATUS_REFRESH_SECONDS:
        return
    old = status.get("autoscaler") or {}
    new_metrics = {k: round(v, 4) for k, v in decision.metrics.items() if math.isfinite(v)}
    autoscaler: dict[str, Any] = {
        **verdict,
        "lastDecisionMessage": decision.message[:1000],
        "lastDecisionTime": stamp,
        "lastChangeTime": memory.last_change_stamp or old.get("lastChangeTime"),
        # A merge patch keeps keys it does not mention: clear the metric values this decision did not use.
        "metrics": {**{k: None for k in old.get("metrics") or {} if k not in new_metrics}, **new_metrics},
    }
    active = decision.reason not in HOLD_REASONS_WITHOUT_METRICS
    condition = conditions.condition(
        SCALING_ACTIVE, active, decision.reason,
        "the autoscaler acts on fresh metrics" if active else decision.message[:1000],
        int(body["metadata"].get("generation", 1)), stamp,
    )
    patch = {
        "autoscaler": {k: v for k, v in autoscaler.items() if v is not None or k == "metrics"},
        "conditions": upsert_condition(status.get("conditions") or [], condition),
    }
    await kube.patch_status(body, patch)
    memory.last_status, memory.last_status_time = verdict, now
