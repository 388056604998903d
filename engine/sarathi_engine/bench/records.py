"""What the load generator measures for one request, and the latencies derived from it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    max_tokens: int
    send_time: float  # seconds from the start of the run
    token_times: list[float] = field(default_factory=list)  # one per output token, seconds after send
    end: float | None = None  # the response's end, seconds after send
    output_tokens: int = 0  # the server's own count (usage) when it gave one
    server_scheduling_delay: float | None = None  # when the server reports it
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tbts(self) -> np.ndarray:
        """Every gap between consecutive output tokens; tokens that arrived in one chunk are 0 apart."""
        return np.diff(self.token_times)

    @property
    def e2e(self) -> float:
        return self.end if self.end is not None else self.token_times[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RequestRecord:
        return cls(**data)
