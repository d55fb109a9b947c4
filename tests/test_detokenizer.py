"""Incremental detokenization: equals a full decode, never emits a broken character on the way."""

import random

import pytest

from pagedserve.runtime.detokenizer import IncrementalDetokenizer, TokenDecoder


def feed(tok, ids, skip=True):
    dec = TokenDecoder(tok)
    d = IncrementalDetokenizer(dec, skip_special_tokens=skip)
    streamed = ""
    for t in ids:
        d.add_tokens([t])
        streamed += d.delta(finished=False)
        assert dec.tables is not None  # the fast path is in use for this tokenizer
    d.flush()
    streamed += d.delta(finished=True)
    return d.text, streamed


def test_unicode_text_round_trips_token_by_token(tiny_model_factory):
    _, _, tok = tiny_model_factory("llama")
    text = "Héllo wörld — naïve café, 東京, 😀 emoji and ünïcödé text."
    ids = tok(text)["input_ids"]
    final, streamed = feed(tok, ids)
    assert final == streamed == text
    # Split inside multi-byte characters: the byte-level vocab has single-byte tokens for them.
    prefixes = []
    dec = TokenDecoder(tok)
    d = IncrementalDetokenizer(dec)
    for t in ids:
        d.add_tokens([t])
        prefixes.append(d.text)
    assert all(text.startswith(p) for p in prefixes)
    assert all("\ufffd" not in p for p in prefixes)


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_streams_equal_full_decode(tiny_model_factory, skip):
    _, _, tok = tiny_model_factory("llama")
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        final, streamed = feed(tok, ids, skip)
        assert final == streamed == tok.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_style_vocabulary(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Llama-2 style: byte pieces <0x00>..<0xFF> in the model vocabulary, metaspace, byte fallback.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz,.":
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    prompt = tok("hello world", add_special_tokens=False)["input_ids"]
    text = " the quick brown fox, 東京 😀"
    out = tok(text, add_special_tokens=False)["input_ids"]
    final, streamed = feed(tok, out)
    # Output text continues the prompt: a leading space is kept, as a decode of prompt + output shows.
    full = tok.decode(prompt + out)
    assert final == streamed == full[len(tok.decode(prompt)):]
    assert "東京 😀" in final


def test_stop_string_holds_back_partial_matches(tiny_model_factory):
    _, _, tok = tiny_model_factory("llama")
    dec = TokenDecoder(tok)
    d = IncrementalDetokenizer(dec, stop=["capital of"])
    emitted = ""
    hit = None
    for t in tok("The capital of France")["input_ids"]:
        hit = d.add_tokens([t]) or hit
        emitted += d.delta(finished=hit is not None)
        if hit:
            break
    assert hit == "capital of"
    assert emitted == "The "
