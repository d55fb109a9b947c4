"""The engine core in a process of its own (``--engine-process``): same answers as HF and as the in-thread engine,
per-request metrics that need the engine's timestamps, freed blocks on disconnect, a killed, stopped or
interrupted engine process, a failed load, and no process left behind (tensor parallel included)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest
import tiny_models
from server_harness import API_KEY, InProcessServer, SubprocessServer, assert_engine_dead

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE = {"device": "cpu", "num_kv_cache_tokens": 4096, "max_model_len": 256}


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4 of stat is the parent pid
            out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waits for its parent to reap it: it is gone as far as serving goes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _server(tiny, **config) -> InProcessServer:
    config.setdefault("engine_kwargs", ENGINE)
    return InProcessServer(tiny[0], load_in_server=True, engine_process=True, **config).start()


def test_engine_process_answers_like_hf_and_like_the_engine_thread(tiny, one_thread):
    _, model, tok = tiny
    ids = tok("The capital of France is")["input_ids"]
    expected = tiny_models.hf_greedy(model, ids, 12)
    sampled = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.0, "seed": 7,
               "n": 2, "logprobs": 2, "ignore_eos": True}
    answers = {}
    for mode in (False, True):
        server = InProcessServer(tiny[0], load_in_server=True, engine_process=mode, engine_kwargs=ENGINE).start()
        try:
            assert (server.engine.process is not None) == mode
            status, greedy = server.post("/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 12,
                                                             "temperature": 0, "ignore_eos": True})
            assert status == 200
            status, sample = server.post("/v1/completions", sampled)
            assert status == 200
            status, structured = server.post("/v1/completions", {
                "model": "tiny", "prompt": "x", "max_tokens": 40, "temperature": 0,
                "structured_outputs": {"regex": "[a-c]{3}-(yes|no)"}})
            assert status == 200 and structured["choices"][0]["finish_reason"] == "stop"
            status, bad = server.post("/v1/completions", {"model": "tiny", "prompt": "x",
                                                          "structured_outputs": {"regex": "[a-"}})
            assert status == 400 and "invalid regex" in bad["error"]["message"]  # raised in the engine
            answers[mode] = (greedy["choices"][0]["text"], [(c["text"], c["logprobs"]) for c in sample["choices"]],
                             structured["choices"][0]["text"])
            # Queue time needs the engine's first-scheduled time, which crosses the process boundary.
            assert server.metric("vllm:request_queue_time_seconds_count") == 3
            assert server.metric("vllm:generation_tokens_total") == 12 + 20 + structured["usage"]["completion_tokens"]
            assert server.wait_idle_and_free()["num_steps"] > 0
        finally:
            assert server.stop() == 0
    assert answers[True][0] == tok.decode(expected, skip_special_tokens=True)
    assert answers[True] == answers[False]


def test_engine_process_frees_the_blocks_of_a_client_that_drops(tiny, one_thread):
    server = _server(tiny, debug_step_delay=0.01)
    try:
        async def scenario():
            async with aiohttp.ClientSession() as session:
                resp = await session.post(server.url("/v1/completions"), headers=AUTH, json={
                    "model": "tiny", "prompt": "The capital of France is", "max_tokens": 200, "ignore_eos": True,
                    "stream": True})
                for _ in range(3):
                    await resp.content.readline()
                busy = await asyncio.to_thread(server.stats)
                resp.close()
                return busy

        busy = asyncio.run(scenario())
        assert busy["num_running"] == 1 and busy["num_free_blocks"] < busy["num_blocks"]
        server.wait_idle_and_free(timeout=10)
        assert server.metric("vllm:request_success_total", finished_reason="abort") == 1
        assert server.metric("vllm:generation_tokens_total") < 200
    finally:
        assert server.stop() == 0


def test_a_killed_engine_process_fails_health_and_requests(tiny, one_thread):
    server = _server(tiny, debug_step_delay=0.01)
    pid = server.engine.process.pid
    try:
        os.kill(pid, signal.SIGINT)  # a Ctrl-C to the process group is the server's to handle, not the engine's
        status, body = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4

        async def stream_then_kill():
            async with aiohttp.ClientSession() as session:
                resp = await session.post(server.url("/v1/completions"), headers=AUTH, json={
                    "model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True})
                await resp.content.readline()
                os.kill(pid, signal.SIGKILL)
                return [line.strip() async for line in resp.content if line.strip()]

        lines = asyncio.run(asyncio.wait_for(stream_then_kill(), 30))
        assert_engine_dead(server, lines, "SIGKILL", "SIGKILL")
    finally:
        assert server.stop() == 0


def test_a_stopped_engine_process_fails_health_and_recovers(tiny, one_thread):
    server = _server(tiny, engine_hang_timeout=0.5)
    pid = server.engine.process.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        status, health = server.wait_until(lambda: (r := server.get("/health"))[0] == 503 and r, 10, "/health 503")
        assert "no progress" in health["reason"]
        os.kill(pid, signal.SIGCONT)
        server.wait_until(lambda: server.get("/health")[0] == 200, 10, "/health 200")
        status, body = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


def test_a_model_that_fails_to_load_in_the_engine_process_exits_1(tiny, one_thread):
    # The tokenizer loads (in the server); the engine refuses the context length (in the engine process).
    server = InProcessServer(tiny[0], load_in_server=True, engine_process=True,
                             engine_kwargs={**ENGINE, "max_model_len": 10**6}).launch()
    server._thread.join(60)
    assert server.exit_code == 1
    err = server.server.load_error
    assert isinstance(err, ValueError) and "max_model_len" in str(err)
    assert server.server.engine_process.proc.poll() is not None


def test_tensor_parallel_engine_process_leaves_no_process_when_the_server_is_killed(tiny, tmp_path):
    _, model, tok = tiny
    server = SubprocessServer(tiny[0], "--engine-process", "--tensor-parallel-size", "2",
                              "--num-kv-cache-tokens", "4096", "--max-model-len", "256",
                              log_path=str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        ids = tok("The capital of France is")["input_ids"]
        status, body = server.post("/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 8,
                                                       "temperature": 0, "ignore_eos": True}, auth=False)
        assert status == 200
        assert body["choices"][0]["text"] == tok.decode(tiny_models.hf_greedy(model, ids, 8), skip_special_tokens=True)
        engine = _children(server.proc.pid)
        family = _descendants(server.proc.pid)
        assert len(engine) == 1 and len(family) >= 2, family  # the engine process and its worker
        server.proc.kill()
        server.proc.wait(10)
        assert _wait_gone(family, 15) == []
    finally:
        server.kill()


@pytest.mark.parametrize("flag", ["--engine-process", "--no-engine-process"])
def test_sigterm_with_either_engine_leaves_no_process(tiny, tmp_path, flag):
    server = SubprocessServer(tiny[0], flag, "--num-kv-cache-tokens", "4096", "--max-model-len", "256",
                              "--debug-step-delay", "0.01", log_path=str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        family = _descendants(server.proc.pid)
        assert len(family) == (1 if flag == "--engine-process" else 0), family

        async def scenario():
            async with aiohttp.ClientSession() as session:
                body = {"model": "tiny", "max_tokens": 40, "ignore_eos": True, "stream": True}
                streams = [await session.post(server.url("/v1/completions"), json={**body, "prompt": f"r {i}"})
                           for i in range(4)]
                for r in streams:
                    await r.content.readline()
                server.terminate()
                texts = []
                for r in streams:
                    n = 0
                    async for raw in r.content:
                        line = raw.strip()
                        if line.startswith(b"data: {"):
                            obj = json.loads(line[6:])
                            assert "error" not in obj, obj
                            n += sum(1 for c in obj["choices"] if c["finish_reason"] == "length")
                    texts.append(n)
                return texts

        assert asyncio.run(scenario()) == [1, 1, 1, 1]  # every stream ran to its length
        assert server.proc.wait(60) == 0
        assert _wait_gone(family, 10) == []
        log = (tmp_path / "server.log").read_text()
        assert ("engine process pid" in log) == (flag == "--engine-process")
    finally:
        server.kill()


def test_a_stopped_engine_under_a_burst_of_requests_never_stalls_the_server(tiny, one_thread):
    # 300 requests of 250 tokens pickle to more than the socket buffer holds: the event loop must not block on
    # the socket while the engine reads nothing.
    server = _server(tiny, engine_hang_timeout=3.0, max_request_body_bytes=1 << 20)
    pid = server.engine.process.pid
    prompt = list(range(3, 253))
    try:
        async def scenario():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                async def one():
                    async with session.post(server.url("/v1/completions"), headers=AUTH, json={
                            "model": "tiny", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}) as r:
                        return r.status
                os.kill(pid, signal.SIGSTOP)
                tasks = [asyncio.create_task(one()) for _ in range(300)]
                await asyncio.sleep(4.0)
                backlog = server.engine.process._outbox.qsize()
                t0 = time.monotonic()
                async with aiohttp.ClientSession() as probe, probe.get(
                        server.url("/health"), timeout=aiohttp.ClientTimeout(total=5)) as h:
                    health = h.status, await h.json(), time.monotonic() - t0
                os.kill(pid, signal.SIGCONT)
                return backlog, health, await asyncio.gather(*tasks)

        backlog, (status, body, took), statuses = asyncio.run(asyncio.wait_for(scenario(), 120))
        assert backlog > 0  # commands were waiting for the stopped engine: a blocking send would have hung here
        assert status == 503 and "no progress" in body["reason"] and took < 2.0
        # Requests that came while the engine was considered alive were queued and are served after SIGCONT;
        # later ones were refused with 503 (engine down). None is lost or left hanging.
        assert set(statuses) <= {200, 503} and statuses.count(200) > 100, statuses
        server.wait_until(lambda: server.get("/health")[0] == 200, 10, "/health 200")
        server.wait_idle_and_free()
    finally:
        os.kill(pid, signal.SIGCONT)
        assert server.stop() == 0


def test_stopping_while_the_engine_process_loads_leaves_no_process(tiny, one_thread):
    server = InProcessServer(tiny[0], load_in_server=True, engine_process=True, engine_kwargs=ENGINE).launch()
    proc = server.wait_until(lambda: server.server.engine_process, 30, "the engine process to start")
    assert proc.info is None  # still loading
    assert server.stop() == 0
    assert _wait_gone([proc.pid], 10) == []
