"""Per-iteration SLO planning: the cost model's online fit on synthetic timings, the planner's
chunk choice, and the sarathi scheduler planning real sequences with it (no model: iteration
times come from a known linear machine plus noise)."""
from __future__ import annotations

import numpy as np
import pytest

from sarathi_engine.config import SchedulerConfig
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.scheduler import make_scheduler
from sarathi_engine.slo_planner import FEATURES, BatchShape, CostModel, SloPlanner, gap_quantile, shape_of
from tests.engine.test_scheduler import decoding, plan_of, run, seq

# A CPU-like machine, in seconds per raw unit of each feature: 20 ms an iteration, 8 ms more when
# it prefills, 1.2 ms a token, 20 ms per million query-key pairs a chunk attends, 2 ms per 1000
# KV rows the decodes read, 0.4 ms a sequence.
TRUE = {"constant": 0.020, "any_prefill": 0.008, "tokens": 0.0012, "prefill_attention": 2e-8,
        "decode_context": 2e-6, "sequences": 0.0004}


def true_time(shape: BatchShape) -> float:
    raw = [1.0, float(shape.prefill_tokens > 0), shape.prefill_tokens + shape.decodes, shape.prefill_attention,
           shape.decode_context, shape.prefills + shape.decodes]
    return sum(TRUE[f] * x for f, x in zip(FEATURES, raw))


def random_shape(rng: np.random.Generator) -> BatchShape:
    shape = BatchShape()
    for _ in range(rng.integers(0, 33)):
        shape = shape.with_decode(int(rng.integers(16, 2048)))
    if rng.random() < 0.6:
        shape = shape.with_chunk(int(rng.integers(1, 513)), int(rng.integers(0, 2048)))
    return shape if shape.decodes or shape.prefills else shape.with_decode(100)


def fitted(noise: float, samples: int = 600, seed: int = 0) -> CostModel:
    rng = np.random.default_rng(seed)
    model = CostModel()
    for _ in range(samples):
        shape = random_shape(rng)
        # As if the planner had cut every prefill to the target: the error quantile is theirs.
        model.observe(shape, true_time(shape) * (1 + noise * rng.standard_normal()), cut=bool(shape.prefill_tokens))
    return model


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.2])
def test_the_fit_converges_on_noisy_timings(noise):
    model = fitted(noise)
    rng = np.random.default_rng(1)
    errors = [abs(model.predict(s) / true_time(s) - 1) for s in (random_shape(rng) for _ in range(200))]
    assert np.median(errors) < 0.02 + noise / 4
    assert all(v >= 0 for v in model.coefficients().values())
    # The error quantile covers the noise: about the 99th percentile of 1 + noise * N(0, 1).
    assert model.error == pytest.approx(1 + 2.33 * noise, abs=0.05 + noise / 3)


def test_the_error_quantile_is_over_the_token_gaps_of_planned_iterations():
    # An iteration makes one token gap per decode: 1% of the gaps may run past the quantile.
    assert gap_quantile([(1.0, 99), (2.0, 1)], 0.99) == 1.0
    assert gap_quantile([(1.0, 98), (2.0, 2)], 0.99) == 2.0
    # Iterations the planner did not cut to the target (pure decodes, prompts that ended short of
    # it) vary ten times more than those it cut: the error quantile is the cut ones' (1 + 2.33 x 5%).
    rng = np.random.default_rng(0)
    model = CostModel()
    for i in range(1500):
        shape = random_shape(rng)
        cut = bool(shape.prefill_tokens) and i % 2 == 0
        noise = 0.05 if cut else 0.5
        model.observe(shape, true_time(shape) * max(0.1, 1 + noise * rng.standard_normal()), cut)
    assert model.error == pytest.approx(1 + 2.33 * 0.05, abs=0.05)


def test_an_outlier_stays_out_of_the_fit():
    model = fitted(0.05)
    shape = BatchShape().with_decode(500).with_chunk(256, 0)
    before = model.predict(shape)
    assert not model.observe(shape, true_time(shape) * 20)  # another process took the core
    assert model.predict(shape) == before


def planner_for(slo_ms: float | None, min_chunk: int = 16, budget: int = 4096) -> SloPlanner:
    config = SchedulerConfig(policy="sarathi", token_budget=budget, max_model_len=8192, tbt_slo_ms=slo_ms,
                             min_prefill_chunk=min_chunk)
    return SloPlanner(config, fitted(0.0))


def test_the_planner_takes_the_largest_chunk_that_fits():
    planner = planner_for(100)
    decodes = BatchShape()
    for _ in range(8):
        decodes = decodes.with_decode(512)
    chunk = planner.chunk(decodes, cached=256, wanted=2000)
    target = planner.target / planner.model.error
    assert planner.model.predict(decodes.with_chunk(chunk, 256)) <= target
    assert planner.model.predict(decodes.with_chunk(chunk + 1, 256)) > target
    # By the true machine too: 100 ms leaves some 50 tokens beside these decodes.
    assert true_time(decodes.with_chunk(chunk, 256)) == pytest.approx(0.100, rel=0.03)
    assert planner.limited == 1  # the SLO, not the budget, cut this iteration's prefill
    planner.account(decodes)
    assert planner.chunk(decodes, cached=256, wanted=10) == 10 and planner.limited == 1


def test_the_margin_scales_the_target():
    planner = planner_for(100)
    decodes = BatchShape().with_decode(512)
    full = planner.chunk(decodes, cached=0, wanted=2000)
    planner.config.slo_margin = 0.5
    assert planner.target == pytest.approx(0.050)
    assert planner.chunk(decodes, cached=0, wanted=2000) < full


def test_the_planner_never_extrapolates_past_what_it_has_seen():
    planner = planner_for(10_000)  # so loose that only the cap binds
    one_decode = BatchShape().with_decode(10)
    assert planner.chunk(one_decode, cached=0, wanted=4000) == int(1.25 * planner.model.largest_prefill)
    assert planner.chunk(one_decode, cached=0, wanted=100) == 100


def test_when_the_decodes_alone_miss_the_slo_prefill_gets_the_minimum_chunk_and_it_is_counted():
    planner = planner_for(30, min_chunk=24)
    decodes = BatchShape()
    for _ in range(32):
        decodes = decodes.with_decode(2000)
    assert not planner.fits(decodes)
    planner.account(decodes)
    assert planner.infeasible == 1
    assert planner.chunk(decodes, cached=0, wanted=500) == 24
    assert planner.chunk(decodes, cached=0, wanted=10) == 10  # never more than the prompt has
    second = decodes.with_chunk(24, 0)
    assert planner.chunk(second, cached=0, wanted=500) == 0  # only the iteration's first chunk is owed it


def test_without_decodes_the_budget_sizes_the_prefill():
    planner = planner_for(30)  # far less than a 500-token chunk takes
    assert planner.chunk(BatchShape(), cached=0, wanted=500) == 500  # no decode, no token gap to protect
    assert planner.chunk(BatchShape().with_decode(100), cached=0, wanted=500) < 500
    assert planner.limited == 1


def test_without_an_slo_or_enough_samples_the_budget_decides():
    assert planner_for(None).chunk(BatchShape(), cached=0, wanted=333) == 333
    cold = SloPlanner(SchedulerConfig(policy="sarathi", tbt_slo_ms=50))
    assert not cold.active and cold.chunk(BatchShape(), cached=0, wanted=333) == 333


def test_shape_of_a_scheduled_batch():
    s = make_scheduler(SchedulerConfig(policy="sarathi", token_budget=64, max_model_len=4096),
                       BlockManager(1000, block_size=16, watermark=0.0))
    decoding(s, ["a", "b"], prompt_len=8)
    s.add(seq("long", 100))
    shape = shape_of(s.schedule().chunks)
    assert (shape.decodes, shape.decode_context, shape.prefills, shape.prefill_tokens) == (2, 18, 1, 62)
    assert shape.prefill_attention == 62 * (0 + 63 / 2)


def test_the_sarathi_scheduler_plans_chunks_within_the_slo_and_exactly_as_before_without_one():
    config = SchedulerConfig(policy="sarathi", token_budget=512, max_model_len=4096)
    planner = SloPlanner(config, fitted(0.0))
    s = make_scheduler(config, BlockManager(1000, block_size=16, watermark=0.0), planner)
    decoding(s, ["a", "b", "c", "d"], prompt_len=120)  # in one iteration, without an SLO
    config.tbt_slo_ms = 80
    long = seq("long", 1500)
    s.add(long)
    chunks = []
    while not long.output_token_ids:
        plan = s.schedule()
        assert true_time(shape_of(plan.chunks)) <= 0.080 * 1.02
        chunks += [n for name, n in plan_of(plan) if name == "long"]
        run(plan)
    assert sum(chunks) == 1500 and max(chunks) < 512  # the SLO, not the budget, bound every chunk
    config.tbt_slo_ms = None  # live: the budget alone again, all but the five decodes' tokens
    s.add(seq("next", 900))
    assert plan_of(s.schedule())[-1] == ("next", 512 - 5)


def test_hours_of_one_shape_neither_blow_up_the_fit_nor_forget_the_others():
    model = fitted(0.05)
    mixed = BatchShape().with_decode(500).with_chunk(256, 0)
    before = model.predict(mixed)
    decodes = BatchShape().with_decode(500).with_decode(700)
    for _ in range(50_000):  # decode-only iterations, half an hour of them
        model.observe(decodes, true_time(decodes))
    assert np.isfinite(model.covariance).all() and np.trace(model.covariance) <= 1e4 * len(FEATURES) * 1.0001
    assert model.predict(decodes) == pytest.approx(true_time(decodes), rel=0.01)
    assert model.predict(mixed) == pytest.approx(before, rel=0.25)
