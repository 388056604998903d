"""The token budget in force on running engines, and which engines need a live change.

A pod starts with the budget in its template's `serving.sarathi.dev/token-budget`
annotation (the same value as its `--token-budget` flag). When the operator changes the
budget of a running engine through the admin API, it records the new value on the pod in
`serving.sarathi.dev/live-token-budget`, together with the engine container's ID: a
restarted container starts again from its flag, and the changed ID shows that the recorded
value no longer holds.
"""

import json

from . import names, pods


def live_target(spec: dict) -> int | None:
    """The budget the operator pushes to running engines, or None when the autotuner owns it."""
    if spec["autotune"]["enabled"]:
        return None
    return spec["engine"]["tokenBudget"]


def start_budget(spec: dict, status: dict) -> int:
    """The budget new pods start with: the spec's, or the autotuner's target while it owns the budget."""
    if spec["autotune"]["enabled"]:
        return status.get("autotune", {}).get("targetTokenBudget") or spec["engine"]["tokenBudget"]
    return spec["engine"]["tokenBudget"]


def pod_token_budget(pod: dict) -> int | None:
    annotations = pod["metadata"].get("annotations", {})
    live = annotations.get(names.LIVE_TOKEN_BUDGET)
    if live:
        record = json.loads(live)
        if record["containerID"] == pods.engine_container_id(pod):
            return record["tokenBudget"]
    started = annotations.get(names.TOKEN_BUDGET)
    return int(started) if started else None


def live_budget_patch(pod: dict, budget: int) -> dict:
    """The pod metadata patch that records a budget applied live."""
    record = {"tokenBudget": budget, "containerID": pods.engine_container_id(pod)}
    return {"metadata": {"annotations": {names.LIVE_TOKEN_BUDGET: json.dumps(record, sort_keys=True)}}}


def pods_needing_budget(serving_pods: list[dict], target: int) -> list[dict]:
    """Ready serving pods whose engine runs another budget; pods that are not ready yet are
    picked up once they are (their workload's status change triggers a reconcile)."""
    return [
        p for p in serving_pods
        if pods.is_ready(p) and not pods.is_terminating(p) and p.get("status", {}).get("podIP")
        and pod_token_budget(p) != target
    ]


def budget_in_force(serving_pods: list[dict], previous: int | None, template_budget: int) -> int:
    """The budget every serving engine runs; while they disagree (a change is under way),
    the last budget reported as in force."""
    budgets = {pod_token_budget(p) for p in serving_pods if not pods.is_terminating(p)} - {None}
    if len(budgets) == 1:
        return budgets.pop()
    return previous if previous is not None else template_budget
