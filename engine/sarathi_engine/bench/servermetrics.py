"""Latency as the server itself counts it: histograms on its Prometheus /metrics (the queue time,
arrival until first scheduled, ours and vLLM's; TTFT and TBT), scraped before and after a run,
their quantiles read from the difference as Prometheus' histogram_quantile does."""
from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

QUEUE_TIME_HISTOGRAMS = ("sarathi_request_queue_time_seconds", "vllm:request_queue_time_seconds")


def histogram_buckets(text: str, names: tuple[str, ...] = QUEUE_TIME_HISTOGRAMS) -> dict[float, float] | None:
    """Cumulative counts by upper bound, summed over label sets, of the first histogram named in
    `names` that a /metrics text holds; None when it has none."""
    for family in text_string_to_metric_families(text):
        if family.name in names and family.type == "histogram":
            buckets: dict[float, float] = {}
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
            return buckets
    return None


def bucket_delta(after: dict[float, float], before: dict[float, float] | None) -> dict[float, float]:
    return {le: count - (before or {}).get(le, 0.0) for le, count in after.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (0-1), linear within its bucket; the last finite bound if it lies in +Inf."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else lower
        lower, below = bound, count
    return lower


async def scrape_histogram(url: str, names: tuple[str, ...] = QUEUE_TIME_HISTOGRAMS,
                           timeout_s: float = 10) -> dict[float, float] | None:
    """One of the server's histograms now, or None when it exposes none (or no /metrics)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url.rstrip("/") + "/metrics") as response:
                if response.status != 200:
                    return None
                return histogram_buckets(await response.text(), names)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
