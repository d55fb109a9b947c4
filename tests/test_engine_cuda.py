"""The engine on CUDA (runs where a GPU is present; CI's CPU parity tests cover the same logic on CPU):
fp32 greedy tokens equal HF's, and decode through CUDA graphs equals eager decode."""

import random

import pytest
import torch
from tiny_models import hf_greedy

from pagedserve.runtime import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def prompts(vocab, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_fp32_greedy_matches_hf(tiny_model_factory, arch):
    torch.backends.cuda.matmul.allow_tf32 = False
    path, hf, tok = tiny_model_factory(arch)
    llm = LLM(path, device="cuda", dtype="float32", num_kv_cache_tokens=8192, max_model_len=256)
    ps = prompts(len(tok), [1, 9, 17, 40, 64], seed=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for p, o in zip(ps, outs, strict=True):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 24)


@pytest.mark.parametrize("knobs", [("FUSED_ROTARY",), ("FUSED_SILU",), ("FUSED_ROTARY", "FUSED_SILU", "ARGMAX")])
def test_cuda_fused_batch1_paths_match_hf(tiny_model_factory, monkeypatch, knobs):
    """The experiment knobs on the GPU, one prompt at a time so decode runs the batch-1 CUDA graph: the GEMV's
    rotary + KV-write epilogue and SiLU epilogue (counted, so a path not taken fails) and the Triton argmax;
    fp32 greedy tokens equal HF's."""
    from pagedserve import kernels
    from pagedserve.kernels import triton_gemv

    torch.backends.cuda.matmul.allow_tf32 = False
    for knob in knobs:
        if knob == "ARGMAX":
            monkeypatch.setattr(kernels, "_ARGMAX", "triton")
        else:
            monkeypatch.setattr(kernels, knob, True)  # read when the model is built
    calls = {"rotary": 0, "silu": 0}
    real_rotary, real_gemv = triton_gemv.gemv_qkv_rotary, triton_gemv.gemv

    def counted_rotary(*a, **kw):
        calls["rotary"] += 1
        return real_rotary(*a, **kw)

    def counted_gemv(*a, **kw):
        calls["silu"] += bool(kw.get("silu"))
        return real_gemv(*a, **kw)

    monkeypatch.setattr(triton_gemv, "gemv_qkv_rotary", counted_rotary)
    monkeypatch.setattr(triton_gemv, "gemv", counted_gemv)
    path, hf, tok = tiny_model_factory("llama")
    llm = LLM(path, device="cuda", dtype="float32", num_kv_cache_tokens=8192, max_model_len=256)
    for p in prompts(len(tok), [1, 9, 40], seed=4):
        out = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        assert out[0].outputs[0].token_ids == hf_greedy(hf, p, 16), f"prompt of {len(p)} tokens"
    assert calls["rotary"] > 0 if "FUSED_ROTARY" in knobs else calls["rotary"] == 0
    assert calls["silu"] > 0 if "FUSED_SILU" in knobs else calls["silu"] == 0


def test_cuda_graph_decode_equals_eager(tiny_model_factory):
    path, _, tok = tiny_model_factory("llama")
    ps = prompts(len(tok), [3, 20, 33, 7, 50, 12], seed=2)
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    kw = dict(device="cuda", dtype="bfloat16", num_kv_cache_tokens=8192, max_model_len=256, max_num_seqs=16)
    eager = LLM(path, enforce_eager=True, **kw).generate([{"prompt_token_ids": p} for p in ps], sp)
    graphed = LLM(path, **kw)
    assert graphed.engine.runner.graphs is not None
    out = graphed.generate([{"prompt_token_ids": p} for p in ps], sp)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in eager]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_tp2_speculation_through_graphs_matches_hf(tiny_model_factory):
    """TP=2 on two GPUs, fp32, ngram speculation: verification steps replay the k + 1-token graphs every rank
    captured (with the peer all-reduce and the all-reduce fused into the norm inside them); greedy tokens
    equal HF's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path, hf, tok = tiny_model_factory("llama")
    ps = [p * 3 for p in prompts(len(tok), [5, 7, 9], seed=3)]  # repetitive: prompt lookup finds drafts
    llm = LLM(path, device="cuda", dtype="float32", num_kv_cache_tokens=8192, max_model_len=256,
              tensor_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    try:
        assert llm.engine.runner.runner.graphs.query_lens == (1, 4)
        outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        for p, o in zip(ps, outs, strict=True):
            assert o.outputs[0].token_ids == hf_greedy(hf, p, 24)
        assert llm.engine.spec_stats.num_accepted_tokens > 0
    finally:
        llm.engine.shutdown()


def test_cuda_structured_outputs_match_cpu(tiny_model_factory):
    """Grammar masks applied on the GPU (copied from the host each step, through the CUDA-graph decode path
    otherwise) give the CPU engine's fp32 greedy tokens, and the outputs fit."""
    pytest.importorskip("llguidance")
    import json
    import re

    torch.backends.cuda.matmul.allow_tf32 = False
    path, _, tok = tiny_model_factory("llama")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "c": {"enum": ["red", "blue"]}},
              "required": ["ok", "c"], "additionalProperties": False}
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs={"json": schema}),
              SamplingParams(temperature=0.0, max_tokens=60, structured_outputs={"regex": r"[a-d]{2,4}-(yes|no)"}),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)]
    ps = [{"prompt_token_ids": p} for p in prompts(len(tok), [5, 12, 30], seed=3)]
    gpu = LLM(path, device="cuda", dtype="float32", num_kv_cache_tokens=8192, max_model_len=256).generate(ps, params)
    cpu = LLM(path, device="cpu", dtype="float32", num_kv_cache_tokens=8192, max_model_len=256).generate(ps, params)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
    assert set(json.loads(gpu[0].outputs[0].text)) == {"ok", "c"}
    assert re.fullmatch(r"[a-d]{2,4}-(yes|no)", gpu[1].outputs[0].text)
