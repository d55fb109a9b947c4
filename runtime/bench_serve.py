"""``pagedserve bench serve``: load-test a running OpenAI-compatible server (ours or vLLM).

Sends streamed completions on a seeded schedule (see ``workloads``) with at most ``--max-concurrency`` in
flight, then reports request and token throughput and TTFT / TPOT / ITL / end-to-end latency (mean, median,
p90, p99) as a table and, with ``--result-file``, as JSON together with the command and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import shlex
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from pagedserve.runtime.workloads import (
    POOL_TEXT,
    BenchRequest,
    arrival_offsets,
    file_requests,
    random_requests,
)


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99)}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """Aggregate figures; latencies in milliseconds. TPOT excludes the first token; ITL is every gap."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else float("nan"),
        "output_token_throughput": out_tokens / duration_s if duration_s > 0 else float("nan"),
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else float("nan"),
        "ttft_ms": _dist([r.ttft for r in ok]),
        "tpot_ms": _dist(tpots),
        "itl_ms": _dist([g for r in ok for g in r.itls]),
        "e2e_ms": _dist([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }


def format_table(s: dict) -> str:
    lines = [
        f"{'Successful requests':<34}{s['completed']:>14}",
        f"{'Failed requests':<34}{s['failed']:>14}",
        f"{'Benchmark duration (s)':<34}{s['duration_s']:>14.2f}",
        f"{'Total input tokens':<34}{s['total_input_tokens']:>14}",
        f"{'Total output tokens':<34}{s['total_output_tokens']:>14}",
        f"{'Request throughput (req/s)':<34}{s['request_throughput']:>14.2f}",
        f"{'Output token throughput (tok/s)':<34}{s['output_token_throughput']:>14.2f}",
        f"{'Total token throughput (tok/s)':<34}{s['total_token_throughput']:>14.2f}",
        f"{'(ms)':<10}{'mean':>12}{'median':>12}{'p90':>12}{'p99':>12}",
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        d = s[key]
        lines.append(f"{name:<10}{d['mean']:>12.2f}{d['median']:>12.2f}{d['p90']:>12.2f}{d['p99']:>12.2f}")
    if s["errors"]:
        lines.append("errors: " + "; ".join(s["errors"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the client
async def _one(session: aiohttp.ClientSession, url: str, model: str, req: BenchRequest, headers: dict,
               temperature: float) -> RequestResult:
    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "ignore_eos": True,
               "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False, prompt_len=req.prompt_len)
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))[:200]
                    return res
                now = time.perf_counter()
                if obj.get("usage"):
                    res.output_len = obj["usage"]["completion_tokens"]
                    res.prompt_len = obj["usage"]["prompt_tokens"]
                # Every chunk with choices carries at least one new token (its text may be empty: a
                # token that completes no character, or one held back as a possible stop-string prefix).
                if obj.get("choices"):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens received"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def _token_pool(session: aiohttp.ClientSession, base: str, model: str, headers: dict) -> list[int]:
    async with session.post(f"{base}/tokenize", json={"model": model, "prompt": POOL_TEXT,
                                                      "add_special_tokens": False}, headers=headers) as r:
        r.raise_for_status()
        return sorted(set((await r.json())["tokens"]))


async def _model_name(session: aiohttp.ClientSession, base: str, headers: dict) -> str:
    async with session.get(f"{base}/v1/models", headers=headers) as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]


async def benchmark(args: argparse.Namespace, requests: list[BenchRequest] | None = None) -> dict:
    """Run one benchmark as ``args`` describe it; ``requests`` overrides the dataset arguments."""
    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = args.model or await _model_name(session, base, headers)
        if requests is not None:
            pass
        elif args.dataset == "random":
            pool = await _token_pool(session, base, model, headers)
            requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len, pool,
                                       args.random_range_ratio, args.seed)
        else:
            requests = file_requests(args.dataset_path, args.num_prompts, args.seed, args.random_output_len)
        offsets = arrival_offsets(len(requests), args.request_rate, args.arrival, args.burst_size, args.seed)
        limit = asyncio.Semaphore(args.max_concurrency or len(requests))
        url = f"{base}/v1/completions"

        async def send(req: BenchRequest, at: float, t_start: float) -> RequestResult:
            delay = t_start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with limit:
                return await _one(session, url, model, req, headers, args.temperature)

        t_start = time.perf_counter()
        results = await asyncio.gather(*(send(r, at, t_start) for r, at in zip(requests, offsets, strict=True)))
        duration = time.perf_counter() - t_start
    summary = summarize(list(results), duration)
    return {"summary": summary, "model": model, "base_url": base, "config": {
        k: v for k, v in vars(args).items() if k not in ("func", "api_key", "argv")}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (inf: all at once)")
    p.add_argument("--arrival", choices=("poisson", "burst"), default="poisson")
    p.add_argument("--burst-size", type=int, default=8, help="requests per burst with --arrival burst")
    p.add_argument("--max-concurrency", type=int, default=0, help="most requests in flight (0: no limit)")
    p.add_argument("--dataset", choices=("random", "file"), default="random")
    p.add_argument("--dataset-path", default=None, help="JSONL of {prompt, output_len} for --dataset file")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128, help="also the default output_len of files")
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout in seconds")
    p.add_argument("--result-file", default=None, help="write the results as JSON here")


def _command_line(argv: list[str]) -> str:
    """The command that made the result, with the API key blanked out."""
    shown = list(argv)
    for i, a in enumerate(shown[:-1]):
        if a == "--api-key":
            shown[i + 1] = "***"
    return shlex.join(["pagedserve", *shown])


def _json_safe(obj):
    """Strict JSON: infinities and NaN become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    if args.dataset == "file" and not args.dataset_path:
        print("--dataset file needs --dataset-path", file=sys.stderr)
        return 2
    result = asyncio.run(benchmark(args))
    result["command"] = _command_line(getattr(args, "argv", None) or sys.argv[1:])
    result["machine"] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                         "python": platform.python_version()}
    result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(format_table(result["summary"]))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(_json_safe(result), f, indent=2)
        print(f"results written to {args.result_file}")
    return 0 if result["summary"]["failed"] == 0 else 1
