"""Where everything of the local cluster lives: addresses, ports, files. Saved as cluster.json.

Addresses (all loopback):
  127.0.0.1         API server :16443, etcd :12379/:12380, controller-manager :10257,
                    scheduler :10259, Prometheus :19090
  127.0.0.2/.3      the Nodes' InternalIPs (node-a, node-b)
  127.0.0.10-129    node-a's pod IPs;  127.0.0.130-249  node-b's pod IPs
  127.1.0.0/16      Service ClusterIPs (127.1.0.1 is the `kubernetes` Service); the service proxy
                    listens on each ClusterIP:port
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import versions


@dataclass(frozen=True)
class NodeLayout:
    name: str
    host_ip: str
    first_pod_ip: str
    last_pod_ip: str
    gpus: int = 4


@dataclass(frozen=True)
class Layout:
    state_dir: str = str(versions.STATE_DIR)
    host: str = "127.0.0.1"
    apiserver_port: int = 16443
    etcd_port: int = 12379
    etcd_peer_port: int = 12380
    controller_manager_port: int = 10257
    scheduler_port: int = 10259
    prometheus_port: int = 19090
    service_cidr: str = "127.1.0.0/16"
    kubernetes_service_ip: str = "127.1.0.1"
    nodes: tuple[NodeLayout, ...] = field(
        default_factory=lambda: (
            NodeLayout("node-a", "127.0.0.2", "127.0.0.10", "127.0.0.129"),
            NodeLayout("node-b", "127.0.0.3", "127.0.0.130", "127.0.0.249"),
        )
    )
    cluster_id: str = ""

    # -- paths -------------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.state_dir)

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def pids_dir(self) -> Path:
        return self.root / "pids"

    def kubeconfig(self, identity: str = "admin") -> Path:
        return self.root / "kubeconfig" / f"{identity}.kubeconfig"

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    @property
    def apiserver_url(self) -> str:
        return f"https://{self.host}:{self.apiserver_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}"

    def ports(self) -> dict[str, int]:
        return {
            "kube-apiserver": self.apiserver_port,
            "etcd": self.etcd_port,
            "etcd (peer)": self.etcd_peer_port,
            "kube-controller-manager": self.controller_manager_port,
            "kube-scheduler": self.scheduler_port,
            "prometheus": self.prometheus_port,
        }

    # -- persistence -----------------------------------------------------------------------------------
    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["kubeconfig"] = str(self.kubeconfig())
        data["apiserver_url"] = self.apiserver_url
        data["prometheus_url"] = self.prometheus_url
        data["bin_dir"] = str(versions.BIN_DIR)
        (self.root / "cluster.json").write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path = versions.STATE_DIR) -> Layout:
        data = json.loads((state_dir / "cluster.json").read_text())
        data["nodes"] = tuple(NodeLayout(**n) for n in data["nodes"])
        for extra in ("kubeconfig", "apiserver_url", "prometheus_url", "bin_dir"):
            data.pop(extra, None)
        return cls(**data)
