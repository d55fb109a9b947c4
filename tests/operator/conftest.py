"""Fixtures for the operator tests: a kmock Kubernetes API emulator and the operator running against it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
import pytest_asyncio
from operator_harness import ApiServer, Cluster, declare_resources
from operator_thread import OperatorThread


@pytest.fixture()
def kmock_options() -> dict[str, Any]:
    return {"cls": ApiServer}


@pytest_asyncio.fixture()
async def cluster(kmock: kmock.KubernetesEmulator) -> Cluster:
    declare_resources(kmock)
    return Cluster(kmock)


@pytest_asyncio.fixture()
async def operator(cluster: Cluster) -> AsyncIterator[OperatorThread]:
    """The operator, running against the emulator; stopped (and its errors raised) at the end of the test."""
    op = OperatorThread(str(cluster.server.url))
    await op.start()
    try:
        yield op
    finally:
        await op.stop()
