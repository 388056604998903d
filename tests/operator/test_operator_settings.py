"""The live engine settings: what a pod's engine runs (its start flags, or what was applied live to
its current container), which pods need a push, and the token budget in force."""

import json

from sarathi_operator import names
from sarathi_operator.settings import budget_in_force, changes, flags, live_patch, pod_settings, pods_needing

BASE = {"token_budget": 512, "tbt_slo_ms": None, "slo_margin": 1.0}


def with_(**changed):
    return {**BASE, **changed}


def pod(name="p", started=BASE, live=None, container="containerd://aaa", ready=True, ip="127.1.0.5",
        terminating=False):
    annotations = {names.SETTINGS: json.dumps(started)}
    if live is not None:
        annotations[names.LIVE_SETTINGS] = json.dumps(live)
    meta = {"name": name, "annotations": annotations}
    if terminating:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status = {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": "engine", "containerID": container}],
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_flags_carry_only_what_differs_from_the_engines_defaults():
    assert flags(BASE) == ["--token-budget", "512"]
    assert flags(with_(tbt_slo_ms=250, slo_margin=0.85)) == [
        "--token-budget", "512", "--tbt-slo-ms", "250", "--slo-margin", "0.85"]


def test_a_pod_runs_its_start_settings_until_changed_live():
    assert pod_settings(pod()) == BASE
    assert pod_settings({"metadata": {"annotations": {}}}) is None


def test_a_live_change_holds_for_the_same_container():
    p = pod()
    p["metadata"]["annotations"].update(live_patch(p, with_(slo_margin=0.8))["metadata"]["annotations"])
    assert pod_settings(p) == with_(slo_margin=0.8)


def test_a_restarted_container_is_back_on_its_start_settings():
    p = pod(live={"settings": with_(token_budget=2048), "containerID": "containerd://old"}, container="containerd://new")
    assert pod_settings(p) == BASE


def test_only_ready_reachable_pods_on_other_settings_need_a_push():
    target = with_(tbt_slo_ms=250)
    pods = [
        pod("on-target", started=target),
        pod("behind"),
        pod("not-ready", ready=False),
        pod("no-ip", ip=None),
        pod("leaving", terminating=True),
    ]
    assert [p["metadata"]["name"] for p in pods_needing(pods, target)] == ["behind"]


def test_pods_that_started_on_a_smaller_budget_are_replaced_not_pushed():
    raised = with_(token_budget=1024)
    pods = [pod("started-at-512"), pod("started-at-2048", started=with_(token_budget=2048))]
    assert [p["metadata"]["name"] for p in pods_needing(pods, raised)] == ["started-at-2048"]


def test_budget_in_force_is_the_one_all_engines_agree_on():
    big = with_(token_budget=1024)
    assert budget_in_force([pod(), pod()], previous=None, desired_budget=512) == 512
    assert budget_in_force([pod(), pod(started=big)], previous=512, desired_budget=512) == 512
    assert budget_in_force([pod(started=big), pod(started=big)], previous=512, desired_budget=512) == 1024
    assert budget_in_force([], previous=None, desired_budget=300) == 300
    assert budget_in_force([pod(started=big, terminating=True)], previous=700, desired_budget=300) == 700


def test_changes_name_what_a_push_moves():
    assert changes(BASE, with_(slo_margin=0.9)) == "slo_margin 1.0 -> 0.9"
    assert changes(None, BASE).startswith("token_budget None -> 512")
