"""The autoscaler's view of an LLMDeployment's pods, through Prometheus' HTTP API (PromQL instant queries).

Pods are selected by namespace and pod name: `<name>-tp<degree>-<replicaset hash>-<pod hash>` is what
the operator's Deployments produce, and `namespace`/`pod` are the labels every Kubernetes scrape config
(kubernetes_sd with the usual relabelling, or the Prometheus Operator's PodMonitor) attaches. Only the
serving degree's pods count: during a blue/green switch the new generation's empty pods would dilute
the load the scaler must see.

Staleness: Prometheus answers an instant query with the last sample within its lookback (5 minutes by
default), so a dead scrape still returns a value for a while. `timestamp()` of the series says how old
it is; the policy holds when it is older than its limit.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import aiohttp

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_CACHE = "vllm:kv_cache_usage_perc"


class PrometheusError(Exception):
    """Prometheus could not be asked, or answered with an error."""


@dataclass(frozen=True)
class PodMetrics:
    """What the queries returned; `None` where no series matched."""

    waiting: float | None
    running: float | None
    kv_cache_usage: float | None
    pods_reporting: int
    sample_time: float | None  # Prometheus' time of the oldest newest sample among the pods' queue series
    query_time: float  # Prometheus' own clock when it answered


def pod_selector(namespace: str, name: str, tp: int) -> str:
    """PromQL label matchers for the runtime pods of one LLMDeployment at one TP degree."""
    pod = f"{re.escape(name)}-tp{tp}-[a-z0-9]+-[a-z0-9]+"
    return f'namespace="{namespace}",pod=~"{pod}"'


def queries(selector: str) -> dict[str, str]:
    return {
        "waiting": f"sum(max by (pod) ({WAITING}{{{selector}}}))",
        "running": f"sum(max by (pod) ({RUNNING}{{{selector}}}))",
        "kv_cache_usage": f"avg(max by (pod) ({KV_CACHE}{{{selector}}}))",
        "pods_reporting": f"count(max by (pod) ({WAITING}{{{selector}}}))",
        # The oldest pod's newest sample: one silent pod makes the whole reading stale.
        "sample_time": f"min(max by (pod) (timestamp({WAITING}{{{selector}}})))",
    }


class Prometheus:
    """Instant queries against one Prometheus server. Use as `async with Prometheus(url) as prom:`."""

    def __init__(self, url: str, *, timeout: float = 5.0, session: aiohttp.ClientSession | None = None):
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Prometheus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def query(self, promql: str) -> tuple[float | None, float]:
        """(value of a one-element vector or None when empty, the evaluation time)."""
        try:
            async with self._client().get(f"{self.url}/api/v1/query", params={"query": promql}) as resp:
                body: Any = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise PrometheusError(f"query {promql!r} at {self.url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error", body) if isinstance(body, dict) else body
            raise PrometheusError(f"query {promql!r} at {self.url}: {error}")
        result = body["data"]["result"]
        if body["data"].get("resultType") != "vector":
            raise PrometheusError(f"query {promql!r}: expected a vector, got {body['data'].get('resultType')}")
        if not result:
            return None, 0.0
        timestamp, value = result[0]["value"]
        return float(value), float(timestamp)

    async def pod_metrics(self, namespace: str, name: str, tp: int) -> PodMetrics:
        """Queue depth, running requests and KV-cache use of one LLMDeployment's pods at degree `tp`."""
        asked = queries(pod_selector(namespace, name, tp))
        answers = await asyncio.gather(*(self.query(q) for q in asked.values()))
        values = dict(zip(asked, answers, strict=True))
        query_time = max(t for _, t in answers) or None
        return PodMetrics(
            waiting=values["waiting"][0],
            running=values["running"][0],
            kv_cache_usage=values["kv_cache_usage"][0],
            pods_reporting=int(values["pods_reporting"][0] or 0),
            sample_time=values["sample_time"][0],
            query_time=query_time if query_time is not None else 0.0,
        )
