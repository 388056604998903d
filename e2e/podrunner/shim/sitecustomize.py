"""Loaded by every Python process the local pod runner starts (it leads their PYTHONPATH).

In a real pod a server listening on 0.0.0.0 listens on the pod's own network interface only.
Here every pod shares the host's network, so an IPv4 wildcard bind is narrowed to the pod's
IP ($SARATHI_PODRUNNER_POD_IP): two pods can then both listen on the same port, and each is
reached at its own pod IP, as in a cluster.
"""

import os
import socket

_POD_IP = os.environ.get("SARATHI_PODRUNNER_POD_IP")
_WILDCARDS = ("", "0.0.0.0")


def pod_address(family: int, address, pod_ip: str):
    """The address to bind: an IPv4 wildcard becomes the pod's IP, anything else is kept."""
    if family == socket.AF_INET and isinstance(address, tuple) and address[0] in _WILDCARDS:
        return (pod_ip, *address[1:])
    return address


if _POD_IP:
    _bind = socket.socket.bind

    def _bind_to_pod(self, address):
        return _bind(self, pod_address(self.family, address, _POD_IP))

    socket.socket.bind = _bind_to_pod
