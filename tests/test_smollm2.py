"""The real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF): greedy tokens equal HF transformers' generate."""

import pytest
import torch

from pagedserve.runtime import LLM, SamplingParams

try:
    from pagedserve.runtime.demo_model import smollm2_gguf_path

    GGUF = smollm2_gguf_path()
except FileNotFoundError as e:  # make test installs it; say so loudly rather than pass quietly
    pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def ours():
    return LLM(str(GGUF), max_model_len=1024, num_kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    return model.eval()


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_chat_answer_is_paris_and_matches_hf(ours, hf):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = ours.chat(messages, SamplingParams(temperature=0.0, max_tokens=20))[0]
    comp = out.outputs[0]
    assert comp.text == "The capital of France is Paris."
    assert comp.finish_reason == "stop"
    ref = hf_greedy(hf, out.prompt_token_ids, len(comp.token_ids))
    assert comp.token_ids == ref


def test_batch_greedy_matches_hf(ours, hf):
    tok = ours.get_tokenizer()
    prompts = ["The quick brown fox", "def fibonacci(n):", "Kubernetes is"]
    ids = [tok(p)["input_ids"] for p in prompts]
    outs = ours.generate([{"prompt_token_ids": i} for i in ids],
                         SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    for i, o in zip(ids, outs, strict=True):
        assert o.outputs[0].token_ids == hf_greedy(hf, i, 16)
