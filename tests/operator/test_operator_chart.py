"""The Helm chart: `helm lint`, rendered manifests valid against the Kubernetes schemas, least privilege."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pagedserve-operator"
KUBE_VERSION = "1.31.0"


def _e2e_versions():
    """e2e/cluster/versions.py (stdlib only): where the one pinned helm build lives (`make helm`)."""
    spec = importlib.util.spec_from_file_location("_e2e_versions", ROOT / "e2e" / "cluster" / "versions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def helm_binary() -> str | None:
    for candidate in (os.environ.get("HELM"), str(_e2e_versions().BIN_DIR / "helm"), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


HELM = helm_binary()
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not found: `make helm` builds it with Go (with the "
                                "e2e cluster's binaries; or set HELM=/path/to/helm)")


def render(*sets: str) -> list[dict]:
    args = [HELM, "template", "pagedserve-operator", str(CHART), "--namespace", "ops", "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_chart_ships_the_generated_crd() -> None:
    assert (CHART / "crds" / "llmdeployments.pagedserve.io.yaml").read_text() == \
        (ROOT / "crds" / "llmdeployments.pagedserve.io.yaml").read_text(), "run `make crds`"


@needs_helm
def test_helm_lint_is_clean() -> None:
    result = subprocess.run([HELM, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@needs_helm
@pytest.mark.parametrize("sets", [(), ("watchNamespaces={team-a,team-b}", "prometheusUrl=http://prometheus:9090",
                                       "replicaCount=2")], ids=["cluster-wide", "namespaced"])
def test_rendered_manifests_validate_against_kubernetes_schemas(sets: tuple[str, ...]) -> None:
    docs = render(*sets)
    peering_kinds = {d["spec"]["names"]["kind"] for d in yaml.safe_load_all((CHART / "crds/kopf-peerings.yaml").read_text())}
    for doc in docs:
        if doc["apiVersion"] == "kopf.dev/v1":
            assert doc["kind"] in peering_kinds  # our own CRDs, shipped in crds/
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION.rsplit(".", 1)[0], strict=True)


@needs_helm
def test_operator_pod_is_locked_down() -> None:
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert container["command"] == ["python3", "-m", "pagedserve.operator.main"]  # no torch import
    assert "--all-namespaces" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


@needs_helm
def test_rbac_grants_only_what_the_operator_uses() -> None:
    docs = render("watchNamespaces={team-a}")
    rules = {
        (group, resource): set(rule["verbs"])
        for role in docs if role["kind"] == "ClusterRole"
        for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
    }
    assert rules == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
        ("", "namespaces"): {"list", "watch"},
        ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
        ("pagedserve.io", "llmdeployments"): {"get", "list", "watch", "patch"},
        ("pagedserve.io", "llmdeployments/status"): {"get", "patch"},
        ("pagedserve.io", "llmdeployments/scale"): {"get", "patch"},
        ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "services"): {"get", "list", "watch", "create", "patch"},
        ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch"},
        ("", "events"): {"create"},
        ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
    }
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    # Namespaced install: reconcile rights only inside the watched namespace.
    assert {(b["kind"], b["metadata"].get("namespace"), b["roleRef"]["name"]) for b in bindings} == {
        ("ClusterRoleBinding", None, "pagedserve-operator-cluster"),
        ("RoleBinding", "team-a", "pagedserve-operator-reconcile"),
    }
