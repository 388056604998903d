import json

from sarathi_operator import names
from sarathi_operator.budget import budget_in_force, live_budget_patch, live_target, pod_token_budget, pods_needing_budget


def pod(name="p", started=512, live=None, container="containerd://aaa", ready=True, ip="127.1.0.5", terminating=False):
    annotations = {names.TOKEN_BUDGET: str(started)}
    if live is not None:
        annotations[names.LIVE_TOKEN_BUDGET] = json.dumps(live)
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


def test_live_target_is_the_spec_budget_unless_the_autotuner_owns_it():
    assert live_target({"engine": {"tokenBudget": 700}, "autotune": {"enabled": False}}) == 700
    assert live_target({"engine": {"tokenBudget": 700}, "autotune": {"enabled": True}}) is None


def test_a_pod_runs_its_template_budget_until_changed_live():
    assert pod_token_budget(pod(started=512)) == 512


def test_a_live_change_holds_for_the_same_container():
    p = pod(started=512)
    p["metadata"]["annotations"].update(live_budget_patch(p, 2048)["metadata"]["annotations"])
    assert pod_token_budget(p) == 2048


def test_a_restarted_container_is_back_on_its_template_budget():
    p = pod(started=512, live={"tokenBudget": 2048, "containerID": "containerd://old"}, container="containerd://new")
    assert pod_token_budget(p) == 512


def test_only_ready_reachable_pods_on_another_budget_need_it():
    pods = [
        pod("on-target", started=1024),
        pod("behind"),
        pod("not-ready", ready=False),
        pod("no-ip", ip=None),
        pod("leaving", terminating=True),
    ]
    assert [p["metadata"]["name"] for p in pods_needing_budget(pods, 1024)] == ["behind"]


def test_budget_in_force_is_the_one_all_engines_agree_on():
    assert budget_in_force([pod(started=512), pod(started=512)], previous=None, template_budget=512) == 512
    assert budget_in_force([pod(started=512), pod(started=1024)], previous=512, template_budget=512) == 512
    assert budget_in_force([pod(started=1024), pod(started=1024)], previous=512, template_budget=512) == 1024
    assert budget_in_force([], previous=None, template_budget=300) == 300
    assert budget_in_force([pod(started=9, terminating=True)], previous=700, template_budget=300) == 700
