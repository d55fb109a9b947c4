"""The operator in its own thread and event loop, for integration tests (importable by name)."""

from __future__ import annotations

import asyncio
import threading

import kopf

from pagedserve.operator import handlers


class OperatorThread:
    """The operator in a thread with its own event loop, as in production, against the emulator.

    (kopf.operator() cancels every task of its loop that it did not start, pytest's included, when
    it stops; its own loop keeps it from touching the test's.)
    """

    def __init__(self, server_url: str):
        config = handlers.OperatorConfig(
            connection=kopf.ConnectionInfo(server=server_url), resync_seconds=0.3, error_backoff_max=0.2
        )
        self.memo = handlers.Memo(config=config)
        self.stop_flag, self.ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def _run(self) -> None:
        settings = kopf.OperatorSettings()
        settings.watching.reconnect_backoff = 0.1
        settings.scanning.disabled = True
        try:
            asyncio.run(kopf.operator(
                registry=handlers.make_registry(), settings=settings, memo=self.memo, standalone=True,
                clusterwide=True, stop_flag=self.stop_flag, ready_flag=self.ready,
            ))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    async def start(self) -> None:
        self.thread.start()
        assert await asyncio.to_thread(self.ready.wait, 10), "operator did not start"

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 15)
        assert not self.thread.is_alive(), "operator did not stop"
        if self.error is not None:
            raise self.error
