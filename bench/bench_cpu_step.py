"""CPU cost of one decode step on the engine's CPU side, with the model replaced by a stand-in.

(1) scheduler + KV-cache bookkeeping alone (schedule, then update with sampled token ids);
(2) the whole CPU side: (1) plus the runner's input preparation (numpy block tables, positions, slot
    mapping, tensors), sampling-parameter handling, and output processing with incremental detokenization.
The stand-in model returns a tiny (64-token vocabulary) logits tensor, so no model math is timed. Column (2) uses
greedy requests (parameter handling runs, the argmax is trivial); the last column samples with temperature
and top-p, which adds the sampler's tensor math (on the GPU that is device work, not host time).

    python bench/bench_cpu_step.py --out bench/results/cpu_step.json

Anchor (issue 2, this machine kind): nano-vllm's schedule + postprocess costs 0.28 ms/step at 256 running
requests and 1.6 ms at 1024 (block size 16). Goals: (1) at or under those; (2) <= 1 ms at 256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from pagedserve.runtime.config import SchedulerConfig
from pagedserve.runtime.kv_cache_manager import KVCacheManager
from pagedserve.runtime.model_runner import ModelRunner
from pagedserve.runtime.output_processor import OutputProcessor
from pagedserve.runtime.request import Request
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.scheduler import Scheduler

PROMPT_LEN = 128
VOCAB = 64


class StandInModel(torch.nn.Module):
    """Returns a [tokens, 1] hidden state and a fixed small-vocab logits row per sampled request."""

    def __init__(self):
        super().__init__()
        self.logits = torch.randn(4096, VOCAB)

    def forward(self, ids, positions, meta):
        return torch.empty(ids.shape[0], 1)

    def compute_logits(self, hidden):
        return self.logits[: hidden.shape[0]]


def make_runner(max_num_seqs: int, max_model_len: int) -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size = 16
    runner.device = torch.device("cpu")
    runner.model = StandInModel()
    from pagedserve.runtime.sampler import Sampler

    runner.sampler = Sampler(VOCAB, runner.device)
    runner.requests = {}
    runner.max_blocks_per_seq = -(-max_model_len // 16)
    runner.max_rows = max_num_seqs
    runner.block_table = np.zeros((max_num_seqs, runner.max_blocks_per_seq), dtype=np.int32)
    runner.free_rows = list(range(max_num_seqs - 1, -1, -1))
    runner.graphs = None
    runner.drafter = None
    return runner


def run(num_reqs: int, whole: bool, steps: int = 200, warmup: int = 40, temperature: float = 0.0) -> dict:
    max_model_len = PROMPT_LEN + warmup + steps + 64
    blocks = num_reqs * (-(-max_model_len // 16)) + 16
    kv = KVCacheManager(blocks, 16, enable_prefix_caching=True)
    cfg = SchedulerConfig(max_num_seqs=num_reqs, max_num_batched_tokens=max(8192, num_reqs),
                          max_model_len=max_model_len)
    sched = Scheduler(cfg, kv)
    runner = make_runner(num_reqs, max_model_len) if whole else None
    from tiny_tokenizer import build_tokenizer

    processor = OutputProcessor(build_tokenizer()) if whole else None
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=temperature, top_p=0.95, max_tokens=10_000, ignore_eos=True)
    for i in range(num_reqs):
        prompt = rng.integers(3, VOCAB, PROMPT_LEN).tolist()
        sched.add_request(Request(str(i), prompt, params, 10_000))
        if whole:
            processor.add_request(str(i), None, prompt, params)
    sampled_cache = rng.integers(3, VOCAB, 8192).tolist()
    times = []
    k = 0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        if whole:
            sampled = runner.execute(out).sampled_token_ids
        else:
            n = len(out.req_ids)
            sampled = sampled_cache[k:k + n] if k + n <= len(sampled_cache) else sampled_cache[:n]
            k = (k + n) % 4096
        updates = sched.update(out, sampled)
        if whole:
            processor.process(updates, finished_only=True)
        dt = time.perf_counter() - t0
        if step >= warmup:
            assert out.total_num_scheduled_tokens == num_reqs, "not in steady decode"
            times.append(dt)
    return {"running_requests": num_reqs, "median_ms": statistics.median(times) * 1e3,
            "mean_ms": statistics.mean(times) * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sizes", default="64,256,1024")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        a = run(n, whole=False)
        b = run(n, whole=True)
        c = run(n, whole=True, temperature=0.8)
        rows.append({"running_requests": n, "sched_kv_ms": a, "whole_cpu_side_ms": b,
                     "whole_with_cpu_sampling_math_ms": c})
    anchors = {256: 0.28, 1024: 1.6}
    print(f"{'running':>8} {'(1) sched+kv ms':>16} {'nano-vllm':>10} {'(2) whole CPU ms':>17} {'goal':>6}"
          f" {'(2)+T=0.8,top_p math':>21}")
    for r in rows:
        n = r["running_requests"]
        print(f"{n:>8} {r['sched_kv_ms']['median_ms']:>16.3f} {anchors.get(n, float('nan')):>10.2f} "
              f"{r['whole_cpu_side_ms']['median_ms']:>17.3f} {'1.0' if n == 256 else '-':>6}"
              f" {r['whole_with_cpu_sampling_math_ms']['median_ms']:>21.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                       "machine": platform.platform(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "load_average": os.getloadavg(), "results": rows,
                       "anchors_ms": {"nano_vllm_256": 0.28, "nano_vllm_1024": 1.6}}, f, indent=2)


if __name__ == "__main__":
    main()
