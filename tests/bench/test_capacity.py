import pytest

from sarathi_engine.bench.capacity import Bisection, TbtSlo, parse_tbt_slo, passes


def synthetic_summary(qps, service_rate=3.0, base_tbt=0.04, stall=0.5):
    """A queue whose P99 TBT and median scheduling delay grow without bound as qps nears service_rate."""
    load = min(qps / service_rate, 0.999)
    return {"num_failed": 0, "tbt_p99": base_tbt + stall * load ** 4 / (1 - load),
            "scheduling_delay_p50": 0.1 * load / (1 - load)}


def search(slo, bound, start, **kw):
    b = Bisection(start, **kw)
    while (qps := b.next_qps()) is not None:
        b.record(qps, passes(synthetic_summary(qps), slo, bound))
    return b


def true_capacity(slo, bound, lo=0.0, hi=3.0):
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if passes(synthetic_summary(mid), slo, bound) else (lo, mid)
    return lo


@pytest.mark.parametrize("slo,bound,start", [(0.2, 2.0, 0.1), (0.2, 2.0, 10.0), (1.0, 2.0, 0.5), (1.0, 0.3, 0.5)])
def test_finds_the_capacity_of_a_synthetic_latency_model(slo, bound, start):
    b = search(slo, bound, start, tolerance=0.02, max_probes=30)
    truth = true_capacity(slo, bound)
    assert b.capacity <= truth  # only ever reports a rate that passed
    assert b.capacity == pytest.approx(truth, rel=0.03)


def test_probe_budget_bounds_the_search():
    b = search(0.2, 2.0, 0.01, max_probes=3)
    assert len(b.probes) == 3 and b.probes[0] == (0.01, True) and b.capacity == 0.04


def test_nothing_passes_gives_zero():
    b = Bisection(1.0, max_probes=5)
    while (qps := b.next_qps()) is not None:
        b.record(qps, False)
    assert b.capacity == 0.0 and [q for q, _ in b.probes] == [1.0, 0.5, 0.25, 0.125, 0.0625]


def test_a_run_fails_on_errors_tbt_or_delay():
    ok = {"num_failed": 0, "tbt_p99": 0.1, "scheduling_delay_p50": 1.0}
    assert passes(ok, 0.1, 2.0)
    assert not passes({**ok, "num_failed": 1}, 0.1, 2.0)
    assert not passes({**ok, "tbt_p99": 0.11}, 0.1, 2.0)
    assert not passes({**ok, "scheduling_delay_p50": 2.5}, 0.1, 2.0)
    assert passes({**ok, "scheduling_delay_p50": None}, 0.1, 2.0)


def test_slo_parsing():
    assert parse_tbt_slo("200ms") == TbtSlo(seconds=0.2)
    assert parse_tbt_slo("0.5s") == TbtSlo(seconds=0.5)
    assert parse_tbt_slo("150") == TbtSlo(seconds=0.15)
    assert parse_tbt_slo("5x").resolve(0.04) == pytest.approx(0.2)
    assert parse_tbt_slo("200ms").resolve(None) == 0.2
    with pytest.raises(ValueError):
        parse_tbt_slo("5x").resolve(None)
    for bad in ("fast", "0x", "-3ms", "5y"):
        with pytest.raises(ValueError):
            parse_tbt_slo(bad)
