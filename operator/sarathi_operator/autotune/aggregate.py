"""Aggregate: from the engines' /metrics text to one window of what they served.

An engine's counters only grow, until its process restarts and they start again from zero. So
a window is the sum, per engine, of the increases between consecutive scrapes inside it, where
a counter that went down counts its whole new value (Prometheus' `increase()` rule), and the
increases of all engines are added bucket by bucket: the P99 of the sum is the P99 of every
token gap any engine produced in the window.
"""

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

TBT = "sarathi_time_between_tokens_seconds"
TTFT = "sarathi_time_to_first_token_seconds"
ITERATION_TOKENS = "sarathi_iteration_tokens"
ITERATION_SECONDS = "sarathi_iteration_seconds"
REQUESTS = "sarathi_requests"
TOKEN_BUDGET = "sarathi_token_budget"


@dataclass(frozen=True)
class Histogram:
    bounds: tuple[float, ...] = ()  # bucket upper bounds, ascending, the last one +Inf
    counts: tuple[float, ...] = ()  # cumulative counts per bound

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def __add__(self, other: "Histogram") -> "Histogram":
        if not self.counts:
            return other
        if not other.counts:
            return self
        _check_same_bounds(self, other)
        return Histogram(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts)))

    def __sub__(self, other: "Histogram") -> "Histogram":
        if not other.counts:
            return self
        _check_same_bounds(self, other)
        return Histogram(self.bounds, tuple(a - b for a, b in zip(self.counts, other.counts)))

    def share_above(self, x: float) -> float | None:
        """The share of the observations' total (each counted at its bucket's middle) held by
        observations above x, interpolated inside the bucket holding x."""
        total = above = below = lower = 0.0
        for bound, cumulative in zip(self.bounds, self.counts):
            upper = lower if math.isinf(bound) else bound
            mass = (cumulative - below) * (lower + upper) / 2
            total += mass
            if lower >= x:
                above += mass
            elif upper > x:
                above += mass * (upper - x) / (upper - lower)
            below, lower = cumulative, bound
        return above / total if total else None

    def count_above(self, x: float) -> float:
        """Observations certainly above x: those in the buckets wholly above it."""
        for bound, cumulative in zip(self.bounds, self.counts):
            if bound >= x:
                return self.count - cumulative
        return 0.0

    def quantile(self, q: float) -> float | None:
        """As Prometheus' histogram_quantile: linear inside the bucket that holds the rank; the
        highest finite bound when the rank falls in the +Inf bucket."""
        if self.count <= 0:
            return None
        rank = q * self.count
        below, lower = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.counts):
            if cumulative >= rank and cumulative > below:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            below, lower = cumulative, bound
        return lower


def _check_same_bounds(a: Histogram, b: Histogram) -> None:
    if a.bounds != b.bounds:
        raise ValueError("histograms with different buckets cannot be combined")


@dataclass(frozen=True)
class Snapshot:
    """The counters of one engine at one scrape (or their increase over a span)."""

    tbt: Histogram = Histogram()
    ttft: Histogram = Histogram()
    iteration_tokens: Histogram = Histogram()
    iteration_seconds: Histogram = Histogram()
    requests: float = 0.0  # finished requests, any finish reason
    token_budget: int | None = None  # gauge: the budget in force at the scrape

    def __add__(self, other: "Snapshot") -> "Snapshot":
        return Snapshot(self.tbt + other.tbt, self.ttft + other.ttft, self.iteration_tokens + other.iteration_tokens,
                        self.iteration_seconds + other.iteration_seconds, self.requests + other.requests)

    def __sub__(self, other: "Snapshot") -> "Snapshot":
        return Snapshot(self.tbt - other.tbt, self.ttft - other.ttft, self.iteration_tokens - other.iteration_tokens,
                        self.iteration_seconds - other.iteration_seconds, self.requests - other.requests)


def parse(text: str) -> Snapshot:
    """The counters the tuner reads from one engine's /metrics text, summed over label sets."""
    buckets: dict[str, dict[float, float]] = {TBT: {}, TTFT: {}, ITERATION_TOKENS: {}, ITERATION_SECONDS: {}}
    requests, budget = 0.0, None
    for family in text_string_to_metric_families(text):
        if family.name in buckets:
            for s in family.samples:
                if s.name == family.name + "_bucket":
                    le = float(s.labels["le"])
                    buckets[family.name][le] = buckets[family.name].get(le, 0.0) + s.value
        elif family.name == REQUESTS:
            requests += sum(s.value for s in family.samples if s.name == REQUESTS + "_total")
        elif family.name == TOKEN_BUDGET:
            budget = int(family.samples[0].value) if family.samples else None
    tbt, ttft, tokens, seconds = (Histogram(tuple(sorted(b)), tuple(b[k] for k in sorted(b))) for b in buckets.values())
    return Snapshot(tbt, ttft, tokens, seconds, requests, budget)


def _went_down(old: Snapshot, new: Snapshot) -> bool:
    return (new.requests < old.requests or new.tbt.count < old.tbt.count or new.ttft.count < old.ttft.count
            or new.iteration_tokens.count < old.iteration_tokens.count
            or new.iteration_seconds.count < old.iteration_seconds.count)


def increase(old: Snapshot, new: Snapshot) -> Snapshot:
    """What one engine served between two scrapes; after a restart, all it served since."""
    since = Snapshot() if _went_down(old, new) else old
    return new - since


class Scrapes:
    """Recent scrapes per engine, kept for keep_seconds; sums increases over any recent span."""

    def __init__(self, keep_seconds: float):
        self.keep_seconds = keep_seconds
        self._series: dict[str, list[tuple[float, Snapshot]]] = {}

    def add(self, t: float, snapshots: dict[str, Snapshot]) -> None:
        """One tick's scrapes by engine key; engines absent from it keep their older scrapes
        (a missed scrape costs no data), engines absent for keep_seconds are forgotten."""
        for key, snapshot in snapshots.items():
            self._series.setdefault(key, []).append((t, snapshot))
        for key in list(self._series):
            kept = [(ts, s) for ts, s in self._series[key] if ts >= t - self.keep_seconds]
            if kept:
                self._series[key] = kept
            else:
                del self._series[key]

    def increase_since(self, since: float) -> tuple[Snapshot, float, int]:
        """(summed increase, seconds, engines) over the scrapes taken at or after since: each
        engine counts from its first scrape in the span, so one scraped only once adds nothing."""
        total, first, last, engines = Snapshot(), math.inf, -math.inf, 0
        for series in self._series.values():
            inside = [(t, s) for t, s in series if t >= since]
            if len(inside) < 2:
                continue
            engines += 1
            first, last = min(first, inside[0][0]), max(last, inside[-1][0])
            for (_, old), (_, new) in zip(inside, inside[1:]):
                total = total + increase(old, new)
        return total, (last - first if engines else 0.0), engines


@dataclass(frozen=True)
class Window:
    seconds: float
    engines: int  # engines that contributed
    tbt_samples: int
    tbt_p99: float | None
    ttft_p99: float | None
    request_rate: float  # finished requests per second
    budget_bound_share: float | None  # share of tokens in iterations holding more than half the budget
    tbt: Histogram = Histogram()  # the token gaps themselves
    iterations: Histogram = Histogram()  # the engines' iteration times: the gaps a decode would have seen

    @property
    def iteration_p99(self) -> float | None:
        return self.iterations.quantile(0.99)


def summarize(total: Snapshot, seconds: float, engines: int, budget: int) -> Window:
    """Half the budget separates iterations the budget shaped from the rest: a chunked
    prefill fills the budget to the token, while decodes and the tail of a prompt leave it
    mostly empty. Tokens, not iterations, are weighed (an engine's time goes with its tokens):
    under light load, a few full iterations among many small decode steps still mean that
    every prompt was cut into chunks by the budget."""
    return Window(
        seconds=seconds,
        engines=engines,
        tbt_samples=int(total.tbt.count),
        tbt_p99=total.tbt.quantile(0.99),
        ttft_p99=total.ttft.quantile(0.99),
        request_rate=total.requests / seconds if seconds > 0 else 0.0,
        budget_bound_share=total.iteration_tokens.share_above(budget / 2),
        tbt=total.tbt,
        iterations=total.iteration_seconds,
    )
