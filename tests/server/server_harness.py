"""A live pagedserve server for tests: in this process (a thread with its own event loop) or as a real
subprocess started through the CLI. Both listen on 127.0.0.1 and are reached over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pagedserve.runtime.engine import EngineArgs, EngineCore
from pagedserve.runtime.server import ServerConfig, run_server

API_KEY = "test-key"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 30.0) -> tuple[int, dict | str]:
    """One HTTP request; returns (status, parsed JSON or text). Never raises on an HTTP error status."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class _Client:
    base_url: str

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, **kw):
        return http("GET", self.url(path), **kw)

    def post(self, path: str, body, auth: bool = True, **kw):
        headers = dict(kw.pop("headers", {}) or {})
        if auth:
            headers.setdefault("Authorization", f"Bearer {API_KEY}")
        return http("POST", self.url(path), body, headers=headers, **kw)

    def stats(self) -> dict:
        status, body = self.get("/stats")
        assert status == 200, body
        return body

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(self.url("/metrics"), timeout=30) as resp:
            return parse_metrics(resp.read().decode())

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items() if n == name and want <= lab)

    def wait_until(self, cond, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.02)

    def wait_idle_and_free(self, timeout: float = 20.0) -> dict:
        def check():
            s = self.stats()
            idle = (s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_requests"] == 0
                    and s["num_free_blocks"] == s["num_blocks"] and s["streams_in_flight"] == 0)
            return s if idle else None

        return self.wait_until(check, timeout, "the engine to be idle with every KV block free")


def assert_engine_dead(server: _Client, stream_lines: list[bytes], cause: str, health_reason: str) -> None:
    """After the engine died under a stream: the stream ended with an ``engine_dead`` error naming ``cause``,
    liveness and readiness fail (liveness saying ``health_reason``), and new requests get 503 ``engine_dead``."""
    assert stream_lines[-1] == b"data: [DONE]"
    error = json.loads(stream_lines[-2][6:])["error"]
    assert error["code"] == "engine_dead" and cause in error["message"]
    status, health = server.get("/health")
    assert status == 503 and health_reason in health["reason"]
    assert server.get("/ready")[0] == 503
    status, body = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4})
    assert status == 503 and body["error"]["code"] == "engine_dead" and cause in body["error"]["message"]
    assert server.metric("pagedserve_engine_alive") == 0


def make_core(model_path: str, **engine_kwargs) -> EngineCore:
    kw = dict(device="cpu", num_kv_cache_tokens=4096, max_model_len=256)
    kw.update(engine_kwargs)
    return EngineCore(EngineArgs.from_kwargs(model_path, **kw))


class InProcessServer(_Client):
    """``run_server`` on an event loop in a background thread, with a prebuilt engine."""

    def __init__(self, model_path: str, core: EngineCore | None = None, *, load_in_server: bool = False,
                 **config) -> None:
        config.setdefault("served_model_names", ["tiny"])
        config.setdefault("api_key", API_KEY)
        config.setdefault("engine_kwargs", {"device": "cpu"})
        self.config = ServerConfig(model=model_path, host="127.0.0.1", port=0, **config)
        self.core = None if load_in_server else (core or make_core(model_path))
        self.server = None
        self.exit_code = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    def _run(self) -> None:
        self.exit_code = asyncio.run(run_server(
            self.config, core=self.core, install_signal_handlers=False, on_started=self._on_started))
        self._started.set()

    def _on_started(self, server) -> None:
        self.server = server
        self._started.set()

    def launch(self) -> InProcessServer:
        """Start serving HTTP; returns at once, or when the run ended (a failed load)."""
        self._thread.start()
        if not self._started.wait(60):
            raise RuntimeError("the test server did not start")
        if self.server is not None:
            self.base_url = f"http://127.0.0.1:{self.server.port}"
        return self

    def start(self) -> InProcessServer:
        self.launch()
        if self.server is None:
            raise RuntimeError(f"the test server exited with {self.exit_code}")
        self.wait_until(lambda: self.get("/ready")[0] == 200, 60, "/ready")
        return self

    @property
    def engine(self):
        return self.server.engine

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.server is not None and self._thread.is_alive():
            self.server.loop.call_soon_threadsafe(self.server.request_stop)
            self._thread.join(timeout)
        return self.exit_code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SubprocessServer(_Client):
    """``python -m pagedserve.runtime.cli serve ...`` as a child process (signals are real)."""

    def __init__(self, model_path: str, *args: str, log_path: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("PAGEDSERVE_API_KEY", None)
        cmd = [sys.executable, "-m", "pagedserve.runtime.cli", "serve", model_path, "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--served-model-name", "tiny", *args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> SubprocessServer:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early with {self.proc.returncode}")
            try:
                return self.get("/ready", timeout=2)[0] == 200
            except OSError:
                return False

        self.wait_until(ready, timeout, "the subprocess server to be ready")
        return self

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
