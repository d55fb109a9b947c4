"""A small kube-proxy: each Service's ClusterIP:port answers on this machine and forwards to its pods.

Service ClusterIPs are allocated from a loopback range (127.1.0.0/16), so the proxy can listen on the
very address the API server gave the Service: `http://<clusterIP>:<port>` works from any local process,
as it would inside a cluster. Each TCP connection goes to one ready endpoint, round robin, with no retry
(kube-proxy does not retry either), so rollout tests see what a real cluster's clients would.
The `kubernetes` Service (127.1.0.1:443) forwards to the API server.

Run: `python -m e2e.cluster.serviceproxy --kubeconfig FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import sys
import threading
import urllib.parse
from typing import Any

from kubernetes import client, config, watch

from .endpoints import service_endpoints

log = logging.getLogger("serviceproxy")
CONNECT_TIMEOUT_S = 5.0


class Store:
    """Services and pods mirrored from the API server by list+watch threads."""

    def __init__(self, on_change, apiserver: tuple[str, int]) -> None:
        self.apiserver = apiserver
        self.services: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.on_change = on_change

    def run_informer(self, kind: str, list_func) -> None:
        target = self.services if kind == "services" else self.pods
        while True:
            try:
                listed = list_func(_preload_content=False)
                body = json.loads(listed.data)
                with self.lock:
                    target.clear()
                    target.update({o["metadata"]["uid"]: o for o in body["items"]})
                self.on_change()
                for event in watch.Watch().stream(
                    list_func, resource_version=body["metadata"]["resourceVersion"], timeout_seconds=240
                ):
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":
                        break
                    with self.lock:
                        if event["type"] == "DELETED":
                            target.pop(obj["metadata"]["uid"], None)
                        else:
                            target[obj["metadata"]["uid"]] = obj
                    self.on_change()
            except Exception as err:
                log.warning("%s watch restarting: %s", kind, err)
                threading.Event().wait(1.0)

    def backends(self) -> dict[tuple[str, int], list[tuple[str, int]]]:
        with self.lock:
            services, pods = list(self.services.values()), list(self.pods.values())
        out = {}
        for svc in services:
            ip = svc.get("spec", {}).get("clusterIP")
            if not ip or ip == "None" or not ip.startswith("127."):
                continue
            if (svc["metadata"]["namespace"], svc["metadata"]["name"]) == ("default", "kubernetes"):
                # Its endpoints would be the API server's loopback address, which the API refuses.
                out[(ip, svc["spec"]["ports"][0]["port"])] = [self.apiserver]
                continue
            for port in svc["spec"].get("ports", []):
                if port.get("protocol", "TCP") == "TCP":
                    out[(ip, port["port"])] = service_endpoints(svc, pods, port.get("name") or port["port"])
        return out


class Proxy:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.table: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self.servers: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self.counters: dict[tuple[str, int], Any] = {}
        self.dirty = asyncio.Event()

    async def reconcile(self, store: Store) -> None:
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            await asyncio.sleep(0.05)  # coalesce bursts of watch events
            self.table = store.backends()
            for key in [k for k in self.servers if k not in self.table]:
                self.servers.pop(key).close()
            for key in self.table:
                if key not in self.servers:
                    await self._listen(key)

    async def _listen(self, key: tuple[str, int]) -> None:
        ip, port = key
        try:
            self.servers[key] = await asyncio.start_server(
                lambda r, w, k=key: self._serve(k, r, w), host=ip, port=port, reuse_address=True
            )
            self.counters[key] = itertools.count()
            log.info("listening on %s:%d", ip, port)
        except OSError as err:
            log.warning("cannot listen on %s:%d: %s", ip, port, err)

    async def _serve(self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backends = self.table.get(key) or []
        if not backends:
            writer.close()  # no ready endpoint: the client sees the connection dropped
            return
        ip, port = backends[next(self.counters[key]) % len(backends)]
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(ip, port), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF, then half-close, so the other direction can still finish."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()  # a reset on one side ends both directions


async def amain(kubeconfig: str) -> None:
    loop = asyncio.get_running_loop()
    proxy = Proxy(loop)
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    server = urllib.parse.urlparse(cfg.host)
    store = Store(lambda: loop.call_soon_threadsafe(proxy.dirty.set), (server.hostname, server.port or 443))
    core = client.CoreV1Api(client.ApiClient(cfg))
    for kind, func in (("services", core.list_service_for_all_namespaces), ("pods", core.list_pod_for_all_namespaces)):
        threading.Thread(target=store.run_informer, args=(kind, func), name=kind, daemon=True).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(proxy.reconcile(store))
    await stop.wait()
    task.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serviceproxy", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(amain(args.kubeconfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
