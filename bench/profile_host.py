"""Where the host (CPU) time of a decode step goes on the GPU machine: cProfile over pure-decode steps of
a shallow Llama-8B-shaped model (4 layers: the GPU part is small, so the step time is mostly host time).

    python3 bench/profile_host.py --batch 256 --ctx 800
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from gpu_common import LLAMA_8B, write_random_llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b-4l")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=800)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import os

    shape = dict(LLAMA_8B, num_hidden_layers=4)
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors.index.json")):
        write_random_llama(args.model_dir, shape)
    from pagedserve.runtime import LLM, SamplingParams

    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=2048, max_num_seqs=256)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        p = torch.randint(10, 120000, (args.ctx,), generator=g).tolist()
        eng.add_request(eng.make_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=1000,
                                                                    ignore_eos=True)))
        llm.processor.add_request(f"r{i}", None, p, SamplingParams(temperature=0.0, max_tokens=1000))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()
    for _ in range(5):
        llm.processor.process(eng.step(), finished_only=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        llm.processor.process(eng.step(), finished_only=True)
    plain = (time.perf_counter() - t0) / args.steps
    # Host-side split: time until the sampled ids are on the host vs the rest.
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        llm.processor.process(eng.step(), finished_only=True)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(30)
    print(s.getvalue())
    print(f"batch {args.batch} ctx {args.ctx}: {plain * 1e3:.2f} ms per decode step (4 layers, no profiler)")


if __name__ == "__main__":
    main()
