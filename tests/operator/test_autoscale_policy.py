"""The autoscaling policy on simulated time: ratio rule, tolerance, windows, panic, gates, TP steps.

Each table row is computed by hand from the rule it names (the HPA ratio rule, KPA's panic threshold,
the budget arithmetic), not from running the code.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from pagedserve.operator.autoscale_policy import (
    Decision,
    Observation,
    Policy,
    ScalerState,
    decide,
    replicas_for_switch,
    valid_tp,
)

TICK = 5.0


def obs(t: float, replicas: int, waiting: float | None, kv: float | None, **kw) -> Observation:
    return Observation(time=t, current_replicas=replicas, ready_replicas=kw.pop("ready", replicas), waiting=waiting,
                       running=kw.pop("running", 0.0), kv_cache_usage=kv, **kw)


def drive(policy: Policy, load: Callable[[float, int], tuple[float, float]], seconds: float, replicas: int = 1,
          state: ScalerState | None = None, start: float = 0.0) -> tuple[list[Decision], ScalerState, Policy]:
    """Tick every 5 s; `load(t, replicas)` -> (total waiting, total KV use in replicas' worth). Replicas become
    ready at once and TP changes take effect at once (the operator's rollout is not under test here)."""
    state = state or ScalerState()
    decisions = []
    t = start
    while t < start + seconds:
        waiting, kv_total = load(t, replicas)
        d = decide(policy, state, obs(t, replicas, waiting, min(1.0, kv_total / max(replicas, 1))))
        decisions.append(d)
        state, replicas = d.state, d.replicas
        policy = replace(policy, tensor_parallel_size=d.tensor_parallel_size)
        t += TICK
    return decisions, state, policy


def direction_changes(decisions: list[Decision]) -> int:
    moves = [d.action for d in decisions if d.action in ("scale_up", "scale_down")]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if a != b)


# ------------------------------------------------------------------------------------- one tick, no memory

ONE_TICK = [
    # (ready, waiting, kv, expected replicas, expected reason)
    (2, 0, 0.80, 2, "WithinTolerance"),
    (2, 0, 0.85, 2, "WithinTolerance"),  # 0.85/0.8 = 1.06: inside the 10% band
    (2, 0, 1.00, 3, "KVCacheUsage"),  # ceil(2 * 1.0/0.8) = 3
    (2, 12, 0.50, 3, "QueueDepth"),  # queue: ceil(2 * 6/4) = 3 beats KV: ceil(2 * 0.625) = 2
    (2, 40, 0.90, 4, "Panic"),  # queue wants 10 >= 2 x 2 ready: panic; step limit ceil(2 * 2) = 4
    (4, 20, 0.95, 4, "AtMaxReplicas"),  # wants 5, maxReplicas 4
    (4, 0, 0.10, 2, "KVCacheUsage"),  # wants ceil(4 * 0.125) = 1, down-rate 2 allows 2; 0.1*4/2 = 0.2 fits
    (6, 0, 0.80, 4, "Bounds"),  # above maxReplicas (a hand edit): back to 4
    (1, 0, 0.0, 1, "AtMinReplicas"),  # idle at minReplicas: wants 0, 1 is the fewest allowed
]


@pytest.mark.parametrize("ready, waiting, kv, replicas, reason", ONE_TICK)
def test_one_tick(ready: int, waiting: float, kv: float, replicas: int, reason: str) -> None:
    policy = Policy(min_replicas=1, max_replicas=4)
    d = decide(policy, ScalerState(), obs(1000.0, ready, waiting, kv))
    assert (d.replicas, d.reason) == (replicas, reason), d.message
    assert d.action == ("hold" if replicas == ready else "scale_up" if replicas > ready else "scale_down")
    assert d.metrics["waiting"] == waiting and d.metrics["kv_cache_usage"] == pytest.approx(kv)


def test_gpu_budget_lowers_max_replicas() -> None:
    policy = Policy(max_replicas=4, tensor_parallel_size=2, gpu_budget=6)  # 6 // 2 = 3 replicas at most
    d = decide(policy, ScalerState(), obs(0.0, 3, 40, 0.95))
    assert (d.replicas, d.reason) == (3, "AtMaxReplicas")
    d = decide(policy, ScalerState(), obs(0.0, 2, 40, 0.95))
    assert (d.action, d.replicas) == ("scale_up", 3)


def test_rate_limits_each_step() -> None:
    policy = Policy(min_replicas=1, max_replicas=64, scale_down_cooldown_s=0, scale_down_stabilization_s=0,
                    panic_threshold=1000)  # no panic: this is about the step limits
    decisions, _, _ = drive(policy, lambda t, r: (400.0 if t < 100 else 0.0, 0.0), 200)
    ups = [d.replicas for d in decisions if d.action == "scale_up"]
    downs = [d.replicas for d in decisions if d.action == "scale_down"]
    assert ups[:4] == [2, 4, 8, 16]  # doubling, then 32, 64 (400 / 4 = 100 wanted, max 64)
    assert ups[-1] == 64
    assert downs == [32, 16, 8, 4, 2, 1]  # halving, once the window has emptied of the burst


# ------------------------------------------------------------------------------- windows and hysteresis


def test_fast_up_slow_down() -> None:
    policy = Policy(max_replicas=8)
    busy = lambda t, r: (0.0, 3.0 if t < 600 else 0.5)  # noqa: E731  (3 replicas' worth of KV, then 0.5)
    decisions, _, _ = drive(policy, busy, 1500)
    first_up = next(i for i, d in enumerate(decisions) if d.action == "scale_up")
    assert first_up == 0 and decisions[0].replicas == 2  # first tick: ceil(1 * 1.0/0.8)=2, step limit 2
    assert max(d.replicas for d in decisions) == 4  # 3 replicas' worth at 0.8 each: ceil(3/0.8) = 4
    first_down = next(d for d in decisions if d.action == "scale_down")
    # Load fell at t=600; the down-window (300 s) must forget every high recommendation first.
    assert first_down.state.last_scale_time is not None
    assert 600 + 300 - TICK <= first_down.state.last_scale_time <= 600 + 300 + 60
    assert decisions[-1].replicas == 1


def test_scale_up_stabilization_needs_the_whole_window_to_agree() -> None:
    # A 5 s stable window makes each tick's recommendation its own reading; no panic: only the up-window acts.
    policy = Policy(max_replicas=8, stable_window_s=TICK, scale_up_stabilization_s=30, panic_threshold=1000)
    spike = lambda t, r: (0.0, 1.2 if t % 20 == 10 else 0.7)  # noqa: E731  one high tick in four
    decisions, state, _ = drive(policy, spike, 300)
    assert all(d.action == "hold" for d in decisions)
    assert {d.reason for d in decisions} == {"StabilizingUp", "WithinTolerance"}
    decisions, _, _ = drive(policy, lambda t, r: (0.0, 1.2), 60, state=state, start=300)
    first_up = next(i for i, d in enumerate(decisions) if d.action == "scale_up")
    assert first_up * TICK == 25  # every recommendation in (t-30, t] wants 2: the sixth high tick


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_flapping_on_noisy_load(seed: int) -> None:
    rng = random.Random(seed)
    noise = {}

    def noisy(t: float, r: int) -> tuple[float, float]:
        # Demand of 2.4 replicas' worth of KV (3 at target 0.8), +-40% white noise per scrape, Poisson-ish queue.
        noise.setdefault(t, (rng.uniform(-0.4, 0.4), rng.choice([0, 0, 0, 1, 2, 6])))
        return float(noise[t][1]), 2.4 * (1 + noise[t][0])

    policy = Policy(max_replicas=8)
    decisions, _, _ = drive(policy, noisy, 3600, replicas=3)
    naive = Policy(max_replicas=8, stable_window_s=TICK, panic_window_s=TICK, tolerance=0.0,
                   scale_down_stabilization_s=0, scale_down_cooldown_s=0, panic_threshold=1000)
    naive_decisions, _, _ = drive(naive, noisy, 3600, replicas=3)
    assert direction_changes(naive_decisions) >= 40  # the same input really is noisy
    assert direction_changes(decisions) <= 4
    assert sum(d.changed for d in decisions) <= 6
    assert all(2 <= d.replicas <= 5 for d in decisions)


# ------------------------------------------------------------------------------------------------ panic


def test_panic_scales_at_once_and_blocks_scale_down_for_a_stable_window() -> None:
    policy = Policy(max_replicas=16, scale_down_stabilization_s=0, scale_down_cooldown_s=0)
    calm = lambda t, r: (0.0, 1.6)  # noqa: E731  2 replicas at target
    _, state, _ = drive(policy, calm, 120, replicas=2)
    # A burst: 40 waiting at t=120 for 10 s. Panic-window demand 10 >= 2 x 2 ready.
    burst = lambda t, r: (40.0 if t < 130 else 0.0, 1.6)  # noqa: E731
    decisions, state, _ = drive(policy, burst, 200, replicas=2, state=state, start=120)
    assert (decisions[0].action, decisions[0].reason, decisions[0].replicas) == ("scale_up", "Panic", 4)
    assert decisions[0].metrics["panic"] == 1.0
    assert decisions[1].replicas == 8  # still panicking: the step limit doubles again
    # The burst ended at t=130; panic lasts a stable window (60 s) past the last panicky reading.
    in_panic = [d for d in decisions if d.metrics.get("panic") == 1.0]
    last_panic_time = 120 + TICK * (len(in_panic) - 1)
    assert 125 + 60 - TICK <= last_panic_time <= 125 + 60
    assert all(d.action != "scale_down" for d in in_panic)
    assert any(d.reason == "PanicNoScaleDown" for d in in_panic)
    downs = [i for i, d in enumerate(decisions) if d.action == "scale_down"]
    assert downs and downs[0] >= len(in_panic)  # scaling down starts only after panic mode ended


# --------------------------------------------------------------------------------- gates on scale-down


def test_pre_scale_down_check_keeps_replicas_while_the_windows_peak_would_overflow() -> None:
    policy = Policy(max_replicas=8, scale_down_stabilization_s=0, scale_down_cooldown_s=0, panic_threshold=1000)
    load = lambda t, r: (0.0, 2.8 if t == 0 else 0.4)  # noqa: E731  one peak (0.7 each on 4), then 0.1 each
    decisions, _, _ = drive(policy, load, 120, replicas=4)
    assert decisions[0].action == "hold"  # 0.7/0.8 wants ceil(3.5) = 4
    # The mean falls at once, but 2.8 replicas' worth over 2 (or 3) would be 1.4 (0.93) > 0.8.
    assert decisions[1].reason == "PreScaleDownCheck" and decisions[1].replicas == 4
    first_down = next(i for i, d in enumerate(decisions) if d.action == "scale_down")
    assert first_down * TICK == 60  # the peak left the 60 s stable window
    assert decisions[first_down].replicas == 2


def test_cooldown_after_a_change_delays_scale_down() -> None:
    policy = Policy(max_replicas=8, scale_down_stabilization_s=0, scale_down_cooldown_s=300, panic_threshold=1000)
    load = lambda t, r: (0.0, 2.4 if t < 30 else 0.2)  # noqa: E731
    decisions, _, _ = drive(policy, load, 400, replicas=2)
    assert decisions[0].action == "scale_up"
    assert any(d.reason == "ScaleDownCooldown" for d in decisions)
    first_down = next(i for i, d in enumerate(decisions) if d.action == "scale_down")
    ups = [i for i, d in enumerate(decisions) if d.action == "scale_up"]
    assert (first_down - ups[-1]) * TICK >= 300


# ----------------------------------------------------------------------------------------- bad metrics

BAD = [
    (dict(waiting=None, kv=0.9), "MetricsMissing"),
    (dict(waiting=3, kv=None), "MetricsMissing"),
    (dict(waiting=30, kv=1.0, sample_time=1000 - 31), "MetricsStale"),
    (dict(waiting=30, kv=1.0, ready=0), "NoReadyReplicas"),
]


@pytest.mark.parametrize("kw, reason", BAD)
def test_missing_or_stale_metrics_hold(kw: dict, reason: str) -> None:
    kw = dict(kw)
    d = decide(Policy(max_replicas=8), ScalerState(), obs(1000.0, 2, kw.pop("waiting"), kw.pop("kv"), **kw))
    assert (d.action, d.replicas, d.reason) == ("hold", 2, reason)
    assert d.state.samples == ()  # a reading we do not trust is not remembered either


def test_stale_tick_in_the_middle_changes_nothing() -> None:
    policy = Policy(max_replicas=8)
    _, state, _ = drive(policy, lambda t, r: (0.0, 1.6), 60, replicas=2)
    d = decide(policy, state, obs(60.0, 2, 500, 1.0, sample_time=0.0))
    assert (d.action, d.reason) == ("hold", "MetricsStale")
    assert d.state.samples == state.samples


def test_partial_metrics_allow_scale_up_but_not_down() -> None:
    policy = Policy(max_replicas=8, scale_down_stabilization_s=0, scale_down_cooldown_s=0)
    down = decide(policy, ScalerState(), obs(0.0, 4, 0, 0.1, pods_reporting=3))
    assert (down.action, down.reason) == ("hold", "MetricsIncomplete")
    up = decide(policy, ScalerState(), obs(0.0, 4, 0, 1.0, pods_reporting=3))
    assert (up.action, up.replicas) == ("scale_up", 5)


def test_no_scaling_while_new_replicas_start_except_up_in_panic() -> None:
    policy = Policy(max_replicas=16, scale_down_cooldown_s=0, scale_down_stabilization_s=0)
    for waiting, kv in [(0, 1.0), (0, 0.1), (12, 1.0)]:  # wants 3, 1 and 4+ replicas; 4 asked for, 2 ready
        d = decide(replace(policy, panic_threshold=1000), ScalerState(), obs(0.0, 4, waiting, kv, ready=2))
        assert (d.action, d.reason) == ("hold", "ReplicasStarting")
    d = decide(policy, ScalerState(), obs(0.0, 4, 40, 1.0, ready=2))  # panic: 10 >= 2 x 2 ready
    assert (d.action, d.reason, d.replicas) == ("scale_up", "Panic", 8)


# ---------------------------------------------------------------------------------------- TP degree

VALID = [
    # (kv heads, attention heads, tp, valid)
    (8, 32, 1, True), (8, 32, 2, True), (8, 32, 4, True), (8, 32, 8, True),
    (6, 12, 2, True), (6, 12, 4, False),  # 6 KV heads split neither 4 ways nor replicate 4 ways
    (2, 16, 4, True), (2, 16, 8, True),  # 2 KV heads replicated on 4 or 8 ranks
    (8, 12, 8, False),  # 12 query heads don't split 8 ways
    (None, None, 8, True),  # unknown model: trust the spec
]


@pytest.mark.parametrize("kv_heads, heads, tp, ok", VALID)
def test_valid_tp(kv_heads: int | None, heads: int | None, tp: int, ok: bool) -> None:
    assert valid_tp(Policy(num_kv_heads=kv_heads, num_attention_heads=heads), tp) is ok


SWITCH = [
    # (tp, new tp, replicas, max replicas, budget, replicas of the new degree)
    (1, 2, 4, 4, 8, 2),  # old 4 GPUs + new 2 x 2 = 8 fits; 2 x 2 >= the 4 GPUs serving now
    (1, 2, 4, 4, 4, None),  # the budget is already full: no room for a blue/green switch
    (1, 2, 4, 4, None, 4),  # no budget: same replica count
    (2, 1, 1, 4, 8, 1),
    (1, 4, 2, 4, 16, 2),  # old 2 + new 4 x 2 = 10 fits
]


@pytest.mark.parametrize("tp, new_tp, replicas, max_replicas, budget, want", SWITCH)
def test_replicas_for_switch(tp, new_tp, replicas, max_replicas, budget, want) -> None:
    policy = Policy(tensor_parallel_size=tp, max_replicas=max_replicas, gpu_budget=budget)
    assert replicas_for_switch(policy, new_tp, replicas) == want


def test_switch_that_would_lose_gpus_is_refused() -> None:
    policy = Policy(tensor_parallel_size=2, max_replicas=4, gpu_budget=12)
    assert replicas_for_switch(policy, 4, 3) is None  # room for 1 x TP4 (4 GPUs) < 6 GPUs serving now


def pinned(t: float, r: int) -> tuple[float, float]:
    return 20.0, 0.95 * r  # KV at 0.95 on every replica, 20 waiting: more replicas would not cure it here


def tp_policy(**kw) -> Policy:
    base = dict(min_replicas=1, max_replicas=4, allowed_tp=(1, 2), gpu_budget=8, tensor_parallel_size=1,
                num_kv_heads=8, num_attention_heads=32)
    return Policy(**{**base, **kw})


def test_tp_steps_up_when_replicas_are_exhausted() -> None:
    decisions, _, _ = drive(tp_policy(), pinned, 400, replicas=4)
    i = next(i for i, d in enumerate(decisions) if d.action == "tp_up")
    assert (decisions[i].tensor_parallel_size, decisions[i].replicas, decisions[i].reason) == (2, 2, "ReplicasExhausted")
    assert i * TICK == 120  # the pressure window, from the first pinned tick
    assert all(d.reason == "AtMaxReplicas" for d in decisions[1:i])
    assert decisions[i].metrics["from_tensor_parallel_size"] == 1.0


def test_tp_does_not_step_up_without_a_queue_or_below_max_replicas() -> None:
    no_queue = lambda t, r: (0.0, 0.95 * r)  # noqa: E731  KV high but nobody waits
    decisions, _, _ = drive(tp_policy(), no_queue, 600, replicas=4)
    assert not any(d.action.startswith("tp") for d in decisions)
    decisions, _, _ = drive(tp_policy(max_replicas=8), pinned, 300, replicas=2)
    assert not any(d.action.startswith("tp") for d in decisions[:3])  # more replicas come first


def test_tp_respects_budget_and_kv_heads() -> None:
    decisions, _, _ = drive(tp_policy(gpu_budget=4), pinned, 600, replicas=4)
    assert not any(d.action.startswith("tp") for d in decisions)
    decisions, _, _ = drive(tp_policy(allowed_tp=(2, 4), tensor_parallel_size=2, num_kv_heads=6,
                                      num_attention_heads=12, gpu_budget=None, max_replicas=2), pinned, 600, 2)
    assert not any(d.action.startswith("tp") for d in decisions)


def test_tp_cooldown_spaces_changes() -> None:
    policy = tp_policy(allowed_tp=(1, 2, 4), gpu_budget=None, tp_cooldown_s=900)
    decisions, _, _ = drive(policy, pinned, 1500, replicas=4)
    changes = [(i * TICK, d.tensor_parallel_size) for i, d in enumerate(decisions) if d.action == "tp_up"]
    assert [tp for _, tp in changes] == [2, 4]
    assert changes[0][0] == 120 and changes[1][0] - changes[0][0] >= 900


def test_tp_steps_down_after_sustained_low_load_only() -> None:
    policy = tp_policy(tensor_parallel_size=2, tp_down_window_s=1800)
    quiet = lambda t, r: (0.0, 0.1)  # noqa: E731  0.1 at TP 2 -> 0.2 at TP 1 <= 0.6 x 0.8
    decisions, _, _ = drive(policy, quiet, 2000, replicas=1)
    i = next(i for i, d in enumerate(decisions) if d.action == "tp_down")
    assert i * TICK == 1800 and decisions[i].tensor_parallel_size == 1 and decisions[i].reason == "SustainedLowLoad"
    # One busy minute in the middle restarts the clock.
    blip = lambda t, r: (0.0, 0.1 if not 900 <= t < 960 else 0.7)  # noqa: E731
    decisions, _, _ = drive(policy, blip, 3000, replicas=1)
    i = next(i for i, d in enumerate(decisions) if d.action == "tp_down")
    # The clock restarts once the window's mean falls back under the limit, within a stable window of the blip.
    assert 960 + 1800 <= i * TICK <= 960 + 60 + 1800


def test_oom_steps_up_at_once_and_blocks_stepping_back_down() -> None:
    policy = tp_policy(tp_cooldown_s=900, tp_down_window_s=600)
    state = ScalerState(last_tp_change_time=0.0)  # inside the cooldown: OOM overrides it
    d = decide(policy, state, obs(10.0, 2, None, None, oom_kills=1))
    assert (d.action, d.tensor_parallel_size, d.reason) == ("tp_up", 2, "OutOfMemory")
    assert d.state.min_tp_that_fits == 2
    quiet = lambda t, r: (0.0, 0.05)  # noqa: E731
    decisions, _, _ = drive(replace(policy, tensor_parallel_size=2, tp_cooldown_s=0), quiet, 1200, replicas=1,
                            state=d.state, start=20)
    assert not any(x.action == "tp_down" for x in decisions)


def test_no_tp_change_during_a_tp_rollout() -> None:
    policy = tp_policy(tp_up_window_s=0)
    d = decide(policy, ScalerState(), obs(0.0, 4, 20, 0.95, tp_rollout_in_progress=True))
    assert d.action == "hold"


# ------------------------------------------------------------------------- windows set from the spec


def calm_then_pinned(t: float, r: int) -> tuple[float, float]:
    """Calm (nothing waiting, KV at 0.5) until t=100, then pinned (20 waiting, KV at 0.95) from t=100 on."""
    return (0.0, 0.5 * r) if t < 100 else pinned(t, r)


TP_UP_WINDOWS = [
    # (stable window, up-window, pressure from, tp_up at). Pressure needs every sample of the stable window
    # (t - stable, t] pinned; the last calm one is at t=95, so it starts at the first 5 s tick >= 95 + stable.
    # The step comes at the first tick at least `up-window` after that.
    (6, 0, 105, 105),  # at t=100 the 6 s window still holds t=95's calm sample
    (6, 15, 105, 120),
    (6, 17, 105, 125),  # 17 s of pressure are first seen 20 s in
    (10, 30, 105, 135),
    (20, 30, 115, 145),
    (60, 0, 155, 155),
    (60, 120, 155, 275),  # the defaults
]


@pytest.mark.parametrize("stable, up_window, pressure_from, step_at", TP_UP_WINDOWS)
def test_tp_up_window_and_stable_window(stable: float, up_window: float, pressure_from: float,
                                        step_at: float) -> None:
    # min = max = 4: the calm phase scales nothing down; no budget: minReplicas 4 holds at TP 2 as well.
    policy = tp_policy(min_replicas=4, gpu_budget=None, stable_window_s=stable, tp_up_window_s=up_window)
    decisions, _, _ = drive(policy, calm_then_pinned, 400, replicas=4)
    i = next(i for i, d in enumerate(decisions) if d.action == "tp_up")
    assert i * TICK == step_at, [d.reason for d in decisions[: i + 1]]
    assert (decisions[i].tensor_parallel_size, decisions[i].replicas, decisions[i].reason) == (2, 4, "ReplicasExhausted")
    assert f"waiting for {step_at - pressure_from:.0f}s" in decisions[i].message
    assert all(d.action == "hold" for d in decisions[:i])


TP_DOWN_WINDOWS = [
    # (down-window, time of the tp_down): low load from the first tick, so the clock starts at t=0.
    (0, 0),
    (300, 300),
    (302, 305),
    (1800, 1800),
]


@pytest.mark.parametrize("down_window, step_at", TP_DOWN_WINDOWS)
def test_tp_down_window(down_window: float, step_at: float) -> None:
    policy = tp_policy(tensor_parallel_size=2, tp_down_window_s=down_window)
    quiet = lambda t, r: (0.0, 0.1)  # noqa: E731  0.1 at TP 2 -> 0.2 at TP 1 <= 0.6 x 0.8
    decisions, _, _ = drive(policy, quiet, 2000, replicas=1)
    i = next(i for i, d in enumerate(decisions) if d.action == "tp_down")
    assert i * TICK == step_at
    assert (decisions[i].tensor_parallel_size, decisions[i].reason) == (1, "SustainedLowLoad")
