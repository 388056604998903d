"""What a pass leaves behind: status fields, history, Events, metrics, and the state a
restarted operator resumes from."""

from prometheus_client import REGISTRY

from sarathi_operator.autotune import record
from sarathi_operator.autotune.aggregate import Histogram, Window
from sarathi_operator.autotune.decide import Config, Decision, State, evidence
from sarathi_operator.autotune.model import Point
from sarathi_operator.autotune.tuner import Pass

CONFIG = Config(slo=0.1, min_budget=64, max_budget=2048)
T0 = 1_750_000_000.0
SPEC = {"engine": {"tokenBudget": 512}}


def a_pass(budget=384, previous=512, action="shrink", reason="P99 TBT 130 ms at budget 512 exceeds the SLO 100 ms",
           samples=800, apply_errors=None, scrape_errors=None, t=T0, p99=0.13,
           iterations: Histogram = Histogram()) -> Pass:
    window = Window(seconds=30.04, engines=2, tbt_samples=samples, tbt_p99=p99, ttft_p99=None,
                    request_rate=1.23456, budget_bound_share=0.4, iterations=iterations)
    return Pass(time=t, window=window, previous_budget=previous, decision=Decision(budget, action, reason),
                scrape_errors=scrape_errors or {}, applied=["a"], apply_errors=apply_errors or {},
                evidence=evidence(window, CONFIG))


def iteration_times(count: int, slow: int) -> Histogram:
    """count iterations, slow of them between 0.2 and 0.5 s, the rest under 0.05 s."""
    bounds = (0.05, 0.1, 0.2, 0.5, float("inf"))
    return Histogram(bounds, (count - slow, count - slow, count - slow, count, count))


def test_a_change_writes_observed_the_decision_and_a_history_entry():
    patch = record.status_patch(a_pass(apply_errors={"pod-b": "ClientConnectorError: refused"}), [])
    assert patch["observed"] == {"tbtP99Ms": 130.0, "actedOn": "tbtP99Ms", "requestRate": 1.235, "windowSeconds": 30.0,
                                 "tbtSamples": 800, "budgetBoundShare": 0.4, "time": "2025-06-15T15:06:40Z"}
    assert patch["autotune"] == {
        "targetTokenBudget": 384, "lastDecision": "shrink: P99 TBT 130 ms at budget 512 exceeds the SLO 100 ms",
        "lastDecisionTime": "2025-06-15T15:06:40Z", "unappliedEngines": ["pod-b: ClientConnectorError: refused"],
        "unreadEngines": []}
    (entry,) = patch["tuningHistory"]
    assert entry["tokenBudget"] == 384 and entry["previousTokenBudget"] == 512 and entry["action"] == "shrink"
    assert entry["reason"].startswith("P99 TBT 130 ms") and entry["tbtP99Ms"] == 130.0 and "ttftP99Ms" not in entry


def test_a_hold_leaves_the_history_alone_and_a_thin_window_leaves_observed_alone():
    patch = record.status_patch(a_pass(budget=512, action="hold", reason="too few samples", samples=10), [])
    assert "tuningHistory" not in patch and "observed" not in patch
    assert patch["autotune"]["lastDecision"] == "hold: too few samples"


def test_a_decision_on_iteration_times_shows_them_and_a_restart_resumes_from_them():
    shrink = a_pass(budget=96, previous=224, reason="P99 iteration time 350 ms at budget 224 exceeds the SLO 100 ms",
                    samples=3, p99=0.04, iterations=iteration_times(150, 10))
    patch = record.status_patch(shrink, [])
    observed = patch["observed"]
    assert observed["actedOn"] == "iterationP99Ms" and observed["iterations"] == 150 and observed["tbtSamples"] == 3
    assert 200 < observed["iterationP99Ms"] <= 500 and observed["tbtP99Ms"] == 40.0
    (entry,) = patch["tuningHistory"]
    assert entry["actedOn"] == "iterationP99Ms" and entry["iterationP99Ms"] == observed["iterationP99Ms"]
    state = record.resume({"autotune": {"targetTokenBudget": 96}, "tuningHistory": [entry]}, SPEC, CONFIG, now=T0)
    assert state.ceiling == Point(224, observed["iterationP99Ms"] / 1000, T0)


def test_the_history_keeps_the_latest_changes():
    history = [{"tokenBudget": i} for i in range(record.HISTORY)]
    patched = record.status_patch(a_pass(), history)["tuningHistory"]
    assert len(patched) == record.HISTORY and patched[0] == {"tokenBudget": 1} and patched[-1]["tokenBudget"] == 384


def test_events_one_per_change_and_warnings_when_something_starts_going_wrong():
    assert record.event(a_pass(), {}) == (
        "Normal", "TokenBudgetTuned", "token budget 512 -> 384: P99 TBT 130 ms at budget 512 exceeds the SLO 100 ms")
    hold = dict(budget=512, action="hold", reason="within the SLO")
    assert record.event(a_pass(**hold), {}) is None
    failing = a_pass(**hold, apply_errors={"pod-b": "timeout"})
    assert record.event(failing, {}) == ("Warning", "TokenBudgetPending", "token budget 512 not applied on pod-b: timeout")
    assert record.event(failing, {"autotune": {"unappliedEngines": ["pod-b: timeout"]}}) is None
    stuck = a_pass(budget=64, previous=64, action="hold", reason="P99 TBT 300 ms at budget 64 exceeds the SLO 100 ms "
                                                                  "at the minimum budget")
    assert record.event(stuck, {})[:2] == ("Warning", "SLOUnattainable")
    assert record.event(stuck, {"autotune": {"lastDecision": "hold: " + stuck.decision.reason}}) is None


def test_a_restarted_operator_resumes_from_the_target_and_the_recent_history():
    history = [
        {**record.history_entry(a_pass(budget=1024, previous=512, action="grow", p99=0.05, t=T0 - 1000))},
        {**record.history_entry(a_pass(budget=640, previous=1024, action="shrink", p99=0.15, t=T0 - 60))},
        {**record.history_entry(a_pass(budget=576, previous=640, action="shrink", p99=0.11, t=T0 - 30))},
    ]
    status = {"tokenBudget": 640, "autotune": {"targetTokenBudget": 576}, "tuningHistory": history}
    state = record.resume(status, SPEC, CONFIG, now=T0)
    assert state.budget == 576
    # The grow is older than memory_seconds: forgotten.
    assert state.points == (Point(1024, 0.15, T0 - 60), Point(640, 0.11, T0 - 30))
    assert state.ceiling == Point(640, 0.11, T0 - 30)
    assert state.recent == state.points


def test_without_a_target_it_resumes_from_the_budget_in_force_or_the_spec():
    assert record.resume({"tokenBudget": 640}, SPEC, CONFIG, T0) == State(640)
    assert record.resume({}, SPEC, CONFIG, T0) == State(512)


def test_disabling_clears_what_the_autotuner_owns_but_keeps_the_history():
    status = {"phase": "Ready", "observed": {"tbtP99Ms": 1}, "autotune": {}, "tuningHistory": [{}]}
    assert record.cleared(status) == {"observed": None, "autotune": None}
    assert record.cleared({"phase": "Ready"}) == {}


def test_metrics_per_resource_and_forgetting_them():
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, {"namespace": "ns", "name": "chat", **labels})

    record.metrics("ns", "chat", a_pass())
    record.metrics("ns", "chat", a_pass(budget=384, previous=384, action="hold", reason="ok", samples=5, p99=9.0))
    assert value("sarathi_operator_autotune_token_budget") == 384
    assert value("sarathi_operator_autotune_tbt_p99_seconds") == 0.13  # the thin window is not shown
    assert value("sarathi_operator_autotune_decisions_total", action="shrink") == 1
    assert value("sarathi_operator_autotune_decisions_total", action="hold") == 1
    record.forget_metrics("ns", "chat")
    assert value("sarathi_operator_autotune_token_budget") is None
    assert value("sarathi_operator_autotune_decisions_total", action="hold") is None
