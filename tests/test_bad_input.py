"""Bad input raises ValueError naming the field, and leaves the engine serving everyone else."""

import json

import pytest

from pagedserve.runtime import LLM, SamplingParams


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {1: 500}}, "logit_bias"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_parameters_are_refused():
    with pytest.raises(ValueError, match="top_q"):
        SamplingParams.from_dict({"top_q": 0.5})


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    path, _, _ = tiny_model_factory("llama")
    return LLM(path, num_kv_cache_tokens=2048, max_model_len=64)


def test_engine_arguments_and_prompts(llm, tiny_model_factory):
    path, _, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="gpu_memory_utilisation"):
        LLM(path, gpu_memory_utilisation=0.5)
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="float8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, max_model_len=100000)
    with pytest.raises(ValueError, match="prompt: 70 tokens is too long for max_model_len=64"):
        llm.generate({"prompt_token_ids": [5] * 70})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 10**6]})
    with pytest.raises(ValueError, match="prompt: must contain at least one token"):
        llm.generate({"prompt_token_ids": []})


def test_a_bad_prompt_in_a_batch_submits_nothing_and_the_engine_keeps_serving(llm):
    good = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError):
        llm.generate([good, {"prompt_token_ids": [5] * 100}], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()
    out = llm.generate(good, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_model_loading_errors(tmp_path, tiny_model_factory):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path / "empty"))
    path, _, _ = tiny_model_factory("llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.load(open(f"{path}/config.json"))
    cfg["architectures"] = ["FooForCausalLM"]
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported model architecture.*FooForCausalLM"):
        LLM(str(bad))
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(bad))
