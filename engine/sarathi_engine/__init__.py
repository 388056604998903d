"""Sarathi engine: chunked prefills and stall-free batching on a paged KV cache."""
