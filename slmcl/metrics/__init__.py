"""Continual-learning metrics over the accuracy matrix, per checkpoint and across seeds.

One job per module: ``cl`` the metrics of one run (and ``METRICS``, their one declaration),
``seeds`` mean ± std over seeds, ``scores_io`` reading a scores CSV, ``scores`` from score rows
to grouped metrics, ``render`` text tables. This package re-exports the public names, so
``from slmcl import metrics as mx`` is all a caller needs.

Pure stdlib (no torch, no pandas) so that the CLI and the monitor can recompute metrics from a
results CSV on any machine.
"""

from __future__ import annotations

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
from slmcl.metrics.render import format_matrix, format_metrics_table
from slmcl.metrics.scores import infer_task_order, matrices_by_seed, metrics_for_scores
from slmcl.metrics.scores_io import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, ScoreRow, read_scores_csv
from slmcl.metrics.seeds import AggregateStepMetrics, aggregate_seeds, mean_matrix

__all__ = [
    "BASE_CHECKPOINT",
    "HIGHER_IS_BETTER",
    "LABELS",
    "METRICS",
    "METRIC_NAMES",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "AggregateStepMetrics",
    "Matrix",
    "Metric",
    "ScoreRow",
    "StepMetrics",
    "aggregate_seeds",
    "format_matrix",
    "format_metrics_table",
    "infer_task_order",
    "matrices_by_seed",
    "mean_matrix",
    "metrics_for_scores",
    "read_scores_csv",
    "run_fwt",
    "step_metrics",
]
