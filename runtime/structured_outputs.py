"""Structured outputs: a grammar decides which tokens may come next, so an output is JSON that fits a schema,
matches a regular expression, is one of a list of choices, or follows a Lark grammar.

The request side takes vLLM's ``structured_outputs`` (``{"json": schema}``, ``{"regex": ...}``, ``{"choice":
[...]}``, ``{"grammar": lark}``, ``{"json_object": true}``) and OpenAI's ``response_format`` (``json_object``,
``json_schema``); both become a ``StructuredOutputsParams`` on the request's ``SamplingParams``.

The grammar engine is llguidance (one of vLLM's backends): it compiles a grammar lazily against the tokenizer
and, per step, gives the set of allowed next tokens as a bitmask (one bit per vocabulary entry, 32 per int32).
The engine validates each grammar when the request arrives (a bad schema or regex is the client's error, 400);
the sampling rank keeps one ``GrammarMatcher`` per running request, advances it by the request's new output
tokens before each sampled step and masks the logits with its bitmask (``Sampler``). A request whose grammar is
complete may only end (EOS). Such requests need their previous token on the host every step, so they turn
asynchronous scheduling off while they run, like penalties do; speculative decoding refuses them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("pagedserve.structured_outputs")

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# JSON without whitespace between its tokens unless disable_any_whitespace is false: with any whitespace allowed,
# a weak model can spend its whole budget on newlines inside an object. (vLLM allows whitespace by default and
# has disable_any_whitespace for this; we default the other way.)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's ``StructuredOutputsParams`` names)."""

    json: dict | str | None = None  # a JSON schema (an object, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark syntax (llguidance's dialect)
    json_object: bool | None = None  # any JSON object
    disable_any_whitespace: bool = True  # JSON: no whitespace between tokens (vLLM's option; its default is False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs: exactly one of json, regex, choice, grammar, json_object must be given, "
                f"got {', '.join(given) or 'none'}"
            )
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs: json is not valid JSON text: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError(f"structured_outputs: json must be a JSON schema object, got {type(schema).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs: regex must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, list | tuple) or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs: choice must be a non-empty list of non-empty strings")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured_outputs: grammar must be a non-empty Lark grammar")
        if self.json_object not in (None, True, False):
            raise ValueError("structured_outputs: json_object must be true")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs: disable_any_whitespace must be true or false")

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputsParams | None:
        """From a ``StructuredOutputsParams``, a dict of its fields (unknown keys refused), or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs: must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_KINDS) - {"disable_any_whitespace"})
        if unknown:
            raise ValueError(f"structured_outputs: unknown key(s) {', '.join(unknown)}; "
                             f"expected one of {', '.join(_KINDS)} (and disable_any_whitespace)")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def grammar_spec(self) -> str:
        """The constraint as an llguidance grammar."""
        from llguidance import LLMatcher

        defaults = {"whitespace_flexible": not self.disable_any_whitespace}
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=defaults)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)


class GrammarCompiler:
    """One per engine: the tokenizer as llguidance sees it (built on first use), grammar checks, matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits) width, which may exceed the tokenizer's
        self.eos_token_ids = tuple(eos_token_ids)
        self._ll_tokenizer = None
        self._checked: set[str] = set()  # grammars already validated (a batch often shares one schema)
        self._executor = None
        self._unavailable: str | None = None  # why structured outputs cannot run here, once known

    def prepare(self) -> None:
        """Build the tokenizer's llguidance form now (about a second for a 50k vocabulary on a slow core) rather
        than in the first constrained request. A tokenizer llguidance cannot take (or no llguidance) does not stop
        the engine: constrained requests then get a 400 that says why."""
        try:
            self.ll_tokenizer  # noqa: B018
        except ValueError as e:
            logger.warning("%s; plain requests are served as usual", e)

    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            if self._unavailable is not None:
                raise ValueError(self._unavailable)
            try:
                import llguidance.hf

                eos = list(self.eos_token_ids) or None
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                                  eos_token=eos)
            except ImportError:
                self._unavailable = ("structured_outputs: not available: this server was installed without "
                                     "llguidance (pip install llguidance)")
                raise ValueError(self._unavailable) from None
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer with more entries than the model's vocabulary
                self._unavailable = f"structured_outputs: not available for this model's tokenizer: {e}"
                raise ValueError(self._unavailable) from None
        return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> str:
        """The grammar, checked against the tokenizer; ValueError naming the problem if it cannot be used."""
        tokenizer = self.ll_tokenizer  # ValueError when structured outputs are not available at all
        from llguidance import LLMatcher

        try:
            spec = params.grammar_spec()
        except ValueError as e:
            raise ValueError(f"structured_outputs: invalid {params.kind}: {e}") from None
        if spec in self._checked:
            return spec
        try:
            error = LLMatcher.validate_grammar(spec, tokenizer)
        except Exception as e:  # noqa: BLE001 - whatever the grammar engine raises is the grammar's fault
            error = f"{type(e).__name__}: {e}"
        if error:
            raise ValueError(f"structured_outputs: invalid {params.kind}: {error.strip().splitlines()[0]}")
        if len(self._checked) >= 1024:
            self._checked.clear()
        self._checked.add(spec)
        return spec

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        from llguidance import LLMatcher

        return GrammarMatcher(LLMatcher(self.ll_tokenizer, self.compile(params)), self.vocab_size)

    def fill_bitmasks(self, grammars: list[GrammarMatcher]) -> torch.Tensor:
        """The allowed next tokens of each matcher: int32 [len(grammars), words] on the CPU, bit j of word w =
        token 32·w + j; several at once on llguidance's thread pool, outside the GIL. A broken or complete
        matcher allows only EOS, so its request ends."""
        from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

        mask = torch.empty(len(grammars), (self.vocab_size + 31) // 32, dtype=torch.int32)
        if len(grammars) == 1:
            fill_next_token_bitmask(grammars[0].matcher, mask, 0)
        else:
            if self._executor is None:
                from llguidance import LLExecutor

                self._executor = LLExecutor()
            fill_next_token_bitmask_par(self._executor, [(g.matcher, i) for i, g in enumerate(grammars)], mask)
        return mask


class GrammarMatcher:
    """The state of one request's grammar, advanced by its output tokens (its masks: ``fill_bitmasks``)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.consumed = 0  # output tokens already given to the matcher

    def advance(self, output_token_ids: list[int]) -> None:
        """Consume the output tokens sampled since the last call (all of them after a preemption)."""
        m = self.matcher
        while self.consumed < len(output_token_ids):
            tok = output_token_ids[self.consumed]
            self.consumed += 1
            if m.is_stopped() or m.is_error():
                continue  # complete (only EOS may follow; ignore_eos keeps sampling it) or broken
            if not m.consume_token(tok):
                logger.warning("structured output: the grammar refused token %d: %s", tok, m.get_error())

def apply_bitmasks(logits: torch.Tensor, rows: list[int], masks: list[torch.Tensor]) -> None:
    """Set to -inf, in place, every logit of ``rows`` whose token the matching bitmask does not allow."""
    words = torch.stack(masks).to(logits.device, non_blocking=True)  # [r, num_words] int32
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]
    idx = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
