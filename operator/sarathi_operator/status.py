"""The status of a SarathiDeployment, computed from its workloads: phase, replica counts,
the token budget in force, the Ready / Progressing / Degraded conditions,
InferencePoolReady while the spec asks for an InferencePool, and the model cache's state
(`modelCache`, ModelCacheReady) while it has one.

Phases:
  Pending      nothing has been ready since creation: first pods starting
  Progressing  a change is rolling out (template, scale, or live engine settings)
  Ready        every desired replica is ready and the spec is fully applied
  Degraded     replicas that were ready at this generation are lost
  Failed       the spec cannot be applied (the message says why)
"""

from dataclasses import dataclass, field

from . import pods
from .rollout import ReplicaGroup, observed

MAX_POD_PROBLEMS = 3


@dataclass(frozen=True)
class Check:
    """A condition of its own beside the phase: whether something the spec asks for is in place."""

    ok: bool
    reason: str
    message: str


def inference_pool_check(name: str, served: bool) -> Check:
    if served:
        return Check(True, "Created", f"InferencePool {name} selects the serving pods on their OpenAI port")
    return Check(False, "CRDNotInstalled", "spec.gateway.inferencePool: the cluster does not serve "
                 "inference.networking.k8s.io/v1 InferencePool (install the Gateway API Inference Extension's "
                 "CRDs); the engines serve through their Service meanwhile")


MODEL_CACHE = "ModelCacheReady"
CACHE_REASONS = {"Ready": "Downloaded", "Downloading": "Downloading", "Failed": "DownloadFailed"}


def model_cache(job: dict | None, claim: str, job_name: str) -> dict:
    """status.modelCache, from the download Job as the API server reports it (None: not there yet)."""
    final = {c["type"]: c for c in (job or {}).get("status", {}).get("conditions", []) if c.get("status") == "True"}
    if "Complete" in final:
        state, message = "Ready", f"claim {claim} holds the model"
    elif "Failed" in final:
        why = ": ".join(filter(None, (final["Failed"].get("reason"), final["Failed"].get("message"))))
        state, message = "Failed", (f"the download failed (Job {job_name}: {why}); its pods' logs say why; "
                                    "delete the Job to try again")
    else:
        state, message = "Downloading", f"Job {job_name} downloads the model into claim {claim}"
    return {"state": state, "claimName": claim, "job": job_name, "message": message}


@dataclass(frozen=True)
class Observation:
    replicas: int  # replicas that exist
    ready: int  # replicas ready to serve
    rolling: bool  # the workloads have not caught up with the latest template or scale
    token_budget: int  # in force on the serving engines
    settings_pending: list[str] = field(default_factory=list)  # why the live settings are not everywhere yet
    pod_problems: list[str] = field(default_factory=list)  # why pods are not running, when known
    inference_pool: Check | None = None  # when the spec asks for an InferencePool
    model_cache: dict | None = None  # status.modelCache, when the spec has one


def observe_deployment(deployment: dict) -> tuple[int, int, bool]:
    """(replicas, ready, rolling) of a Deployment whose pods are each one replica. Fewer
    updated pods than desired and no old ones is a lost pod being replaced, not a rollout (the
    rollout never goes below the desired count: maxUnavailable is 0)."""
    status = deployment.get("status", {})
    updated = status.get("updatedReplicas", 0)
    rolling = not observed(deployment) or status.get("replicas", 0) > updated
    return status.get("replicas", 0), status.get("readyReplicas", 0), rolling


def observe_leader_worker_set(lws: dict) -> tuple[int, int, bool]:
    """(replicas, ready, rolling) of multi-pod replicas as the groups of one LeaderWorkerSet. A
    group is ready when all its pods are.

    Its counts alone cannot say when a template roll is over: between removing an old group and
    creating its replacement LeaderWorkerSet can report as many replicas, updated and ready as
    desired, so its own UpdateInProgress condition decides that. And it takes `replicas` from the
    leader StatefulSet but counts `updatedReplicas` and `readyReplicas` over the leader pods it
    lists, the surge group's among them, so no count may exceed the desired one either."""
    status = lws.get("status", {})
    desired = lws["spec"]["replicas"]
    rolling = (
        not observed(lws)
        or pods.condition_true(lws, "UpdateInProgress")
        or status.get("replicas", 0) != desired
        or status.get("updatedReplicas", 0) != desired
        or status.get("readyReplicas", 0) > desired
    )
    return status.get("replicas", 0), status.get("readyReplicas", 0), rolling


def observe_statefulsets(statefulsets: list[dict], groups: list[ReplicaGroup], desired: int) -> tuple[int, int, bool]:
    """(replicas, ready, rolling) of multi-pod replicas, one StatefulSet each."""
    rolling = (not all(map(observed, statefulsets)) or len(statefulsets) != desired
               or any(g.stale or not g.settled for g in groups))
    return len(statefulsets), sum(g.ready for g in groups), rolling


def phase(previous: dict, generation: int, desired: int, obs: Observation) -> str:
    prev_phase = previous.get("phase")
    if obs.ready >= desired and not obs.rolling and not obs.settings_pending:
        return "Ready"
    if prev_phase in (None, "Pending") or (prev_phase == "Failed" and obs.ready == 0):
        return "Pending"
    if obs.rolling or obs.settings_pending:
        return "Progressing"
    if prev_phase in ("Ready", "Degraded") and previous.get("observedGeneration") == generation:
        return "Degraded"
    return "Progressing"


def compute_status(
    *, previous: dict, generation: int, desired: int, obs: Observation, selector: str, now: str
) -> dict:
    current = phase(previous, generation, desired, obs)
    counts = f"{obs.ready}/{desired} replicas ready"
    reason, message = {
        "Ready": ("ReplicasReady", counts),
        "Pending": ("ReplicasStarting", counts),
        "Degraded": ("ReplicasUnavailable", counts),
        "Progressing": ("RollingOut", counts),
    }[current]
    if current == "Progressing" and not obs.rolling and obs.settings_pending:
        reason = "SettingsPending"
    if obs.settings_pending:
        message += "; " + "; ".join(obs.settings_pending)
    cache = obs.model_cache
    if current != "Ready" and cache and cache["state"] != "Ready":
        message += "; model cache: " + cache["message"]
    if current != "Ready" and obs.pod_problems:
        message += "; " + "; ".join(obs.pod_problems[:MAX_POD_PROBLEMS])
    in_progress = current in ("Pending", "Progressing")
    conditions = [
        _condition("Ready", current == "Ready", reason, message),
        _condition("Progressing", in_progress, reason if in_progress else "RolloutComplete", message),
        _condition("Degraded", current == "Degraded", reason if current == "Degraded" else "AsExpected", message),
    ]
    pool = obs.inference_pool
    if pool is not None:
        conditions.append(_condition(INFERENCE_POOL, pool.ok, pool.reason, pool.message))
    if cache is not None:
        conditions.append(_condition(MODEL_CACHE, cache["state"] == "Ready", CACHE_REASONS[cache["state"]],
                                     cache["message"]))
    merged = merge_conditions(previous.get("conditions", []), conditions, generation, now)
    new = {
        "phase": current,
        "replicas": obs.replicas,
        "readyReplicas": obs.ready,
        "tokenBudget": obs.token_budget,
        "selector": selector,
        "observedGeneration": generation,
        # What the spec no longer asks for takes its condition with it.
        "conditions": [c for c in merged if (pool is not None or c["type"] != INFERENCE_POOL)
                       and (cache is not None or c["type"] != MODEL_CACHE)],
    }
    if cache is not None:
        new["modelCache"] = cache
    elif "modelCache" in previous:
        new["modelCache"] = None  # removed by the merge patch
    return new


INFERENCE_POOL = "InferencePoolReady"


def failed_status(*, previous: dict, generation: int, reason: str, message: str, now: str) -> dict:
    """Failed keeps the last known counts: the children of the last good spec keep running."""
    conditions = [
        _condition("Ready", False, reason, message),
        _condition("Progressing", False, reason, message),
        _condition("Degraded", True, reason, message),
    ]
    return {
        **{k: v for k, v in previous.items() if k not in ("phase", "observedGeneration", "conditions")},
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions", []), conditions, generation, now),
    }


def transition_event(previous: dict, current: dict) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event for a phase change or a new reason to fail."""
    message = _ready_message(current)
    if previous.get("phase") == current["phase"] and (
        current["phase"] != "Failed" or _ready_message(previous) == message
    ):
        return None
    kind = "Warning" if current["phase"] in ("Degraded", "Failed") else "Normal"
    return kind, current["phase"], message


def _ready_message(st: dict) -> str | None:
    return next((c.get("message") for c in st.get("conditions", []) if c["type"] == "Ready"), None)


def _condition(kind: str, true: bool, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True" if true else "False", "reason": reason, "message": message}


def merge_conditions(previous: list[dict], managed: list[dict], generation: int, now: str) -> list[dict]:
    """Managed conditions replace their predecessors, keeping lastTransitionTime while the
    status is unchanged; conditions of other types (set by other writers: the reconciler's
    Ready, Progressing and Degraded, the autotuner's SLOFeasible) are kept."""
    before = {c["type"]: c for c in previous}
    merged = []
    for cond in managed:
        old = before.get(cond["type"])
        since = old["lastTransitionTime"] if old and old["status"] == cond["status"] else now
        merged.append({**cond, "observedGeneration": generation, "lastTransitionTime": since})
    types = {c["type"] for c in managed}
    return merged + [c for c in previous if c["type"] not in types]
