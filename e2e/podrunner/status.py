"""The pod status the local pod runner reports, as pure functions of what it knows about the
pod's one container: the kubelet's phases, conditions and container states."""

from dataclasses import dataclass, field

HOST_IP = "127.0.0.1"


@dataclass
class Container:
    """What the runner knows about a pod's container; `state` is the API's ContainerState."""

    name: str
    image: str
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    restart_count: int = 0
    container_id: str = ""
    started: bool = False  # the startup probe passed (or there is none)
    ready: bool = False


def restarts(restart_policy: str, exit_code: int) -> bool:
    """Whether the kubelet would start a container again after it exited with exit_code."""
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def phase(restart_policy: str, container: Container) -> str:
    terminated = container.state.get("terminated")
    if terminated and not restarts(restart_policy, terminated["exitCode"]):
        return "Succeeded" if terminated["exitCode"] == 0 else "Failed"
    if "running" in container.state or container.restart_count or container.last_state:
        return "Running"
    return "Pending"


def terminated_state(exit_code: int, started_at: str, finished_at: str, container_id: str) -> dict:
    """A ContainerState for a process that exited with exit_code (negative: killed by that signal)."""
    code = exit_code if exit_code >= 0 else 128 - exit_code  # the shell's and the kubelet's convention
    return {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                           "startedAt": started_at, "finishedAt": finished_at, "containerID": container_id}}


def conditions(previous: list[dict], now: str, values: dict[str, bool]) -> list[dict]:
    """Pod conditions with these truth values; lastTransitionTime moves only when one flips."""
    before = {c["type"]: c for c in previous}
    out = []
    for kind, value in values.items():
        status = "True" if value else "False"
        old = before.get(kind)
        since = old["lastTransitionTime"] if old and old["status"] == status else now
        out.append({"type": kind, "status": status, "lastTransitionTime": since})
    return out


def pod_status(previous: dict, now: str, pod_ip: str, started_at: str, restart_policy: str,
               container: Container) -> dict:
    """The whole status, replacing what is there (the scheduler's PodScheduled included)."""
    ready = container.ready and "running" in container.state
    return {
        "phase": phase(restart_policy, container),
        "conditions": conditions(previous.get("conditions", []), now, {
            "PodScheduled": True, "Initialized": True, "ContainersReady": ready, "Ready": ready,
        }),
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": started_at,
        "containerStatuses": [{
            "name": container.name,
            "image": container.image,
            "imageID": "",
            "containerID": container.container_id,
            "state": container.state,
            "lastState": container.last_state,
            "restartCount": container.restart_count,
            "started": container.started and "running" in container.state,
            "ready": ready,
        }],
    }
