"""The ``pagedserve`` command: ``serve MODEL``, ``bench serve``, and ``operator`` (the Kubernetes operator).

The flag names of ``serve`` are a contract with the operator, which builds pod command lines from them
(``operator/builders.py``); keep them stable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

API_KEY_ENV = "PAGEDSERVE_API_KEY"
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _port(s: str) -> int:
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {v}")
    return v


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model directory or a .gguf file (local path)")
    net = p.add_argument_group("HTTP")
    net.add_argument("--host", default="0.0.0.0", help="address to listen on")
    net.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port)")
    net.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="model name(s) clients use in 'model'; the first one labels the metrics (default: MODEL)")
    net.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                     help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV})")
    net.add_argument("--max-waiting-requests", type=_non_negative_int, default=0,
                     help="answer 429 once this many requests wait for the engine (0: no limit)")
    net.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                     help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    net.add_argument("--max-request-body-bytes", type=_positive_int, default=16 << 20,
                     help="larger request bodies get 413")
    net.add_argument("--engine-hang-timeout", type=_non_negative_float, default=60.0,
                     help="/health fails once the engine loop has made no progress for this many seconds")
    net.add_argument("--log-level", type=str.lower, choices=_LOG_LEVELS, default="info")
    net.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    net.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=False,
                     help="run the engine core in a process of its own, so HTTP and streaming never take the "
                          "GIL from it (default: a thread of the server process)")
    net.add_argument("--debug-step-delay", type=_non_negative_float, default=0.0, help=argparse.SUPPRESS)

    eng = p.add_argument_group("engine")
    eng.add_argument("--max-model-len", type=_positive_int, default=None,
                     help="context length (default: the model's)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                     help="fraction of GPU memory for weights, activations and the KV cache")
    eng.add_argument("--block-size", type=int, default=16, choices=(8, 16, 32, 64, 128),
                     help="tokens per KV-cache block")
    eng.add_argument("--num-kv-cache-tokens", type=_positive_int, default=None,
                     help="explicit KV-cache size in tokens (overrides --gpu-memory-utilization)")
    eng.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    eng.add_argument("--max-num-seqs", type=_positive_int, default=256, help="most requests in one batch")
    eng.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                     help="token budget of one engine step (default: max(8192, max-num-seqs))")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    eng.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    eng.add_argument("--long-prefill-token-threshold", type=_non_negative_int, default=0)
    eng.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    eng.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    eng.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling")
    eng.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    eng.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                     help="schedule step N+1 while step N runs on the device (default: on with CUDA and "
                          "no speculative decoding)")
    eng.add_argument("--speculative-config", type=_json_object, default=None,
                     help='speculative decoding as JSON, as vLLM takes it: {"method": "ngram", '
                          '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}')


def server_config_from_args(args: argparse.Namespace):
    from pagedserve.runtime.server import ServerConfig

    engine_kwargs = dict(
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        num_kv_cache_tokens=args.num_kv_cache_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        speculative_config=args.speculative_config,
        async_scheduling=args.async_scheduling,
    )
    return ServerConfig(
        model=args.model,
        served_model_names=args.served_model_name,
        host=args.host,
        port=args.port,
        engine_kwargs=engine_kwargs,
        api_key=args.api_key,
        max_waiting_requests=args.max_waiting_requests,
        shutdown_timeout=args.shutdown_timeout,
        max_request_body_bytes=args.max_request_body_bytes,
        engine_hang_timeout=args.engine_hang_timeout,
        debug_step_delay=args.debug_step_delay,
        engine_process=args.engine_process,
    )


def _serve(args: argparse.Namespace) -> int:
    from pagedserve.runtime.log_setup import setup_logging
    from pagedserve.runtime.server import run_server

    setup_logging(args.log_level, args.log_json)
    # The engine thread and the event loop share the GIL; a short switch interval keeps the engine thread
    # from waiting up to 5 ms for it each time it comes back from the GPU while the loop writes responses.
    sys.setswitchinterval(0.0005)
    code = asyncio.run(run_server(server_config_from_args(args)))
    # Skip the interpreter's teardown (seconds of torch and tokenizer finalizers, nothing a stopping
    # server needs): flush the logs and leave with the code.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _bench_serve(args: argparse.Namespace) -> int:
    from pagedserve.runtime.bench_serve import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from pagedserve.runtime.bench_serve import add_arguments as add_bench_arguments

    parser = argparse.ArgumentParser(prog="pagedserve", description="Kubernetes-native LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,bench,operator}")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve = bench_sub.add_parser("serve", help="load-test a running server",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_arguments(bench_serve)
    bench_serve.set_defaults(func=_bench_serve)
    sub.add_parser("operator", help="run the Kubernetes operator (see: pagedserve operator --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "operator":
        from pagedserve.operator.main import main as operator_main

        return operator_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
