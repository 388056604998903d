"""Record: what a pass found, as the SarathiDeployment's status, its tuning history, Events and
the operator's metrics; and the loop's state read back from the status after a restart. Pure
functions, except for the metric updates.

status.autotune.state    the loop's whole state (loop.LoopState), verbatim: a restarted
                         operator resumes from exactly it
status.autotune          besides: the latest decision and why, engines that could not be read
status.observed          the latest window the loop acted on
status.tuningHistory     the last HISTORY changes of the margin, each with its reason and window
condition SLOFeasible    False while the decodes alone exceed the SLO at this load
"""

import datetime

from prometheus_client import Counter, Gauge

from ..status import merge_conditions
from .loop import LoopState
from .tuner import Pass

HISTORY = 20
MAX_LISTED = 5
CONDITION = "SLOFeasible"

LABELS = ("namespace", "name")
MARGIN = Gauge("sarathi_operator_autotune_slo_margin", "The share of the SLO the engines plan for", LABELS)
INFEASIBLE = Gauge("sarathi_operator_autotune_slo_infeasible",
                   "1 while the decodes alone exceed the SLO at this load", LABELS)
TBT_P99 = Gauge("sarathi_operator_autotune_tbt_p99_seconds", "P99 time between tokens in the latest window", LABELS)
TTFT_P99 = Gauge("sarathi_operator_autotune_ttft_p99_seconds", "P99 time to first token in the latest window", LABELS)
REQUEST_RATE = Gauge("sarathi_operator_autotune_request_rate", "Finished requests per second in the latest window",
                     LABELS)
DECISIONS = Counter("sarathi_operator_autotune_decisions_total", "Outer loop decisions by action",
                    (*LABELS, "action"))
SCRAPE_ERRORS = Counter("sarathi_operator_autotune_scrape_errors_total", "Engine /metrics scrapes that failed",
                        LABELS)
_PER_RESOURCE = (MARGIN, INFEASIBLE, TBT_P99, TTFT_P99, REQUEST_RATE, SCRAPE_ERRORS)
ACTIONS = ("tighten", "loosen", "hold")


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def observed(p: Pass) -> dict:
    w = p.window
    fields = {
        "tbtP99Ms": _ms(w.tbt_p99),
        "iterationP99Ms": _ms(w.iterations.quantile(0.99)),
        "ttftP99Ms": _ms(w.ttft_p99),
        "requestRate": round(w.request_rate, 3),
        "windowSeconds": round(w.seconds, 1),
        "tbtSamples": w.tbt_samples,
        "iterations": int(w.iterations.count),
        "limitedIterations": w.limited,
        "infeasibleIterations": w.infeasible,
        "time": iso(p.time),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _listed(problems: dict[str, str]) -> list[str]:
    return [f"{key}: {why}" for key, why in sorted(problems.items())[:MAX_LISTED]]


def feasibility(p: Pass) -> dict:
    d = p.decision
    if d.infeasible:
        return {"type": CONDITION, "status": "False", "reason": "DecodesExceedSLO", "message": d.reason}
    return {"type": CONDITION, "status": "True", "reason": "WithinReach", "message": "the decodes alone fit the SLO"}


def status_patch(p: Pass, previous: dict, generation: int) -> dict:
    """The status fields the autotuner owns after a pass; the observed window and the condition
    only from a window the loop acted on."""
    d = p.decision
    patch = {
        "autotune": {
            "state": p.state.to_status(),
            "lastDecision": f"{d.action}: {d.reason}",
            "lastDecisionTime": iso(p.time),
            "unreadEngines": _listed(p.scrape_errors),
        },
    }
    if d.acted:
        patch["observed"] = observed(p)
        patch["conditions"] = merge_conditions(previous.get("conditions", []), [feasibility(p)], generation,
                                               iso(p.time))
    if d.margin != d.previous_margin:
        patch["tuningHistory"] = (previous.get("tuningHistory", []) + [history_entry(p)])[-HISTORY:]
    return patch


def history_entry(p: Pass) -> dict:
    d, o = p.decision, observed(p)
    return {"time": iso(p.time), "margin": d.margin, "previousMargin": d.previous_margin, "action": d.action,
            "reason": d.reason, **{k: o[k] for k in ("tbtP99Ms", "tbtSamples", "iterations", "limitedIterations")
                                   if k in o}}


def event(p: Pass, was: LoopState) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event a pass deserves: a change of the margin, or of the
    SLO's feasibility."""
    d = p.decision
    if d.infeasible and not was.infeasible:
        return "Warning", "SLOInfeasible", d.reason
    if was.infeasible and not d.infeasible and d.acted:
        return "Normal", "SLOFeasible", d.reason
    if d.margin != d.previous_margin:
        return "Normal", "SLOMarginTuned", f"SLO margin {d.previous_margin:g} -> {d.margin:g}: {d.reason}"
    return None


def resume(status: dict) -> LoopState:
    """The loop's state after an operator restart: exactly what the last pass saved."""
    return LoopState.from_status(status.get("autotune", {}).get("state"))


def cleared(previous: dict, conditions: list[dict]) -> dict:
    """The status patch that removes what the autotuner owns once it is disabled; the history stays.
    conditions: those about to be written."""
    patch = {key: None for key in ("observed", "autotune") if key in previous}
    patch["conditions"] = [c for c in conditions if c["type"] != CONDITION]
    return patch


def metrics(namespace: str, name: str, p: Pass) -> None:
    labels, d, w = (namespace, name), p.decision, p.window
    MARGIN.labels(*labels).set(d.margin)
    INFEASIBLE.labels(*labels).set(int(d.infeasible))
    DECISIONS.labels(*labels, d.action).inc()
    SCRAPE_ERRORS.labels(*labels).inc(len(p.scrape_errors))
    if d.acted:
        for gauge, value in ((TBT_P99, w.tbt_p99), (TTFT_P99, w.ttft_p99)):
            if value is not None:
                gauge.labels(*labels).set(value)
        REQUEST_RATE.labels(*labels).set(w.request_rate)


def forget_metrics(namespace: str, name: str) -> None:
    for metric in _PER_RESOURCE:
        try:
            metric.remove(namespace, name)
        except KeyError:
            pass
    for action in ACTIONS:
        try:
            DECISIONS.remove(namespace, name, action)
        except KeyError:
            pass
