"""kopf wiring: one reconcile loop (a kopf daemon) per LLMDeployment, woken by changes, plus a resync.

kopf gives us watching, peering (two operator replicas never both act: daemons stop while paused),
event posting, a finalizer that stops the loop cleanly, and the liveness endpoint. The loop serialises
all work on one object; watch events on the object or on its children only wake it up early.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import kopf

from pagedserve.operator import autoscaler, builders, conditions, metrics, reconcile
from pagedserve.operator.api import GROUP, PLURAL, VERSION
from pagedserve.operator.kube import Kube


@dataclasses.dataclass
class OperatorConfig:
    """What `pagedserve operator` was told; tests build one pointing at a mock API server."""

    resync_seconds: float = 60.0
    connection: kopf.ConnectionInfo | None = None  # None: in-cluster service account, else kubeconfig
    token_path: str | None = None  # re-read on every request (projected tokens rotate)
    prometheus_url: str | None = None  # for the autoscaler, unless an object names its own
    error_backoff_max: float = 60.0
    autoscale_interval_seconds: float = 15.0
    metrics_source: Callable[[str], autoscaler.MetricsSource] = autoscaler.prometheus_source  # tests: a fake


class Shared:
    """State of one operator run: the API client and the wake-up events of the running loops."""

    def __init__(self) -> None:
        self.kube: Kube | None = None
        self.wakeups: dict[tuple[str, str], asyncio.Event] = {}


@dataclasses.dataclass
class Memo:
    """kopf hands each object's handlers a shallow copy of this; `shared` stays one object for all."""

    config: OperatorConfig
    shared: Shared = dataclasses.field(default_factory=Shared)


def poke(memo: Memo, namespace: str | None, name: str | None) -> None:
    event = memo.shared.wakeups.get((namespace or "", name or ""))
    if event is not None:
        event.set()


def post_event(body: Any, type: str, reason: str, message: str) -> None:
    kopf.event(body, type=type, reason=reason, message=message[:1000])


async def sleep_until_woken(wake: asyncio.Event, stopped: kopf.DaemonStopped, delay: float) -> None:
    """Sleep `delay` seconds, or less if woken by a watch event or told to stop."""

    async def until_stopped() -> None:
        await stopped.wait()

    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(until_stopped())]
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def autoscale_once(memo: Memo, namespace: str, name: str, body: kopf.Body, scaler: autoscaler.Memory,
                         logger: kopf.Logger) -> bool:
    """One autoscaler tick; True while the object has autoscaling on. Failures are logged, never fatal."""
    try:
        assert memo.shared.kube is not None, "login handler ran first"
        fresh = await memo.shared.kube.get_or_none(reconcile.llmd_path(namespace, name))
        if fresh is None:
            return False
        decision = await autoscaler.tick(
            memo.shared.kube, fresh, scaler, default_url=memo.config.prometheus_url,
            factory=memo.config.metrics_source, emit=partial(post_event, body), now=time.monotonic(),
            stamp=conditions.now_rfc3339(),
        )
        return decision is not None
    except Exception as exc:  # a failed tick holds; the next one starts afresh
        logger.warning("autoscaler tick failed (%s: %s)", type(exc).__name__, exc)
        return True


def make_registry() -> kopf.OperatorRegistry:
    """All handlers of the operator, on a registry of their own (tests run several operators in turn)."""
    registry = kopf.OperatorRegistry()
    child_filter = {builders.LABEL_MANAGED_BY: builders.OPERATOR_NAME}

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{GROUP}/operator"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        # Without a peering resource (and not --standalone) refuse to act rather than risk two active replicas.
        settings.peering.mandatory = not settings.peering.standalone
        settings.posting.level = logging.INFO

    @kopf.on.login(registry=registry)
    async def login(memo: Memo, logger: kopf.Logger, **kwargs: Any) -> kopf.ConnectionInfo | None:
        info = memo.config.connection
        if info is None:
            info = kopf.login_with_service_account(logger=logger, **kwargs) or kopf.login_with_kubeconfig(
                logger=logger, **kwargs
            )
        if info is not None and memo.shared.kube is None:
            memo.shared.kube = Kube(info, token_path=memo.config.token_path)
        return info

    @kopf.on.cleanup(registry=registry)
    async def close(memo: Memo, **_: Any) -> None:
        if memo.shared.kube is not None:
            await memo.shared.kube.close()

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=2.0)
    async def reconcile_loop(
        name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped, memo: Memo, logger: kopf.Logger,
        **_: Any,
    ) -> None:
        key = (namespace, name)
        wake = memo.shared.wakeups.setdefault(key, asyncio.Event())
        metrics.MANAGED.inc()
        failures = 0
        scaler = autoscaler.Memory()
        next_autoscale, autoscaling = 0.0, False
        try:
            while not stopped:
                wake.clear()
                if time.monotonic() >= next_autoscale:  # first, so the reconcile pass below carries out its change
                    next_autoscale = time.monotonic() + memo.config.autoscale_interval_seconds
                    autoscaling = await autoscale_once(memo, namespace, name, body, scaler, logger)
                started = time.monotonic()
                try:
                    assert memo.shared.kube is not None, "login handler ran first"
                    result = await reconcile.reconcile(
                        memo.shared.kube, namespace, name, partial(post_event, body), conditions.now_rfc3339
                    )
                except Exception as exc:  # the loop must survive anything; the next pass starts afresh
                    failures += 1
                    delay = min(memo.config.error_backoff_max, 0.5 * 2**failures)
                    metrics.RECONCILES.labels("error").inc()
                    metrics.RECONCILE_ERRORS.labels(type(exc).__name__).inc()
                    logger.warning("reconcile failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                else:
                    failures = 0
                    delay = result.requeue_after or memo.config.resync_seconds
                    metrics.RECONCILES.labels("ok").inc()
                    for write in result.writes:
                        action, ref = write.split(" ", 1)
                        metrics.CHILD_WRITES.labels(ref.split("/", 1)[0], action).inc()
                    if result.status_written:
                        metrics.STATUS_WRITES.inc()
                    if result.writes:
                        logger.info("reconciled: %s", "; ".join(result.writes))
                finally:
                    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
                if autoscaling:
                    delay = max(0.0, min(delay, next_autoscale - time.monotonic()))
                await sleep_until_woken(wake, stopped, delay)
        finally:
            await scaler.close()
            metrics.MANAGED.dec()
            if memo.shared.wakeups.get(key) is wake:
                del memo.shared.wakeups[key]

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def llmd_changed(meta: kopf.Meta, status: kopf.Status, namespace: str, name: str, memo: Memo, **_: Any) -> None:
        if meta.get("generation") != status.get("observedGeneration"):
            poke(memo, namespace, name)

    @kopf.on.event("apps", "v1", "deployments", labels=child_filter, registry=registry)
    @kopf.on.event("", "v1", "services", labels=child_filter, registry=registry)
    @kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=child_filter, registry=registry)
    def child_changed(meta: kopf.Meta, namespace: str, memo: Memo, **_: Any) -> None:
        poke(memo, namespace, meta.labels.get(builders.LABEL_INSTANCE))

    return registry
