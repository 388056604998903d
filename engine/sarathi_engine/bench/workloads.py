"""Request lengths: log-normal distributions fitted to the paper's traces (median and P90 of
prompt and output tokens), trace files of lengths (CSV or JSONL), scaling for small machines,
clipping to the model's context, and the seeded random token ids sent as prompts."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Z90 = 1.2815515655446004  # standard normal quantile at 0.9


@dataclass(frozen=True)
class LogNormal:
    """A log-normal with the given median and 90th percentile."""

    median: float
    p90: float

    @property
    def sigma(self) -> float:
        return math.log(self.p90 / self.median) / Z90

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.lognormal(math.log(self.median), self.sigma, n)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LogNormal
    output: LogNormal


# Sarathi-Serve, Table 3 (token counts).
WORKLOADS = {
    "sharegpt4": Workload("sharegpt4", prompt=LogNormal(1730, 5696), output=LogNormal(415, 834)),
    "arxiv_summarization": Workload("arxiv_summarization", prompt=LogNormal(7059, 12985), output=LogNormal(208, 371)),
}


@dataclass(frozen=True)
class RequestSpec:
    prompt_len: int
    output_len: int


def sample_lengths(workload: Workload, n: int, seed: int) -> list[RequestSpec]:
    rng = np.random.default_rng(seed)
    prompts, outputs = workload.prompt.sample(rng, n), workload.output.sample(rng, n)
    return [RequestSpec(int(round(p)), int(round(o))) for p, o in zip(prompts, outputs)]


def read_trace(path: Path) -> list[RequestSpec]:
    """Lengths from a CSV with a header, or JSONL; columns prompt_len/output_len (or Sarathi's
    num_prefill_tokens/num_decode_tokens)."""
    text = Path(path).read_text()
    if Path(path).suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(text.splitlines()))
    specs = []
    for i, row in enumerate(rows, 1):
        prompt = row.get("prompt_len", row.get("num_prefill_tokens"))
        output = row.get("output_len", row.get("num_decode_tokens"))
        if prompt is None or output is None:
            raise ValueError(f"{path}: row {i} needs prompt_len and output_len")
        specs.append(RequestSpec(int(float(prompt)), int(float(output))))
    if not specs:
        raise ValueError(f"{path}: no requests")
    return specs


def scale_and_clip(specs: list[RequestSpec], scale: float, max_model_len: int) -> list[RequestSpec]:
    """Multiply lengths by scale, then fit each request into the context as a client would, by
    truncating its prompt: the output keeps its length up to half the context, the prompt takes
    what is left, and an output longer than that gets whatever a shorter prompt leaves. (A prompt
    cut to leave one output token would make a long-document workload all prefill: no token gaps
    for its TBT to be measured on.)"""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
    clipped = []
    for spec in specs:
        prompt, output = max(1, round(spec.prompt_len * scale)), max(1, round(spec.output_len * scale))
        prompt = min(prompt, max_model_len - min(output, max_model_len // 2))
        clipped.append(RequestSpec(prompt, min(output, max_model_len - prompt)))
    return clipped


# Ordinary vocabulary ids in any tokenizer of 10k+ entries: clear of special and byte tokens.
TOKEN_ID_RANGE = (1000, 10000)


def prompt_token_ids(specs: list[RequestSpec], seed: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, 1])
    low, high = TOKEN_ID_RANGE
    return [rng.integers(low, high, spec.prompt_len).tolist() for spec in specs]
