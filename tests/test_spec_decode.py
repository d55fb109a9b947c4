"""Speculative decoding (n-gram proposer): lossless greedy outputs against HF transformers and against the
engine without speculation, the KV pool and prefix cache after rejected drafts, and a statistical test that
rejection sampling keeps the target distribution."""

import random

import pytest
import torch
from test_sampling import _hf_distribution
from tiny_models import hf_greedy

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.rejection_sampler import verify_drafts
from pagedserve.runtime.sampler import Sampler, SamplingRow
from pagedserve.runtime.spec_decode import NgramProposer, SpeculativeConfig


def ngram(k=4, lo=1, hi=4):
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}


def repetitive_prompts(vocab: int, specs: list[tuple[int, int]], seed: int) -> list[list[int]]:
    """(period, length): a random motif repeated, with a random token swapped in now and then, so the
    proposer finds matches that are sometimes wrong."""
    rng = random.Random(seed)
    out = []
    for period, length in specs:
        motif = [rng.randrange(3, vocab) for _ in range(period)]
        p = [motif[i % period] for i in range(length)]
        for _ in range(length // 10):
            p[rng.randrange(length)] = rng.randrange(3, vocab)
        out.append(p)
    return out


def assert_pool_free(llm: LLM) -> None:
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert not kv.req_to_blocks
    assert all(b.ref_cnt == 0 for b in kv.blocks)


def assert_cache_holds_only_real_tokens(llm: LLM, sequences: list[list[int]]) -> None:
    """Rebuild every cached block's full prefix from its chain of parents: each must be a prefix of a
    sequence the engine really produced (a cached rejected draft would not be)."""
    kv = llm.engine.kv
    by_id = {b.cache_id: b for b in kv.cached.values()}
    for block in kv.cached.values():
        prefix: list[int] = []
        b = block
        while True:
            parent, toks = b.cache_key
            prefix[:0] = toks
            if parent == 0:
                break
            b = by_id[parent]
        assert any(s[:len(prefix)] == prefix for s in sequences), "a cached block holds unverified tokens"


def generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_identical_to_hf_and_to_no_speculation(tiny_model_factory, k):
    path, hf, tok = tiny_model_factory("llama")
    prompts = repetitive_prompts(len(tok), [(3, 12), (5, 40), (7, 7), (4, 63), (2, 1), (9, 90)], seed=k)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = LLM(path, num_kv_cache_tokens=4096)
    spec = LLM(path, num_kv_cache_tokens=4096, speculative_config=ngram(k=k))
    want = generate(plain, prompts, params)
    got = generate(spec, prompts, params)
    for p, w, g in zip(prompts, want, got, strict=True):
        assert g.token_ids == w.token_ids == hf_greedy(hf, p, 32), f"prompt of {len(p)} tokens"
        assert g.finish_reason == "length"
    stats = spec.engine.spec_stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # some drafts were wrong and rejected
    assert sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens
    assert stats.mean_acceptance_length > 1.0
    assert_pool_free(spec)
    assert_cache_holds_only_real_tokens(spec, [p + g.token_ids for p, g in zip(prompts, got, strict=True)])


def test_prefix_cache_hits_with_speculation(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    spec = LLM(path, num_kv_cache_tokens=4096, speculative_config=ngram(k=5))
    plain = LLM(path, num_kv_cache_tokens=4096)
    prefix = repetitive_prompts(len(tok), [(6, 50)], seed=11)[0]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    # The first request's generated blocks (drafts verified or not) are cached; the second batch reuses
    # its prompt and part of its output as a prefix.
    first = generate(spec, [prefix], params)[0]
    assert first.token_ids == generate(plain, [prefix], params)[0].token_ids
    seqs = [prefix + first.token_ids[:20] + s for s in ([], [7, 8], [9] * 17)]
    want = generate(plain, seqs, params)
    outs = spec.generate([{"prompt_token_ids": p} for p in seqs], params)
    for p, o, w in zip(seqs, outs, want, strict=True):
        assert o.outputs[0].token_ids == w.token_ids == hf_greedy(hf, p, 40)
        assert o.num_cached_tokens >= 64  # 4 of the 16-token blocks came from the first request
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_pool_free(spec)
    assert_cache_holds_only_real_tokens(
        spec, [prefix + first.token_ids] + [p + o.outputs[0].token_ids for p, o in zip(seqs, outs, strict=True)]
    )


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_tiny_kv_pool(tiny_model_factory, prefix_caching):
    path, hf, tok = tiny_model_factory("llama")
    # 8 blocks of 16 for 4 requests needing ~60 tokens each (plus draft slots): preemption must happen.
    kw = dict(num_kv_cache_tokens=128, max_model_len=128, enable_prefix_caching=prefix_caching)
    spec = LLM(path, speculative_config=ngram(k=4), **kw)
    prompts = repetitive_prompts(len(tok), [(4, 30), (3, 25), (5, 33), (2, 20)], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    got = generate(spec, prompts, params)
    want = generate(LLM(path, **kw), prompts, params)
    for p, g, w in zip(prompts, got, want, strict=True):
        assert g.token_ids == w.token_ids == hf_greedy(hf, p, 30)
    assert spec.engine.scheduler.num_preemptions > 0
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_pool_free(spec)


def test_small_token_budget_chunked_prefill_and_drafts_share_it(tiny_model_factory):
    path, hf, tok = tiny_model_factory("qwen3")
    kw = dict(num_kv_cache_tokens=4096, max_num_batched_tokens=8, max_num_seqs=8)
    spec = LLM(path, speculative_config=ngram(k=6), **kw)
    prompts = repetitive_prompts(len(tok), [(3, 19), (4, 40), (2, 5)], seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    got = generate(spec, prompts, params)
    for p, g in zip(prompts, got, strict=True):
        assert g.token_ids == hf_greedy(hf, p, 20)
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_pool_free(spec)


def test_stops_apply_to_accepted_tokens_in_order(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    prompts = repetitive_prompts(len(tok), [(3, 30), (4, 41), (5, 26), (2, 50)], seed=3)
    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM(path, num_kv_cache_tokens=4096)
    spec = LLM(path, num_kv_cache_tokens=4096, speculative_config=ngram(k=5))
    full = generate(plain, prompts, free)
    cases = []
    for p, f in zip(prompts, full, strict=True):
        # Stop on a token first seen after a few outputs; max_tokens cuts another run mid-draft.
        stop = next(t for t in f.token_ids[5:] if t not in f.token_ids[:5])
        cases.append((p, SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop], ignore_eos=True)))
        cases.append((p, SamplingParams(temperature=0.0, max_tokens=len(p) % 7 + 3, ignore_eos=True)))
        cases.append((p, SamplingParams(temperature=0.0, max_tokens=40, min_tokens=8, stop_token_ids=[stop],
                                        ignore_eos=True)))
    ps, params = [c[0] for c in cases], [c[1] for c in cases]
    want = generate(plain, ps, params)
    got = generate(spec, ps, params)
    for w, g in zip(want, got, strict=True):
        assert (g.token_ids, g.finish_reason, g.stop_reason) == (w.token_ids, w.finish_reason, w.stop_reason)
    assert any(g.finish_reason == "stop" for g in got) and any(g.finish_reason == "length" for g in got)
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_pool_free(spec)


def test_max_model_len_and_logprobs_with_drafts(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    kw = dict(num_kv_cache_tokens=4096, max_model_len=64)
    prompts = repetitive_prompts(len(tok), [(3, 50), (2, 57)], seed=4)
    params = SamplingParams(temperature=0.0, logprobs=3, ignore_eos=True)  # runs to max_model_len
    plain = LLM(path, **kw).generate([{"prompt_token_ids": p} for p in prompts], params)
    spec_llm = LLM(path, speculative_config=ngram(k=8), **kw)
    spec = spec_llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, w, g in zip(prompts, plain, spec, strict=True):
        wo, go = w.outputs[0], g.outputs[0]
        assert go.token_ids == wo.token_ids and len(p) + len(go.token_ids) == 64
        assert len(go.logprobs) == len(go.token_ids)
        for a, b in zip(wo.logprobs, go.logprobs, strict=True):
            assert a.keys() == b.keys()
            for t in a:
                assert b[t].logprob == pytest.approx(a[t].logprob, abs=1e-4) and b[t].rank == a[t].rank
    assert spec_llm.engine.spec_stats.num_accepted_tokens > 0
    assert_pool_free(spec_llm)


def test_seeded_sampling_with_speculation_is_reproducible(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    llm = LLM(path, num_kv_cache_tokens=4096, speculative_config=ngram(k=4))
    target, *others = repetitive_prompts(len(tok), [(3, 30), (4, 20), (5, 44)], seed=9)
    seeded = SamplingParams(temperature=0.3, seed=77, max_tokens=30, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    alone = generate(llm, [target], seeded)[0].token_ids
    mixed = generate(llm, [others[0], target, others[1]], [other, seeded, other])[1].token_ids
    assert mixed == alone
    assert generate(llm, [target], seeded.clone(seed=78))[0].token_ids != alone
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert_pool_free(llm)


def test_tensor_parallel_2_with_speculation(tiny_model_factory):
    """Drafts and the blocks rejected drafts gave back travel inside the SchedulerOutput: workers follow."""
    path, hf, tok = tiny_model_factory("llama")
    prompts = repetitive_prompts(len(tok), [(3, 20), (5, 41), (4, 9)], seed=12)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(path, num_kv_cache_tokens=2048, tensor_parallel_size=2, speculative_config=ngram(k=4))
    try:
        assert llm.engine.runner.spec.spec_query_len == 5  # on CUDA every rank captures k + 1-token graphs
        got = generate(llm, prompts, params)
        for p, g in zip(prompts, got, strict=True):
            assert g.token_ids == hf_greedy(hf, p, 24)
        assert llm.engine.spec_stats.num_accepted_tokens > 0
        assert llm.engine.spec_stats.num_accepted_tokens < llm.engine.spec_stats.num_draft_tokens
        assert_pool_free(llm)
    finally:
        llm.engine.shutdown()


def test_counters_reach_prometheus_under_vllm_names(tiny_model_factory):
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from pagedserve.runtime.async_engine import EngineStats
    from pagedserve.runtime.metrics import ServerMetrics

    path, hf, tok = tiny_model_factory("llama")
    llm = LLM(path, num_kv_cache_tokens=2048, speculative_config=ngram(k=3))
    generate(llm, repetitive_prompts(len(tok), [(3, 20), (4, 30)], seed=2),
             SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    sd = llm.engine.spec_stats
    metrics = ServerMetrics("tiny")
    fake = SimpleNamespace(stats=EngineStats(spec_decode=sd.as_dict()), heartbeat_age=lambda: 0.0,
                           liveness=lambda: (True, ""))
    metrics.bind(fake, dict, {"block_size": 16})
    got = {(s.name, s.labels.get("position")): s.value
           for fam in text_string_to_metric_families(metrics.render().decode()) for s in fam.samples}
    assert got[("vllm:spec_decode_num_drafts_total", None)] == sd.num_drafts > 0
    assert got[("vllm:spec_decode_num_draft_tokens_total", None)] == sd.num_draft_tokens
    assert got[("vllm:spec_decode_num_accepted_tokens_total", None)] == sd.num_accepted_tokens > 0
    for pos in range(3):
        assert got[("vllm:spec_decode_num_accepted_tokens_per_pos_total", str(pos))] == \
            sd.num_accepted_tokens_per_pos[pos]
    assert sd.num_accepted_tokens_per_pos[0] >= sd.num_accepted_tokens_per_pos[1] >= sd.num_accepted_tokens_per_pos[2]


# ----------------------------------------------------------------------------- rejection sampling statistics
def _chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's test, cells with tiny expectation pooled; survival function via the regularised gamma."""
    assert counts[expected_probs == 0].sum() == 0, "a token the target excludes was produced"
    n = counts.sum()
    exp = expected_probs * n
    keep = exp >= 5
    c = torch.cat([counts[keep], counts[~keep].sum().unsqueeze(0)])
    e = torch.cat([exp[keep], exp[~keep].sum().unsqueeze(0)])
    if e[-1] < 5:  # fold the pooled remainder into the last kept cell
        c = torch.cat([c[:-2], (c[-2] + c[-1]).unsqueeze(0)])
        e = torch.cat([e[:-2], (e[-2] + e[-1]).unsqueeze(0)])
    stat = ((c - e) ** 2 / e).sum()
    df = len(c) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 5, 0.9, 0.0), (1.2, 0, 1.0, 0.1)])
def test_rejection_sampling_keeps_the_target_distribution(temperature, top_k, top_p, min_p):
    """Three positions over a 7-token vocabulary, drafts (2, 2): the first token must follow p0; given it
    was the draft 2, the second must follow p1; given both drafts were kept, the third follows p2."""
    vocab, n = 7, 12000
    gen = torch.Generator().manual_seed(0)
    logits3 = torch.randn(3, vocab, generator=gen) * 1.5
    logits3[:2, 2] += 2.0  # make the drafts likely enough to be accepted often
    sampler = Sampler(vocab, torch.device("cpu"), seed=1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = [SamplingRow(params, None, [1], [], []) for _ in range(n)]
    drafts = [[2, 2]] * n
    out = verify_drafts(sampler, logits3.repeat(n, 1), rows, drafts, [()] * n)
    # The reference: HF transformers' warpers on each position's logits.
    target = torch.stack([_hf_distribution(lg, temperature, top_k, top_p, min_p) for lg in logits3])

    first = torch.tensor([t[0][0] for t in out])
    assert _chi_square_p_value(torch.bincount(first, minlength=vocab).double(), target[0].double()) > 1e-3
    second = torch.tensor([t[0][1] for t in out if t[0][0] == 2])
    assert len(second) > 1000
    assert _chi_square_p_value(torch.bincount(second, minlength=vocab).double(), target[1].double()) > 1e-3
    third = torch.tensor([t[0][2] for t in out if t[0][:2] == [2, 2]])
    assert len(third) > 300
    assert _chi_square_p_value(torch.bincount(third, minlength=vocab).double(), target[2].double()) > 1e-3
    # The check has power: always emitting the draft (no rejection at all) fails it.
    biased = torch.bincount(torch.full((n,), 2), minlength=vocab).double()
    assert _chi_square_p_value(biased, target[0].double()) < 1e-6


def test_rejection_sampling_with_a_draft_distribution():
    """A sampling draft model: drafts drawn from q, verified against p; the output must follow p."""
    vocab, n = 6, 12000
    gen = torch.Generator().manual_seed(3)
    p_logits = torch.randn(2, vocab, generator=gen)
    q = torch.softmax(torch.randn(1, vocab, generator=gen), dim=-1)
    drafts = torch.multinomial(q.expand(n, vocab), 1, generator=gen).squeeze(1).tolist()
    sampler = Sampler(vocab, torch.device("cpu"), seed=2)
    params = SamplingParams(temperature=1.0)
    rows = [SamplingRow(params, None, [1], [], []) for _ in range(n)]
    out = verify_drafts(sampler, p_logits.repeat(n, 1), rows, [[d] for d in drafts], [()] * n, [q] * n)
    first = torch.tensor([t[0][0] for t in out])
    p0 = torch.softmax(p_logits[0], dim=-1).double()
    assert _chi_square_p_value(torch.bincount(first, minlength=vocab).double(), p0) > 1e-3


def test_greedy_verification_is_longest_matching_prefix_plus_target_token():
    vocab = 10
    logits = torch.full((4, vocab), -5.0)
    for pos, tok in enumerate([4, 7, 1, 3]):
        logits[pos, tok] = 5.0
    sampler = Sampler(vocab, torch.device("cpu"))
    row = SamplingRow(SamplingParams(temperature=0.0), None, [1], [], [])
    cases = {(4, 7, 1): [4, 7, 1, 3], (4, 7, 2): [4, 7, 1], (5, 7, 1): [4], (4, 0, 1): [4, 7]}
    for d, want in cases.items():
        assert verify_drafts(sampler, logits, [row], [list(d)], [()])[0][0] == want


# ----------------------------------------------------------------------------- proposer and config
def _naive_ngram(tokens, k, lo, hi):
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == suffix]
        full = [s for s in starts if s + n + k <= len(tokens)]
        if full or starts:
            s = max(full) if full else max(starts)
            return tokens[s + n:s + n + k]
    return []


def test_ngram_proposer_matches_a_naive_search():
    rng = random.Random(0)
    for _ in range(400):
        vocab = rng.choice([2, 3, 5, 300, 70000])  # large ids exercise the 4-byte packing
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        k, lo = rng.randrange(1, 6), rng.randrange(1, 4)
        hi = lo + rng.randrange(0, 4)
        got = NgramProposer(k, lo, hi).propose(tokens)
        assert got == _naive_ngram(tokens, k, lo, hi), (tokens, k, lo, hi)
    assert NgramProposer(3, 2, 3).propose([1, 2, 3, 1, 2]) == [3, 1, 2]
    assert NgramProposer(3, 2, 3).propose([1, 2, 3, 4]) == []


@pytest.mark.parametrize("bad, msg", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 4}, "unknown key"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
])
def test_bad_speculative_configs_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SpeculativeConfig.from_dict(bad)
