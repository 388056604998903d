"""Capacity under a TBT SLO, as Sarathi-Serve defines it: the highest request rate at which P99
TBT stays within the SLO and the median scheduling delay within a bound, found by doubling the
rate until a run fails and then bisecting between the last pass and the first failure."""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TbtSlo:
    """A TBT SLO in seconds, or a multiple of the measured decode-only iteration time."""

    seconds: float | None = None
    multiple: float | None = None

    @property
    def needs_decode_time(self) -> bool:
        return self.multiple is not None

    def resolve(self, decode_time: float | None) -> float:
        if self.multiple is None:
            return self.seconds
        if decode_time is None:
            raise ValueError("a TBT SLO given as a multiple needs the decode-only iteration time")
        return self.multiple * decode_time

    def __str__(self) -> str:
        return f"{self.multiple:g}x decode" if self.multiple is not None else f"{self.seconds * 1000:g} ms"

    def as_arg(self) -> str:
        return f"{self.multiple:g}x" if self.multiple is not None else f"{self.seconds * 1000:g}ms"


_SLO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|x)?\s*$")


def parse_tbt_slo(text: str) -> TbtSlo:
    """'200ms', '0.2s' or '5x' (times the decode-only iteration time); a bare number is ms."""
    match = _SLO.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"TBT SLO must look like 200ms, 0.2s or 5x, got {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "ms"
    if unit == "x":
        return TbtSlo(multiple=value)
    return TbtSlo(seconds=value / 1000 if unit == "ms" else value)


def passes(summary: dict, tbt_slo: float, delay_bound: float) -> bool:
    """A run passes when every request succeeded, P99 TBT <= SLO and median scheduling delay <= bound."""
    if summary["num_failed"] or summary["tbt_p99"] is None:
        return False
    delay = summary["scheduling_delay_p50"]
    return summary["tbt_p99"] <= tbt_slo and (delay is None or delay <= delay_bound)


@dataclass
class Bisection:
    """The search's state: ask next_qps(), run at that rate, tell record(); None means done."""

    start_qps: float
    tolerance: float = 0.1  # stop when the failing rate is within this fraction of the passing one
    max_probes: int = 8
    lo: float = 0.0  # highest rate that passed
    hi: float | None = None  # lowest rate that failed
    probes: list[tuple[float, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.start_qps <= 0:
            raise ValueError(f"start_qps must be positive, got {self.start_qps}")

    def next_qps(self) -> float | None:
        if len(self.probes) >= self.max_probes:
            return None
        if self.hi is None:
            return self.lo * 2 if self.lo else self.start_qps
        if self.hi - self.lo <= self.tolerance * self.hi:
            return None
        return (self.lo + self.hi) / 2

    def record(self, qps: float, passed: bool) -> None:
        self.probes.append((qps, passed))
        if passed:
            self.lo = max(self.lo, qps)
        else:
            self.hi = qps if self.hi is None else min(self.hi, qps)

    @property
    def capacity(self) -> float:
        return self.lo
