"""Command lines of the control-plane components, in start order, as pure functions of a Layout.

The flags follow what kubeadm and kwokctl's binary runtime pass, reduced to one loopback host:
no leader election (one replica each), controllers using per-controller service accounts as
kubeadm sets them up, and health endpoints open so readiness can be probed without a token.
"""

from pathlib import Path

from .layout import HOST, POD_CIDR, SERVICE_CIDR, Layout
from .nodes import KWOK_ANNOTATION, STAGES

ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
OPEN_HEALTH = "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"


def etcd(layout: Layout, bin_dir: Path) -> list[str]:
    client, peer = layout.url("etcd", "http"), layout.url("etcd-peer", "http")
    return [str(bin_dir / "etcd"), "--name=sarathi", f"--data-dir={layout.state / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=sarathi={peer}", "--initial-cluster-state=new",
            # Test data is thrown away on `down`; skipping fsync makes writes far cheaper.
            "--unsafe-no-fsync=true", "--log-level=warn"]


def kube_apiserver(layout: Layout, bin_dir: Path) -> list[str]:
    pki = layout.pki
    return [str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={layout.url('etcd', 'http')}",
            f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={layout.port('kube-apiserver')}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--requestheader-client-ca-file={pki / 'ca.crt'}", "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # The API server would publish its loopback address as the `kubernetes` Service's
            # endpoint, which Endpoint validation refuses; nothing here routes to it anyway.
            "--endpoint-reconciler-type=none",
            "--profiling=false"]


def kube_controller_manager(layout: Layout, bin_dir: Path) -> list[str]:
    kubeconfig = layout.component_kubeconfig("controller-manager")
    return [str(bin_dir / "kube-controller-manager"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}", f"--secure-port={layout.port('kube-controller-manager')}", OPEN_HEALTH,
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--root-ca-file={layout.pki / 'ca.crt'}",
            f"--service-account-private-key-file={layout.pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false"]


def kube_scheduler(layout: Layout, bin_dir: Path) -> list[str]:
    kubeconfig = layout.component_kubeconfig("scheduler")
    return [str(bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}", f"--secure-port={layout.port('kube-scheduler')}", OPEN_HEALTH,
            "--leader-elect=false", "--profiling=false"]


def kwok(layout: Layout, bin_dir: Path) -> list[str]:
    return [str(bin_dir / "kwok"), f"--kubeconfig={layout.component_kubeconfig('kwok')}",
            f"--config={STAGES}", f"--server-address={HOST}:{layout.port('kwok')}",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            "--node-lease-duration-seconds=40", f"--node-ip={HOST}", f"--cidr={POD_CIDR}"]


ARGV = {"etcd": etcd, "kube-apiserver": kube_apiserver, "kube-controller-manager": kube_controller_manager,
        "kube-scheduler": kube_scheduler, "kwok": kwok}


def health_url(name: str, layout: Layout) -> str:
    """The endpoint that answers 200 once the component is serving."""
    paths = {"etcd": ("http", "/health"), "kube-apiserver": ("https", "/readyz"),
             "kube-controller-manager": ("https", "/healthz"), "kube-scheduler": ("https", "/healthz"),
             "kwok": ("http", "/healthz"), "lws-controller": ("http", "/healthz")}
    scheme, path = paths[name]
    return layout.url(name, scheme) + path
