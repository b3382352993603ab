"""Estimating average accuracy from KL to base: hand-worked fits, t quantiles, intervals, leave-one-out."""

from __future__ import annotations

import math
import random

import pytest

from slmcl.metrics.calibration import (
    Calibration,
    Estimate,
    fit_calibration,
    leave_one_out,
    regularized_incomplete_beta,
    t_cdf,
    t_quantile,
)


def _t2(p: float) -> float:
    # Closed form for 2 degrees of freedom: t = (2p - 1) / sqrt(2 p (1 - p)).
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


# ---------------------------------------------------------------- Student-t


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706), (2, 4.303), (5, 2.571), (30, 2.042), (1000, 1.962)],
)
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert round(t_quantile(0.975, df), 3) == expected


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_closed_forms_for_1_and_2_df(p: float) -> None:
    # df = 1 is the Cauchy distribution: t = tan(pi (p - 1/2)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx(_t2(p), rel=1e-9)


@pytest.mark.parametrize("df", [3, 7.5, 40, 5000])
def test_t_cdf_inverts_quantile_and_is_symmetric(df: float) -> None:
    for p in (0.1, 0.5, 0.8, 0.99):
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    assert t_cdf(-1.3, df) == pytest.approx(1 - t_cdf(1.3, df), abs=1e-14)
    # Heavier tails than the normal, converging to it as df grows.
    normal = 0.5 * (1 + math.erf(1.3 / math.sqrt(2)))
    assert t_cdf(1.3, df) < normal
    if df >= 5000:
        assert t_cdf(1.3, df) == pytest.approx(normal, abs=1e-4)


def test_incomplete_beta_known_values() -> None:
    # I_x(1, 1) = x (uniform);  I_x(a, 1) = x^a;  I_x(1, b) = 1 - (1 - x)^b;  I_x(a, a) at 1/2 is 1/2.
    assert regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, abs=1e-14)
    assert regularized_incomplete_beta(3, 1, 0.6) == pytest.approx(0.6**3, abs=1e-14)
    assert regularized_incomplete_beta(1, 4, 0.2) == pytest.approx(1 - 0.8**4, abs=1e-14)
    assert regularized_incomplete_beta(250, 250, 0.5) == pytest.approx(0.5, abs=1e-12)
    assert regularized_incomplete_beta(2, 3, 0.0) == 0.0 and regularized_incomplete_beta(2, 3, 1.0) == 1.0


def test_t_functions_reject_bad_arguments() -> None:
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)
    with pytest.raises(ValueError):
        t_cdf(1.0, -1)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(1, 1, 1.5)


# ---------------------------------------------------------------- the fit


def test_fit_three_points_by_hand() -> None:
    # (0, 0.9), (1, 0.8), (2, 0.4): x mean 1, y mean 0.7, Sxx = 1 + 0 + 1 = 2
    # Sxy = (-1)(0.2) + 0 + (1)(-0.3) = -0.5  ->  slope = -0.25, intercept = 0.7 + 0.25 = 0.95
    # residuals: 0.9 - 0.95 = -0.05;  0.8 - 0.70 = 0.10;  0.4 - 0.45 = -0.05
    # SSE = 0.0025 + 0.01 + 0.0025 = 0.015;  s = sqrt(0.015 / (3 - 2)) = 0.122474...
    cal = fit_calibration([(0.0, 0.9), (1.0, 0.8), (2.0, 0.4)])
    assert cal.slope == pytest.approx(-0.25, abs=1e-12)
    assert cal.intercept == pytest.approx(0.95, abs=1e-12)
    assert cal.residual_std == pytest.approx(math.sqrt(0.015), abs=1e-12)
    assert cal.n == 3
    assert cal.x_mean == pytest.approx(1.0)
    assert cal.sxx == pytest.approx(2.0)


def test_prediction_interval_four_points_by_hand() -> None:
    # (0, 0.9), (1, 0.8), (2, 0.4), (3, 0.3): x mean 1.5, y mean 0.6, Sxx = 2.25+0.25+0.25+2.25 = 5
    # Sxy = (-1.5)(0.3) + (-0.5)(0.2) + (0.5)(-0.2) + (1.5)(-0.3) = -1.1 -> slope -0.22, intercept 0.93
    # residuals -0.03, 0.09, -0.09, 0.03 -> SSE = 0.018, s = sqrt(0.018 / 2) = sqrt(0.009)
    # at x = 1.5: y_hat = 0.6, half = t_{2,0.975} * sqrt(0.009) * sqrt(1 + 1/4 + 0) = 0.456363...
    #   -> low = 0.143637..., high = 1.056... clipped to 1.0
    cal = fit_calibration([(0.0, 0.9), (1.0, 0.8), (2.0, 0.4), (3.0, 0.3)])
    assert cal.slope == pytest.approx(-0.22, abs=1e-12)
    assert cal.intercept == pytest.approx(0.93, abs=1e-12)
    half = _t2(0.975) * math.sqrt(0.009) * math.sqrt(1.25)
    est = cal.predict(1.5)
    assert est.value == pytest.approx(0.6, abs=1e-12)
    assert est.low == pytest.approx(0.6 - half, abs=1e-9)
    assert est.high == 1.0
    assert est.points == 4
    assert est.method.startswith("linear fit of avg accuracy on KL to base (4 points)")
    # A 50 % interval is narrower: t_{2,0.75} = _t2(0.75) = 0.8165, unclipped on both sides.
    narrow = cal.predict(1.5, level=0.5)
    half50 = _t2(0.75) * math.sqrt(0.009) * math.sqrt(1.25)
    assert narrow.low == pytest.approx(0.6 - half50, abs=1e-9)
    assert narrow.high == pytest.approx(0.6 + half50, abs=1e-9)


def _synthetic(n: int = 20, noise: float = 0.01) -> list[tuple[float, float]]:
    rng = random.Random(0)
    return [(0.1 * i, 0.8 - 0.3 * (0.1 * i) + rng.gauss(0.0, noise)) for i in range(n)]


def test_recovers_known_line_and_interval_covers_it() -> None:
    cal = fit_calibration(_synthetic())
    assert cal.slope == pytest.approx(-0.3, abs=0.02)
    assert cal.intercept == pytest.approx(0.8, abs=0.02)
    assert cal.residual_std is not None and 0.005 < cal.residual_std < 0.02
    for x in (0.35, 1.2, 2.5):  # inside the data, near its end, past it
        est = cal.predict(x)
        assert est.low is not None and est.high is not None
        assert est.low <= 0.8 - 0.3 * x <= est.high
        assert est.low <= est.value <= est.high


def test_interval_widens_away_from_mean_kl_symmetrically() -> None:
    cal = fit_calibration(_synthetic())

    def width(x: float) -> float:
        est = cal.predict(x)
        assert est.low is not None and est.high is not None
        return est.high - est.low

    centre = cal.x_mean
    assert width(centre) < width(centre + 0.5) < width(centre + 0.9) < width(centre + 1.2)  # 1.2: still unclipped
    assert width(centre - 0.9) == pytest.approx(width(centre + 0.9), rel=1e-9)
    # Even at the mean KL the interval keeps the new point's own scatter: about 2 s wide each side.
    assert cal.residual_std is not None
    assert width(centre) / 2 > 2.0 * cal.residual_std


def test_prediction_interval_covers_new_checkpoints_at_its_level() -> None:
    # Many runs of 5 evaluated checkpoints; each interval must hold a *new* checkpoint ~95 % of the
    # time. A confidence interval of the mean (no "1 +" term) would fall well short of that.
    rng = random.Random(0)
    xs = [0.0, 0.25, 0.5, 0.75, 1.0]
    trials, hits, mean_ci_hits = 2000, 0, 0
    for _ in range(trials):
        cal = fit_calibration([(x, 0.5 - 0.2 * x + rng.gauss(0.0, 0.03)) for x in xs])
        new_x = 0.6
        new_y = 0.5 - 0.2 * new_x + rng.gauss(0.0, 0.03)
        est = cal.predict(new_x)
        assert est.low is not None and est.high is not None and cal.residual_std is not None
        hits += est.low <= new_y <= est.high
        y_hat = cal.intercept + cal.slope * new_x
        ci_half = t_quantile(0.975, 3) * cal.residual_std * math.sqrt(1 / 5 + (new_x - cal.x_mean) ** 2 / cal.sxx)
        mean_ci_hits += abs(new_y - y_hat) <= ci_half
    assert 0.93 <= hits / trials <= 0.97
    assert mean_ci_hits / trials < 0.8


def test_one_point_gives_its_value_without_interval() -> None:
    est = fit_calibration([(0.2, 0.7), (None, 0.1)]).predict(5.0)
    assert est == Estimate(0.7, None, None, 1, "mean of 1 point")


def test_two_points_give_the_line_without_interval() -> None:
    est = fit_calibration([(0.0, 0.6), (1.0, 0.5)]).predict(2.0)
    assert est.value == pytest.approx(0.4, abs=1e-12)
    assert est.low is None and est.high is None and est.points == 2
    assert "2 points" in est.method and "no residual" in est.method


def test_points_at_one_kl_give_their_mean_without_interval() -> None:
    cal = fit_calibration([(0.3, 0.6), (0.3, 0.8), (0.3, 0.7)])
    est = cal.predict(0.9)
    assert est.value == pytest.approx(0.7, abs=1e-12)
    assert est.low is None and est.high is None and est.points == 3
    assert "same KL" in est.method
    assert cal.residual_std is None


def test_no_usable_point_raises() -> None:
    with pytest.raises(ValueError, match="no \\(kl, avg_acc\\) point"):
        fit_calibration([])
    with pytest.raises(ValueError, match="no \\(kl, avg_acc\\) point"):
        fit_calibration([(None, 0.5), (0.1, math.nan)])


def test_value_and_bounds_are_clipped_to_unit_interval() -> None:
    cal = Calibration(intercept=0.9, slope=-0.5, residual_std=0.05, n=10, x_mean=0.3, sxx=1.0)
    high_side = cal.predict(-1.0)  # line says 1.4
    assert high_side.value == 1.0 and high_side.high == 1.0
    assert high_side.low is not None and 0.0 <= high_side.low <= 1.0
    low_side = cal.predict(3.0)  # line says -0.6
    assert low_side.value == 0.0 and low_side.low == 0.0
    assert low_side.high is not None and 0.0 <= low_side.high <= 1.0
    inside = cal.predict(0.3)  # line says 0.75: untouched
    assert inside.value == pytest.approx(0.75, abs=1e-12)


def test_predict_rejects_bad_arguments() -> None:
    cal = fit_calibration(_synthetic())
    with pytest.raises(ValueError, match="level"):
        cal.predict(0.5, level=1.0)
    with pytest.raises(ValueError, match="finite"):
        cal.predict(math.nan)


def test_as_dict_is_always_labelled_estimated() -> None:
    assert fit_calibration([(0.2, 0.7)]).predict(0.2).as_dict() == {
        "value": 0.7,
        "low": None,
        "high": None,
        "points": 1,
        "method": "mean of 1 point",
        "estimated": True,
    }
    fitted = fit_calibration(_synthetic()).predict(0.5).as_dict()
    assert fitted["estimated"] is True and fitted["low"] is not None


# ---------------------------------------------------------------- leave-one-out


def test_leave_one_out_on_exact_line_has_no_error() -> None:
    points = [(0.1 * i, 0.8 - 0.3 * (0.1 * i)) for i in range(6)]
    report = leave_one_out(points)
    assert report["points"] == 6
    assert report["mae"] == pytest.approx(0.0, abs=1e-12)
    assert report["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert report["max_abs_error"] == pytest.approx(0.0, abs=1e-12)


def test_leave_one_out_three_points_by_hand() -> None:
    # (0, 0.6), (1, 0.5), (2, 0.2); each fit is the line through the other two (no interval):
    #   without x=0: slope (0.2-0.5)/1 = -0.3 -> 0.5 + 0.3 = 0.8   error |0.8 - 0.6| = 0.2
    #   without x=1: slope (0.2-0.6)/2 = -0.2 -> 0.6 - 0.2 = 0.4   error |0.4 - 0.5| = 0.1
    #   without x=2: slope (0.5-0.6)/1 = -0.1 -> 0.5 - 0.1 = 0.4   error |0.4 - 0.2| = 0.2
    # MAE = 0.5 / 3;  max = 0.2;  RMSE = sqrt((0.04 + 0.01 + 0.04) / 3) = sqrt(0.03)
    report = leave_one_out([(0.0, 0.6), (1.0, 0.5), (2.0, 0.2)])
    assert report["points"] == 3
    assert report["mae"] == pytest.approx(0.5 / 3, abs=1e-12)
    assert report["max_abs_error"] == pytest.approx(0.2, abs=1e-12)
    assert report["rmse"] == pytest.approx(math.sqrt(0.03), abs=1e-12)
    assert report["coverage"] is None  # no fit of 2 points has an interval
    errors = report["errors"]
    assert isinstance(errors, list) and len(errors) == 3
    assert [e["estimate"] for e in errors] == pytest.approx([0.8, 0.4, 0.4], abs=1e-12)
    assert errors[1] == {"kl": 1.0, "actual": 0.5, "estimate": pytest.approx(0.4), "low": None, "high": None}


def test_leave_one_out_on_noisy_line_reports_small_error_and_coverage() -> None:
    report = leave_one_out(_synthetic() + [(None, 0.5)])
    assert report["points"] == 20
    mae, rmse, worst, coverage = report["mae"], report["rmse"], report["max_abs_error"], report["coverage"]
    assert isinstance(mae, float) and isinstance(rmse, float) and isinstance(worst, float)
    assert 0.0 < mae <= rmse <= worst < 0.05
    assert isinstance(coverage, float) and 0.8 <= coverage <= 1.0


def test_leave_one_out_needs_three_points() -> None:
    report = leave_one_out([(0.0, 0.6), (1.0, 0.5), (math.nan, 0.4)])
    assert report == {
        "points": 2,
        "mae": None,
        "max_abs_error": None,
        "rmse": None,
        "coverage": None,
        "errors": [],
    }
