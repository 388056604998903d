"""Record: what a pass found, as the SarathiDeployment's status, its tuning history, Events
and the operator's metrics; and the controller state read back from the status after a
restart. Pure functions, except for the metric updates.

status.observed      the latest window a decision could act on: P99 TBT, iteration time and
                     TTFT, request rate, and which P99 the decision acted on
status.autotune      the target budget, the latest decision and why, engines not yet on it
status.tuningHistory the last HISTORY changes of the budget, each with its reason and window
"""

import datetime

from prometheus_client import Counter, Gauge

from .decide import AT_MINIMUM, Config, State
from .model import Point
from .tuner import Pass

HISTORY = 20
MAX_LISTED = 5

LABELS = ("namespace", "name")
BUDGET = Gauge("sarathi_operator_autotune_token_budget", "Token budget the autotuner set", LABELS)
TBT_P99 = Gauge("sarathi_operator_autotune_tbt_p99_seconds", "P99 time between tokens in the latest window", LABELS)
TTFT_P99 = Gauge("sarathi_operator_autotune_ttft_p99_seconds", "P99 time to first token in the latest window", LABELS)
ITERATION_P99 = Gauge("sarathi_operator_autotune_iteration_p99_seconds",
                      "P99 engine iteration time in the latest window", LABELS)
REQUEST_RATE = Gauge("sarathi_operator_autotune_request_rate", "Finished requests per second in the latest window",
                     LABELS)
DECISIONS = Counter("sarathi_operator_autotune_decisions_total", "Autotuner decisions by action",
                    (*LABELS, "action"))
SCRAPE_ERRORS = Counter("sarathi_operator_autotune_scrape_errors_total", "Engine /metrics scrapes that failed",
                        LABELS)
APPLY_ERRORS = Counter("sarathi_operator_autotune_apply_errors_total", "Engines that did not take the budget",
                       LABELS)
_PER_RESOURCE = (BUDGET, TBT_P99, TTFT_P99, ITERATION_P99, REQUEST_RATE, SCRAPE_ERRORS, APPLY_ERRORS)
# The observed field holding each kind of P99 decide.evidence() returns.
ACTED_ON = {"TBT": "tbtP99Ms", "iteration time": "iterationP99Ms"}


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def observed(p: Pass) -> dict:
    w = p.window
    fields = {
        "tbtP99Ms": _ms(w.tbt_p99),
        "iterationP99Ms": _ms(w.iteration_p99),
        "actedOn": ACTED_ON[p.evidence.of] if p.evidence else None,
        "ttftP99Ms": _ms(w.ttft_p99),
        "requestRate": round(w.request_rate, 3),
        "windowSeconds": round(w.seconds, 1),
        "tbtSamples": w.tbt_samples,
        "iterations": int(w.iterations.count) or None,
        "budgetBoundShare": None if w.budget_bound_share is None else round(w.budget_bound_share, 3),
        "time": iso(p.time),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _listed(problems: dict[str, str]) -> list[str]:
    return [f"{key}: {why}" for key, why in sorted(problems.items())[:MAX_LISTED]]


def status_patch(p: Pass, history: list[dict]) -> dict:
    """The status fields the autotuner owns after a pass; observed only from a window the
    decision could act on."""
    patch = {
        "autotune": {
            "targetTokenBudget": p.decision.budget,
            "lastDecision": f"{p.decision.action}: {p.decision.reason}",
            "lastDecisionTime": iso(p.time),
            "unappliedEngines": _listed(p.apply_errors),
            "unreadEngines": _listed(p.scrape_errors),
        },
    }
    if p.evidence is not None:
        patch["observed"] = observed(p)
    if p.decision.budget != p.previous_budget:
        patch["tuningHistory"] = (history + [history_entry(p)])[-HISTORY:]
    return patch


def history_entry(p: Pass) -> dict:
    return {
        "time": iso(p.time),
        "tokenBudget": p.decision.budget,
        "previousTokenBudget": p.previous_budget,
        "action": p.decision.action,
        "reason": p.decision.reason,
        **{k: v for k, v in observed(p).items() if k != "time"},
    }


def event(p: Pass, previous: dict) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event a pass deserves: one per change of the budget, and a
    warning when engines start failing to take it or the SLO cannot be met at the minimum."""
    d = p.decision
    if d.budget != p.previous_budget:
        return "Normal", "TokenBudgetTuned", f"token budget {p.previous_budget} -> {d.budget}: {d.reason}"
    before = previous.get("autotune", {})
    if p.apply_errors and not before.get("unappliedEngines"):
        return "Warning", "TokenBudgetPending", f"token budget {d.budget} not applied on " + "; ".join(
            _listed(p.apply_errors))
    if d.reason.endswith(AT_MINIMUM) and not before.get("lastDecision", "").endswith(AT_MINIMUM):
        return "Warning", "SLOUnattainable", d.reason
    return None


def resume(status: dict, spec: dict, config: Config, now: float) -> State:
    """The controller state after an operator restart: the target it had set, and the
    observations and ceiling that its history still remembers (holds are not in it, so the
    recent windows a grow starts from are the changes')."""
    budget = status.get("autotune", {}).get("targetTokenBudget") or status.get("tokenBudget") \
        or spec["engine"]["tokenBudget"]
    points, recent, ceiling = [], [], None
    for entry in status.get("tuningHistory", []):
        t = parse_iso(entry["time"])
        p99 = entry.get(entry.get("actedOn", "tbtP99Ms"))
        if t < now - config.memory_seconds or p99 is None:
            continue
        seen = Point(entry["previousTokenBudget"], p99 / 1000, t)
        recent.append(seen)
        if (entry.get("budgetBoundShare") or 0) >= config.min_bound_share:
            points.append(seen)
        if entry["action"] == "shrink" and (ceiling is None or seen.budget <= ceiling.budget):
            ceiling = seen
    return State(budget=budget, points=tuple(points[-5:]), ceiling=ceiling,
                 recent=tuple(recent[-config.grow_memory:]))


def cleared(status: dict) -> dict:
    """The status patch that removes what the autotuner owns once it is disabled; the history stays."""
    return {key: None for key in ("observed", "autotune") if key in status}


def metrics(namespace: str, name: str, p: Pass) -> None:
    labels = (namespace, name)
    BUDGET.labels(*labels).set(p.decision.budget)
    DECISIONS.labels(*labels, p.decision.action).inc()
    SCRAPE_ERRORS.labels(*labels).inc(len(p.scrape_errors))
    APPLY_ERRORS.labels(*labels).inc(len(p.apply_errors))
    w = p.window
    if p.evidence is not None:
        for gauge, value in ((TBT_P99, w.tbt_p99), (ITERATION_P99, w.iteration_p99),
                             (TTFT_P99, w.ttft_p99)):
            if value is not None:
                gauge.labels(*labels).set(value)
        REQUEST_RATE.labels(*labels).set(w.request_rate)


def forget_metrics(namespace: str, name: str) -> None:
    for metric in _PER_RESOURCE:
        try:
            metric.remove(namespace, name)
        except KeyError:
            pass
    for action in ("grow", "shrink", "hold"):
        try:
            DECISIONS.remove(namespace, name, action)
        except KeyError:
            pass
