"""Power analysis of a leaderboard: Student t quantiles and the smallest detectable AP difference."""
from __future__ import annotations

import math

import pytest

from cvit_bench.reporting.power import (
    minimum_detectable_difference, pooled_std, separated_pairs, student_t_cdf, student_t_quantile,
)


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 4, 2.776445), (0.8, 4, 0.940965), (0.975, 1, 12.706205), (0.975, 10, 2.228139), (0.5, 7, 0.0), (0.025, 4, -2.776445),
])
def test_student_t_quantiles_match_the_tables(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-5)


def test_student_t_cdf_at_hand_values():
    assert student_t_cdf(2.0, 3) == pytest.approx(0.930337, abs=1e-6)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + arctan(1)/pi


def test_three_seeds_of_std_3_2_detect_9_7_points():
    """The figure issue 18 quoted for cvit-v1: (2.776 + 0.941) * 3.2 * sqrt(2/3)."""
    assert minimum_detectable_difference(3.2, 3) == pytest.approx((2.776445 + 0.940965) * 3.2 * math.sqrt(2 / 3), rel=1e-5)
    assert minimum_detectable_difference(3.2, 3) == pytest.approx(9.71, abs=0.01)
    with pytest.raises(ValueError):
        minimum_detectable_difference(1.0, 1)


def test_pooled_std_and_separated_pairs():
    assert pooled_std([3.0, 4.0, float("nan")]) == pytest.approx(math.sqrt(12.5))
    assert separated_pairs({"a": 10.0, "b": 14.0, "c": 25.0}, 5.0) == [("a", "c"), ("b", "c")]


def test_report_states_the_resolution_of_a_leaderboard():
    import pandas as pd

    from cvit_bench.cli import resolution_line

    board = pd.DataFrame({"method": ["a", "b", "c"], "AP_mean": [10.0, 12.0, 30.0], "AP_std": [3.2, 3.2, 3.2], "n_seeds": [3, 3, 3]})
    assert resolution_line(board).startswith("resolution: with 3 seeds an AP difference of 9.7 points")
    assert "2 of 3 method pairs" in resolution_line(board)
    assert "fewer than two seeds" in resolution_line(board.assign(n_seeds=1))
