"""`make demo`: the whole product on one machine.

A local Kubernetes control plane (built the first time), the operator installed with its Helm chart,
`examples/smollm2.yaml` applied, and a chat question sent through the LLMDeployment's Service with the
OpenAI client. The cluster keeps running afterwards for `kubectl`; `make cluster-down` stops it.
The offline demo (the engine alone, no cluster) is `python -m pagedserve.runtime.demo`.
"""

from __future__ import annotations

import argparse
import sys
import time

NAMESPACE = "default"
NAME = "smollm2"


def say(msg: str) -> None:
    print(msg, flush=True)


def start_cluster():
    from e2e.cluster import controlplane, versions
    from e2e.cluster.layout import Layout

    if (versions.STATE_DIR / "cluster.json").exists():
        layout = Layout.load()
        if controlplane.running(layout):
            say(f"[1/5] local cluster: already running at {layout.apiserver_url}")
            return layout
    say("[1/5] starting the local Kubernetes cluster (the first time builds it with Go: ~20 min on 2 cores)")
    return controlplane.up()


def wait_ready(cluster, timeout_s: float) -> None:
    """Print each phase change of the LLMDeployment until it is Ready."""
    from e2e import product

    started, last = time.monotonic(), None
    while True:
        obj = product.llmd(cluster, NAMESPACE, NAME)
        status = obj.get("status") or {}
        current = (status.get("phase", "Pending"), status.get("readyReplicas", 0))
        elapsed = time.monotonic() - started
        if current != last:
            message = product.condition(obj, "Progressing").get("message", "")
            say(f"      {elapsed:5.1f}s  phase {current[0]}, {current[1]} ready replica(s)  {message}")
            last = current
        if current[0] == "Ready" and status.get("observedGeneration") == obj["metadata"]["generation"]:
            return
        if elapsed > timeout_s:
            raise TimeoutError(f"llmd/{NAME} not Ready after {timeout_s:.0f}s; see `kubectl describe llmd {NAME}`")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    args = parser.parse_args(argv)

    from e2e import product
    from e2e.cluster import versions
    from e2e.cluster.client import Cluster
    from e2e.cluster.daemons import StartupError
    from e2e.cluster.prereqs import PrerequisiteMissing

    try:
        layout = start_cluster()
    except (PrerequisiteMissing, StartupError, RuntimeError) as err:
        say(f"error: {err}")
        return 1
    cluster = Cluster(layout)
    kubectl = f"KUBECONFIG={cluster.kubeconfig} {versions.BIN_DIR}/kubectl"

    t = time.monotonic()
    say(f"[2/5] installing the operator: helm upgrade --install {product.RELEASE} charts/pagedserve-operator "
        f"-n {product.OPERATOR_NAMESPACE}")
    product.install_operator(cluster)
    say(f"      operator Ready ({time.monotonic() - t:.0f}s)")

    model_dir = product.prepare_model_dir()
    say(f"[3/5] kubectl apply -f examples/smollm2.yaml  (hostPath.path -> {model_dir}, the GGUF's node folder)")
    product.apply(cluster, NAMESPACE, product.smollm2_manifest(NAME))

    say("[4/5] waiting for the LLMDeployment to be Ready (the runtime pod loads SmolLM2-135M-Instruct on CPU)")
    wait_ready(cluster, args.timeout)

    url = cluster.service_url(NAMESPACE, NAME)
    model = product.llmd(cluster, NAMESPACE, NAME)["status"]["servedModel"]
    say(f"[5/5] chat through the Service {NAME} ({url}) with the OpenAI client")
    product.wait_serving(url, model)
    t = time.monotonic()
    answer = product.chat(url, model, args.question, max_tokens=args.max_tokens, timeout_s=120)
    say(f"\nuser:      {args.question}\nassistant: {answer}\n({time.monotonic() - t:.1f}s, greedy, CPU)\n")
    say(f"$ kubectl get llmd\n{cluster.kubectl('get', 'llmd', '-n', NAMESPACE).stdout}")
    say("The cluster keeps running. Try:")
    say(f"  {kubectl} get llmd,deploy,pods,svc")
    say(f"  {kubectl} scale llmd {NAME} --replicas=2")
    say("Stop everything with: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
