"""Offline throughput and batch-1 latency of pagedserve on the GPU, Llama-3.1-8B-shaped random weights,
against HF transformers `generate` in the same run, with each figure next to its roofline.

    python bench/bench_offline.py --model-dir /tmp/llama8b --out bench/results/offline_h100.json

Workloads (fixed seeds, ignore_eos): (a) 256 requests, input and output lengths uniform in 100..1024
(nano-vllm's); (b) N requests of 1000 in / 1000 out (the TensorRT-LLM table's shape).
Roofline (bench/README.md): time >= max(FLOPs / matmul rate, bytes / copy bandwidth), bytes = weights once
per decode step at the largest concurrency the KV pool allows + every K/V byte each decode step reads.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from gpu_common import LLAMA_8B, environment, llama_param_bytes, measure_ceilings, write_random_llama


def workload(name: str, num: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    if name == "a":
        return [(int(i), int(o)) for i, o in zip(rng.integers(100, 1025, num), rng.integers(100, 1025, num), strict=True)]
    return [(1000, 1000)] * num


def prompts_for(lens, vocab: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab - 10, n).tolist() for n, _ in lens]


def roofline(lens, shape: dict, concurrency: int, ceil: dict) -> dict:
    """Lower bound on the time of a workload (see module docstring)."""
    params = llama_param_bytes(shape) / 2
    h = shape["hidden_size"]
    layers = shape["num_hidden_layers"]
    kv_per_token = 2 * layers * shape["num_key_value_heads"] * (h // shape["num_attention_heads"]) * 2
    total_in = sum(i for i, _ in lens)
    total_out = sum(o for _, o in lens)
    # Matmul FLOPs (2 per parameter per token) + attention FLOPs (QK and PV: 4*h per (query, key) pair per layer).
    attn_pairs = sum(i * (i + 1) / 2 + o * i + o * (o - 1) / 2 for i, o in lens)
    flops = 2 * params * (total_in + total_out) + 4 * h * layers * attn_pairs
    decode_steps = total_out / max(1, min(concurrency, len(lens)))
    kv_bytes = kv_per_token * sum(o * i + o * (o - 1) / 2 for i, o in lens)
    min_bytes = llama_param_bytes(shape) * decode_steps + kv_bytes
    t_compute = flops / (ceil["matmul_bf16_TFLOPs"] * 1e12)
    t_memory = min_bytes / (ceil["copy_GBps"] * 1e9)
    t = max(t_compute, t_memory)
    return {"flops": flops, "min_bytes": min_bytes, "t_compute_s": t_compute, "t_memory_s": t_memory,
            "t_floor_s": t, "bound": "memory" if t_memory > t_compute else "compute",
            "output_tok_per_s_ceiling": total_out / t, "decode_steps": decode_steps, "concurrency": concurrency}


def run_ours(llm, lens, vocab):
    from pagedserve.runtime import SamplingParams

    prompts = prompts_for(lens, vocab)
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in lens]
    torch.cuda.synchronize()
    llm.record_step_times = True
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    llm.record_step_times = False
    st = llm.step_times
    buckets = {}
    for t, n, tokens in st:
        key = "prefill/mixed" if tokens != n else f"decode batch <={min(256, 1 << max(0, (n - 1).bit_length()))}"
        buckets.setdefault(key, []).append(t)
    step_summary = {k: {"steps": len(v), "mean_ms": 1e3 * sum(v) / len(v), "total_s": sum(v)}
                    for k, v in sorted(buckets.items())}
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(o for _, o in lens)
    return {"elapsed_s": dt, "output_tokens": n_out, "output_tok_per_s": n_out / dt,
            "total_tok_per_s": (n_out + sum(i for i, _ in lens)) / dt, "steps": llm.last_stats["steps"],
            "step_summary": step_summary}


def batch1_latency(llm, vocab, prompt_len=512, short=16, long=144):
    """ITL from two runs that differ only in output length (fresh prompts: no prefix-cache hits)."""
    from pagedserve.runtime import SamplingParams

    def timed(n, seed):
        p = {"prompt_token_ids": prompts_for([(prompt_len, 0)], vocab, seed=seed)[0]}
        t0 = time.perf_counter()
        llm.generate(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t0

    timed(8, 100)  # warm-up: compiles every kernel shape used below
    t_short = min(timed(short, 101), timed(short, 102))
    t_long = min(timed(long, 103), timed(long, 104))
    itl = (t_long - t_short) / (long - short)
    return {"itl_ms": itl * 1e3, "ttft_s": t_short - itl * (short - 1), "prompt_len": prompt_len}


def check_async(llm, vocab: int) -> dict:
    """Async scheduling on the GPU: host synchronisations inside async decode steps (torch's sync debug
    mode), and greedy outputs with async scheduling on vs off on the same engine."""
    import warnings

    from pagedserve.runtime import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    prompts = prompts_for([(200, 0)] * 32, vocab, seed=11)
    res = {"async_scheduling": eng.async_scheduling}
    outs = {}
    for mode in (True, False):
        eng.async_scheduling = mode
        eng.kv.reset_prefix_cache()  # the same prompts twice: the second run must not read cached blocks
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        outs[mode] = [list(o.outputs[0].token_ids) for o in got]
    eng.async_scheduling = res["async_scheduling"]
    res["outputs_identical_async_vs_sync"] = sum(a == b for a, b in zip(outs[True], outs[False], strict=True))
    res["first_difference_per_request"] = [
        next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(outs[True], outs[False], strict=True)
    ]
    for i, p in enumerate(prompts_for([(300, 0)] * 64, vocab, seed=12)):
        eng.add_request(eng.make_request(f"sync{i}", p, params))
    for _ in range(4):  # past the prefill
        eng.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(10):
                eng.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    while eng.has_unfinished():
        eng.step()
    msgs = [str(w.message).splitlines()[0] for w in caught]
    res["sync_warnings_in_10_decode_steps"] = len(msgs)
    res["sync_warning_kinds"] = sorted(set(msgs))[:10]
    return res


def profile_steps(llm, vocab, batch: int, ctx: int, steps: int = 5) -> list:
    """Kernel-level time of a few pure-decode steps at a given batch and context (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from pagedserve.runtime import SamplingParams

    eng = llm.engine
    prompts = prompts_for([(ctx, 0)] * batch, vocab, seed=7)
    for i, p in enumerate(prompts):
        eng.add_request(eng.make_request(f"prof{i}", p, SamplingParams(temperature=0.0, max_tokens=64,
                                                                       ignore_eos=True)))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    eng.abort_requests([f"prof{i}" for i in range(batch)])
    while eng.has_unfinished():
        eng.step()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))[:12]:
        rows.append({"name": e.key[:60], "device_ms_per_step": getattr(e, "device_time_total", 0) / 1e3 / steps,
                     "count_per_step": e.count / steps})
    gpu_ms = sum(r["device_ms_per_step"] for r in rows)
    print(f"profile batch {batch} ctx {ctx}: wall {wall * 1e3:.2f} ms/step; top kernels:", flush=True)
    for r in rows[:8]:
        print(f"   {r['device_ms_per_step']:7.3f} ms  x{r['count_per_step']:.0f}  {r['name']}", flush=True)
    return {"batch": batch, "ctx": ctx, "wall_ms_per_step": wall * 1e3, "top_kernels": rows, "sum_top_ms": gpu_ms}


def hf_baseline(model_dir, lens, vocab, batch_sizes, new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.cuda().eval()
    res = {}
    for bs in batch_sizes:
        sub = sorted(lens[:bs], key=lambda x: x[0])
        prompts = prompts_for(sub, vocab)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(bs, width, dtype=torch.long)
        mask = torch.zeros(bs, width, dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.cuda(), mask.cuda()
        kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        res[bs] = {"elapsed_s": dt, "output_tok_per_s": bs * new_tokens / dt, "new_tokens": new_tokens,
                   "note": "fixed-length outputs: an upper bound on HF's useful rate on this workload"}
    del model
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workloads", default="a,b")
    ap.add_argument("--num-a", type=int, default=256)
    ap.add_argument("--num-b", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--hf-batch-sizes", default="1,32,64")
    ap.add_argument("--hf-new-tokens", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch-profile a few decode steps")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--async-scheduling", choices=["auto", "off"], default="auto")
    ap.add_argument("--check-async", action="store_true", help="host syncs and outputs, async on vs off")
    ap.add_argument("--also-sync", action="store_true", help="run workload a again with async scheduling off")
    args = ap.parse_args()

    shape = dict(LLAMA_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    result = {"env": environment(), "shape": shape, "args": vars(args)}
    ceil = measure_ceilings()
    result["ceilings"] = ceil
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors.index.json")):
        t0 = time.perf_counter()
        write_random_llama(args.model_dir, shape)
        result["write_weights_s"] = time.perf_counter() - t0
        print(f"wrote random weights in {result['write_weights_s']:.0f}s", flush=True)

    from pagedserve.runtime import LLM

    t0 = time.perf_counter()
    max_len = 2048
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=max_len, gpu_memory_utilization=0.9,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, async_scheduling=None if args.async_scheduling == "auto" else False)
    result["load_s"] = time.perf_counter() - t0
    kv_tokens = llm.engine.kv.num_blocks * llm.engine.kv.block_size
    result["kv_capacity_tokens"] = kv_tokens
    print(f"loaded in {result['load_s']:.0f}s; KV capacity {kv_tokens} tokens", flush=True)
    vocab = shape["vocab_size"]
    wbytes = llama_param_bytes(shape)
    lat = batch1_latency(llm, vocab)
    lat["weights_GBps"] = wbytes / (lat["itl_ms"] * 1e-3) / 1e9
    lat["fraction_of_copy_bw"] = lat["weights_GBps"] / ceil["copy_GBps"]
    result["batch1"] = lat
    if args.profile:
        result["profile"] = [profile_steps(llm, vocab, b, c) for b, c in ((256, 800), (64, 800))]
    print(f"batch-1: ITL {lat['itl_ms']:.2f} ms = {lat['weights_GBps']:.0f} GB/s of weights "
          f"({lat['fraction_of_copy_bw']:.0%} of copy), TTFT {lat['ttft_s'] * 1e3:.0f} ms", flush=True)
    if args.check_async:
        result["async_check"] = check_async(llm, vocab)
        print(f"async check: {result['async_check']}", flush=True)
    result["async_scheduling"] = llm.engine.async_scheduling
    result["workloads"] = {}
    names = [w for w in args.workloads.split(",") if w] + (["a_sync"] if args.also_sync else [])
    for name in names:
        llm.engine.async_scheduling = result["async_scheduling"] and name != "a_sync"
        if name == "a_sync":
            name = "a"
            key = "a_sync"
        else:
            key = name
        lens = workload(name, args.num_a if name == "a" else args.num_b)
        avg_len = np.mean([i + o for i, o in lens])
        concurrency = int(min(args.max_num_seqs, kv_tokens // avg_len))
        rl = roofline(lens, shape, concurrency, ceil)
        llm.engine.kv.reset_prefix_cache()  # each workload starts cold (a_sync repeats a's prompts)
        r = run_ours(llm, lens, vocab)
        r["roofline"] = rl
        r["fraction_of_roofline"] = rl["t_floor_s"] / r["elapsed_s"]
        result["workloads"][key] = r
        print(f"workload {key}: {len(lens)} reqs, {r['output_tok_per_s']:.0f} out tok/s in {r['elapsed_s']:.1f}s; "
              f"roofline {rl['output_tok_per_s_ceiling']:.0f} ({rl['bound']}-bound) -> "
              f"{r['fraction_of_roofline']:.0%}", flush=True)
        for k, v in r["step_summary"].items():
            print(f"   {k:>18}: {v['steps']:5d} steps, {v['mean_ms']:7.2f} ms mean, {v['total_s']:6.2f} s", flush=True)
    del llm
    torch.cuda.empty_cache()
    if args.hf_batch_sizes:
        bss = [int(b) for b in args.hf_batch_sizes.split(",")]
        result["hf"] = hf_baseline(args.model_dir, workload("a", max(bss)), vocab, bss, args.hf_new_tokens)
        for bs, r in result["hf"].items():
            print(f"HF generate batch {bs}: {r['output_tok_per_s']:.0f} tok/s", flush=True)
    print("\n| figure | value | ceiling | ratio |\n|---|---|---|---|")
    print(f"| batch-1 ITL | {lat['itl_ms']:.2f} ms | {wbytes / ceil['copy_GBps'] / 1e6:.2f} ms | "
          f"{lat['fraction_of_copy_bw']:.0%} |")
    for name, r in result["workloads"].items():
        print(f"| workload {name} out tok/s | {r['output_tok_per_s']:.0f} | "
              f"{r['roofline']['output_tok_per_s_ceiling']:.0f} | {r['fraction_of_roofline']:.0%} |")
    if result.get("hf") and "a" in result["workloads"]:
        best = max(result["hf"].values(), key=lambda r: r["output_tok_per_s"])
        print(f"| vs HF best batch | {result['workloads']['a']['output_tok_per_s'] / best['output_tok_per_s']:.1f}x | | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
