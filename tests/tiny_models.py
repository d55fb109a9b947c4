"""Tiny random-weight models in real Hugging Face layout, built by the tests themselves.

A byte-level BPE tokenizer is trained here with `tokenizers`; weights are random (seeded) and saved with
safetensors through transformers' own ``save_pretrained``, so the files are what a user would have.
"""

from __future__ import annotations

import os

import torch

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching schedules new requests every step.",
    "Héllo wörld — naïve café, 東京, 😀 emoji and ünïcödé text.",
    "def add(a, b):\n    return a + b\n",
    "Kubernetes operators reconcile desired state into running pods.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(arch: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    model_type = arch
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        architectures=[ARCHS[arch]],
    )
    if arch == "qwen3":
        kw["head_dim"] = 32
    if arch in ("mistral", "qwen2"):
        kw["sliding_window"] = None
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def build_model_dir(path: str, arch: str = "llama", seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Write a tiny random model of ``arch`` to ``path``; returns the HF model (fp32, eval) for reference."""
    from transformers import AutoModelForCausalLM

    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer()
    config = make_config(arch, overrides.pop("vocab_size", len(tokenizer)), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        # Biases are zero-initialised by HF; give them values so a dropped bias cannot go unnoticed.
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with HF transformers' ``generate`` (EOS never stops it)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """Log-softmax of HF's raw logits at every position of ``token_ids`` ([len, vocab])."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
