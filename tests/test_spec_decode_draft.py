"""Speculative decoding with a draft model: greedy outputs identical to HF transformers and to the engine
without speculation (draft = the target itself, a noisy copy of it, an unrelated random model), across
mixed batches, prefix-cache hits, preemption and tiny budgets; an end-to-end chi-square test that sampling
keeps the target's distribution with a draft whose distribution differs; the KV pool sized and freed."""

import copy
import os
import random

import pytest
import torch
from test_sampling import _hf_distribution
from test_spec_decode import (
    _chi_square_p_value,
    assert_cache_holds_only_real_tokens,
    assert_pool_free,
    generate,
)
from tiny_models import hf_greedy

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.model_runner import kv_bytes_per_token


def draft_cfg(path: str, k: int = 4) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k}


@pytest.fixture(scope="session")
def models(tiny_model_factory, tmp_path_factory):
    """target (tiny llama), and drafts of its vocabulary: ``self`` (the target's own directory), ``noisy`` (the
    target's weights plus noise: partial acceptance) and ``other`` (an unrelated, smaller random model)."""
    target, hf, tok = tiny_model_factory("llama")
    other, _, _ = tiny_model_factory("llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    noisy = str(tmp_path_factory.mktemp("tiny-llama-noisy"))
    model = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(noisy, safe_serialization=True)
    tok.save_pretrained(noisy)
    return {"target": target, "hf": hf, "tok": tok, "self": target, "noisy": noisy, "other": other}


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def check_acceptance(llm: LLM, draft: str) -> None:
    s = llm.engine.spec_stats
    assert s.num_draft_tokens > 0
    if draft == "self":  # the draft computes exactly the target's argmax: every draft is accepted
        assert s.num_accepted_tokens == s.num_draft_tokens
    elif draft == "noisy":  # some accepted, some rejected: partial acceptance and trimmed blocks exercised
        assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    else:
        assert s.num_accepted_tokens < s.num_draft_tokens


@pytest.mark.parametrize("draft,k", [("self", 3), ("noisy", 4), ("other", 2), ("noisy", 1)])
def test_greedy_identical_to_hf_and_to_no_speculation(models, draft, k):
    prompts = random_prompts(len(models["tok"]), [12, 40, 7, 63, 1, 90, 16], seed=k)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = LLM(models["target"], num_kv_cache_tokens=4096)
    spec = LLM(models["target"], num_kv_cache_tokens=4096, speculative_config=draft_cfg(models[draft], k))
    want = generate(plain, prompts, params)
    got = generate(spec, prompts, params)
    for p, w, g in zip(prompts, want, got, strict=True):
        assert g.token_ids == w.token_ids == hf_greedy(models["hf"], p, 32), f"prompt of {len(p)} tokens"
    check_acceptance(spec, draft)
    assert sum(spec.engine.spec_stats.num_accepted_tokens_per_pos) == spec.engine.spec_stats.num_accepted_tokens
    assert_pool_free(spec)
    assert_cache_holds_only_real_tokens(spec, [p + g.token_ids for p, g in zip(prompts, got, strict=True)])


@pytest.mark.parametrize("draft", ["self", "noisy"])
def test_prefix_cache_hits(models, draft):
    spec = LLM(models["target"], num_kv_cache_tokens=4096, speculative_config=draft_cfg(models[draft], 4))
    plain = LLM(models["target"], num_kv_cache_tokens=4096)
    prefix = random_prompts(len(models["tok"]), [50], seed=11)[0]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    first = generate(spec, [prefix], params)[0]
    assert first.token_ids == generate(plain, [prefix], params)[0].token_ids
    # The second batch hits the first request's cached blocks (prompt and output); its draft recomputes them.
    seqs = [prefix + first.token_ids[:20] + s for s in ([], [7, 8], [9] * 17)]
    want = generate(plain, seqs, params)
    outs = spec.generate([{"prompt_token_ids": p} for p in seqs], params)
    for p, o, w in zip(seqs, outs, want, strict=True):
        assert o.outputs[0].token_ids == w.token_ids == hf_greedy(models["hf"], p, 40)
        assert o.num_cached_tokens >= 64
    check_acceptance(spec, draft)
    assert_pool_free(spec)


@pytest.mark.parametrize("draft,prefix_caching", [("self", True), ("noisy", True), ("noisy", False)])
def test_preemption_under_a_tiny_kv_pool(models, draft, prefix_caching):
    # 8 blocks of 16 for 4 requests needing ~60 tokens each plus draft slots: preemption must happen, and
    # resumed requests' drafts start again from position 0.
    kw = dict(num_kv_cache_tokens=128, max_model_len=128, enable_prefix_caching=prefix_caching)
    spec = LLM(models["target"], speculative_config=draft_cfg(models[draft], 4), **kw)
    prompts = random_prompts(len(models["tok"]), [30, 25, 33, 20], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    got = generate(spec, prompts, params)
    want = generate(LLM(models["target"], **kw), prompts, params)
    for p, g, w in zip(prompts, got, want, strict=True):
        assert g.token_ids == w.token_ids == hf_greedy(models["hf"], p, 30)
    assert spec.engine.scheduler.num_preemptions > 0
    check_acceptance(spec, draft)
    assert_pool_free(spec)


def test_small_token_budget_stops_and_max_tokens(models):
    """Chunked prefill sharing an 8-token budget with drafts (trimmed to fit); stop ids, min_tokens and
    max_tokens landing inside a run of accepted drafts."""
    kw = dict(num_kv_cache_tokens=4096, max_num_batched_tokens=8, max_num_seqs=8)
    spec = LLM(models["target"], speculative_config=draft_cfg(models["self"], 6), **kw)
    plain = LLM(models["target"], **kw)
    prompts = random_prompts(len(models["tok"]), [19, 40, 5], seed=8)
    free = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = generate(plain, prompts, free)
    cases = []
    for p, f in zip(prompts, full, strict=True):
        # A tiny random model repeats itself: stop on its 5th token, wherever that first appears.
        stop = f.token_ids[4]
        cases.append((p, SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop], ignore_eos=True)))
        cases.append((p, SamplingParams(temperature=0.0, max_tokens=len(p) % 7 + 3, ignore_eos=True)))
        cases.append((p, SamplingParams(temperature=0.0, max_tokens=30, min_tokens=8, stop_token_ids=[stop],
                                        ignore_eos=True)))
    ps, params = [c[0] for c in cases], [c[1] for c in cases]
    want = generate(plain, ps, params)
    got = generate(spec, ps, params)
    for p, sp, w, g in zip(ps, params, want, got, strict=True):
        assert (g.token_ids, g.finish_reason, g.stop_reason) == (w.token_ids, w.finish_reason, w.stop_reason)
        if sp.min_tokens == 0:  # (min_tokens masks the stop id: HF's plain greedy is not the reference then)
            assert g.token_ids == hf_greedy(models["hf"], p, 30)[:len(g.token_ids)]
    assert any(g.finish_reason == "stop" for g in got) and any(g.finish_reason == "length" for g in got)
    check_acceptance(spec, "self")
    assert_pool_free(spec)


# ----------------------------------------------------------------------------- sampling distribution
def _hf_joint(hf, prompt, num_tokens, temperature, top_k) -> dict[tuple[int, ...], float]:
    """The target's distribution over its first ``num_tokens`` sampled tokens, from HF logits and warpers."""
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(num_tokens):
        nxt = {}
        for seq, pr in joint.items():
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + list(seq)])).logits[0, -1].float()
            dist = _hf_distribution(logits, temperature, top_k, 1.0, 0.0)
            for t in torch.nonzero(dist).flatten().tolist():
                nxt[seq + (t,)] = pr * float(dist[t])
        joint = nxt
    return joint


@pytest.mark.parametrize("draft,temperature,top_k", [("noisy", 1.0, 3), ("noisy", 0.7, 3), ("self", 1.0, 3)])
def test_sampling_keeps_the_target_distribution(models, draft, temperature, top_k):
    """The first token comes from the plain sampler; tokens 2 to 4 from verifications of up to two drafts
    (accept, residual and bonus paths, both draft positions). The joint distribution of the 4 tokens must be
    the target's: with the noisy copy (q close to, but not, the target's p) and with the target itself (q = p).

    Checked by breaking it: a residual that ignores q (p without the draft) fails the chi-square; verification
    that ignores q altogether (drafts as point masses) is still exact, so it passes the chi-square, and the
    q = p acceptance check is what catches it."""
    n = 2400
    prompt = random_prompts(len(models["tok"]), [9], seed=21)[0]
    spec = LLM(models["target"], num_kv_cache_tokens=8192, seed=3,
               speculative_config=draft_cfg(models[draft], 2))
    params = SamplingParams(temperature=temperature, top_k=top_k, max_tokens=4, ignore_eos=True)
    got = generate(spec, [prompt] * n, params)
    joint = _hf_joint(models["hf"], prompt, 4, temperature, top_k)
    cells = sorted(joint)
    index = {c: j for j, c in enumerate(cells)}
    counts = torch.zeros(len(cells), dtype=torch.float64)
    for g in got:
        key = tuple(g.token_ids)
        assert key in index, f"{key}: a sequence the target cannot produce"
        counts[index[key]] += 1
    expected = torch.tensor([joint[c] for c in cells], dtype=torch.float64)
    assert _chi_square_p_value(counts, expected / expected.sum()) > 1e-3
    s = spec.engine.spec_stats
    assert s.num_drafts >= n
    if draft == "self":
        # q = p: min(1, p/q) = 1, every draft is kept. Verification that ignored q (treating drafts as point
        # masses, accepted with probability p(d)) would still be exact but keep only sum(p^2) of them.
        assert s.num_accepted_tokens >= 0.99 * s.num_draft_tokens
    else:
        assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    assert_pool_free(spec)


# ----------------------------------------------------------------------------- memory and configuration
def test_draft_kv_shares_the_pool_and_is_sized_with_it(models):
    spec = LLM(models["target"], max_model_len=256, speculative_config=draft_cfg(models["other"], 2))
    eng = spec.engine
    draft_cfg_hf = eng.runner.drafter.config
    per_tok = kv_bytes_per_token(eng.source.config, eng.dtype, eng.runner.tp) + \
        kv_bytes_per_token(draft_cfg_hf, eng.dtype, eng.runner.tp)
    # CPU default: 1 GiB of KV for both models together.
    assert eng.kv.num_blocks == (1 << 30) // (per_tok * 16)
    for attn in eng.runner.drafter.model.layers_attention():
        assert attn.k_cache.shape[0] == attn.v_cache.shape[0] == eng.kv.num_blocks
    explicit = LLM(models["target"], num_kv_cache_tokens=200, speculative_config=draft_cfg(models["self"], 2))
    assert explicit.engine.kv.num_blocks == 13  # token slots, each holding both models' KV


def test_bad_draft_models_are_refused(models, tmp_path):
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    wide = str(tmp_path / "wide")
    AutoModelForCausalLM.from_config(make_config("llama", 500)).save_pretrained(wide, safe_serialization=True)
    models["tok"].save_pretrained(wide)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(models["target"], num_kv_cache_tokens=256, speculative_config=draft_cfg(wide, 2))
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        LLM(models["target"], num_kv_cache_tokens=256, tensor_parallel_size=2,
            speculative_config=draft_cfg(models["self"], 2))
    with pytest.raises(FileNotFoundError):
        LLM(models["target"], num_kv_cache_tokens=256,
            speculative_config=draft_cfg(os.path.join(models["target"], "missing"), 2))


def test_cli_speculative_config_reaches_a_draft_model(models):
    import json

    from pagedserve.runtime import cli

    spec = json.dumps(draft_cfg(models["noisy"], 3))
    args = cli.build_parser().parse_args(
        ["serve", models["target"], "--num-kv-cache-tokens", "512", "--speculative-config", spec]
    )
    cfg = cli.server_config_from_args(args)
    llm = LLM(cfg.model, **cfg.engine_kwargs)
    assert llm.engine.runner.drafter is not None and llm.engine.proposer.k == 3
    got = generate(llm, [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert got.token_ids == hf_greedy(models["hf"], [5, 6, 7], 8)

