"""Rollout rules: when to restart which multi-pod replica. Pure functions over objects as the
API server returns them."""

from dataclasses import dataclass

from . import pods

REVISION_LABEL = "controller-revision-hash"


@dataclass(frozen=True)
class ReplicaGroup:
    """One multi-pod replica: a StatefulSet and its pods."""

    name: str
    settled: bool  # the StatefulSet controller has seen the latest template, no pod is terminating
    stale: bool  # some pod runs an older template
    ready: bool  # every rank is ready


def observed(workload: dict) -> bool:
    """Its controller has seen the workload's latest spec."""
    return workload.get("status", {}).get("observedGeneration", 0) >= workload["metadata"].get("generation", 1)


def replica_group(statefulset: dict, all_pods: list[dict]) -> ReplicaGroup:
    name = statefulset["metadata"]["name"]
    status = statefulset.get("status", {})
    own = [p for p in all_pods if pods.owned_by(p, "StatefulSet", name)]
    revision = status.get("updateRevision")
    live = [p for p in own if not pods.is_terminating(p)]
    return ReplicaGroup(
        name=name,
        settled=observed(statefulset) and len(live) == len(own),
        stale=any(p["metadata"].get("labels", {}).get(REVISION_LABEL) != revision for p in live),
        ready=len(live) == statefulset["spec"]["replicas"] and all(pods.is_ready(p) for p in live),
    )


def replica_to_restart(groups: list[ReplicaGroup]) -> str | None:
    """The multi-pod replica whose pods should all be deleted now to roll it, if any.

    Rules: whole replicas roll, never single ranks, because a restarted rank cannot rejoin a
    running process group. Nothing restarts while any replica is still settling from a
    previous step. A stale replica that is already down restarts first: it serves nothing,
    so restarting it costs no capacity. Otherwise a stale replica restarts only while every
    replica is ready, so a rollout takes at most one replica out of service at a time.
    """
    if not all(g.settled for g in groups):
        return None
    stale = [g for g in groups if g.stale]
    down = [g for g in stale if not g.ready]
    if down:
        return down[0].name
    if stale and all(g.ready for g in groups):
        return stale[0].name
    return None
