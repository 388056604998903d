"""One endpoint under test: connecting (model, warm-up, calibration), a run at one request rate,
and the capacity search, all on the same requests and seed."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sarathi_engine.bench.arrivals import arrival_times
from sarathi_engine.bench.calibrate import calibration_lengths, measure_prefill
from sarathi_engine.bench.capacity import Bisection, passes
from sarathi_engine.bench.loadgen import Load, ServerTraits, probe_server, run_load, served_model
from sarathi_engine.bench.metrics import PrefillModel, summarize
from sarathi_engine.bench.records import RequestRecord
from sarathi_engine.bench.servermetrics import bucket_delta, histogram_quantile, scrape_histogram
from sarathi_engine.bench.workloads import (WORKLOADS, RequestSpec, prompt_token_ids, read_trace, sample_lengths,
                                            scale_and_clip)


@dataclass(frozen=True)
class WorkloadSpec:
    workload: str  # a name from WORKLOADS or a trace file
    scale: float
    max_model_len: int
    num_requests: int
    seed: int = 0
    burstiness: float = 1.0

    def requests(self) -> list[RequestSpec]:
        if self.workload in WORKLOADS:
            base = sample_lengths(WORKLOADS[self.workload], self.num_requests, self.seed)
        else:
            trace = read_trace(Path(self.workload))
            base = [trace[i % len(trace)] for i in range(self.num_requests)]
        return scale_and_clip(base, self.scale, self.max_model_len)

    def load(self, qps: float, count: int | None = None) -> Load:
        """The first `count` requests (all by default) arriving at qps."""
        specs = self.requests()[:count]
        return Load(prompt_token_ids(specs, self.seed), [s.output_len for s in specs],
                    arrival_times(len(specs), qps, self.seed, self.burstiness).tolist())


@dataclass
class Endpoint:
    url: str
    model: str
    traits: ServerTraits
    prefill: PrefillModel | None  # only when the server does not report scheduling delay


async def connect(url: str, workload: WorkloadSpec, model: str | None = None) -> Endpoint:
    model = model or await served_model(url)
    traits = await probe_server(url, model, prompt_token_ids([RequestSpec(16, 1)], workload.seed)[0])
    prefill = None
    if not traits.reports_scheduling_delay:
        prefill = await measure_prefill(url, model, calibration_lengths(workload.requests()),
                                        continuous_usage=traits.continuous_usage)
    return Endpoint(url, model, traits, prefill)


@dataclass
class Point:
    qps: float
    summary: dict
    records: list[RequestRecord]

    def to_dict(self, with_records: bool = True) -> dict:
        out = {"qps": self.qps, "summary": self.summary}
        if with_records:
            out["records"] = [r.to_dict() for r in self.records]
        return out


Hooks = Callable[[str, int], tuple[Callable, Callable]]  # (label, total) -> (on_sent, on_done)


async def run_point(endpoint: Endpoint, workload: WorkloadSpec, qps: float, tbt_slo: float | None = None,
                    ttft_slo: float | None = None, count: int | None = None, hooks: Hooks | None = None) -> Point:
    load = workload.load(qps, count)
    on_sent, on_done = hooks(f"{qps:g} req/s", len(load.prompts)) if hooks else (None, None)
    before = await scrape_histogram(endpoint.url)
    records, duration = await run_load(endpoint.url, endpoint.model, load, endpoint.traits.continuous_usage,
                                       on_sent=on_sent, on_done=on_done)
    after = await scrape_histogram(endpoint.url)
    queue = None
    if after is not None:
        delta = bucket_delta(after, before)
        queue = {f"scheduling_delay_p{q}": histogram_quantile(q / 100, delta) for q in (50, 90, 99)}
    return Point(qps, summarize(records, duration, endpoint.prefill, tbt_slo, ttft_slo, queue), records)


def probe_size(qps: float, probe_seconds: float | None, minimum: int, maximum: int) -> int:
    """Requests in one capacity probe: enough to span probe_seconds of arrivals, within bounds."""
    if probe_seconds is None:
        return maximum
    return max(minimum, min(maximum, math.ceil(qps * probe_seconds)))


async def find_capacity(endpoint: Endpoint, workload: WorkloadSpec, tbt_slo: float, delay_bound: float,
                        start_qps: float, tolerance: float = 0.1, max_probes: int = 8,
                        probe_seconds: float | None = None, min_requests: int = 20,
                        hooks: Hooks | None = None, on_probe: Callable[[dict], None] | None = None) -> dict:
    search = Bisection(start_qps, tolerance, max_probes)
    probes = []
    while (qps := search.next_qps()) is not None:
        count = probe_size(qps, probe_seconds, min_requests, workload.num_requests)
        point = await run_point(endpoint, workload, qps, tbt_slo, count=count, hooks=hooks)
        passed = passes(point.summary, tbt_slo, delay_bound)
        search.record(qps, passed)
        probes.append({"qps": qps, "passed": passed, "summary": point.summary})
        if on_probe:
            on_probe(probes[-1])
    return {"capacity": search.capacity, "tbt_slo": tbt_slo, "delay_bound": delay_bound, "probes": probes}
