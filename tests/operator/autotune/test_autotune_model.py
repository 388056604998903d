"""The TBT(budget) model: the fitted slope and the budget it expects to reach a target."""

import pytest

from sarathi_operator.autotune.model import Point, budget_for, fitted_slope


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


def test_far_observations_are_left_out_of_the_fit():
    # A convex curve: the secant from 4096 is much steeper than the slope near 1024.
    def curve(b):
        return 0.01 + 1e-8 * b * b

    far = Point(4096, curve(4096), 0)
    near = [Point(1024, curve(1024), 1), Point(768, curve(768), 2)]
    estimate = budget_for(curve(1024) * 1.1, near[-1], [far, *near])
    local = (curve(1024) - curve(768)) / 256
    assert estimate == pytest.approx(768 + (curve(1024) * 1.1 - curve(768)) / local)
