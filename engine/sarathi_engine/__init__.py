"""Sarathi engine: chunked prefills and stall-free batching on a paged KV cache."""
from sarathi_engine.engine import LLMEngine, RequestOutput
from sarathi_engine.llm import LLM
from sarathi_engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
