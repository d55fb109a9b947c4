"""Container probes as the kubelet runs them: the check itself, and the threshold state machine.

`ProbeTracker` is pure (time is passed in), so its kubelet semantics are unit-tested without processes:
initialDelaySeconds from container start, one check per periodSeconds, `successThreshold` consecutive
successes to turn healthy, `failureThreshold` consecutive failures to turn unhealthy.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Probe = dict[str, Any]


@dataclass
class ProbeResult:
    ok: bool
    message: str = ""


def _port(value: int | str, ports: Mapping[str, int]) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    if value not in ports:
        raise ValueError(f"named port {value!r} is not a containerPort of the container")
    return ports[value]


def run_check(
    probe: Probe, pod_ip: str, ports: Mapping[str, int], env: Mapping[str, str], exec_prefix: Sequence[str] = ()
) -> ProbeResult:
    """Run one probe attempt: httpGet (2xx/3xx), tcpSocket (connects), exec (exit 0), grpc (as tcpSocket).
    `exec_prefix` enters the container's mount namespace for exec probes (see process.exec_prefix)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host, port = get.get("host") or pod_ip, _port(get["port"], ports)
            if get.get("scheme", "HTTP").upper() == "HTTPS":
                # The kubelet does not verify probe certificates either.
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=ssl._create_unverified_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                headers.setdefault("User-Agent", "kube-probe/1.37")
                conn.request("GET", get.get("path", "/"), headers=headers)
                status = conn.getresponse().status
            finally:
                conn.close()
            return ProbeResult(200 <= status < 400, f"HTTP probe failed with statuscode: {status}")
        if "tcpSocket" in probe or "grpc" in probe:
            spec = probe.get("tcpSocket") or probe["grpc"]
            with socket.create_connection((spec.get("host") or pod_ip, _port(spec["port"], ports)), timeout=timeout):
                return ProbeResult(True)
        if "exec" in probe:
            done = subprocess.run(
                [*exec_prefix, *probe["exec"]["command"]], env=dict(env), capture_output=True, timeout=timeout, text=True
            )
            return ProbeResult(done.returncode == 0, (done.stdout + done.stderr)[-500:])
    except (OSError, subprocess.TimeoutExpired, ValueError, http.client.HTTPException) as err:
        return ProbeResult(False, f"probe error: {err}")
    return ProbeResult(False, "probe has no handler")


@dataclass
class ProbeTracker:
    """Consecutive-result bookkeeping of one probe of one container instance."""

    probe: Probe
    started_at: float
    healthy: bool  # the state before the first result: readiness starts False, liveness True
    successes: int = 0
    failures: int = 0
    next_at: float = field(init=False)
    last_message: str = ""

    def __post_init__(self) -> None:
        self.next_at = self.started_at + float(self.probe.get("initialDelaySeconds", 0))

    @property
    def period(self) -> float:
        return float(self.probe.get("periodSeconds", 10))

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, result: ProbeResult, now: float) -> bool:
        """Fold one result in; returns True when `healthy` flipped."""
        self.next_at = now + self.period
        before = self.healthy
        if result.ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.healthy = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            self.last_message = result.message
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.healthy = False
        return self.healthy != before
