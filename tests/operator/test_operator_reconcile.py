"""The running operator against a Kubernetes API emulator (kmock): children, idempotence, repair, rollouts.

kmock stores objects and serves watches; it runs no controllers. The tests play the Deployment
controller by writing Deployment status (`set_deployment_status`), and assert on what the operator
wrote, compared with the pure builders' objects and with hand-written expectations.
"""

from __future__ import annotations

import asyncio

import pytest
from operator_harness import DEPLOYMENTS, LLMD, NS, PDBS, SERVICES, Cluster, eventually, load_yaml

from pagedserve.operator import builders
from pagedserve.operator.api import LLMDeploymentSpec
from pagedserve.operator.reconcile import is_subset

pytestmark = pytest.mark.asyncio
TP = builders.LABEL_TP


def condition(status: dict, type: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type)


def writes(cluster: Cluster) -> list[tuple[str, str]]:
    """(method, path) of every write the emulator has received, in order (events excluded)."""
    return [
        (r.method, r.url.path) for r in list(cluster.server)
        if r.method in ("POST", "PATCH", "PUT", "DELETE") and "/events" not in r.url.path
    ]


async def ready_smollm2(cluster: Cluster) -> dict:
    """Apply the demo example and play the Deployment controller until the operator reports Ready."""
    cluster.llmd(load_yaml("examples/smollm2.yaml"))
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1"))
    await cluster.set_deployment_status("smollm2-tp1")
    return await eventually(lambda: (s := cluster.get(LLMD, "smollm2").get("status", {})).get("phase") == "Ready" and s)


async def test_creates_owned_children_as_built_and_reports_ready(cluster: Cluster, operator) -> None:
    manifest = load_yaml("examples/smollm2.yaml")
    llmd = cluster.llmd(manifest)
    spec = LLMDeploymentSpec.model_validate(manifest["spec"])
    deployment = await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1"))
    service = await eventually(lambda: cluster.get(SERVICES, "smollm2"))
    pdb = await eventually(lambda: cluster.get(PDBS, "smollm2"))

    owner = {"apiVersion": "pagedserve.io/v1alpha1", "kind": "LLMDeployment", "name": "smollm2",
             "uid": llmd["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    for child, built in [
        (deployment, builders.build_deployment("smollm2", NS, spec, 1, 1)),
        (service, builders.build_service("smollm2", NS, spec, 1)),
        (pdb, builders.build_pdb("smollm2", NS)),
    ]:
        assert child["metadata"]["ownerReferences"] == [owner]
        assert is_subset(built, child), f"{child['kind']} differs from its builder's object"
    assert service["spec"]["selector"][TP] == "1"

    status = await eventually(lambda: cluster.get(LLMD, "smollm2").get("status"))
    assert condition(status, "Progressing")["status"] == "True"
    await cluster.set_deployment_status("smollm2-tp1")
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["phase"] == "Ready" and s)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert status["observedGeneration"] == 1
    assert (status["readyReplicas"], status["replicas"], status["tensorParallelSize"]) == (1, 1, 1)
    assert status["endpoint"] == {"service": "smollm2", "host": f"smollm2.{NS}.svc.cluster.local", "port": 8000,
                                  "url": f"http://smollm2.{NS}.svc.cluster.local:8000/v1"}
    assert status["servedModel"] == "smollm2-135m-instruct"
    assert status["selector"] == "app.kubernetes.io/instance=smollm2,app.kubernetes.io/name=pagedserve"
    reasons = await eventually(lambda: {e.get("reason") for e in cluster.events()} >= {"Reconciled", "Ready"}
                               and {e.get("reason") for e in cluster.events()})
    assert "Reconciled" in reasons


async def test_second_pass_writes_nothing(cluster: Cluster, operator) -> None:
    await ready_smollm2(cluster)
    await asyncio.sleep(0.5)  # let any trailing pass finish
    before = writes(cluster)
    await asyncio.sleep(1.2)  # four resync periods (0.3 s) in the test configuration
    assert writes(cluster) == before


async def test_restores_deleted_and_hand_edited_children(cluster: Cluster, operator) -> None:
    await ready_smollm2(cluster)
    built = cluster.get(SERVICES, "smollm2")
    await cluster.delete(SERVICES, "smollm2")
    await cluster.delete(PDBS, "smollm2")
    restored = await eventually(lambda: cluster.get(SERVICES, "smollm2"))
    assert restored["spec"] == built["spec"]
    await eventually(lambda: cluster.get(PDBS, "smollm2"))

    # A hand edit of the runtime's args (kubectl edit) is put back.
    url = f"/apis/apps/v1/namespaces/{NS}/deployments/smollm2-tp1"
    dep = cluster.get(DEPLOYMENTS, "smollm2-tp1")
    wanted_args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    hand_edit = {"spec": {"template": {"spec": {"containers": [{**dep["spec"]["template"]["spec"]["containers"][0],
                                                                "args": ["--oops"]}]}}}}
    assert (await cluster.server.patch(url, json=hand_edit)).status == 200
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1")["spec"]["template"]["spec"]["containers"][0][
        "args"] == wanted_args)


async def test_retries_server_errors_and_conflicts(cluster: Cluster, operator) -> None:
    # The first two reads of the object fail with 500/503; the Service read is stale (404) although it exists.
    cluster.server[f"get /apis/pagedserve.io/v1alpha1/namespaces/{NS}/llmdeployments/smollm2"][:2] << 503
    existing = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "smollm2", "namespace": NS, "labels": {"stale": "yes"}},
                "spec": {"selector": {"wrong": "selector"}, "ports": [{"port": 1}]}}
    cluster.server.objects[SERVICES, NS, "smollm2"] = existing
    cluster.server[f"get /api/v1/namespaces/{NS}/services/smollm2"][:1] << 404
    cluster.llmd(load_yaml("examples/smollm2.yaml"))

    service = await eventually(lambda: (s := cluster.get(SERVICES, "smollm2"))["spec"]["selector"].get(TP) and s)
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "pagedserve",
                                           "app.kubernetes.io/instance": "smollm2", TP: "1"}
    posts = [w for w in writes(cluster) if w == ("POST", f"/api/v1/namespaces/{NS}/services")]
    assert len(posts) == 1  # answered 409, then compared and patched
    assert ("PATCH", f"/api/v1/namespaces/{NS}/services/smollm2") in writes(cluster)
    assert operator.error is None


async def test_status_write_retried_on_5xx(cluster: Cluster, operator) -> None:
    status_url = f"/apis/pagedserve.io/v1alpha1/namespaces/{NS}/llmdeployments/smollm2/status"
    cluster.server[f"patch {status_url}"][:2] << 500
    cluster.llmd(load_yaml("examples/smollm2.yaml"))
    # Two 500s, then the client's own retry gets through, within one reconcile pass.
    await eventually(lambda: sum(1 for w in writes(cluster) if w == ("PATCH", status_url)) >= 3)
    await eventually(lambda: cluster.get(LLMD, "smollm2").get("status", {}).get("phase") == "Progressing")
    assert operator.memo.shared.kube is not None


async def test_rolling_update_then_progress_deadline_degrades_and_old_pods_serve(cluster: Cluster, operator) -> None:
    await ready_smollm2(cluster)
    old_hash = cluster.get(DEPLOYMENTS, "smollm2-tp1")["metadata"]["annotations"][builders.ANNOTATION_CONFIG_HASH]
    await cluster.edit_spec("smollm2", {"args": ["--enable-prefix-caching"]})
    dep = await eventually(lambda: (d := cluster.get(DEPLOYMENTS, "smollm2-tp1"))["metadata"]["annotations"][
        builders.ANNOTATION_CONFIG_HASH] != old_hash and d)
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--enable-prefix-caching"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["observedGeneration"] == 2 and s)
    assert condition(status, "Progressing")["reason"] == "RollingUpdate"

    # The Deployment controller gives up on the new pods; the old one is still Ready (maxUnavailable 0).
    # Surge pod (updated) never Ready; the old pod is.
    await cluster.set_deployment_status("smollm2-tp1", total=2, updated=1, ready=1, progress="ProgressDeadlineExceeded")
    dep = cluster.get(DEPLOYMENTS, "smollm2-tp1")
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["phase"] == "Degraded" and s)
    assert condition(status, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    assert condition(status, "Ready")["status"] == "True"
    assert cluster.get(SERVICES, "smollm2")["spec"]["selector"][TP] == "1"
    warnings = await eventually(lambda: [e for e in cluster.events() if e.get("type") == "Warning"])
    assert "not Ready in time" in warnings[0]["message"]


async def test_blue_green_tensor_parallel_switch_step_by_step(cluster: Cluster, operator) -> None:
    await ready_smollm2(cluster)
    await cluster.edit_spec("smollm2", {"tensorParallelSize": 2})

    # Step 1: the green Deployment at TP 2 appears beside the blue one; traffic stays on TP 1.
    green = await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp2"))
    assert "--tensor-parallel-size" in (args := green["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["observedGeneration"] == 2 and s)
    assert (status["tensorParallelSize"], status["targetTensorParallelSize"]) == (1, 2)
    assert condition(status, "Progressing")["reason"] == "BlueGreen"
    assert condition(status, "Ready")["status"] == "True"
    assert cluster.exists(DEPLOYMENTS, "smollm2-tp1")
    assert cluster.get(SERVICES, "smollm2")["spec"]["selector"][TP] == "1"

    # Step 2: green pods start but are not Ready: nothing switches.
    await cluster.set_deployment_status("smollm2-tp2", ready=0, progress="ReplicaSetUpdated")
    await asyncio.sleep(0.7)
    assert cluster.get(SERVICES, "smollm2")["spec"]["selector"][TP] == "1"
    assert cluster.exists(DEPLOYMENTS, "smollm2-tp1")

    # Step 3: green Ready -> the Service switches to TP 2, and only then is TP 1 removed.
    await cluster.set_deployment_status("smollm2-tp2")
    await eventually(lambda: not cluster.exists(DEPLOYMENTS, "smollm2-tp1"))
    assert cluster.get(SERVICES, "smollm2")["spec"]["selector"][TP] == "2"
    log = writes(cluster)
    switch = log.index(("PATCH", f"/api/v1/namespaces/{NS}/services/smollm2"))
    removal = log.index(("DELETE", f"/apis/apps/v1/namespaces/{NS}/deployments/smollm2-tp1"))
    assert switch < removal
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["phase"] == "Ready" and s)
    assert status["tensorParallelSize"] == 2 and "targetTensorParallelSize" not in status


async def test_blue_green_deadline_keeps_old_generation_serving(cluster: Cluster, operator) -> None:
    await ready_smollm2(cluster)
    await cluster.edit_spec("smollm2", {"tensorParallelSize": 2})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp2"))
    await cluster.set_deployment_status("smollm2-tp2", ready=0, progress="ProgressDeadlineExceeded")
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["phase"] == "Degraded" and s)
    assert condition(status, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    assert condition(status, "Ready")["status"] == "True"
    assert status["tensorParallelSize"] == 1
    assert cluster.get(SERVICES, "smollm2")["spec"]["selector"][TP] == "1"
    assert cluster.exists(DEPLOYMENTS, "smollm2-tp1")


async def test_operator_restart_mid_rollout_finishes_it(cluster: Cluster) -> None:
    from operator_thread import OperatorThread

    first = OperatorThread(str(cluster.server.url))
    await first.start()
    await ready_smollm2(cluster)
    await cluster.edit_spec("smollm2", {"tensorParallelSize": 2})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp2"))
    await first.stop()

    await cluster.set_deployment_status("smollm2-tp2")  # green became Ready while no operator ran
    second = OperatorThread(str(cluster.server.url))
    await second.start()
    try:
        await eventually(lambda: not cluster.exists(DEPLOYMENTS, "smollm2-tp1"))
        assert cluster.get(SERVICES, "smollm2")["spec"]["selector"][TP] == "2"
    finally:
        await second.stop()


async def test_scale_via_spec_replicas(cluster: Cluster, operator) -> None:
    await ready_smollm2(cluster)
    await cluster.edit_spec("smollm2", {"replicas": 3})  # what `kubectl scale llmd` writes through /scale
    await eventually(lambda: cluster.get(DEPLOYMENTS, "smollm2-tp1")["spec"]["replicas"] == 3)
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["observedGeneration"] == 2 and s)
    assert status["phase"] == "Progressing"
    await cluster.set_deployment_status("smollm2-tp1")
    status = await eventually(lambda: (s := cluster.get(LLMD, "smollm2")["status"])["phase"] == "Ready" and s)
    assert status["readyReplicas"] == 3


async def test_deleting_the_llmdeployment_releases_it(cluster: Cluster, operator) -> None:
    await ready_smollm2(cluster)
    assert cluster.get(LLMD, "smollm2")["metadata"]["finalizers"] == ["pagedserve.io/operator"]
    await cluster.delete(LLMD, "smollm2")
    await eventually(lambda: cluster.server.objects[LLMD, NS, "smollm2"].deleted, timeout=3)


async def test_a_child_read_from_a_list_counts_as_up_to_date() -> None:
    """The real API server leaves apiVersion/kind out of list items; that alone must not cause a write."""
    from pagedserve.operator.reconcile import Result, apply_child

    class NoWrites:
        async def apply(self, obj: dict) -> dict:
            raise AssertionError(f"wrote {obj['metadata']['name']} although it was up to date")

        merge_patch = create = apply

    want = builders.build_deployment("smollm2", NS, LLMDeploymentSpec.model_validate(
        load_yaml("examples/smollm2.yaml")["spec"]), tp=1, replicas=1)
    as_listed = {k: v for k, v in want.items() if k not in ("apiVersion", "kind")} | {"status": {}}
    result = Result()
    await apply_child(NoWrites(), want, as_listed, result)
    assert result.writes == []


async def test_listed_items_take_the_lists_apiversion_and_kind() -> None:
    """Found on the real API server: list items lack apiVersion/kind, so deleting a listed Deployment (the old
    generation after a blue/green switch) failed to build its URL and the switch never finished."""
    from pagedserve.operator.kube import Kube, object_path, path

    kube = Kube.__new__(Kube)  # no connection: the one request is answered here

    async def request(method: str, url: str, **_: object) -> dict:
        item = {"metadata": {"name": "smollm2-tp1", "namespace": NS, "labels": {"app": "x"}}}
        return {"apiVersion": "apps/v1", "kind": "DeploymentList", "items": [item, {"metadata": {"name": "other"}}]}

    kube.request = request
    (listed,) = await kube.list(path("apps/v1", "deployments", NS), {"app": "x"})
    assert (listed["apiVersion"], listed["kind"]) == ("apps/v1", "Deployment")
    assert object_path(listed) == path("apps/v1", "deployments", NS, "smollm2-tp1")
