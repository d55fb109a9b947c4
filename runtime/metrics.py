"""Prometheus metrics of the server: vLLM's names for what vLLM users already chart, ``pagedserve_`` extras.

Every metric is labelled ``model_name`` (the first served model name), as vLLM's are, so dashboards, KEDA
triggers and Gateway API Inference Extension endpoint pickers work unchanged. Counters and histograms are
fed by the engine thread through the ``EngineListener`` hooks; gauges and the engine's own cumulative
counters are read from the latest ``EngineStats`` snapshot at scrape time. README.md documents each one.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedserve.runtime.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0, 20.0, 80.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (vLLM's shape for token-count histograms)."""
    out, mag = [], 1
    while True:
        for m in (1, 2, 5):
            if m * mag > max_model_len:
                return out
            out.append(float(m * mag))
        mag *= 10


class ServerMetrics:
    """All metrics of one server, in a registry of their own (several servers may share a process)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, lab = self.registry, ["model_name"]

        def counter(name, doc, labels=()):
            return Counter(name, doc, lab + list(labels), registry=r)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed (once per request).")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated (all choices).")
        self.request_success = counter(
            "vllm:request_success", "Finished engine requests (one per choice), by finish reason.",
            ["finished_reason"],
        )
        self.ttft = hist("vllm:time_to_first_token_seconds", "Arrival to first output token.", _LATENCY_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens of a choice.", _ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to last output token.", _REQUEST_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Arrival to first scheduled.", _REQUEST_BUCKETS)
        tok_buckets = _token_buckets(1_000_000)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt length of finished requests.",
                                          tok_buckets)
        self.request_generation_tokens = hist(
            "vllm:request_generation_tokens", "Generated tokens of finished requests (all choices).", tok_buckets
        )
        self.step_time = hist("pagedserve_engine_step_seconds", "Duration of one engine step.", _STEP_BUCKETS)
        self.rejected = counter(
            "pagedserve_requests_rejected", "Requests refused before reaching the engine, by reason.", ["reason"]
        )
        self.http_requests = counter(
            "pagedserve_http_requests", "HTTP requests answered, by route and status code.", ["route", "code"]
        )
        self.load_time = Gauge("pagedserve_model_load_seconds", "Time to load the model and size the KV cache.",
                               lab, registry=r)
        self._labels = {
            "prompt": self.prompt_tokens.labels(model_name),
            "generation": self.generation_tokens.labels(model_name),
        }
        # Zero-valued series from the start, so rate() and dashboards work before the first event.
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        for reason in ("invalid", "unauthorized", "not_found", "too_large", "queue_full", "unavailable"):
            self.rejected.labels(model_name, reason)
        self._collector = _StateCollector(model_name)
        r.register(self._collector)

    def bind(self, engine: AsyncEngine | None, state: Callable[[], dict[str, float]], cache_info: dict) -> None:
        """Attach the live engine (None while loading), a callable giving server state gauges, and the
        cache configuration for ``vllm:cache_config_info``."""
        self._collector.engine = engine
        self._collector.state = state
        self._collector.cache_info = {k: str(v) for k, v in cache_info.items()}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ----------------------------------------------------------------------------- EngineListener
    def on_step(self, duration_s: float) -> None:
        self.step_time.observe(duration_s)

    def on_first_token(self, ttft_s: float, queue_time_s: float | None, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        if queue_time_s is not None:
            self.queue_time.observe(queue_time_s)
        self._labels["prompt"].inc(num_prompt_tokens)

    def on_tokens(self, num_tokens: int, inter_token_s: float | None) -> None:
        self._labels["generation"].inc(num_tokens)
        if inter_token_s is not None:
            for _ in range(num_tokens):
                self.itl.observe(inter_token_s)

    def on_finish(
        self, finish_reasons: list[str], e2e_s: float | None, num_prompt_tokens: int, num_generation_tokens: int
    ) -> None:
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason or "unknown").inc()
        if e2e_s is not None:  # aborted requests count above but would skew the latency histograms
            self.e2e.observe(e2e_s)
            self.request_prompt_tokens.observe(num_prompt_tokens)
            self.request_generation_tokens.observe(num_generation_tokens)

    # ----------------------------------------------------------------------------- server events
    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def on_http(self, route: str, code: int) -> None:
        self.http_requests.labels(self.model_name, route, str(code)).inc()


class _StateCollector:
    """Gauges and engine-owned counters, read from the engine's latest snapshot at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.engine: AsyncEngine | None = None
        self.state: Callable[[], dict[str, float]] = dict
        self.cache_info: dict[str, str] = {}

    def describe(self):
        return []

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([self.model_name], value)
        return c

    def _spec_decode(self, sd: dict):
        """vLLM's speculative-decoding counters; acceptance rate = accepted / draft tokens in PromQL."""
        yield self._counter("vllm:spec_decode_num_drafts", "Verifications of draft tokens (one per request "
                            "and step that had drafts).", sd["spec_decode_num_drafts"])
        yield self._counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                            sd["spec_decode_num_draft_tokens"])
        yield self._counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                            sd["spec_decode_num_accepted_tokens"])
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.",
                                      labels=["model_name", "position"])
        for pos, n in enumerate(sd["spec_decode_num_accepted_tokens_per_pos"]):
            per_pos.add_metric([self.model_name, str(pos)], n)
        yield per_pos

    def collect(self):
        for name, (doc, value) in self.state().items():
            yield self._gauge(name, doc, value)
        engine = self.engine
        if engine is None:
            return
        s = engine.stats
        yield self._gauge("vllm:num_requests_running", "Engine requests in the running batch.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Engine requests waiting to be scheduled.", s.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                          s.kv_cache_usage)
        info = GaugeMetricFamily("vllm:cache_config_info", "KV-cache configuration (value is always 1).",
                                 labels=["model_name", *self.cache_info])
        info.add_metric([self.model_name, *self.cache_info.values()], 1.0)
        yield info
        yield self._counter("vllm:prefix_cache_queries", "Tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Tokens found in the prefix cache.", s.prefix_cache_hits)
        yield self._counter("vllm:num_preemptions", "Requests preempted (recomputed later).", s.num_preemptions)
        if s.spec_decode:
            yield from self._spec_decode(s.spec_decode)
        yield self._gauge("pagedserve_kv_cache_blocks", "KV-cache blocks in the pool.", s.num_blocks)
        yield self._gauge("pagedserve_kv_cache_free_blocks", "KV-cache blocks free (cached ones included).",
                          s.num_free_blocks)
        yield self._gauge("pagedserve_engine_requests", "Requests (n choices count once) in the engine.",
                          s.num_requests)
        yield self._counter("pagedserve_engine_steps", "Engine steps run.", s.num_steps)
        yield self._gauge("pagedserve_engine_heartbeat_age_seconds",
                          "Seconds since the engine loop last showed progress.", engine.heartbeat_age())
        yield self._gauge("pagedserve_engine_alive", "1 while the engine loop is alive and making progress.",
                          1.0 if engine.liveness()[0] else 0.0)
