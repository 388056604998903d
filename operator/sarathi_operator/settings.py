"""The engine settings that change without a restart: one function decides them, one path (the
reconciler's push) sets them on running engines.

  token_budget  owned by the spec (engine.tokenBudget): the hard cap of every iteration
  tbt_slo_ms    while autotuning, the spec's slo.tbtP99Ms: the engines plan each iteration for it
  slo_margin    while autotuning, the outer loop's (status.autotune.state, autotune/loop.py)

New pods start with them as flags. A change of them alone never rolls pods: a workload whose pod
template is otherwise unchanged (same rollout hash) keeps the settings its pods started with, and
the new ones reach the running engines through their admin API; except a token budget above the
one the pods started with, which their engines did not warm up for (and on a GPU reserved no
memory for): that rolls them. A pod records what its engine
runs: the settings it started with (an annotation of its template), and those applied live
together with the engine container's ID, since a restarted container starts again from its flags.
"""

import json

from . import names, pods
from .autotune.loop import LoopState

NEUTRAL_MARGIN = 1.0


def desired(spec: dict, status: dict) -> dict:
    """The settings every serving engine should run. spec: with defaults."""
    tuned = spec["autotune"]["enabled"]
    margin = LoopState.from_status(status.get("autotune", {}).get("state")).margin if tuned else NEUTRAL_MARGIN
    return {
        "token_budget": spec["engine"]["tokenBudget"],
        "tbt_slo_ms": spec["slo"]["tbtP99Ms"] if tuned else None,
        "slo_margin": margin,
    }


def flags(settings: dict) -> list[str]:
    """The `sarathi serve` flags that start an engine with these settings."""
    args = ["--token-budget", str(settings["token_budget"])]
    if settings["tbt_slo_ms"] is not None:
        args += ["--tbt-slo-ms", f"{settings['tbt_slo_ms']:g}"]
    if settings["slo_margin"] != NEUTRAL_MARGIN:
        args += ["--slo-margin", f"{settings['slo_margin']:g}"]
    return args


def encode(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def started_with(workload: dict | None, rollout_hash: str) -> dict | None:
    """The settings an existing workload's pods started with, when its template is otherwise the
    one wanted now (same rollout hash)."""
    annotations = (workload or {}).get("metadata", {}).get("annotations", {})
    if annotations.get(names.ROLLOUT_HASH) != rollout_hash or names.SETTINGS not in annotations:
        return None
    return json.loads(annotations[names.SETTINGS])


def live_reachable(started: dict, target: dict) -> bool:
    """Whether engines that started with `started` can take `target` live: an engine warms up for
    the token budget it starts with and refuses a larger one."""
    return target["token_budget"] <= started["token_budget"]


def started_settings(pod: dict) -> dict | None:
    started = pod["metadata"].get("annotations", {}).get(names.SETTINGS)
    return json.loads(started) if started else None


def pod_settings(pod: dict) -> dict | None:
    """What the pod's engine runs: the settings applied live to its current container, else those
    it started with."""
    annotations = pod["metadata"].get("annotations", {})
    live = annotations.get(names.LIVE_SETTINGS)
    if live:
        record = json.loads(live)
        if record["containerID"] == pods.engine_container_id(pod):
            return record["settings"]
    return started_settings(pod)


def live_patch(pod: dict, settings: dict) -> dict:
    """The pod metadata patch that records settings applied live."""
    record = {"settings": settings, "containerID": pods.engine_container_id(pod)}
    return {"metadata": {"annotations": {names.LIVE_SETTINGS: json.dumps(record, sort_keys=True)}}}


def pods_needing(serving_pods: list[dict], target: dict) -> list[dict]:
    """Ready serving pods whose engine runs other settings and can take them live; pods that are
    not ready yet are picked up once they are (their workload's status change triggers a
    reconcile), and pods that cannot take them are being replaced (build.children)."""
    return [
        p for p in serving_pods
        if pods.is_ready(p) and not pods.is_terminating(p) and p.get("status", {}).get("podIP")
        and pod_settings(p) != target and live_reachable(started_settings(p) or target, target)
    ]


def budget_in_force(serving_pods: list[dict], previous: int | None, desired_budget: int) -> int:
    """The token budget every serving engine runs; while they disagree (a change is under way),
    the last budget reported as in force."""
    budgets = {(pod_settings(p) or {}).get("token_budget") for p in serving_pods if not pods.is_terminating(p)}
    budgets.discard(None)
    if len(budgets) == 1:
        return budgets.pop()
    return previous if previous is not None else desired_budget


def changes(before: dict | None, after: dict) -> str:
    """'token_budget 512 -> 256, slo_margin 1.0 -> 0.9': what a push changes."""
    before = before or {}
    return ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v)
