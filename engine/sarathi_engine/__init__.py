"""Sarathi engine: chunked prefills and stall-free batching on a paged KV cache."""
import os

# OpenMP threads that spin between parallel regions collapse when the cores are shared with the
# server's event loop, a load generator or other ranks (a decode step measured 37x slower on two
# busy cores). Sleeping waiters cost little when the cores are free. Set before torch loads its
# OpenMP runtime; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sarathi_engine.engine import LLMEngine, RequestOutput
from sarathi_engine.llm import LLM
from sarathi_engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
