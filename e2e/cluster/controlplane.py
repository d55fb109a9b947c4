"""Bring the local cluster up and down: certificates, etcd, API server, controllers, nodes, proxy, Prometheus.

`up()` starts a fresh cluster (new state, new certificates) and returns once the nodes are Ready and
the default ServiceAccount exists; `down()` stops every process it started and sweeps any leftover.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import shutil
import ssl
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from . import build, daemons, prereqs, versions
from .layout import Layout
from .pki import Identity, Pki

# Stop order: nodes first (they stop their pods), the API server and etcd last.
STOP_ORDER = ("node-a", "node-b", "serviceproxy", "prometheus", "kube-scheduler", "kube-controller-manager",
              "kube-apiserver", "etcd")  # fmt: skip
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def say(msg: str) -> None:
    print(msg, flush=True)


# -- certificates and kubeconfigs ----------------------------------------------------------------------
def identities(layout: Layout) -> list[Identity]:
    local = ("127.0.0.1",)
    kube_dns = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local")  # fmt: skip
    out = [
        Identity("apiserver", "kube-apiserver", dns=kube_dns, ips=(*local, layout.kubernetes_service_ip), server=True, client=False),
        Identity("etcd", "etcd", dns=("localhost",), ips=local, server=True, client=True),
        Identity("apiserver-etcd-client", "kube-apiserver-etcd-client"),
        Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", groups=("kubeadm:cluster-admins",)),
        Identity("admin", "pagedserve-admin", groups=("system:masters",)),
        Identity("kube-controller-manager", "system:kube-controller-manager"),
        Identity("kube-scheduler", "system:kube-scheduler"),
        Identity("front-proxy-client", "front-proxy-client"),
        Identity("prometheus", "pagedserve:prometheus"),
        Identity("serviceproxy", "pagedserve:service-proxy"),
    ]
    for node in layout.nodes:
        out.append(Identity(node.name, f"system:node:{node.name}", groups=("system:nodes",)))
        out.append(Identity(f"{node.name}-serving", f"system:node:{node.name}", ips=(node.host_ip,), server=True, client=False))
    return out


def write_kubeconfig(layout: Layout, pki: Pki, name: str, user: str) -> Path:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "pagedserve-local", "cluster": {
            "server": layout.apiserver_url, "certificate-authority-data": b64(pki.ca_cert)}}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(pki.cert(name)), "client-key-data": b64(pki.key(name))}}],
        "contexts": [{"name": "pagedserve-local", "context": {"cluster": "pagedserve-local", "user": user}}],
        "current-context": "pagedserve-local",
    }  # fmt: skip
    path = layout.kubeconfig(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
    return path


def make_pki(layout: Layout) -> Pki:
    pki = Pki(layout.pki_dir)
    pki.make_ca()
    for ident in identities(layout):
        pki.issue(ident)
    pki.make_service_account_keys()
    for ident in identities(layout):
        if ident.client and ident.name not in ("etcd", "apiserver-etcd-client", "apiserver-kubelet-client", "front-proxy-client"):
            write_kubeconfig(layout, pki, ident.name, ident.user)
    return pki


# -- health checks ---------------------------------------------------------------------------------------
def _https_get(url: str, pki: Pki | None, client: str | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    if pki is None:
        ctx = ssl._create_unverified_context()
    else:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        if client:
            ctx.load_cert_chain(str(pki.cert(client)), str(pki.key(client)))
    with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
        return resp.status, resp.read()


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


# -- components -----------------------------------------------------------------------------------------
def start_etcd(layout: Layout, bins: Path, pki: Pki) -> None:
    client_url = f"https://{layout.host}:{layout.etcd_port}"
    peer_url = f"https://{layout.host}:{layout.etcd_peer_port}"
    daemons.start(layout, "etcd", [
        str(bins / "etcd"), "--name=local", f"--data-dir={layout.root / 'etcd'}",
        f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=local={peer_url}", "--initial-cluster-state=new",
        f"--cert-file={pki.cert('etcd')}", f"--key-file={pki.key('etcd')}",
        f"--trusted-ca-file={pki.ca_cert}", "--client-cert-auth",
        f"--peer-cert-file={pki.cert('etcd')}", f"--peer-key-file={pki.key('etcd')}",
        f"--peer-trusted-ca-file={pki.ca_cert}", "--peer-client-cert-auth",
        "--unsafe-no-fsync", "--log-level=warn",
    ])  # fmt: skip

    def healthy() -> bool:
        status, body = _https_get(f"{client_url}/health", pki, "apiserver-etcd-client")
        return status == 200 and json.loads(body).get("health") == "true"

    daemons.wait_until(layout, "etcd", healthy, 60, "healthy /health")


def start_apiserver(layout: Layout, bins: Path, pki: Pki) -> None:
    daemons.start(layout, "kube-apiserver", [
        str(bins / "kube-apiserver"),
        f"--etcd-servers=https://{layout.host}:{layout.etcd_port}",
        f"--etcd-cafile={pki.ca_cert}", f"--etcd-certfile={pki.cert('apiserver-etcd-client')}",
        f"--etcd-keyfile={pki.key('apiserver-etcd-client')}",
        f"--bind-address={layout.host}", f"--secure-port={layout.apiserver_port}", f"--advertise-address={layout.host}",
        f"--tls-cert-file={pki.cert('apiserver')}", f"--tls-private-key-file={pki.key('apiserver')}",
        f"--client-ca-file={pki.ca_cert}",
        # The aggregation layer's front proxy, which delegated authentication (controller-manager,
        # scheduler, kopf webhooks, extension API servers) expects to find configured.
        f"--requestheader-client-ca-file={pki.ca_cert}", "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.cert('front-proxy-client')}",
        f"--proxy-client-key-file={pki.key('front-proxy-client')}",
        "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
        f"--service-cluster-ip-range={layout.service_cidr}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={layout.pki_dir / 'sa.pub'}",
        f"--service-account-signing-key-file={layout.pki_dir / 'sa.key'}",
        # The apiserver would publish its own (loopback) address as the `kubernetes` Service's
        # endpoints, which endpoint validation refuses; in-cluster clients get the address directly.
        "--endpoint-reconciler-type=none",
        f"--kubelet-client-certificate={pki.cert('apiserver-kubelet-client')}",
        f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
        f"--kubelet-certificate-authority={pki.ca_cert}",
        "--kubelet-preferred-address-types=InternalIP",
        "--allow-privileged=true", "--profiling=false",
        f"--cert-dir={layout.root / 'apiserver'}",
    ])  # fmt: skip

    def ready() -> bool:
        status, body = _https_get(f"{layout.apiserver_url}/readyz", pki, "admin")
        return status == 200 and body.strip() == b"ok"

    daemons.wait_until(layout, "kube-apiserver", ready, 120, "/readyz ok")


def start_controllers(layout: Layout, bins: Path, pki: Pki) -> None:
    kcm = str(layout.kubeconfig("kube-controller-manager"))
    daemons.start(layout, "kube-controller-manager", [
        str(bins / "kube-controller-manager"),
        f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}", f"--authorization-kubeconfig={kcm}",
        f"--bind-address={layout.host}", f"--secure-port={layout.controller_manager_port}",
        f"--cert-dir={layout.root / 'kube-controller-manager'}",
        f"--service-account-private-key-file={layout.pki_dir / 'sa.key'}", f"--root-ca-file={pki.ca_cert}",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
        f"--service-cluster-ip-range={layout.service_cidr}",
        "--leader-elect=false",
        # EndpointSlices/Endpoints cannot hold loopback pod IPs (API validation), so these controllers
        # could only fail and retry; endpoints.py applies their rule for the proxy and the tests.
        "--controllers=*,-endpointslice-controller,-endpoints-controller,-endpointslice-mirroring-controller",
    ])  # fmt: skip
    sched = str(layout.kubeconfig("kube-scheduler"))
    daemons.start(layout, "kube-scheduler", [
        str(bins / "kube-scheduler"),
        f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}", f"--authorization-kubeconfig={sched}",
        f"--bind-address={layout.host}", f"--secure-port={layout.scheduler_port}", "--leader-elect=false",
    ])  # fmt: skip
    for name, port in (("kube-controller-manager", layout.controller_manager_port), ("kube-scheduler", layout.scheduler_port)):
        daemons.wait_until(layout, name, lambda p=port: _https_get(f"https://{layout.host}:{p}/healthz", None)[0] == 200, 60, "/healthz")


def bootstrap_rbac(layout: Layout) -> None:
    """Read-only rights of our two helpers (Prometheus discovery, the service proxy)."""
    from kubernetes import client, config, utils

    api = config.new_client_from_config(config_file=str(layout.kubeconfig()))
    docs = []
    for user, resources in (("pagedserve:prometheus", ["pods", "services", "endpoints", "nodes"]),
                            ("pagedserve:service-proxy", ["pods", "services"])):  # fmt: skip
        name = user.replace(":", "-")
        docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
                     "rules": [{"apiGroups": [""], "resources": resources, "verbs": ["get", "list", "watch"]},
                               {"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]})  # fmt: skip
        docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})  # fmt: skip
    for doc in docs:
        utils.create_from_dict(api, doc)
    client.ApiClient.close(api)


def start_nodes(layout: Layout) -> None:
    for node in layout.nodes:
        daemons.start(layout, node.name, [
            sys.executable, "-m", "e2e.cluster.nodeagent",
            f"--name={node.name}", f"--host-ip={node.host_ip}",
            f"--pod-ips={node.first_pod_ip}-{node.last_pod_ip}", f"--gpus={node.gpus}",
            f"--kubeconfig={layout.kubeconfig(node.name)}", f"--state-dir={layout.node_dir(node.name)}",
            f"--api-server={layout.host}:{layout.apiserver_port}", f"--cluster-id={layout.cluster_id}",
            f"--kube-version={versions.KUBE_VERSION}",
            f"--tls-cert={layout.pki_dir / f'{node.name}-serving.crt'}",
            f"--tls-key={layout.pki_dir / f'{node.name}-serving.key'}", f"--client-ca={layout.pki_dir / 'ca.crt'}",
        ], env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})  # fmt: skip
    daemons.start(layout, "serviceproxy", [
        sys.executable, "-m", "e2e.cluster.serviceproxy", f"--kubeconfig={layout.kubeconfig('serviceproxy')}",
    ], env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})  # fmt: skip


def prometheus_config(layout: Layout, pki: Pki) -> dict:
    tls = {"ca_file": str(pki.ca_cert), "cert_file": str(pki.cert("prometheus")), "key_file": str(pki.key("prometheus"))}
    annotation = "__meta_kubernetes_pod_annotation_prometheus_io_"
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "scrape_configs": [{
            "job_name": "kubernetes-pods",
            "kubernetes_sd_configs": [{"role": "pod", "api_server": layout.apiserver_url, "tls_config": tls}],
            "relabel_configs": [
                {"source_labels": [f"{annotation}scrape"], "action": "keep", "regex": "true"},
                {"source_labels": ["__meta_kubernetes_pod_phase"], "action": "drop", "regex": "Pending|Succeeded|Failed"},
                {"source_labels": [f"{annotation}path"], "action": "replace", "target_label": "__metrics_path__", "regex": "(.+)"},
                {"source_labels": ["__meta_kubernetes_pod_ip", f"{annotation}port"], "action": "replace",
                 "regex": r"(.+);(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
                {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"},
            ],
        }],
    }  # fmt: skip


def start_prometheus(layout: Layout, bins: Path, pki: Pki) -> None:
    binary = str(bins / "prometheus")
    folder = layout.root / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(layout, pki), sort_keys=False))
    daemons.start(layout, "prometheus", [
        binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={layout.host}:{layout.prometheus_port}", "--storage.tsdb.retention.time=1d",
        "--web.enable-lifecycle", "--log.level=warn",
    ])  # fmt: skip
    daemons.wait_until(layout, "prometheus", lambda: _http_ok(f"{layout.prometheus_url}/-/ready"), 60, "/-/ready")


def wait_cluster_usable(layout: Layout) -> None:
    """Nodes Ready, and the default ServiceAccount and root CA ConfigMap that every pod needs."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(layout.kubeconfig())))

    def nodes_ready() -> bool:
        nodes = api.list_node().items
        ready = {n.metadata.name for n in nodes for c in n.status.conditions or [] if c.type == "Ready" and c.status == "True"}
        return ready >= {n.name for n in layout.nodes}

    def defaults_exist() -> bool:
        api.read_namespaced_service_account("default", "default")
        api.read_namespaced_config_map("kube-root-ca.crt", "default")
        return True

    daemons.wait_until(layout, "node-a", nodes_ready, 60, "Ready nodes")
    daemons.wait_until(layout, "kube-controller-manager", defaults_exist, 60, "the default ServiceAccount")


# -- entry points -------------------------------------------------------------------------------------------
def running(layout: Layout) -> bool:
    try:
        pki = Pki(layout.pki_dir)
        return _https_get(f"{layout.apiserver_url}/readyz", pki, "admin")[0] == 200
    except Exception:
        return False


def up(layout: Layout | None = None, with_prometheus: bool = True) -> Layout:
    """Start a fresh cluster; returns its layout (kubeconfig: layout.kubeconfig())."""
    started = time.monotonic()
    layout = layout or Layout()
    prereqs.require_openssl()
    bins = build.build(log=say)
    existing = layout.root / "cluster.json"
    if existing.exists():
        down(Layout.load(layout.root), quiet=True)
    busy = [f"{name} ({layout.host}:{port})" for name, port in layout.ports().items() if not daemons.port_free(layout.host, port)]
    if busy:
        raise daemons.StartupError(
            f"ports in use: {', '.join(busy)}; another cluster or program holds them (`make cluster-down`?)"
        )
    shutil.rmtree(layout.root, ignore_errors=True)
    layout = dataclasses.replace(layout, cluster_id=secrets.token_hex(8))
    layout.save()
    t = time.monotonic()
    pki = make_pki(layout)
    say(f"  certificates: ok ({time.monotonic() - t:.1f}s)")
    steps = [
        ("etcd", lambda: start_etcd(layout, bins, pki)),
        ("kube-apiserver", lambda: start_apiserver(layout, bins, pki)),
        ("RBAC for Prometheus and the service proxy", lambda: bootstrap_rbac(layout)),
        ("kube-controller-manager, kube-scheduler", lambda: start_controllers(layout, bins, pki)),
        ("node agents (node-a, node-b) and service proxy", lambda: start_nodes(layout)),
        ("nodes Ready, default ServiceAccount", lambda: wait_cluster_usable(layout)),
    ]
    if with_prometheus:
        steps.append(("prometheus", lambda: start_prometheus(layout, bins, pki)))
    t = time.monotonic()
    try:
        for name, step in steps:
            step()
            say(f"  {name}: ok ({time.monotonic() - t:.1f}s)")
            t = time.monotonic()
    except BaseException:
        down(layout, quiet=True)
        raise
    say(f"cluster up in {time.monotonic() - started:.0f}s")
    return layout


def remove_created_mount_points(layout: Layout) -> None:
    """Empty folders and files the node agents created on the host as mount points, deepest first."""
    created: set[Path] = set()
    for record in layout.root.glob("nodes/*/created-mount-points"):
        created.update(Path(line) for line in record.read_text().splitlines() if line)
        record.unlink()
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only when empty
            elif path.is_file() and path.stat().st_size == 0:
                path.unlink()
        except OSError:
            pass


def down(layout: Layout | None = None, quiet: bool = False) -> None:
    """Stop everything the cluster started; safe to call when nothing runs."""
    if layout is None:
        if not (versions.STATE_DIR / "cluster.json").exists():
            if not quiet:
                say("no local cluster state; nothing to stop")
            return
        layout = Layout.load()
    stopped = daemons.stop(layout, STOP_ORDER)
    leftovers = daemons.sweep(layout.cluster_id)
    for path in Path("/dev/shm").glob("pagedserve-*"):
        shutil.rmtree(path, ignore_errors=True)
    remove_created_mount_points(layout)
    if not quiet:
        say(f"stopped: {', '.join(stopped) or 'nothing was running'}"
            + (f"; killed {len(leftovers)} leftover process(es)" if leftovers else ""))  # fmt: skip
