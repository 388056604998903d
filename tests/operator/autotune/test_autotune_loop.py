"""The outer loop as scenarios against a model of the engines: while their planner limits prefill,
P99 TBT = bias x margin x SLO x noise, the bias being what the planning's prediction misses."""

import numpy as np
import pytest

from sarathi_operator.autotune.loop import LoopConfig, LoopState, Observed, step

CONFIG = LoopConfig(slo=0.1)


def planned(p99: float, limited: int = 30, infeasible: int = 0, gaps: int = 500, iterations: int = 300) -> Observed:
    return Observed(gaps, p99, iterations, limited, infeasible)


def run(bias: float, noise: float, windows: int, state: LoopState = LoopState(), seed: int = 0):
    """(P99s, margins after each window) of the loop against the model."""
    rng = np.random.default_rng(seed)
    p99s, margins = [], []
    for _ in range(windows):
        p99 = bias * state.margin * CONFIG.slo * rng.uniform(1 - noise, 1 + noise)
        _, state = step(state, planned(p99), CONFIG)
        p99s.append(p99)
        margins.append(state.margin)
    return np.array(p99s), np.array(margins)


@pytest.mark.parametrize("bias", [1.3, 1.6, 2.5])
def test_an_slo_the_planning_misses_is_met_within_four_windows(bias):
    p99s, _ = run(bias, noise=0.0, windows=10)
    assert p99s[0] > CONFIG.slo and (p99s[4:] <= CONFIG.slo).all()
    assert p99s[-1] == pytest.approx(CONFIG.aim * CONFIG.slo, rel=0.2)  # just under it


@pytest.mark.parametrize("noise", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("bias", [1.2, 1.6])
def test_the_loop_converges_and_stays_put_under_noise(bias, noise):
    _, margins = run(bias, noise, windows=200)
    steady, ideal = margins[20:], CONFIG.aim / bias
    assert (np.abs(steady / ideal - 1) < 0.15).all()
    if noise <= 0.1:  # inside the dead band's width: it rests; wider noise moves it, within the bound above
        assert np.count_nonzero(np.diff(steady)) <= len(steady) * 0.05


def test_a_tightened_margin_is_loosened_back_only_while_the_slo_limits_prefill_and_never_past_one():
    tight = LoopState(margin=0.5)
    decision, state = step(tight, planned(0.03, limited=0), CONFIG)
    assert decision.action == "hold" and "too few for P99 to show the planning" in decision.reason
    assert state.margin == 0.5  # no windup while the traffic, not the planning, sets P99
    decision, state = step(state, planned(0.05, limited=30), CONFIG)
    assert decision.action == "loosen" and state.margin == pytest.approx(0.5 * (0.09 / 0.05) ** 0.5, rel=1e-3)
    # A planning more cautious than the SLO needs (bias under 1) keeps the margin at 1.
    _, margins = run(bias=0.6, noise=0.1, windows=50)
    assert (margins == 1.0).all()


def test_the_margin_stays_within_its_bounds():
    state = LoopState()
    for _ in range(30):
        _, state = step(state, planned(1.0), CONFIG)
    assert state.margin == CONFIG.min_margin
    decision, state = step(state, planned(1.0), CONFIG)
    assert decision.action == "hold" and "at its bound" in decision.reason
    for _ in range(30):
        _, state = step(state, planned(0.01), CONFIG)
    assert state.margin == CONFIG.max_margin == 1.0


def test_too_few_samples_hold_and_do_not_end_the_window():
    decision, state = step(LoopState(margin=0.7), planned(0.5, gaps=CONFIG.min_samples - 1), CONFIG)
    assert (decision.action, decision.acted, state) == ("hold", False, LoopState(margin=0.7))
    assert step(LoopState(), Observed(0, None, 0, 0, 0), CONFIG)[0].acted is False


def test_with_few_gaps_the_window_waits():
    # Long prompts, short outputs: 40 gaps from 40 iterations that carried decodes; the many
    # prefill-only iterations beside them, sized by the budget, are not counted and not waited on.
    decision, state = step(LoopState(), planned(None, gaps=40, iterations=40, limited=20), CONFIG)
    assert (decision.action, decision.acted, state) == ("hold", False, LoopState())
    assert "40 token gaps" in decision.reason


def test_decodes_alone_over_the_slo_hold_the_margin_and_report_it_until_it_clears():
    over = planned(0.3, infeasible=CONFIG.infeasible_share * 300)
    decision, state = step(LoopState(margin=0.8), over, CONFIG)
    assert decision.infeasible and state == LoopState(margin=0.8, infeasible=True)
    assert "more replicas are the remedy" in decision.reason
    # Reported until the share falls below half the threshold: no flapping at its edge.
    _, state = step(state, planned(0.09, infeasible=int(CONFIG.infeasible_share * 300 * 0.6)), CONFIG)
    assert state.infeasible
    _, state = step(state, planned(0.09, infeasible=1), CONFIG)
    assert not state.infeasible


def test_the_state_round_trips_through_the_status_verbatim():
    state = LoopState(margin=0.6734, infeasible=True)
    assert LoopState.from_status(state.to_status()) == state


def test_replica_scaling_on_the_load_and_the_loop_on_p99_do_not_fight():
    """A scaler sets replicas from the request rate each serves while the loop sets the margin from
    P99. A replica serves up to `capacity x margin^0.5` requests/s (a tighter margin cuts prefill);
    the scaler aims each at 80% of what it serves. While their planner limits prefill, P99 = bias x
    margin x SLO whatever the load, so the margin settles where the bias puts it and a load ramp up
    and down moves only the replicas, once each way."""
    bias, capacity = 1.5, 1.0
    rng = np.random.default_rng(3)
    state, replicas = LoopState(), 1
    margins, counts = [], []
    for load in np.concatenate([np.linspace(0.5, 6, 60), np.full(40, 6.0), np.linspace(6, 1, 60)]):
        p99 = bias * state.margin * CONFIG.slo * rng.uniform(0.9, 1.1)
        _, state = step(state, planned(p99), CONFIG)
        per_replica = capacity * state.margin ** 0.5
        desired = int(np.ceil(load / (0.8 * per_replica)))
        if abs(desired - replicas) / replicas > 0.1:  # the HPA's tolerance
            replicas = desired
        margins.append(state.margin)
        counts.append(replicas)
    ideal = CONFIG.aim / bias
    assert (np.abs(np.array(margins[10:]) / ideal - 1) < 0.15).all()  # the margin ignores the replicas
    assert max(counts) == int(np.ceil(6 / (0.8 * capacity * ideal ** 0.5))) and counts[-1] < max(counts)
    moves = np.sign([b - a for a, b in zip(counts, counts[1:]) if b != a])
    assert np.count_nonzero(np.diff(moves)) == 1  # up while the load rises, down while it falls: no see-saw
