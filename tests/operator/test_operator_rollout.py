"""Rollout steps and condition helpers: pure functions, table-driven."""

from __future__ import annotations

import pytest

from pagedserve.operator import conditions, rollout
from pagedserve.operator.rollout import DeploymentState as D


def done(tp: int, n: int, **kw) -> D:
    """A Deployment whose n pods all run the current template and are Ready."""
    return D(tp=tp, replicas=n, status_replicas=n, updated_replicas=n, ready_replicas=n, available_replicas=n,
             steady=True, **kw)


def verdicts(p: rollout.Plan) -> tuple:
    return (p.ready.status, p.ready.reason), (p.progressing.status, p.progressing.reason), \
        (p.degraded.status, p.degraded.reason)


# name: (target_tp, desired, service_tp, deployments) -> (serving_tp, delete_tps, phase, verdicts)
CASES = {
    "fresh object": (
        (1, 2, None, {}),
        (1, (), "Progressing", ((False, "ReplicasNotReady"), (True, "Creating"), (False, "AsExpected")))),
    "steady": (
        (1, 2, 1, {1: done(1, 2)}),
        (1, (), "Ready", ((True, "ReplicasReady"), (False, "RolloutComplete"), (False, "AsExpected")))),
    "scaled to zero": (
        (1, 0, 1, {1: done(1, 0)}),
        (1, (), "Ready", ((True, "ReplicasReady"), (False, "RolloutComplete"), (False, "AsExpected")))),
    "rolling update: template changed, not yet observed": (
        (1, 2, 1, {1: done(1, 2, up_to_date=False)}),
        (1, (), "Progressing", ((True, "ReplicasReady"), (True, "RollingUpdate"), (False, "AsExpected")))),
    "rolling update: surge pod not ready yet": (
        (1, 2, 1, {1: D(1, 2, status_replicas=3, updated_replicas=1, ready_replicas=2, available_replicas=2)}),
        (1, (), "Progressing", ((True, "ReplicasReady"), (True, "RollingUpdate"), (False, "AsExpected")))),
    "rolling update: deadline exceeded, old pods serve": (
        (1, 2, 1, {1: D(1, 2, status_replicas=3, updated_replicas=1, ready_replicas=2, available_replicas=2,
                        deadline_exceeded=True)}),
        (1, (), "Degraded", ((True, "ReplicasReady"), (False, "ProgressDeadlineExceeded"),
                             (True, "ProgressDeadlineExceeded")))),
    "scaling up: new pods loading": (
        (1, 3, 1, {1: D(1, 3, status_replicas=3, updated_replicas=3, ready_replicas=1, available_replicas=1)}),
        (1, (), "Progressing", ((False, "ReplicasNotReady"), (True, "Scaling"), (False, "AsExpected")))),
    "steady, then a pod died": (
        (1, 3, 1, {1: D(1, 3, status_replicas=3, updated_replicas=3, ready_replicas=2, available_replicas=2,
                        steady=True)}),
        (1, (), "Degraded", ((False, "ReplicasNotReady"), (False, "RolloutComplete"), (True, "ReplicasUnavailable")))),
    "blue/green: green being created": (
        (2, 2, 1, {1: done(1, 2)}),
        (1, (), "Progressing", ((True, "ReplicasReady"), (True, "BlueGreen"), (False, "AsExpected")))),
    "blue/green: green half ready": (
        (2, 2, 1, {1: done(1, 2), 2: D(2, 2, status_replicas=2, updated_replicas=2, ready_replicas=1,
                                       available_replicas=1)}),
        (1, (), "Progressing", ((True, "ReplicasReady"), (True, "BlueGreen"), (False, "AsExpected")))),
    "blue/green: green ready, switch (old kept this step)": (
        (2, 2, 1, {1: done(1, 2), 2: done(2, 2)}),
        (2, (), "Ready", ((True, "ReplicasReady"), (False, "RolloutComplete"), (False, "AsExpected")))),
    "blue/green: switched, retire old": (
        (2, 2, 2, {1: done(1, 2), 2: done(2, 2)}),
        (2, (1,), "Ready", ((True, "ReplicasReady"), (False, "RolloutComplete"), (False, "AsExpected")))),
    "blue/green: green ready but stale template": (
        (2, 2, 1, {1: done(1, 2), 2: done(2, 2, up_to_date=False)}),
        (1, (), "Progressing", ((True, "ReplicasReady"), (True, "BlueGreen"), (False, "AsExpected")))),
    "blue/green: deadline exceeded keeps blue": (
        (2, 2, 1, {1: done(1, 2), 2: D(2, 2, status_replicas=2, updated_replicas=2, deadline_exceeded=True)}),
        (1, (), "Degraded", ((True, "ReplicasReady"), (False, "ProgressDeadlineExceeded"),
                             (True, "ProgressDeadlineExceeded")))),
    "blue/green: TP changed again mid-rollout drops the abandoned green": (
        (4, 2, 1, {1: done(1, 2), 2: D(2, 2)}),
        (1, (2,), "Progressing", ((True, "ReplicasReady"), (True, "BlueGreen"), (False, "AsExpected")))),
    "blue/green: reverted to the serving TP": (
        (1, 2, 1, {1: done(1, 2), 2: D(2, 2)}),
        (1, (2,), "Ready", ((True, "ReplicasReady"), (False, "RolloutComplete"), (False, "AsExpected")))),
    "serving Deployment deleted by hand mid-switch": (
        (2, 2, 1, {2: D(2, 2)}),
        (2, (), "Progressing", ((False, "ReplicasNotReady"), (True, "RollingUpdate"), (False, "AsExpected")))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan(name: str) -> None:
    (target_tp, desired, service_tp, deployments), (serving, delete, phase, expected) = CASES[name]
    p = rollout.plan(target_tp, desired, service_tp, deployments)
    assert (p.serving_tp, p.delete_tps, rollout.phase(p), verdicts(p)) == (serving, delete, phase, expected)


def test_state_from_deployment_object() -> None:
    obj = {
        "metadata": {"generation": 4, "annotations": {"pagedserve.io/config-hash": "abc"}},
        "spec": {"replicas": 3},
        "status": {"observedGeneration": 3, "replicas": 4, "updatedReplicas": 2, "readyReplicas": 3,
                   "availableReplicas": 3,
                   "conditions": [{"type": "Available", "reason": "MinimumReplicasAvailable"},
                                  {"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]},
    }
    assert D.from_object(2, obj, "abc") == D(tp=2, replicas=3, status_replicas=4, updated_replicas=2, ready_replicas=3,
                                             available_replicas=3, up_to_date=True, observed=False,
                                             deadline_exceeded=True, steady=False)
    assert D.from_object(2, obj, "other").up_to_date is False
    assert D.from_object(2, {"metadata": {}, "spec": {}}, None) == D(tp=2, replicas=1)


def test_condition_keeps_transition_time_until_status_flips() -> None:
    old = [conditions.condition("Ready", True, "ReplicasReady", "2 ready", 1, "2026-01-01T00:00:00Z"),
           {"type": "AutoscalerActive", "status": "True", "reason": "Metrics", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]
    same = conditions.merge(old, [conditions.condition("Ready", True, "ReplicasReady", "3 ready", 2, "2026-02-02T00:00:00Z")])
    assert same[0] == {"type": "Ready", "status": "True", "reason": "ReplicasReady", "message": "3 ready",
                       "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}
    assert same[1] == old[1]  # someone else's condition is kept as it was
    flipped = conditions.merge(old, [conditions.condition("Ready", False, "ReplicasNotReady", "", 2, "2026-02-02T00:00:00Z")])
    assert flipped[0]["lastTransitionTime"] == "2026-02-02T00:00:00Z"
    assert conditions.is_true(same, "Ready") and not conditions.is_true(flipped, "Ready")
    assert conditions.find(flipped, "Degraded") is None
