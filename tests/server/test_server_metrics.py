"""Metrics move as they should under a saturating load and come back to rest; counters equal what the
clients were served; a full waiting queue answers 429."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from server_harness import API_KEY, REPO, InProcessServer, http, make_core

VLLM_METRICS = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:cache_config_info",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
]


@pytest.fixture(scope="module")
def small_server(tiny, one_thread):
    """Two sequences per batch and at most 8 waiting: easy to saturate."""
    core = make_core(tiny[0], max_num_seqs=2, num_kv_cache_tokens=1024)
    server = InProcessServer(tiny[0], core=core, max_waiting_requests=8).start()
    yield server
    server.stop()


def _counters(s) -> dict[str, float]:
    m = s.metrics()

    def total(name, **labels):
        want = set(labels.items())
        return sum(v for (n, lab), v in m.items() if n == name and want <= lab)

    return {
        "prompt": total("vllm:prompt_tokens_total"),
        "generation": total("vllm:generation_tokens_total"),
        "success_length": total("vllm:request_success_total", finished_reason="length"),
        "success_all": total("vllm:request_success_total"),
        "ttft": total("vllm:time_to_first_token_seconds_count"),
        "itl": total("vllm:inter_token_latency_seconds_count"),
        "e2e": total("vllm:e2e_request_latency_seconds_count"),
        "queue": total("vllm:request_queue_time_seconds_count"),
        "req_prompt_sum": total("vllm:request_prompt_tokens_sum"),
        "req_gen_sum": total("vllm:request_generation_tokens_sum"),
        "prefix_queries": total("vllm:prefix_cache_queries_total"),
    }


def test_every_documented_metric_is_exposed_with_the_model_name(small_server, tiny):
    names = {(n, lab) for n, lab in small_server.metrics()}
    for metric in VLLM_METRICS:
        assert any(n == metric and ("model_name", "tiny") in lab for n, lab in names), metric
    info = [dict(lab) for n, lab in names if n == "vllm:cache_config_info"][0]
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "64"
    readme = open(f"{REPO}/README.md").read()
    for metric in VLLM_METRICS + sorted({n for n, _ in names if n.startswith("pagedserve_")}):
        base = metric.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_created")
        base = base.removesuffix("_bucket")
        assert f"`{base}" in readme, f"{base} is not documented in README.md"


def test_saturating_load_moves_the_gauges_and_counters_match_what_was_served(small_server):
    s = small_server
    s.wait_idle_and_free()
    before = _counters(s)
    s.engine.step_delay_s = 0.005
    num, max_tokens = 8, 12
    peaks = {"waiting": 0.0, "running": 0.0, "kv": 0.0}
    done = threading.Event()

    def scrape():
        while not done.is_set():
            m = s.metrics()
            for key, name in (("waiting", "vllm:num_requests_waiting"), ("running", "vllm:num_requests_running"),
                              ("kv", "vllm:kv_cache_usage_perc")):
                peaks[key] = max(peaks[key], m[(name, frozenset({("model_name", "tiny")}))])
            time.sleep(0.005)

    def one(i):
        return s.post("/v1/completions", {"model": "tiny", "prompt": f"The capital of France is {i}",
                                          "max_tokens": max_tokens, "ignore_eos": True})

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        with ThreadPoolExecutor(num) as pool:
            results = list(pool.map(one, range(num)))
    finally:
        done.set()
        scraper.join()
        s.engine.step_delay_s = 0.0
    assert all(status == 200 for status, _ in results), results
    assert peaks["waiting"] > 0 and peaks["kv"] > 0
    assert peaks["running"] == 2  # never more than max_num_seqs

    s.wait_idle_and_free()
    m = s.metrics()
    label = frozenset({("model_name", "tiny")})
    assert m[("vllm:num_requests_waiting", label)] == 0
    assert m[("vllm:num_requests_running", label)] == 0
    assert m[("vllm:kv_cache_usage_perc", label)] == 0
    after = _counters(s)
    served_prompt = sum(body["usage"]["prompt_tokens"] for _, body in results)
    served_gen = sum(body["usage"]["completion_tokens"] for _, body in results)
    assert served_gen == num * max_tokens
    delta = {k: after[k] - before[k] for k in after}
    assert delta["prompt"] == served_prompt == delta["req_prompt_sum"]
    assert delta["generation"] == served_gen == delta["req_gen_sum"]
    assert delta["success_length"] == delta["success_all"] == num
    assert delta["ttft"] == delta["e2e"] == delta["queue"] == num
    assert delta["itl"] == num * (max_tokens - 1)
    assert delta["prefix_queries"] >= served_prompt


async def _hold_streams(base: str, count: int, max_tokens: int):
    session = aiohttp.ClientSession()
    responses = []
    for i in range(count):
        r = await session.post(base + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, json={
            "model": "tiny", "prompt": f"stream {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
        assert r.status == 200
        responses.append(r)
    return session, responses


def test_full_waiting_queue_answers_429_and_recovers(small_server):
    import asyncio

    s = small_server
    s.wait_idle_and_free()
    s.engine.step_delay_s = 0.02
    rejected_before = s.metric("pagedserve_requests_rejected_total", reason="queue_full")

    async def scenario():
        session, streams = await _hold_streams(s.base_url, 10, 200)  # 2 running + 8 waiting
        try:
            for _ in range(200):
                st = await asyncio.to_thread(s.stats)
                if st["num_running"] == 2 and st["num_waiting"] == 8:
                    break
                await asyncio.sleep(0.02)
            assert (st["num_running"], st["num_waiting"]) == (2, 8)
            status, body = await asyncio.to_thread(
                http, "POST", s.url("/v1/completions"), {"model": "tiny", "prompt": "one more", "max_tokens": 2},
                {"Authorization": f"Bearer {API_KEY}"})
            return status, body
        finally:
            for r in streams:
                r.close()
            await session.close()

    try:
        status, body = asyncio.run(scenario())
    finally:
        s.engine.step_delay_s = 0.0
    assert status == 429
    assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
    assert "8 waiting, limit 8" in body["error"]["message"]
    assert s.metric("pagedserve_requests_rejected_total", reason="queue_full") == rejected_before + 1
    s.wait_idle_and_free()  # the 10 dropped streams were aborted and freed their blocks
    status, body = s.post("/v1/completions", {"model": "tiny", "prompt": "again", "max_tokens": 2})
    assert status == 200
