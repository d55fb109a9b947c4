"""Tensor-parallel scaling on one host: TP=1 vs TP=N (default 1,2) on Llama-3.1-8B-shaped random bf16 weights,
batch-1 inter-token latency and saturated offline throughput (total and per GPU), each next to its ceiling.

    python3 bench/bench_tp.py --model-dir /tmp/llama8b --out bench/results/tp_h100x2.json   # on nvidia-h100-x2

The weights are made on the GPU and written as safetensors once (bench/gpu_common.py), then every rank loads
only its shard through our loader. Each variant runs in a child process of its own (``--in-process``: all in
this one), one engine at a time: rank 0 on cuda:0, ranks 1..N-1 in worker processes on cuda:1..

Ceilings: batch-1 ITL >= (weight bytes / N) / copy bandwidth (each GPU reads its shard once per token; the
all-reduces add on top: 2 per layer of hidden_size bf16 values); throughput from bench_offline's roofline with
N times the copy bandwidth and matmul rate (perfect scaling). Goal (issue 7): ITL at TP=2 at least 1.6x lower.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

# Never NVLink multicast on shared hosts (set before torch/NCCL read them; the engine also sets them).
for _key, _value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                     "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_offline import batch1_latency, roofline, run_ours, workload  # noqa: E402
from gpu_common import LLAMA_8B, environment, llama_param_bytes, measure_ceilings, write_random_llama  # noqa: E402

# PAGEDSERVE_* knobs a KEY=VALUE variant flag may set (a typo would otherwise measure the baseline under a
# variant's name).
ENV_KNOBS = {"GEMV_CONFIG", "GEMV_TABLE", "PDL", "KERNELS", "TP_ALLREDUCE", "TP_LL", "FUSED_SILU", "FUSED_ROTARY", "ARGMAX",
             "ATTN_PDL"}


def parse_variant(text: str) -> tuple[int, set[str]]:
    """"2" -> (2, {}); "2:nccl:sync" -> (2, {"nccl", "sync"}): NCCL for every all-reduce, no async scheduling;
    "nopdl": no programmatic dependent launch (kernels/pdl.py); "GEMV_CONFIG=4x512w4": the environment
    variable PAGEDSERVE_GEMV_CONFIG=4x512w4 for this variant's processes (a knob read at import)."""
    size, *flags = text.split(":")
    known = {"nccl", "sync", "nopdl"}
    unknown = sorted(f for f in flags if "=" not in f and f not in known)
    unknown += sorted(f for f in flags if "=" in f and f.partition("=")[0] not in ENV_KNOBS)
    if unknown:
        raise SystemExit(f"--tp-sizes: unknown flag(s) {unknown} in {text!r} (known: {sorted(known)}, or "
                         f"KEY=VALUE with KEY one of {sorted(ENV_KNOBS)})")
    return int(size), set(flags)


@contextlib.contextmanager
def _env(key: str, value: str | None):
    """``os.environ[key] = value`` inside the block (``None``: left as it is), restored after it."""
    saved = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def run_tp(args, shape: dict, variant: str, ceil: dict) -> dict:
    from pagedserve.kernels import pdl

    # The worker ranks read the environment as they start; rank 0 runs in this process and launches eager
    # kernels for the whole variant, so it gets PDL's in-process override for all of it.
    pdl.set_enabled(False if "nopdl" in parse_variant(variant)[1] else None)
    try:
        return _run_tp(args, shape, variant, ceil)
    finally:
        pdl.set_enabled(None)


def _run_tp(args, shape: dict, variant: str, ceil: dict) -> dict:
    from pagedserve.kernels import pdl
    from pagedserve.runtime import LLM
    from pagedserve.runtime.parallel import ALLREDUCE_ENV

    tp, flags = parse_variant(variant)
    t0 = time.perf_counter()
    with _env(ALLREDUCE_ENV, "nccl" if "nccl" in flags else "auto"), _env(pdl.ENV, "0" if "nopdl" in flags else None):
        llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                  tensor_parallel_size=tp, async_scheduling=False if "sync" in flags else None)
    res: dict = {"tensor_parallel_size": tp, "variant": variant, "load_s": time.perf_counter() - t0,
                 "async_scheduling": llm.engine.async_scheduling,
                 "peer_all_reduce": getattr(llm.engine.runner, "tp", None) is not None
                 and llm.engine.runner.tp.peer is not None}
    try:
        kv_tokens = llm.engine.kv.num_blocks * llm.engine.kv.block_size
        res["kv_capacity_tokens"] = kv_tokens
        print(f"[TP={variant}] loaded in {res['load_s']:.0f}s; KV capacity {kv_tokens} tokens (each rank holds "
              f"1/{tp} of every token's K/V)", flush=True)
        vocab = shape["vocab_size"]
        wbytes = llama_param_bytes(shape)
        runner = llm.engine.runner
        wait0, t0 = getattr(runner, "device_wait_s", None), time.perf_counter()
        lat = batch1_latency(llm, vocab)
        if wait0 is not None:  # TP > 1: how much of the time rank 0's host sat waiting for its GPU
            lat["rank0_device_wait_fraction"] = (runner.device_wait_s - wait0) / (time.perf_counter() - t0)
        lat["ceiling_ms"] = wbytes / tp / ceil["copy_GBps"] / 1e6
        lat["fraction_of_ceiling"] = lat["ceiling_ms"] / lat["itl_ms"]
        res["batch1"] = lat
        print(f"[TP={variant}] batch-1 ITL {lat['itl_ms']:.2f} ms (ceiling {lat['ceiling_ms']:.2f} ms from "
              f"{wbytes / tp / 1e9:.1f} GB of weights per GPU: {lat['fraction_of_ceiling']:.0%}), "
              f"TTFT {lat['ttft_s'] * 1e3:.0f} ms"
              + (f"; rank 0's host waited for its GPU {lat['rank0_device_wait_fraction']:.0%} of the time"
                 if "rank0_device_wait_fraction" in lat else ""), flush=True)
        if args.latency_only or (flags and not args.throughput_all):  # an ablation: batch-1 latency only
            return res
        lens = workload(args.workload, args.num_requests)
        concurrency = int(min(args.max_num_seqs, kv_tokens // np.mean([i + o for i, o in lens])))
        scaled = {"copy_GBps": ceil["copy_GBps"] * tp, "matmul_bf16_TFLOPs": ceil["matmul_bf16_TFLOPs"] * tp}
        rl = roofline(lens, shape, concurrency, scaled)
        r = run_ours(llm, lens, vocab)
        r["roofline"] = rl
        r["fraction_of_roofline"] = rl["t_floor_s"] / r["elapsed_s"]
        r["output_tok_per_s_per_gpu"] = r["output_tok_per_s"] / tp
        res["throughput"] = r
        print(f"[TP={variant}] workload {args.workload}: {len(lens)} reqs, {r['output_tok_per_s']:.0f} out tok/s "
              f"({r['output_tok_per_s_per_gpu']:.0f} per GPU) in {r['elapsed_s']:.1f}s; roofline "
              f"{rl['output_tok_per_s_ceiling']:.0f} ({rl['bound']}-bound) -> {r['fraction_of_roofline']:.0%}",
              flush=True)
        for k, v in r["step_summary"].items():
            print(f"   {k:>18}: {v['steps']:5d} steps, {v['mean_ms']:7.2f} ms mean, {v['total_s']:6.2f} s",
                  flush=True)
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return res


def variant_env(variant: str) -> dict[str, str]:
    """The PAGEDSERVE_* environment a variant's KEY=VALUE flags ask for."""
    return {f"PAGEDSERVE_{k}": v for k, _, v in (f.partition("=") for f in parse_variant(variant)[1] if "=" in f)}


def run_in_child(args, variant: str, ceil: dict) -> dict:
    """``run_tp`` for one variant in a fresh process. Engines one after another in one process did not give
    each a clean start on two H200s: a TP=1 engine after a TP=2 one found ~25 GB less free memory on cuda:0,
    and a second TP=2 engine hung while starting (session 4; not investigated)."""
    forwarded = ["--model-dir", args.model_dir, "--workload", args.workload,
                 "--num-requests", str(args.num_requests), "--max-model-len", str(args.max_model_len),
                 "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                 "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    forwarded += (["--throughput-all"] * args.throughput_all + ["--enforce-eager"] * args.enforce_eager
                  + ["--latency-only"] * args.latency_only)
    if args.layers:
        forwarded += ["--layers", str(args.layers)]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded, "--tp-sizes", variant,
                               "--child-ceilings", json.dumps(ceil), "--child-out", out], check=False,
                              env={**os.environ, **variant_env(variant)})
        if proc.returncode != 0 or not os.path.exists(out):
            print(f"[TP={variant}] failed: exit code {proc.returncode}", flush=True)
            return {"variant": variant, "error": f"exit code {proc.returncode}"}
        with open(out) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tp-sizes", default="1,2",
                    help="comma-separated sizes; a size may carry flags: 2:nccl (NCCL for every all-reduce), "
                         "2:sync (no async scheduling), 2:nopdl (no programmatic dependent launch); flagged "
                         "runs measure batch-1 latency only")
    ap.add_argument("--throughput-all", action="store_true", help="throughput for flagged runs too")
    ap.add_argument("--latency-only", action="store_true", help="batch-1 latency only, for every run")
    ap.add_argument("--workload", default="a", choices=["a", "b"])
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (eager decode)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--in-process", action="store_true",
                    help="run every variant in this process (default: one child process per variant)")
    ap.add_argument("--child-ceilings", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    variants = args.tp_sizes.split(",")
    if args.in_process and any(variant_env(v) for v in variants):
        raise SystemExit("KEY=VALUE variant flags are read at import: they need a child process per variant "
                         "(drop --in-process)")
    sizes = [parse_variant(v)[0] for v in variants]
    if max(sizes) > torch.cuda.device_count():
        raise SystemExit(f"--tp-sizes {args.tp_sizes} needs {max(sizes)} GPUs; {torch.cuda.device_count()} visible")
    shape = dict(LLAMA_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.child_out:  # one variant for a parent run (below): ceilings and weights come from the parent
        run = run_tp(args, shape, args.tp_sizes, json.loads(args.child_ceilings))
        with open(args.child_out, "w") as f:
            json.dump(run, f, default=str)
        return
    result = {"env": environment(), "shape": shape, "args": vars(args),
              "nccl_env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM_"))}}
    ceil = measure_ceilings()
    result["ceilings_per_gpu"] = ceil
    print(f"ceilings (cuda:0): copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} "
          f"TFLOP/s", flush=True)
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors.index.json")):
        t0 = time.perf_counter()
        write_random_llama(args.model_dir, shape)
        result["write_weights_s"] = time.perf_counter() - t0
        print(f"wrote random weights in {result['write_weights_s']:.0f}s", flush=True)
    torch.cuda.empty_cache()

    result["runs"] = {}
    for variant in variants:
        result["runs"][variant] = (run_tp(args, shape, variant, ceil) if args.in_process
                                   else run_in_child(args, variant, ceil))
        if args.out:  # keep what finished if a later size fails
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2, default=str)

    runs = {k: r for k, r in result["runs"].items() if "error" not in r}
    print("\n| TP | batch-1 ITL | ITL ceiling | out tok/s | per GPU | KV tokens | load |\n|---|---|---|---|---|---|---|")
    for tp, r in runs.items():
        thr = r.get("throughput")
        print(f"| {tp} | {r['batch1']['itl_ms']:.2f} ms | {r['batch1']['ceiling_ms']:.2f} ms | "
              f"{thr['output_tok_per_s']:.0f} | {thr['output_tok_per_s_per_gpu']:.0f} | " if thr else
              f"| {tp} | {r['batch1']['itl_ms']:.2f} ms | {r['batch1']['ceiling_ms']:.2f} ms | - | - | ",
              f"{r['kv_capacity_tokens']} | {r['load_s']:.0f}s |", sep="")
    if "1" in runs:
        base = runs["1"]
        result["scaling"] = {}
        for tp, r in runs.items():
            if tp == "1":
                continue
            s = {"itl_speedup": base["batch1"]["itl_ms"] / r["batch1"]["itl_ms"]}
            if "throughput" in r and "throughput" in base:
                s["throughput_speedup"] = r["throughput"]["output_tok_per_s"] / base["throughput"]["output_tok_per_s"]
            result["scaling"][tp] = s
            print(f"TP={tp} vs TP=1: ITL {s['itl_speedup']:.2f}x lower (goal >= 1.6x at TP=2)"
                  + (f", throughput {s['throughput_speedup']:.2f}x" if "throughput_speedup" in s else ""), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
