"""Simulate: the controller (decide.py) against synthetic P99 TBT(budget) curves, with noise,
for the convergence tests and for the comparison of the model-based step with blind stepping
(fixed steps, the same rules otherwise) shown in docs/autotune.md.

    python -m sarathi_operator.autotune.simulate     # prints the tables of docs/autotune.md
"""

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from .aggregate import Window
from .decide import Config, Decision, Estimator, State, decide
from .model import Point, budget_for

Curve = Callable[[int], float]

SLO = 0.1
CONFIG = Config(slo=SLO, min_budget=32, max_budget=8192)
INTERVAL = 30.0

# P99 TBT in seconds against the budget, shaped like what engines show: linear on a CPU (every
# token costs compute); flat, then linear on a GPU (memory-bound below the knee); convex when
# attention over long contexts dominates; steep for a large model on a small device.
CURVES: dict[str, Curve] = {
    "linear": lambda b: 0.010 + 0.0002 * b,
    "knee": lambda b: max(0.025, 0.005 + 0.00004 * b),
    "convex": lambda b: 0.015 + 0.00004 * b + 2e-8 * b * b,
    "steep": lambda b: 0.030 + 0.0006 * b,
}


def blind(factor: float) -> Estimator:
    """Steps by a fixed factor in the direction of the target, whatever the distance to it."""
    def step(target: float, latest: Point, points: list[Point]) -> float:
        return latest.budget * (factor if target > latest.tbt else 1 / factor)
    return step


STEPPERS: dict[str, Estimator] = {"model": budget_for, "blind x1.25": blind(1.25), "blind x1.5": blind(1.5)}


def best_budget(curve: Curve, config: Config) -> int:
    """The largest multiple within the bounds whose TBT is within aim x SLO (else the minimum)."""
    fits = [b for b in range(config.min_budget, config.max_budget + 1, config.multiple)
            if curve(b) <= config.aim * config.slo]
    return max(fits, default=config.min_budget)


def acceptable(curve: Curve, config: Config, budget: int) -> bool:
    """Where the rules rest: meets the SLO, and either no more than one multiple below the best
    budget or already in the dead band (TBT at least grow_below x SLO)."""
    tbt = curve(budget)
    if tbt > config.slo:
        return budget == config.min_budget
    return budget >= best_budget(curve, config) - config.multiple or tbt >= config.grow_below * config.slo


@dataclass(frozen=True)
class Step:
    budget: int  # in force during the window
    p99: float  # observed, noise included
    decision: Decision


def run(curve: Curve | Callable[[int, int], float], start: int, steps: int, config: Config = CONFIG,
        noise: float = 0.0, seed: int = 0, estimate: Estimator = budget_for,
        time_varying: bool = False) -> list[Step]:
    """One window per step at the budget in force; noise is the log-normal sigma on each P99.
    A time_varying curve takes (budget, step)."""
    rng = random.Random(seed)
    state, history = State(start), []
    for i in range(steps):
        now = i * INTERVAL
        truth = curve(state.budget, i) if time_varying else curve(state.budget)
        p99 = truth * math.exp(rng.gauss(0, noise)) if noise else truth
        window = Window(seconds=INTERVAL, engines=1, tbt_samples=1000, tbt_p99=p99, ttft_p99=None,
                        request_rate=1.0, budget_bound_share=0.5)
        decision, new_state = decide(state, window, config, now, estimate)
        history.append(Step(state.budget, p99, decision))
        state = new_state
    return history


def steps_to_converge(curve: Curve, history: list[Step], config: Config = CONFIG) -> int | None:
    """Decisions until the budget is acceptable and stays so; None if it never settles."""
    budgets = [s.decision.budget for s in history]
    for i in range(len(budgets)):
        if all(acceptable(curve, config, b) for b in budgets[i:]):
            return i + 1
    return None


def steps_to_meet_slo(curve: Curve, history: list[Step], config: Config = CONFIG) -> int | None:
    """Decisions until every later budget meets the SLO; None if it never does."""
    budgets = [s.decision.budget for s in history]
    for i in range(len(budgets)):
        if all(curve(b) <= config.slo or b == config.min_budget for b in budgets[i:]):
            return i + 1
    return None


def comparison(starts: tuple[int, ...] = (64, 4096), steps: int = 60) -> list[dict]:
    """Per curve, start and stepper: decisions until the SLO is met for good (from above) and
    until the budget settles where the rules rest."""
    rows = []
    for name, curve in CURVES.items():
        for start in starts:
            row = {"curve": name, "start": start, "best": best_budget(curve, CONFIG)}
            for stepper, estimate in STEPPERS.items():
                history = run(curve, start, steps, estimate=estimate)
                row[stepper] = (steps_to_meet_slo(curve, history), steps_to_converge(curve, history))
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(value) -> str:
        if isinstance(value, tuple):
            return " / ".join("never" if v is None else str(v) for v in value)
        return str(value)

    head = ["curve", "start", "best", *STEPPERS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(row[k]) for k in head) + " |" for row in rows]
    return "\n".join(lines)


def robustness(noises: tuple[float, ...] = (0.05, 0.1, 0.2), seeds: int = 20, steps: int = 60,
               settle: int = 15) -> list[dict]:
    """Per noise level, over every curve, both starts and `seeds` runs, after `settle` decisions:
    changes of the budget per run (mean, most), intervals whose budget meets the SLO, and the
    budgets relative to the best (mean, range)."""
    rows = []
    for noise in noises:
        changes, met, ratios = [], [], []
        for curve in CURVES.values():
            best = best_budget(curve, CONFIG)
            for start in (64, 4096):
                for seed in range(seeds):
                    late = run(curve, start, steps, noise=noise, seed=seed)[settle:]
                    changes.append(sum(s.decision.action != "hold" for s in late))
                    met += [curve(s.budget) <= CONFIG.slo for s in late]
                    ratios += [s.budget / best for s in late]
        rows.append({"noise": noise, "changes_mean": sum(changes) / len(changes), "changes_max": max(changes),
                     "slo_met": sum(met) / len(met), "ratio_mean": sum(ratios) / len(ratios),
                     "range": (min(ratios), max(ratios))})
    return rows


def robustness_table(rows: list[dict], steps: int = 45) -> str:
    lines = [f"| P99 noise (sigma) | budget changes in {steps} intervals (mean / most) | intervals meeting the SLO "
             f"| budget / best budget (mean, range) |", "|---|---|---|---|"]
    lines += [f"| {r['noise']:.0%} | {r['changes_mean']:.1f} / {r['changes_max']} | {r['slo_met']:.1%} | "
              f"{r['ratio_mean']:.2f}, {r['range'][0]:.2f} .. {r['range'][1]:.2f} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(comparison()))
    print()
    print(robustness_table(robustness()))
