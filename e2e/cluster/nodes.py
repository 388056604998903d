"""Fake GPU nodes for kwok to manage, and the Stage file that brings them and their pods to life."""

from pathlib import Path

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
STAGES = Path(__file__).resolve().parent / "kwok-stages.yaml"


def gpu_node(name: str, gpus: int = 8, product: str = GPU_PRODUCT) -> dict:
    """A Node kwok manages, shaped like an 8-GPU A100 server with the labels GPU feature discovery sets."""
    resources = {"cpu": "96", "memory": "1152Gi", "pods": "110", "ephemeral-storage": "1Ti", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def gpu_nodes(count: int, gpus: int = 8) -> list[dict]:
    return [gpu_node(f"gpu-node-{i}", gpus) for i in range(count)]

