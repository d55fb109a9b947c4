"""The autoscaling policy against a bursty 24-hour trace, on simulated time (no sleeping).

    .venv/bin/python bench/autoscale_sim.py --out bench/results/autoscale_sim.json

A fluid model of a fleet of replicas, stepped once per simulated second:

* demand: a diurnal request rate (night trough, afternoon peak) with seeded bursts of 2-4x lasting
  3-20 minutes, Poisson arrivals;
* a replica of TP degree d runs at most `slots[d]` requests at once (its KV cache holds that many) and
  finishes each in `service_s[d]` seconds; KV-cache use is running / slots, the rest wait in one queue
  (the Service spreads requests evenly, so one fleet-wide queue is a fair model);
* a new replica serves `startup_s` after it is asked for (model load); a TP switch is blue/green: the new
  generation starts beside the old, which serves until the new one is ready, both counted in GPU-hours;
* the autoscaler ticks every `tick_s` seconds and reads what Prometheus would: the sum of waiting
  requests and the mean KV use of ready replicas, as scraped at the last `scrape_s` boundary.

The SLO is on queueing delay (time to first token is dominated by it when replicas are saturated):
the estimated wait of a request arriving now, waiting / completion rate, must stay under `slo_wait_s`.
Three fleets face the same trace: a static one sized by hand (maxReplicas at the spec's degree), the
replicas-only autoscaler, and the autoscaler allowed to change TP too.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from pagedserve.operator.autoscale_policy import Observation, Policy, ScalerState, decide


@dataclass(frozen=True)
class Capacity:
    """Replica capacity by TP degree. TP 2 holds more than twice the sequences (the weights are split, so
    more of each GPU is KV cache) and decodes a little faster; per GPU it serves ~12% more."""

    slots: dict[int, int] = field(default_factory=lambda: {1: 48, 2: 112})
    service_s: dict[int, float] = field(default_factory=lambda: {1: 12.0, 2: 10.0})
    startup_s: float = 120.0

    def rate(self, tp: int) -> float:
        return self.slots[tp] / self.service_s[tp]


@dataclass(frozen=True)
class Trace:
    seed: int = 7
    hours: float = 24.0
    night_rps: float = 2.0
    peak_rps: float = 20.0
    bursts: int = 12
    burst_factor: tuple[float, float] = (2.0, 4.0)
    burst_minutes: tuple[float, float] = (3.0, 20.0)

    def rates(self) -> list[float]:
        """Request rate per second of the day."""
        rng = random.Random(self.seed)
        n = int(self.hours * 3600)
        base = [
            self.night_rps + (self.peak_rps - self.night_rps) * max(0.0, math.sin(math.pi * (t / 3600 - 6) / 16)) ** 2
            for t in range(n)
        ]
        factor = [1.0] * n
        for _ in range(self.bursts):
            start = rng.randrange(n)
            length = int(rng.uniform(*self.burst_minutes) * 60)
            peak = rng.uniform(*self.burst_factor)
            for t in range(start, min(n, start + length)):
                factor[t] = max(factor[t], peak)
        return [b * f for b, f in zip(base, factor, strict=True)]


@dataclass
class Fleet:
    tp: int
    ready: int  # serving replicas of the current degree
    starting: list[float] = field(default_factory=list)  # ready-at times of replicas being started
    next_tp: int | None = None  # blue/green: the degree being started
    next_ready_at: float = 0.0
    next_replicas: int = 0


def poisson(rng: random.Random, lam: float) -> int:
    if lam > 30:  # normal approximation: exact enough for a fluid model, and fast
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    threshold, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p < threshold:
            return k
        k += 1


def simulate(policy: Policy | None, trace: Trace, cap: Capacity, static_replicas: int = 0, tp: int = 1,
             tick_s: float = 10.0, scrape_s: float = 5.0, slo_wait_s: float = 5.0, max_waiting_per_replica: int = 256,
             record_every: int = 60) -> dict:
    """Run one fleet through the trace. `policy=None` keeps `static_replicas` at `tp` all day."""
    rates = trace.rates()
    rng = random.Random(trace.seed + 1)
    fleet = Fleet(tp=tp, ready=static_replicas if policy is None else policy.min_replicas)
    replicas = fleet.ready  # spec.replicas
    state = ScalerState()
    waiting, running = 0.0, 0.0
    gpu_seconds, over_slo_s, served, rejected = 0.0, 0, 0.0, 0.0
    scraped = (0.0, 0.0, 0.0)  # (time, waiting, kv use) as Prometheus last saw them
    decisions: dict[str, int] = {}
    moves: list[str] = []
    tp_changes = 0
    timeline = []
    for t, rate in enumerate(rates):
        now = float(t)
        # Replicas finish starting; a blue/green generation takes over once all its pods are ready.
        done = [s for s in fleet.starting if s <= now]
        fleet.ready += len(done)
        fleet.starting = [s for s in fleet.starting if s > now]
        if fleet.next_tp is not None and now >= fleet.next_ready_at:
            fleet.tp, fleet.ready, fleet.starting = fleet.next_tp, fleet.next_replicas, []
            fleet.next_tp = None
            running = min(running, fleet.ready * cap.slots[fleet.tp])

        # Requests: arrive (refused with 429 beyond each replica's waiting-queue limit), finish, get admitted.
        arrivals = poisson(rng, rate)
        room = max(0.0, fleet.ready * max_waiting_per_replica - waiting)
        rejected += max(0.0, arrivals - room)
        waiting += min(arrivals, room)
        slots = fleet.ready * cap.slots[fleet.tp]
        finished = running / cap.service_s[fleet.tp]
        running -= finished
        served += finished
        admitted = min(waiting, max(0.0, slots - running))
        running += admitted
        waiting -= admitted
        wait_estimate = waiting / max(finished, 1e-9) if waiting > 0.5 else 0.0
        if wait_estimate > slo_wait_s or arrivals > room:
            over_slo_s += 1

        gpus = (fleet.ready + len(fleet.starting)) * fleet.tp
        if fleet.next_tp is not None:
            gpus += fleet.next_replicas * fleet.next_tp
        gpu_seconds += gpus

        if t % int(scrape_s) == 0:
            scraped = (now, waiting, running / slots if slots else 0.0)
        if policy is not None and t % int(tick_s) == 0:
            obs = Observation(time=now, current_replicas=replicas, ready_replicas=fleet.ready, waiting=scraped[1],
                              running=running, kv_cache_usage=scraped[2], sample_time=scraped[0],
                              tp_rollout_in_progress=fleet.next_tp is not None)
            d = decide(replace(policy, tensor_parallel_size=fleet.next_tp or fleet.tp), state, obs)
            state = d.state
            decisions[d.reason] = decisions.get(d.reason, 0) + 1
            if d.action in ("scale_up", "scale_down"):
                moves.append(d.action)
                if fleet.next_tp is not None:  # mid-switch: spec.replicas sizes the generation being started
                    fleet.next_replicas = d.replicas
                elif d.replicas > replicas:
                    fleet.starting += [now + cap.startup_s] * (d.replicas - replicas)
                else:
                    drop = replicas - d.replicas
                    unstarted = min(drop, len(fleet.starting))
                    fleet.starting = fleet.starting[unstarted:]
                    fleet.ready -= drop - unstarted
                replicas = d.replicas
            elif d.action in ("tp_up", "tp_down"):
                tp_changes += 1
                fleet.next_tp, fleet.next_replicas = d.tensor_parallel_size, d.replicas
                fleet.next_ready_at = now + cap.startup_s
                fleet.starting = []
                replicas = d.replicas
        if t % record_every == 0:
            timeline.append((t, round(rate, 2), fleet.ready, fleet.tp, round(waiting, 1)))

    hours = len(rates) / 3600
    return {
        "gpu_hours": round(gpu_seconds / 3600, 2),
        "time_over_slo_s": over_slo_s,
        "time_over_slo_pct": round(100 * over_slo_s / len(rates), 2),
        "requests_served": round(served),
        "requests_offered": round(sum(rates)),
        "requests_rejected": round(rejected),
        "direction_changes": sum(1 for a, b in zip(moves, moves[1:], strict=False) if a != b),
        "replica_changes": len(moves),
        "tp_changes": tp_changes,
        "mean_gpus": round(gpu_seconds / 3600 / hours, 2),
        "decision_reasons": dict(sorted(decisions.items())),
        "timeline": timeline,
    }


def needed_replicas(rate: float, cap: Capacity, tp: int, target_kv: float) -> int:
    """Replicas at degree `tp` that serve `rate` with KV use at target: the tracking reference for tests."""
    return math.ceil(rate / (cap.rate(tp) * target_kv))


def run_all(trace: Trace, cap: Capacity, policy: Policy) -> dict:
    static_replicas = policy.max_replicas_at(policy.tensor_parallel_size)
    return {
        "static": simulate(None, trace, cap, static_replicas=static_replicas, tp=policy.tensor_parallel_size),
        "replicas_only": simulate(replace(policy, allowed_tp=()), trace, cap, tp=policy.tensor_parallel_size),
        "replicas_and_tp": simulate(policy, trace, cap, tp=policy.tensor_parallel_size),
    }


def default_policy() -> Policy:
    return Policy(min_replicas=1, max_replicas=6, target_queue_depth=4.0, target_kv_cache_usage=0.8,
                  tensor_parallel_size=1, allowed_tp=(1, 2), gpu_budget=16, num_kv_heads=8, num_attention_heads=32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="write results JSON here")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeline", action="store_true", help="keep the per-minute timeline in the JSON")
    args = parser.parse_args(argv)
    trace, cap, policy = Trace(seed=args.seed), Capacity(), default_policy()
    started = time.perf_counter()
    results = run_all(trace, cap, policy)
    elapsed = time.perf_counter() - started
    for name, r in results.items():
        print(f"{name:16s} GPU-h {r['gpu_hours']:7.1f}  over SLO {r['time_over_slo_pct']:5.2f}%  "
              f"direction changes {r['direction_changes']:3d}  replica changes {r['replica_changes']:3d}  "
              f"TP changes {r['tp_changes']}  rejected {r['requests_rejected']}")
        if not args.timeline:
            r.pop("timeline")
    if args.out:
        report = {
            "command": "python " + " ".join(["bench/autoscale_sim.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()} (CPU only)",
            "simulated_seconds": int(trace.hours * 3600),
            "wall_seconds": round(elapsed, 1),
            "trace": asdict(trace),
            "capacity": {"slots": cap.slots, "service_s": cap.service_s, "startup_s": cap.startup_s,
                         "requests_per_s": {tp: round(cap.rate(tp), 2) for tp in cap.slots}},
            "policy": {k: v for k, v in asdict(policy).items()},
            "slo": "estimated queueing delay of a new arrival (waiting / completion rate) <= 5 s, and no 429",
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
