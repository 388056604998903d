"""Model: P99 TBT as a function of the token budget, estimated from recent observations.

When prefill work is held back by the budget, most iterations carry a full budget of tokens,
and an iteration's time grows about linearly with its tokens (the weights are read once per
iteration, every token costs its own matmul rows): P99 TBT ~ a + b x budget, at least near
the budget in force. The slope comes from a least-squares fit over recent observations at
clearly different budgets near the latest one (curves bend: far points give a secant, not the
local slope); the line is anchored at the latest observation, which says most about the load
of the moment, and a latest observation far off what the others predict means the traffic
changed, and the curve with it: the others are dropped. Without a usable slope (one budget
seen so far, or a fit that noise made falling or nearly flat), TBT is taken as proportional to
the budget: that overstates the slope when a > 0, so a step that grows the budget falls short of
the target rather than past it, and a step that shrinks it may need a second step.
"""

from dataclasses import dataclass

# A fit over budgets closer together than this says more about noise than about slope.
MIN_SPAN = 1.25
# Observations further than this factor from the latest budget are left out of the fit.
NEAR = 2.0
# A latest observation further than this factor from what the others predict at its budget
# comes from another curve. Wide, because a P99 of a few hundred gaps is noisy.
MOVED = 2.0
# A fitted slope under this share of the proportional one says the budget hardly sets TBT, which
# is more often two noisy windows than the curve: the engine's curves here give 0.4-0.9, and two
# windows with the same P99 at 256 and 160 (1412 and 1411 ms) sent a shrink to the floor.
MIN_SLOPE_SHARE = 0.25


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


def near(latest: Point, points: list[Point]) -> list[Point]:
    """The points within a factor NEAR of latest's budget, in their order."""
    return [p for p in points if latest.budget / NEAR <= p.budget <= latest.budget * NEAR]


def moved(latest: Point, earlier: list[Point]) -> bool:
    """latest is more than MOVED times off what the most recent earlier observation near its
    budget predicts (proportionally)."""
    close = near(latest, earlier)
    if not close:
        return False
    ratio = latest.tbt / (close[-1].tbt * latest.budget / close[-1].budget)
    return not 1 / MOVED <= ratio <= MOVED


def on_the_curve(latest: Point, earlier: list[Point]) -> list[Point]:
    """The observations that describe TBT(budget) now, oldest first, latest last."""
    return [latest] if moved(latest, earlier) else [*earlier, latest]


def budget_for(target: float, latest: Point, points: list[Point]) -> float:
    """The budget at which P99 TBT is estimated to reach target seconds."""
    if moved(latest, [p for p in points if p != latest]):
        points = [latest]
    proportional = latest.tbt / latest.budget
    slope = fitted_slope(near(latest, points))
    if slope is None or slope < MIN_SLOPE_SHARE * proportional:
        slope = proportional
    return latest.budget + (target - latest.tbt) / slope
