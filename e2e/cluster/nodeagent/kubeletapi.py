"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: /containerLogs/{ns}/{pod}/{container}.

The API server calls it at the Node's InternalIP:10250 with its kubelet-client certificate; only clients
with a certificate from the cluster CA are served. Supports follow, previous, tailLines and limitBytes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

if TYPE_CHECKING:
    from .agent import NodeAgent

log = logging.getLogger("nodeagent.api")
PORT = 10250


def _log_file(agent: NodeAgent, ns: str, pod: str, container: str, previous: bool) -> Path | None:
    folders = sorted(agent.pods_dir.glob(f"{ns}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    if not folders:
        return None
    logs = sorted((folders[-1] / "logs" / container).glob("*.log"), key=lambda p: int(p.stem))
    if previous:
        return logs[-2] if len(logs) >= 2 else None
    return logs[-1] if logs else None


def _handler(agent: NodeAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args) -> None:
            log.debug(fmt, *args)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self.send_error(404, "only /containerLogs/{namespace}/{pod}/{container} is served here")
                return
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            path = _log_file(agent, parts[1], parts[2], parts[3], q.get("previous") == "true")
            if path is None:
                self.send_error(404, f"no logs of container {parts[3]} of pod {parts[1]}/{parts[2]}")
                return
            data = path.read_bytes()
            if "tailLines" in q:
                lines = data.splitlines(keepends=True)
                data = b"".join(lines[-int(q["tailLines"]) :]) if int(q["tailLines"]) > 0 else b""
            if "limitBytes" in q:
                data = data[: int(q["limitBytes"])]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(data)
            if q.get("follow") == "true":
                self._follow(path, path.stat().st_size)
            self._chunk(b"")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _follow(self, path: Path, offset: int) -> None:
            """Stream new lines until the container instance is replaced or the agent stops."""
            while not agent.stopping.is_set():
                newest = _log_file(agent, *self.path.split("?")[0].strip("/").split("/")[1:4], previous=False)
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                if data:
                    offset += len(data)
                    try:
                        self._chunk(data)
                    except OSError:
                        return
                elif newest != path:
                    return
                time.sleep(0.3)

    return Handler


def serve(agent: NodeAgent, cert: Path, key: Path, ca: Path) -> ThreadingHTTPServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer((agent.host_ip, PORT), _handler(agent))
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()
    return server
