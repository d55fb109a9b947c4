"""operator/prometheus.py against a small fake of Prometheus' HTTP API (the real one: see README, Autoscaling).

The fake evaluates nothing: it answers each query from a table keyed by the metric the query reads and
the aggregation it applies, and records the queries so the selectors can be checked.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from pagedserve.operator.prometheus import Prometheus, PrometheusError, pod_selector

NOW = 1_700_000_000.0


class FakePrometheus:
    def __init__(self) -> None:
        self.answers: dict[str, float | None] = {}
        self.queries: list[str] = []
        self.error: str | None = None

    async def handle(self, request: web.Request) -> web.Response:
        query = request.query["query"]
        self.queries.append(query)
        if self.error:
            return web.json_response({"status": "error", "errorType": "bad_data", "error": self.error}, status=400)
        head = re.match(r"(\w+)\(", query).group(1)
        metric = re.search(r"(vllm:\w+)", query).group(1)
        key = f"{head} timestamp" if "timestamp(" in query else f"{head} {metric}"
        value = self.answers.get(key)
        result = [] if value is None else [{"metric": {}, "value": [NOW, str(value)]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})


@pytest_asyncio.fixture()
async def fake() -> AsyncIterator[tuple[FakePrometheus, str]]:
    prom = FakePrometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query", prom.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield prom, f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_reads_the_serving_pods_metrics(fake) -> None:
    prom, url = fake
    prom.answers = {"sum vllm:num_requests_waiting": 7, "sum vllm:num_requests_running": 30,
                    "avg vllm:kv_cache_usage_perc": 0.62, "count vllm:num_requests_waiting": 3,
                    "min timestamp": NOW - 4}
    async with Prometheus(url) as client:
        m = await client.pod_metrics("team-a", "llama", 2)
    assert (m.waiting, m.running, m.kv_cache_usage, m.pods_reporting) == (7, 30, 0.62, 3)
    assert m.query_time - m.sample_time == 4
    selector = 'namespace="team-a",pod=~"llama-tp2-[a-z0-9]+-[a-z0-9]+"'
    assert len(prom.queries) == 5 and all(selector in q for q in prom.queries)


@pytest.mark.asyncio
async def test_missing_series_are_none(fake) -> None:
    prom, url = fake
    prom.answers = {"sum vllm:num_requests_waiting": 0}
    async with Prometheus(url) as client:
        m = await client.pod_metrics("team-a", "llama", 1)
    assert (m.waiting, m.kv_cache_usage, m.pods_reporting, m.sample_time) == (0, None, 0, None)


@pytest.mark.asyncio
async def test_errors_raise(fake) -> None:
    prom, url = fake
    prom.error = "parse error"
    async with Prometheus(url) as client:
        with pytest.raises(PrometheusError, match="parse error"):
            await client.pod_metrics("team-a", "llama", 1)
    async with Prometheus("http://127.0.0.1:9", timeout=1) as client:  # nothing listens on the discard port
        with pytest.raises(PrometheusError, match="127.0.0.1:9"):
            await client.query("up")


def test_selector_matches_only_this_deployments_pods() -> None:
    matcher = re.search(r'pod=~"([^"]+)"', pod_selector("ns", "llama", 1)).group(1)
    pods = {"llama-tp1-5d8f7c9b4-x7k2p": True, "llama-tp2-5d8f7c9b4-x7k2p": False,
            "llama-tp1x-5d8f7c9b4-x7k2p": False, "other-llama-tp1-5d8f7c9b4-x7k2p": False}
    for pod, want in pods.items():
        assert bool(re.fullmatch(matcher, pod)) is want, pod  # PromQL regexes are anchored at both ends
