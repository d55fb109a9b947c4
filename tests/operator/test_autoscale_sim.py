"""The 24-hour simulation (bench/autoscale_sim.py): replicas track demand, moves are few, TP pays off.

The reference for "tracking" is independent of the policy: the replicas a request rate needs at the KV
target, from the capacity model alone, compared minute by minute with the replicas that were ready.
"""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import sys
from dataclasses import replace

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("autoscale_sim", ROOT / "bench" / "autoscale_sim.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules["autoscale_sim"] = sim  # dataclasses look their module up by name
_spec.loader.exec_module(sim)

LAG_MINUTES = 3  # a replica asked for serves after its 2-minute start; the tick and windows add a little


@pytest.fixture(scope="module")
def results() -> dict:
    return sim.run_all(sim.Trace(seed=7), sim.Capacity(), sim.default_policy())


@pytest.mark.parametrize("seed", [7, 11])
def test_replicas_track_demand(seed: int) -> None:
    policy, cap = sim.default_policy(), sim.Capacity()
    run = sim.simulate(replace(policy, allowed_tp=()), sim.Trace(seed=seed), cap, tp=1)
    timeline = run["timeline"]
    needed = [min(policy.max_replicas, max(policy.min_replicas, sim.needed_replicas(rate, cap, 1, 0.8)))
              for _, rate, _, _, _ in timeline]
    ready = [row[2] for row in timeline]
    pairs = list(zip(needed[:-LAG_MINUTES], ready[LAG_MINUTES:], strict=True))
    close = sum(abs(n - r) <= 1 for n, r in pairs) / len(pairs)
    assert close >= 0.9, f"ready replicas within 1 of the need only {close:.0%} of minutes"
    assert statistics.correlation([n for n, _ in pairs], [r for _, r in pairs]) >= 0.85


def test_direction_changes_are_bounded(results: dict) -> None:
    for name in ("replicas_only", "replicas_and_tp"):
        run = results[name]
        assert run["direction_changes"] <= 30, name  # about one an hour, on a trace with 12 bursts
        assert run["replica_changes"] <= 80, name
    assert results["static"]["replica_changes"] == 0
    assert 1 <= results["replicas_and_tp"]["tp_changes"] <= 4
    assert results["replicas_only"]["tp_changes"] == 0


def test_autoscaling_saves_gpus_and_tp_cuts_time_over_slo(results: dict) -> None:
    static, replicas_only, with_tp = results["static"], results["replicas_only"], results["replicas_and_tp"]
    assert replicas_only["gpu_hours"] < 0.7 * static["gpu_hours"]
    assert with_tp["gpu_hours"] < 0.7 * static["gpu_hours"]
    # Bursts beyond maxReplicas: only a higher TP degree serves them.
    assert with_tp["time_over_slo_s"] < 0.6 * replicas_only["time_over_slo_s"]
    assert with_tp["requests_rejected"] < 0.5 * replicas_only["requests_rejected"]
