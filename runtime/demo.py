"""`make demo` (offline stage): chat with the real demo model, SmolLM2-135M-Instruct, on CPU.

Prints the answer and the decode speed. Once the local cluster exists, `make demo` runs the whole product
(operator, pods, Service) instead; this stays as `python -m pagedserve.runtime.demo`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model dir or .gguf (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pagedserve.runtime import LLM, SamplingParams
    from pagedserve.runtime.demo_model import smollm2_gguf_path

    model = args.model or str(smollm2_gguf_path())
    print(f"loading {model} ...", flush=True)
    llm = LLM(model, max_model_len=2048, num_kv_cache_tokens=8192)
    messages = [{"role": "user", "content": args.question}]
    print(f"\nuser: {args.question}", flush=True)
    t0 = time.perf_counter()
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))[0]
    elapsed = time.perf_counter() - t0
    comp = out.outputs[0]
    print(f"assistant: {comp.text}")
    n = len(comp.token_ids)
    print(
        f"\n{n} tokens in {elapsed:.2f}s = {n / elapsed:.1f} tokens/s "
        f"(prompt {len(out.prompt_token_ids)} tokens, greedy, CPU, finish_reason={comp.finish_reason})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
