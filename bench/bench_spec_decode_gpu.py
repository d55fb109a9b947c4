"""Speculative decoding on the GPU: a Llama-3.1-8B-shaped target, a Llama-3.2-1B-shaped draft of the same
vocabulary, random bf16 weights, greedy, batch 1 and batch 32.

    python bench/bench_spec_decode_gpu.py --out bench/results/spec_decode_h200.json

Random weights make the draft and the target disagree on nearly every token, so acceptance is ~0: what this
measures is the *cost* side of speculation on this card, the overhead bound. For each method it records the
time of one verification step (k + 1 tokens per request through the target, plus the draft's k forward
steps or the n-gram lookup) against a plain decode step, and from those the speed-up that the acceptance
measured on the real SmolLM2 model (bench/results/spec_decode_smollm2_cpu.json) would give here:
    speed-up = E[tokens per verification] * t_decode / t_verify.
Prompt lookup on random weights finds no match (the generated tokens never repeat the prompt), so the plain
``ngram`` row measures only the proposer's per-step cost. The ``verify_forced`` row replaces the n-gram
proposer with one that always proposes k random tokens: every step verifies k + 1 tokens per request and
rejects all k, the worst case of verification overhead. Outputs with speculation are compared token for
token against the run without it; where they differ, the first differing position of each request is
recorded (bf16 verification runs the extend kernel, whose sums run in another order than the decode
kernel's: with random weights the top logits are close, so such differences can flip a greedy choice).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from gpu_common import LLAMA_8B, environment, measure_ceilings, write_random_llama

LLAMA_1B = dict(
    LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)


def make_prompts(n: int, vocab: int, seed: int, phrase: int = 32, repeats: int = 8) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(10, vocab - 10, phrase).tolist() * repeats) for _ in range(n)]


def run(llm, prompts, max_tokens: int) -> tuple[list[list[int]], float, int]:
    from pagedserve.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    return [list(o.outputs[0].token_ids) for o in outs], dt, llm.last_stats["steps"]


def profile_steps(llm, prompt: list[int], name: str) -> None:
    """Where one step's time goes at batch 1: Python (cProfile) and operators/kernels (torch.profiler)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from pagedserve.runtime import SamplingParams

    eng = llm.engine
    eng.add_request(eng.make_request(f"prof-{name}", prompt, SamplingParams(temperature=0.0, max_tokens=40,
                                                                             ignore_eos=True)))
    for _ in range(4):
        eng.step()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    t0 = time.perf_counter()
    for _ in range(8):
        eng.step()
    torch.cuda.synchronize()
    pr.disable()
    print(f"--- {name}: {1e3 * (time.perf_counter() - t0) / 8:.2f} ms/step under cProfile", flush=True)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(18)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            eng.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    while eng.has_unfinished():
        eng.step()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-dir", default="/tmp/llama8b")
    ap.add_argument("--draft-dir", default="/tmp/llama1b")
    ap.add_argument("--ngram-k", type=int, default=4, help="4: the k of the SmolLM2 ngram record")
    ap.add_argument("--draft-k", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--cpu-results", default=os.path.join(os.path.dirname(__file__), "results",
                                                          "spec_decode_smollm2_cpu.json"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default=None, help="comma-separated subset of the rows (baseline always runs)")
    ap.add_argument("--profile", action="store_true", help="cProfile + torch.profiler of 8 steps at batch 1")
    args = ap.parse_args()
    result = {"env": environment(), "target_shape": LLAMA_8B, "draft_shape": LLAMA_1B, "args": vars(args)}
    result["ceilings"] = measure_ceilings()
    for path, shape in ((args.target_dir, LLAMA_8B), (args.draft_dir, LLAMA_1B)):
        if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            t0 = time.perf_counter()
            write_random_llama(path, shape)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f}s", flush=True)

    from pagedserve.runtime import LLM

    k, dk = args.ngram_k, args.draft_k
    configs = [
        ("baseline", None),
        (f"ngram_k{k}", {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2,
                         "prompt_lookup_max": 4}),
        (f"verify_forced_k{k}", {"method": "ngram", "num_speculative_tokens": k}),
        (f"draft_k{dk}", {"method": "draft_model", "model": args.draft_dir, "num_speculative_tokens": dk}),
    ]
    if args.configs:
        keep = set(args.configs.split(",")) | {"baseline"}
        configs = [c for c in configs if c[0] in keep]
    batches = [int(b) for b in args.batches.split(",")]
    vocab = LLAMA_8B["vocab_size"]
    reference: dict[int, list] = {}
    rows: dict[str, dict] = {}
    for name, spec in configs:
        t0 = time.perf_counter()
        llm = LLM(args.target_dir, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.85,
                  max_num_seqs=64, speculative_config=spec)
        print(f"{name}: loaded in {time.perf_counter() - t0:.0f}s", flush=True)
        if name.startswith("verify_forced"):
            rng = np.random.default_rng(5)
            llm.engine.proposer.propose = lambda tokens, k=k, rng=rng: rng.integers(10, vocab - 10, k).tolist()
        run(llm, make_prompts(2, vocab, seed=99), 8)  # warm-up
        for bs in batches:
            prompts = make_prompts(bs, vocab, seed=bs)
            stats0 = llm.engine.spec_stats.as_dict() if spec else None
            ids, secs, steps = run(llm, prompts, args.max_tokens)
            n = sum(len(x) for x in ids)
            e = {"batch_size": bs, "output_tokens": n, "seconds": round(secs, 4),
                 "output_tok_per_s": round(n / secs, 1), "steps": steps, "ms_per_step": round(1e3 * secs / steps, 3)}
            if spec:
                s1 = llm.engine.spec_stats.as_dict()
                d = {key: s1[key] - stats0[key] for key in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                                                             "spec_decode_num_accepted_tokens")}
                e.update(d)
                e["acceptance_rate"] = (d["spec_decode_num_accepted_tokens"] / d["spec_decode_num_draft_tokens"]
                                        if d["spec_decode_num_draft_tokens"] else 0.0)
                e["outputs_identical_to_baseline"] = ids == reference[bs]
                e["first_difference_per_request"] = [
                    next((j for j, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
                    for x, y in zip(ids, reference[bs], strict=True)
                ]
                base = rows["baseline"][str(bs)]
                e["speedup_vs_baseline"] = round(e["output_tok_per_s"] / base["output_tok_per_s"], 3)
                # All drafts rejected: one verification step produces one token, so its time is the step time,
                # and speculation pays once a verification yields more tokens than this ratio (break-even).
                e["verify_step_over_decode_step"] = round(e["ms_per_step"] / base["ms_per_step"], 3)
                e["break_even_tokens_per_verification"] = e["verify_step_over_decode_step"]
            else:
                reference[bs] = ids
            rows.setdefault(name, {})[str(bs)] = e
            print(f"{name:10s} batch {bs:2d}: {e['output_tok_per_s']:8.1f} tok/s, {e['ms_per_step']:.2f} ms/step"
                  + (f", acceptance {e['acceptance_rate']:.3f}, identical={e['outputs_identical_to_baseline']}"
                     if spec else ""), flush=True)
        if args.profile:
            profile_steps(llm, make_prompts(1, vocab, seed=77)[0], name)
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    result["results"] = rows
    # Projection with the real model's n-gram acceptance (SmolLM2 on CPU, same k).
    proj = {}
    if os.path.exists(args.cpu_results):
        with open(args.cpu_results) as f:
            cpu = json.load(f)
        real = {}
        for bs, r in cpu.get("results", {}).get(f"ngram_k{k}", {}).items():
            real[f"ngram_k{k}", bs] = r.get("mean_acceptance_length")
        for (name, bs), mal in real.items():
            if mal and name in rows and bs in rows[name]:
                ratio = rows[name][bs]["verify_step_over_decode_step"]
                proj[f"{name}/batch{bs}"] = {"mean_tokens_per_verification_real_model": mal,
                                             "verify_over_decode": ratio, "projected_speedup": round(mal / ratio, 3)}
    result["projection"] = proj
    print("\n| method | batch | tok/s | ms/step | verify/decode step | acceptance | identical |")
    print("|---|---|---|---|---|---|---|")
    for name, per in rows.items():
        for bs, e in per.items():
            print(f"| {name} | {bs} | {e['output_tok_per_s']:.0f} | {e['ms_per_step']:.2f} | "
                  f"{e.get('verify_step_over_decode_step', 1.0)} | {e.get('acceptance_rate', '-')} | "
                  f"{e.get('outputs_identical_to_baseline', '-')} |")
    for key, p in proj.items():
        print(f"projection {key}: {p}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
