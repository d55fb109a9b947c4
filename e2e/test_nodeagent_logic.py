"""The node agent's kubelet rules, checked without a cluster: env expansion, probes, phases, endpoints."""

from __future__ import annotations

import pytest

from e2e.cluster.endpoints import service_endpoints
from e2e.cluster.nodeagent.envs import EnvError, container_argv, container_env, expand
from e2e.cluster.nodeagent.probes import ProbeResult, ProbeTracker
from e2e.cluster.nodeagent.status import ContainerFacts, Terminated, pod_conditions, pod_phase


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--host $(POD_IP)", "--host 127.0.0.11"),
        ("$(MISSING) stays", "$(MISSING) stays"),
        ("$$(POD_IP) escaped", "$(POD_IP) escaped"),
        ("cost $5 and $", "cost $5 and $"),
        ("$(POD_IP)$(PORT)", "127.0.0.118000"),
        ("unterminated $(POD_IP", "unterminated $(POD_IP"),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"POD_IP": "127.0.0.11", "PORT": "8000"}) == expected


def _pod(container: dict) -> dict:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "llm"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "sa", "containers": [container]},
    }


def test_container_env_order_and_sources() -> None:
    data = {("ConfigMap", "ns", "cfg"): {"A": "from-cm", "B": "b"}, ("Secret", "ns", "sec"): {"TOKEN": "t0p"}}
    container = {
        "name": "c",
        "command": ["serve", "--host=$(POD_IP)", "--model=$(MODEL)"],
        "args": ["$(UNKNOWN)"],
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CM_"}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MODEL", "value": "/models/$(CM_A)"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "GPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x", "optional": True}}},
        ],
        "resources": {"limits": {"memory": "1536Mi"}},
    }
    pod = _pod(container)
    env = container_env(pod, container, pod_ip="127.0.0.42", host_ip="127.0.0.2", base={"PATH": "/bin", "MODEL": "x"},
                        lookup=lambda kind, ns, name: data.get((kind, ns, name)))  # fmt: skip
    assert env["CM_A"] == "from-cm" and env["MODEL"] == "/models/from-cm"
    assert env["POD_IP"] == "127.0.0.42" and env["TOKEN"] == "t0p" and env["APP"] == "llm"
    assert env["GPUS"] == "1536" and "OPT" not in env and env["PATH"] == "/bin"
    assert container_argv(container, env) == ["serve", "--host=127.0.0.42", "--model=/models/from-cm", "$(UNKNOWN)"]


def test_missing_required_key_and_missing_command_are_reported() -> None:
    container = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    with pytest.raises(EnvError, match="Secret ns/s key 'k' not found"):
        container_env(_pod(container), container, pod_ip="", host_ip="", base={}, lookup=lambda *_: None)
    with pytest.raises(EnvError, match="must set `command`"):
        container_argv({"name": "c", "args": ["x"]}, {})


def test_probe_tracker_thresholds_and_timing() -> None:
    probe = {"initialDelaySeconds": 5, "periodSeconds": 2, "failureThreshold": 3, "successThreshold": 2}
    t = ProbeTracker(probe, started_at=100.0, healthy=False)
    assert not t.due(104.9) and t.due(105.0)
    assert not t.record(ProbeResult(True), 105.0) and not t.healthy  # 1 of 2 successes
    assert t.next_at == 107.0
    assert t.record(ProbeResult(True), 107.0) and t.healthy
    for now in (109.0, 111.0):
        t.record(ProbeResult(False, "503"), now)
    assert t.healthy  # 2 failures < threshold 3
    t.record(ProbeResult(True), 113.0)  # a success resets the failure count
    for now in (115.0, 117.0):
        t.record(ProbeResult(False), now)
    assert t.healthy
    assert t.record(ProbeResult(False, "503"), 119.0) and not t.healthy and t.last_message == "503"


def _facts(**kw) -> ContainerFacts:
    return ContainerFacts(name=kw.pop("name", "c"), image="i", **kw)


@pytest.mark.parametrize(
    ("policy", "facts", "phase"),
    [
        ("Always", [_facts(waiting_reason="ContainerCreating")], "Pending"),
        ("Always", [_facts(running_since=1.0)], "Running"),
        ("Always", [_facts(last_terminated=Terminated(1, "Error", 1, 2), waiting_reason="CrashLoopBackOff")], "Running"),
        ("Never", [_facts(terminated=Terminated(0, "Completed", 1, 2))], "Succeeded"),
        ("Never", [_facts(terminated=Terminated(0, "Completed", 1, 2)), _facts(name="d", terminated=Terminated(2, "Error", 1, 2))], "Failed"),
        ("OnFailure", [_facts(terminated=Terminated(0, "Completed", 1, 2))], "Succeeded"),
        ("Never", [_facts(running_since=1.0), _facts(name="d", terminated=Terminated(2, "Error", 1, 2))], "Running"),
    ],
)
def test_pod_phase(policy: str, facts: list[ContainerFacts], phase: str) -> None:
    assert pod_phase(policy, init_done=True, init_failed=False, containers=facts) == phase


def test_conditions_keep_foreign_ones_and_transition_times() -> None:
    existing = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:01Z"},
    ]
    ready = [_facts(running_since=1.0, ready=True)]
    out = pod_conditions(existing, sandbox_ready=True, init_done=True, containers=ready, readiness_gates=[],
                         terminal=False, now=1.8e9)  # fmt: skip
    by_type = {c["type"]: c for c in out}
    assert [c["type"] for c in out][:2] == ["PodScheduled", "Ready"]
    assert by_type["PodScheduled"] == existing[0]
    assert by_type["Ready"]["status"] == "True" and by_type["Ready"]["lastTransitionTime"] != "2026-01-01T00:00:01Z"
    again = pod_conditions(out, sandbox_ready=True, init_done=True, containers=ready, readiness_gates=["example.com/gate"],
                           terminal=False, now=1.9e9)  # fmt: skip
    gated = {c["type"]: c for c in again}
    assert gated["ContainersReady"]["lastTransitionTime"] == by_type["ContainersReady"]["lastTransitionTime"]
    assert gated["Ready"]["status"] == "False" and gated["Ready"]["reason"] == "ReadinessGatesNotReady"


def _endpoint_pod(name: str, ip: str, ready: bool, labels: dict, terminating: bool = False) -> dict:
    meta = {"name": name, "namespace": "ns", "labels": labels}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]},
    }


def test_service_endpoints_follow_the_endpointslice_rule() -> None:
    svc = {"metadata": {"name": "s", "namespace": "ns"},
           "spec": {"selector": {"app": "llm"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"},
                                                          {"name": "raw", "port": 81, "targetPort": 9000}]}}  # fmt: skip
    pods = [
        _endpoint_pod("a", "127.0.0.12", True, {"app": "llm", "x": "1"}),
        _endpoint_pod("b", "127.0.0.11", True, {"app": "llm"}),
        _endpoint_pod("c", "127.0.0.13", False, {"app": "llm"}),
        _endpoint_pod("d", "127.0.0.14", True, {"app": "llm"}, terminating=True),
        _endpoint_pod("e", "127.0.0.15", True, {"app": "other"}),
    ]
    assert service_endpoints(svc, pods) == [("127.0.0.11", 8000), ("127.0.0.12", 8000)]
    assert service_endpoints(svc, pods, "raw") == [("127.0.0.11", 9000), ("127.0.0.12", 9000)]
    svc["spec"]["publishNotReadyAddresses"] = True
    assert [ip for ip, _ in service_endpoints(svc, pods)] == ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]


def test_a_volume_over_a_parent_of_the_checkout_does_not_hide_it():
    # A CI clone under /tmp and an emptyDir at /tmp (the operator chart's read-only root needs one).
    from pathlib import Path

    from e2e.cluster.nodeagent.process import KEEP_DIR, mount_script, shadowed
    from e2e.cluster.nodeagent.volumes import Mount

    mounts = [Mount(Path("/var/empty-dir-src"), "/tmp", False)]
    assert shadowed(Path("/tmp/clone"), mounts)
    assert not shadowed(Path("/work/main"), mounts)
    script = mount_script(mounts, [Path("/tmp/clone")]).splitlines()
    aside = script.index(f"mkdir -p {KEEP_DIR}/0; mount --bind /tmp/clone {KEEP_DIR}/0")
    volume = script.index("mount --bind /var/empty-dir-src /tmp")
    back = script.index(f"mkdir -p /tmp/clone; mount --bind {KEEP_DIR}/0 /tmp/clone")
    assert aside < volume < back < script.index('exec "$@"')
