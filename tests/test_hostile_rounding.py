"""NEWS2 rounding ties (issue 13, item 8): window means are exact, so chart rounding follows the exact
mean of the readings as sent, whatever order they are summed in."""

import decimal

import numpy as np

from transforms.news2 import round_to_chart
from transforms.vital_stats import exact_means

TENTH = decimal.Decimal("0.1")


def _mean(readings):
    vitals = np.array(readings, dtype=float)[:, None]
    return float(exact_means(vitals, np.array([0]), np.array([len(readings)]), np.array([[len(readings)]]))[0, 0])


def test_the_issue_tie_rounds_up_as_the_documented_rule_says():
    readings = [37.98, 37.98, 38.19]
    # A float sum depends on its order: numpy's reduceat, or 37.98 + 38.19 + 37.98, give 38.04999...,
    # which would chart as 38.0 (score 0).
    assert (readings[0] + readings[2] + readings[1]) / 3 < 38.05
    assert _mean(readings) == 38.05
    assert round_to_chart(_mean(readings), TENTH) == decimal.Decimal("38.1")  # NEWS2 temperature 38.1: score 1


def test_exact_means_do_not_depend_on_order_and_match_decimal_arithmetic():
    rng = np.random.default_rng(5)
    for _ in range(200):
        readings = np.round(rng.uniform(34, 42, rng.integers(1, 40)), 2).tolist()
        exact = sum(decimal.Decimal(repr(r)) for r in readings) / len(readings)
        expected = exact.quantize(TENTH, rounding=decimal.ROUND_HALF_UP)
        assert round_to_chart(_mean(readings), TENTH) == expected
        assert _mean(readings[::-1]) == _mean(readings)


def test_absent_readings_are_left_out_of_the_mean():
    vitals = np.array([[37.98, np.nan], [37.98, 80.0], [38.19, np.nan]])
    count = np.array([[3, 1]])
    means = exact_means(vitals, np.array([0]), np.array([3]), count)
    assert means.tolist() == [[38.05, 80.0]]
