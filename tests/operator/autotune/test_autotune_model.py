"""The TBT(budget) model: the fitted slope and the budget it expects to reach a target."""

import pytest

from sarathi_operator.autotune.model import Point, budget_for, fitted_slope, on_the_curve


def line(budgets, a=0.02, b=0.0002):
    return [Point(x, a + b * x, t) for t, x in enumerate(budgets)]


def test_the_slope_of_a_line_is_found():
    assert fitted_slope(line([256, 512, 384])) == pytest.approx(0.0002)


def test_no_slope_from_one_budget_close_budgets_or_a_falling_fit():
    assert fitted_slope(line([512])) is None
    assert fitted_slope(line([512, 512])) is None
    assert fitted_slope(line([512, 576])) is None  # within 25%: noise, not slope
    assert fitted_slope([Point(256, 0.09, 0), Point(512, 0.08, 1)]) is None


def test_the_line_is_anchored_at_the_latest_observation():
    points = line([256, 512])
    latest = Point(512, 0.2, 2)  # the load grew: same slope, higher
    assert budget_for(0.1, latest, points) == pytest.approx(512 - 0.1 / 0.0002)


def test_without_a_slope_tbt_is_taken_as_proportional_to_the_budget():
    latest = Point(400, 0.2, 0)
    assert budget_for(0.1, latest, [latest]) == pytest.approx(200)
    assert budget_for(0.3, latest, [latest]) == pytest.approx(600)


def test_a_fit_under_a_quarter_of_proportional_is_taken_as_no_slope():
    # Benchmark run 13: 1412 ms at 256, 1411 at 160. The fit's 0.01 ms per token would put 0.9 s
    # at budget -48000; proportional puts it at 102.
    latest = Point(160, 1.411, 1)
    assert budget_for(0.9, latest, [Point(256, 1.412, 0), latest]) == pytest.approx(160 * 0.9 / 1.411)
    # 0.6 of proportional is a slope: 0.2 + 0.0003 x (budget - 400) = 0.18 at 333.
    steeper = Point(400, 0.2, 1)
    assert budget_for(0.18, steeper, [Point(500, 0.23, 0), steeper]) == pytest.approx(400 - 0.02 / 0.0003)


def test_far_observations_are_left_out_of_the_fit():
    # A convex curve: the secant from 4096 is much steeper than the slope near 1024.
    def curve(b):
        return 0.01 + 1e-8 * b * b

    far = Point(4096, curve(4096), 0)
    near = [Point(1024, curve(1024), 1), Point(768, curve(768), 2)]
    estimate = budget_for(curve(1024) * 1.1, near[-1], [far, *near])
    local = (curve(1024) - curve(768)) / 256
    assert estimate == pytest.approx(768 + (curve(1024) * 1.1 - curve(768)) / local)


def test_an_observation_far_off_the_others_starts_a_new_curve():
    chat = line([192, 416, 224])  # the most recent near 224 predicts 0.0648 there
    within = Point(224, 0.12, 9)
    assert on_the_curve(within, chat) == [*chat, within]
    long_prompts = Point(224, 0.14, 9)  # over twice the prediction: the traffic changed
    assert on_the_curve(long_prompts, chat) == [long_prompts]
    assert on_the_curve(Point(224, 0.03, 9), chat) == [Point(224, 0.03, 9)]
    assert on_the_curve(Point(2048, 1.0, 9), chat) == [*chat, Point(2048, 1.0, 9)]  # nothing near to compare
    # Then the shrink scales the new observation alone, not a slope it does not lie on.
    assert budget_for(0.09, long_prompts, [*chat, long_prompts]) == pytest.approx(224 * 0.09 / 0.14)
