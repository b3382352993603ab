"""Across seeds: each metric's (and each matrix cell's) mean ± sample std over the runs of an order.

Metrics are computed per seed first and averaged after (the study's convention), never from
an averaged matrix, so a seed missing a cell cannot shift the others' numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from slmcl.metrics.cl import METRIC_NAMES, Matrix, StepMetrics


@dataclass(frozen=True)
class AggregateStepMetrics:
    """One checkpoint's metrics summarized over seeds: mean and sample std per metric.

    Each statistic uses only the seeds where the metric is defined; a std needs two of them.
    """

    step: int
    checkpoint_task: str
    n_seeds: int
    mean: dict[str, float | None]
    std: dict[str, float | None]

    def as_dict(self, include_std: bool = True) -> dict[str, int | str | float | None]:
        """A flat row (``op``, ``op_std``, ...) ready for a CSV writer or a JSON report."""
        flat: dict[str, int | str | float | None] = {
            "step": self.step,
            "checkpoint_task": self.checkpoint_task,
        }
        for name in METRIC_NAMES:
            flat[name] = self.mean.get(name)
            if include_std:
                flat[f"{name}_std"] = self.std.get(name)
        return flat


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) >= 2 else None
    return mean, std


def aggregate_seeds(per_seed: Sequence[Sequence[StepMetrics]]) -> list[AggregateStepMetrics]:
    """Mean ± sample std of every metric over seeds, step by step (metrics first, then seeds)."""
    by_step: dict[int, list[StepMetrics]] = {}
    for seed_rows in per_seed:
        for row in seed_rows:
            by_step.setdefault(row.step, []).append(row)
    aggregates: list[AggregateStepMetrics] = []
    for step in sorted(by_step):
        rows = by_step[step]
        names = {row.checkpoint_task for row in rows}
        if len(names) > 1:
            raise ValueError(
                f"step {step} is a different checkpoint in different seeds: {', '.join(sorted(names))}"
            )
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        for name in METRIC_NAMES:
            defined = [value for row in rows if (value := row.metric(name)) is not None]
            mean[name], std[name] = mean_std(defined)
        aggregates.append(
            AggregateStepMetrics(
                step=step, checkpoint_task=rows[0].checkpoint_task, n_seeds=len(rows), mean=mean, std=std
            )
        )
    return aggregates


def mean_matrix(
    per_seed_matrices: Iterable[Matrix],
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float | None]]]:
    """Cell-wise mean and sample std of several seeds' matrices (pass ``matrices.values()``).

    A cell's statistics use the seeds that have it; its std is ``None`` below two seeds.
    """
    cells: dict[int, dict[str, list[float]]] = {}
    for matrix in per_seed_matrices:
        for step, row in matrix.items():
            for task, accuracy in row.items():
                cells.setdefault(step, {}).setdefault(task, []).append(accuracy)
    mean: dict[int, dict[str, float]] = {}
    std: dict[int, dict[str, float | None]] = {}
    for step in sorted(cells):
        mean[step], std[step] = {}, {}
        for task, values in cells[step].items():
            cell_mean, std[step][task] = mean_std(values)
            assert cell_mean is not None  # every list holds at least one value
            mean[step][task] = cell_mean
    return mean, std
