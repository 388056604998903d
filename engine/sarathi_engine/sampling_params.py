"""Per-request sampling settings, validated where they are made."""
from __future__ import annotations

from dataclasses import dataclass, field

class InvalidParam(ValueError):
    """A setting out of its range; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS, stop token or stop string ends the output before this many tokens
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # HF/vLLM: divides positive (multiplies negative) logits of seen tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # the sampled token's logprob and this many alternatives per output token
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    json_schema: dict | None = None  # the output must be JSON matching it ({} for any JSON object: json_object)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(_is_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens!r}", "max_tokens")
        check(_is_number(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k!r}", "top_k")
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        check(_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
              f"seed must be a 64-bit integer, got {self.seed!r}", "seed")
        check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings", "stop")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative integers", "stop_token_ids")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
              f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}", "min_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(_is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}", name)
        check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2**31,
              f"repetition_penalty must be > 0, got {self.repetition_penalty!r}", "repetition_penalty")
        check(isinstance(self.logit_bias, dict)
              and all(_is_int(t) and t >= 0 and _is_number(b) and abs(b) <= MAX_LOGIT_BIAS
                      for t, b in self.logit_bias.items()),
              f"logit_bias must map token ids to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", "logit_bias")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                  f"{name} must be in [0, {MAX_LOGPROBS}], got {value!r}", name)
        check(self.json_schema is None or isinstance(self.json_schema, dict), "json_schema must be an object", "json_schema")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidParam(message, param)
