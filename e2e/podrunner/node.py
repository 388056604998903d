"""The node a local pod runner stands behind, as pure functions: its Node and Lease objects,
its pod CIDR and pod IPs, and the kubeconfig a pod gets for its ServiceAccount.

The node is one of the fake GPU nodes of e2e/cluster (8 `nvidia.com/gpu`, the same labels)
without kwok's annotation, so kwok leaves it and its pods alone, and with a NoSchedule taint,
so only pods that tolerate it (and select it by name) land there: everything else in the
cluster keeps running on kwok's nodes, untouched. Its pod IPs come from 127.3.0.0/16, one /24
per runner node, apart from kwok's 127.1.0.0/16 and the Service range 127.2.0.0/16.
"""

import copy
import ipaddress

from e2e.cluster.nodes import KWOK_ANNOTATION, gpu_node

TAINT_KEY = "podrunner.sarathi.dev/local"
POD_RANGE = ipaddress.ip_network("127.3.0.0/16")
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HOST_IP = "127.0.0.1"


def node_manifest(name: str, pod_cidr: str, now: str) -> dict:
    node = copy.deepcopy(gpu_node(name))
    del node["metadata"]["annotations"][KWOK_ANNOTATION]
    node["metadata"]["labels"]["type"] = "podrunner"
    node["spec"] = {
        "podCIDR": pod_cidr,
        "podCIDRs": [pod_cidr],
        "taints": [{"key": TAINT_KEY, "value": name, "effect": "NoSchedule"}],
    }
    node["status"].update({
        "conditions": [
            {"type": kind, "status": status, "reason": reason, "message": reason,
             "lastHeartbeatTime": now, "lastTransitionTime": now}
            for kind, status, reason in (
                ("Ready", "True", "LocalPodRunnerReady"),
                ("MemoryPressure", "False", "LocalPodRunnerReady"),
                ("DiskPressure", "False", "LocalPodRunnerReady"),
                ("PIDPressure", "False", "LocalPodRunnerReady"),
            )
        ],
        "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": name}],
        "nodeInfo": {
            "architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "podrunner",
            "kubeProxyVersion": "", "containerRuntimeVersion": "podrunner://local", "kernelVersion": "",
            "osImage": "", "bootID": "", "machineID": "", "systemUUID": "",
        },
    })
    return node


def pod_placement(node: str) -> tuple[dict, list[dict]]:
    """The nodeSelector and tolerations that put a pod on this runner's node."""
    return ({"kubernetes.io/hostname": node},
            [{"key": TAINT_KEY, "operator": "Equal", "value": node, "effect": "NoSchedule"}])


def lease(node: dict, now: str) -> dict:
    """The node's heartbeat, as the kubelet keeps it: renewed well within LEASE_SECONDS."""
    meta = node["metadata"]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": meta["name"],
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": meta["name"], "uid": meta["uid"]}],
        },
        "spec": {"holderIdentity": meta["name"], "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
    }


def free_pod_cidr(taken: set[str]) -> str:
    """The first /24 of POD_RANGE no other node has."""
    for subnet in POD_RANGE.subnets(new_prefix=24):
        if str(subnet) not in taken:
            return str(subnet)
    raise RuntimeError(f"every /24 of {POD_RANGE} is taken by a node")


def free_pod_ip(pod_cidr: str, taken: set[str]) -> str:
    """The first address of the node's CIDR that no pod of it holds (.1 is the "gateway")."""
    for host in list(ipaddress.ip_network(pod_cidr).hosts())[1:]:
        if str(host) not in taken:
            return str(host)
    raise RuntimeError(f"no pod IP left in {pod_cidr}")


def service_account_kubeconfig(admin: dict, token: str, namespace: str) -> dict:
    """What the kubelet's projected token and in-cluster config give a pod, as a kubeconfig:
    the cluster of `admin`'s current context, and the pod's ServiceAccount token."""
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "pod", "user": {"token": token}}],
        "contexts": [{"name": "pod", "context": {"cluster": cluster["name"], "user": "pod", "namespace": namespace}}],
        "current-context": "pod",
    }
