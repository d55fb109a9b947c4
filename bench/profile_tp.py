"""Where a tensor-parallel batch-1 decode step goes: engine.step() wall times, a torch.profiler trace of rank 0
(CPU and GPU, kernels inside the CUDA graph included) and each worker's own host timeline
(PAGEDSERVE_TP_TRACE: when it received each step, when its execute() returned).

    python3 bench/profile_tp.py --model-dir /tmp/llama8b --tp 2 --out-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import os
import time

for _key, _value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                     "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_common import LLAMA_8B, write_random_llama  # noqa: E402


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
    prof.export_chrome_trace(os.path.join(args.out_dir, f"trace_tp{args.tp}_b{args.batch}.json"))
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
    with open(os.path.join(args.out_dir, f"summary_tp{args.tp}_b{args.batch}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    eng.shutdown()


if __name__ == "__main__":
    main()
