"""How well KL to the base model tracks average accuracy over a run's checkpoints.

The study's Figure 1 claims that a checkpoint's KL divergence to the base model predicts its
average accuracy. ``correlation_report`` puts numbers on that claim for one run: Pearson's r
(is the relation linear, which is what ``calibration`` then assumes) and Spearman's rho (is it
at least monotone, whatever its shape). A continual-learning run has only a handful of
checkpoints, so the report says when there are too few points for either number to mean much.

Pure stdlib, and every sum is ``math.fsum``: with a few points whose deviations are tiny next to
their means, naive float sums can move the third decimal of a correlation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_POINTS = 6
"""Fewer points than this and the report warns.

With n = 6 a sample correlation must reach |r| ≈ 0.81 to be significant at 5 % (two-sided); with
fewer points even a strong-looking r is compatible with no relation at all (|r| ≈ 0.88 needed at
n = 5, 0.95 at n = 4), and one checkpoint can flip the sign.
"""

Point = tuple[float | None, float | None]
"""A ``(kl, avg_acc)`` pair as read from a run's records, where either side may be missing."""


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def clean_points(points: Sequence[Point]) -> list[tuple[float, float]]:
    """The points whose both coordinates are finite numbers, in their original order.

    A checkpoint whose KL or accuracy was not measured (None) or failed (NaN, or an infinite KL
    from a zero probability) says nothing about the relation, and one NaN would turn every sum
    into NaN; dropping it is the only honest choice, and callers report how many points remain.
    """
    kept: list[tuple[float, float]] = []
    for x, y in points:
        if x is not None and y is not None and _usable(x) and _usable(y):
            kept.append((float(x), float(y)))
    return kept


def _check_pair(xs: Sequence[float], ys: Sequence[float]) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length ({len(xs)} vs {len(ys)}): they must be paired")


def _is_constant(values: Sequence[float]) -> bool:
    # Exact comparison on purpose: the mean of [0.1, 0.1, 0.1] is not exactly 0.1 in floats, so a
    # deviation-based test would see a tiny spread and return a meaningless correlation.
    return len(set(values)) <= 1


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r of paired samples, or None where it is undefined.

    Undefined (None, not 0 and not NaN) with fewer than 2 points or when either series is
    constant: a constant series has no variance to correlate, and "no correlation" would be a
    claim the data cannot make. Callers drop missing values first (``clean_points``).
    """
    _check_pair(xs, ys)
    n = len(xs)
    if n < 2 or _is_constant(xs) or _is_constant(ys):
        return None
    x_mean = math.fsum(xs) / n
    y_mean = math.fsum(ys) / n
    dx = [x - x_mean for x in xs]
    dy = [y - y_mean for y in ys]
    sxy = math.fsum(a * b for a, b in zip(dx, dy))
    sxx = math.fsum(a * a for a in dx)
    syy = math.fsum(b * b for b in dy)
    r = sxy / math.sqrt(sxx * syy)
    # Rounding can push a perfect fit a hair past ±1, which would read as a bug downstream.
    return max(-1.0, min(1.0, r))


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks in the input's order; tied values share the mean of the ranks they span.

    Mean ranks for ties keep Spearman's rho symmetric and make it exactly Pearson's r of the
    ranks, so the two coefficients are computed by the same code.
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        # Positions start..end (0-based) hold ranks start+1..end+1; their mean is the midpoint.
        shared = (start + end) / 2 + 1
        for position in range(start, end + 1):
            result[order[position]] = shared
        start = end + 1
    return result


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks, None where that is undefined.

    Reported beside Pearson's r because KL may track accuracy monotonically but not linearly
    (e.g. accuracy falling off a cliff past some KL); rho near ±1 with a weaker r says "use a
    monotone, not a linear, calibration".
    """
    _check_pair(xs, ys)
    return pearson(ranks(xs), ranks(ys))


def correlation_report(points: Sequence[Point]) -> dict[str, int | float | str | None]:
    """Pearson and Spearman of ``(kl, avg_acc)`` points, with a warning when there are too few.

    Returns ``{"points": n, "pearson": r, "spearman": rho, "warning": text}``; ``points`` counts
    only the points kept after dropping missing or NaN coordinates, because that is the sample
    the coefficients describe. ``warning`` is None from ``MIN_POINTS`` points on.
    """
    kept = clean_points(points)
    n = len(kept)
    xs = [x for x, _ in kept]
    ys = [y for _, y in kept]
    warning: str | None = None
    if n < MIN_POINTS:
        noun = "point" if n == 1 else "points"
        warning = (
            f"Only {n} usable {noun}, fewer than {MIN_POINTS}: the correlation between KL to base "
            "and average accuracy is too uncertain here to support or refute the claim that KL predicts accuracy."
        )
    return {"points": n, "pearson": pearson(xs, ys), "spearman": spearman(xs, ys), "warning": warning}
