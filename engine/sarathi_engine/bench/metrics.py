"""Summaries of a run: percentiles of TTFT, TBT, end-to-end latency and scheduling delay,
throughput, and goodput under SLOs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sarathi_engine.bench.records import RequestRecord


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None when there are no values."""
    values = np.asarray(values, dtype=float)
    return None if values.size == 0 else float(np.percentile(values, q))


def quantiles(values, prefix: str) -> dict[str, float | None]:
    return {f"{prefix}_p50": percentile(values, 50), f"{prefix}_p90": percentile(values, 90),
            f"{prefix}_p99": percentile(values, 99)}


@dataclass(frozen=True)
class PrefillModel:
    """TTFT of a request alone on an idle server, as a + b * prompt_len seconds."""

    intercept: float
    per_token: float

    def __call__(self, prompt_len: int) -> float:
        return self.intercept + self.per_token * prompt_len

    @classmethod
    def fit(cls, prompt_lens, ttfts) -> PrefillModel:
        lens, ttfts = np.asarray(prompt_lens, float), np.asarray(ttfts, float)
        if np.unique(lens).size < 2:  # a single length fixes no slope: all of TTFT is per token
            return cls(0.0, float(ttfts.mean() / lens.mean()))
        per_token, intercept = np.polyfit(lens, ttfts, 1)
        return cls(float(intercept), float(per_token))


def scheduling_delay(record: RequestRecord, prefill: PrefillModel | None) -> float | None:
    """Arrival to first scheduling. The server's own figure when it reports one; otherwise an
    estimate, the part of TTFT beyond what the same prompt takes alone on an idle server, which
    also charges a chunked prefill's own stretch to the delay and so overstates it for sarathi."""
    if record.server_scheduling_delay is not None:
        return record.server_scheduling_delay
    if prefill is None:
        return None
    return max(0.0, record.ttft - prefill(record.prompt_len))


def meets_slo(record: RequestRecord, tbt_slo: float | None, ttft_slo: float | None) -> bool:
    """A good request: first token within the TTFT SLO and no gap between tokens above the TBT SLO."""
    if not record.ok:
        return False
    if ttft_slo is not None and record.ttft > ttft_slo:
        return False
    return tbt_slo is None or record.tbts.size == 0 or float(record.tbts.max()) <= tbt_slo


def summarize(records: list[RequestRecord], duration: float, prefill: PrefillModel | None = None,
              tbt_slo: float | None = None, ttft_slo: float | None = None,
              server_queue_time: dict[str, float | None] | None = None) -> dict:
    """server_queue_time: quantiles of the server's own queue-time histogram over the run, used for
    scheduling delay unless every response reported its own (exact per request, no buckets)."""
    ok = [r for r in records if r.ok]
    tbts = np.concatenate([r.tbts for r in ok]) if ok else np.zeros(0)
    delays = [d for d in (scheduling_delay(r, prefill) for r in ok) if d is not None]
    reported = sum(r.server_scheduling_delay is not None for r in ok)
    output_tokens = sum(len(r.token_times) for r in ok)
    summary = {
        "num_requests": len(records),
        "num_failed": len(records) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_token_throughput": output_tokens / duration if duration > 0 else None,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_len for r in ok),
        **quantiles([r.ttft for r in ok], "ttft"),
        **quantiles(tbts, "tbt"),
        "tbt_max": float(tbts.max()) if tbts.size else None,
        "tbt_mean": float(tbts.mean()) if tbts.size else None,
        **quantiles([r.e2e for r in ok], "e2e"),
        **quantiles(delays, "scheduling_delay"),
        "scheduling_delay_source": (None if not delays else "server" if reported == len(ok)
                                    else "estimated" if not reported else "mixed"),
    }
    if server_queue_time and server_queue_time.get("scheduling_delay_p50") is not None \
            and summary["scheduling_delay_source"] != "server":
        summary["scheduling_delay_estimate_p50"] = summary["scheduling_delay_p50"]
        summary.update(server_queue_time, scheduling_delay_source="server-metrics")
    if tbt_slo is not None or ttft_slo is not None:
        good = sum(meets_slo(r, tbt_slo, ttft_slo) for r in records)
        summary.update(tbt_slo=tbt_slo, ttft_slo=ttft_slo, slo_attainment=good / len(records) if records else None,
                       goodput=good / duration if duration > 0 else None)
    return summary
