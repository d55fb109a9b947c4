"""Tensor parallelism on CPU (gloo, one worker process per extra rank): token-identical greedy outputs to
TP=1 and to HF transformers, refusal of sizes the model cannot be split into, and failure handling (a killed
or hung worker makes step() raise within seconds; shutdown leaves no process behind)."""

import os
import signal
import time

import psutil
import pytest
from test_engine_parity import random_prompts
from tiny_models import hf_greedy, hf_logprobs

from pagedserve.runtime import LLM, SamplingParams
from pagedserve.runtime.distributed import STEP_TIMEOUT_ENV, TensorParallelError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def gone(pid: int) -> bool:
    """True once ``pid`` no longer exists (or is only a zombie nobody will run again)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def tp_llms():
    """Build LLMs through this and every one is shut down at the end, even when the test fails."""
    made: list[LLM] = []

    def make(path, **kw) -> LLM:
        llm = LLM(path, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.engine.shutdown()


def generate_ids(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=max_tokens, **GREEDY))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("mistral", {}),
        ("qwen2", {}),  # q/k/v biases: sharded with their rows
        ("qwen3", {}),  # per-head q/k norms
        ("llama", {"num_key_value_heads": 1}),  # fewer KV heads than ranks: the one KV head is replicated
    ],
    ids=["llama", "mistral", "qwen2", "qwen3", "llama-1kv"],
)
def test_tp2_greedy_matches_tp1_and_hf(tiny_model_factory, tp_llms, arch, overrides):
    path, hf, tok = tiny_model_factory(arch, **overrides)
    prompts = random_prompts(len(tok), [1, 9, 17, 40], seed=21)
    tp1 = generate_ids(tp_llms(path, num_kv_cache_tokens=2048), prompts, 16)
    tp2_llm = tp_llms(path, num_kv_cache_tokens=2048, tensor_parallel_size=2)
    assert len(tp2_llm.engine.runner.worker_pids()) == 1
    tp2 = generate_ids(tp2_llm, prompts, 16)
    assert tp2 == tp1
    for p, out in zip(prompts, tp2, strict=True):
        assert out == hf_greedy(hf, p, 16), f"prompt of {len(p)} tokens"


@pytest.mark.parametrize(("knob", "arch"), [("FUSED_SILU", "llama"), ("FUSED_ROTARY", "llama"),
                                           ("FUSED_ROTARY", "qwen2"), ("FUSED_ROTARY", "qwen3")])
def test_tp2_fused_layouts_match_hf(tiny_model_factory, tp_llms, monkeypatch, knob, arch):
    """The load-time layouts of the experiment knobs, on every rank: PAGEDSERVE_FUSED_SILU (gate and up rows
    alternating; the interleaved silu_and_mul here, the GEMV's SiLU epilogue on CUDA) and PAGEDSERVE_FUSED_ROTARY
    (q and k heads paired, with and without q/k/v biases; the paired rotary here, the GEMV's rotary epilogue on
    CUDA; not for qwen3, whose per-head q/k norms keep the usual layout). Greedy outputs stay HF's."""
    from pagedserve import kernels

    monkeypatch.setenv(f"PAGEDSERVE_{knob}", "1")  # the worker reads it at import
    monkeypatch.setattr(kernels, knob, True)  # rank 0, in this process
    path, hf, tok = tiny_model_factory(arch)
    prompts = random_prompts(len(tok), [1, 9, 17], seed=22)
    llm = tp_llms(path, num_kv_cache_tokens=2048, tensor_parallel_size=2)
    layer = llm.engine.runner.model.model.layers[0]
    if knob == "FUSED_SILU":
        assert layer.mlp.gate_up_proj.interleave
    else:
        assert layer.self_attn.paired == (arch != "qwen3")
    for p, out in zip(prompts, generate_ids(llm, prompts, 12), strict=True):
        assert out == hf_greedy(hf, p, 12), f"prompt of {len(p)} tokens"


def test_tp2_chunked_prefill_preemption_and_logprobs(tiny_model_factory, tp_llms):
    """The paths where ranks must stay in step on more than one forward: 8-token prefill chunks, preemption
    and resume under a 128-token KV pool, prompt logprobs (one logits gather per request)."""
    path, hf, tok = tiny_model_factory("qwen2", num_key_value_heads=1)
    llm = tp_llms(path, num_kv_cache_tokens=128, max_model_len=128, max_num_batched_tokens=8, max_num_seqs=4,
                  tensor_parallel_size=2)
    prompts = random_prompts(len(tok), [30, 25, 33, 20], seed=22)
    outs = generate_ids(llm, prompts, 24)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(prompts, outs, strict=True):
        assert out == hf_greedy(hf, p, 24), f"prompt of {len(p)} tokens"
    prompt = prompts[0]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2, **GREEDY))[0]
    ref = hf_logprobs(hf, prompt + out.outputs[0].token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        got = out.prompt_logprobs[pos][prompt[pos]].logprob
        assert got == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["llama", "llama-1kv"])
def test_tp2_async_scheduling_matches_tp1(tiny_model_factory, tp_llms, kv_heads):
    """Async scheduling at TP=2: each step's inputs name the previous step's samples (placeholders), which
    rank 0 broadcasts to the other ranks; chunked prefill and preemption under a small pool included."""
    overrides = {"num_key_value_heads": kv_heads} if kv_heads else {}
    path, hf, tok = tiny_model_factory("llama", **overrides)
    prompts = random_prompts(len(tok), [30, 25, 33, 20, 3], seed=23)
    kw = dict(num_kv_cache_tokens=160, max_model_len=128, max_num_batched_tokens=8, max_num_seqs=4)
    tp1 = generate_ids(tp_llms(path, async_scheduling=False, **kw), prompts, 24)
    llm = tp_llms(path, tensor_parallel_size=2, async_scheduling=True, **kw)
    assert llm.engine.async_scheduling
    assert generate_ids(llm, prompts, 24) == tp1
    assert llm.engine.scheduler.num_preemptions > 0
    assert tp1[0] == hf_greedy(hf, prompts[0], 24)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    # A request that needs its logprobs on the host turns the engine synchronous while it runs (8 tokens) and
    # async again after it: the steps on both sides of each switch keep the other requests' tokens right.
    mixed = [SamplingParams(max_tokens=24, **GREEDY)] * 4 + [SamplingParams(max_tokens=8, logprobs=1, **GREEDY)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], mixed)
    assert [o.outputs[0].token_ids for o in outs[:4]] == tp1[:4]
    assert outs[4].outputs[0].token_ids == tp1[4][:8] and len(outs[4].outputs[0].logprobs) == 8


def test_async_wait_reports_a_dead_or_hung_worker(tiny_model_factory, tp_llms):
    """Waiting for an async step's device work (an event that is never done here) still watches the workers:
    a dead one is named within the poll interval, and a step that never finishes fails after the timeout."""

    class NeverDone:
        def query(self) -> bool:
            return False

    path, _, _ = tiny_model_factory("llama")
    runner = tp_llms(path, num_kv_cache_tokens=2048, tensor_parallel_size=2, async_scheduling=True).engine.runner
    runner.step_timeout_s = 0.5
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="no progress for 0.5s"):
        runner.wait_for_device(NeverDone())
    assert 0.4 < time.monotonic() - t0 < 3.0
    with pytest.raises(TensorParallelError, match="dead"):  # the engine stays dead
        runner.check_health()

    runner = tp_llms(path, num_kv_cache_tokens=2048, tensor_parallel_size=2, async_scheduling=True).engine.runner
    [pid] = runner.worker_pids()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match=rf"worker rank 1 \(pid {pid}\) was killed by SIGKILL"):
        runner.wait_for_device(NeverDone())
    assert time.monotonic() - t0 < 3.0


def test_tp_size_that_does_not_divide_heads_is_refused(tiny_model_factory):
    path, _, _ = tiny_model_factory("llama")
    before = child_pids()
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*4 attention heads are not divisible by 3"):
        LLM(path, tensor_parallel_size=3)
    assert child_pids() == before  # refused before any worker started


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_killed_worker_is_detected_within_seconds(tiny_model_factory, tp_llms, async_scheduling):
    path, _, tok = tiny_model_factory("llama")
    llm = tp_llms(path, num_kv_cache_tokens=2048, tensor_parallel_size=2, async_scheduling=async_scheduling)
    engine = llm.engine
    params = SamplingParams(max_tokens=200, **GREEDY)
    engine.add_request(engine.make_request("r0", random_prompts(len(tok), [12], seed=23)[0], params))
    engine.step()
    [pid] = engine.runner.worker_pids()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match=rf"worker rank 1 \(pid {pid}\) was killed by SIGKILL"):
        while engine.has_unfinished():  # the step in flight (or the next one) must notice
            engine.step()
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(TensorParallelError, match="dead"):  # and it stays dead
        engine.step()
    assert gone(pid)


def test_health_check_sees_a_dead_worker_while_idle(tiny_model_factory, tp_llms):
    path, _, _ = tiny_model_factory("llama")
    engine = tp_llms(path, num_kv_cache_tokens=2048, tensor_parallel_size=2).engine
    engine.check_health()  # healthy: no error
    [pid] = engine.runner.worker_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            engine.check_health()
        except TensorParallelError as e:
            assert f"worker rank 1 (pid {pid}) was killed by SIGKILL" in str(e)
            break
        time.sleep(0.05)
    else:
        pytest.fail("check_health() did not notice the killed worker within 5s")


def test_hung_worker_is_detected_after_the_step_timeout(tiny_model_factory, tp_llms, monkeypatch):
    monkeypatch.setenv(STEP_TIMEOUT_ENV, "2")
    path, _, tok = tiny_model_factory("llama")
    llm = tp_llms(path, num_kv_cache_tokens=2048, tensor_parallel_size=2)
    engine = llm.engine
    engine.add_request(engine.make_request("r0", random_prompts(len(tok), [12], seed=24)[0],
                                           SamplingParams(max_tokens=50, **GREEDY)))
    engine.step()
    [pid] = engine.runner.worker_pids()
    os.kill(pid, signal.SIGSTOP)  # alive, but never answers again
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="no progress for 2s"):
        engine.step()
    assert 1.5 < time.monotonic() - t0 < 6.0
    deadline = time.monotonic() + 5.0  # the stopped worker is killed, not left behind
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid)


def test_shutdown_leaves_no_worker_processes(tiny_model_factory):
    path, hf, tok = tiny_model_factory("llama")
    before = child_pids()
    llm = LLM(path, num_kv_cache_tokens=2048, tensor_parallel_size=2)
    pids = llm.engine.runner.worker_pids()
    assert set(pids) <= child_pids() - before and all(not gone(p) for p in pids)
    prompt = random_prompts(len(tok), [10], seed=25)[0]
    assert generate_ids(llm, [prompt], 8) == [hf_greedy(hf, prompt, 8)]
    llm.engine.shutdown()
    assert all(gone(p) for p in pids)
    assert child_pids() - before == set()
    llm.engine.shutdown()  # idempotent
    with pytest.raises(TensorParallelError, match="shut down"):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, **GREEDY))


ENGINE_SCRIPT = """
import sys, time
from pagedserve.runtime import LLM
llm = LLM(sys.argv[1], num_kv_cache_tokens=2048, tensor_parallel_size=2)
print(*llm.engine.runner.worker_pids(), flush=True)
if sys.argv[2] == "sleep":
    time.sleep(600)
# else: fall off the end without shutdown(): the finalizer must stop the workers at interpreter exit
"""


@pytest.mark.parametrize("how", ["interpreter-exit", "engine-sigkilled"])
def test_workers_do_not_outlive_the_engine_process(tiny_model_factory, how):
    import subprocess
    import sys

    path, _, _ = tiny_model_factory("llama")
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE_SCRIPT, path, "exit" if how == "interpreter-exit" else "sleep"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1
        if how == "engine-sigkilled":
            assert not gone(pids[0])
            proc.kill()  # no finalizer runs: the worker must notice its parent is gone by itself
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10.0
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(p) for p in pids)
        if how == "interpreter-exit":
            assert proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("size", "heads", "kv_heads"), [(4, 4, 2), (8, 8, 2), (4, 8, 4), (2, 4, 1)])
def test_qkv_shards_pick_the_kv_head_of_their_query_heads(size, heads, kv_heads):
    """Every rank's K/V rows are those of the KV head its query heads attend to under grouped-query
    attention (replicated when ranks outnumber KV heads); checked at sizes the CPU tests cannot start."""
    import torch

    from pagedserve.runtime.layers import QKVParallelLinear
    from pagedserve.runtime.parallel import TPGroup

    head_dim, hidden = 2, 6
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    group = heads // kv_heads  # query heads per KV head
    for rank in range(size):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=False, tp=TPGroup(rank, size))
        for shard, w in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, w, shard)
        q_heads = list(range(rank * heads // size, (rank + 1) * heads // size))
        kv_of = sorted({h // group for h in q_heads})
        rows = layer.weight.view(-1, head_dim, hidden)
        assert torch.equal(rows[: len(q_heads)], q.view(heads, head_dim, hidden)[q_heads])
        assert torch.equal(rows[len(q_heads): len(q_heads) + len(kv_of)], k.view(kv_heads, head_dim, hidden)[kv_of])
        assert torch.equal(rows[len(q_heads) + len(kv_of):], v.view(kv_heads, head_dim, hidden)[kv_of])


@pytest.mark.parametrize(
    ("overrides", "post_attention", "input_and_final"),
    [({}, 0, 1), ({"attention_bias": True}, None, 1), ({"mlp_bias": True}, 0, None)],
    ids=["no-bias", "o_proj-bias", "mlp-bias"],
)
def test_norms_reduce_only_what_their_projection_left_unreduced(overrides, post_attention, input_and_final):
    """At TP>1 a norm all-reduces its input (the fused kernel) only when the projection before it skipped its
    own all-reduce; a projection with a bias reduces itself (the bias is added once, after the sum), so a
    norm that also reduced would multiply the hidden state by the number of ranks."""
    from transformers import LlamaConfig

    from pagedserve.runtime.models import get_model_class
    from pagedserve.runtime.parallel import TPGroup

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"], **overrides)
    model = get_model_class(cfg.architectures)(cfg, TPGroup(0, 2))
    inner = model.model
    for layer in inner.layers:
        assert layer.self_attn.o_proj.reduce_in_norm == (post_attention is not None)
        assert layer.mlp.down_proj.reduce_in_norm == (input_and_final is not None)
        assert layer.post_attention_layernorm.reduce_slot == post_attention
        assert layer.input_layernorm.reduce_slot == input_and_final
    assert inner.norm.reduce_slot == input_and_final
    single = get_model_class(cfg.architectures)(cfg, TPGroup(0, 1))  # one rank: nothing to reduce anywhere
    assert single.model.norm.reduce_slot is None and not single.model.layers[0].self_attn.o_proj.reduce_in_norm
