"""The outer loop: a pure function of its state and one window of what the engines served.

The engines hold the SLO inside every iteration: their planner sizes each prefill chunk so that
the predicted iteration time stays within SLO x margin (--tbt-slo-ms, --slo-margin). What a
prediction cannot know (the tail of real iteration times, the gaps a request sees across
preemptions and stalls) is a bias: while the planner limits prefill, P99 TBT ~ bias x margin x
SLO. So, per window with at least min_samples token gaps:

  1. Outside [dead_band, 1] x SLO, the margin moves toward aim x SLO: margin x (aim x SLO / P99)^gain,
     within [min_margin, max_margin].
  2. It loosens only when the planner limited at least 1% of the iterations (the P99's tail):
     otherwise the budget or the traffic set P99, and it says nothing about the planning.
  3. While the decodes alone are predicted over the SLO in infeasible_share of the iterations,
     the margin holds and the deployment is reported infeasible: more replicas are the remedy.

Iteration times do not stand in for missing gaps: an iteration that carries decodes makes at least
one gap, so where gaps are few so are such iterations, and one without decodes makes none and is
sized by the budget alone (a long prompt's chunk may take many times the SLO). A window waits for
its gaps instead (tuner.window_reach).

The margin starts at the aim: before any window there is no evidence of a bias. gain < 1 damps a
window's noise (one P99 of a few hundred gaps varies by 10-20%); the dead band keeps a margin that
lands inside it still. The margin never exceeds 1: the planner already sizes each chunk for its own
P99 error, and a gap is at least its iteration, so an unbiased planning needs no more, and a margin
above 1 would trade the SLO for the planner's caution on one workload, which the next one need not
share (the first benchmark run: loosened to 1.19 on chat, P99 TBT 510 ms against 500 on
summarisation where the planner alone held 439).
"""

import math
from dataclasses import asdict, dataclass, replace

TAIL = 0.01  # the P99's share of the samples


@dataclass(frozen=True)
class LoopConfig:
    slo: float  # target P99 TBT, seconds (spec.slo.tbtP99Ms)
    min_samples: int = 200  # token gaps a window needs before its P99 is acted on
    aim: float = 0.9  # where a correction aims P99, x SLO
    dead_band: float = 0.75  # no correction while P99 is within [dead_band, 1] x SLO
    gain: float = 0.5  # exponent of each correction (1: the whole step the window asks for)
    min_margin: float = 0.3
    max_margin: float = 1.0
    infeasible_share: float = 0.05  # of iterations, to report the SLO infeasible (cleared below half)


@dataclass(frozen=True)
class LoopState:
    """All the loop remembers between windows: saved verbatim in status.autotune.state."""

    # Before any window, P99 TBT ~ bias x margin x SLO with no evidence of a bias: plan for the aim.
    margin: float = LoopConfig.aim
    infeasible: bool = False

    def to_status(self) -> dict:
        return asdict(self)

    @classmethod
    def from_status(cls, saved: dict | None) -> "LoopState":
        return cls(**saved) if saved else cls()


@dataclass(frozen=True)
class Observed:
    """One window, summed over the serving engines."""

    tbt_samples: int
    tbt_p99: float | None  # seconds
    iterations: int  # iterations that carried decodes: the shares below are of them
    limited: int  # iterations whose prefill the planner cut short of the budget
    infeasible: int  # iterations whose decodes alone were predicted over the target


@dataclass(frozen=True)
class Decision:
    action: str  # tighten, loosen or hold
    reason: str
    margin: float
    previous_margin: float
    infeasible: bool
    acted: bool  # the window had enough samples to act on (the next window starts now)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def corrected(margin: float, p99: float, config: LoopConfig) -> float:
    """The margin that moves P99 toward aim x SLO, damped by gain, within the bounds."""
    step = (config.aim * config.slo / p99) ** config.gain
    return round(min(config.max_margin, max(config.min_margin, margin * step)), 4)


def infeasible_now(window: Observed, was: bool, config: LoopConfig) -> bool:
    share = window.infeasible / window.iterations if window.iterations else 0.0
    return share >= (config.infeasible_share / 2 if was else config.infeasible_share)


def step(state: LoopState, window: Observed, config: LoopConfig) -> tuple[Decision, LoopState]:
    margin = state.margin

    def hold(reason: str, acted: bool, infeasible: bool = state.infeasible) -> tuple[Decision, LoopState]:
        return Decision("hold", reason, margin, margin, infeasible, acted), replace(state, infeasible=infeasible)

    p99 = window.tbt_p99
    if p99 is None or window.tbt_samples < config.min_samples:
        return hold(f"too few samples: {window.tbt_samples} token gaps, {config.min_samples} needed", acted=False)
    slo = config.slo
    seen = f"P99 TBT {_ms(p99)} against the SLO {_ms(slo)} at margin {margin:g}"
    infeasible = infeasible_now(window, state.infeasible, config)
    if infeasible:
        return hold(f"{seen}: the decodes alone exceed the SLO in {window.infeasible} of {window.iterations} "
                    f"iterations; more replicas are the remedy", acted=True, infeasible=True)
    if config.dead_band * slo <= p99 <= slo:
        return hold(f"{seen}: within the dead band", acted=True, infeasible=False)
    if p99 < config.dead_band * slo and window.limited < TAIL * window.iterations:
        return hold(f"{seen}: the SLO limited the prefill of {window.limited} of {window.iterations} iterations, "
                    f"too few for P99 to show the planning", acted=True, infeasible=False)
    new = corrected(margin, p99, config)
    if math.isclose(new, margin):
        return hold(f"{seen}: the margin is at its bound", acted=True, infeasible=False)
    action = "tighten" if new < margin else "loosen"
    decision = Decision(action, f"{seen}: aiming at {_ms(config.aim * slo)}", new, margin, False, acted=True)
    return decision, LoopState(margin=new, infeasible=False)
