"""spec.autoscaling -> the policy the autoscaler runs: every timing the spec can set reaches `Policy`, the
spec's defaults are the policy's own, and out-of-range values are refused naming the field."""

from __future__ import annotations

import pydantic
import pytest

from pagedserve.operator.api import LLMDeploymentSpec
from pagedserve.operator.autoscale_policy import Policy
from pagedserve.operator.autoscaler import policy_from_spec

MODEL = {"hostPath": {"path": "/models/tiny"}}

# (spec.autoscaling, the Policy fields it must produce; hand-written, not read from the code under test)
SPEC_TO_POLICY = [
    ({}, dict(stable_window_s=60, tp_up_window_s=120, tp_down_window_s=1800, tp_cooldown_s=900,
              scale_up_stabilization_s=0, scale_down_stabilization_s=300, scale_down_cooldown_s=300)),
    ({"stableWindowSeconds": 10, "tensorParallelUpWindowSeconds": 15, "tensorParallelDownWindowSeconds": 600},
     dict(stable_window_s=10, tp_up_window_s=15, tp_down_window_s=600)),
    ({"tensorParallelUpWindowSeconds": 0, "tensorParallelCooldownSeconds": 30},
     dict(tp_up_window_s=0, tp_cooldown_s=30, stable_window_s=60, tp_down_window_s=1800)),
    ({"minReplicas": 1, "maxReplicas": 1, "allowedTensorParallelSizes": [1, 2], "gpuBudget": 4,
      "numKeyValueHeads": 2, "numAttentionHeads": 4, "stableWindowSeconds": 3600},
     dict(min_replicas=1, max_replicas=1, allowed_tp=(1, 2), gpu_budget=4, num_kv_heads=2, num_attention_heads=4,
          stable_window_s=3600)),
]


@pytest.mark.parametrize("autoscaling, fields", SPEC_TO_POLICY)
def test_spec_fields_reach_the_policy(autoscaling: dict, fields: dict) -> None:
    spec = LLMDeploymentSpec.model_validate({"model": MODEL, "autoscaling": autoscaling})
    policy = policy_from_spec(spec)
    assert {k: getattr(policy, k) for k in fields} == fields


def test_spec_defaults_are_the_policys_defaults() -> None:
    """A spec that sets nothing runs the policy's documented defaults (a drift in either shows here)."""
    policy = policy_from_spec(LLMDeploymentSpec.model_validate({"model": MODEL}))
    default = Policy()
    for name in ("stable_window_s", "tp_up_window_s", "tp_down_window_s", "tp_cooldown_s", "min_replicas",
                 "max_replicas", "target_queue_depth", "target_kv_cache_usage", "scale_up_stabilization_s",
                 "scale_down_stabilization_s"):
        assert getattr(policy, name) == getattr(default, name), name


INVALID = [  # each one past a bound, so its neighbour inside is the bound itself
    ("stableWindowSeconds", 5),  # under the 6 s panic window
    ("stableWindowSeconds", 3601),
    ("tensorParallelUpWindowSeconds", -1),
    ("tensorParallelUpWindowSeconds", 86401),
    ("tensorParallelDownWindowSeconds", -1),
    ("tensorParallelDownWindowSeconds", 604801),
]


@pytest.mark.parametrize("field, value", INVALID)
def test_out_of_range_windows_are_refused_naming_the_field(field: str, value: int) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        LLMDeploymentSpec.model_validate({"model": MODEL, "autoscaling": {field: value}})
    (error,) = err.value.errors()
    assert error["loc"] == ("autoscaling", field)
    # The neighbour inside the bounds is accepted.
    inside = value + 1 if error["type"] == "greater_than_equal" else value - 1
    spec = LLMDeploymentSpec.model_validate({"model": MODEL, "autoscaling": {field: inside}})
    assert spec.autoscaling.model_dump(by_alias=True)[field] == inside
