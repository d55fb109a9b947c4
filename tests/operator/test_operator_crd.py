"""The generated CRD: in sync with the models, structural, and judging manifests as the API server would."""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys

import jsonschema
import pytest
import yaml
from crd_validation import _to_jsonschema, apply_defaults, cel_errors, validate

from pagedserve.operator import crdgen
from pagedserve.operator.api import LLMDeploymentSpec

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / crdgen.CRD_FILE).read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_committed_crd_matches_the_models() -> None:
    committed = (ROOT / crdgen.CRD_FILE).read_text()
    assert committed == crdgen.render(), "crds/ is stale: run `make crds`"


def test_generator_command_prints_the_crd() -> None:
    out = subprocess.run([sys.executable, "-m", "pagedserve.operator.crdgen"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert yaml.safe_load(out) == CRD


def walk(node: dict, path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    for path, node in walk(SCHEMA):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "nullable", "title"} & set(node), path
        if not (node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")):
            assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
        assert not ("properties" in node and "additionalProperties" in node), path


def test_crd_shape() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "llmdeployments.pagedserve.io"
    assert spec["names"]["shortNames"] == ["llmd"] and spec["names"]["kind"] == "LLMDeployment"
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {
        "status": {},
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                  "labelSelectorPath": ".status.selector"},
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Model": ".status.servedModel", "TP": ".status.tensorParallelSize",
                       "Ready": ".status.readyReplicas", "Desired": ".spec.replicas", "Phase": ".status.phase",
                       "Age": ".metadata.creationTimestamp"}
    assert SCHEMA["properties"]["status"]["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(example: pathlib.Path) -> None:
    manifest = yaml.safe_load(example.read_text())
    assert validate(manifest, CRD) == []


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_schema_defaults_are_the_models_defaults(example: pathlib.Path) -> None:
    """What the API server stores after defaulting parses to the same spec the operator assumes."""
    manifest = yaml.safe_load(example.read_text())
    defaulted = apply_defaults(copy.deepcopy(manifest), SCHEMA)
    assert LLMDeploymentSpec.model_validate(defaulted["spec"]) == LLMDeploymentSpec.model_validate(manifest["spec"])
    dumped = LLMDeploymentSpec.model_validate(manifest["spec"]).model_dump(by_alias=True, exclude_none=True)
    assert {k: v for k, v in defaulted["spec"].items()} == {k: dumped[k] for k in defaulted["spec"]}


def smollm2() -> dict:
    return yaml.safe_load((ROOT / "examples/smollm2.yaml").read_text())


def edit(path: str, value) -> dict:
    """The demo manifest with one field set (value None: removed). Paths are dotted, from the root."""
    manifest = smollm2()
    *parents, leaf = path.split(".")
    node = manifest
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return manifest


# (manifest, a fragment the API server's message must contain)
INVALID = {
    "tp-not-power-of-two": (edit("spec.tensorParallelSize", 3), "power of two"),
    "tp-too-large": (edit("spec.tensorParallelSize", 16), "tensorParallelSize"),
    "tp-zero": (edit("spec.tensorParallelSize", 0), "tensorParallelSize"),
    "negative-replicas": (edit("spec.replicas", -1), "replicas"),
    "min-above-max": (edit("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
                      "minReplicas must not exceed maxReplicas"),
    "tp-not-allowed": (edit("spec.autoscaling", {"allowedTensorParallelSizes": [2, 4]}),
                       "one of autoscaling.allowedTensorParallelSizes"),
    "allowed-tp-bad": (edit("spec.autoscaling", {"allowedTensorParallelSizes": [1, 3]}), "among 1, 2, 4, 8"),
    "gpu-budget-too-small": (edit("spec.autoscaling", {"minReplicas": 3, "gpuBudget": 2}), "gpuBudget must cover"),
    "no-model-source": (edit("spec.model.hostPath", None), "exactly one of model.pvc"),
    "two-model-sources": (edit("spec.model.uri", "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"),
                          "exactly one of model.pvc"),
    "bad-uri": (edit("spec.model", {"uri": "ftp://example/model"}), "model.uri"),
    "relative-host-path": (edit("spec.model.hostPath.path", "models/x"), "hostPath.path"),
    "missing-model": (edit("spec.model", None), "model"),
    "bad-block-size": (edit("spec.engine.blockSize", 12), "blockSize"),
    "bad-device": (edit("spec.engine.device", "tpu"), "device"),
    "gpu-memory-utilization": (edit("spec.engine.gpuMemoryUtilization", 1.5), "gpuMemoryUtilization"),
    "kv-usage-target-zero": (edit("spec.autoscaling", {"targetKvCacheUsage": 0}), "targetKvCacheUsage"),
    "stable-window-under-panic-window": (edit("spec.autoscaling", {"stableWindowSeconds": 5}), "stableWindowSeconds"),
    "tp-up-window-negative": (edit("spec.autoscaling", {"tensorParallelUpWindowSeconds": -1}),
                              "tensorParallelUpWindowSeconds"),
    "tp-down-window-over-a-week": (edit("spec.autoscaling", {"tensorParallelDownWindowSeconds": 604801}),
                                   "tensorParallelDownWindowSeconds"),
    "tp-up-window-not-integer": (edit("spec.autoscaling", {"tensorParallelUpWindowSeconds": "2m"}),
                                 "tensorParallelUpWindowSeconds"),
    "cpu-with-gpu-type": (edit("spec.resources.gpuType", "NVIDIA-H100"), "gpuType cannot be set"),
    "bad-quantity": (edit("spec.resources.memory", "lots"), "memory"),
    "surge-and-unavailable-zero": (edit("spec.rollout", {"maxSurge": 0, "maxUnavailable": 0}), "must not both be 0"),
    "deadline-too-short": (edit("spec.rollout", {"progressDeadlineSeconds": 5}), "progressDeadlineSeconds"),
    "service-port": (edit("spec.service", {"port": 70000}), "port"),
    "service-type": (edit("spec.service", {"type": "ExternalName"}), "type"),
    "unknown-field": (edit("spec.gpus", 2), "unknown field .spec.gpus"),
    "env-value-and-secret": (edit("spec.env", [{"name": "A", "value": "x", "secretKeyRef": {"name": "s", "key": "k"}}]),
                             "value or secretKeyRef"),
    "name-too-long": (edit("metadata.name", "x" * 51), "at most 50 characters"),
    "name-uppercase": (edit("metadata.name", "SmolLM"), "DNS-1035"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_manifests_are_rejected_naming_the_field(case: str) -> None:
    manifest, fragment = INVALID[case]
    errors = validate(manifest, CRD)
    assert errors, f"{case} was accepted"
    assert any(fragment in e for e in errors), errors


def test_valid_variants_are_accepted() -> None:
    """The neighbours of the invalid cases: the rules must not reject what they should allow."""
    for manifest in [
        edit("spec.tensorParallelSize", 8) | {},
        edit("spec.rollout", {"maxSurge": "25%", "maxUnavailable": 0}),
        edit("spec.rollout", {"maxSurge": 0, "maxUnavailable": 1}),
        edit("spec.autoscaling", {"minReplicas": 2, "maxReplicas": 2, "gpuBudget": 2}),
        edit("spec.autoscaling", {"stableWindowSeconds": 6, "tensorParallelUpWindowSeconds": 0,
                                  "tensorParallelDownWindowSeconds": 604800}),
        edit("spec.model", {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"}),
        edit("spec.model", {"pvc": {"claimName": "models", "path": "smollm2"}}),
        edit("spec.scheduling", {"affinity": {"nodeAffinity": {"anything": ["goes"]}},
                                 "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}),
    ]:
        if manifest["spec"].get("tensorParallelSize") == 8:
            manifest["spec"]["engine"]["device"] = "cuda"
        assert validate(manifest, CRD) == [], manifest["spec"]


def defaults_the_api_server_rejects(schema: dict) -> list[str]:
    """Check every `default` as the API server does when the CRD is created: against the schema and CEL
    rules of its own node, *as written* (defaults nested inside a default are not filled in first)."""
    errors = []
    for path, node in walk(schema):
        if "default" not in node:
            continue
        for error in jsonschema.Draft4Validator(_to_jsonschema(node)).iter_errors(node["default"]):
            errors.append(f"{path}: default: {error.message}")
        errors += [f"{path}: default: {e}" for e in cel_errors(node["default"], node, path)]
    return errors


def test_every_default_passes_its_own_schema_and_cel_rules() -> None:
    assert defaults_the_api_server_rejects(SCHEMA) == []


def test_a_bare_default_object_under_a_cel_rule_is_caught() -> None:
    """The bug the real API server found: `default: {}` under `self.minReplicas <= self.maxReplicas`."""
    schema = copy.deepcopy(SCHEMA)
    schema["properties"]["spec"]["properties"]["autoscaling"]["default"] = {}
    assert any("autoscaling" in e and "minReplicas" in e for e in defaults_the_api_server_rejects(schema))
