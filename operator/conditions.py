"""Kubernetes-style status conditions: build, merge (keeping lastTransitionTime), compare.

`lastTransitionTime` moves only when a condition's status flips, so a status rewritten with the same
verdicts is byte-identical and the reconciler can skip the write.
"""

from __future__ import annotations

import datetime
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type: str, status: bool | str, reason: str, message: str, observed_generation: int, now: str
) -> dict[str, Any]:
    """One condition as the API stores it (`status` is the string True/False/Unknown)."""
    if isinstance(status, bool):
        status = "True" if status else "False"
    return {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
        "observedGeneration": observed_generation,
    }


def merge(existing: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The wanted conditions, each keeping its old lastTransitionTime unless its status changed.

    Conditions of other types (written by someone else, e.g. the autoscaler) are kept as they are, after ours.
    """
    by_type = {c.get("type"): c for c in existing}
    merged = []
    for cond in wanted:
        old = by_type.get(cond["type"])
        if old is not None and old.get("status") == cond["status"] and old.get("lastTransitionTime"):
            cond = {**cond, "lastTransitionTime": old["lastTransitionTime"]}
        merged.append(cond)
    ours = {c["type"] for c in wanted}
    merged += [c for c in existing if c.get("type") not in ours]
    return merged


def find(conditions: list[dict[str, Any]], type: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type), None)


def is_true(conditions: list[dict[str, Any]], type: str) -> bool:
    cond = find(conditions, type)
    return cond is not None and cond.get("status") == "True"
