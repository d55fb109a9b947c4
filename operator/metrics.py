"""The operator's own Prometheus metrics and the tiny HTTP server that exposes them."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# A registry of our own: the operator's /metrics shows only operator metrics.
REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "pagedserve_operator_reconcile_total", "Reconcile passes by result (ok, error).", ["result"], registry=REGISTRY
)
RECONCILE_ERRORS = Counter(
    "pagedserve_operator_reconcile_errors_total", "Failed reconcile passes by exception type.", ["error"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "pagedserve_operator_reconcile_duration_seconds", "Duration of one reconcile pass.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
CHILD_WRITES = Counter(
    "pagedserve_operator_child_writes_total", "Children created or updated, by kind and action.", ["kind", "action"],
    registry=REGISTRY,
)
STATUS_WRITES = Counter("pagedserve_operator_status_writes_total", "Status subresource writes.", registry=REGISTRY)
MANAGED = Gauge("pagedserve_operator_llmdeployments", "LLMDeployments with a running reconcile loop.", registry=REGISTRY)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def start_server(host: str, port: int) -> web.AppRunner:
    """Serve GET /metrics (and /healthz) until the returned runner is cleaned up."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
