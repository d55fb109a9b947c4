"""Greedy outputs token-identical to HF transformers' generate (fp32, CPU) on tiny random models."""

import random

import pytest
import torch
from tiny_models import hf_greedy, hf_logprobs

from pagedserve.runtime import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def run_and_compare(llm: LLM, hf_model, prompts, max_tokens=24, **sp):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sp)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, o in zip(prompts, outs, strict=True):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p, max_tokens), f"prompt of {len(p)} tokens"
        assert o.outputs[0].finish_reason == "length"
    return outs


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_mixed_lengths(tiny_model_factory, arch):
    path, hf, tok = tiny_model_factory(arch)
    llm = LLM(path, num_kv_cache_tokens=4096)
    prompts = random_prompts(len(tok), [1, 7, 16, 17, 33, 60], seed=1)
    run_and_compare(llm, hf, prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_in_8_token_chunks(tiny_model_factory, arch):
    path, hf, tok = tiny_model_factory(arch)
    llm = LLM(path, num_kv_cache_tokens=4096, max_num_batched_tokens=8, max_num_seqs=8)
    prompts = random_prompts(len(tok), [5, 19, 40, 3], seed=2)
    run_and_compare(llm, hf, prompts, max_tokens=12)
    # Every step stayed within the 8-token budget (decodes and prefill chunks mixed).
    assert llm.last_stats["steps"] >= (5 + 19 + 40 + 3) // 8


def test_prefix_cache_hits_give_identical_outputs(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    llm = LLM(path, num_kv_cache_tokens=4096)
    prefix = random_prompts(len(tok), [70], seed=3)[0]
    suffixes = random_prompts(len(tok), [1, 5, 16, 23], seed=4)
    first = run_and_compare(llm, hf, [prefix + suffixes[0]])
    assert first[0].num_cached_tokens == 0
    outs = run_and_compare(llm, hf, [prefix + s for s in suffixes[1:]])
    # 70 shared tokens = 4 full blocks of 16 cached and reused.
    assert all(o.num_cached_tokens == 64 for o in outs)
    kv = llm.engine.kv
    # Counted once per admitted request, in tokens (vllm:prefix_cache_queries / _hits).
    assert kv.prefix_cache_queries == sum(len(prefix) + len(s) for s in suffixes)
    assert kv.prefix_cache_hits == 3 * 64
    assert kv.num_free_blocks == kv.num_blocks


def test_preemption_under_a_tiny_kv_pool(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    # 8 blocks of 16 = 128 tokens for 4 requests that need ~60 each: preemption by recompute must happen.
    llm = LLM(path, num_kv_cache_tokens=128, max_model_len=128)
    prompts = random_prompts(len(tok), [30, 25, 33, 20], seed=5)
    run_and_compare(llm, hf, prompts, max_tokens=30)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_preemption_without_prefix_caching(tiny_model_factory):
    path, hf, tok = tiny_model_factory("qwen2")
    llm = LLM(path, num_kv_cache_tokens=128, max_model_len=128, enable_prefix_caching=False)
    prompts = random_prompts(len(tok), [30, 25, 33, 20], seed=6)
    run_and_compare(llm, hf, prompts, max_tokens=30)
    assert llm.engine.scheduler.num_preemptions > 0


def test_tied_embeddings(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama", tie_word_embeddings=True)
    llm = LLM(path, num_kv_cache_tokens=2048)
    run_and_compare(llm, hf, random_prompts(len(tok), [9, 31], seed=7))


def test_llama3_rope_scaling_past_original_length(tiny_model_factory):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    path, hf, tok = tiny_model_factory("llama", rope_scaling=rope, rope_theta=500000.0)
    llm = LLM(path, num_kv_cache_tokens=4096)
    run_and_compare(llm, hf, random_prompts(len(tok), [150, 90], seed=8), max_tokens=16)


def test_sharded_safetensors(tiny_model_factory, tmp_path):
    from tiny_models import build_model_dir

    hf, tok = build_model_dir(str(tmp_path), "llama", seed=11, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    llm = LLM(str(tmp_path), num_kv_cache_tokens=2048)
    run_and_compare(llm, hf, random_prompts(len(tok), [12, 40], seed=9))


def test_logprobs_close_to_hf(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    llm = LLM(path, num_kv_cache_tokens=2048)
    prompt = random_prompts(len(tok), [21], seed=10)[0]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=5,
                                      prompt_logprobs=3))[0]
    comp = out.outputs[0]
    ref = hf_logprobs(hf, prompt + comp.token_ids)
    for step, (tok_id, lps) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + step]
        assert tok_id in lps and lps[tok_id].rank == 1
        top_ids = torch.topk(row, 5).indices.tolist()
        assert sorted(k for k in lps if lps[k].rank <= 5) == sorted(top_ids)
        for k, lp in lps.items():
            assert lp.logprob == pytest.approx(row[k].item(), abs=1e-4)
    # Prompt logprobs: None for the first token, then logprob of each prompt token given its prefix.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        d = out.prompt_logprobs[pos]
        assert d[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert d[prompt[pos]].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1
