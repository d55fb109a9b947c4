"""Speculative decoding (ngram prompt lookup, or a draft model) on the real SmolLM2-135M-Instruct (GGUF, CPU):
acceptance rate and output tokens/s with and without speculation, at batch 1 and batch 32, greedy.

    .venv/bin/python bench/bench_spec_decode.py --out bench/results/spec_decode_smollm2_cpu.json
    .venv/bin/python bench/bench_spec_decode.py --draft-model same --k 3   # draft_model rows, merged in

``--draft-model same`` uses SmolLM2 itself as its own draft: every greedy draft is accepted, so it is the
upper bound on acceptance, not a speed-up (the draft costs what the target costs). A draft-model run is
recorded under ``draft_model_runs`` of the same file, with its own baseline and command, next to the
ngram record.

Prompts ask for edits of a given text or code (the output copies much of the input: what prompt lookup is
for) and for open continuations (little to copy). Greedy outputs with speculation are checked token for
token against the run without it. The ceiling printed next to the measured speed-up is the mean number of
tokens one verification produced (accepted drafts + 1): the speed-up if a (k+1)-token verification step
cost what a 1-token decode step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.demo_model import smollm2_gguf_path

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
TEXT = (
    "The Kubernetes scheduler watches for newly created pods that have no node assigned. For every pod "
    "that the scheduler discovers, the scheduler becomes responsible for finding the best node for that "
    "pod to run on. Nodes that meet the scheduling requirements for a pod are called feasible nodes. If "
    "none of the nodes are suitable, the pod remains unscheduled until the scheduler is able to place it."
)
TASKS = [
    f"Rename the variable `total` to `running_sum` in this Python function and show the full code:\n{CODE}",
    f"Add type hints to this Python function and show the full code:\n{CODE}",
    f"Repeat the following paragraph exactly, then give it a title:\n{TEXT}",
    f"Rewrite this paragraph, replacing the word 'pod' with 'workload':\n{TEXT}",
    "Write a short story about a robot who learns to paint.",
    "List ten fruits, one per line, each with its color.",
    "Explain what a hash table is to a ten-year-old.",
    f"Translate this Python function to JavaScript:\n{CODE}",
]


def prompts(tokenizer, n: int) -> list[dict]:
    out = []
    for i in range(n):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": TASKS[i % len(TASKS)]}],
                                            tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append({"prompt_token_ids": list(ids)})
    return out


def run(llm: LLM, batch: list[dict], params: SamplingParams, batch_size: int):
    """Generate ``batch`` in groups of ``batch_size``; returns (token ids per prompt, seconds, output tokens)."""
    ids, elapsed, num = [], 0.0, 0
    for i in range(0, len(batch), batch_size):
        t0 = time.perf_counter()
        outs = llm.generate(batch[i:i + batch_size], params)
        elapsed += time.perf_counter() - t0
        for o in outs:
            ids.append(o.outputs[0].token_ids)
            num += len(o.outputs[0].token_ids)
    return ids, elapsed, num


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/spec_decode_smollm2_cpu.json")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--batch1-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--draft-model", default=None,
                    help="a draft model path, or 'same' for SmolLM2 itself: draft_model rows instead of ngram")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = str(smollm2_gguf_path())
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    common = dict(num_kv_cache_tokens=65536, max_model_len=1024, device="cpu")
    if args.draft_model:
        draft = path if args.draft_model == "same" else args.draft_model
        label = "draft_self" if args.draft_model == "same" else "draft"
        configs = [("baseline", None)] + [
            (f"{label}_k{k}", {"method": "draft_model", "model": draft, "num_speculative_tokens": k})
            for k in args.k
        ]
    else:
        configs = [("baseline", None)] + [
            (f"ngram_k{k}", {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2,
                             "prompt_lookup_max": 4})
            for k in args.k
        ]
    results = {}
    reference: dict[int, list] = {}
    for name, spec in configs:
        llm = LLM(path, speculative_config=spec, **common)
        tok = llm.get_tokenizer()
        run(llm, prompts(tok, 2), SamplingParams(temperature=0.0, max_tokens=8), 2)  # warm-up
        for batch_size, n in ((1, args.batch1_prompts), (32, 32)):
            batch = prompts(tok, n)
            before = dict(llm.engine.spec_stats.as_dict()) if spec else None
            ids, secs, num = run(llm, batch, params, batch_size)
            entry = {"batch_size": batch_size, "num_prompts": n, "output_tokens": num, "seconds": round(secs, 3),
                     "output_tokens_per_s": round(num / secs, 2)}
            if spec:
                after = llm.engine.spec_stats.as_dict()
                drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
                proposed = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
                accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
                base = results["baseline"][str(batch_size)]
                entry.update({
                    "num_drafts": drafts, "num_draft_tokens": proposed, "num_accepted_tokens": accepted,
                    "acceptance_rate": round(accepted / proposed, 4) if proposed else 0.0,
                    "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else 1.0,
                    "speedup_vs_baseline": round(entry["output_tokens_per_s"] / base["output_tokens_per_s"], 3),
                    "outputs_identical_to_baseline": ids == reference[batch_size],
                })
            else:
                reference[batch_size] = ids
            results.setdefault(name, {})[str(batch_size)] = entry
            extra = ""
            if spec:
                extra = (f"  acceptance {entry['acceptance_rate']:.2f}, mean accepted length "
                         f"{entry['mean_acceptance_length']:.2f} (speed-up ceiling), speed-up "
                         f"{entry['speedup_vs_baseline']:.2f}x, identical={entry['outputs_identical_to_baseline']}")
            print(f"{name:10s} batch {batch_size:2d}: {entry['output_tokens_per_s']:8.1f} tok/s{extra}", flush=True)
        llm.engine.shutdown()
        del llm
    record = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__,
                    "note": "2-core CPU shared with other engineers' jobs: absolute figures are noisy"},
        "model": os.path.basename(path),
        "sampling": f"greedy, ignore_eos, max_tokens={args.max_tokens}",
        "results": results,
    }
    if args.draft_model:
        record["draft_model"] = "the target itself" if args.draft_model == "same" else args.draft_model
        if args.draft_model == "same":
            record["note"] = ("draft = target: the upper bound on acceptance (every greedy draft is accepted); "
                              "the draft costs what the target costs, so no speed-up is expected from it")
        existing = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                existing = json.load(f)
        existing.setdefault("draft_model_runs", {})[list(results)[-1]] = record
        record = existing
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
