"""Where a tensor-parallel batch-1 decode step goes: engine.step() wall times, a torch.profiler trace of rank 0
(CPU and GPU, kernels inside the CUDA graph included) and each worker's own host timeline
(PAGEDSERVE_TP_TRACE: when it received each step, when its execute() returned).

    python3 bench/profile_tp.py --model-dir /tmp/llama8b --tp 2 --out-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

for _key, _value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                     "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_common import LLAMA_8B, write_random_llama  # noqa: E402


def _short(name: str) -> str:
    for key in ("_gemv", "_tp_add_rms_norm", "_fused_add_rms_norm", "_rms_norm", "_silu", "_merge", "_decode",
                "_rotary", "nvjet", "gemm", "one_shot", "nccl", "Memcpy", "Memset", "reduce_kernel", "index",
                "elementwise", "argmax"):
        if key in name:
            return key.strip("_")
    return name[:40]


def _load_events(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["traceEvents"]


def _gpu_ops(events: list[dict]) -> list[dict]:
    """The GPU's kernels, copies and memsets of a chrome trace, by start time."""
    return sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur")),
                  key=lambda e: float(e["ts"]))


def analyze_trace(path: str, steps: int) -> dict:
    """Rank 0's GPU timeline from a torch.profiler chrome trace, per step: how long the GPU ran something,
    the idle gaps (and which kernels they sit between), and each kernel kind's *exclusive* time: every instant
    goes to the earliest-started kernel still running. With programmatic dependent launch a kernel starts
    while its predecessor runs and waits inside, so its own duration overstates it; the earliest running
    kernel is the one doing the work."""
    events = _load_events(path)
    ops = _gpu_ops(events)
    kernels = []
    for i, e in enumerate(ops):
        name = _short(e.get("name", ""))
        if name == "gemv":  # which projection: its grid and the kernel before it (o after merge, down after silu)
            grid = (e.get("args") or {}).get("grid", ["?"])[0]
            name = f"gemv[{grid}] after {_short(ops[i - 1].get('name', '')) if i else 'start'}"
        kernels.append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), name))
    if not kernels:
        return {}
    window = kernels[-1][1] - kernels[0][0]
    exclusive: dict[str, float] = {}
    counts: dict[str, int] = {}
    gaps: dict[str, list] = {}
    # Sweep: the running kernels, by start; each segment between two boundaries goes to the earliest.
    bounds = sorted({t for k in kernels for t in k[:2]})
    idx = 0
    active: list[tuple[float, float, str]] = []
    busy = 0.0
    last_name = None
    for a, b in itertools.pairwise(bounds):
        while idx < len(kernels) and kernels[idx][0] <= a:
            active.append(kernels[idx])
            counts[kernels[idx][2]] = counts.get(kernels[idx][2], 0) + 1
            idx += 1
        active = [k for k in active if k[1] > a]
        if active:
            owner = min(active, key=lambda k: k[0])[2]
            exclusive[owner] = exclusive.get(owner, 0.0) + (b - a)
            busy += b - a
            last_name = owner
        else:
            nxt = kernels[idx][2] if idx < len(kernels) else "end"
            gaps.setdefault(f"{last_name} -> {nxt}", [0.0, 0])
            gaps[f"{last_name} -> {nxt}"][0] += b - a
            gaps[f"{last_name} -> {nxt}"][1] += 1
    per = 1e3 * steps  # trace times are in us; report ms per step
    return {
        "window_ms_per_step": window / per, "busy_ms_per_step": busy / per, "idle_ms_per_step": (window - busy) / per,
        "exclusive_ms_per_step": {k: round(v / per, 4) for k, v in sorted(exclusive.items(), key=lambda kv: -kv[1])},
        "launches_per_step": {k: v / steps for k, v in sorted(counts.items(), key=lambda kv: -kv[1])},
        "idle_gaps_ms_per_step": {k: [round(v[0] / per, 4), v[1] / steps]
                                  for k, v in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:12]},
    }


def print_boundaries(path: str, count: int = 2, context_us: float = 60.0) -> None:
    """Rank 0's host and GPU around the first ``count`` GPU idle gaps longer than 20 us: every CUDA runtime call
    (host) and GPU operation by start time, in us from the gap, to see what the GPU was waiting for."""
    events = _load_events(path)
    gpu = [(float(e["ts"]), float(e["dur"]), e.get("name", "")) for e in _gpu_ops(events)]
    host = [(float(e["ts"]), float(e.get("dur", 0)), e.get("name", "")) for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver") or (e.get("cat") == "cpu_op" and
                                                                  float(e.get("dur", 0)) > 15)]
    end, shown = 0.0, 0
    for ts, dur, _ in gpu:
        if end and ts - end > 20 and shown < count:
            shown += 1
            lo, hi = end - context_us * 4, ts + context_us
            print(f"--- GPU idle {ts - end:.1f} us at t0 = {end:.1f}")
            rows = [(t, d, "GPU ", n) for t, d, n in gpu if lo <= t <= hi or lo <= t + d <= hi]
            rows += [(t, d, "host", n) for t, d, n in host if lo <= t <= hi]
            for t, d, who, n in sorted(rows):
                print(f"{t - end:9.1f} {d:8.1f}  {who} {n[:90]}")
        end = max(end, ts + dur)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out-dir", default="/tmp/prof")
    ap.add_argument("--sync", action="store_true", help="no async scheduling")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors.index.json")):
        write_random_llama(args.model_dir, dict(LLAMA_8B))
    os.environ["PAGEDSERVE_TP_TRACE"] = os.path.join(args.out_dir, "worker_trace")
    from pagedserve.runtime import LLM, SamplingParams

    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=2048, max_num_seqs=64, tensor_parallel_size=args.tp,
              async_scheduling=False if args.sync else None)
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + args.profile_steps + 100, ignore_eos=True)
    rng = np.random.default_rng(0)
    for i in range(args.batch):
        eng.add_request(eng.make_request(f"r{i}", rng.integers(10, 120000, 512).tolist(), params))
    for _ in range(20):  # prefill and warm-up
        eng.step()
    times = []
    wait0 = getattr(eng.runner, "device_wait_s", None)  # TP > 1: rank 0's host waiting for its GPU
    for _ in range(args.steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    summary = {"tp": args.tp, "batch": args.batch, "async": eng.async_scheduling,
               "step_ms": {"mean": ms.mean(), "p50": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
                           "p90": float(np.percentile(ms, 90))}}
    if wait0 is not None:
        # Near 0: each step is bound by rank 0's host work; near 1: the host mostly waits for the GPU (which
        # itself may be waiting for a late worker inside its first all-reduce).
        summary["rank0_device_wait_fraction"] = (eng.runner.device_wait_s - wait0) / float(np.sum(times))
    print(json.dumps(summary), flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile_steps):
            eng.step()
        torch.cuda.synchronize()
    trace_path = os.path.join(args.out_dir, f"trace_tp{args.tp}_b{args.batch}.json")
    prof.export_chrome_trace(trace_path)
    summary["gpu_timeline"] = analyze_trace(trace_path, args.profile_steps)
    print(json.dumps(summary["gpu_timeline"], indent=1), flush=True)
    print_boundaries(trace_path)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
    with open(os.path.join(args.out_dir, f"summary_tp{args.tp}_b{args.batch}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    eng.shutdown()


if __name__ == "__main__":
    main()
