"""The controller against synthetic P99 TBT(budget) curves (simulate.py): where it converges, in
how many decisions, against blind stepping, and how it behaves under noise and a load change.

Stated figures (decisions, one per interval; SLO 100 ms, bounds [32, 8192]):
- from 4096, far above the SLO: met within 3 decisions, settled within 3;
- from 64, far below: two calm windows per at most doubling step, so settled within
  2 x log2(best / 64) + 2 decisions;
- the model-based step is never slower than blind stepping by x1.25 or x1.5, and faster in total;
- under 5% noise on each window's P99 it stays within 40% of the best budget, changes at most
  8 times in 45 intervals and never reverses twice in a row; under 10%, it still meets the SLO
  in at least 85% of intervals.
"""

import math

import pytest

from sarathi_operator.autotune import simulate
from sarathi_operator.autotune.simulate import CONFIG, CURVES, STEPPERS

CASES = [(name, start) for name in CURVES for start in (64, 4096)]


@pytest.mark.parametrize("name, start", CASES)
def test_without_noise_it_converges_where_the_rules_rest_within_the_stated_steps(name, start):
    curve = CURVES[name]
    history = simulate.run(curve, start, 40)
    best = simulate.best_budget(curve, CONFIG)
    settled = simulate.steps_to_converge(curve, history)
    assert settled is not None
    if start > best:
        assert simulate.steps_to_meet_slo(curve, history) <= 3 and settled <= 3
    else:
        assert settled <= 2 * math.ceil(math.log2(best / start)) + 2
    final = history[-1].decision.budget
    assert curve(final) <= CONFIG.slo and final % CONFIG.multiple == 0
    assert len({s.decision.budget for s in history[-20:]}) == 1


def test_the_model_based_step_beats_blind_stepping():
    totals = dict.fromkeys(STEPPERS, 0)
    for name, start in CASES:
        curve = CURVES[name]
        steps = {k: simulate.steps_to_converge(curve, simulate.run(curve, start, 60, estimate=e))
                 for k, e in STEPPERS.items()}
        steps = {k: 60 if v is None else v for k, v in steps.items()}
        assert steps["model"] <= min(steps.values()), (name, start, steps)
        for k, v in steps.items():
            totals[k] += v
    assert totals["model"] * 2 < min(v for k, v in totals.items() if k != "model"), totals


@pytest.mark.parametrize("name, start", CASES)
def test_under_noise_it_neither_leaves_the_bounds_nor_oscillates(name, start):
    curve = CURVES[name]
    best = simulate.best_budget(curve, CONFIG)
    for seed in range(20):
        history = simulate.run(curve, start, 60, noise=0.05, seed=seed)
        budgets = [s.decision.budget for s in history]
        assert all(CONFIG.min_budget <= b <= CONFIG.max_budget for b in budgets)
        settled = history[15:]
        assert all(0.6 * best <= s.decision.budget <= 1.4 * best for s in settled), (seed, budgets)
        actions = [s.decision.action for s in settled]
        assert sum(a != "hold" for a in actions) <= 8, (seed, budgets)
        assert not any({a, b} == {"grow", "shrink"} and {b, c} == {"grow", "shrink"}
                       for a, b, c in zip(actions, actions[1:], actions[2:])), (seed, budgets)
        history = simulate.run(curve, start, 60, noise=0.10, seed=seed)
        met = sum(curve(s.budget) <= CONFIG.slo for s in history[15:])
        assert met >= 0.85 * len(history[15:]), (seed, [s.decision.budget for s in history])


def test_it_follows_a_change_of_load_both_ways():
    def load(budget: int, i: int) -> float:
        return (CURVES["steep"] if 20 <= i < 40 else CURVES["linear"])(budget)

    history = simulate.run(load, 384, 60, time_varying=True)
    budgets = [s.decision.budget for s in history]
    assert budgets[19] == 384  # settled on the light load
    heavy = [load(s.decision.budget, 21) for s in history[21:40]]
    assert all(t <= CONFIG.slo for t in heavy[1:])  # SLO met again after two decisions
    assert budgets[39] == simulate.best_budget(CURVES["steep"], CONFIG)
    # Back where the rules rest on the light load: in the dead band, at most the best budget.
    assert CONFIG.grow_below * CONFIG.slo <= CURVES["linear"](budgets[-1]) <= CONFIG.slo
    assert all(b <= 384 for b in budgets[40:])
