"""The server's Prometheus metrics: latency histograms fine enough to read a P99 anywhere between
a few milliseconds and tens of seconds, and gauges read live from the engine at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def latency_buckets(low: float = 0.001, high: float = 60.0, ratio: float = 1.15) -> list[float]:
    """Geometric buckets: each about 15% wider than the last, so a percentile read from them is off
    by at most that much."""
    buckets, edge = [], low
    while edge < high:
        buckets.append(float(f"{edge:.4g}"))
        edge *= ratio
    return buckets + [high]


def token_buckets(high: int = 65536) -> list[float]:
    edges, edge = [], 1
    while edge <= high:
        edges.extend([edge, edge * 1.5] if edge >= 4 else [edge])
        edge *= 2
    return [float(e) for e in edges]


class ServerMetrics:
    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r, lat = self.registry, latency_buckets()

        def histogram(name, doc, buckets=lat):
            return Histogram(name, doc, labels, registry=r, buckets=buckets).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def gauge(name, doc, read):
            g = Gauge(name, doc, labels, registry=r)
            g.labels(model_name).set_function(read)

        self.ttft = histogram("sarathi_time_to_first_token_seconds", "Time from arrival to the first output token.")
        self.tbt = histogram("sarathi_time_between_tokens_seconds", "Time between consecutive output tokens of a request.")
        self.e2e = histogram("sarathi_e2e_request_latency_seconds", "Time from arrival to the last output token.")
        self.queue = histogram("sarathi_request_queue_time_seconds", "Time from arrival to first being scheduled.")
        self.iteration_tokens = histogram("sarathi_iteration_tokens", "Tokens (prefill + decode) per engine iteration.",
                                          buckets=token_buckets())
        self.iteration_seconds = histogram("sarathi_iteration_seconds", "Wall time of one engine iteration.")
        self.decode_iteration_seconds = histogram(
            "sarathi_decode_iteration_seconds",
            "Wall time of one engine iteration that carried decodes: the gap each of its decodes waited.")
        self.predicted_ratio = histogram(
            "sarathi_iteration_predicted_ratio", "Iteration time over the SLO planner's prediction for it.",
            buckets=latency_buckets(0.25, 8.0, 1.1))
        self.infeasible = counter("sarathi_slo_infeasible_iterations",
                                  "Iterations whose decodes alone were predicted over the TBT SLO.")
        self.limited = counter("sarathi_slo_limited_iterations",
                               "Iterations whose prefill the TBT SLO cut short of what the token budget allowed.")
        self.preemptions = counter("sarathi_num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.")
        self.prefix_queries = counter("sarathi_prefix_cache_queries",
                                      "Prompt tokens of admitted requests looked up in the prefix cache.")
        self.prefix_hits = counter("sarathi_prefix_cache_hits", "Of those, tokens found in the prefix cache (not computed).")
        self.prompt_tokens = counter("sarathi_prompt_tokens", "Prompt tokens of requests admitted.")
        self.generation_tokens = counter("sarathi_generation_tokens", "Output tokens generated.")
        self.requests = Counter("sarathi_requests", "Finished requests by finish reason.", labels + ["finish_reason"],
                                registry=r)
        self.model_name = model_name
        gauge("sarathi_num_requests_running", "Requests holding KV blocks (prefilling or decoding).",
              lambda: engine.num_running)
        gauge("sarathi_num_requests_waiting", "Requests waiting to be admitted.", lambda: engine.num_waiting)
        gauge("sarathi_kv_cache_usage_ratio", "Share of KV cache blocks in use.", lambda: engine.blocks.usage)
        gauge("sarathi_token_budget", "The token budget in force for the next iteration.", lambda: engine.token_budget)
        gauge("sarathi_tbt_slo_seconds", "The TBT SLO each iteration is planned for (0: none).",
              lambda: (engine.tbt_slo_ms or 0) / 1e3)
        gauge("sarathi_slo_margin", "The share of the TBT SLO each iteration is planned for.",
              lambda: engine.config.scheduler.slo_margin)
        # Per counter fed from an engine total, the total it has counted: from now on, so what the
        # engine did before serving (the SLO planner's calibration) stays out.
        self._totals_seen = self._engine_totals(engine)

    def observe_iteration(self, stats, engine) -> None:
        """One engine iteration's figures, and what the engine's running totals added since the last one."""
        self.iteration_tokens.observe(stats.num_tokens)
        self.iteration_seconds.observe(stats.duration)
        if stats.num_decode_tokens:
            self.decode_iteration_seconds.observe(stats.duration)
        if stats.predicted:
            self.predicted_ratio.observe(stats.duration / stats.predicted)
        for counter, total in self._engine_totals(engine).items():
            counter.inc(total - self._totals_seen[counter])
            self._totals_seen[counter] = total

    def _engine_totals(self, engine) -> dict:
        """The counters fed from the engine's own running totals, by counter."""
        planner = engine.planner
        return {self.preemptions: engine.scheduler.num_preemptions,
                self.infeasible: planner.infeasible if planner is not None else 0,
                self.limited: planner.limited if planner is not None else 0,
                self.prefix_queries: engine.blocks.prefix_queries,
                self.prefix_hits: engine.blocks.prefix_hits}

    def finished(self, reason: str) -> None:
        self.requests.labels(self.model_name, reason).inc()
