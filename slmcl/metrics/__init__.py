"""Continual-learning metrics over the accuracy matrix, per checkpoint and across seeds.

One job per module: ``cl`` the metrics of one run (and ``METRICS``, their one declaration),
``seeds`` mean ± std over seeds, ``scores_io`` reading a scores CSV, ``scores`` from score rows
to grouped metrics, ``render`` text tables, ``correlation`` Pearson/Spearman over checkpoints,
``calibration`` accuracy estimated from KL to base. This package re-exports the public names, so
``from slmcl import metrics as mx`` is all a caller needs.

Pure stdlib (no torch, no pandas) so that the CLI and the monitor can recompute metrics from a
results CSV on any machine.
"""

from __future__ import annotations

from slmcl.metrics.calibration import Calibration, Estimate, fit_calibration, leave_one_out
from slmcl.metrics.cl import (
    BASE_CHECKPOINT,
    HIGHER_IS_BETTER,
    LABELS,
    METRIC_NAMES,
    METRICS,
    Matrix,
    Metric,
    StepMetrics,
    run_fwt,
    step_metrics,
)
from slmcl.metrics.correlation import MIN_POINTS, correlation_report, pearson, spearman
from slmcl.metrics.render import format_matrix, format_metrics_table
from slmcl.metrics.scores import infer_task_order, matrices_by_seed, metrics_for_scores, order_from_column
from slmcl.metrics.scores_io import (
    GROUP_COLUMNS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    ScoreRow,
    ScoreRows,
    read_scores_csv,
)
from slmcl.metrics.seeds import AggregateStepMetrics, aggregate_seeds, mean_matrix

__all__ = [
    "BASE_CHECKPOINT",
    "GROUP_COLUMNS",
    "HIGHER_IS_BETTER",
    "MIN_POINTS",
    "LABELS",
    "METRICS",
    "METRIC_NAMES",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "AggregateStepMetrics",
    "Calibration",
    "Estimate",
    "Matrix",
    "Metric",
    "ScoreRow",
    "ScoreRows",
    "StepMetrics",
    "aggregate_seeds",
    "correlation_report",
    "fit_calibration",
    "format_matrix",
    "format_metrics_table",
    "infer_task_order",
    "leave_one_out",
    "matrices_by_seed",
    "mean_matrix",
    "metrics_for_scores",
    "order_from_column",
    "pearson",
    "read_scores_csv",
    "run_fwt",
    "spearman",
    "step_metrics",
]
