"""Model: P99 TBT as a function of the token budget, estimated from recent observations.

When prefill work is held back by the budget, most iterations carry a full budget of tokens,
and an iteration's time grows about linearly with its tokens (the weights are read once per
iteration, every token costs its own matmul rows): P99 TBT ~ a + b x budget, at least near
the budget in force. The slope comes from a least-squares fit over recent observations at
clearly different budgets near the latest one (curves bend: far points give a secant, not the
local slope); the line is anchored at the latest observation, which says most about the load
of the moment. Without
a usable slope (one budget seen so far, or a fit that noise made flat or falling), TBT is taken
as proportional to the budget: that overstates the slope when a > 0, so a step that grows the
budget falls short of the target rather than past it, and a step that shrinks it may need a
second step.
"""

from dataclasses import dataclass

# A fit over budgets closer together than this says more about noise than about slope.
MIN_SPAN = 1.25
# Observations further than this factor from the latest budget are left out of the fit.
NEAR = 2.0


@dataclass(frozen=True)
class Point:
    budget: int
    tbt: float  # P99 TBT observed at that budget, seconds
    time: float  # when the window ended, seconds since the epoch


def fitted_slope(points: list[Point]) -> float | None:
    """Least-squares seconds per budget token, or None without a usable fit."""
    budgets = [p.budget for p in points]
    if len(points) < 2 or max(budgets) < MIN_SPAN * min(budgets):
        return None
    mean_b = sum(budgets) / len(points)
    mean_t = sum(p.tbt for p in points) / len(points)
    var = sum((p.budget - mean_b) ** 2 for p in points)
    slope = sum((p.budget - mean_b) * (p.tbt - mean_t) for p in points) / var
    return slope if slope > 0 else None


def budget_for(target: float, latest: Point, points: list[Point]) -> float:
    """The budget at which P99 TBT is estimated to reach target seconds."""
    near = [p for p in points if latest.budget / NEAR <= p.budget <= latest.budget * NEAR]
    slope = fitted_slope(near) or latest.tbt / latest.budget
    return latest.budget + (target - latest.tbt) / slope
