"""Certificates, service-account keys and kubeconfigs for the local control plane, made with openssl.

One CA signs the API server's serving certificate and a client certificate per identity;
RBAC then sees each component as Kubernetes' bootstrap policy expects it.
"""

import base64
import subprocess
from pathlib import Path

import yaml

# identity -> (common name, organisation): the admin is in system:masters; the controllers
# use the user names the bootstrap RBAC policy binds.
CLIENTS = {
    "admin": ("sarathi-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
    "kwok": ("kwok-controller", "system:masters"),
    # The API server's identity towards aggregated API servers (metrics-server and the like).
    "front-proxy-client": ("front-proxy-client", ""),
}
SERVER_SANS = ("IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
               "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def subject(cn: str, org: str) -> str:
    return f"/O={org}/CN={cn}" if org else f"/CN={cn}"


def _signed(pki: Path, name: str, subj: str, exts: list[str]) -> None:
    _ec_key(pki / f"{name}.key")
    _openssl("req", "-new", "-key", str(pki / f"{name}.key"), "-subj", subj, "-out", str(pki / f"{name}.csr"))
    ext_file = pki / f"{name}.ext"
    ext_file.write_text("\n".join(exts) + "\n")
    _openssl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
             "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "3650", "-sha256",
             "-extfile", str(ext_file), "-out", str(pki / f"{name}.crt"))


def client_cert(pki: Path, name: str, cn: str, org: str) -> None:
    """<name>.crt/.key: a client certificate from the CA for the identity cn (in group org)."""
    _signed(pki, name, subject(cn, org), ["keyUsage=critical,digitalSignature,keyEncipherment",
                                          "extendedKeyUsage=clientAuth"])


def server_cert(pki: Path, name: str, cn: str, sans: tuple[str, ...]) -> None:
    """<name>.crt/.key: a serving certificate from the CA for the subject alternative names."""
    _signed(pki, name, f"/CN={cn}", ["keyUsage=critical,digitalSignature,keyEncipherment",
                                     "extendedKeyUsage=serverAuth", "subjectAltName=" + ",".join(sans)])


def make_pki(pki: Path) -> None:
    """CA, API-server serving cert, one client cert per CLIENTS entry, service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _ec_key(pki / "ca.key")
    _openssl("req", "-x509", "-new", "-key", str(pki / "ca.key"), "-subj", "/CN=sarathi-local-ca",
             "-days", "3650", "-sha256", "-out", str(pki / "ca.crt"))
    server_cert(pki, "apiserver", "kube-apiserver", SERVER_SANS)
    for name, (cn, org) in CLIENTS.items():
        client_cert(pki, name, cn, org)
    _ec_key(pki / "sa.key")
    _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig(server: str, cluster: str, user: str, ca: bytes, cert: bytes, key: bytes) -> dict:
    """A self-contained kubeconfig (certificates embedded) for one client identity."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    }


def write_kubeconfig(path: Path, pki: Path, server: str, cluster: str, client: str) -> Path:
    conf = kubeconfig(server, cluster, client, (pki / "ca.crt").read_bytes(),
                      (pki / f"{client}.crt").read_bytes(), (pki / f"{client}.key").read_bytes())
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    path.chmod(0o600)
    return path
