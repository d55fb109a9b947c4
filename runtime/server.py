"""The HTTP server of one runtime pod: OpenAI routes, probes, metrics, and the lifecycle around them.

The socket opens first and the model loads in the background, so the liveness probe answers during a long
load while readiness stays false. SIGTERM turns readiness false at once, answers new API requests with 503,
lets in-flight ones (streams included) finish for up to ``shutdown_timeout`` seconds, aborts what is left,
and exits 0.

Probes: ``GET /health`` is liveness (process up and the engine loop alive and making progress);
``GET /ready`` is readiness (model loaded, engine serving, not draining).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from pagedserve.runtime.async_engine import AsyncEngine
from pagedserve.runtime.engine import EngineArgs, EngineCore
from pagedserve.runtime.log_setup import request_id_var
from pagedserve.runtime.metrics import CONTENT_TYPE, ServerMetrics
from pagedserve.runtime.openai_protocol import APIError
from pagedserve.runtime.openai_serving import (
    ENGINE_REQUEST_ID,
    REQUEST_ID,
    OpenAIServing,
    engine_error,
    new_engine_request_id,
)

logger = logging.getLogger("pagedserve.server")
access_logger = logging.getLogger("pagedserve.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_API_PATHS = ("/tokenize", "/detokenize")
_REJECT_REASONS = {400: "invalid", 401: "unauthorized", 404: "not_found", 405: "invalid", 413: "too_large",
                   429: "queue_full", 503: "unavailable"}


@dataclass
class ServerConfig:
    model: str
    served_model_names: list[str] | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    engine_kwargs: dict = field(default_factory=dict)  # EngineArgs fields
    api_key: str | None = None
    max_waiting_requests: int = 0  # 0: no limit
    shutdown_timeout: float = 30.0
    max_request_body_bytes: int = 16 << 20
    engine_hang_timeout: float = 60.0
    debug_step_delay: float = 0.0  # tests only: sleep after every engine step
    # Run the engine core in a process of its own, so HTTP and streaming never take the GIL from it (vLLM v1's
    # layout); off: on a thread of this process. Off by default until a GPU run shows it pays (bench_serve_gpu.py).
    engine_process: bool = False

    @property
    def names(self) -> list[str]:
        return list(self.served_model_names or [self.model])


def _package_version() -> str:
    try:
        return importlib.metadata.version("pagedserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


async def _in_daemon_thread(fn: Callable):
    """Run ``fn`` in a daemon thread (a model load must not keep a stopping process alive)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, exc):
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(result)

    def run():
        try:
            result, exc = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:
            pass  # the loop is gone: the server stopped while loading

    threading.Thread(target=run, name="model-loader", daemon=True).start()
    return await fut


class Server:
    def __init__(self, config: ServerConfig, core: EngineCore | None = None) -> None:
        self.config = config
        self.names = config.names
        self.metrics = ServerMetrics(self.names[0])
        self.engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.state = "loading"  # loading -> serving -> draining; or failed
        self.load_error: BaseException | None = None
        self.in_flight = 0
        self._no_in_flight = asyncio.Event()
        self._no_in_flight.set()
        self.fatal = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self._core = core
        self.engine_process = None  # the engine process while it loads and serves (when there is one)
        self.metrics.bind(None, self._state_gauges, {})
        self.app = self._build_app()

    # ----------------------------------------------------------------------------- app
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.config.max_request_body_bytes)
        r = app.router
        r.add_post("/v1/completions", self._api("completions"))
        r.add_post("/v1/chat/completions", self._api("chat"))
        r.add_get("/v1/models", self._api("models"))
        r.add_get("/v1/models/{model}", self._api("model"))
        r.add_post("/tokenize", self._api("tokenize"))
        r.add_post("/detokenize", self._api("detokenize"))
        r.add_get("/health", self._health)
        r.add_get("/ready", self._ready)
        r.add_get("/metrics", self._metrics)
        r.add_get("/version", self._version)
        r.add_get("/stats", self._stats)
        return app

    def _api(self, name: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await getattr(self.serving, name)(request)

        return handler

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        header = request.headers.get("X-Request-Id")
        client_rid = header if header and _REQUEST_ID.match(header) else None
        rid = client_rid or uuid.uuid4().hex
        request[REQUEST_ID] = rid
        request[ENGINE_REQUEST_ID] = rid if client_rid is None else new_engine_request_id(client_rid)
        token = request_id_var.set(rid)
        path = request.path
        api = path.startswith("/v1/") or path == "/v1" or path in _API_PATHS
        resource = request.match_info.route.resource
        route = getattr(resource, "canonical", None) or "unmatched"
        t0 = time.monotonic()
        status = 500
        if api:
            self._enter()
        try:
            try:
                if path.startswith("/v1"):
                    self._authorize(request)
                if api:
                    self._check_serving()
                resp = await handler(request)
            except asyncio.CancelledError:
                status = 499  # the client went away; its requests were aborted on the way out
                raise
            except web.HTTPException as e:
                resp = self._error(self._http_error(e, request))
            except Exception as e:  # noqa: BLE001 - whatever happens, the client gets an OpenAI error body
                err = engine_error(e)
                if err is None:
                    logger.exception("unhandled error in %s %s", request.method, path)
                    err = APIError(500, f"internal server error: {type(e).__name__}")
                resp = self._error(err)
            if not resp.prepared:
                resp.headers["X-Request-Id"] = rid
            status = resp.status
            return resp
        finally:
            if api:
                self._leave()
                if status in _REJECT_REASONS:
                    self.metrics.on_rejected(_REJECT_REASONS[status])
            self.metrics.on_http(route, status)
            access_logger.info(
                "%s %s %d", request.method, path, status,
                extra={"duration_ms": round((time.monotonic() - t0) * 1000, 1), "remote": request.remote},
            )
            request_id_var.reset(token)

    def _http_error(self, e: web.HTTPException, request: web.Request) -> APIError:
        if e.status == 413:
            return APIError(413, f"the request body is larger than the limit of {self.config.max_request_body_bytes} "
                                 f"bytes", code="request_too_large")
        if e.status == 404:
            return APIError(404, f"no such route: {request.method} {request.path}", code="route_not_found")
        if e.status == 405:
            return APIError(405, f"method {request.method} is not allowed on {request.path}")
        return APIError(e.status, e.reason or "HTTP error")

    @staticmethod
    def _error(err: APIError) -> web.Response:
        return web.json_response(err.body(), status=err.status)

    def _authorize(self, request: web.Request) -> None:
        key = self.config.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _check_serving(self) -> None:
        if self.state == "draining":
            raise APIError(503, "the server is shutting down; retry on another replica", code="draining")
        if self.engine is None:
            msg = "the model failed to load" if self.load_error else "the model is still loading"
            raise APIError(503, msg, code="not_ready")
        alive, reason = self.engine.liveness()
        if not alive:
            raise APIError(503, f"the engine is not serving: {reason}", code="engine_dead")

    def _enter(self) -> None:
        self.in_flight += 1
        self._no_in_flight.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._no_in_flight.set()

    # ----------------------------------------------------------------------------- probes and friends
    async def _health(self, request: web.Request) -> web.Response:
        if self.load_error is not None:
            return web.json_response({"status": "failed", "reason": repr(self.load_error)}, status=503)
        if self.engine is None:
            return web.json_response({"status": "loading"})
        alive, reason = self.engine.liveness()
        return web.json_response(
            {"status": "ok" if alive else "unhealthy", "reason": reason,
             "engine_heartbeat_age_s": round(self.engine.heartbeat_age(), 3)},
            status=200 if alive else 503,
        )

    def is_ready(self) -> tuple[bool, str]:
        if self.state != "serving":
            return False, self.state
        alive, reason = self.engine.liveness()
        return alive, "ready" if alive else reason

    async def _ready(self, request: web.Request) -> web.Response:
        ready, reason = self.is_ready()
        return web.json_response({"ready": ready, "status": reason}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": _package_version()})

    async def _stats(self, request: web.Request) -> web.Response:
        """Engine statistics as JSON (debugging and tests; the same numbers are in /metrics)."""
        out = {"state": self.state, "http_in_flight": self.in_flight}
        if self.engine is not None:
            out.update(vars(self.engine.stats))
            out["streams_in_flight"] = self.engine.num_in_flight
        return web.json_response(out)

    def _state_gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "pagedserve_ready": ("1 while /ready answers 200.", 1.0 if self.is_ready()[0] else 0.0),
            "pagedserve_draining": ("1 while shutting down.", 1.0 if self.state == "draining" else 0.0),
            "pagedserve_http_requests_in_flight": ("API requests being answered.", float(self.in_flight)),
        }

    # ----------------------------------------------------------------------------- lifecycle
    async def start_engine(self) -> None:
        cfg = self.config
        try:
            if self._core is None and cfg.engine_process:
                from pagedserve.runtime.engine_process import EngineProcess

                # Started here, on the event loop, so a stop while it loads always finds it (run_server).
                proc = self.engine_process = EngineProcess(
                    EngineArgs.from_kwargs(cfg.model, **cfg.engine_kwargs),
                    max_waiting_requests=cfg.max_waiting_requests, step_delay_s=cfg.debug_step_delay)
                engine = await _in_daemon_thread(lambda: self._wait_engine_process(proc))
            else:
                core = self._core or await _in_daemon_thread(
                    lambda: EngineCore(EngineArgs.from_kwargs(cfg.model, **cfg.engine_kwargs))
                )
                engine = AsyncEngine(
                    core, max_waiting_requests=cfg.max_waiting_requests, listener=self.metrics,
                    hang_timeout_s=cfg.engine_hang_timeout, step_delay_s=cfg.debug_step_delay,
                )
        except Exception as e:  # noqa: BLE001 - reported, then the process exits non-zero
            self.load_error, self.state = e, "failed"
            logger.error("the model failed to load: %s", e)
            self.fatal.set()
            return
        self.engine = engine
        self.engine.start()
        self.serving = OpenAIServing(self.engine, self.names, cfg.model)
        info = engine.info
        cache_info = {
            "block_size": info.block_size, "num_gpu_blocks": info.num_blocks,
            "enable_prefix_caching": info.enable_prefix_caching,
            "gpu_memory_utilization": info.gpu_memory_utilization,
            "cache_dtype": info.dtype,
        }
        self.metrics.bind(self.engine, self._state_gauges, cache_info)
        self.metrics.load_time.labels(self.names[0]).set(info.load_time_s)
        if self.state == "loading":
            self.state = "serving"
        where = f"engine process pid {engine.process.pid}" if engine.process is not None else "engine thread"
        logger.info(
            "serving %s: model loaded in %.1fs; KV cache %d tokens (%d blocks of %d); max_model_len %d; %s",
            ", ".join(self.names), info.load_time_s, info.kv_cache_tokens, info.num_blocks, info.block_size,
            info.max_model_len, where,
            extra={"load_time_s": round(info.load_time_s, 3), "kv_cache_tokens": info.kv_cache_tokens,
                   "kv_cache_blocks": info.num_blocks, "block_size": info.block_size},
        )

    def _wait_engine_process(self, proc) -> AsyncEngine:
        """(In a loader thread.) Load the tokenizer here while the engine process loads the model; wait for it."""
        from pagedserve.runtime.loader import load_model_source

        cfg = self.config
        try:
            tokenizer = load_model_source(cfg.model).tokenizer
            proc.wait_ready()
        except BaseException:
            proc.shutdown(0.0)
            proc.close()
            raise
        return AsyncEngine(
            process=proc, tokenizer=tokenizer, max_waiting_requests=cfg.max_waiting_requests,
            listener=self.metrics, hang_timeout_s=cfg.engine_hang_timeout,
        )

    async def drain(self, timeout: float) -> None:
        """Readiness off, refuse new API requests, wait for in-flight ones up to ``timeout``, abort the rest."""
        if self.state != "failed":
            self.state = "draining"
        if self.engine is not None:
            self.engine.start_drain()
        logger.info("draining: %d requests in flight, waiting up to %gs", self.in_flight, timeout)
        if not await self._wait_no_in_flight(timeout) and self.engine is not None:
            logger.warning("shutdown timeout: aborting %d requests still in flight", self.in_flight)
            self.engine.abort_all()
            await self._wait_no_in_flight(5.0)
        logger.info("drained")

    async def _wait_no_in_flight(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._no_in_flight.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def request_stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM does); call on the server's event loop."""
        self.stop_event.set()


async def run_server(
    config: ServerConfig,
    *,
    core: EngineCore | None = None,
    install_signal_handlers: bool = True,
    on_started: Callable[[Server], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``Server.request_stop``), drain, and return the exit code."""
    server = Server(config, core)
    server.loop = asyncio.get_running_loop()
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True, backlog=1024)
    await site.start()
    server.port = runner.addresses[0][1]
    logger.info("listening on http://%s:%d", config.host, server.port)
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            server.loop.add_signal_handler(sig, _on_signal, server, sig)
    load = asyncio.create_task(server.start_engine())
    if on_started is not None:
        on_started(server)
    waiters = [asyncio.create_task(server.stop_event.wait()), asyncio.create_task(server.fatal.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    code = 1 if server.fatal.is_set() else 0
    if code == 0:
        await server.drain(config.shutdown_timeout)
    load.cancel()
    await runner.cleanup()
    if server.engine is not None:
        server.engine.shutdown()
    elif server.engine_process is not None:  # stopped while the model was loading: kill the engine (its
        server.engine_process.shutdown(0.0)  # workers follow); the loader thread, woken by that, closes the socket
    logger.info("stopped", extra={"exit_code": code})
    return code


def _on_signal(server: Server, sig: signal.Signals) -> None:
    logger.info("received %s: shutting down gracefully", sig.name)
    server.request_stop()
