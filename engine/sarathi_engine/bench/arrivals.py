"""When requests are sent: a Poisson process at a given rate, or a gamma process whose
burstiness factor is the shape (1 is Poisson, below 1 burstier), vLLM's convention."""
from __future__ import annotations

import math

import numpy as np


def arrival_times(n: int, qps: float, seed: int, burstiness: float = 1.0) -> np.ndarray:
    """Send times in seconds from the start, the first at 0; every request at 0 when qps is inf."""
    if qps <= 0:
        raise ValueError(f"qps must be positive, got {qps}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if n == 0:
        return np.zeros(0)
    if math.isinf(qps):
        return np.zeros(n)
    rng = np.random.default_rng([seed, 2])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (qps * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
