"""The OpenAI-compatible HTTP server, its Prometheus metrics and the operator's admin API."""
