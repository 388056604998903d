"""Decide: the controller's rules, a pure function of its state and one window.

Rules, in order:

1. Bounds first: a budget outside [min, max] (the spec's bounds changed) moves to the nearest bound.
2. Hold while the window holds fewer than `min_samples` token gaps: a P99 of fewer is noise.
   Unless more than 1% of `min_samples` of them are already over the SLO: then the P99 of any
   `min_samples` gaps that include them is over it too, and rule 3 applies, to the least such a
   P99 can be (not to the few gaps' own P99, which is their largest). That is a bound, not a
   point of the curve: the model does not keep it, and the shrink is proportional to it, the
   least shrink that a line through it with a non-negative intercept allows. Failing that, the
   engines' iteration times stand in for the gaps, on the same terms: a decode waits one
   iteration per token, so they are the gaps any decode among them would have had. Traffic of
   long prompts and short outputs gives few gaps, and none at all until its first prompts are
   through, which must not run at whatever budget the last traffic left meanwhile.
3. Shrink when P99 TBT exceeds the SLO: to the budget the model (model.py) expects to give
   `aim` x SLO, at most to `max_shrink` of it and to half of what TBT proportional to the budget
   would give (rounded up). The SLO comes first, so shrinking needs no further evidence. At the
   minimum budget, hold and say that the SLO cannot be met.
4. Grow when P99 TBT is below `grow_below` x SLO *and* the budget holds prefill work back (at
   least `min_bound_share` of the tokens went through iterations filling more than half of
   it), in `grow_after` windows in a row at this budget: to the budget the model
   expects to give `grow_aim` x SLO from the worst P99 of the last `grow_memory` windows at this
   budget or below, by at least one multiple and at most doubling it. Without
   prefill waiting, a larger budget changes nothing but the risk. A grow aims lower than a
   shrink: it acts on calm windows that may have been luck (a chat window's P99 varies by 2x at
   one budget), and landing mid-band leaves a fifth of the SLO for that before it breaks.
5. Otherwise hold: between `grow_below` and 1 x SLO is the dead band the controller rests in.

Against oscillation: growing slowly to decide and shrinking at once; the dead band (both aims
sit inside it, so a step that lands where the model said is followed by a hold); the step limits;
rounding down to a multiple of `multiple` tokens (and a change of less than one multiple is a
hold); and the ceiling: a budget seen above the SLO is not grown back to for `memory_seconds`,
unless the SLO has since been relaxed past what was seen there. Observations older than
`memory_seconds` are forgotten too: the load changes, and with it TBT as a function of the
budget.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

from .aggregate import Histogram, Window
from .model import Point, budget_for, on_the_curve

MAX_POINTS = 5
AT_MINIMUM = "at the minimum budget"  # ends the reason of a hold that cannot meet the SLO

Estimator = Callable[[float, Point, list[Point]], float]


@dataclass(frozen=True)
class Config:
    slo: float  # target P99 TBT, seconds
    min_budget: int
    max_budget: int
    multiple: int = 32
    aim: float = 0.9  # of the SLO, where a shrink aims
    grow_aim: float = 0.8
    grow_below: float = 0.7
    min_samples: int = 100
    min_bound_share: float = 0.05
    max_grow: float = 2.0
    max_shrink: float = 0.25
    grow_after: int = 2
    grow_memory: int = 6  # windows whose P99 bounds a grow from below
    memory_seconds: float = 300.0


@dataclass(frozen=True)
class State:
    budget: int  # the target every engine should run
    points: tuple[Point, ...] = ()  # recent observations at budgets that held prefill back
    ceiling: Point | None = None  # the lowest budget recently seen above the SLO
    calm: tuple[float, ...] = ()  # P99s of the consecutive windows at this budget that would let it grow
    recent: tuple[Point, ...] = ()  # the last grow_memory windows' P99s, on any curve


@dataclass(frozen=True)
class Decision:
    budget: int
    action: str  # grow, shrink or hold
    reason: str


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def round_down(budget: float, config: Config) -> int:
    """A multiple of config.multiple at or below budget, inside the bounds (the bounds win)."""
    multiple = int(budget // config.multiple) * config.multiple
    return max(config.min_budget, min(config.max_budget, multiple))


def certainly_over(gaps: Histogram, config: Config) -> bool:
    """The P99 of any `min_samples` gaps that include these is over the SLO."""
    return gaps.count_above(config.slo) > 0.01 * config.min_samples


def least_p99(few: Histogram, config: Config) -> float | None:
    """The least P99 that any `min_samples` samples including these few can have: the value with
    1% of `min_samples` of them above it. Their own P99 is their largest, one transient
    iteration of a traffic switch, which would set the size of a shrink."""
    return few.quantile(1 - 0.01 * config.min_samples / few.count)


class Evidence(NamedTuple):
    p99: float  # to act on
    of: str  # TBT or iteration time
    bound: bool  # the least P99 of too few samples (least_p99), not a point of the curve


def evidence(window: Window, config: Config) -> Evidence | None:
    """The P99 to act on, or None while there is too little to act on."""
    if window.tbt_p99 is not None and window.tbt_samples >= config.min_samples:
        return Evidence(window.tbt_p99, "TBT", bound=False)
    if window.tbt_p99 is not None and certainly_over(window.tbt, config):
        return Evidence(least_p99(window.tbt, config), "TBT", bound=True)
    if window.iterations.count >= config.min_samples:
        return Evidence(window.iteration_p99, "iteration time", bound=False)
    if certainly_over(window.iterations, config):
        return Evidence(least_p99(window.iterations, config), "iteration time", bound=True)
    return None


def forget(state: State, config: Config, now: float) -> State:
    horizon = now - config.memory_seconds
    ceiling = state.ceiling if state.ceiling and state.ceiling.time >= horizon else None
    return replace(state, points=tuple(p for p in state.points if p.time >= horizon), ceiling=ceiling,
                   recent=tuple(p for p in state.recent if p.time >= horizon))


def decide(state: State, window: Window, config: Config, now: float,
           estimate: Estimator = budget_for) -> tuple[Decision, State]:
    state = forget(state, config, now)
    budget = state.budget
    if not config.min_budget <= budget <= config.max_budget:
        bounded = max(config.min_budget, min(config.max_budget, budget))
        action = "grow" if bounded > budget else "shrink"
        return (Decision(bounded, action, f"outside the bounds [{config.min_budget}, {config.max_budget}]"),
                replace(state, budget=bounded, points=(), calm=()))
    found = evidence(window, config)
    if found is None:
        return Decision(budget, "hold", f"too few samples: {window.tbt_samples} token gaps "
                                        f"in {window.seconds:.0f} s, {config.min_samples} needed"), state

    (p99, what, bound), slo = found, config.slo
    seen = f"P99 {what} {_ms(p99)} at budget {budget}"
    latest = Point(budget, p99, now)
    state = replace(state, recent=(*state.recent, latest)[-config.grow_memory:])
    pressed = (window.budget_bound_share or 0.0) >= config.min_bound_share
    if pressed and not bound:
        state = replace(state, points=tuple(on_the_curve(latest, list(state.points)))[-MAX_POINTS:])
    target = config.aim * slo

    if p99 > slo:
        if state.ceiling is None or budget <= state.ceiling.budget:
            state = replace(state, ceiling=latest)
        if budget <= config.min_budget:
            return Decision(budget, "hold", f"{seen} exceeds the SLO {_ms(slo)} {AT_MINIMUM}"), state
        estimated = estimate(target, latest, [] if bound else list(state.points))
        # Half of what TBT proportional to the budget would give: a window barely over the SLO
        # next to a slope that noise made nearly flat must not send the budget to the floor.
        lowest = max(budget * config.max_shrink, budget * target / p99 / 2)
        new, up = round_down(max(estimated, lowest), config), math.ceil(lowest / config.multiple) * config.multiple
        if new < lowest and up < budget:  # rounded up, while that is still a shrink
            new = up
        return (Decision(new, "shrink", f"{seen} exceeds the SLO {_ms(slo)}; aiming at {_ms(target)}"),
                replace(state, budget=new, calm=()))

    if p99 >= config.grow_below * slo:
        return Decision(budget, "hold", f"{seen} is within the SLO {_ms(slo)}"), replace(state, calm=())
    if not pressed:
        return Decision(budget, "hold", f"{seen} is well within the SLO {_ms(slo)}, but the budget "
                                        f"holds no prefill back"), replace(state, calm=())
    if budget >= config.max_budget:
        return Decision(budget, "hold", f"{seen} is well within the SLO {_ms(slo)} at the maximum budget"), state
    state = replace(state, calm=(*state.calm, p99))
    if len(state.calm) < config.grow_after:
        return Decision(budget, "hold", f"{seen} is well within the SLO {_ms(slo)} and prefill is waiting; "
                                        f"growing after {config.grow_after} such windows in a row"), state
    return _grow(state, config, now, estimate, seen)


def _grow(state: State, config: Config, now: float, estimate: Estimator, seen: str) -> tuple[Decision, State]:
    budget, slo, target = state.budget, config.slo, config.grow_aim * config.slo
    limit, note = budget * config.max_grow, ""
    ceiling = state.ceiling
    if ceiling and ceiling.tbt > slo:
        limit = min(limit, ceiling.budget - config.multiple)
        note = f" (budget {ceiling.budget} gave P99 TBT {_ms(ceiling.tbt)} recently)"
    # From the worst P99 of the recent windows at this budget or below, on whatever curve: TBT
    # does not fall as the budget grows, so each is at least what this budget gives under the
    # traffic it saw, and a few calm windows after a burst do not set the step. At least one
    # multiple: a step the model puts below that is still worth a try while P99 is this far
    # below the SLO, and the ceiling stops a repeat if it fails.
    anchor = Point(budget, max([*state.calm, *(p.tbt for p in state.recent if p.budget <= budget)]), now)
    new = round_down(min(max(estimate(target, anchor, list(state.points)), budget + config.multiple), limit), config)
    if new <= budget:
        return Decision(budget, "hold", f"{seen} is well within the SLO {_ms(slo)}, but no larger budget is "
                                        f"expected to stay within {_ms(target)}{note}"), state
    return (Decision(new, "grow", f"{seen} is well within the SLO {_ms(slo)} and prefill is waiting; "
                                  f"aiming at {_ms(target)}{note}"),
            replace(state, budget=new, calm=()))
