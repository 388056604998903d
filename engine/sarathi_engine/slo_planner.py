"""Per-iteration SLO planning: predict an iteration's time from its batch's shape, before running
it, and size the prefill chunks so that the prediction stays within the TBT target.

A running decode waits one iteration for each of its tokens, so its time between tokens is the
iteration time. On a CPU that time is close to linear in the batch's shape:

    t = c0 + c1 [any prefill] + c2 tokens + c3 prefill attention + c4 decode context + c5 sequences

where prefill attention counts the query-key pairs the chunks attend (a chunk of q tokens after
k cached ones: q (k + (q + 1) / 2)) and decode context the KV rows the decodes read. [any prefill]
gives mixed iterations an intercept of their own (pure-decode and mixed iterations behave like
two machines, Dynamo's DeepInfra fork measured). The coefficients are fitted online by recursive
least squares with forgetting from every iteration's measured time, and predict with their
non-negative part; samples far off the fit (a page fault, another process on the core) are kept
out of it.

The planner adds prefill tokens while the prediction, times the fit's recent error quantile (the
P99 of actual/predicted over the token gaps of the iterations whose prefill it cut), stays within
slo x margin (the config's slo_margin, which the operator's outer loop moves). It never plans
past 1.25 x the largest prefill it has seen (no extrapolation); a minimum chunk keeps prefills
moving when even the decodes alone are predicted over the target, and such iterations are counted
as infeasible; iterations whose prefill the target cut short are counted as limited. An
iteration without decodes makes no token gap, so the budget alone sizes its prefill.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    from sarathi_engine.config import SchedulerConfig
    from sarathi_engine.scheduler.base import ScheduledChunk

FEATURES = ("constant", "any_prefill", "tokens", "prefill_attention", "decode_context", "sequences")
# Each feature divided by a typical size, so that one prior fits all and RLS stays well conditioned.
SCALES = np.array([1.0, 1.0, 512.0, 512.0 * 1024, 32.0 * 1024, 32.0])


@dataclass(frozen=True)
class BatchShape:
    prefill_tokens: int = 0
    prefill_attention: float = 0.0
    prefills: int = 0
    decodes: int = 0
    decode_context: int = 0

    def with_chunk(self, tokens: int, cached: int) -> BatchShape:
        """This batch and a prefill chunk of `tokens` after `cached` tokens of its sequence."""
        return replace(self, prefill_tokens=self.prefill_tokens + tokens, prefills=self.prefills + 1,
                       prefill_attention=self.prefill_attention + tokens * (cached + (tokens + 1) / 2))

    def with_decode(self, context: int) -> BatchShape:
        return replace(self, decodes=self.decodes + 1, decode_context=self.decode_context + context)

    def features(self) -> np.ndarray:
        raw = np.array([1.0, float(self.prefill_tokens > 0), self.prefill_tokens + self.decodes,
                        self.prefill_attention, self.decode_context, self.prefills + self.decodes])
        return raw / SCALES


@dataclass
class CostModel:
    """Iteration seconds as a non-negative linear function of BatchShape.features(), by recursive
    least squares with exponential forgetting."""

    forgetting: float = 0.998
    prior_variance: float = 1e4  # of each scaled coefficient: the data decide from the first samples
    outlier_mads: float = 6.0
    warmup: int = 12  # samples before the fit's errors are recorded and outliers judged
    window: int = 1000  # recent actual/predicted ratios, for the error quantile and the outliers
    refresh_every: int = 10  # samples between recomputations of the quantiles, once 50 are in
    theta: np.ndarray = field(default_factory=lambda: np.zeros(len(FEATURES)))
    covariance: np.ndarray = field(default_factory=lambda: np.eye(len(FEATURES)))
    samples: int = 0
    largest_prefill: int = 0

    def __post_init__(self) -> None:
        self.covariance = self.covariance * self.prior_variance
        self.ratios: deque[float] = deque(maxlen=self.window)  # every iteration's, to judge outliers
        # (ratio, decodes) of the iterations whose prefill the planner cut: the error quantile's.
        self.planned: deque[tuple[float, int]] = deque(maxlen=self.window)
        self.ratio_median, self.ratio_mad, self.error = 1.0, 0.0, 1.0

    def predict(self, shape: BatchShape) -> float:
        # Clipped at zero: a negative coefficient (noise's doing) would make a bigger chunk look
        # cheaper. The fit itself stays unconstrained; projecting it every step kept it far off.
        return float(np.maximum(self.theta, 0.0) @ shape.features())

    def observe(self, shape: BatchShape, seconds: float, cut: bool = False) -> bool:
        """Take one measured iteration; False when it was kept out of the fit as an outlier. cut:
        the planner cut its prefill to fit the target."""
        predicted = self.predict(shape)
        warm = self.samples >= self.warmup
        outlier = warm and self.is_outlier(seconds, predicted)
        if warm and predicted > 0:
            self.ratios.append(seconds / predicted)
            if cut and shape.decodes:
                self.planned.append((seconds / predicted, shape.decodes))
            if len(self.ratios) < 50 or self.samples % self.refresh_every == 0:  # the quantiles move slowly
                self.refresh_ratio_stats()
        if outlier:
            return False
        x = shape.features()
        px = self.covariance @ x
        gain = px / (self.forgetting + x @ px)
        self.theta = self.theta + gain * (seconds - x @ self.theta)
        self.covariance = (self.covariance - np.outer(gain, px)) / self.forgetting
        # Forgetting inflates the covariance along shapes that stop occurring (hours of decodes
        # without a prefill) without bound; cap it at the prior's size.
        trace, cap = np.trace(self.covariance), self.prior_variance * len(FEATURES)
        if trace > cap:
            self.covariance *= cap / trace
        self.samples += 1
        self.largest_prefill = max(self.largest_prefill, shape.prefill_tokens)
        return True

    def refresh_ratio_stats(self) -> None:
        ratios = np.fromiter(self.ratios, float)
        self.ratio_median = float(np.median(ratios))
        self.ratio_mad = float(np.median(np.abs(ratios - self.ratio_median)))
        if self.planned:
            self.error = max(1.0, gap_quantile(self.planned, 0.99))

    def is_outlier(self, seconds: float, predicted: float) -> bool:
        if predicted <= 0 or len(self.ratios) < 10:
            return False
        mad = max(self.ratio_mad, 0.01 * self.ratio_median)
        return abs(seconds / predicted - self.ratio_median) > self.outlier_mads * mad

    def coefficients(self) -> dict[str, float]:
        """Seconds per unit of each raw feature, as predict() uses them."""
        return dict(zip(FEATURES, (np.maximum(self.theta, 0.0) / SCALES).tolist()))


@dataclass
class SloPlanner:
    """How many prefill tokens the next iteration may carry under the TBT target. The SLO and the
    minimum chunk live in the scheduler's config, which may change them between iterations."""

    config: SchedulerConfig
    model: CostModel = field(default_factory=CostModel)
    min_samples: int = 16  # before this many iterations, plan by the token budget alone
    infeasible: int = 0  # iterations whose decodes alone were predicted over the target
    limited: int = 0  # iterations whose prefill the target cut short of what the budget allowed
    cut: bool = False  # the target cut this iteration's prefill (it is counted in limited)

    @property
    def target(self) -> float | None:
        """Seconds an iteration may take, None when no SLO is set."""
        slo = self.config.tbt_slo_ms
        return None if slo is None else slo / 1e3 * self.config.slo_margin

    @property
    def active(self) -> bool:
        return (self.config.tbt_slo_ms is not None and self.model.samples >= self.min_samples
                and self.model.largest_prefill > 0)

    def fits(self, shape: BatchShape) -> bool:
        return self.model.predict(shape) * self.model.error <= self.target

    def chunk(self, shape: BatchShape, cached: int, wanted: int) -> int:
        """The largest chunk of up to `wanted` tokens, after `cached` tokens of its sequence, that
        the batch so far (`shape`) can take within the target. The first chunk of an iteration
        gets at least the minimum chunk, so prefills move even when the decodes alone miss it."""
        if not self.active or not shape.decodes:  # no decode, no token gap to keep within the SLO
            return wanted
        min_chunk, allowed = self.config.min_prefill_chunk, wanted
        # Never past 1.25 x the largest prefill the fit has seen: no extrapolation.
        wanted = min(wanted, max(min_chunk, int(1.25 * self.model.largest_prefill) - shape.prefill_tokens))
        low, high = 0, wanted  # the prediction grows with the chunk: the largest that fits
        while low < high:
            mid = (low + high + 1) // 2
            if self.fits(shape.with_chunk(mid, cached)):
                low = mid
            else:
                high = mid - 1
        if shape.prefills == 0:
            low = max(low, min(min_chunk, wanted))
        if low < allowed and not self.cut:
            self.limited, self.cut = self.limited + 1, True
        return low

    def account(self, decodes: BatchShape) -> None:
        """While active, at the start of each iteration's planning: count the iteration infeasible
        when its decodes alone are predicted over the target."""
        self.cut = False
        if decodes.decodes and not self.fits(decodes):
            self.infeasible += 1


def gap_quantile(planned: Iterable[tuple[float, int]], q: float) -> float:
    """The q-quantile of actual/predicted time over the token gaps of the planned iterations.

    P99 TBT is a quantile over token gaps, and an iteration makes one gap for each of its decodes,
    so each iteration's ratio counts as many times as it had decodes. Only iterations whose
    prefill the planner cut count: they run at the target, so their ratio is how far past it the
    planning goes. The others ran short of it by construction, and the relative noise of short
    iterations is larger (in the two-phase benchmark's load, pure decodes at P99 1.2-1.7 and chat's
    mostly uncut mixed iterations at 1.6-1.8, against 1.2-1.3 for those cut at the target): counting
    it shrank every planned chunk without bringing the TBT tail closer to the target."""
    ratios, weights = np.array(list(planned), dtype=float).T
    order = np.argsort(ratios)
    cumulative = np.cumsum(weights[order])
    return float(ratios[order][np.searchsorted(cumulative, q * cumulative[-1])])


def shape_of(chunks: list[ScheduledChunk]) -> BatchShape:
    """The shape of a scheduled batch, read before it runs (while each sequence's computed tokens
    are those its chunk starts after)."""
    prefill_tokens = prefills = decodes = decode_context = 0
    prefill_attention = 0.0
    for c in chunks:
        cached = c.seq.num_computed_tokens
        if c.seq.is_decoding:
            decodes += 1
            decode_context += cached + 1
        else:
            prefills += 1
            prefill_tokens += c.num_tokens
            prefill_attention += c.num_tokens * (cached + (c.num_tokens + 1) / 2)
    return BatchShape(prefill_tokens, prefill_attention, prefills, decodes, decode_context)
