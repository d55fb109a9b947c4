"""OpenAI API requests: parsing and validation into plain dataclasses (no I/O, no engine).

Every problem becomes an ``APIError`` carrying the HTTP status and OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``); messages name the parameter and what was wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pagedserve.runtime.structured_outputs import StructuredOutputsParams

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128
MAX_CHOICES_PER_REQUEST = 1024  # prompts x n
MAX_STOP_STRINGS = 32
MAX_LOGPROBS = 20


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise invalid(f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


class Fields:
    """Typed access to a request's fields; ``null`` means "not given". Remembers which names were read."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.read: set[str] = set()

    def raw(self, name: str) -> Any:
        self.read.add(name)
        return self.body.get(name)

    def integer(self, name: str, default: int | None, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int | None:
        v = self.raw(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise invalid(f"{name}: must be an integer, got {_short(v)}", name)
        if not lo <= v <= hi:
            raise invalid(f"{name}: must be in [{lo}, {hi}], got {_short(v)}", name)
        return v

    def number(self, name: str, default: float | None, lo: float, hi: float,
               lo_open: bool = False) -> float | None:
        v = self.raw(name)
        if v is None:
            return default
        if not isinstance(v, int | float) or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
            raise invalid(f"{name}: must be a finite number, got {_short(v)}", name)
        if not (lo < v if lo_open else lo <= v) or v > hi:
            raise invalid(f"{name}: must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {_short(v)}", name)
        return float(v)

    def boolean(self, name: str, default: bool) -> bool:
        v = self.raw(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise invalid(f"{name}: must be true or false, got {_short(v)}", name)
        return v

    def string(self, name: str, default: str | None, max_len: int = 1 << 16) -> str | None:
        v = self.raw(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise invalid(f"{name}: must be a string, got {_short(v)}", name)
        if len(v) > max_len:
            raise invalid(f"{name}: must be at most {max_len} characters, got {len(v)}", name)
        return v

    def check_unknown(self, ignored: frozenset[str] = frozenset()) -> None:
        unknown = sorted(set(self.body) - self.read - ignored)
        if unknown:
            raise invalid(f"unrecognized request argument(s): {', '.join(_short(k) for k in unknown[:5])}",
                          str(unknown[0])[:100])


def token_id_list(v: Any, name: str, vocab_size: int, allow_empty: bool = False) -> list[int]:
    if not isinstance(v, list) or (not v and not allow_empty):
        raise invalid(f"{name}: must be a non-empty list of token ids", name)
    for t in v:
        if not isinstance(t, int) or isinstance(t, bool):
            raise invalid(f"{name}: token ids must be integers, got {_short(t)}", name)
        if not 0 <= t < vocab_size:
            raise invalid(f"{name}: token id {_short(t)} is outside the vocabulary [0, {vocab_size})", name)
    return v


@dataclass(kw_only=True)
class GenerationRequest:
    """What completions and chat share: the model, how many choices, how to stream, how to sample."""

    model: str | None
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    logprobs: int | None  # how many top logprobs per token; None: no logprobs
    priority: int
    user: str | None
    sampling: dict[str, Any] = field(default_factory=dict)  # further SamplingParams keyword arguments


@dataclass(kw_only=True)
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]]
    echo: bool
    add_special_tokens: bool


@dataclass(kw_only=True)
class ChatRequest(GenerationRequest):
    messages: list[dict[str, str]]
    add_generation_prompt: bool
    top_logprobs_requested: bool


# Accepted and ignored: they change nothing about what this server does.
_IGNORED_COMMON = frozenset({
    "metadata", "store", "service_tier", "spaces_between_special_tokens", "prompt_cache_key",
    "prompt_cache_retention", "safety_identifier",
})


def _stop(f: Fields) -> list[str]:
    v = f.raw("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"stop: must be a string or a list of strings, got {_short(v)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if any(not s or len(s) > 1000 for s in stops):
        raise invalid("stop: each stop string must have 1 to 1000 characters", "stop")
    return stops


def _logit_bias(f: Fields, vocab_size: int) -> dict[int, float] | None:
    v = f.raw("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise invalid(f"logit_bias: must be an object mapping token ids to numbers, got {_short(v)}", "logit_bias")
    out: dict[int, float] = {}
    for k, b in v.items():
        try:
            tid = int(k)
        except ValueError:
            raise invalid(f"logit_bias: key {_short(k)} is not a token id", "logit_bias") from None
        if not 0 <= tid < vocab_size:
            raise invalid(f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        if not isinstance(b, int | float) or isinstance(b, bool) or not -100 <= b <= 100:
            raise invalid(f"logit_bias: bias for token {tid} must be a number in [-100, 100], got {_short(b)}",
                          "logit_bias")
        out[tid] = float(b)
    return out


def _stream_options(f: Fields, stream: bool) -> bool:
    v = f.raw("stream_options")
    if v is None:
        return False
    if not stream:
        raise invalid("stream_options: only allowed when stream is true", "stream_options")
    if not isinstance(v, dict):
        raise invalid(f"stream_options: must be an object, got {_short(v)}", "stream_options")
    sub = Fields(v)
    include = sub.boolean("include_usage", False)
    sub.boolean("continuous_usage_stats", False)
    sub.check_unknown()
    return include


def _structured_outputs(f: Fields) -> dict | None:
    """vLLM's ``structured_outputs`` or OpenAI's ``response_format`` (json_object, json_schema) as the fields of a
    ``StructuredOutputsParams``; whether the grammar compiles is the engine's check (also a 400)."""
    fmt = f.raw("response_format")
    spec = None
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            spec = {"json_object": True}
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise invalid("response_format: json_schema.schema must be a JSON schema object", "response_format")
            spec = {"json": js["schema"]}
        elif kind != "text":
            raise invalid(f"response_format: type must be text, json_object or json_schema, got {_short(fmt)}",
                          "response_format")
    so = f.raw("structured_outputs")
    if so is not None:
        if spec is not None:
            raise invalid("structured_outputs: cannot be combined with a json response_format", "structured_outputs")
        if not isinstance(so, dict):
            raise invalid(f"structured_outputs: must be an object, got {_short(so)}", "structured_outputs")
        spec = dict(so)
    if spec is not None:
        try:
            StructuredOutputsParams.from_value(spec)
        except (ValueError, TypeError) as e:
            raise invalid(str(e), "response_format" if so is None else "structured_outputs") from None
    return spec


def _common(f: Fields, vocab_size: int, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    stream = f.boolean("stream", False)
    n = f.integer("n", 1, 1, MAX_N)
    best_of = f.integer("best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise invalid("best_of: only best_of == n is supported", "best_of")
    stop_token_ids = f.raw("stop_token_ids")
    sampling = dict(
        temperature=f.number("temperature", 1.0, 0.0, 100.0),
        top_p=f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=f.integer("top_k", 0, -1, 1 << 30),
        min_p=f.number("min_p", 0.0, 0.0, 1.0),
        presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=f.number("repetition_penalty", 1.0, 0.0, 2.0, lo_open=True),
        seed=f.integer("seed", None),
        min_tokens=f.integer("min_tokens", 0, 0, 1 << 30),
        stop=_stop(f),
        stop_token_ids=None if stop_token_ids is None else token_id_list(
            stop_token_ids, "stop_token_ids", vocab_size, allow_empty=True),
        ignore_eos=f.boolean("ignore_eos", False),
        logit_bias=_logit_bias(f, vocab_size),
        skip_special_tokens=f.boolean("skip_special_tokens", True),
        include_stop_str_in_output=f.boolean("include_stop_str_in_output", False),
        structured_outputs=_structured_outputs(f),
    )
    if max_tokens is not None and sampling["min_tokens"] > max_tokens:
        raise invalid(f"min_tokens: must be <= max_tokens ({max_tokens}), got {sampling['min_tokens']}",
                      "min_tokens")
    return dict(
        model=f.string("model", None, 512), n=n, stream=stream, include_usage=_stream_options(f, stream),
        max_tokens=max_tokens, logprobs=logprobs, priority=f.integer("priority", 0),
        user=f.string("user", None, 512), sampling=sampling,
    )


def _prompts(v: Any, vocab_size: int) -> list[str | list[int]]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(p, str) for p in v):
            return list(v)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return [token_id_list(v, "prompt", vocab_size)]
        if all(isinstance(p, list) for p in v):
            return [token_id_list(p, "prompt", vocab_size) for p in v]
    raise invalid("prompt: must be a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")


def parse_completion_request(body: dict, vocab_size: int) -> CompletionRequest:
    f = Fields(body)
    if f.raw("prompt") is None:
        raise invalid("prompt: is required", "prompt")
    prompts = _prompts(body["prompt"], vocab_size)
    if f.raw("suffix") not in (None, ""):
        raise invalid("suffix: is not supported", "suffix")
    max_tokens = f.integer("max_tokens", None, 1, 1 << 30)
    logprobs = f.integer("logprobs", None, 0, MAX_LOGPROBS)
    echo = f.boolean("echo", False)
    if echo and logprobs is not None:
        raise invalid("echo: cannot be combined with logprobs on this server", "echo")
    common = _common(f, vocab_size, max_tokens, logprobs)
    if len(prompts) * common["n"] > MAX_CHOICES_PER_REQUEST:
        raise invalid(f"prompt: {len(prompts)} prompts x n={common['n']} exceeds "
                      f"{MAX_CHOICES_PER_REQUEST} choices per request", "prompt")
    add_special = f.boolean("add_special_tokens", True)
    f.check_unknown(_IGNORED_COMMON)
    return CompletionRequest(prompts=prompts, echo=echo, add_special_tokens=add_special, **common)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _message(i: int, m: Any) -> dict[str, str]:
    name = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(f"{name}: must be an object with 'role' and 'content'", "messages")
    role = m.get("role")
    if role not in _ROLES:
        raise invalid(f"{name}.role: must be one of {', '.join(_ROLES)}, got {_short(role)}", "messages")
    if m.get("tool_calls") or m.get("function_call"):
        raise invalid(f"{name}: tool calls are not supported", "messages")
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{name}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                              "messages")
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise invalid(f"{name}.content: must be a string or a list of text parts, got {_short(content)}",
                      "messages")
    out = {"role": "system" if role == "developer" else role, "content": content}
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def parse_chat_request(body: dict, vocab_size: int) -> ChatRequest:
    f = Fields(body)
    messages = f.raw("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: must be a non-empty list of messages", "messages")
    msgs = [_message(i, m) for i, m in enumerate(messages)]
    for name in ("tools", "functions", "function_call"):
        if f.raw(name):
            raise invalid(f"{name}: tool and function calling are not supported", name)
    if f.raw("tool_choice") not in (None, "none", "auto"):
        raise invalid("tool_choice: tool calling is not supported", "tool_choice")
    f.raw("parallel_tool_calls")
    mct = f.integer("max_completion_tokens", None, 1, 1 << 30)
    mt = f.integer("max_tokens", None, 1, 1 << 30)
    max_tokens = mct if mct is not None else mt
    want_logprobs = f.boolean("logprobs", False)
    top = f.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs: requires logprobs to be true", "top_logprobs")
    common = _common(f, vocab_size, max_tokens, (top or 0) if want_logprobs else None)
    add_generation_prompt = f.boolean("add_generation_prompt", True)
    f.check_unknown(_IGNORED_COMMON | {"modalities"})
    return ChatRequest(messages=msgs, add_generation_prompt=add_generation_prompt,
                       top_logprobs_requested=top is not None, **common)


@dataclass
class TokenizeRequest:
    model: str | None
    prompt: str | None
    messages: list[dict[str, str]] | None
    add_special_tokens: bool
    add_generation_prompt: bool


def parse_tokenize_request(body: dict) -> TokenizeRequest:
    f = Fields(body)
    prompt = f.string("prompt", None, 1 << 24)
    raw_messages = f.raw("messages")
    if (prompt is None) == (raw_messages is None):
        raise invalid("give exactly one of 'prompt' (a string) or 'messages'", "prompt")
    messages = None
    if raw_messages is not None:
        if not isinstance(raw_messages, list) or not raw_messages:
            raise invalid("messages: must be a non-empty list of messages", "messages")
        messages = [_message(i, m) for i, m in enumerate(raw_messages)]
    req = TokenizeRequest(
        f.string("model", None, 512), prompt, messages,
        f.boolean("add_special_tokens", messages is None), f.boolean("add_generation_prompt", True),
    )
    f.check_unknown()
    return req


def parse_detokenize_request(body: dict, vocab_size: int) -> tuple[str | None, list[int]]:
    f = Fields(body)
    model = f.string("model", None, 512)
    tokens = token_id_list(f.raw("tokens"), "tokens", vocab_size, allow_empty=True)
    f.check_unknown()
    return model, tokens
