"""Where one local cluster keeps its state and which loopback ports it listens on."""

import os
from dataclasses import dataclass
from pathlib import Path

from .build import REPO

DEFAULT_BASE_PORT = 26443
HOST = "127.0.0.1"
POD_CIDR = "127.1.0.0/16"
# Loopback too: nothing routes ClusterIPs here, and a stray connection to one stays on this machine.
SERVICE_CIDR = "127.2.0.0/16"
# Offsets from the base port; the API server takes the base port itself.
PORT_OFFSETS = {"kube-apiserver": 0, "etcd": 1, "etcd-peer": 2, "kube-controller-manager": 3,
                "kube-scheduler": 4, "kwok": 5, "lws-webhook": 6, "lws-controller": 7}


def default_state_dir() -> Path:
    return Path(os.environ.get("SARATHI_CLUSTER_STATE") or REPO / ".cache" / "cluster")


def default_base_port() -> int:
    return int(os.environ.get("SARATHI_CLUSTER_PORT") or DEFAULT_BASE_PORT)


@dataclass(frozen=True)
class Layout:
    state: Path
    base_port: int = DEFAULT_BASE_PORT
    gpu_nodes: int = 2

    @classmethod
    def default(cls, gpu_nodes: int = 2) -> "Layout":
        return cls(default_state_dir(), default_base_port(), gpu_nodes)

    def port(self, name: str) -> int:
        return self.base_port + PORT_OFFSETS[name]

    def url(self, name: str, scheme: str = "https") -> str:
        return f"{scheme}://{HOST}:{self.port(name)}"

    @property
    def server(self) -> str:
        return self.url("kube-apiserver")

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def processes(self) -> Path:
        return self.state / "processes.json"

    @property
    def owner(self) -> Path:
        """Who started the cluster: "cli" (make cluster-up) or "pytest"."""
        return self.state / "owner"

    def side_file(self, kind: str) -> Path:
        """A file beside the state directory, so it survives `up` wiping the state."""
        return self.state.parent / f".{self.state.name}.{kind}"

    def log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def component_kubeconfig(self, client: str) -> Path:
        return self.state / f"{client}.kubeconfig"
