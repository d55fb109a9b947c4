"""operator/prometheus.py against the real Prometheus the e2e cluster builds (skipped where it is not built).

Prometheus scrapes a small exporter with the runtime's metric names (not the runtime itself: see the
README's Autoscaling section for what the end-to-end test still needs), relabelled with `namespace` and
`pod` as kubernetes_sd would; the queries, aggregation and staleness come from the real PromQL engine.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import socket
import subprocess

import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from pagedserve.operator.prometheus import Prometheus

BINARY = pathlib.Path.home() / ".cache/pagedserve/k8s-v1.37.2/bin/prometheus"
pytestmark = [pytest.mark.asyncio, pytest.mark.skipif(not BINARY.exists(), reason=f"no {BINARY} (make cluster builds it)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def exporter(values: dict[str, float]) -> tuple[web.AppRunner, int]:
    registry = CollectorRegistry()
    gauges = {name: Gauge(name.replace(":", "_"), name, ["model_name"], registry=registry) for name in values}

    async def handler(request: web.Request) -> web.Response:
        for name, gauge in gauges.items():
            gauge.labels("m").set(values[name])
        text = generate_latest(registry).decode()
        for name in values:  # the runtime's names carry a colon, which prometheus_client does not emit
            text = text.replace(name.replace(":", "_"), name)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def test_queries_against_real_prometheus(tmp_path: pathlib.Path) -> None:
    pods = {"llama-tp1-5d8f7c9b4-aaaaa": {"vllm:num_requests_waiting": 3, "vllm:num_requests_running": 10,
                                          "vllm:kv_cache_usage_perc": 0.5},
            "llama-tp1-5d8f7c9b4-bbbbb": {"vllm:num_requests_waiting": 5, "vllm:num_requests_running": 12,
                                          "vllm:kv_cache_usage_perc": 0.7},
            "llama-tp2-6c9d8e7f5-ccccc": {"vllm:num_requests_waiting": 100, "vllm:num_requests_running": 1,
                                          "vllm:kv_cache_usage_perc": 0.0}}  # another degree: must not count
    runners, targets = [], []
    for pod, values in pods.items():
        runner, port = await exporter(values)
        runners.append(runner)
        targets.append({"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": "team-a", "pod": pod}})
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"},
                                  "scrape_configs": [{"job_name": "pods", "static_configs": targets}]}))
    proc = subprocess.Popen([str(BINARY), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with Prometheus(f"http://127.0.0.1:{prom_port}") as client:
            for _ in range(150):
                try:
                    m = await client.pod_metrics("team-a", "llama", 1)
                    other = await client.pod_metrics("team-a", "llama", 2)
                    # Wait until every target has been scraped at least once (they are scraped independently).
                    if m.pods_reporting == 2 and other.pods_reporting == 1:
                        break
                except Exception:
                    pass
                await asyncio.sleep(0.2)
            assert (m.waiting, m.running, m.pods_reporting) == (8, 22, 2)
            assert m.kv_cache_usage == pytest.approx(0.6)
            assert 0 <= m.query_time - m.sample_time < 5
            assert (other.waiting, other.pods_reporting) == (100, 1)
    finally:
        proc.terminate()
        proc.wait(10)
        for runner in runners:
            await runner.cleanup()
