"""The CUDA-graph input path on CPU: DecodeGraphs with q-token graphs (speculative verification, a draft's
catch-up), where each request is padded to the graph's query length in static buffers. A stand-in replays
a 'graph' by running the model eagerly on exactly those static buffers, so everything but the capture is
exercised: padding tokens that must write no KV and must stay invisible to the real queries, padding rows of
a bucket, positions and slots. Greedy outputs must equal HF transformers' and the engine without graphs."""

import random

import pytest
from tiny_models import build_model_dir, hf_greedy

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.cuda_graphs import DecodeGraphs


class EagerGraphs(DecodeGraphs):
    """Replays by running the model on the static buffers a captured graph would read."""

    def capture(self) -> None:
        self.graphs = {(bs, q): None for q in self.query_lens for bs in self.sizes}
        self.replays: list[tuple[int, int]] = []

    def _replay(self, bs: int, q: int):
        self.replays.append((bs, q))
        n = bs * q
        return self.model(self.ids[:n], self.positions[:n], self._meta(bs, q))


def install(llm: LLM, query_lens) -> list[EagerGraphs]:
    r = llm.engine.runner
    max_len = r.scheduler_config.max_model_len
    out = []
    for owner in [r] + ([r.drafter] if r.drafter is not None else []):
        g = EagerGraphs(owner.model, r.max_rows, r.max_blocks_per_seq, max_len, r.device, query_lens)
        g.capture()
        owner.graphs = g
        out.append(g)
    return out


def prompts(vocab, lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("gp-target"))
    hf, tok = build_model_dir(target, "llama", seed=0)
    return target, hf, len(tok)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_padded_verification_graphs_identical_to_hf(models, method):
    target, hf, vocab = models
    k = 3
    spec = {"method": method, "num_speculative_tokens": k}
    if method == "draft_model":
        spec["model"] = target  # the target as its own draft: all accepted, so catch-ups are k + 1 tokens
    llm = LLM(target, num_kv_cache_tokens=4096, max_num_seqs=20, speculative_config=spec)
    graphs = install(llm, (1, k + 1))
    # Repetitive prompts give n-gram drafts; lengths 1..3 fit a (k + 1)-token graph whole (a padded prefill).
    ps = [p * 3 for p in prompts(vocab, [5, 9, 12], seed=1)] + prompts(vocab, [1, 2, 3, 17], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params)
    for p, o in zip(ps, outs, strict=True):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 20), f"prompt of {len(p)} tokens"
    replays = graphs[0].replays
    # Verification steps (and, with fewer tokens than k + 1 in some requests, padded ones) ran as graphs;
    # with n-gram drafts, steps where nothing matched ran the one-token graphs.
    assert any(q == k + 1 for _, q in replays)
    if method == "ngram":
        assert any(q == 1 for _, q in replays)
    if method == "draft_model":
        assert any(q == k + 1 for _, q in graphs[1].replays)  # the draft's catch-up
        assert any(q == 1 for _, q in graphs[1].replays)  # its one-token steps
    s = llm.engine.spec_stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_bucket_padding_rows_and_long_prefill_fallback(models):
    target, hf, vocab = models
    llm = LLM(target, num_kv_cache_tokens=4096, max_num_seqs=20)
    graphs = install(llm, (1, 4))
    # 5 requests: bucket 8 (3 padding rows); prompts longer than 4 take the eager path for their prefill.
    ps = prompts(vocab, [3, 4, 7, 30, 2], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params)
    for p, o in zip(ps, outs, strict=True):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
    assert (8, 1) in graphs[0].replays
