"""Reading pod state from pod objects as the API server returns them, and any object's status
conditions."""

from .names import CONTAINER


def condition_true(obj: dict, kind: str) -> bool:
    """Whether the object's status has condition `kind` with status True."""
    return any(c["type"] == kind and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))


def is_ready(pod: dict) -> bool:
    return condition_true(pod, "Ready")


def is_terminating(pod: dict) -> bool:
    return "deletionTimestamp" in pod["metadata"]


def engine_container_id(pod: dict) -> str:
    """The engine container's current ID; it changes whenever the container restarts."""
    for status in pod.get("status", {}).get("containerStatuses", []):
        if status["name"] == CONTAINER:
            return status.get("containerID", "")
    return ""


def owned_by(pod: dict, kind: str, name: str) -> bool:
    return any(r["kind"] == kind and r["name"] == name for r in pod["metadata"].get("ownerReferences", []))


def problem(pod: dict) -> str | None:
    """Why a pod is not running, when Kubernetes says (unschedulable, image pull, crash loop)."""
    name = pod["metadata"]["name"]
    status = pod.get("status", {})
    for cond in status.get("conditions", []):
        if cond["type"] == "PodScheduled" and cond["status"] == "False":
            return f"pod {name} unschedulable: {cond.get('message', cond.get('reason', ''))}"
    for container in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        waiting = container.get("state", {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return f"pod {name} container {container['name']}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None
