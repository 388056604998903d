"""A request as the engine tracks it: its tokens, how many of them are in the KV cache, its
blocks, and how it finished.

The engine never distinguishes "prefill" from "decode" by state: a sequence has
`num_uncomputed` tokens not yet in the cache; more than one means it is prefilling (its prompt,
or everything again after a preemption), exactly one means it is decoding.
"""
from __future__ import annotations

import enum
import time

import torch

from sarathi_engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache keys of its full blocks, as far as computed
        self.num_registered_blocks = 0  # leading blocks of block_table offered to the prefix cache
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed % 2**64)
        self.end_token_ids: frozenset[int] = frozenset()  # tokens that end the output (EOS, stop tokens)
        self.matcher = None  # a grammar.JsonMatcher when the output must be JSON
        self.logprobs: list = []  # a sampler.TokenLogprobs per output token, when asked
        self.prompt_logprobs: list = []  # the same for prompt tokens 1.. so far, when asked

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed == 1 and bool(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def cumulative_logprob(self) -> float:
        return sum(entry.logprob for entry in self.logprobs)

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    def reset_for_recompute(self) -> None:
        """After preemption: no blocks held, everything (prompt and outputs) to prefill again but what
        the prefix cache still holds when it is admitted again."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_registered_blocks = 0
        self.status = Status.WAITING
        self.num_preemptions += 1

    def __repr__(self) -> str:
        return f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens})"
