"""What structured outputs cost on the host, with a real tokenizer (SmolLM2-135M-Instruct's, 49,152 tokens):

- compiling a grammar against the tokenizer (first use; later uses of the same grammar are cached),
- the per-step mask of a batch of constrained requests (``GrammarCompiler.fill_bitmasks``: one matcher alone, or
  a batch on llguidance's thread pool), and advancing a matcher by one token,
- end to end on SmolLM2 itself: output tokens/s of a batch with and without a JSON schema, and whether every
  constrained output parses and fits the schema.

    .venv/bin/python bench/bench_structured_outputs.py --out bench/results/structured_outputs_cpu.json

CPU only (the mask is computed on the host on every machine; on a GPU it is then copied and applied there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.demo_model import smollm2_gguf_path
from pagedserve.runtime.structured_outputs import GrammarCompiler, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "number"},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "country", "is_capital"],
    "additionalProperties": False,
}
CONSTRAINTS = {"json_schema": {"json": SCHEMA}, "regex": {"regex": r"[A-Z][a-z]{2,12}, [A-Z][a-z]{2,12}"},
               "choice": {"choice": ["Paris", "London", "Berlin", "Madrid", "Rome"]}}


def median_us(fn, iters: int) -> float:
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    llm = LLM(str(smollm2_gguf_path()), device="cpu", num_kv_cache_tokens=16384, max_model_len=512)
    eng = llm.engine
    compiler = GrammarCompiler(eng.source.tokenizer, eng.vocab_size, eng.eos_token_ids)
    t0 = time.perf_counter()
    compiler.ll_tokenizer  # noqa: B018 - built on first use; timed here
    tokenizer_s = time.perf_counter() - t0
    rows = []
    for name, c in CONSTRAINTS.items():
        params = StructuredOutputsParams.from_value(c)
        t0 = time.perf_counter()
        compiler.compile(params)
        compile_ms = (time.perf_counter() - t0) * 1e3
        one = compiler.matcher(params)
        batch = [compiler.matcher(params) for _ in range(args.batch)]
        mask_one = median_us(lambda one=one: compiler.fill_bitmasks([one]), args.iters)
        mask_batch = median_us(lambda batch=batch: compiler.fill_bitmasks(batch), args.iters)
        allowed = compiler.fill_bitmasks([one])[0]
        first_allowed = int(((allowed.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).sum())
        rows.append({"constraint": name, "compile_ms": compile_ms, "mask_one_us": mask_one,
                     f"mask_batch{args.batch}_us": mask_batch, "allowed_first_tokens": first_allowed})
        print(rows[-1], flush=True)

    prompts = [f"Name a large city in country number {i} and answer as JSON." for i in range(args.batch)]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    free = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, structured_outputs={"json": SCHEMA})
    llm.chat(chats[:2], free)  # warm-up
    llm.chat(chats[:2], constrained)
    e2e = {}
    for label, sp in (("unconstrained", free), ("json_schema", constrained)):
        t0 = time.perf_counter()
        outs = llm.chat(chats, sp)
        dt = time.perf_counter() - t0
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        e2e[label] = {"seconds": dt, "output_tokens": toks, "tok_per_s": toks / dt,
                      "steps": llm.last_stats.get("steps")}
        if label == "json_schema":
            ok = 0
            for o in outs:
                try:
                    obj = json.loads(o.outputs[0].text)
                    ok += isinstance(obj, dict) and {"city", "country", "is_capital"} <= set(obj)
                except ValueError:
                    pass
            e2e[label]["valid_json_fitting_schema"] = f"{ok}/{len(outs)}"
            e2e[label]["example"] = outs[0].outputs[0].text
        print(label, e2e[label], flush=True)

    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": platform.platform(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "llguidance": __import__("llguidance").__version__, "model": "SmolLM2-135M-Instruct (GGUF, fp32)",
              "vocab_size": eng.vocab_size, "tokenizer_build_s": tokenizer_s, "batch": args.batch,
              "host_costs": rows, "end_to_end": e2e}
    print(f"\ntokenizer for llguidance built in {tokenizer_s:.2f}s; vocabulary {eng.vocab_size}")
    print(f"\n| constraint | compile | mask, 1 request | mask, {args.batch} requests | tokens allowed first |"
          "\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['constraint']} | {r['compile_ms']:.1f} ms | {r['mask_one_us']:.0f} us | "
              f"{r[f'mask_batch{args.batch}_us']:.0f} us | {r['allowed_first_tokens']} |")
    print(f"\n| batch of {args.batch} chats, {args.max_tokens} tokens max | output tok/s | steps | valid |"
          "\n|---|---|---|---|")
    for label, v in e2e.items():
        print(f"| {label} | {v['tok_per_s']:.1f} | {v['steps']} | {v.get('valid_json_fitting_schema', '')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
