"""Correlation of KL to base with average accuracy: expected values are worked out by hand."""

from __future__ import annotations

import math

import pytest

from slmcl.metrics.correlation import MIN_POINTS, clean_points, correlation_report, pearson, ranks, spearman


def test_pearson_matches_hand_worked_value() -> None:
    # xs = 1,2,3,4 (mean 2.5), ys = 2,4,5,9 (mean 5)
    # dx = -1.5,-0.5,0.5,1.5   dy = -3,-1,0,4
    # Sxy = 4.5 + 0.5 + 0 + 6 = 11;  Sxx = 2.25+0.25+0.25+2.25 = 5;  Syy = 9+1+0+16 = 26
    # r = 11 / sqrt(5 * 26) = 11 / sqrt(130) = 0.964763...
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130), abs=1e-12)


def test_pearson_is_symmetric_and_sign_follows_direction() -> None:
    xs, ys = [0.1, 0.4, 0.2, 0.9], [0.8, 0.5, 0.7, 0.1]
    r = pearson(xs, ys)
    assert r is not None and r < 0
    assert pearson(ys, xs) == pytest.approx(r, abs=1e-15)
    assert pearson(xs, [-y for y in ys]) == pytest.approx(-r, abs=1e-15)


def test_ranks_average_ties() -> None:
    # Sorted: 10 -> rank 1; the three 20s span ranks 2,3,4 -> mean 3; 30 -> rank 5.
    assert ranks([10, 20, 20, 30, 20]) == [1.0, 3.0, 3.0, 5.0, 3.0]
    assert ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert ranks([7, 7]) == [1.5, 1.5]
    assert ranks([]) == []


def test_spearman_with_ties_matches_hand_worked_value() -> None:
    # xs = 1,2,2,3 -> ranks 1,2.5,2.5,4;  ys = 1,3,2,4 -> ranks 1,3,2,4; both rank means are 2.5
    # dx = -1.5,0,0,1.5   dy = -1.5,0.5,-0.5,1.5
    # Sxy = 2.25 + 0 + 0 + 2.25 = 4.5;  Sxx = 4.5;  Syy = 2.25+0.25+0.25+2.25 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(4.5 / 5) = sqrt(0.9) = 0.948683...
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)


def test_monotone_non_linear_relation_is_perfect_for_spearman_only() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    ys = [math.exp(x) for x in xs]
    r = pearson(xs, ys)
    assert spearman(xs, ys) == pytest.approx(1.0, abs=1e-15)
    assert r is not None and 0.8 < r < 0.99
    # Decreasing (the shape KL vs accuracy should have): rho is exactly -1.
    assert spearman(xs, [-y for y in ys]) == pytest.approx(-1.0, abs=1e-15)


def test_constant_series_and_too_few_points_are_undefined() -> None:
    # [0.1] * 3 has a float mean that is not exactly 0.1: a deviation-based test would not see "constant".
    assert pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) is None
    assert pearson([1.0, 2.0, 3.0], [0.7, 0.7, 0.7]) is None
    assert spearman([1.0, 2.0, 3.0], [0.7, 0.7, 0.7]) is None
    assert pearson([1.0], [2.0]) is None
    assert pearson([], []) is None
    assert spearman([], []) is None


def test_perfect_line_is_clamped_to_unit() -> None:
    xs = [0.1 * i for i in range(10)]
    r = pearson(xs, [0.8 - 0.3 * x for x in xs])
    assert r is not None and -1.0 <= r and r == pytest.approx(-1.0, abs=1e-12)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="length"):
        pearson([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_clean_points_drops_missing_and_non_finite() -> None:
    points = [(0.1, 0.9), (None, 0.5), (0.2, math.nan), (math.inf, 0.3), (0.3, 0.7)]
    assert clean_points(points) == [(0.1, 0.9), (0.3, 0.7)]


def test_report_warns_below_min_points_and_not_at_it() -> None:
    assert MIN_POINTS == 6
    five = [(0.1 * i, 0.9 - 0.1 * i) for i in range(5)]
    report = correlation_report(five)
    assert report["points"] == 5
    warning = report["warning"]
    assert isinstance(warning, str) and "5" in warning and "6" in warning and warning.endswith(".")
    assert report["pearson"] == pytest.approx(-1.0, abs=1e-12)

    six = [(0.1 * i, 0.9 - 0.1 * i) for i in range(6)]
    report = correlation_report(six)
    assert report["points"] == 6 and report["warning"] is None
    assert report["spearman"] == pytest.approx(-1.0, abs=1e-15)


def test_report_counts_only_kept_points() -> None:
    # Six rows, two unusable: the report describes four points and warns about four.
    points: list[tuple[float | None, float | None]] = [
        (1.0, 2.0),
        (2.0, 4.0),
        (None, 0.1),
        (3.0, 5.0),
        (4.0, 9.0),
        (math.nan, 0.3),
    ]
    report = correlation_report(points)
    assert report["points"] == 4
    assert report["pearson"] == pytest.approx(11 / math.sqrt(130), abs=1e-12)  # the hand-worked case above
    assert report["spearman"] == pytest.approx(1.0, abs=1e-15)
    warning = report["warning"]
    assert isinstance(warning, str) and "Only 4 usable points" in warning


def test_report_on_nothing_usable() -> None:
    report = correlation_report([(None, None), (math.nan, 0.5)])
    assert report["points"] == 0
    assert report["pearson"] is None and report["spearman"] is None
    assert isinstance(report["warning"], str)
