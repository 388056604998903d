"""Loaded by every Python process the local pod runner starts (it leads their PYTHONPATH).

In a real pod a server listening on 0.0.0.0 listens on the pod's own network interface only.
Here every pod shares the host's network, so an IPv4 wildcard bind is narrowed to the pod's
IP ($SARATHI_PODRUNNER_POD_IP): two pods can then both listen on the same port, and each is
reached at its own pod IP, as in a cluster.

Cluster DNS is not here either: the runner keeps a table of the DNS names of the pods it runs
($SARATHI_PODRUNNER_HOSTS, `<hostname>.<subdomain>.<namespace>.svc.cluster.local` -> pod IP),
and a name is looked up in it as a pod's resolver would, through the search domains of the
pod's namespace ($SARATHI_PODRUNNER_NAMESPACE), before the system's resolver.
"""

import json
import os
import socket

_POD_IP = os.environ.get("SARATHI_PODRUNNER_POD_IP")
_HOSTS = os.environ.get("SARATHI_PODRUNNER_HOSTS")
_NAMESPACE = os.environ.get("SARATHI_PODRUNNER_NAMESPACE", "default")
_WILDCARDS = ("", "0.0.0.0")
CLUSTER_DOMAIN = "cluster.local"


def pod_address(family: int, address, pod_ip: str):
    """The address to bind: an IPv4 wildcard becomes the pod's IP, anything else is kept."""
    if family == socket.AF_INET and isinstance(address, tuple) and address[0] in _WILDCARDS:
        return (pod_ip, *address[1:])
    return address


def search_names(host: str, namespace: str) -> list[str]:
    """The names a pod's resolver tries for host: as given, then under each search domain of
    the namespace, as the kubelet writes them into resolv.conf (a trailing dot: as given only)."""
    if host.endswith("."):
        return [host[:-1]]
    return [host] + [f"{host}.{domain}" for domain in (f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}",
                                                       CLUSTER_DOMAIN)]


def cluster_address(host, namespace: str, table: dict[str, str]) -> str | None:
    """The pod IP that host names in the table, or None."""
    if not isinstance(host, str):
        return None
    return next((table[name] for name in search_names(host, namespace) if name in table), None)


def _table() -> dict[str, str]:
    try:
        with open(_HOSTS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


if _POD_IP:
    _bind = socket.socket.bind

    def _bind_to_pod(self, address):
        return _bind(self, pod_address(self.family, address, _POD_IP))

    socket.socket.bind = _bind_to_pod

if _HOSTS:
    _getaddrinfo, _gethostbyname = socket.getaddrinfo, socket.gethostbyname

    def _getaddrinfo_in_cluster(host, *args, **kwargs):
        return _getaddrinfo(cluster_address(host, _NAMESPACE, _table()) or host, *args, **kwargs)

    def _gethostbyname_in_cluster(host):
        return _gethostbyname(cluster_address(host, _NAMESPACE, _table()) or host)

    socket.getaddrinfo, socket.gethostbyname = _getaddrinfo_in_cluster, _gethostbyname_in_cluster
