import pytest

from sarathi_operator.rollout import REVISION_LABEL, ReplicaGroup, replica_group, replica_to_restart


def sts(name, replicas=2, generation=2, observed=2, revision="new"):
    return {
        "metadata": {"name": name, "generation": generation},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": observed, "updateRevision": revision},
    }


def pod(owner, index, revision="new", ready=True, terminating=False):
    meta = {
        "name": f"{owner}-{index}",
        "labels": {REVISION_LABEL: revision},
        "ownerReferences": [{"kind": "StatefulSet", "name": owner}],
    }
    if terminating:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_replica_group_reads_staleness_and_readiness():
    assert replica_group(sts("a"), [pod("a", 0), pod("a", 1), pod("b", 0, revision="old")]) == ReplicaGroup(
        "a", settled=True, stale=False, ready=True)
    assert replica_group(sts("a"), [pod("a", 0, revision="old"), pod("a", 1)]).stale
    assert not replica_group(sts("a"), [pod("a", 0)]).ready, "a missing rank means not ready"
    assert not replica_group(sts("a"), [pod("a", 0), pod("a", 1, ready=False)]).ready
    assert not replica_group(sts("a", observed=1), [pod("a", 0), pod("a", 1)]).settled
    assert not replica_group(sts("a"), [pod("a", 0), pod("a", 1, terminating=True)]).settled


def group(name, stale=False, ready=True, settled=True):
    return ReplicaGroup(name, settled=settled, stale=stale, ready=ready)


def test_nothing_to_restart_when_everything_is_current():
    assert replica_to_restart([group("a"), group("b")]) is None


def test_restart_the_first_stale_replica_while_all_are_ready():
    assert replica_to_restart([group("a"), group("b", stale=True), group("c", stale=True)]) == "b"


def test_wait_while_a_restarted_replica_comes_back():
    assert replica_to_restart([group("a", ready=False), group("b", stale=True)]) is None


def test_a_stale_replica_that_is_already_down_goes_first():
    groups = [group("a", stale=True), group("b", stale=True, ready=False), group("c", ready=False)]
    assert replica_to_restart(groups) == "b"


@pytest.mark.parametrize("unsettled", [group("a", settled=False), group("a", stale=True, settled=False, ready=False)])
def test_nothing_restarts_while_a_previous_step_settles(unsettled):
    assert replica_to_restart([unsettled, group("b", stale=True)]) is None


def test_a_whole_rollout_takes_one_replica_down_at_a_time():
    """Walk a three-replica rollout through the rule, one reconcile at a time."""
    state = {n: {"stale": True, "ready": True} for n in "abc"}
    down_at_once, restarted = [], []
    for _ in range(20):
        groups = [group(n, **s) for n, s in state.items()]
        down_at_once.append(sum(not g.ready for g in groups))
        victim = replica_to_restart(groups)
        if victim:
            restarted.append(victim)
            state[victim] = {"stale": False, "ready": False}  # pods recreated on the new template
        else:
            for s in state.values():
                s["ready"] = True  # the restarted replica becomes ready
    assert restarted == ["a", "b", "c"]
    assert max(down_at_once) == 1
    assert not any(s["stale"] for s in state.values())
