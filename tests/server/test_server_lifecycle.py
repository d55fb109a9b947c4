"""Lifecycle: graceful drain on SIGTERM (a real subprocess), client disconnects, a dead or hung engine loop,
loading, a failed load, and the shutdown timeout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import aiohttp
import pytest
import tiny_models
from server_harness import API_KEY, InProcessServer, SubprocessServer, assert_engine_dead, make_core

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def _read_stream(resp: aiohttp.ClientResponse) -> tuple[str, str | None, int | None, bool]:
    """(text, finish_reason, completion_tokens from usage, saw [DONE])."""
    text, finish, tokens, done = "", None, None, False
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            done = True
            continue
        obj = json.loads(line[6:])
        assert "error" not in obj, obj
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
        for c in obj["choices"]:
            text += c["text"]
            finish = c["finish_reason"] or finish
    return text, finish, tokens, done


def test_sigterm_drains_streams_refuses_new_requests_and_exits_0(tiny, tmp_path):
    max_tokens = 80
    server = SubprocessServer(tiny[0], "--num-kv-cache-tokens", "4096", "--max-model-len", "256",
                              "--shutdown-timeout", "60", "--debug-step-delay", "0.02",
                              log_path=str(tmp_path / "server.log"))
    try:
        server.wait_ready()

        async def scenario():
            async with aiohttp.ClientSession() as session:
                body = {"model": "tiny", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                streams = [await session.post(server.url("/v1/completions"), json={**body, "prompt": f"request {i}"})
                           for i in range(8)]
                assert [r.status for r in streams] == [200] * 8
                firsts = [await r.content.readline() for r in streams]  # every stream has started
                assert all(f.startswith(b"data: ") for f in firsts)
                server.terminate()
                for _ in range(200):
                    async with session.get(server.url("/ready")) as r:
                        if r.status == 503:
                            break
                    await asyncio.sleep(0.01)
                assert r.status == 503
                async with session.post(server.url("/v1/completions"),
                                        json={"model": "tiny", "prompt": "late", "max_tokens": 2}) as late:
                    late_status, late_body = late.status, await late.json()
                async with session.get(server.url("/health")) as h:
                    health = h.status
                results = [await _read_stream(r) for r in streams]
                return late_status, late_body, health, results

        late_status, late_body, health, results = asyncio.run(scenario())
        assert late_status == 503 and late_body["error"]["code"] == "draining"
        assert health == 200  # draining is not dead: liveness stays green
        for _text, finish, tokens, done in results:
            assert (finish, tokens, done) == ("length", max_tokens, True)
        assert server.proc.wait(60) == 0
        log = (tmp_path / "server.log").read_text()
        assert "received SIGTERM" in log and "KV cache 4096 tokens" in log and "model loaded in" in log
    finally:
        server.kill()


def test_a_client_that_drops_mid_stream_frees_its_blocks(api_server):
    s = api_server
    s.wait_idle_and_free()
    aborted_before = s.metric("vllm:request_success_total", finished_reason="abort")
    generated_before = s.metric("vllm:generation_tokens_total")
    s.engine.step_delay_s = 0.01

    async def scenario():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(s.url("/v1/completions"), headers=AUTH, json={
                "model": "tiny", "prompt": "The capital of France is", "max_tokens": 200, "ignore_eos": True,
                "stream": True})
            for _ in range(3):
                await resp.content.readline()
            busy = await asyncio.to_thread(s.stats)
            resp.close()  # drop the connection mid-stream
            return busy

    try:
        busy = asyncio.run(scenario())
        assert busy["num_running"] == 1 and busy["num_free_blocks"] < busy["num_blocks"]
        s.wait_idle_and_free(timeout=10)
    finally:
        s.engine.step_delay_s = 0.0
    assert s.metric("vllm:request_success_total", finished_reason="abort") == aborted_before + 1
    assert s.metric("vllm:generation_tokens_total") - generated_before < 200


def test_health_fails_when_the_engine_loop_dies_and_requests_get_errors(tiny, one_thread):
    server = InProcessServer(tiny[0], core=make_core(tiny[0])).start()
    try:
        assert server.get("/health")[0] == 200
        server.engine.step_delay_s = 0.01

        def broken_step():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        async def stream_then_break():
            async with aiohttp.ClientSession() as session:
                resp = await session.post(server.url("/v1/completions"), headers=AUTH, json={
                    "model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True})
                await resp.content.readline()
                server.core.step = broken_step
                return [line.strip() async for line in resp.content if line.strip()]

        lines = asyncio.run(asyncio.wait_for(stream_then_break(), 30))
        assert_engine_dead(server, lines, "illegal memory access", "engine loop died")
    finally:
        assert server.stop() == 0


def test_health_fails_while_the_engine_loop_hangs_and_recovers(tiny, one_thread):
    server = InProcessServer(tiny[0], core=make_core(tiny[0]), engine_hang_timeout=0.5).start()
    release = threading.Event()
    real_step = server.core.step

    def hanging_step():
        release.wait(30)
        return real_step()

    try:
        server.core.step = hanging_step
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})))
        t.start()
        status, health = server.wait_until(lambda: (r := server.get("/health"))[0] == 503 and r, 10, "/health 503")
        assert "no progress" in health["reason"]
        server.core.step = real_step
        release.set()
        t.join(30)
        assert result["r"][0] == 200
        server.wait_until(lambda: server.get("/health")[0] == 200, 10, "/health 200")
    finally:
        release.set()
        server.stop()


def test_loading_is_live_but_not_ready(tiny, one_thread, monkeypatch):
    import pagedserve.runtime.server as server_module

    gate = threading.Event()

    def slow_engine_core(args):
        gate.wait(30)
        return make_core(tiny[0])

    monkeypatch.setattr(server_module, "EngineCore", slow_engine_core)
    server = InProcessServer(tiny[0], load_in_server=True).launch()
    try:
        assert server.get("/health") == (200, {"status": "loading"})
        assert server.get("/ready")[0] == 503
        status, body = server.get("/v1/models", headers=AUTH)
        assert status == 503 and body["error"]["code"] == "not_ready"
        gate.set()
        server.wait_until(lambda: server.get("/ready")[0] == 200, 30, "/ready")
        assert server.get("/v1/models", headers=AUTH)[0] == 200
    finally:
        gate.set()
        server.stop()


def test_a_model_that_fails_to_load_exits_1(tmp_path, one_thread):
    server = InProcessServer(str(tmp_path / "missing"), load_in_server=True).launch()
    server._thread.join(30)
    assert server.exit_code == 1
    assert isinstance(server.server.load_error, FileNotFoundError)


def test_shutdown_timeout_aborts_what_is_left(tiny, one_thread):
    server = InProcessServer(tiny[0], core=make_core(tiny[0]), shutdown_timeout=0.3).start()
    server.engine.step_delay_s = 0.02

    async def scenario():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(server.url("/v1/completions"), headers=AUTH, json={
                "model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True})
            await resp.content.readline()
            t0 = time.monotonic()
            server.server.loop.call_soon_threadsafe(server.server.request_stop)
            result = await _read_stream(resp)
            return result, time.monotonic() - t0

    (text, finish, _, done), elapsed = asyncio.run(scenario())
    assert finish == "abort" and done
    assert elapsed < 3.0
    server._thread.join(30)
    assert server.exit_code == 0


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_answer_json(api_server, path):
    status, body = api_server.get(path)
    assert status == 200 and isinstance(body, dict)


def test_tensor_parallel_server_serves_and_a_dead_worker_fails_health_while_idle(tiny, one_thread):
    _, model, tok = tiny
    server = InProcessServer(tiny[0], core=make_core(tiny[0], tensor_parallel_size=2)).start()
    pids = server.core.runner.worker_pids()
    try:
        ids = tok("The capital of France is")["input_ids"]
        status, body = server.post("/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 8,
                                                       "temperature": 0, "ignore_eos": True})
        expected = tok.decode(tiny_models.hf_greedy(model, ids, 8), skip_special_tokens=True)
        assert status == 200 and body["choices"][0]["text"] == expected
        os.kill(pids[0], signal.SIGKILL)
        status, health = server.wait_until(lambda: (r := server.get("/health"))[0] == 503 and r, 15, "/health 503")
        assert "tensor-parallel" in health["reason"]
        status, body = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "engine_dead"
    finally:
        assert server.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
