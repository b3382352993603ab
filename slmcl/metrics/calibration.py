"""Estimating a checkpoint's average accuracy from its KL to base, between full evaluations.

KL to the base model (``kl_to_base_mean``) is cheap: one forward pass over a fixed reference set.
A full evaluation over every task is not. If KL predicts accuracy (the study's Figure 1, checked
by ``correlation``), the checkpoints that were fully evaluated calibrate a line
``avg_acc = a + b * kl`` and the others get an *estimated* accuracy with an honest interval.

Why ordinary least squares on KL alone: a run has few evaluated checkpoints, so anything with
more parameters than a line would fit the noise; ``leave_one_out`` measures how wrong the line is
on the run's own evaluations, and that error, not the fit, is what a reader should trust.

Why a *prediction* interval and not a confidence interval of the mean: we predict the accuracy
of one checkpoint, which scatters around the line by the residual noise, not the mean accuracy
of all checkpoints at that KL. The confidence interval ignores that scatter and would be far too
narrow (its coverage of a new checkpoint shrinks towards 0 as points are added).

Pure stdlib: the Student-t quantile is computed here (regularized incomplete beta by a continued
fraction, then bisection on the CDF), so that the monitor and the CLI need no scipy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from slmcl.errors import DataError
from slmcl.metrics.correlation import Point, clean_points

_CF_EPS = 1e-15
_CF_TINY = 1e-300
_CF_MAX_ITER = 10_000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, by the modified Lentz method.

    Lentz's method evaluates the fraction front to back with no fixed depth, stopping when the
    factor of the last step is 1 to within rounding, and the TINY guard keeps a zero partial
    denominator from dividing by zero. It converges fast for x < (a + 1) / (a + b + 2), which
    the caller ensures by symmetry; the iteration count grows like sqrt(max(a, b)), hence the
    generous cap for large degrees of freedom.
    """
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = _CF_TINY if abs(d) < _CF_TINY else d
    d = 1.0 / d
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        # Even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)).
        aa = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2))
        d = 1.0 + aa * d
        d = _CF_TINY if abs(d) < _CF_TINY else d
        c = 1.0 + aa / c
        c = _CF_TINY if abs(c) < _CF_TINY else c
        d = 1.0 / d
        h *= d * c
        # Odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))
        d = 1.0 + aa * d
        d = _CF_TINY if abs(d) < _CF_TINY else d
        c = 1.0 + aa / c
        c = _CF_TINY if abs(c) < _CF_TINY else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x, for a, b > 0 and 0 <= x <= 1.

    Uses the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) to always evaluate the continued fraction on
    the side where it converges quickly; the prefactor is taken through logs so that large a or
    b (many degrees of freedom) do not overflow the gamma functions.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"beta parameters must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom.

    The two-sided tail P(|T| > |t|) is I_{df/(df+t²)}(df/2, 1/2); halving it and using symmetry
    gives the one-sided CDF without any series in t.
    """
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if t == 0.0:
        return 0.5
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p for Student's t with ``df`` degrees of freedom.

    Bisection on ``t_cdf``: the CDF is monotone, so bisection cannot miss or oscillate, and ~60
    halvings reach float precision; speed does not matter for the few calls a report makes
    (and the result is cached, since ``leave_one_out`` asks for the same (p, df) repeatedly).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    while high - low > 1e-13 * high:
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def _clip_unit(value: float) -> float:
    return min(1.0, max(0.0, value))


@dataclass(frozen=True)
class Estimate:
    """An estimated average accuracy, with its prediction interval when one can be sized.

    ``low``/``high`` are None when the data leave no residual to size an interval (one point,
    two points, or every point at the same KL); ``method`` says which case produced the number,
    so a reader can tell a fit from a bare mean.
    """

    value: float
    low: float | None
    high: float | None
    points: int
    method: str

    def as_dict(self) -> dict[str, float | int | str | bool | None]:
        """The estimate for a report row, always flagged ``"estimated": True``.

        The flag is unconditional so that no consumer can mistake an estimate for a measured
        accuracy when it is written beside full evaluations in the same table.
        """
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "points": self.points,
            "method": self.method,
            "estimated": True,
        }


@dataclass(frozen=True)
class Calibration:
    """An OLS line ``avg_acc = intercept + slope * kl`` with what its prediction interval needs.

    ``residual_std`` is s = sqrt(SSE / (n - 2)), None when it cannot be computed (n <= 2, or
    every point at one KL so there is no line); ``sxx`` is the sum of squared KL deviations from
    ``x_mean``. In the degenerate cases ``slope`` is 0 and ``intercept`` the mean accuracy.
    """

    intercept: float
    slope: float
    residual_std: float | None
    n: int
    x_mean: float
    sxx: float
    x_name: str = "KL to base"  # what x is, for the method text (tables fit on log(1 + KL): see there)

    def predict(self, x: float, level: float = 0.95) -> Estimate:
        """The estimated average accuracy at KL ``x``, with a ``level`` prediction interval.

        Interval: ŷ ± t_{n-2, (1+level)/2} · s · sqrt(1 + 1/n + (x - x̄)² / Sxx). The ``1 +``
        term is the new checkpoint's own scatter around the line (what makes it a prediction
        interval); the last term widens it away from the evaluated KLs, so extrapolating past
        the run's range is visibly less certain. Value and bounds are clipped into [0, 1]
        because they are accuracies; clipping drops only impossible values, so it costs no coverage.
        """
        if not math.isfinite(x):
            raise ValueError(f"KL to base must be a finite number, got {x}")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
        value = _clip_unit(self.intercept + self.slope * x)
        if self.n == 1:
            return Estimate(value, None, None, 1, "mean of 1 point")
        if self.sxx == 0.0:
            return Estimate(
                value,
                None,
                None,
                self.n,
                f"mean of {self.n} points (all at the same {self.x_name}: no slope to fit, no interval)",
            )
        if self.residual_std is None:
            return Estimate(
                value,
                None,
                None,
                self.n,
                f"line through {self.n} points (no residual left to size an interval)",
            )
        fitted = self.intercept + self.slope * x
        t = t_quantile((1.0 + level) / 2.0, self.n - 2)
        half = t * self.residual_std * math.sqrt(1.0 + 1.0 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        return Estimate(
            value,
            _clip_unit(fitted - half),
            _clip_unit(fitted + half),
            self.n,
            f"linear fit of avg accuracy on {self.x_name} ({self.n} points), {level * 100:g}% prediction interval",
        )


def fit_calibration(points: Sequence[Point], x_name: str = "KL to base") -> Calibration:
    """Fit avg accuracy on KL to base by OLS over ``(kl, avg_acc)`` points.

    Points with a missing or non-finite coordinate are dropped (they are checkpoints whose KL or
    evaluation failed, not evidence). Raises ``DataError`` (a ``ValueError``) when none remain,
    since there is then nothing to estimate from and a silent 0 would pass for an accuracy.
    """
    kept = clean_points(points)
    n = len(kept)
    if n == 0:
        raise DataError(
            "cannot calibrate accuracy on KL to base: no (kl, avg_acc) point with both values present and finite"
        )
    xs = [x for x, _ in kept]
    ys = [y for _, y in kept]
    x_mean = math.fsum(xs) / n
    y_mean = math.fsum(ys) / n
    # Exact test, as in correlation: the float mean of equal values need not equal them.
    if len(set(xs)) == 1:
        return Calibration(intercept=y_mean, slope=0.0, residual_std=None, n=n, x_mean=xs[0], sxx=0.0,
                           x_name=x_name)
    dx = [x - x_mean for x in xs]
    sxx = math.fsum(d * d for d in dx)
    sxy = math.fsum(d * (y - y_mean) for d, y in zip(dx, ys))
    slope = sxy / sxx
    intercept = y_mean - slope * x_mean
    residual_std: float | None = None
    if n > 2:
        sse = math.fsum(((y - y_mean) - slope * d) ** 2 for d, y in zip(dx, ys))
        residual_std = math.sqrt(sse / (n - 2))
    return Calibration(intercept=intercept, slope=slope, residual_std=residual_std, n=n, x_mean=x_mean, sxx=sxx,
                       x_name=x_name)


def leave_one_out(points: Sequence[Point], level: float = 0.95) -> dict[str, object]:
    """How far the KL-based estimate lands from full evaluations, each point predicted unseen.

    For every point, fit on the others and predict it: this is the error a reader should expect
    when a checkpoint is estimated instead of evaluated, which an in-sample residual understates.
    ``coverage`` is the share of predictions with an interval whose interval holds the actual
    value (None when none has one); it should be near ``level`` if the interval is honest.
    Needs at least 3 usable points (each fit then has 2); below that every statistic is None.
    """
    kept = clean_points(points)
    n = len(kept)
    result: dict[str, object] = {
        "points": n,
        "mae": None,
        "max_abs_error": None,
        "rmse": None,
        "coverage": None,
        "errors": [],
    }
    if n < 3:
        return result
    errors: list[dict[str, float | None]] = []
    abs_errors: list[float] = []
    inside: list[bool] = []
    for i, (x, y) in enumerate(kept):
        others = kept[:i] + kept[i + 1 :]
        estimate = fit_calibration(others).predict(x, level)
        abs_errors.append(abs(estimate.value - y))
        if estimate.low is not None and estimate.high is not None:
            inside.append(estimate.low <= y <= estimate.high)
        errors.append({"kl": x, "actual": y, "estimate": estimate.value, "low": estimate.low, "high": estimate.high})
    result["mae"] = math.fsum(abs_errors) / n
    result["max_abs_error"] = max(abs_errors)
    result["rmse"] = math.sqrt(math.fsum(e * e for e in abs_errors) / n)
    result["coverage"] = sum(inside) / len(inside) if inside else None
    result["errors"] = errors
    return result
