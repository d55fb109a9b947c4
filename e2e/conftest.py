"""Fixtures of the end-to-end tests: one local cluster per session, one namespace per test.

A cluster already started with `make cluster` is reused (and left running); otherwise the session starts
one and stops it at the end. The first run builds the control plane (see e2e/cluster/build.py).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e.cluster import controlplane, versions  # noqa: E402
from e2e.cluster.client import Cluster  # noqa: E402
from e2e.cluster.layout import Layout  # noqa: E402


def _running_cluster() -> Layout | None:
    if not (versions.STATE_DIR / "cluster.json").exists():
        return None
    layout = Layout.load()
    return layout if controlplane.running(layout) else None


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    layout = _running_cluster()
    owned = layout is None
    if owned:
        layout = controlplane.up()
    try:
        yield Cluster(layout)
    finally:
        if owned:
            controlplane.down(layout)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    name = f"e2e-{request.node.name.replace('_', '-')[:40].strip('-').lower()}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    # Pods need the namespace's default ServiceAccount, made by the controller-manager.
    from e2e.cluster.client import wait_for

    wait_for(lambda: cluster.core.read_namespaced_service_account("default", name), 30, f"default SA in {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator(cluster: Cluster):
    """The operator chart installed once per session (kept if someone else, e.g. `make demo`, installed it)."""
    from e2e import product

    ours = not product.operator_installed(cluster)
    product.install_operator(cluster)
    yield
    if ours:
        product.uninstall_operator(cluster)
