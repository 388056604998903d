import math

import numpy as np
import pytest

from sarathi_engine.bench.arrivals import arrival_times


def test_poisson_rate_and_exponential_gaps():
    times = arrival_times(20_000, qps=4.0, seed=0)
    gaps = np.diff(times)
    assert times[0] == 0 and np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_keeps_the_rate_and_changes_the_spread(burstiness):
    gaps = np.diff(arrival_times(20_000, qps=2.0, seed=1, burstiness=burstiness))
    assert 1 / gaps.mean() == pytest.approx(2.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_infinite_rate_sends_everything_at_once_and_seed_repeats():
    assert arrival_times(5, math.inf, seed=0).tolist() == [0.0] * 5
    assert arrival_times(50, 1.0, seed=7).tolist() == arrival_times(50, 1.0, seed=7).tolist()
    assert arrival_times(50, 1.0, seed=7).tolist() != arrival_times(50, 1.0, seed=8).tolist()


@pytest.mark.parametrize("qps,burstiness", [(0, 1), (-1, 1), (1, 0)])
def test_rejects_nonpositive_parameters(qps, burstiness):
    with pytest.raises(ValueError):
        arrival_times(3, qps, seed=0, burstiness=burstiness)
