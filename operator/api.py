"""The `LLMDeployment` API (pagedserve.io/v1alpha1), defined once.

These pydantic models are the single source of the CRD: `crdgen` turns them into the OpenAPI schema
(defaults, enums, bounds and CEL rules included), and the operator parses every object it reconciles
through them, so the defaults it assumes are the defaults the API server applies.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "pagedserve.io"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ["llmd"]

DEFAULT_IMAGE = "ghcr.io/pagedserve/runtime:0.1.0"
TP_DEGREES = (1, 2, 4, 8)

# Kubernetes quantities ("500m", "16Gi", "1.5"); the API server re-checks them on the pod.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
MODEL_URI_PATTERN = r"^(hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?|s3://[a-z0-9.-]+/.+|file:///.+)$"


def rules(*items: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """CEL `x-kubernetes-validations` as a json_schema_extra: (rule, message[, fieldPath])."""
    out = []
    for item in items:
        rule = {"rule": item[0], "message": item[1]}
        if len(item) == 3:
            rule["fieldPath"] = item[2]
        out.append(rule)
    return {"x-kubernetes-validations": out}


def nested(model: type[BaseModel], **kwargs: Any) -> Any:
    """A sub-object whose schema default is the model's complete default value.

    Not `{}`: the API server validates a default as written, without filling in the defaults inside
    it, so CEL rules on the sub-object (`self.minReplicas <= self.maxReplicas`) would find no such key
    and the CRD itself would be rejected.
    """
    default = model().model_dump(by_alias=True, exclude_none=True, mode="json")
    return Field(default_factory=model, json_schema_extra={"default": default}, **kwargs)


def empty_list(**kwargs: Any) -> Any:
    """A list that defaults to `[]` in the schema too, so CEL rules can always read it."""
    extra = {"default": [], **kwargs.pop("json_schema_extra", {})}
    return Field(default_factory=list, json_schema_extra=extra, **kwargs)


def empty_map(**kwargs: Any) -> Any:
    return Field(default_factory=dict, json_schema_extra={"default": {}}, **kwargs)


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


# ----------------------------------------------------------------------------------------------- spec


class PvcSource(Model):
    claim_name: str = Field(min_length=1, max_length=253, description="PersistentVolumeClaim holding the model.")
    path: str = Field("", max_length=1024, description="Folder of the model inside the claim.")


class HostPathSource(Model):
    path: str = Field(pattern=r"^/", max_length=1024, description="Model folder on the node.")
    file: str = Field(
        "",
        pattern=r"^([A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*)?$",
        max_length=1024,
        description="A file inside that folder to serve (e.g. a .gguf); empty: the folder is the model.",
    )


class ModelSource(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "(has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1",
                "exactly one of model.pvc, model.hostPath and model.uri must be set",
            )
        )
    )
    pvc: PvcSource | None = None
    host_path: HostPathSource | None = None
    uri: str | None = Field(
        None,
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description="hf://org/name@revision, s3://bucket/prefix or file:///path; fetched by an init container.",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._/:-]+$",
        max_length=253,
        description="Served model name (the OpenAI `model` field); defaults to the object's name.",
    )
    cache_size: str = Field("50Gi", pattern=QUANTITY_PATTERN, description="Size limit of the fetched model's volume.")

    @property
    def revision(self) -> str:
        """The revision named in an hf:// URI, else an empty string."""
        if self.uri and self.uri.startswith("hf://") and "@" in self.uri:
            return self.uri.rsplit("@", 1)[1]
        return ""


class SecretKeyRef(Model):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)


class EnvVar(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(("!(has(self.value) && has(self.secretKeyRef))", "env: set value or secretKeyRef, not both"))
    )
    name: str = Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=253)
    value: str | None = Field(None, max_length=32768)
    secret_key_ref: SecretKeyRef | None = None


class EngineSpec(Model):
    max_model_len: int = Field(4096, ge=16, le=1_048_576, description="Longest prompt + completion in tokens.")
    gpu_memory_utilization: float = Field(0.9, ge=0.1, le=0.99)
    block_size: Literal[8, 16, 32] = 16
    num_kv_cache_tokens: int | None = Field(None, ge=16, description="KV-cache size in tokens on CPU.")
    max_num_seqs: int = Field(256, ge=1, le=4096)
    max_waiting_requests: int = Field(1024, ge=0, le=1_000_000)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shutdown_timeout_seconds: int = Field(30, ge=1, le=3600, description="Drain budget after SIGTERM.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api_key_secret: SecretKeyRef | None = Field(None, description="Secret key holding the API key clients send.")


class ResourcesSpec(Model):
    cpu: str = Field("4", pattern=QUANTITY_PATTERN)
    memory: str = Field("32Gi", pattern=QUANTITY_PATTERN)
    shm_size: str = Field("8Gi", pattern=QUANTITY_PATTERN, description="Size limit of /dev/shm (memory-backed).")
    gpu_type: str | None = Field(None, max_length=63, description="Node label value that names the GPU model.")
    gpu_type_label: str = Field("nvidia.com/gpu.product", max_length=253)
    gpu_resource_name: str = Field("nvidia.com/gpu", max_length=253)


class AutoscalingSpec(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not exceed maxReplicas", ".minReplicas"),
        )
    )
    enabled: bool = False
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(4, ge=1, le=1000)
    target_queue_depth: float = Field(4.0, gt=0, le=10_000, description="Waiting requests per replica.")
    target_kv_cache_usage: float = Field(0.8, gt=0, le=1, description="KV-cache use per replica, 0..1.")
    scale_up_stabilization_seconds: int = Field(0, ge=0, le=3600)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=86400)
    # Knative's bounds on its stable window are 5 s..1 h; ours starts at the 6 s panic window, which must fit in it.
    stable_window_seconds: int = Field(
        60,
        ge=6,
        le=3600,
        description="Load is averaged over this window (Knative's stable window); panic mode lasts as long.",
    )
    allowed_tensor_parallel_sizes: list[int] = empty_list(
        max_length=4,
        json_schema_extra=rules(("self.all(d, d in [1, 2, 4, 8])", "allowed TP degrees must be among 1, 2, 4, 8")),
        description="TP degrees the autoscaler may switch between; empty keeps spec.tensorParallelSize.",
    )
    gpu_budget: int | None = Field(None, ge=1, le=100_000, description="Most GPUs all replicas may use.")
    prometheus_url: str | None = Field(None, pattern=r"^https?://", max_length=1024)
    num_key_value_heads: int | None = Field(
        None, ge=1, le=1024, description="The model's KV heads (config.json); TP degrees must split or replicate them."
    )
    num_attention_heads: int | None = Field(None, ge=1, le=4096, description="The model's query heads (config.json).")
    tensor_parallel_cooldown_seconds: int = Field(900, ge=0, le=86400, description="Least time between TP changes.")
    tensor_parallel_up_window_seconds: int = Field(
        120,
        ge=0,
        le=86400,
        description="How long replicas must stay exhausted with KV use above target and requests queueing "
        "before the TP degree steps up.",
    )
    tensor_parallel_down_window_seconds: int = Field(
        1800,
        ge=0,
        le=604800,
        description="How long load must stay low at minReplicas before the TP degree steps down.",
    )


class RolloutSpec(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "!(type(self.maxSurge) == int && self.maxSurge == 0"
                " && type(self.maxUnavailable) == int && self.maxUnavailable == 0)",
                "rollout.maxSurge and rollout.maxUnavailable must not both be 0",
            )
        )
    )
    max_surge: int | str = Field(1, json_schema_extra={"x-kubernetes-int-or-string": True})
    max_unavailable: int | str = Field(0, json_schema_extra={"x-kubernetes-int-or-string": True})
    progress_deadline_seconds: int = Field(1800, ge=60, le=86400, description="New pods must be Ready by then.")
    startup_timeout_seconds: int = Field(1800, ge=30, le=86400, description="Model load budget of one pod.")
    drain_seconds: int = Field(5, ge=0, le=300, description="preStop pause so endpoints drop before SIGTERM.")


class Toleration(Model):
    key: str | None = Field(None, max_length=316)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SchedulingSpec(Model):
    node_selector: dict[str, str] = empty_map()
    tolerations: list[Toleration] = empty_list(max_length=32)
    affinity: dict[str, Any] | None = Field(None, description="A core/v1 Affinity, passed to the pods as is.")
    priority_class_name: str | None = Field(None, max_length=253)


class ServiceSpec(Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(8000, ge=1, le=65535)


class LLMDeploymentSpec(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "!has(self.autoscaling.allowedTensorParallelSizes)"
                " || self.autoscaling.allowedTensorParallelSizes.size() == 0"
                " || self.tensorParallelSize in self.autoscaling.allowedTensorParallelSizes",
                "tensorParallelSize must be one of autoscaling.allowedTensorParallelSizes",
                ".tensorParallelSize",
            ),
            (
                "!has(self.autoscaling.gpuBudget)"
                " || self.autoscaling.gpuBudget >= self.autoscaling.minReplicas * self.tensorParallelSize",
                "autoscaling.gpuBudget must cover minReplicas * tensorParallelSize GPUs",
                ".autoscaling.gpuBudget",
            ),
            (
                "!(self.engine.device == 'cpu' && has(self.resources.gpuType))",
                "resources.gpuType cannot be set when engine.device is cpu",
                ".resources.gpuType",
            ),
        )
    )
    model: ModelSource
    image: str = Field(DEFAULT_IMAGE, min_length=1, max_length=1024)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    args: list[str] = empty_list(max_length=64, description="Extra `pagedserve serve` flags.")
    env: list[EnvVar] = empty_list(max_length=64)
    engine: EngineSpec = nested(EngineSpec)
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=8,
        json_schema_extra=rules(("self in [1, 2, 4, 8]", "tensorParallelSize must be a power of two no larger than 8")),
        description="GPUs per replica.",
    )
    replicas: int = Field(1, ge=0, le=1000)
    resources: ResourcesSpec = nested(ResourcesSpec)
    autoscaling: AutoscalingSpec = nested(AutoscalingSpec)
    rollout: RolloutSpec = nested(RolloutSpec)
    scheduling: SchedulingSpec = nested(SchedulingSpec)
    service: ServiceSpec = nested(ServiceSpec)


# --------------------------------------------------------------------------------------------- status


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int = 0


class Endpoint(Model):
    service: str
    host: str
    port: int
    url: str


class AutoscalerStatus(Model):
    """Written by the autoscaler (issue 6): what it wanted, why, and the metric values it used."""

    desired_replicas: int | None = None
    desired_tensor_parallel_size: int | None = None
    current_replicas: int | None = None
    ready_replicas: int | None = None
    current_tensor_parallel_size: int | None = None
    last_decision: str | None = None
    last_decision_reason: str | None = None
    last_decision_message: str | None = None
    last_decision_time: str | None = None
    last_change_time: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class LLMDeploymentStatus(Model):
    observed_generation: int = 0
    phase: Literal["Pending", "Progressing", "Ready", "Degraded"] = "Pending"
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    replicas: int = 0
    ready_replicas: int = 0
    tensor_parallel_size: int | None = Field(None, description="TP degree the Service routes to.")
    target_tensor_parallel_size: int | None = Field(None, description="TP degree being rolled out, if any.")
    selector: str = ""
    endpoint: Endpoint | None = None
    served_model: str = ""
    model_revision: str = ""
    autoscaler: AutoscalerStatus | None = None


class LLMDeployment(Model):
    api_version: str = f"{GROUP}/{VERSION}"
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LLMDeploymentSpec
    status: LLMDeploymentStatus | None = None


def served_model_name(spec: LLMDeploymentSpec, object_name: str) -> str:
    return spec.model.name or object_name
