"""The OpenAI-compatible routes over an ``AsyncEngine``: completions, chat completions (both streamed as
Server-Sent Events or not), models, tokenize and detokenize."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web

from pagedserve.runtime.async_engine import AsyncEngine, DrainingError, EngineDeadError, QueueFullError
from pagedserve.runtime.openai_format import (
    SSE_DONE,
    ChoiceAccumulator,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    sse,
    usage,
)
from pagedserve.runtime.openai_protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    invalid,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_json_object,
    parse_tokenize_request,
)
from pagedserve.runtime.request_stream import RequestChunk, RequestStream
from pagedserve.runtime.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve.server")

# Keys of per-request storage (typed keys where aiohttp has them, >= 3.13).
_Key = getattr(web, "RequestKey", None)
REQUEST_ID = _Key("request_id", str) if _Key else "request_id"  # ours or the client's X-Request-Id
ENGINE_REQUEST_ID = _Key("engine_request_id", str) if _Key else "engine_request_id"  # unique in the engine
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
_LONG_TEXT = 16384  # characters: tokenize off the event loop beyond this


def _param_of(message: str) -> str | None:
    head = message.split(":", 1)[0]
    return head if head.isidentifier() else None


def engine_error(exc: BaseException) -> APIError | None:
    """The HTTP error for an exception of the engine front end (None: not one of ours)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, DrainingError):
        return APIError(503, str(exc), code="draining")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    return None


class _Merged:
    """Chunks of several request streams (the prompts of one completions call) as they come."""

    def __init__(self, streams: list[RequestStream]) -> None:
        self.streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)] if len(streams) > 1 else []
        self._left = len(streams)

    async def _pump(self, i: int, stream: RequestStream) -> None:
        try:
            async for chunk in stream:
                self._queue.put_nowait((i, chunk))
        except BaseException as e:  # noqa: BLE001 - handed to the reader, who re-raises it
            self._queue.put_nowait((i, e))
        finally:
            self._queue.put_nowait((i, None))

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestChunk]:
        if not self._tasks:
            return 0, await self.streams[0].__anext__()
        while self._left:
            i, item = await self._queue.get()
            if item is None:
                self._left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return i, item
        raise StopAsyncIteration

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for s in self.streams:
            s.close()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str], model_path: str) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.vocab_size
        self.names = list(served_model_names)
        self.model_path = model_path
        self.texts = TokenTexts(self.tokenizer)
        self.created = int(time.time())

    # ----------------------------------------------------------------------------- helpers
    def _model(self, requested: str | None) -> str:
        if requested is None or requested == "":
            return self.names[0]
        if requested not in self.names:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                           f"{', '.join(self.names)}", param="model", code="model_not_found")
        return requested

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > _LONG_TEXT:
            return await asyncio.to_thread(self._encode, text, add_special_tokens)
        return self._encode(text, add_special_tokens)

    def _render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("messages: this model has no chat template; use /v1/completions", "messages")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja errors (e.g. a template that raises on role order) are the request's
            raise invalid(f"messages: the model's chat template refused them: {e}", "messages") from None

    def _max_tokens(self, requested: int | None, default: int | None, prompt_len: int, prompt_param: str) -> int:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise invalid(
                f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} "
                f"tokens (at least one must remain for the output). Please shorten the prompt.", prompt_param)
        room = self.engine.max_request_tokens - prompt_len
        if requested is None:
            if room < 1:
                raise invalid(
                    f"The prompt has {prompt_len} tokens but this server's KV cache holds only "
                    f"{self.engine.max_request_tokens} tokens per request. Please shorten the prompt.", prompt_param)
            return room if default is None else min(default, room)
        if prompt_len + requested > limit:
            raise invalid(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
                f"Please reduce the prompt or max_tokens.", "max_tokens")
        return requested

    @staticmethod
    def _params(req: GenerationRequest, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(n=req.n, max_tokens=max_tokens, logprobs=req.logprobs, **req.sampling)
        except ValueError as e:
            raise invalid(str(e), _param_of(str(e))) from None

    async def _submit(self, request: web.Request, prepared: list[tuple[str | None, list[int], SamplingParams]],
                      priority: int) -> tuple[str, list[RequestStream]]:
        rid = request[ENGINE_REQUEST_ID]
        arrival = time.monotonic()
        # All prompts are admitted together (one engine-loop round trip, not one per prompt); if any is
        # refused, the others are aborted and the whole request fails.
        results = await asyncio.gather(*(
            self.engine.add_request(rid if len(prepared) == 1 else f"{rid}-{i}", text, ids, params, priority, arrival)
            for i, (text, ids, params) in enumerate(prepared)
        ), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if isinstance(r, RequestStream):
                    r.close()
            if isinstance(errors[0], ValueError):
                raise invalid(str(errors[0]), _param_of(str(errors[0]))) from None
            raise errors[0]
        return rid, list(results)

    # ----------------------------------------------------------------------------- completions
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_json_object(await request.read())
        req: CompletionRequest = parse_completion_request(body, self.vocab_size)
        model = self._model(req.model)
        prepared = []
        for p in req.prompts:
            ids = await self._tokenize(p, req.add_special_tokens) if isinstance(p, str) else list(p)
            text = p if isinstance(p, str) else None
            max_tokens = self._max_tokens(req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, len(ids), "prompt")
            prepared.append((text, ids, self._params(req, max_tokens)))
        echo_texts = [(t if t is not None else self.tokenizer.decode(ids)) if req.echo else ""
                      for t, ids, _ in prepared]
        self._log_start(request, "completion", req, prepared)
        rid, streams = await self._submit(request, prepared, req.priority)
        merged = _Merged(streams)
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model}
        prompt_tokens = sum(len(ids) for _, ids, _ in prepared)
        if req.stream:
            return await self._stream_completion(request, req, merged, head, prompt_tokens, echo_texts)
        try:
            accs, cached = await self._collect(merged, len(prepared), req.n)
        finally:
            merged.close()
        choices = []
        for i, per_prompt in enumerate(accs):
            for acc in per_prompt:
                lp = None
                if req.logprobs is not None:
                    lp, _ = completion_logprobs(acc.token_ids, acc.logprobs, self.texts, 0)
                choices.append({"index": i * req.n + acc.index, "text": echo_texts[i] + acc.text, "logprobs": lp,
                                "finish_reason": acc.finish_reason, "stop_reason": acc.stop_reason})
        completion_tokens = sum(len(a.token_ids) for per in accs for a in per)
        self._log_end(request, choices, completion_tokens)
        return web.json_response({**head, "choices": choices,
                                  "usage": usage(prompt_tokens, completion_tokens, cached)})

    async def _collect(self, merged: _Merged, num_prompts: int, n: int):
        accs = [[ChoiceAccumulator(j) for j in range(n)] for _ in range(num_prompts)]
        cached = [0] * num_prompts
        async for i, chunk in merged:
            cached[i] = chunk.num_cached_tokens
            for d in chunk.choices:
                accs[i][d.index].add(d)
        return accs, sum(cached)

    async def _open_sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Request-Id": request[REQUEST_ID],
        })
        await resp.prepare(request)
        return resp

    async def _stream_completion(self, request, req: CompletionRequest, merged: _Merged, head: dict,
                                 prompt_tokens: int, echo_texts: list[str]) -> web.StreamResponse:
        n = req.n
        offsets = [0] * (len(echo_texts) * n)
        tail = {"usage": None} if req.include_usage else {}
        completion_tokens, cached, finish = 0, {}, {}

        async def body(resp):
            nonlocal completion_tokens
            if req.echo:
                await resp.write(sse({**head, "choices": [
                    {"index": i * n + j, "text": echo_texts[i], "logprobs": None, "finish_reason": None}
                    for i in range(len(echo_texts)) for j in range(n)], **tail}))
            async for i, chunk in merged:
                cached[i] = chunk.num_cached_tokens
                choices = []
                for d in chunk.choices:
                    idx = i * n + d.index
                    lp = None
                    if req.logprobs is not None:
                        lp, offsets[idx] = completion_logprobs(d.token_ids, d.logprobs or [], self.texts, offsets[idx])
                    completion_tokens += len(d.token_ids)
                    if d.finish_reason is not None:
                        finish[idx] = d.finish_reason
                    choices.append({"index": idx, "text": d.text, "logprobs": lp,
                                    "finish_reason": d.finish_reason, "stop_reason": d.stop_reason})
                if choices:
                    await resp.write(sse({**head, "choices": choices, **tail}))
            if req.include_usage:
                await resp.write(sse({**head, "choices": [],
                                      "usage": usage(prompt_tokens, completion_tokens, sum(cached.values()))}))

        resp = await self._run_sse(request, merged, body)
        self._log_end(request, [{"finish_reason": f} for f in finish.values()], completion_tokens)
        return resp

    async def _run_sse(self, request, merged: _Merged, body) -> web.StreamResponse:
        """Open the event stream, run ``body``, end with ``[DONE]``; engine errors become an error event."""
        resp = None
        try:
            resp = await self._open_sse(request)
            try:
                await body(resp)
            except ConnectionError:
                raise
            except Exception as e:  # noqa: BLE001 - the status line is gone: report in-band, then end
                err = engine_error(e)
                if err is None:
                    logger.exception("error while streaming")
                    err = APIError(500, f"internal error while streaming: {e!r}")
                await resp.write(sse(err.body()))
            await resp.write(SSE_DONE)
            await resp.write_eof()
        except ConnectionError:
            logger.info("client disconnected mid-stream; request aborted")
        finally:
            merged.close()
        return resp

    # ----------------------------------------------------------------------------- chat
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = parse_json_object(await request.read())
        req: ChatRequest = parse_chat_request(body, self.vocab_size)
        model = self._model(req.model)
        text = self._render_chat(req.messages, req.add_generation_prompt)
        ids = await self._tokenize(text, add_special_tokens=False)
        max_tokens = self._max_tokens(req.max_tokens, None, len(ids), "messages")
        prepared = [(text, ids, self._params(req, max_tokens))]
        self._log_start(request, "chat", req, prepared)
        rid, streams = await self._submit(request, prepared, req.priority)
        merged = _Merged(streams)
        head = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": model}
        if req.stream:
            return await self._stream_chat(request, req, merged, {**head, "object": "chat.completion.chunk"},
                                           len(ids))
        try:
            accs, cached = await self._collect(merged, 1, req.n)
        finally:
            merged.close()
        choices = []
        for acc in accs[0]:
            lp = None
            if req.logprobs is not None:
                lp = chat_logprobs(acc.token_ids, acc.logprobs, req.logprobs, self.texts)
            choices.append({"index": acc.index, "message": {"role": "assistant", "content": acc.text},
                            "logprobs": lp, "finish_reason": acc.finish_reason, "stop_reason": acc.stop_reason})
        completion_tokens = sum(len(a.token_ids) for a in accs[0])
        self._log_end(request, choices, completion_tokens)
        return web.json_response({**head, "choices": choices,
                                  "usage": usage(len(ids), completion_tokens, cached)})

    async def _stream_chat(self, request, req: ChatRequest, merged: _Merged, head: dict,
                           prompt_tokens: int) -> web.StreamResponse:
        tail = {"usage": None} if req.include_usage else {}
        completion_tokens, cached, finish = 0, 0, {}

        async def body(resp):
            nonlocal completion_tokens, cached
            await resp.write(sse({**head, "choices": [
                {"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for j in range(req.n)], **tail}))
            async for _, chunk in merged:
                cached = chunk.num_cached_tokens
                choices = []
                for d in chunk.choices:
                    lp = None
                    if req.logprobs is not None:
                        lp = chat_logprobs(d.token_ids, d.logprobs or [], req.logprobs, self.texts)
                    completion_tokens += len(d.token_ids)
                    if d.finish_reason is not None:
                        finish[d.index] = d.finish_reason
                    delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                    choices.append({"index": d.index, "delta": delta, "logprobs": lp,
                                    "finish_reason": d.finish_reason, "stop_reason": d.stop_reason})
                if choices:
                    await resp.write(sse({**head, "choices": choices, **tail}))
            if req.include_usage:
                await resp.write(sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached)}))

        resp = await self._run_sse(request, merged, body)
        self._log_end(request, [{"finish_reason": f} for f in finish.values()], completion_tokens)
        return resp

    # ----------------------------------------------------------------------------- the small routes
    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "pagedserve",
                "root": self.model_path, "parent": None, "max_model_len": self.engine.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card(n) for n in self.names]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        self._model(name)
        return web.json_response(self._model_card(name))

    async def tokenize(self, request: web.Request) -> web.Response:
        req = parse_tokenize_request(parse_json_object(await request.read()))
        self._model(req.model)
        if req.messages is not None:
            text = self._render_chat(req.messages, req.add_generation_prompt)
        else:
            text = req.prompt
        ids = await self._tokenize(text, req.add_special_tokens)
        return web.json_response({"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        model, tokens = parse_detokenize_request(parse_json_object(await request.read()), self.vocab_size)
        self._model(model)
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    # ----------------------------------------------------------------------------- logs
    @staticmethod
    def _log_start(request, kind: str, req: GenerationRequest, prepared) -> None:
        logger.info(
            "%s request", kind,
            extra={"engine_request_id": request[ENGINE_REQUEST_ID], "prompts": len(prepared),
                   "prompt_tokens": sum(len(ids) for _, ids, _ in prepared), "max_tokens": prepared[0][2].max_tokens,
                   "n": req.n, "stream": req.stream, "user": req.user},
        )

    @staticmethod
    def _log_end(request, choices: list[dict], completion_tokens: int) -> None:
        reasons = sorted({str(c.get("finish_reason")) for c in choices})
        logger.info("%s finished", request.path,
                    extra={"completion_tokens": completion_tokens, "finish_reasons": ",".join(reasons)})


def new_engine_request_id(client_request_id: str | None) -> str:
    """Engine ids must be unique even when clients reuse theirs: ours, or theirs plus a suffix."""
    own = uuid.uuid4().hex
    return own if client_request_id is None else f"{client_request_id}.{own[:8]}"
