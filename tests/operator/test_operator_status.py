import pytest

from sarathi_operator.rollout import ReplicaGroup
from sarathi_operator.status import (
    INFERENCE_POOL, Observation, compute_status, failed_status, inference_pool_check, merge_conditions,
    observe_deployment, observe_leader_worker_set, observe_statefulsets, phase, transition_event,
)

T0, T1 = "2025-01-01T00:00:00Z", "2025-01-01T00:01:00Z"


def obs(ready, rolling=False, pending=(), replicas=2, budget=512):
    return Observation(replicas=replicas, ready=ready, rolling=rolling, token_budget=budget, settings_pending=list(pending))


def status_of(phase_, generation=1):
    return {"phase": phase_, "observedGeneration": generation}


@pytest.mark.parametrize(
    "previous, generation, desired, observation, expected",
    [
        ({}, 1, 2, obs(0, rolling=True), "Pending"),  # just created
        (status_of("Pending"), 1, 2, obs(1), "Pending"),  # first pods still coming up
        (status_of("Pending"), 1, 2, obs(2), "Ready"),
        (status_of("Ready"), 1, 2, obs(1), "Degraded"),  # a pod died
        (status_of("Degraded"), 1, 2, obs(2), "Ready"),
        (status_of("Ready"), 2, 2, obs(2, rolling=True), "Progressing"),  # template edit
        (status_of("Ready"), 2, 3, obs(2, replicas=3), "Progressing"),  # scale-up: not a loss
        (status_of("Progressing", 2), 2, 3, obs(2, replicas=3), "Progressing"),  # new replica starting
        (status_of("Ready"), 1, 2, obs(2, pending=["pod a unreachable"]), "Progressing"),
        (status_of("Failed"), 2, 2, obs(0), "Pending"),  # fixed spec, nothing ran before
        (status_of("Failed"), 2, 2, obs(1), "Progressing"),
        (status_of("Ready"), 1, 0, obs(0, replicas=0), "Ready"),
    ],
)
def test_phase(previous, generation, desired, observation, expected):
    assert phase(previous, generation, desired, observation) == expected


def test_observe_deployment():
    def deployment(generation=2, observed=2, replicas=2, updated=2, ready=2, total=2):
        return {
            "metadata": {"generation": generation},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "updatedReplicas": updated, "readyReplicas": ready, "replicas": total},
        }

    assert observe_deployment(deployment()) == (2, 2, False)
    assert observe_deployment(deployment(observed=1)) == (2, 2, True)
    assert observe_deployment(deployment(updated=1)) == (2, 2, True), "an old pod is one of the two"
    assert observe_deployment(deployment(updated=1, total=1, ready=1)) == (1, 1, False), "a pod lost, being replaced"
    assert observe_deployment(deployment(total=3)) == (3, 2, True), "an old pod is still around"
    assert observe_deployment(deployment(ready=1)) == (2, 1, False)
    assert observe_deployment({"metadata": {"generation": 1}, "spec": {"replicas": 2}}) == (0, 0, True)


def test_observe_leader_worker_set():
    """The states LeaderWorkerSet v0.9.0 reported, in this order, as it rolled two groups of two
    pods (watched on the e2e cluster): (replicas, updated, ready) and its conditions."""
    def lws(replicas, updated, ready, *conditions, generation=2, observed=2):
        return {
            "metadata": {"generation": generation},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                       "readyReplicas": ready, "conditions": [{"type": c, "status": "True"} for c in conditions]},
        }

    rolled = [
        lws(2, 2, 2, "Available", generation=2, observed=1),  # the template changed
        lws(2, 1, 2, "Progressing", "UpdateInProgress"),
        lws(3, 1, 3, "Progressing", "UpdateInProgress"),  # the surge group is up
        lws(3, 2, 2, "Progressing", "UpdateInProgress"),
        lws(2, 2, 2, "Progressing", "UpdateInProgress"),  # an old group gone, its replacement not yet there
        lws(3, 3, 3, "Available"),  # every group updated, the surge group's leader still listed
        lws(3, 2, 2, "Available"),
    ]
    assert [observe_leader_worker_set(w)[2] for w in rolled] == [True] * len(rolled)
    assert observe_leader_worker_set(lws(2, 2, 2, "Available")) == (2, 2, False), "rolled"
    assert observe_leader_worker_set(lws(2, 2, 1, "Progressing")) == (2, 1, False), "a group lost, not a roll"


def test_observe_statefulsets():
    sts = [{"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}] * 2
    ok = ReplicaGroup("a", settled=True, stale=False, ready=True)
    down = ReplicaGroup("b", settled=True, stale=False, ready=False)
    stale = ReplicaGroup("b", settled=True, stale=True, ready=True)
    assert observe_statefulsets(sts, [ok, ok], 2) == (2, 2, False)
    assert observe_statefulsets(sts, [ok, down], 2) == (2, 1, False)
    assert observe_statefulsets(sts, [ok, stale], 2) == (2, 2, True)
    assert observe_statefulsets(sts, [ok, ok], 3)[2], "a replica is missing"


def conditions(st):
    return {c["type"]: c for c in st["conditions"]}


def test_ready_status():
    st = compute_status(previous=status_of("Pending"), generation=1, desired=2, obs=obs(2), selector="s=1", now=T0)
    assert {k: st[k] for k in ("phase", "replicas", "readyReplicas", "tokenBudget", "selector", "observedGeneration")} == {
        "phase": "Ready", "replicas": 2, "readyReplicas": 2, "tokenBudget": 512, "selector": "s=1", "observedGeneration": 1}
    cond = conditions(st)
    assert (cond["Ready"]["status"], cond["Ready"]["reason"], cond["Ready"]["message"]) == ("True", "ReplicasReady", "2/2 replicas ready")
    assert (cond["Progressing"]["status"], cond["Progressing"]["reason"]) == ("False", "RolloutComplete")
    assert cond["Degraded"]["status"] == "False"


def test_settings_pending_status_says_which_pods_and_why():
    st = compute_status(previous=status_of("Ready"), generation=1, desired=2,
                        obs=obs(2, pending=["settings not yet applied on pod a: refused"]), selector="", now=T0)
    cond = conditions(st)["Progressing"]
    assert (st["phase"], cond["status"], cond["reason"]) == ("Progressing", "True", "SettingsPending")
    assert cond["message"] == "2/2 replicas ready; settings not yet applied on pod a: refused"


def test_pod_problems_explain_a_phase_short_of_ready():
    problems = ["pod a unschedulable: no GPUs", "pod b unschedulable: no GPUs", "pod c x", "pod d y"]
    pending = compute_status(previous={}, generation=1, desired=4, obs=Observation(4, 0, False, 512, pod_problems=problems),
                             selector="", now=T0)
    assert conditions(pending)["Ready"]["message"] == "0/4 replicas ready; " + "; ".join(problems[:3])
    ready = compute_status(previous={}, generation=1, desired=4, obs=Observation(4, 4, False, 512, pod_problems=problems),
                           selector="", now=T0)
    assert conditions(ready)["Ready"]["message"] == "4/4 replicas ready"


def test_degraded_status():
    st = compute_status(previous=status_of("Ready"), generation=1, desired=2, obs=obs(1), selector="", now=T0)
    cond = conditions(st)
    assert (cond["Degraded"]["status"], cond["Degraded"]["reason"], cond["Degraded"]["message"]) == (
        "True", "ReplicasUnavailable", "1/2 replicas ready")
    assert cond["Ready"]["status"] == "False"


def test_failed_status_keeps_counts_and_explains():
    previous = {"phase": "Ready", "replicas": 2, "readyReplicas": 2, "tokenBudget": 512, "observedGeneration": 1}
    st = failed_status(previous=previous, generation=2, reason="InvalidSpec", message="spec.env must not set RANK", now=T0)
    assert (st["phase"], st["readyReplicas"], st["observedGeneration"]) == ("Failed", 2, 2)
    cond = conditions(st)
    assert (cond["Ready"]["status"], cond["Ready"]["reason"], cond["Ready"]["message"]) == (
        "False", "InvalidSpec", "spec.env must not set RANK")
    assert cond["Degraded"]["status"] == "True"


def test_transition_time_changes_only_with_the_status():
    first = merge_conditions([], [{"type": "Ready", "status": "False", "reason": "a", "message": ""}], 1, T0)
    same = merge_conditions(first, [{"type": "Ready", "status": "False", "reason": "b", "message": ""}], 1, T1)
    flipped = merge_conditions(same, [{"type": "Ready", "status": "True", "reason": "c", "message": ""}], 2, T1)
    assert same[0]["lastTransitionTime"] == T0 and same[0]["reason"] == "b"
    assert flipped[0]["lastTransitionTime"] == T1 and flipped[0]["observedGeneration"] == 2


def test_conditions_of_other_writers_are_kept():
    tuned = {"type": "Tuned", "status": "True", "reason": "x", "message": "", "lastTransitionTime": T0}
    merged = merge_conditions([tuned], [{"type": "Ready", "status": "True", "reason": "r", "message": ""}], 1, T1)
    assert [c["type"] for c in merged] == ["Ready", "Tuned"]


def test_events_on_phase_changes_and_new_failures_only():
    ready = compute_status(previous=status_of("Pending"), generation=1, desired=2, obs=obs(2), selector="", now=T0)
    assert transition_event(status_of("Pending"), ready) == ("Normal", "Ready", "2/2 replicas ready")
    assert transition_event(ready, ready) is None
    degraded = compute_status(previous=ready, generation=1, desired=2, obs=obs(1), selector="", now=T0)
    assert transition_event(ready, degraded)[:2] == ("Warning", "Degraded")
    failed = failed_status(previous=ready, generation=2, reason="InvalidSpec", message="one", now=T0)
    again = failed_status(previous=failed, generation=2, reason="InvalidSpec", message="one", now=T0)
    other = failed_status(previous=failed, generation=3, reason="InvalidSpec", message="two", now=T0)
    assert transition_event(ready, failed) == ("Warning", "Failed", "one")
    assert transition_event(failed, again) is None
    assert transition_event(failed, other) == ("Warning", "Failed", "two")


def test_an_inference_pool_has_its_own_condition_while_the_spec_asks_for_one():
    def conditions(previous, pool):
        observation = Observation(replicas=1, ready=1, rolling=False, token_budget=512, inference_pool=pool)
        return compute_status(previous=previous, generation=1, desired=1, obs=observation, selector="s", now=T0)

    missing = conditions({}, inference_pool_check("chat", served=False))
    assert missing["phase"] == "Ready"  # the engines still serve through their Service
    [cond] = [c for c in missing["conditions"] if c["type"] == INFERENCE_POOL]
    assert (cond["status"], cond["reason"]) == ("False", "CRDNotInstalled")
    assert "spec.gateway.inferencePool" in cond["message"]
    created = conditions(missing, inference_pool_check("chat", served=True))
    [cond] = [c for c in created["conditions"] if c["type"] == INFERENCE_POOL]
    assert (cond["status"], cond["reason"]) == ("True", "Created")
    dropped = conditions(created, None)
    assert INFERENCE_POOL not in {c["type"] for c in dropped["conditions"]}
