"""The product's scenarios on the real control plane: the operator installed by its Helm chart, running as its
ServiceAccount, turns `examples/smollm2.yaml` into runtime pods that serve through their Service.

One LLMDeployment is shared by the scenarios that need a serving model (loading it is the slow part); they
run in file order and each leaves it at one Ready replica. Scenario numbers are those of issue 5.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from e2e import product
from e2e.cluster.client import Cluster, container_pid, wait_for
from e2e.cluster.daemons import alive, descendants

QUESTION = "What is the capital of France?"
MODEL = "smollm2-135m-instruct"  # the example's served model name
NAME = "smollm2"
SELECTOR = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=runtime"


@pytest.fixture(scope="module")
def served(cluster: Cluster, operator) -> str:
    """A namespace holding `smollm2`, applied from the example; removed at the end of the module."""
    with product.llmd_namespace(cluster, "e2e-llmd") as namespace:
        product.apply(cluster, namespace, product.smollm2_manifest(NAME))
        yield namespace


@pytest.fixture(scope="module")
def offline_answer() -> str:
    """The offline engine's greedy answer, in this process, on the same GGUF and engine settings."""
    from pagedserve.runtime import LLM, SamplingParams

    engine = product.smollm2_manifest()["spec"]["engine"]
    llm = LLM(str(product.prepare_model_dir() / product.smollm2_manifest()["spec"]["model"]["hostPath"]["file"]),
              max_model_len=engine["maxModelLen"], num_kv_cache_tokens=engine["numKvCacheTokens"])  # fmt: skip
    out = llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(temperature=0.0, max_tokens=32))
    return out[0].outputs[0].text


def runtime_pods(cluster: Cluster, namespace: str) -> list[dict]:
    return [p for p in cluster.pods(namespace, SELECTOR) if not p["metadata"].get("deletionTimestamp")]


# ---------------------------------------------------------------------------------------------- scenario 1


def test_scenario1_helm_install_apply_example_ready_and_same_answer_as_offline(
    cluster: Cluster, served: str, offline_answer: str
) -> None:
    started = time.monotonic()
    obj = product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1)
    ready_after = time.monotonic() - started
    table = cluster.kubectl("get", "llmd", "-n", served).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "MODEL", "TP", "READY", "DESIRED", "PHASE", "AGE"]
    assert row.split()[:6] == [NAME, MODEL, "1", "1", "1", "Ready"]
    assert obj["status"]["endpoint"]["service"] == NAME

    # The operator runs from the chart's Deployment, on the chart's ServiceAccount.
    (op_pod,) = cluster.ready_pods(product.OPERATOR_NAMESPACE, "app.kubernetes.io/name=pagedserve-operator")
    assert op_pod["spec"]["serviceAccountName"] == product.RELEASE

    url = cluster.service_url(served, NAME)
    product.wait_serving(url, MODEL)
    answer = product.chat(url, MODEL, QUESTION)
    assert answer == offline_answer, f"served {answer!r}, offline {offline_answer!r}"
    assert answer.strip(), "empty answer"
    print(f"\nscenario 1: Ready {ready_after:.0f}s after the fixture; answer {answer!r}")


# ---------------------------------------------------------------------------------------------- scenario 2


def invalid(path: str, value) -> dict:
    """The example with one field set; path is dotted from the root."""
    manifest = product.smollm2_manifest(NAME)
    *parents, leaf = path.split(".")
    node = manifest
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return manifest


# (manifest, fragments the API server's message must contain: the field's path and what is wrong)
INVALID = {
    # structural schema: types, enums, bounds, unknown fields
    "tp-above-8": (invalid("spec.tensorParallelSize", 16), ["spec.tensorParallelSize", "less than or equal to 8"]),
    "device-enum": (invalid("spec.engine.device", "tpu"), ["spec.engine.device", "supported values"]),
    "negative-replicas": (invalid("spec.replicas", -1), ["spec.replicas", "greater than or equal to 0"]),
    "bad-quantity": (invalid("spec.resources.memory", "lots"), ["spec.resources.memory", "should match"]),
    "stable-window-under-panic-window": (invalid("spec.autoscaling", {"stableWindowSeconds": 5}),
                                         ["spec.autoscaling.stableWindowSeconds", "greater than or equal to 6"]),
    "unknown-field": (invalid("spec.gpus", 2), ['unknown field "spec.gpus"']),
    # CEL x-kubernetes-validations
    "tp-not-power-of-two": (invalid("spec.tensorParallelSize", 3), ["spec.tensorParallelSize", "power of two"]),
    "min-above-max": (invalid("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
                      ["spec.autoscaling.minReplicas", "must not exceed maxReplicas"]),
    "two-model-sources": (invalid("spec.model.uri", "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"),
                          ["spec.model", "exactly one of model.pvc, model.hostPath and model.uri"]),
    "cpu-with-gpu-type": (invalid("spec.resources.gpuType", "NVIDIA-H100"),
                          ["spec.resources.gpuType", "cannot be set when engine.device is cpu"]),
    "surge-and-unavailable-zero": (invalid("spec.rollout", {"maxSurge": 0, "maxUnavailable": 0}),
                                   ["spec.rollout", "must not both be 0"]),
    "name-too-long": (invalid("metadata.name", "x" * 51), ["at most 50 characters"]),
}  # fmt: skip


def test_scenario2_invalid_manifests_are_rejected_by_the_api_server_naming_the_field(
    cluster: Cluster, namespace: str, operator
) -> None:
    problems = []
    for case, (manifest, fragments) in INVALID.items():
        done = cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)
        message = done.stderr
        if done.returncode == 0:
            problems.append(f"{case}: accepted")
        elif not all(f in message for f in fragments):
            problems.append(f"{case}: {message.strip()!r} lacks {fragments}")
    assert not problems, "\n".join(problems)
    assert cluster.get_json("llmd", "-n", namespace)["items"] == []
    # The example itself is accepted by the same server.
    cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                    input=json.dumps(product.smollm2_manifest(NAME)))  # fmt: skip


# ---------------------------------------------------------------------------------------------- scenario 3


def test_scenario3_kubectl_scale_llmd_through_the_scale_subresource(cluster: Cluster, served: str) -> None:
    product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1)
    scale_path = f"/apis/pagedserve.io/v1alpha1/namespaces/{served}/llmdeployments/{NAME}/scale"
    cluster.kubectl("scale", "llmd", NAME, "-n", served, "--replicas=2")
    product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=2, timeout_s=180)
    assert len([p for p in runtime_pods(cluster, served) if p in cluster.ready_pods(served, SELECTOR)]) == 2
    scale = json.loads(cluster.kubectl("get", "--raw", scale_path).stdout)
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (2, 2)

    cluster.kubectl("scale", "llmd", NAME, "-n", served, "--replicas=1")
    product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1)
    wait_for(lambda: len(runtime_pods(cluster, served)) == 1, 90, "one runtime pod left")


# ---------------------------------------------------------------------------------------------- scenario 6


def test_scenario6_killed_runtime_process_degrades_then_recovers(cluster: Cluster, served: str) -> None:
    product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1)
    (pod,) = runtime_pods(cluster, served)
    pid = container_pid(pod)
    os.kill(pid, signal.SIGKILL)

    degraded = product.wait_phase(cluster, served, NAME, "Degraded", timeout_s=60)
    assert product.condition(degraded, "Degraded")["status"] == "True"
    assert product.condition(degraded, "Ready")["status"] == "False"
    recovered = product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1, timeout_s=180)
    assert product.condition(recovered, "Degraded")["status"] == "False"
    (again,) = runtime_pods(cluster, served)
    assert container_pid(again) != pid
    assert again["status"]["containerStatuses"][0]["restartCount"] >= 1
    assert product.chat(cluster.service_url(served, NAME), MODEL, QUESTION)


# ---------------------------------------------------------------------------------------------- scenario 4


def test_scenario4_args_change_rolls_pods_with_zero_failed_requests(
    cluster: Cluster, served: str, offline_answer: str
) -> None:
    product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1)
    old_pods = {p["metadata"]["name"] for p in runtime_pods(cluster, served)}
    url = cluster.service_url(served, NAME)
    product.wait_serving(url, MODEL)
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 240  # bounded, whatever happens to the test
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                results.append("ok" if product.chat(url, MODEL, QUESTION, max_tokens=4) else "empty")
            except Exception as err:
                results.append(f"error {type(err).__name__}: {err}")

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(2)
        cluster.kubectl("patch", "llmd", NAME, "-n", served, "--type=merge",
                        "-p", json.dumps({"spec": {"args": ["--engine-process", "--engine-hang-timeout", "120"]}}))
        product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1, timeout_s=180)
        wait_for(lambda: not ({p["metadata"]["name"] for p in cluster.pods(served, SELECTOR)} & old_pods), 90,
                 "the old pod to be gone")  # fmt: skip
        time.sleep(2)
    finally:
        stop.set()
        worker.join()
    (pod,) = runtime_pods(cluster, served)
    assert pod["spec"]["containers"][0]["args"][-3:] == ["--engine-process", "--engine-hang-timeout", "120"]
    failures = [r for r in results if r != "ok"]
    assert len(results) >= 5 and not failures, f"{len(failures)} of {len(results)} failed: {failures[:3]}"
    # The new pod runs its engine core in a process of its own, answers as the offline engine does, and keeps
    # a JSON schema (structured outputs) through the Service.
    assert len(descendants(container_pid(pod))) >= 1
    assert product.chat(url, MODEL, QUESTION) == offline_answer
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
              "required": ["city"], "additionalProperties": False}
    text = product.chat(url, MODEL, QUESTION, max_tokens=64,
                        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert list(json.loads(text)) == ["city"], text
    print(f"\nscenario 4: {len(results)} requests during the rollout, none failed; structured answer {text}")


# ---------------------------------------------------------------------------------------------- scenario 8


def test_scenario8_deleting_the_llmdeployment_removes_every_child_and_process(cluster: Cluster, served: str) -> None:
    product.wait_phase(cluster, served, NAME, "Ready", ready_replicas=1)
    pids = [container_pid(p) for p in runtime_pods(cluster, served)]
    assert pids and all(alive(pid) for pid in pids)
    pids += [child for pid in pids for child in descendants(pid)]  # the engine process (scenario 4's --engine-process)
    uid = product.llmd(cluster, served, NAME)["metadata"]["uid"]

    started = time.monotonic()
    cluster.kubectl("delete", "llmd", NAME, "-n", served, "--wait=false")

    def children() -> list[str]:
        kinds = "deployments,replicasets,pods,services,poddisruptionbudgets"
        items = cluster.get_json(kinds, "-n", served)["items"]
        return [f"{i['kind']}/{i['metadata']['name']}" for i in items]

    wait_for(lambda: not children(), 120, f"the children to go (left: {children()})")
    wait_for(lambda: not any(alive(pid) for pid in pids), 60, "the runtime processes to stop")
    wait_for(lambda: cluster.kubectl("get", "llmd", NAME, "-n", served, check=False).returncode != 0, 30,
             "the LLMDeployment to go")  # fmt: skip
    # Nothing anywhere still points at the deleted owner.
    for kind in ("deployments", "replicasets", "services", "poddisruptionbudgets", "pods"):
        for item in cluster.get_json(kind, "-A")["items"]:
            owners = item["metadata"].get("ownerReferences") or []
            assert all(o["uid"] != uid for o in owners), f"{kind}/{item['metadata']['name']} outlived its owner"
    print(f"\nscenario 8: children and processes gone {time.monotonic() - started:.1f}s after the delete")


