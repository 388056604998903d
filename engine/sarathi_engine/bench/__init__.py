"""`sarathi bench`: workloads, arrivals, a streaming load generator for any OpenAI-compatible
/v1/completions URL, latency metrics, capacity search under a TBT SLO, reports and plots."""
