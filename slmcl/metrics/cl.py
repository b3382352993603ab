"""Continual-learning metrics of one run, pure math over its accuracy matrix.

``R[k][j]`` is the accuracy of checkpoint ``k`` (0 = the base model, ``k`` = after training on
the k-th task of the order) on task ``j``. A matrix here is ``{step: {task name: accuracy}}``
so that a missing cell is simply absent: an evaluation that did not run (or has not run yet)
must never read as an accuracy of 0, so every metric that needs a missing cell is ``None``.
Undefined metrics (BWT before two tasks were learned, FWT once no task is left) are ``None``
too, never a placeholder number.

``METRICS`` is the one list of the metrics: their names, which way is better, their column
labels and how each is computed. Everything else (seed aggregation, tables, the monitor's
regression checks) reads it from here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Matrix = Mapping[int, Mapping[str, float]]
BASE_CHECKPOINT = "base"


# --------------------------------------------------------------------------- matrix cells


def cell(matrix: Matrix, step: int, task: str) -> float | None:
    row = matrix.get(step)
    if row is None:
        return None
    return row.get(task)


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of values that must all be known: one unknown term makes the mean unknown."""
    known: list[float] = []
    for value in values:
        if value is None:
            return None
        known.append(value)
    return statistics.fmean(known) if known else None


def difference(a: float | None, b: float | None) -> float | None:
    """``a - b``, undefined (None) where either side is: a cell a run never measured stays missing."""
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------- the metrics


def _op(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    if k < 1:
        return None
    return _mean_or_none(cell(matrix, k, task) for task in order[:k])


def _bwt(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    if k < 2:
        return None
    return _mean_or_none(
        difference(cell(matrix, k, task), cell(matrix, j, task))
        for j, task in enumerate(order[: k - 1], start=1)
    )


def _forgetting(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    bwt = _bwt(matrix, order, k)
    # 0.0 - x rather than -x: a BWT of 0.0 must not print as a forgetting of -0.000.
    return None if bwt is None else 0.0 - bwt


def _fwt(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    # At k = 0 every term is R[0][j] - R[0][j]: 0.0 when the base row is there, None if not.
    if k >= len(order):
        return None
    return _mean_or_none(difference(cell(matrix, k, task), cell(matrix, 0, task)) for task in order[k:])


def run_fwt(matrix: Matrix, order: Sequence[str]) -> float | None:
    """One number of forward transfer for a whole run (Lopez-Paz & Ranzato's): for each task after the
    first, what the checkpoint just before it learned it knew beyond the base, ``R[j-1][j] - R[0][j]``,
    averaged. The per-step FWT_k is undefined at the last step; this is what a comparison of methods reads."""
    if len(order) < 2:
        return None
    return _mean_or_none(difference(cell(matrix, j - 1, task), cell(matrix, 0, task))
                         for j, task in enumerate(order[1:], start=2))


def _avg_all_tasks(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return _mean_or_none(cell(matrix, k, task) for task in order)


def _current(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return cell(matrix, k, order[k - 1]) if k >= 1 else None


def _delta_vs_base(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return difference(_current(matrix, order, k), cell(matrix, 0, order[k - 1])) if k >= 1 else None


def _adaptation_gain(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return difference(_current(matrix, order, k), cell(matrix, k - 1, order[k - 1])) if k >= 1 else None


def _learning_accuracy(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    # A running mean: at step k it uses only the diagonal seen so far, so a row never depends
    # on checkpoints trained after it. At k = K it equals the study's LA (which the study
    # printed, final value, on every row).
    if k < 1:
        return None
    return _mean_or_none(cell(matrix, j, order[j - 1]) for j in range(1, k + 1))


@dataclass(frozen=True)
class Metric:
    """One continual-learning metric: its name (a column, a JSON key), its direction, its label."""

    name: str
    higher_is_better: bool  # the monitor flags a drop in these, a rise in the others
    label: str  # the column header of text tables
    compute: Callable[[Matrix, Sequence[str], int], float | None]  # (matrix, order, step k) -> value


METRICS: tuple[Metric, ...] = (
    Metric("op", True, "OP", _op),
    Metric("bwt", True, "BWT", _bwt),
    Metric("forgetting", False, "Forgetting", _forgetting),
    Metric("fwt", True, "FWT", _fwt),
    Metric("avg_all_tasks", True, "Avg all", _avg_all_tasks),
    Metric("current_acc", True, "Current", _current),
    Metric("current_delta_vs_base", True, "Δ vs base", _delta_vs_base),
    Metric("adaptation_gain", True, "Adapt. gain", _adaptation_gain),
    Metric("learning_accuracy", True, "LA", _learning_accuracy),
)

METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
# Which way is a regression: the monitor flags a drop in these, a rise in forgetting.
HIGHER_IS_BETTER: dict[str, bool] = {m.name: m.higher_is_better for m in METRICS}
LABELS: dict[str, str] = {m.name: m.label for m in METRICS}


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True, repr=False)
class StepMetrics:
    """Every metric of one checkpoint of one run (one seed); ``None`` where undefined.

    The values are in ``METRIC_NAMES`` order and read as attributes (``row.op``), so adding
    a metric is adding one line to ``METRICS``.

    ``learning_accuracy`` is the running mean of the diagonal up to this step, so a row never
    depends on checkpoints trained after it; at the last step it is the study's LA. (The study
    printed that final LA on every row, which reads the future into early rows.)
    """

    step: int
    checkpoint_task: str
    values: tuple[float | None, ...] = (None,) * len(METRICS)

    def __post_init__(self) -> None:
        if len(self.values) != len(METRIC_NAMES):
            raise ValueError(f"StepMetrics.values: {len(self.values)} values for {len(METRIC_NAMES)} metrics")

    def __getattr__(self, name: str) -> float | None:
        # Only called for names that are not fields: the metric names.
        if name in METRIC_NAMES:
            values: tuple[float | None, ...] = object.__getattribute__(self, "values")
            return values[METRIC_NAMES.index(name)]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def metric(self, name: str) -> float | None:
        return self.values[METRIC_NAMES.index(name)]

    def __repr__(self) -> str:
        return f"StepMetrics({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def as_dict(self) -> dict[str, int | str | float | None]:
        flat: dict[str, Any] = {"step": self.step, "checkpoint_task": self.checkpoint_task}
        flat.update(zip(METRIC_NAMES, self.values))
        return flat


def repeated_names(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    repeated: set[str] = set()
    for name in names:
        (repeated if name in seen else seen).add(name)
    return sorted(repeated)


def _validate_order(task_order: Sequence[str]) -> None:
    if not task_order:
        raise ValueError("task order is empty: at least one task is needed")
    duplicates = repeated_names(task_order)
    if duplicates:
        raise ValueError(f"task order names a task twice: {', '.join(duplicates)}")


def step_metrics(matrix: Matrix, task_order: Sequence[str]) -> list[StepMetrics]:
    """Metrics of checkpoints 0..K, by the definitions of DESIGN.md §1.

    Every step gets a row even when the matrix has nothing for it yet, so a table of a run in
    progress keeps its shape and shows the gaps.
    """
    _validate_order(task_order)
    rows: list[StepMetrics] = []
    for k in range(len(task_order) + 1):
        checkpoint = BASE_CHECKPOINT if k == 0 else task_order[k - 1]
        values = tuple(m.compute(matrix, task_order, k) for m in METRICS)
        rows.append(StepMetrics(step=k, checkpoint_task=checkpoint, values=values))
    return rows
