"""Autoscaling arithmetic: replicas and tensor-parallel degree from queue depth and KV-cache use. Pure.

`decide(policy, state, observation)` takes one observation of an LLMDeployment's pods and the memory of
earlier ticks (`ScalerState`, a frozen value the caller keeps) and returns a `Decision`: the replicas and
TP degree wanted now, a CamelCase reason, a sentence for people, the metric values it used, and the next
state. No clock, no I/O: the observation carries its own time, so tests and the simulation run on
simulated time.

Replicas follow the Horizontal Pod Autoscaler's ratio rule per signal (desired = ceil(ready * observed /
target), the larger signal wins, ratios within the tolerance band count as on target) averaged over
Knative KPA's windows: a stable window (60 s by default), and a 6 s panic window whose demand at 2x the ready
replicas scales up at once and forbids scaling down until a stable window has passed calmly. Scale-up
and scale-down have their own stabilisation windows (the smallest recommendation of the up-window, the
largest of the down-window: fast up, slow down), a cooldown after any change before scaling down, and
per-step rate limits. Before scaling down, the peak of the last stable window is spread over the
remaining replicas (llm-d's WVA simulates the redistribution the same way); if that would put them
over target, fewer are removed. Missing or stale metrics hold everything.

The TP degree steps up among the allowed degrees when replicas are exhausted (at maxReplicas, or the
GPU budget) while KV-cache use stays pinned above target with requests queueing for the up-window (120 s
by default), or at once when pods die out of memory; it steps down after load has stayed low for the
down-window (30 min by default) at minReplicas. Every
degree must split the model's KV heads evenly (or be a multiple of them: heads are then replicated), a
blue/green switch needs both generations' GPUs within the budget, and changes are spaced by a cooldown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

Action = Literal["hold", "scale_up", "scale_down", "tp_up", "tp_down"]


@dataclass(frozen=True)
class Policy:
    """Targets and timings; `from_spec` in the operator fills these from `spec.autoscaling`."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_queue_depth: float = 4.0  # waiting requests per replica
    target_kv_cache_usage: float = 0.8  # per replica, 0..1
    tolerance: float = 0.1  # |observed/target - 1| within this counts as on target
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0  # panic when panic-window demand >= this x ready replicas
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    scale_down_cooldown_s: float = 300.0  # since the last change of any kind
    max_scale_up_rate: float = 2.0  # at most ceil(current * rate) (and at least +1) per step
    max_scale_down_rate: float = 2.0  # at least floor(current / rate) per step
    max_metric_age_s: float = 30.0
    # Tensor parallelism.
    tensor_parallel_size: int = 1  # the degree the spec asks for now
    allowed_tp: tuple[int, ...] = ()
    gpu_budget: int | None = None
    num_kv_heads: int | None = None
    num_attention_heads: int | None = None
    tp_cooldown_s: float = 900.0
    tp_up_window_s: float = 120.0  # pressure at max replicas must last this long
    tp_down_window_s: float = 1800.0  # low load at min replicas must last this long
    tp_down_headroom: float = 0.6  # step down only if the load would fill at most this x target at the lower degree

    def max_replicas_at(self, tp: int) -> int:
        """maxReplicas, or fewer where the GPU budget runs out first."""
        if self.gpu_budget is None:
            return self.max_replicas
        return max(0, min(self.max_replicas, self.gpu_budget // tp))


@dataclass(frozen=True)
class Observation:
    """One reading of the serving generation's pods, summed (queue, running) or averaged (KV use) over them.

    `None` for a signal means the query returned nothing. `sample_time` is when Prometheus last saw the
    newest of the series (its timestamp), `time` when we asked; their difference is the staleness.
    """

    time: float
    current_replicas: int  # spec.replicas: what we asked for last
    ready_replicas: int
    waiting: float | None  # sum over pods of vllm:num_requests_waiting
    running: float | None = None  # sum over pods of vllm:num_requests_running
    kv_cache_usage: float | None = None  # mean over pods of vllm:kv_cache_usage_perc
    pods_reporting: int | None = None  # pods with fresh series; None: as many as are ready
    sample_time: float | None = None  # None: as fresh as `time`
    oom_kills: int = 0  # pods of the current degree that died out of memory since the last tick
    tp_rollout_in_progress: bool = False


@dataclass(frozen=True)
class Sample:
    time: float
    ready: int
    waiting: float
    running: float
    kv_cache_usage: float


@dataclass(frozen=True)
class ScalerState:
    """What the policy remembers between ticks. Start from `ScalerState()`; keep the returned one."""

    samples: tuple[Sample, ...] = ()
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, unstabilised desired replicas)
    panic_until: float | None = None  # panic mode lasts until this time unless renewed
    last_scale_time: float | None = None
    last_tp_change_time: float | None = None
    pressure_since: float | None = None  # KV pinned + queueing at max replicas, continuously since
    low_load_since: float | None = None  # low enough for a lower TP degree, continuously since
    min_tp_that_fits: int = 1  # raised when a degree died out of memory; never step below it


@dataclass(frozen=True)
class Decision:
    action: Action
    replicas: int
    tensor_parallel_size: int
    reason: str
    message: str
    metrics: dict[str, float] = field(default_factory=dict)
    state: ScalerState = field(default_factory=ScalerState)

    @property
    def changed(self) -> bool:
        return self.action != "hold"


# ------------------------------------------------------------------------------------------- signals


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def window(samples: tuple[Sample, ...], now: float, seconds: float) -> list[Sample]:
    """Samples of the last `seconds` (at least the newest one, so a short window is never empty)."""
    inside = [s for s in samples if s.time > now - seconds]
    return inside or list(samples[-1:])


def signal_desired(ready: int, total: float, target: float, tolerance: float) -> int:
    """HPA's rule on a load summed over pods: ceil(total / target); within the tolerance band keep `ready`."""
    ratio = total / (max(ready, 1) * target)
    if abs(ratio - 1.0) <= tolerance:
        return ready
    return math.ceil(total / target - 1e-9)


def desired_from(samples: list[Sample], policy: Policy) -> tuple[int, str, dict[str, float]]:
    """Desired replicas from the window's mean load; which signal won; the values used.

    Loads are summed over pods before averaging over time (KV use as replicas' worth of cache), so a
    window that spans a change in replicas still measures the same demand.
    """
    ready = max(1, samples[-1].ready)
    waiting = mean([s.waiting for s in samples])
    kv_load = mean([s.kv_cache_usage * s.ready for s in samples])
    by_queue = signal_desired(ready, waiting, policy.target_queue_depth, policy.tolerance)
    by_kv = signal_desired(ready, kv_load, policy.target_kv_cache_usage, policy.tolerance)
    values = {"waiting": waiting, "kv_cache_usage": kv_load / ready, "kv_load_replicas": kv_load,
              "running": mean([s.running for s in samples])}
    if by_queue >= by_kv:
        return by_queue, "QueueDepth", values
    return by_kv, "KVCacheUsage", values


def fits_after_scale_down(samples: list[Sample], replicas: int, policy: Policy) -> bool:
    """Would `replicas` pods hold the window's peak, with its load spread evenly over them, under target?"""
    if replicas <= 0:
        return all(s.waiting == 0 and s.running == 0 for s in samples)
    for s in samples:
        if s.waiting / replicas > policy.target_queue_depth:
            return False
        if s.kv_cache_usage * s.ready / replicas > policy.target_kv_cache_usage:
            return False
    return True


# ------------------------------------------------------------------------------------------ decision


def hold(policy: Policy, obs: Observation, state: ScalerState, reason: str, message: str,
         values: dict[str, float] | None = None) -> Decision:
    return Decision("hold", obs.current_replicas, policy.tensor_parallel_size, reason, message, values or {}, state)


def check_metrics(policy: Policy, obs: Observation) -> tuple[str, str] | None:
    """(reason, message) when the observation cannot be trusted, else None."""
    if obs.waiting is None or obs.kv_cache_usage is None:
        missing = [n for n, v in (("vllm:num_requests_waiting", obs.waiting),
                                  ("vllm:kv_cache_usage_perc", obs.kv_cache_usage)) if v is None]
        return "MetricsMissing", f"no samples for {', '.join(missing)}; holding at {obs.current_replicas}"
    age = obs.time - (obs.sample_time if obs.sample_time is not None else obs.time)
    if age > policy.max_metric_age_s:
        return "MetricsStale", f"newest sample is {age:.0f}s old (limit {policy.max_metric_age_s:.0f}s); holding"
    if obs.ready_replicas == 0:
        return "NoReadyReplicas", "no ready replica reports load yet; holding"
    return None


def decide(policy: Policy, state: ScalerState, obs: Observation) -> Decision:
    """One autoscaler tick: the replicas and TP degree wanted now, and why."""
    now = obs.time
    trouble = check_metrics(policy, obs)
    if obs.oom_kills > 0:
        tp = tp_step_up_for_oom(policy, state, obs)
        if tp is not None:
            return tp
    if trouble is not None:
        return hold(policy, obs, replace(state, pressure_since=None, low_load_since=None), *trouble)

    assert obs.waiting is not None and obs.kv_cache_usage is not None  # checked above
    sample = Sample(now, obs.ready_replicas, obs.waiting, obs.running or 0.0, obs.kv_cache_usage)
    keep = max(policy.stable_window_s, policy.scale_down_stabilization_s, policy.scale_up_stabilization_s)
    samples = tuple(s for s in state.samples if s.time > now - keep) + (sample,)
    stable = window(samples, now, policy.stable_window_s)
    panic_window = window(samples, now, policy.panic_window_s)

    current, ready = obs.current_replicas, obs.ready_replicas
    desired, signal, values = desired_from(stable, policy)
    panic_desired, _, _ = desired_from(panic_window, policy)
    values = {**values, "ready_replicas": float(ready), "current_replicas": float(current),
              "stable_desired": float(desired), "panic_desired": float(panic_desired)}

    panic_until = state.panic_until
    if panic_desired >= policy.panic_threshold * ready:
        panic_until = now + policy.stable_window_s
    in_panic = panic_until is not None and now < panic_until
    if in_panic:
        desired, signal = max(desired, panic_desired), "Panic"
    values["panic"] = 1.0 if in_panic else 0.0

    recommendations = tuple(r for r in state.recommendations if r[0] > now - keep) + ((now, desired),)
    state = replace(state, samples=samples, recommendations=recommendations,
                    panic_until=panic_until if in_panic else None)

    replicas, reason, message = replica_target(policy, state, obs, desired, signal, in_panic, stable, values)
    tp_decision = tp_policy(policy, state, obs, replicas, stable, values)
    if tp_decision is not None:
        return tp_decision
    state = replace(state, pressure_since=pressure_since(policy, state, obs, replicas, stable),
                    low_load_since=low_load_since(policy, state, obs, replicas, stable))
    if replicas == current:
        return Decision("hold", current, policy.tensor_parallel_size, reason, message, values, state)
    action: Action = "scale_up" if replicas > current else "scale_down"
    state = replace(state, last_scale_time=now)
    return Decision(action, replicas, policy.tensor_parallel_size, reason, message, values, state)


def replica_target(policy: Policy, state: ScalerState, obs: Observation, desired: int, signal: str, in_panic: bool,
                   stable: list[Sample], values: dict[str, float]) -> tuple[int, str, str]:
    """Stabilise, gate, rate-limit and bound `desired`: (replicas, reason, message)."""
    now, current = obs.time, obs.current_replicas
    upper = policy.max_replicas_at(policy.tensor_parallel_size)
    lo, hi = policy.min_replicas, max(policy.min_replicas, upper)
    what = f"{signal}: waiting {values['waiting']:.1f}, KV use {values['kv_cache_usage']:.2f} over {obs.ready_replicas} ready"
    if current < lo or current > hi:  # out of bounds (a hand edit, a new budget): fix that first
        target = min(max(current, lo), hi)
        return target, "Bounds", f"{current} replicas outside [{lo}, {hi}]; moving to {target}"

    if desired != current and obs.ready_replicas < current and not (in_panic and desired > current):
        # Load measured on fewer pods than will serve it: wait for them rather than overshoot or undo the step.
        return current, "ReplicasStarting", (
            f"{what} wants {desired}; {current - obs.ready_replicas} replica(s) not ready yet")
    if desired > current:
        up_window = [d for t, d in state.recommendations if t > now - policy.scale_up_stabilization_s]
        stabilised = desired if in_panic or not up_window else max(current, min(up_window))
        limit = max(math.ceil(current * policy.max_scale_up_rate), current + 1)
        target = min(stabilised, limit, hi)
        if target <= current:
            if stabilised > current and current >= hi:
                return current, "AtMaxReplicas", f"{what} wants {stabilised}, but {hi} is the most allowed"
            return current, "StabilizingUp", f"{what} wants {desired}; waiting for the up-window to agree"
        why = "Panic" if in_panic else signal
        return target, why, f"{what} -> {target} replicas (wanted {desired}, step limit {limit})"

    if desired < current:
        if current <= lo:  # an idle deployment at its floor: nothing to remove, and no check to blame
            return current, "AtMinReplicas", f"{what} wants {desired}, but {lo} is the fewest allowed"
        if in_panic:
            return current, "PanicNoScaleDown", f"{what}; panic mode never scales down"
        down_window = [d for t, d in state.recommendations if t > now - policy.scale_down_stabilization_s]
        stabilised = min(current, max(down_window)) if down_window else desired
        if stabilised >= current:
            return current, "StabilizingDown", f"{what} wants {desired}; the down-window still wants {current}"
        since = None if state.last_scale_time is None else now - state.last_scale_time
        if since is not None and since < policy.scale_down_cooldown_s:
            return current, "ScaleDownCooldown", (
                f"{what} wants {stabilised}; last change {since:.0f}s ago (cooldown {policy.scale_down_cooldown_s:.0f}s)")
        if obs.pods_reporting is not None and obs.pods_reporting < obs.ready_replicas:
            return current, "MetricsIncomplete", (
                f"only {obs.pods_reporting} of {obs.ready_replicas} ready pods report; not scaling down on partial data")
        limit = max(math.floor(current / policy.max_scale_down_rate), 0)
        target = max(stabilised, limit, lo)
        while target < current and not fits_after_scale_down(stable, target, policy):
            target += 1
        if target >= current:
            return current, "PreScaleDownCheck", (
                f"{what} wants {stabilised}, but the window's peak spread over fewer replicas would exceed target")
        return target, signal, f"{what} -> {target} replicas (wanted {desired}, step limit {limit})"

    return current, "WithinTolerance", f"{what}: on target at {current} replicas"


# ------------------------------------------------------------------------------------ tensor parallel


def valid_tp(policy: Policy, tp: int) -> bool:
    """Does `tp` split the model's heads? KV heads must divide evenly, or evenly replicate (tp a multiple)."""
    heads = policy.num_kv_heads
    if heads is not None and heads % tp != 0 and tp % heads != 0:
        return False
    if policy.num_attention_heads is not None and policy.num_attention_heads % tp != 0:
        return False
    return True


def candidate_tps(policy: Policy) -> list[int]:
    return sorted(d for d in set(policy.allowed_tp) | {policy.tensor_parallel_size} if valid_tp(policy, d))


def replicas_for_switch(policy: Policy, new_tp: int, replicas: int) -> int | None:
    """Replicas of the new degree for a blue/green switch from `replicas` at the current degree.

    As many as were serving (at least as many GPUs when stepping up), but the old and new generations run
    side by side until the switch, so both must fit in the budget; None when no count fits.
    """
    old_gpus = policy.tensor_parallel_size * replicas
    want = max(policy.min_replicas, min(replicas, policy.max_replicas))
    if policy.gpu_budget is None:
        return want
    fits = min(want, policy.max_replicas_at(new_tp), (policy.gpu_budget - old_gpus) // new_tp)
    least = max(policy.min_replicas, 1, math.ceil(old_gpus / new_tp) if new_tp > policy.tensor_parallel_size else 1)
    return fits if fits >= least else None


def pressure(policy: Policy, obs: Observation, replicas: int, stable: list[Sample]) -> bool:
    """Replicas exhausted, KV use above target for the whole window, and requests queueing throughout."""
    at_max = replicas >= policy.max_replicas_at(policy.tensor_parallel_size) and obs.current_replicas >= replicas
    return at_max and all(s.kv_cache_usage >= policy.target_kv_cache_usage and s.waiting > 0 for s in stable)


def pressure_since(policy: Policy, state: ScalerState, obs: Observation, replicas: int,
                   stable: list[Sample]) -> float | None:
    if not pressure(policy, obs, replicas, stable):
        return None
    return state.pressure_since if state.pressure_since is not None else obs.time


def low_load(policy: Policy, obs: Observation, replicas: int, stable: list[Sample], lower_tp: int) -> bool:
    """At min replicas, nothing queued, and the KV load would fit `lower_tp` with room to spare.

    KV capacity is taken as proportional to the degree, which flatters the lower degree (its GPUs also hold
    more of the weights); the headroom factor covers that.
    """
    if replicas > policy.min_replicas or obs.current_replicas > policy.min_replicas:
        return False
    scale = policy.tensor_parallel_size / lower_tp
    limit = policy.tp_down_headroom * policy.target_kv_cache_usage
    return all(s.waiting == 0 for s in stable) and mean([s.kv_cache_usage for s in stable]) * scale <= limit


def low_load_since(policy: Policy, state: ScalerState, obs: Observation, replicas: int,
                   stable: list[Sample]) -> float | None:
    lower = [d for d in candidate_tps(policy) if d < policy.tensor_parallel_size and d >= state.min_tp_that_fits]
    if not lower or not low_load(policy, obs, replicas, stable, lower[-1]):
        return None
    return state.low_load_since if state.low_load_since is not None else obs.time


def tp_cooling(policy: Policy, state: ScalerState, now: float) -> float | None:
    """Seconds of TP cooldown left, or None."""
    if state.last_tp_change_time is None:
        return None
    left = policy.tp_cooldown_s - (now - state.last_tp_change_time)
    return left if left > 0 else None


def tp_change(policy: Policy, state: ScalerState, obs: Observation, new_tp: int, replicas: int, reason: str,
              message: str, values: dict[str, float]) -> Decision:
    action: Action = "tp_up" if new_tp > policy.tensor_parallel_size else "tp_down"
    # The new generation's pods start empty: forget the old one's samples and windows.
    state = replace(state, samples=(), recommendations=(), panic_until=None, pressure_since=None,
                    low_load_since=None, last_tp_change_time=obs.time, last_scale_time=obs.time)
    values = {**values, "from_tensor_parallel_size": float(policy.tensor_parallel_size)}
    return Decision(action, replicas, new_tp, reason, message, values, state)


def tp_step_up_for_oom(policy: Policy, state: ScalerState, obs: Observation) -> Decision | None:
    """Pods die out of memory at this degree: the model or its KV does not fit. Step up, cooldown or not."""
    higher = [d for d in candidate_tps(policy) if d > policy.tensor_parallel_size]
    state = replace(state, min_tp_that_fits=max(state.min_tp_that_fits, policy.tensor_parallel_size * 2))
    values = {"oom_kills": float(obs.oom_kills)}
    if obs.tp_rollout_in_progress or not higher:
        return None
    for new_tp in higher:
        replicas = replicas_for_switch(policy, new_tp, max(obs.current_replicas, 1))
        if replicas is not None:
            return tp_change(policy, state, obs, new_tp, replicas, "OutOfMemory",
                             f"{obs.oom_kills} pod(s) killed out of memory at TP {policy.tensor_parallel_size}; "
                             f"TP {new_tp} x {replicas}", values)
    return None


def tp_policy(policy: Policy, state: ScalerState, obs: Observation, replicas: int, stable: list[Sample],
              values: dict[str, float]) -> Decision | None:
    """A TP change, when one is due; else None and the replica decision stands."""
    tps = candidate_tps(policy)
    if len(tps) < 2 or obs.tp_rollout_in_progress:
        return None
    tp, now = policy.tensor_parallel_size, obs.time
    since = pressure_since(policy, state, obs, replicas, stable)
    higher = [d for d in tps if d > tp]
    if since is not None and higher and now - since >= policy.tp_up_window_s:
        left = tp_cooling(policy, state, now)
        if left is not None:
            return None  # the replica decision (AtMaxReplicas) stands; its message says enough
        for new_tp in higher:
            count = replicas_for_switch(policy, new_tp, obs.current_replicas)
            if count is not None:
                return tp_change(policy, state, obs, new_tp, count, "ReplicasExhausted",
                                 f"{obs.current_replicas} replicas at TP {tp} are the most allowed, KV use "
                                 f"{values['kv_cache_usage']:.2f} >= {policy.target_kv_cache_usage:.2f} and "
                                 f"{values['waiting']:.1f} waiting for {now - since:.0f}s; TP {new_tp} x {count}",
                                 values)
        return None
    low_since = low_load_since(policy, state, obs, replicas, stable)
    lower = [d for d in tps if d < tp and d >= state.min_tp_that_fits]
    if low_since is not None and lower and now - low_since >= policy.tp_down_window_s:
        if tp_cooling(policy, state, now) is not None:
            return None
        new_tp = lower[-1]
        count = replicas_for_switch(policy, new_tp, obs.current_replicas)
        if count is not None:
            return tp_change(policy, state, obs, new_tp, count, "SustainedLowLoad",
                             f"KV use {values['kv_cache_usage']:.2f} and no queue at {obs.current_replicas} "
                             f"replica(s) for {now - low_since:.0f}s; TP {new_tp} x {count} serves it", values)
    return None
