"""GGUF loading: tiny files written here with gguf.GGUFWriter, and the real SmolLM2 file against transformers."""

from __future__ import annotations

import math

import jinja2
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, RopeScalingType
from gguf_util import (
    CHAT_TEMPLATE,
    TINY,
    gguf_layout,
    gguf_name,
    quantization_error_bound,
    random_llama_weights,
    reference_dequantize,
    tiny_tokenizer,
    write_tiny_gguf,
)

from pagedserve.runtime.demo_model import smollm2_gguf_path
from pagedserve.runtime.gguf_loader import load_gguf

Q = GGMLQuantizationType
QUANTIZED = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


def vocab_size() -> int:
    return tiny_tokenizer().get_vocab_size()


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; 4.x in `rope_scaling`."""
    return dict(getattr(config, "rope_parameters", None) or config.rope_scaling or {})


def load_weights(path, dtype=torch.float32):
    model = load_gguf(path, dtype=dtype)
    return model, dict(model.iter_weights())


# ---------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, *QUANTIZED], ids=lambda q: q.name)
def test_dequantized_weights_match_the_original_floats(tmp_path, qtype):
    weights = random_llama_weights(vocab_size(), tied=False, seed=int(qtype))
    stored = write_tiny_gguf(tmp_path / "tiny.gguf", weights, tensor_type=qtype)
    model, ours = load_weights(tmp_path / "tiny.gguf")

    assert list(ours) == list(weights)  # HF names, file order, lm_head present when untied
    for name, original in weights.items():
        got = ours[name]
        assert got.dtype == torch.float32 and got.shape == original.shape, name
        if original.ndim == 1 or qtype == Q.F32:
            assert torch.equal(got, original), name
        elif qtype == Q.F16:
            assert torch.equal(got, original.half().float()), name
        elif qtype == Q.BF16:
            assert torch.equal(got, original.bfloat16().float()), name
        else:
            bound = quantization_error_bound(original.numpy(), qtype)
            error = (got - original).abs().numpy()
            assert (error <= bound).all(), f"{name}: max excess {(error - bound).max()}"
            assert error.max() > 0, name  # it really went through the quantizer
        # Bit-exact against the stored bytes decoded by hand; Q/K compared in the file's row order.
        if original.ndim == 2:
            decoded = reference_dequantize(stored[gguf_name(name)], qtype, original.shape[1])
            np.testing.assert_array_equal(gguf_layout(name, got), decoded, err_msg=name)


def test_quantized_q_and_k_rows_are_back_in_hf_order(tmp_path):
    # A wrong un-permutation moves whole rows: their error is the size of the weights, not of a step.
    weights = random_llama_weights(vocab_size(), seed=7)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights, tensor_type=Q.Q8_0)
    _, ours = load_weights(tmp_path / "tiny.gguf")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        original = weights[name]
        assert (ours[name] - original).abs().max() < 0.02 * original.abs().max()
        assert (torch.from_numpy(gguf_layout(name, original)) - original).abs().max() > 0.2 * original.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_are_cast_to_the_requested_dtype(tmp_path, dtype):
    weights = random_llama_weights(vocab_size(), seed=3)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights, tensor_type=Q.Q4_1)
    _, fp32 = load_weights(tmp_path / "tiny.gguf")
    _, cast = load_weights(tmp_path / "tiny.gguf", dtype=dtype)
    assert list(cast) == list(fp32)
    for name, tensor in cast.items():
        assert tensor.dtype == dtype and torch.equal(tensor, fp32[name].to(dtype)), name


def _interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on adjacent pairs (2i, 2i+1), as llama.cpp and Meta's original Llama code apply it."""
    seq_len, head_dim = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None, :]
    rotation = torch.polar(torch.ones_like(angles), angles)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2)


def test_hf_rope_on_our_weights_equals_llama_cpp_rope_on_the_file_weights(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    weights = random_llama_weights(vocab_size(), seed=11)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights)
    model, ours = load_weights(tmp_path / "tiny.gguf")
    cfg = model.config
    heads, kv_heads, head_dim, seq_len = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 13
    x = torch.randn(1, seq_len, cfg.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def project(w, n):
        return (x @ w.double().T).view(1, seq_len, n, head_dim).transpose(1, 2)

    def scores(q, k):
        return q @ k.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2)

    def hf_scores(wq, wk):
        cos, sin = LlamaRotaryEmbedding(config=cfg)(x.float(), torch.arange(seq_len)[None])
        q, k = apply_rotary_pos_emb(project(wq, heads), project(wk, kv_heads), cos.double(), sin.double())
        return scores(q, k)

    q_name, k_name = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    file_q = torch.from_numpy(gguf_layout(q_name, weights[q_name]))
    file_k = torch.from_numpy(gguf_layout(k_name, weights[k_name]))
    theta = rope_parameters(cfg)["rope_theta"]
    llama_cpp = scores(_interleaved_rope(project(file_q, heads), theta), _interleaved_rope(project(file_k, kv_heads), theta))

    torch.testing.assert_close(hf_scores(ours[q_name], ours[k_name]), llama_cpp, rtol=1e-5, atol=1e-5)
    # the file's own row order under rotate-half RoPE is not the same model
    assert not torch.allclose(hf_scores(file_q, file_k), llama_cpp, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------- metadata


def test_metadata_becomes_a_llama_config(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", random_llama_weights(vocab_size()))
    model, ours = load_weights(tmp_path / "tiny.gguf")
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (vocab_size(), 64, 96)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.max_position_embeddings == TINY["max_position_embeddings"]
    assert math.isclose(cfg.rms_norm_eps, TINY["rms_norm_eps"], rel_tol=1e-6)
    assert cfg.rope_theta == TINY["rope_theta"] and rope_parameters(cfg)["rope_theta"] == TINY["rope_theta"]
    assert rope_parameters(cfg).get("rope_type", "default") == "default"
    # no output.weight in the file: tied embeddings, and no lm_head tensor is produced
    assert cfg.tie_word_embeddings is True and "lm_head.weight" not in ours


def test_untied_file_has_an_lm_head(tmp_path):
    weights = random_llama_weights(vocab_size(), tied=False)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights)
    model, ours = load_weights(tmp_path / "tiny.gguf")
    assert model.config.tie_word_embeddings is False
    assert torch.equal(ours["lm_head.weight"], weights["lm_head.weight"])


def test_tokenizer_and_chat_template_come_from_the_file(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", random_llama_weights(vocab_size()))
    model = load_gguf(tmp_path / "tiny.gguf")
    reference = tiny_tokenizer()
    vocab = reference.get_vocab()
    tok = model.tokenizer
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    for text in ["The capital of France is Paris.", "  blocks;\ttables  12345 ünïcödé 🙂", "<|im_start|>user\nhi"]:
        assert tok(text, add_special_tokens=False).input_ids == reference.encode(text).ids, text
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == rendered
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == reference.encode(rendered).ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert model.generation_config == {
        "bos_token_id": vocab["<|im_start|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def test_generation_config_lists_end_of_turn_and_sampling_defaults(tmp_path):
    eot = tiny_tokenizer().get_vocab()["<|endoftext|>"]

    def extra(writer):
        writer.add_eot_token_id(eot)
        writer.add_float32("general.sampling.temp", 0.6)
        writer.add_int32("general.sampling.top_k", 20)

    write_tiny_gguf(tmp_path / "tiny.gguf", random_llama_weights(vocab_size()), extra=extra)
    generation = load_gguf(tmp_path / "tiny.gguf").generation_config
    assert generation["eos_token_id"] == [tiny_tokenizer().get_vocab()["<|im_end|>"], eot]
    assert math.isclose(generation["temperature"], 0.6, rel_tol=1e-6) and generation["top_k"] == 20


def test_linear_and_yarn_rope_scaling_metadata(tmp_path):
    def linear(writer):
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    def yarn(writer):
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(2.0)
        writer.add_rope_scaling_orig_ctx_len(128)

    weights = random_llama_weights(vocab_size())
    write_tiny_gguf(tmp_path / "linear.gguf", weights, extra=linear)
    write_tiny_gguf(tmp_path / "yarn.gguf", weights, extra=yarn)
    lin = rope_parameters(load_gguf(tmp_path / "linear.gguf").config)
    assert (lin["rope_type"], lin["factor"]) == ("linear", 4.0)
    yrn = rope_parameters(load_gguf(tmp_path / "yarn.gguf").config)
    assert (yrn["rope_type"], yrn["factor"], yrn["original_max_position_embeddings"]) == ("yarn", 2.0, 128)


def test_llama3_rope_freqs_tensor_becomes_llama3_rope_scaling(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = {**TINY, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
    cfg |= {"rope_theta": 500000.0, "max_position_embeddings": 131072}
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama31["original_max_position_embeddings"] = 8192
    reference_config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=llama31,
    )
    reference_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](reference_config, "cpu")
    head_dim = 64
    plain_inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    # llama.cpp divides each frequency by the stored factor
    divisors = (plain_inv_freq / reference_inv_freq.double()).float().numpy()

    write_tiny_gguf(
        tmp_path / "llama31.gguf",
        random_llama_weights(vocab_size(), cfg),
        cfg=cfg,
        extra=lambda writer: writer.add_tensor("rope_freqs.weight", divisors),
    )
    model, ours = load_weights(tmp_path / "llama31.gguf")
    assert rope_parameters(model.config)["rope_type"] == "llama3"
    assert rope_parameters(model.config)["factor"] == pytest.approx(8.0)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    torch.testing.assert_close(inv_freq, reference_inv_freq, rtol=1e-5, atol=0)
    assert not any("rope" in name for name in ours)


# ------------------------------------------------------------------------------------------- bad inputs


def test_other_architecture_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "qwen.gguf", random_llama_weights(vocab_size()), architecture="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        load_gguf(tmp_path / "qwen.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.999, 20, 0], ids=["half", "last-bytes", "header-only", "empty"])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, random_llama_weights(vocab_size()), tensor_type=Q.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if 0 < keep < 1 else keep])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "q5.gguf", random_llama_weights(vocab_size()), tensor_type=Q.Q5_0)
    with pytest.raises(ValueError, match=r"tensor token_embd\.weight has type Q5_0"):
        load_gguf(tmp_path / "q5.gguf")


def test_missing_tensor_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", random_llama_weights(vocab_size()), skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing tensors: blk\.1\.ffn_up\.weight"):
        load_gguf(tmp_path / "tiny.gguf")


def test_unsupported_dtype(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", random_llama_weights(vocab_size()))
    with pytest.raises(ValueError, match="dtype"):
        load_gguf(tmp_path / "tiny.gguf", dtype=torch.int8)


# ------------------------------------------------------------------------ the real model vs transformers


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (test extras)")
    path = smollm2_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return load_gguf(path), hf_model, hf_tokenizer


def test_smollm2_weights_equal_transformers(smollm2):
    ours, hf_model, _ = smollm2
    hf_state = hf_model.state_dict()
    assert hf_model.config.tie_word_embeddings and ours.config.tie_word_embeddings
    names = []
    for name, tensor in ours.iter_weights():
        names.append(name)
        assert tensor.dtype == torch.float32 and torch.equal(tensor, hf_state[name]), name
    assert sorted(names) == sorted(set(hf_state) - {"lm_head.weight"})


def test_smollm2_config_and_tokenizer_match_transformers(smollm2):
    ours, hf_model, hf_tokenizer = smollm2
    fields = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ]
    for name in fields:
        assert getattr(ours.config, name) == getattr(hf_model.config, name), name
    assert rope_parameters(ours.config) == rope_parameters(hf_model.config)

    tok = ours.tokenizer
    assert tok.chat_template == hf_tokenizer.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.get_vocab() == hf_tokenizer.get_vocab()
    for add_generation_prompt in (True, False):
        kwargs = {"add_generation_prompt": add_generation_prompt, "tokenize": True, "return_dict": True}
        assert (
            tok.apply_chat_template(MESSAGES, **kwargs)["input_ids"]
            == hf_tokenizer.apply_chat_template(MESSAGES, **kwargs)["input_ids"]
        )
    text = "<|im_start|>user\nWhat is 12345 * 6789?<|im_end|>\n  Ünïcode 🙂"
    assert tok(text).input_ids == hf_tokenizer(text).input_ids
    generation = hf_model.generation_config
    assert ours.generation_config == {
        "bos_token_id": generation.bos_token_id, "eos_token_id": generation.eos_token_id,
        "pad_token_id": generation.pad_token_id,
    }
    assert ours.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
