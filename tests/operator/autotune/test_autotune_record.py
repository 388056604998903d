"""What a pass leaves behind: status fields (the loop's state verbatim), history, the SLOFeasible
condition, Events, metrics, and the state a restarted operator resumes from."""

from prometheus_client import REGISTRY

from sarathi_operator.autotune import record
from sarathi_operator.autotune.aggregate import Histogram, Window
from sarathi_operator.autotune.loop import Decision, LoopConfig, LoopState, step
from sarathi_operator.autotune.tuner import Pass

T0 = 1_750_000_000.0
CONFIG = LoopConfig(slo=0.1)
BOUNDS = (0.05, 0.1, 0.2, 0.5, float("inf"))


def window(gaps_over: int = 0, gaps: int = 800, iterations: int = 400, limited: int = 40,
           infeasible: int = 0) -> Window:
    """gaps token gaps, gaps_over of them in (0.2, 0.5] s, the rest in (0.05, 0.1]."""
    tbt = Histogram(BOUNDS, (0, gaps - gaps_over, gaps - gaps_over, gaps, gaps))
    its = Histogram(BOUNDS, (0, iterations, iterations, iterations, iterations))
    return Window(30.04, 2, tbt, Histogram(), its, 37.0, limited, infeasible)


def a_pass(w: Window, state: LoopState = LoopState(), scrape_errors=None, t=T0) -> Pass:
    decision, after = step(state, w.observed(), CONFIG)
    return Pass(time=t, window=w, decision=decision, state=after, scrape_errors=scrape_errors or {}, reported={})


def test_a_tightening_writes_the_state_observed_a_history_entry_and_the_condition():
    p = a_pass(window(gaps_over=40), scrape_errors={"pod-b": "ClientConnectorError: refused"})
    assert p.decision.action == "tighten"
    patch = record.status_patch(p, {"conditions": [{"type": "Ready", "status": "True"}]}, generation=3)
    assert patch["autotune"]["state"] == {"margin": p.decision.margin, "infeasible": False}
    assert patch["autotune"]["lastDecision"].startswith("tighten: P99 TBT")
    assert patch["autotune"]["unreadEngines"] == ["pod-b: ClientConnectorError: refused"]
    assert patch["observed"]["tbtSamples"] == 800 and patch["observed"]["iterations"] == 400
    assert patch["observed"]["limitedIterations"] == 40 and patch["observed"]["requestRate"] == 1.232
    assert 200 < patch["observed"]["tbtP99Ms"] <= 500
    (entry,) = patch["tuningHistory"]
    assert entry["margin"] == p.decision.margin < entry["previousMargin"] == LoopState().margin and entry["action"] == "tighten"
    feasible = next(c for c in patch["conditions"] if c["type"] == record.CONDITION)
    assert feasible["status"] == "True" and feasible["observedGeneration"] == 3
    assert any(c["type"] == "Ready" for c in patch["conditions"])  # the reconciler's are kept


def test_a_thin_window_leaves_observed_the_history_and_the_condition_alone():
    patch = record.status_patch(a_pass(window(gaps=10, iterations=10)), {}, generation=1)
    assert set(patch) == {"autotune"} and patch["autotune"]["lastDecision"].startswith("hold: too few samples")


def test_the_history_keeps_the_latest_changes():
    history = [{"margin": i} for i in range(record.HISTORY)]
    patched = record.status_patch(a_pass(window(gaps_over=40)), {"tuningHistory": history}, 1)["tuningHistory"]
    assert len(patched) == record.HISTORY and patched[0] == {"margin": 1} and patched[-1]["action"] == "tighten"


def test_infeasible_load_is_a_false_condition_a_warning_once_and_a_normal_event_when_it_clears():
    bad = a_pass(window(gaps_over=40, infeasible=100))
    assert bad.decision.infeasible and bad.decision.margin == LoopState().margin  # held: a smaller margin cannot help
    condition = next(c for c in record.status_patch(bad, {}, 1)["conditions"] if c["type"] == record.CONDITION)
    assert condition["status"] == "False" and condition["reason"] == "DecodesExceedSLO"
    assert "more replicas" in condition["message"]
    assert record.event(bad, LoopState())[:2] == ("Warning", "SLOInfeasible")
    still = a_pass(window(gaps_over=40, infeasible=100), state=LoopState(infeasible=True))
    assert record.event(still, LoopState(infeasible=True)) is None
    cleared = a_pass(window(), state=LoopState(infeasible=True))
    assert record.event(cleared, LoopState(infeasible=True))[:2] == ("Normal", "SLOFeasible")


def test_events_one_per_change_of_the_margin():
    p = a_pass(window(gaps_over=40))
    kind, reason, message = record.event(p, LoopState())
    assert (kind, reason) == ("Normal", "SLOMarginTuned") and message.startswith(f"SLO margin {LoopState().margin:g} -> {p.decision.margin:g}")
    assert record.event(a_pass(window()), LoopState()) is None  # within the dead band


def test_a_restarted_operator_resumes_the_exact_state():
    state = LoopState(margin=0.8123, infeasible=True)
    p = Pass(T0, window(), Decision("hold", "why", 0.8123, 0.8123, True, True), state, {}, {})
    status = record.status_patch(p, {}, 1)
    assert record.resume(status) == state
    assert record.resume({}) == LoopState()


def test_disabling_clears_what_the_autotuner_owns_but_keeps_the_history():
    conditions = [{"type": "Ready", "status": "True"}, {"type": record.CONDITION, "status": "False"}]
    status = {"phase": "Ready", "observed": {"tbtP99Ms": 1}, "autotune": {}, "tuningHistory": [{}]}
    assert record.cleared(status, conditions) == {"observed": None, "autotune": None,
                                                  "conditions": [{"type": "Ready", "status": "True"}]}
    assert record.cleared({"phase": "Ready"}, conditions[:1]) == {"conditions": conditions[:1]}


def test_metrics_per_resource_and_forgetting_them():
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, {"namespace": "ns", "name": "chat", **labels})

    tightened = a_pass(window(gaps_over=40))
    record.metrics("ns", "chat", tightened)
    record.metrics("ns", "chat", a_pass(window(gaps=10, iterations=10), state=LoopState(margin=tightened.decision.margin)))
    assert value("sarathi_operator_autotune_slo_margin") == tightened.decision.margin
    assert 0.2 < value("sarathi_operator_autotune_tbt_p99_seconds") <= 0.5  # the thin window is not shown
    assert value("sarathi_operator_autotune_decisions_total", action="tighten") == 1
    assert value("sarathi_operator_autotune_decisions_total", action="hold") == 1
    record.forget_metrics("ns", "chat")
    assert value("sarathi_operator_autotune_slo_margin") is None
    assert value("sarathi_operator_autotune_decisions_total", action="hold") is None
