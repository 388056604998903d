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

from .loop import Observed

TBT = "sarathi_time_between_tokens_seconds"
TTFT = "sarathi_time_to_first_token_seconds"
# Only iterations that carried decodes: one without makes no token gap, and the budget alone sizes
# it (a long prompt's chunks can take many times the SLO).
DECODE_ITERATIONS = "sarathi_decode_iteration_seconds"
REQUESTS = "sarathi_requests"
LIMITED = "sarathi_slo_limited_iterations"
INFEASIBLE = "sarathi_slo_infeasible_iterations"
COUNTERS = (REQUESTS, LIMITED, INFEASIBLE)
# Gauges: the live settings each engine runs at the scrape.
SETTINGS = {"sarathi_token_budget": "token_budget", "sarathi_tbt_slo_seconds": "tbt_slo_ms",
            "sarathi_slo_margin": "slo_margin"}


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
    decode_iterations: Histogram = Histogram()
    requests: float = 0.0  # finished requests, any finish reason
    limited: float = 0.0  # iterations whose prefill the SLO planner cut short
    infeasible: float = 0.0  # iterations whose decodes alone were predicted over the SLO
    settings: dict | None = None  # the live settings in force at the scrape (engine admin API names)

    def __add__(self, other: "Snapshot") -> "Snapshot":
        return Snapshot(self.tbt + other.tbt, self.ttft + other.ttft, self.decode_iterations + other.decode_iterations,
                        self.requests + other.requests, self.limited + other.limited,
                        self.infeasible + other.infeasible)

    def __sub__(self, other: "Snapshot") -> "Snapshot":
        return Snapshot(self.tbt - other.tbt, self.ttft - other.ttft, self.decode_iterations - other.decode_iterations,
                        self.requests - other.requests, self.limited - other.limited,
                        self.infeasible - other.infeasible)


def _setting(gauge: str, value: float) -> float | int | None:
    if gauge == "sarathi_token_budget":
        return int(value)
    if gauge == "sarathi_tbt_slo_seconds":
        return round(value * 1000, 3) or None  # 0: no SLO
    return round(value, 4)


def parse(text: str) -> Snapshot:
    """The counters the tuner reads from one engine's /metrics text, summed over label sets."""
    buckets: dict[str, dict[float, float]] = {TBT: {}, TTFT: {}, DECODE_ITERATIONS: {}}
    counters, settings = dict.fromkeys(COUNTERS, 0.0), {}
    for family in text_string_to_metric_families(text):
        if family.name in buckets:
            for s in family.samples:
                if s.name == family.name + "_bucket":
                    le = float(s.labels["le"])
                    buckets[family.name][le] = buckets[family.name].get(le, 0.0) + s.value
        elif family.name in counters:
            counters[family.name] += sum(s.value for s in family.samples if s.name == family.name + "_total")
        elif family.name in SETTINGS and family.samples:
            settings[SETTINGS[family.name]] = _setting(family.name, family.samples[0].value)
    tbt, ttft, seconds = (Histogram(tuple(sorted(b)), tuple(b[k] for k in sorted(b))) for b in buckets.values())
    return Snapshot(tbt, ttft, seconds, counters[REQUESTS], counters[LIMITED], counters[INFEASIBLE],
                    settings or None)


def _went_down(old: Snapshot, new: Snapshot) -> bool:
    return (new.requests < old.requests or new.tbt.count < old.tbt.count or new.ttft.count < old.ttft.count
            or new.decode_iterations.count < old.decode_iterations.count or new.limited < old.limited
            or new.infeasible < old.infeasible)


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
    tbt: Histogram  # the token gaps
    ttft: Histogram
    iterations: Histogram  # the times of the engines' iterations that carried decodes
    requests: float  # finished
    limited: int
    infeasible: int

    @property
    def tbt_samples(self) -> int:
        return int(self.tbt.count)

    @property
    def tbt_p99(self) -> float | None:
        return self.tbt.quantile(0.99)

    @property
    def ttft_p99(self) -> float | None:
        return self.ttft.quantile(0.99)

    @property
    def request_rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def observed(self) -> Observed:
        return Observed(self.tbt_samples, self.tbt_p99, int(self.iterations.count), self.limited, self.infeasible)


def summarize(total: Snapshot, seconds: float, engines: int) -> Window:
    return Window(seconds, engines, total.tbt, total.ttft, total.decode_iterations, total.requests,
                  int(total.limited), int(total.infeasible))
