"""Pure builders of the children of one LLMDeployment: runtime Deployment(s), Service, PodDisruptionBudget.

Given the same spec they return the same objects, byte for byte; the reconciler only adds owner
references (kopf.adopt) and compares. Nothing here talks to the API server.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pagedserve.operator.api import LLMDeploymentSpec, served_model_name

OPERATOR_NAME = "pagedserve-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TP = "pagedserve.io/tensor-parallel-size"

ANNOTATION_CONFIG_HASH = "pagedserve.io/config-hash"
ANNOTATION_SERVED_MODEL = "pagedserve.io/served-model"
ANNOTATION_MODEL_REVISION = "pagedserve.io/model-revision"

RUNTIME_PORT = 8000
MODEL_MOUNT = "/models"
FETCHED_MODEL_DIR = f"{MODEL_MOUNT}/model"
API_KEY_ENV = "PAGEDSERVE_API_KEY"
POD_IP_ENV = "POD_IP"
# SIGTERM arrives after the preStop pause; the runtime then drains for --shutdown-timeout seconds.
GRACE_MARGIN_SECONDS = 5


def instance_labels(name: str) -> dict[str, str]:
    """Labels every pod of one LLMDeployment carries, whatever its TP degree (PDB, scale selector)."""
    return {LABEL_NAME: "pagedserve", LABEL_INSTANCE: name}


def pod_selector(name: str, tp: int) -> dict[str, str]:
    """Labels of the pods of one TP generation: the Deployment's selector and the Service's."""
    return {**instance_labels(name), LABEL_TP: str(tp)}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def deployment_name(name: str, tp: int) -> str:
    return f"{name}-tp{tp}"


def child_labels(name: str, component: str) -> dict[str, str]:
    return {**instance_labels(name), LABEL_COMPONENT: component, LABEL_MANAGED_BY: OPERATOR_NAME}


def config_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def with_config_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """Stamp the object with a hash of itself, so a changed spec is seen even where a field was removed."""
    digest = config_hash(obj)
    annotations = {**obj["metadata"].get("annotations", {}), ANNOTATION_CONFIG_HASH: digest}
    return {**obj, "metadata": {**obj["metadata"], "annotations": annotations}}


# -------------------------------------------------------------------------------------------- runtime


def model_path(spec: LLMDeploymentSpec) -> str:
    source = spec.model
    if source.pvc is not None:
        sub = source.pvc.path.strip("/")
        return f"{MODEL_MOUNT}/{sub}" if sub else MODEL_MOUNT
    if source.host_path is not None:
        return f"{MODEL_MOUNT}/{source.host_path.file}" if source.host_path.file else MODEL_MOUNT
    return FETCHED_MODEL_DIR


def runtime_args(name: str, spec: LLMDeploymentSpec, tp: int) -> list[str]:
    """The `pagedserve serve` command line: the contract with the runtime's CLI."""
    engine = spec.engine
    args = [
        model_path(spec),
        "--host", f"$({POD_IP_ENV})",  # expanded by the kubelet; pods may share one network stack
        "--port", str(RUNTIME_PORT),
        "--served-model-name", served_model_name(spec, name),
        "--max-model-len", str(engine.max_model_len),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
        "--block-size", str(engine.block_size),
    ]
    if engine.num_kv_cache_tokens is not None:
        args += ["--num-kv-cache-tokens", str(engine.num_kv_cache_tokens)]
    args += [
        "--tensor-parallel-size", str(tp),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--max-waiting-requests", str(engine.max_waiting_requests),
        "--shutdown-timeout", str(engine.shutdown_timeout_seconds),
        "--log-level", engine.log_level,
        "--device", engine.device,
        "--dtype", engine.dtype,
    ]
    if engine.api_key_secret is not None:
        args += ["--api-key", f"$({API_KEY_ENV})"]  # expanded by the kubelet from the Secret-backed env
    return args + list(spec.args)


def container_env(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if spec.engine.api_key_secret is not None:
        ref = spec.engine.api_key_secret
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    for var in spec.env:
        if var.secret_key_ref is not None:
            ref = var.secret_key_ref
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
        else:
            env.append({"name": var.name, "value": var.value or ""})
    return env


def container_resources(spec: LLMDeploymentSpec, tp: int) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if spec.engine.device != "cpu":
        requests[res.gpu_resource_name] = str(tp)
        limits[res.gpu_resource_name] = str(tp)
    return {"requests": requests, "limits": limits}


def probes(spec: LLMDeploymentSpec) -> dict[str, Any]:
    """Startup gates on /ready for the whole model-load budget; then readiness /ready, liveness /health."""
    startup_period = 10
    return {
        "startupProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": startup_period,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(spec.rollout.startup_timeout_seconds / startup_period),
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def model_volume(spec: LLMDeploymentSpec) -> dict[str, Any]:
    source = spec.model
    if source.pvc is not None:
        return {"name": "model", "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True}}
    if source.host_path is not None:
        return {"name": "model", "hostPath": {"path": source.host_path.path, "type": "Directory"}}
    return {"name": "model", "emptyDir": {"sizeLimit": source.cache_size}}


def fetch_container(spec: LLMDeploymentSpec) -> dict[str, Any]:
    """Init container that downloads a model URI into the shared volume before the runtime starts."""
    return {
        "name": "fetch-model",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python3", "-m", "pagedserve.operator.fetch"],
        "args": [spec.model.uri, FETCHED_MODEL_DIR],
        "env": container_env(spec),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
    }


def pod_template(name: str, spec: LLMDeploymentSpec, tp: int) -> dict[str, Any]:
    scheduling = spec.scheduling
    node_selector = dict(scheduling.node_selector)
    if spec.resources.gpu_type:
        node_selector[spec.resources.gpu_type_label] = spec.resources.gpu_type
    runtime = {
        "name": "runtime",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["pagedserve", "serve"],
        "args": runtime_args(name, spec, tp),
        "env": [{"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                *container_env(spec)],
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "resources": container_resources(spec, tp),
        **probes(spec),
        "lifecycle": {"preStop": {"sleep": {"seconds": spec.rollout.drain_seconds}}},
        "volumeMounts": [
            {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    pod_spec: dict[str, Any] = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": (
            spec.rollout.drain_seconds + spec.engine.shutdown_timeout_seconds + GRACE_MARGIN_SECONDS
        ),
        "containers": [runtime],
        "volumes": [
            model_volume(spec),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        ],
    }
    if spec.model.uri is not None:
        pod_spec["initContainers"] = [fetch_container(spec)]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if scheduling.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    return {
        "metadata": {
            "labels": {**pod_selector(name, tp), LABEL_COMPONENT: "runtime"},
            "annotations": {
                ANNOTATION_SERVED_MODEL: served_model_name(spec, name),
                ANNOTATION_MODEL_REVISION: spec.model.revision,
                "kubectl.kubernetes.io/default-container": "runtime",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(RUNTIME_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }


def build_deployment(name: str, namespace: str, spec: LLMDeploymentSpec, tp: int, replicas: int) -> dict[str, Any]:
    """The runtime Deployment of one TP degree: rolling updates with surge, gated on readiness."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name, tp),
            "namespace": namespace,
            "labels": {**child_labels(name, "runtime"), LABEL_TP: str(tp)},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": pod_selector(name, tp)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": spec.rollout.max_surge, "maxUnavailable": spec.rollout.max_unavailable},
            },
            "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
            "revisionHistoryLimit": 3,
            "template": pod_template(name, spec, tp),
        },
    }
    return with_config_hash(deployment)


def build_service(name: str, namespace: str, spec: LLMDeploymentSpec, serving_tp: int) -> dict[str, Any]:
    """The Service over the ready pods of the TP generation that serves traffic."""
    return with_config_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name, "service")},
        "spec": {
            "type": spec.service.type,
            "selector": pod_selector(name, serving_tp),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    })


def build_pdb(name: str, namespace: str) -> dict[str, Any]:
    """At most one runtime pod of the LLMDeployment evicted at a time; crash-looping pods never block drains."""
    return with_config_hash({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name, "disruption-budget")},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": instance_labels(name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    })


def service_endpoint(name: str, namespace: str, spec: LLMDeploymentSpec) -> dict[str, Any]:
    host = f"{name}.{namespace}.svc.cluster.local"
    return {"service": name, "host": host, "port": spec.service.port, "url": f"http://{host}:{spec.service.port}/v1"}
