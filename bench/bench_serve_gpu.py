"""Online serving on the GPU: ``pagedserve serve`` loaded by ``pagedserve bench serve``, next to its ceiling,
the offline engine (``LLM.generate``) on exactly the same requests in the same run.

    PYTHONPATH=/tmp/pp python3 bench/bench_serve_gpu.py --model-dir /tmp/llama8b --out $OUT/serve_h100.json

Model: Llama-3.1-8B-shaped random bf16 weights (gpu_common.write_random_llama), so no download is needed.
Workload (runtime/workloads.py, seeded): random token prompts, input and output lengths uniform in
mean * [1 - r, 1 + r], ignore_eos; run once with every request at t=0 (throughput) and once with Poisson
arrivals at --rate (latency under load). The server's output tokens/s at t=0 is reported as a fraction of
the offline engine's on the same requests: the cost of HTTP, SSE, the asyncio front end and the hand-off to
the engine. ``--variants`` runs the server once per set of extra flags (default: the engine core in its own
process, then on a thread of the server process), each against the same offline ceiling.

On this CPU machine, as a check of the script and of the two front ends:

    .venv/bin/python bench/bench_serve_gpu.py --tiny --device cpu --model-dir /tmp/tiny_serve \
        --num-prompts 64 --input-len 64 --output-len 64 --max-num-seqs 64 --max-model-len 512 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

from gpu_common import LLAMA_8B, environment, write_random_llama

from pagedserve.runtime.bench_serve import _json_safe, add_arguments, benchmark, format_table
from pagedserve.runtime.workloads import POOL_TEXT, random_requests


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready in time")


def _bench_args(base_url: str, rate: float, num: int, concurrency: int) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--base-url", base_url, "--request-rate", str(rate), "--num-prompts", str(num),
                         "--max-concurrency", str(concurrency), "--timeout", "1200"])


def _serve_runs(cmd: list[str], base: str, args, requests) -> dict:
    """Start the server, run the t=0 and Poisson loads, SIGTERM it; the runs and the server's metrics."""
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=sys.stdout, stderr=sys.stderr)
    runs = {}
    try:
        _wait_ready(base, server, 600)
        ready_s = time.perf_counter() - t0
        for name, rate, conc in (("all_at_once", math.inf, args.num_prompts), ("poisson", args.rate, args.num_prompts)):
            res = asyncio.run(benchmark(_bench_args(base, rate, args.num_prompts, conc), requests))
            print(f"\n== server, {name} (rate {rate}) ==\n{format_table(res['summary'])}", flush=True)
            runs[name] = res["summary"]
        with urllib.request.urlopen(base + "/metrics") as r:
            metrics_text = r.read().decode()
    finally:
        t_term = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
        drain_s = time.perf_counter() - t_term
    print(f"server: ready after {ready_s:.1f}s; SIGTERM to exit {drain_s:.1f}s, exit code {exit_code}", flush=True)
    return {
        "command": cmd, "server_ready_s": ready_s, "drain_s": drain_s, "server_exit_code": exit_code, "runs": runs,
        "metrics_tail": [line for line in metrics_text.splitlines()
                         if line.startswith(("vllm:num_preemptions", "vllm:prefix_cache", "vllm:request_success_total",
                                             "pagedserve_engine_step_seconds_sum", "pagedserve_engine_step_seconds_count",
                                             "pagedserve_engine_steps"))],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--out", default=None)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--rate", type=float, default=12.0, help="Poisson arrivals per second of the second run")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead (a CPU check of this script)")
    ap.add_argument("--variants", default="--engine-process;--no-engine-process",
                    help="';'-separated sets of extra server flags, one server run each")
    args = ap.parse_args()

    env = environment()
    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from tiny_models import build_model_dir

        build_model_dir(args.model_dir, "llama", max_position_embeddings=4096)
    elif not os.path.exists(os.path.join(args.model_dir, "config.json")):
        t0 = time.perf_counter()
        write_random_llama(args.model_dir, LLAMA_8B)
        print(f"wrote random weights in {time.perf_counter() - t0:.1f}s", flush=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    pool = sorted(set(tok(POOL_TEXT, add_special_tokens=False)["input_ids"]))
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, pool, args.range_ratio, seed=0)
    engine_flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]

    # 1. The server under load, once per variant.
    base = f"http://127.0.0.1:{args.port}"
    variants = {}
    for variant in [v.strip() for v in args.variants.split(";")]:
        cmd = [sys.executable, "-m", "pagedserve.runtime.cli", "serve", args.model_dir, "--host", "127.0.0.1",
               "--port", str(args.port), "--device", args.device, "--served-model-name", "llama8b-random",
               *engine_flags, *variant.split()]
        print(f"\n==== server variant: {variant or '(defaults)'} ====", flush=True)
        variants[variant] = _serve_runs(cmd, base, args, requests)

    # 2. The ceiling: the offline engine on the same requests.
    from pagedserve.runtime import LLM, SamplingParams

    llm = LLM(args.model_dir, device=args.device, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    prompts = [{"prompt_token_ids": r.prompt} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate(prompts[:8], params[:8])  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    offline_s = time.perf_counter() - t0
    offline_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    offline_tps = offline_tokens / offline_s
    print("\n| server variant | output tok/s (all at once) | ceiling (offline engine, same requests) | ratio |"
          "\n|---|---|---|---|")
    for variant, v in variants.items():
        v["server_vs_offline"] = v["runs"]["all_at_once"]["output_token_throughput"] / offline_tps
        print(f"| {variant or '(defaults)'} | {v['runs']['all_at_once']['output_token_throughput']:.0f} | "
              f"{offline_tps:.0f} | {v['server_vs_offline']:.0%} |")
    result = {
        "env": env, "shape": "tiny random llama" if args.tiny else "llama-3.1-8b random bf16", "args": vars(args),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "variants": variants,
        "offline": {"elapsed_s": offline_s, "output_tokens": offline_tokens, "output_tok_per_s": offline_tps,
                    "steps": llm.last_stats.get("steps")},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(_json_safe(result), f, indent=2, default=str)


if __name__ == "__main__":
    main()
