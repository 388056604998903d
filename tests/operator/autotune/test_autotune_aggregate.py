"""Aggregation from real engine /metrics text (fixtures/, recorded by record_fixture.py from a
real `sarathi serve`; truth.json is what the load generator saw for each batch)."""

import json
import math
from pathlib import Path

import pytest

from sarathi_operator.autotune.aggregate import Histogram, Scrapes, Snapshot, increase, parse, summarize
from sarathi_operator.autotune.loop import LoopConfig, LoopState, step
from sarathi_operator.autotune.tuner import window_reach

FIXTURES = Path(__file__).parent / "fixtures"
TRUTH = json.loads((FIXTURES / "truth.json").read_text())


def scrape(name: str) -> Snapshot:
    return parse((FIXTURES / f"{name}.txt").read_text())


def test_a_scrape_reads_the_counts_the_client_saw():
    s = scrape("after-a")
    assert s.tbt.count == TRUTH["a"]["tbt_samples"]
    assert s.ttft.count == s.requests == TRUTH["a"]["requests"]
    assert s.settings == {"token_budget": 64, "tbt_slo_ms": 60.0, "slo_margin": 0.9}
    assert (s.limited, s.infeasible) == tuple(TRUTH["a"]["planner"].values())
    assert s.tbt.bounds[-1] == math.inf and len(s.tbt.bounds) == len(s.tbt.counts) > 80
    assert list(s.tbt.counts) == sorted(s.tbt.counts)


def test_an_increase_between_scrapes_is_what_was_served_in_between():
    served = increase(scrape("after-a"), scrape("after-b"))
    assert served.tbt.count == TRUTH["b"]["tbt_samples"]
    assert served.requests == TRUTH["b"]["requests"]
    assert (served.limited, served.infeasible) == tuple(TRUTH["b"]["planner"].values())
    assert served.limited > 0
    assert served.limited < served.decode_iterations.count


def test_the_iterations_are_those_that_carried_decodes():
    """Only they make token gaps: a prefill-only iteration, sized by the budget alone, stays out."""
    text = (FIXTURES / "after-a.txt").read_text()
    every = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("sarathi_iteration_seconds_count"))
    s = scrape("after-a")
    assert 0 < s.decode_iterations.count < every
    assert s.decode_iterations.count <= s.tbt.count  # each made at least one gap


def test_a_restarted_engine_counts_everything_since_its_restart():
    # after-b: 24 requests served; the restarted process has served 12 since.
    served = increase(scrape("after-b"), scrape("restarted-after-c"))
    assert served.tbt.count == TRUTH["c"]["tbt_samples"]
    assert served.requests == TRUTH["c"]["requests"]
    assert served.decode_iterations == scrape("restarted-after-c").decode_iterations
    assert (served.limited, served.infeasible) == tuple(TRUTH["c"]["planner"].values())


@pytest.mark.parametrize("batch, before, after", [("a", "fresh", "after-a"), ("b", "after-a", "after-b")])
def test_the_p99s_agree_with_the_clients_within_a_bucket(batch, before, after):
    served = increase(scrape(before), scrape(after))
    # Buckets are 15% wide; the client adds its own few milliseconds of streaming.
    assert served.tbt.quantile(0.99) == pytest.approx(TRUTH[batch]["client_tbt_p99"], rel=0.15)
    assert served.ttft.quantile(0.99) == pytest.approx(TRUTH[batch]["client_ttft_p99"], rel=0.15)


def test_quantiles_interpolate_inside_the_bucket_like_prometheus():
    h = Histogram((0.1, 0.2, 0.4, math.inf), (10, 60, 100, 100))
    assert h.quantile(0.5) == pytest.approx(0.18)  # rank 50: 40 of the 50 in (0.1, 0.2]
    assert h.quantile(0.99) == pytest.approx(0.395)  # rank 99: 39 of the 40 in (0.2, 0.4]
    assert h.quantile(0.05) == pytest.approx(0.05)
    assert Histogram((0.1, math.inf), (1, 5)).quantile(0.99) == 0.1  # in +Inf: the last finite bound
    assert Histogram((0.1, math.inf), (0, 0)).quantile(0.99) is None


def test_histograms_of_other_buckets_do_not_mix():
    with pytest.raises(ValueError):
        Histogram((1.0, math.inf), (1, 1)) + Histogram((2.0, math.inf), (1, 1))


def test_two_engines_add_up_bucket_by_bucket():
    a, c = increase(scrape("fresh"), scrape("after-a")), scrape("restarted-after-c")
    both = a + c
    assert both.tbt.count == TRUTH["a"]["tbt_samples"] + TRUTH["c"]["tbt_samples"]
    p99s = sorted([a.tbt.quantile(0.99), c.tbt.quantile(0.99)])
    assert p99s[0] <= both.tbt.quantile(0.99) <= p99s[1]


def test_a_window_sums_increases_across_engines_restarts_and_missed_scrapes():
    fresh, a, b, c = (scrape(n) for n in ("fresh", "after-a", "after-b", "restarted-after-c"))
    scrapes = Scrapes(keep_seconds=100)
    scrapes.add(0, {"x": fresh, "y": fresh})
    scrapes.add(10, {"x": a})  # y's scrape failed
    scrapes.add(20, {"x": b, "y": a})
    scrapes.add(30, {"x": c, "z": b})  # x restarted; z appears (one scrape only: adds nothing)
    total, seconds, engines = scrapes.increase_since(0)
    x = TRUTH["a"]["tbt_samples"] + TRUTH["b"]["tbt_samples"] + TRUTH["c"]["tbt_samples"]
    y = TRUTH["a"]["tbt_samples"]  # fresh to after-a, across the missed scrape
    assert total.tbt.count == x + y
    assert (seconds, engines) == (30, 2)
    later, seconds, engines = scrapes.increase_since(15)
    assert later.tbt.count == TRUTH["c"]["tbt_samples"] and (seconds, engines) == (10, 1)


def test_old_scrapes_and_gone_engines_are_forgotten():
    scrapes = Scrapes(keep_seconds=15)
    scrapes.add(0, {"x": scrape("fresh"), "gone": scrape("fresh")})
    scrapes.add(10, {"x": scrape("after-a")})
    scrapes.add(20, {"x": scrape("after-b")})
    total, seconds, engines = scrapes.increase_since(0)
    assert total.tbt.count == TRUTH["b"]["tbt_samples"] and (seconds, engines) == (10, 1)
    scrapes.add(40, {})
    assert scrapes.increase_since(0)[2] == 0


def test_the_window_summary():
    served = increase(scrape("after-a"), scrape("after-b"))
    w = summarize(served, seconds=30, engines=1)
    assert w.tbt_samples == TRUTH["b"]["tbt_samples"]
    assert w.request_rate == pytest.approx(TRUTH["b"]["requests"] / 30)
    assert w.tbt_p99 == served.tbt.quantile(0.99)
    assert w.iterations == served.decode_iterations
    observed = w.observed()
    assert (observed.tbt_samples, observed.iterations, observed.limited) == (
        w.tbt_samples, int(w.iterations.count), served.limited)
    assert summarize(Snapshot(), 0, 0).request_rate == 0.0


def test_a_window_reaches_back_far_enough_to_gather_its_samples_at_the_slos_pace():
    """At a 1 s SLO an engine may make one token gap a second: scraped every 10 s, five intervals
    never hold the 200 gaps a window needs; the reach the SLO implies does, and the loop acts."""
    config = LoopConfig(slo=1.0)
    assert window_reach(10, config) == 400 and window_reach(30, LoopConfig(slo=0.05)) == 150
    bounds = (0.5, 1.0, 2.0, math.inf)

    def engine_at(t: int) -> Snapshot:  # one 0.9 s iteration a second, one decode in it
        one_a_second = Histogram(bounds, (0.0, t, t, t))
        return Snapshot(tbt=one_a_second, decode_iterations=one_a_second, limited=t // 2)

    for keep, acts in ((5 * 10, False), (window_reach(10, config), True)):
        scrapes, state, acted = Scrapes(keep_seconds=keep), LoopState(), False
        for t in range(0, 300, 10):
            scrapes.add(t, {"x": engine_at(t)})
            decision, state = step(state, summarize(*scrapes.increase_since(0)).observed(), config)
            acted = acted or decision.acted
        assert acted is acts
