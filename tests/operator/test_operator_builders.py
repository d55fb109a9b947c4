"""Child builders: given a spec, the exact Deployment, Service and PodDisruptionBudget (written out by hand)."""

from __future__ import annotations

import copy

import yaml
from operator_harness import ROOT

from pagedserve.operator import builders
from pagedserve.operator.api import LLMDeploymentSpec

SMOLLM2 = LLMDeploymentSpec.model_validate(yaml.safe_load((ROOT / "examples/smollm2.yaml").read_text())["spec"])
LLAMA = LLMDeploymentSpec.model_validate(yaml.safe_load((ROOT / "examples/llama.yaml").read_text())["spec"])


def without_hash(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"]["annotations"].pop(builders.ANNOTATION_CONFIG_HASH)
    if not obj["metadata"]["annotations"]:
        del obj["metadata"]["annotations"]
    return obj


def test_smollm2_deployment_exactly() -> None:
    dep = builders.build_deployment("smollm2", "demo", SMOLLM2, tp=1, replicas=2)
    selector = {"app.kubernetes.io/name": "pagedserve", "app.kubernetes.io/instance": "smollm2",
                "pagedserve.io/tensor-parallel-size": "1"}
    expected = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "smollm2-tp1",
            "namespace": "demo",
            "labels": {**selector, "app.kubernetes.io/component": "runtime",
                       "app.kubernetes.io/managed-by": "pagedserve-operator"},
        },
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": 300,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": {**selector, "app.kubernetes.io/component": "runtime"},
                    "annotations": {
                        "pagedserve.io/served-model": "smollm2-135m-instruct",
                        "pagedserve.io/model-revision": "",
                        "kubectl.kubernetes.io/default-container": "runtime",
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": "8000",
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 5 + 30 + 5,  # preStop + --shutdown-timeout + margin
                    "containers": [{
                        "name": "runtime",
                        "image": "ghcr.io/pagedserve/runtime:0.1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["pagedserve", "serve"],
                        "args": [
                            "/models/SmolLM2-135M-Instruct.Q4_1.gguf", "--host", "$(POD_IP)", "--port", "8000",
                            "--served-model-name", "smollm2-135m-instruct", "--max-model-len", "2048",
                            "--gpu-memory-utilization", "0.9", "--block-size", "16",
                            "--num-kv-cache-tokens", "16384", "--tensor-parallel-size", "1",
                            "--max-num-seqs", "16", "--max-waiting-requests", "1024", "--shutdown-timeout", "30",
                            "--log-level", "info", "--device", "cpu", "--dtype", "float32",
                        ],
                        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
                        "startupProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 10,
                                         "timeoutSeconds": 5, "failureThreshold": 30},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5,
                                           "timeoutSeconds": 3, "failureThreshold": 2},
                        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                                          "timeoutSeconds": 5, "failureThreshold": 6},
                        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                        "volumeMounts": [{"name": "model", "mountPath": "/models", "readOnly": True},
                                         {"name": "dshm", "mountPath": "/dev/shm"}],
                        "securityContext": {"allowPrivilegeEscalation": False},
                    }],
                    "volumes": [
                        {"name": "model", "hostPath": {"path": "/var/lib/pagedserve/models/smollm2-135m-instruct",
                                                       "type": "Directory"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
                    ],
                },
            },
        },
    }
    assert without_hash(dep) == expected
    assert dep["metadata"]["annotations"][builders.ANNOTATION_CONFIG_HASH] == builders.config_hash(expected)


def test_llama_gpus_pvc_and_node_selector() -> None:
    dep = builders.build_deployment("llama", "ml", LLAMA, tp=2, replicas=1)
    pod = dep["spec"]["template"]["spec"]
    runtime = pod["containers"][0]
    assert dep["metadata"]["name"] == "llama-tp2"
    assert runtime["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
                                    "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"}}
    assert runtime["args"][:1] == ["/models/meta-llama/Llama-3.1-8B-Instruct"]
    assert runtime["args"][runtime["args"].index("--tensor-parallel-size") + 1] == "2"
    assert "--num-kv-cache-tokens" not in runtime["args"]
    assert pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["volumes"][1]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert "initContainers" not in pod


def test_uri_source_fetches_in_an_init_container_and_api_key_from_secret() -> None:
    raw = SMOLLM2.model_dump(by_alias=True, exclude_none=True)
    raw["model"] = {"uri": "hf://HuggingFaceTB/SmolLM2-135M@v2", "name": "smollm2-135m-instruct"}
    raw["engine"]["apiKeySecret"] = {"name": "keys", "key": "api"}
    spec = LLMDeploymentSpec.model_validate(raw)
    pod = builders.build_deployment("smollm2", "demo", spec, tp=1, replicas=1)["spec"]["template"]
    init = pod["spec"]["initContainers"][0]
    assert init["command"] == ["python3", "-m", "pagedserve.operator.fetch"]
    assert init["args"] == ["hf://HuggingFaceTB/SmolLM2-135M@v2", "/models/model"]
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    assert pod["spec"]["volumes"][0] == {"name": "model", "emptyDir": {"sizeLimit": "50Gi"}}
    runtime = pod["spec"]["containers"][0]
    assert runtime["args"][0] == "/models/model"
    assert runtime["args"][-2:] == ["--api-key", "$(PAGEDSERVE_API_KEY)"]
    assert runtime["env"][1:] == [{"name": "PAGEDSERVE_API_KEY",
                               "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api"}}}]
    assert pod["metadata"]["annotations"]["pagedserve.io/model-revision"] == "v2"


def test_service_and_pdb_exactly() -> None:
    service = builders.build_service("smollm2", "demo", SMOLLM2, serving_tp=4)
    labels = {"app.kubernetes.io/name": "pagedserve", "app.kubernetes.io/instance": "smollm2",
              "app.kubernetes.io/managed-by": "pagedserve-operator"}
    assert without_hash(service) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "smollm2", "namespace": "demo", "labels": {**labels, "app.kubernetes.io/component": "service"}},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": "pagedserve", "app.kubernetes.io/instance": "smollm2",
                         "pagedserve.io/tensor-parallel-size": "4"},
            "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    assert without_hash(builders.build_pdb("smollm2", "demo")) == {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "smollm2", "namespace": "demo",
                     "labels": {**labels, "app.kubernetes.io/component": "disruption-budget"}},
        "spec": {"maxUnavailable": 1,
                 "selector": {"matchLabels": {"app.kubernetes.io/name": "pagedserve",
                                              "app.kubernetes.io/instance": "smollm2"}},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def test_hash_moves_with_every_spec_change_and_only_then() -> None:
    base = builders.build_deployment("smollm2", "demo", SMOLLM2, 1, 1)
    assert base == builders.build_deployment("smollm2", "demo", SMOLLM2, 1, 1)
    changed = [
        SMOLLM2.model_copy(update={"args": ["--x"]}),
        SMOLLM2.model_copy(update={"image": "other:1"}),
        SMOLLM2.model_copy(update={"engine": SMOLLM2.engine.model_copy(update={"max_model_len": 1024})}),
    ]
    hashes = {builders.build_deployment("smollm2", "demo", s, 1, 1)["metadata"]["annotations"][
        builders.ANNOTATION_CONFIG_HASH] for s in changed}
    hashes.add(base["metadata"]["annotations"][builders.ANNOTATION_CONFIG_HASH])
    assert len(hashes) == 4


def test_children_validate_against_kubernetes_schemas() -> None:
    """The API server's own published schemas (kubernetes-validate) accept every child, strictly."""
    import kubernetes_validate

    for spec in (SMOLLM2, LLAMA):
        for obj in (builders.build_deployment("x", "demo", spec, 2, 1), builders.build_service("x", "demo", spec, 2),
                    builders.build_pdb("x", "demo")):
            kubernetes_validate.validate(obj, "1.31", strict=True)
