"""Incremental detokenization that never emits a broken UTF-8 character, and stop-string detection.

Fast path: a per-tokenizer table maps every token id to its bytes (byte-level BPE and SentencePiece
byte-fallback vocabularies are covered); each request feeds its new bytes through an incremental UTF-8
decoder, which holds back an incomplete character until its last byte arrives. That is O(1) per token
with no tokenizer call. Any other tokenizer falls back to re-decoding the output and emitting the new,
complete suffix.
"""

from __future__ import annotations

import codecs
import json


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _decoder_kinds(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        kinds = set()
        for d in decoder.get("decoders", []):
            kinds |= _decoder_kinds(d)
            if d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁":
                kinds.add("metaspace")
        return kinds
    return {decoder.get("type", "")}


def _is_byte_token(tok: str) -> bool:
    return len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")


class TokenDecoder:
    """Token id -> bytes tables for one tokenizer (``skip_special`` and not), built once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tables: dict[bool, list[bytes]] | None = None
        try:
            self.tables = self._build(tokenizer)
        except Exception:  # an unfamiliar tokenizer: use the slow, always-correct fallback
            self.tables = None

    @staticmethod
    def _build(tokenizer) -> dict[bool, list[bytes]] | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        kinds = _decoder_kinds(spec.get("decoder"))
        vocab_size = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
        id_to_token = [backend.id_to_token(i) for i in range(vocab_size)]
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        byte_fallback = "ByteFallback" in kinds
        if "ByteLevel" in kinds:
            byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}

            def to_bytes(tok: str) -> bytes:
                return bytes(byte_decoder[c] for c in tok)
        elif "metaspace" in kinds or "Metaspace" in kinds:
            if "Strip" in kinds and "ByteFallback" not in kinds:
                return None

            def to_bytes(tok: str) -> bytes:
                if byte_fallback and _is_byte_token(tok):
                    return bytes([int(tok[3:5], 16)])
                return tok.replace("▁", " ").encode("utf-8")
        else:
            return None
        keep, skip = [], []
        for i, tok in enumerate(id_to_token):
            if tok is None:
                b = b""
                keep.append(b)
                skip.append(b)
                continue
            if i in added and not (byte_fallback and _is_byte_token(tok)):
                b = added[i]["content"].encode("utf-8")
                keep.append(b)
                skip.append(b"" if added[i].get("special") else b)
                continue
            b = to_bytes(tok)
            keep.append(b)
            skip.append(b)
        return {True: skip, False: keep}


class IncrementalDetokenizer:
    """One request's output text, grown token by token, with stop strings applied."""

    __slots__ = (
        "decoder", "table", "utf8", "text", "output_ids", "skip_special", "stop", "max_stop_len",
        "include_stop", "emitted", "stopped_on", "min_chars_before_stop",
    )

    def __init__(
        self,
        decoder: TokenDecoder,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.decoder = decoder
        self.table = decoder.tables[skip_special_tokens] if decoder.tables else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.output_ids: list[int] = []
        self.skip_special = skip_special_tokens
        self.stop = stop or []
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.include_stop = include_stop_str_in_output
        self.emitted = 0
        self.stopped_on: str | None = None
        self.min_chars_before_stop = 0

    def add_tokens(self, token_ids: list[int], check_stop: bool = True) -> str | None:
        """Append tokens; returns the stop string if one now appears in the text (text cut there)."""
        prev_len = len(self.text)
        self.output_ids.extend(token_ids)
        table = self.table
        if table is not None:
            n = len(table)
            if len(token_ids) == 1:
                t = token_ids[0]
                data = table[t] if 0 <= t < n else b""
            else:
                data = b"".join(table[t] if 0 <= t < n else b"" for t in token_ids)
            if data:
                self.text += self.utf8.decode(data)
        else:
            full = self.decoder.tokenizer.decode(self.output_ids, skip_special_tokens=self.skip_special)
            # Emit only up to the last complete character; the tail may be a partial multi-byte one.
            if full.endswith("\ufffd"):
                full = full.rstrip("\ufffd")
            if full.startswith(self.text):
                self.text = full
        if not check_stop or not self.stop:
            return None
        return self._check_stop(prev_len)

    def _check_stop(self, prev_len: int) -> str | None:
        start = max(0, prev_len - self.max_stop_len + 1, self.min_chars_before_stop)
        best = -1
        hit = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best == -1 or idx < best):
                best, hit = idx, s
        if hit is None:
            return None
        self.text = self.text[: best + len(hit)] if self.include_stop else self.text[:best]
        self.stopped_on = hit
        return hit

    def flush(self) -> None:
        """End of output: a dangling partial character becomes U+FFFD, as a full decode would show it."""
        if self.table is not None:
            self.text += self.utf8.decode(b"", final=True)

    def delta(self, finished: bool) -> str:
        """Text not yet emitted; while running, hold back what could still become a stop string."""
        end = len(self.text)
        if not finished and self.max_stop_len > 1:
            end = max(self.emitted, end - (self.max_stop_len - 1))
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
