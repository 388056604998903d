"""The offline API: `LLM(model=...).generate(prompts, params)` runs the engine to completion.

Under tensor or pipeline parallelism it owns other processes and the process group:
`shutdown()`, or leaving `with LLM(...) as llm:`, releases them, so another can start."""
from __future__ import annotations

from sarathi_engine.config import make_engine_config
from sarathi_engine.engine import LLMEngine, RequestOutput
from sarathi_engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **settings) -> None:
        """settings: policy, token_budget, max_num_seqs, max_model_len, dtype, device,
        kv_cache_memory, block_size, seed, tensor_parallel_size, pipeline_parallel_size, tbt_slo_ms,
        min_prefill_chunk, prefix_caching (make_engine_config's keywords)."""
        self.engine = LLMEngine(make_engine_config(model, **settings))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        token_ids = [self.engine.tokenize(p) for p in prompts]  # all valid before any is queued
        ids = [f"offline-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, token_ids, params):
            self.engine.add_request(request_id, prompt, p)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[i] for i in ids]

    def shutdown(self) -> None:
        """Stop the other ranks and leave the process group (a no-op in a single process)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def chat_prompt(self, message: str) -> list[int]:
        """Token ids of a one-message chat, in the model's own chat template."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
