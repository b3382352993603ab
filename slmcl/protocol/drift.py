"""Drift rows and their one aggregation: pure Python, shared by every mode.

Drift is measured where the model is resident (the embedded ``Engine``, or an evaluator
replica that holds the base model), as per-row statistics of a checkpoint's last-position
distribution on the reference set: KL to the base p_0, entropy, top-2 log-prob margin.
Whoever records a stage only aggregates them, with :func:`summarize_drift`, so an embedded
run and a service run give the same numbers from the same rows, and the monitor needs no
torch (nor a model) to do it.

The summaries are those of ``torch.quantile`` (linear interpolation) and of a float64 mean;
sums here are exact (``math.fsum``), which agrees with torch's float64 reduction to ~1e-16
relative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slmcl.protocol.tables import STAT_NAMES

QUANTILES = {"p10": 0.10, "p95": 0.95}  # with "mean": results.SUMMARIES, in that order


@dataclass(frozen=True)
class DriftRows:
    """Per-row drift of one checkpoint on one reference set, in reference-row order.

    For the base itself ``kl_to_base`` is all zeros: its rows are also what a checkpoint's
    entropy and margin deltas are measured against.
    """

    kl_to_base: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        lengths = {name: len(getattr(self, name)) for name in STAT_NAMES}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"drift rows: every statistic needs one value per reference row, got {lengths}")

    @property
    def num_rows(self) -> int:
        return len(self.kl_to_base)

    def column(self, name: str) -> list[float]:
        return list(getattr(self, name))


def mean(values: Sequence[float]) -> float:
    """Float64 mean (exact sum); NaN for no values, as ``torch.mean`` of an empty tensor."""
    if not values:
        return math.nan
    return math.fsum(values) / len(values)


def quantile(values: Sequence[float], q: float) -> float:
    """``torch.quantile(values, q)`` with its default linear interpolation, bit for bit on float64.

    torch ranks at ``q * (n - 1)`` and interpolates with its ``lerp``, which computes from
    the nearer end point: ``end + (w - 1) * (end - start)`` when ``w >= 0.5``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: q must be in [0, 1], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    if any(math.isnan(v) for v in ordered):
        return math.nan  # torch.quantile propagates NaN
    rank = q * (len(ordered) - 1)
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    w = rank - below
    start, end = ordered[below], ordered[above]
    if w >= 0.5:
        return (w - 1.0) * (end - start) + end
    return w * (end - start) + start


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean / p10 / p95 of one statistic over the reference rows."""
    return {"mean": mean(values), **{name: quantile(values, q) for name, q in QUANTILES.items()}}


def summarize_drift(rows: DriftRows, base: DriftRows | None) -> dict[str, Any]:
    """A stage's stability record: every statistic summarized, and the deltas to the base.

    ``base`` is the base model's own rows on the same reference set (None when ``rows`` are
    the base's: deltas are then 0). Keys: ``num_reference_examples``, ``<stat>_<summary>``
    for each of STAT_NAMES x SUMMARIES, ``entropy_delta_mean``, ``margin_delta_mean``, their ``_p95``
    counterparts and, with a base, ``base_entropy_*`` / ``base_margin_*``.
    """
    if base is not None and base.num_rows != rows.num_rows:
        raise ValueError(f"drift rows: {rows.num_rows} checkpoint rows but {base.num_rows} base rows "
                         "(not the same reference set)")
    out: dict[str, Any] = {"num_reference_examples": rows.num_rows}
    for name in STAT_NAMES:
        for key, value in summarize(rows.column(name)).items():
            out[f"{name}_{key}"] = value
    if base is None:
        out["entropy_delta_mean"] = 0.0
        out["margin_delta_mean"] = 0.0
        out["entropy_delta_p95"] = out["margin_delta_p95"] = 0.0
        return out
    out["entropy_delta_mean"] = out["entropy_mean"] - mean(base.entropy)
    out["margin_delta_mean"] = out["margin_mean"] - mean(base.margin)
    for name in ("entropy", "margin"):
        for key, value in summarize(base.column(name)).items():
            out[f"base_{name}_{key}"] = value
    # The tail moves too (the study reports p95s): the p95 of the checkpoint's rows minus the base's p95.
    for name in ("entropy", "margin"):
        out[f"{name}_delta_p95"] = out[f"{name}_p95"] - out[f"base_{name}_p95"]
    return out


__all__ = ["DriftRows", "mean", "quantile", "summarize", "summarize_drift"]
