"""Sampling: seeded reproducibility, n > 1 sharing prompt blocks, the sampler's distributions against
HF transformers' logits processors, penalties, stops, min/max tokens, logit bias."""

import random

import pytest
import torch

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.sampler import Sampler, SamplingRow


def prompts_for(tok, lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, len(tok)) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def llm_and_tok(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    return LLM(path, num_kv_cache_tokens=8192, seed=0), tok


def test_seeded_sampling_is_independent_of_batch_composition(llm_and_tok):
    llm, tok = llm_and_tok
    target = {"prompt_token_ids": prompts_for(tok, [13], 1)[0]}
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    alone = llm.generate(target, seeded)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in prompts_for(tok, [5, 40, 22], 2)]
    mixed = llm.generate(others[:2] + [target] + others[2:], [other, other, seeded, other])
    assert mixed[2].outputs[0].token_ids == alone
    again = llm.generate([target] + others, [seeded, other, other, other])
    assert again[0].outputs[0].token_ids == alone
    # A different seed gives a different sample (and unseeded requests are not all identical).
    assert llm.generate(target, seeded.clone(seed=99))[0].outputs[0].token_ids != alone


def test_n4_returns_different_samples_sharing_prompt_blocks(llm_and_tok):
    llm, tok = llm_and_tok
    prompt = prompts_for(tok, [40], 3)[0]  # 2 full blocks of 16 + 8 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    engine, processor = llm.engine, llm.processor
    child_ids = processor.add_request("n4", None, prompt, params)
    for i, cid in enumerate(child_ids):
        engine.add_request(engine.make_request(cid, prompt, llm._child_params(params, i)))
    engine.step()
    kv = engine.kv
    tables = [kv.req_to_blocks[c] for c in child_ids]
    shared = tables[0][:2]
    assert all(t[:2] == shared for t in tables)
    assert [b.ref_cnt for b in shared] == [4, 4]
    last_blocks = {t[2].block_id for t in tables}  # the partial third block is private to each child
    assert len(last_blocks) == 4 and all(t[2].ref_cnt == 1 for t in tables)
    final = None
    while engine.has_unfinished():
        outs, _ = processor.process(engine.step())
        final = [o for o in outs if o.finished] or final
    samples = [tuple(o.token_ids) for o in final[0].outputs]
    assert len(samples) == 4 and len(set(samples)) == 4
    assert kv.num_free_blocks == kv.num_blocks


def _hf_distribution(logits, temperature, top_k, top_p, min_p):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.clone().unsqueeze(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return torch.softmax(scores[0], dim=-1)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.15), (0.9, 5, 0.9, 0.05)],
)
def test_sampler_matches_hf_warpers_distribution(temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    vocab, draws = 8, 20000
    logits = torch.randn(vocab) * 1.5
    expected = _hf_distribution(logits, temperature, top_k, top_p, min_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = [SamplingRow(params, None, [], [], [])] * draws
    sampler = Sampler(vocab, torch.device("cpu"), seed=1)
    tokens = torch.tensor(sampler(logits.repeat(draws, 1), rows).token_ids)
    counts = torch.bincount(tokens, minlength=vocab).double()
    # Tokens HF removes must never appear; the others by a chi-square test (8 cells, p ~ 0.001 => 24.3).
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    exp_counts = expected[keep].double() * draws
    chi2 = ((counts[keep] - exp_counts) ** 2 / exp_counts).sum().item()
    assert chi2 < 24.3, (counts, exp_counts)


def test_penalties_match_hf_and_openai_definitions():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    vocab = 50
    logits = torch.randn(vocab) * 3
    prompt, output = [1, 2, 3, 3], [7, 7, 9, 2]
    sampler = Sampler(vocab, torch.device("cpu"))
    p = SamplingParams(repetition_penalty=1.3)
    got = sampler._apply_logit_processors(logits.unsqueeze(0), [SamplingRow(p, None, prompt, output, [])])[0]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone().unsqueeze(0))[0]
    torch.testing.assert_close(got, ref)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = sampler._apply_logit_processors(logits.unsqueeze(0), [SamplingRow(p, None, prompt, output, [])])[0]
    ref = logits.clone()
    for t in set(output):
        ref[t] -= 0.5 * output.count(t) + 0.25
    torch.testing.assert_close(got, ref)


def greedy(llm, prompt, **kw):
    params = SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": 24, **kw})
    return llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]


def test_stop_strings_are_cut_from_the_text(llm_and_tok):
    llm, tok = llm_and_tok
    prompt = tok("The capital of France")["input_ids"]
    full = greedy(llm, prompt)
    text = full.text
    # A stop string from the middle of the greedy text (3 printable chars).
    idx = next(i for i in range(4, len(text) - 3) if text[i:i + 3].isprintable() and "\ufffd" not in text[i:i + 3])
    stop = text[idx:idx + 3]
    cut = greedy(llm, prompt, stop=[stop])
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = greedy(llm, prompt, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == text[: text.find(stop) + 3]


def test_stop_token_ids_min_tokens_max_tokens_and_logit_bias(llm_and_tok):
    llm, tok = llm_and_tok
    prompt = prompts_for(tok, [10], 5)[0]
    full = greedy(llm, prompt)
    stop_tok = full.token_ids[4]
    first = full.token_ids.index(stop_tok)
    stopped = greedy(llm, prompt, stop_token_ids=[stop_tok])
    assert stopped.token_ids == full.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_tok
    # min_tokens suppresses the stop token until 8 tokens exist.
    held = greedy(llm, prompt, stop_token_ids=[stop_tok], min_tokens=8)
    assert stop_tok not in held.token_ids[:8] and len(held.token_ids) >= 8
    short = greedy(llm, prompt, max_tokens=3)
    assert short.token_ids == full.token_ids[:3] and short.finish_reason == "length"
    biased = greedy(llm, prompt, max_tokens=5, logit_bias={42: 100.0})
    assert biased.token_ids == [42] * 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_ids_from_the_logits_own_dtype_equal_the_fp32_copy(dtype):
    """All-greedy rows without logit processing take argmax on the logits as they come (no fp32 copy): the same
    ids as the fp32 copy's argmax, with ties (first wins), -0.0 against 0.0, infinities and NaN."""
    vocab = 300
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, vocab, generator=gen).to(dtype)
    logits[0, [10, 200]] = 9.0  # a tie
    logits[1, :] = 0.0
    logits[1, 7] = -0.0
    logits[2, 50] = float("inf")
    logits[3, 60] = float("nan")
    logits[4, :] = float("-inf")
    rows = [SamplingRow(SamplingParams(temperature=0.0), None, [], [], [])] * 6
    got = Sampler(vocab, torch.device("cpu")).sample_ids(logits, rows)
    assert got.tolist() == logits.float().argmax(dim=-1).tolist()
    assert got.tolist()[:5] == [10, 0, 50, 60, 0]
