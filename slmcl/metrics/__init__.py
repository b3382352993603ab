"""Continual-learning metrics over the accuracy matrix, per checkpoint and across seeds.

``R[k][j]`` is the accuracy of checkpoint ``k`` (0 = the base model, ``k`` = after training on
the k-th task of the order) on task ``j``. A matrix here is ``{step: {task name: accuracy}}``
so that a missing cell is simply absent: an evaluation that did not run (or has not run yet)
must never read as an accuracy of 0, so every metric that needs a missing cell is ``None``.
Undefined metrics (BWT before two tasks were learned, FWT once no task is left) are ``None``
too, never a placeholder number.

The module is pure stdlib (no torch, no pandas) so that the CLI and the monitor can recompute
metrics from a results CSV on any machine.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from slmcl.errors import DataError

Matrix = Mapping[int, Mapping[str, float]]

METRIC_NAMES: tuple[str, ...] = (
    "op",
    "bwt",
    "forgetting",
    "fwt",
    "avg_all_tasks",
    "current_acc",
    "current_delta_vs_base",
    "adaptation_gain",
    "learning_accuracy",
)

# Which way is a regression: the monitor flags a drop in these, a rise in forgetting.
HIGHER_IS_BETTER: dict[str, bool] = {name: name != "forgetting" for name in METRIC_NAMES}

_HEADERS: dict[str, str] = {
    "op": "OP",
    "bwt": "BWT",
    "forgetting": "Forgetting",
    "fwt": "FWT",
    "avg_all_tasks": "Avg all",
    "current_acc": "Current",
    "current_delta_vs_base": "Δ vs base",
    "adaptation_gain": "Adapt. gain",
    "learning_accuracy": "LA",
}
_MISSING = "—"
BASE_CHECKPOINT = "base"


# --------------------------------------------------------------------------- per-step metrics


def _cell(matrix: Matrix, step: int, task: str) -> float | None:
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


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _op(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    if k < 1:
        return None
    return _mean_or_none(_cell(matrix, k, task) for task in order[:k])


def _bwt(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    if k < 2:
        return None
    return _mean_or_none(
        _diff(_cell(matrix, k, task), _cell(matrix, j, task))
        for j, task in enumerate(order[: k - 1], start=1)
    )


def _fwt(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    # At k = 0 every term is R[0][j] - R[0][j]: 0.0 when the base row is there, None if not.
    if k >= len(order):
        return None
    return _mean_or_none(_diff(_cell(matrix, k, task), _cell(matrix, 0, task)) for task in order[k:])


def _avg_all_tasks(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return _mean_or_none(_cell(matrix, k, task) for task in order)


def _current(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return _cell(matrix, k, order[k - 1]) if k >= 1 else None


def _delta_vs_base(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return _diff(_current(matrix, order, k), _cell(matrix, 0, order[k - 1])) if k >= 1 else None


def _adaptation_gain(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    return _diff(_current(matrix, order, k), _cell(matrix, k - 1, order[k - 1])) if k >= 1 else None


def _learning_accuracy(matrix: Matrix, order: Sequence[str], k: int) -> float | None:
    # A running mean: at step k it uses only the diagonal seen so far, so a row never depends
    # on checkpoints trained after it. At k = K it equals the study's LA (which the study
    # printed, final value, on every row).
    if k < 1:
        return None
    return _mean_or_none(_cell(matrix, j, order[j - 1]) for j in range(1, k + 1))


_METRIC_FUNCTIONS: dict[str, Callable[[Matrix, Sequence[str], int], float | None]] = {
    "op": _op,
    "bwt": _bwt,
    "fwt": _fwt,
    "avg_all_tasks": _avg_all_tasks,
    "current_acc": _current,
    "current_delta_vs_base": _delta_vs_base,
    "adaptation_gain": _adaptation_gain,
    "learning_accuracy": _learning_accuracy,
}


@dataclass(frozen=True)
class StepMetrics:
    """Every metric of one checkpoint of one run (one seed); ``None`` where undefined.

    ``learning_accuracy`` is the running mean of the diagonal up to this step, so a row never
    depends on checkpoints trained after it; at the last step it is the study's LA. (The study
    printed that final LA on every row, which reads the future into early rows.)
    """

    step: int
    checkpoint_task: str
    op: float | None = None
    bwt: float | None = None
    forgetting: float | None = None
    fwt: float | None = None
    avg_all_tasks: float | None = None
    current_acc: float | None = None
    current_delta_vs_base: float | None = None
    adaptation_gain: float | None = None
    learning_accuracy: float | None = None

    def as_dict(self) -> dict[str, int | str | float | None]:
        return asdict(self)


def _repeated(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    repeated: set[str] = set()
    for name in names:
        (repeated if name in seen else seen).add(name)
    return sorted(repeated)


def _validate_order(task_order: Sequence[str]) -> None:
    if not task_order:
        raise ValueError("task order is empty: at least one task is needed")
    duplicates = _repeated(task_order)
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
        values = {name: fn(matrix, task_order, k) for name, fn in _METRIC_FUNCTIONS.items()}
        bwt = values["bwt"]
        # 0.0 - x rather than -x: a BWT of 0.0 must not print as a forgetting of -0.000.
        values["forgetting"] = None if bwt is None else 0.0 - bwt
        checkpoint = BASE_CHECKPOINT if k == 0 else task_order[k - 1]
        rows.append(StepMetrics(step=k, checkpoint_task=checkpoint, **values))
    return rows


# --------------------------------------------------------------------------- across seeds


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


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
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
            defined = [value for row in rows if (value := getattr(row, name)) is not None]
            mean[name], std[name] = _mean_std(defined)
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
            cell_mean, std[step][task] = _mean_std(values)
            assert cell_mean is not None  # every list holds at least one value
            mean[step][task] = cell_mean
    return mean, std


# --------------------------------------------------------------------------- score files


@dataclass(frozen=True)
class ScoreRow:
    """One matrix cell of one run, as stored in a long-format scores CSV."""

    seed: int
    step: int
    checkpoint_task: str
    eval_task: str
    accuracy: float
    order: str = ""
    model: str = ""


REQUIRED_COLUMNS: tuple[str, ...] = ("seed", "step", "checkpoint_task", "eval_task", "accuracy")
OPTIONAL_COLUMNS: tuple[str, ...] = ("order", "model")


def _parse_int(value: str, column: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(f"{where}: {column} {value!r} is not an integer") from None


def _parse_accuracy(value: str, where: str) -> float:
    try:
        accuracy = float(value.strip())
    except ValueError:
        raise DataError(f"{where}: accuracy {value!r} is not a number") from None
    if not math.isfinite(accuracy):
        raise DataError(f"{where}: accuracy {value!r} is not a finite number")
    return accuracy


def _parse_name(value: str | None, column: str, where: str) -> str:
    name = (value or "").strip()
    if not name:
        raise DataError(f"{where}: {column} is empty")
    return name


def _parse_row(record: Mapping[str, str | None], where: str) -> ScoreRow:
    step = _parse_int(record["step"] or "", "step", where)
    if step < 0:
        raise DataError(f"{where}: step {step} is negative")
    return ScoreRow(
        seed=_parse_int(record["seed"] or "", "seed", where),
        step=step,
        checkpoint_task=_parse_name(record["checkpoint_task"], "checkpoint_task", where),
        eval_task=_parse_name(record["eval_task"], "eval_task", where),
        accuracy=_parse_accuracy(record["accuracy"] or "", where),
        order=(record.get("order") or "").strip(),
        model=(record.get("model") or "").strip(),
    )


def read_scores_csv(path: str | Path) -> list[ScoreRow]:
    """Read a long-format scores file; every problem is a ``DataError`` naming file and line.

    A missing matrix cell is a missing row, never an empty accuracy, so an empty value is an
    error rather than a silent 0. Line numbers are the file's own (header = line 1).
    """
    name = str(path)
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{name}: cannot read scores file ({exc.strerror or exc})") from None
    with handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DataError(f"{name}: file is empty; expected a header {','.join(REQUIRED_COLUMNS)}")
        reader.fieldnames = [column.strip() for column in reader.fieldnames]
        missing = [column for column in REQUIRED_COLUMNS if column not in reader.fieldnames]
        if missing:
            raise DataError(
                f"{name}: missing column(s) {', '.join(missing)}; expected {','.join(REQUIRED_COLUMNS)}"
            )
        rows: list[ScoreRow] = []
        first_line: dict[tuple[str, str, int, int, str], int] = {}
        for record in reader:
            where = f"{name} line {reader.line_num}"
            if all(not (value or "").strip() for value in record.values() if isinstance(value, str)):
                continue  # a blank line is layout, not a score
            row = _parse_row(record, where)
            key = (row.model, row.order, row.seed, row.step, row.eval_task)
            if key in first_line:
                raise DataError(
                    f"{where}: duplicate score for seed {row.seed}, step {row.step}, task "
                    f"{row.eval_task!r} (first on line {first_line[key]})"
                )
            first_line[key] = reader.line_num
            rows.append(row)
    if not rows:
        raise DataError(f"{name}: no score rows after the header")
    return rows


_DIGITS = re.compile(r"(\d+)")


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort "task_2" before "task_10", which a plain string sort would not."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part)


def infer_task_order(rows: Sequence[ScoreRow]) -> list[str]:
    """The training order, read off which task each checkpoint was trained on.

    Without any trained checkpoint, the study's convention applies: its tasks were named
    task_1, task_2, ..., so the sorted (naturally, so task_10 follows task_9) base-row task
    names give the order. Evaluated tasks that no checkpoint trained on make the order
    ambiguous (a run still in progress, or held-out tasks), so they are an error: pass the
    order explicitly in that case.
    """
    trained: dict[int, tuple[str, int]] = {}
    for row in rows:
        if row.step < 1:
            continue
        seen = trained.setdefault(row.step, (row.checkpoint_task, row.seed))
        if seen[0] != row.checkpoint_task:
            raise DataError(
                f"step {row.step} was trained on {seen[0]!r} in seed {seen[1]} but on "
                f"{row.checkpoint_task!r} in seed {row.seed}; split the file by order"
            )
    if not trained:
        base_tasks = {row.eval_task for row in rows if row.step == 0}
        if not base_tasks:
            raise DataError("no scores to infer a task order from")
        return sorted(base_tasks, key=_natural_key)
    last = max(trained)
    gaps = [str(step) for step in range(1, last + 1) if step not in trained]
    if gaps:
        raise DataError(f"cannot infer the task order: no scores for step(s) {', '.join(gaps)}")
    order = [trained[step][0] for step in range(1, last + 1)]
    repeated = _repeated(order)
    if repeated:
        raise DataError(f"task(s) trained at more than one step: {', '.join(repeated)}")
    untrained = sorted({row.eval_task for row in rows} - set(order), key=_natural_key)
    if untrained:
        raise DataError(
            f"task(s) {', '.join(untrained)} were evaluated but no checkpoint was trained on them; "
            "pass the task order explicitly"
        )
    return order


def matrices_by_seed(rows: Sequence[ScoreRow]) -> dict[int, dict[int, dict[str, float]]]:
    """Each seed's accuracy matrix; rows of one (model, order) group only."""
    matrices: dict[int, dict[int, dict[str, float]]] = {}
    for row in rows:
        cells = matrices.setdefault(row.seed, {}).setdefault(row.step, {})
        if row.eval_task in cells:
            raise DataError(
                f"two scores for seed {row.seed}, step {row.step}, task {row.eval_task!r}; "
                "rows of several models or orders must be grouped first (see metrics_for_scores)"
            )
        cells[row.eval_task] = row.accuracy
    return dict(sorted(matrices.items()))


def _check_order_against_rows(order: Sequence[str], rows: Sequence[ScoreRow], label: str) -> None:
    """An explicit order must fit the file, or the metrics would silently mix up tasks."""
    known = sorted({row.eval_task for row in rows}, key=_natural_key)
    unknown = [task for task in order if task not in known]
    if unknown:
        raise DataError(
            f"{label}task(s) {', '.join(unknown)} of the task order have no scores; "
            f"known tasks: {', '.join(known)}"
        )
    for row in rows:
        if row.step > len(order):
            raise DataError(f"{label}step {row.step} is past the {len(order)} task(s) of the order")
        if row.step >= 1 and row.checkpoint_task != order[row.step - 1]:
            raise DataError(
                f"{label}step {row.step} was trained on {row.checkpoint_task!r}, but the task order "
                f"puts {order[row.step - 1]!r} there"
            )


def metrics_for_scores(
    rows: Sequence[ScoreRow], task_order: Sequence[str] | None = None
) -> list[tuple[dict[str, str], list[AggregateStepMetrics]]]:
    """Aggregated metrics of every (model, order) group of a scores file, in file order.

    An explicit ``task_order`` applies to every group and must agree with the checkpoints the
    rows name; it is needed only when the order cannot be read off the file.
    """
    groups: dict[tuple[str, str], list[ScoreRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.order), []).append(row)
    results: list[tuple[dict[str, str], list[AggregateStepMetrics]]] = []
    for (model, order_label), group in groups.items():
        label = _group_label(model, order_label)
        try:
            order = list(task_order) if task_order is not None else infer_task_order(group)
        except DataError as exc:
            raise DataError(f"{label}{exc}") from None
        _check_order_against_rows(order, group, label)
        try:
            per_seed = [step_metrics(matrix, order) for matrix in matrices_by_seed(group).values()]
        except ValueError as exc:
            raise DataError(f"{label}{exc}") from None
        results.append(({"model": model, "order": order_label}, aggregate_seeds(per_seed)))
    return results


def _group_label(model: str, order: str) -> str:
    parts = [f"model {model!r}" if model else "", f"order {order!r}" if order else ""]
    joined = ", ".join(part for part in parts if part)
    return f"{joined}: " if joined else ""


# --------------------------------------------------------------------------- text output


def _format_value(value: float | None, digits: int) -> str:
    if value is None:
        return _MISSING
    text = f"{value:.{digits}f}"
    # Float noise (-1e-17) must not print as "-0.000", which reads as a real regression.
    if text.startswith("-") and not any(ch in "123456789" for ch in text):
        text = text[1:]
    return text


def _format_cell(mean: float | None, std: float | None, show_std: bool, digits: int) -> str:
    if mean is None:
        return _MISSING
    if show_std and std is not None:
        return f"{_format_value(mean, digits)} ± {_format_value(std, digits)}"
    return _format_value(mean, digits)


def _render_table(header: Sequence[str], body: Sequence[Sequence[str]], text_columns: int) -> str:
    """Left-align the leading label columns and right-align numbers, two spaces apart."""
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        cells = [
            cell.ljust(width) if i < text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def format_metrics_table(aggregates: Sequence[AggregateStepMetrics], digits: int = 3) -> str:
    """A plain-text table for terminals and reports; "—" marks undefined or missing values."""
    header = ["step", "checkpoint", *(_HEADERS[name] for name in METRIC_NAMES)]
    body = [
        [
            str(agg.step),
            agg.checkpoint_task,
            *(
                _format_cell(agg.mean.get(name), agg.std.get(name), agg.n_seeds > 1, digits)
                for name in METRIC_NAMES
            ),
        ]
        for agg in aggregates
    ]
    return _render_table(header, body, text_columns=2)


def format_matrix(
    matrix_mean: Matrix,
    task_order: Sequence[str],
    digits: int = 3,
    matrix_std: Mapping[int, Mapping[str, float | None]] | None = None,
) -> str:
    """The accuracy matrix as text: one row per checkpoint, one column per task in order.

    With ``matrix_std`` (from :func:`mean_matrix`) cells read "mean ± std".
    """
    header = ["checkpoint", *task_order]
    body: list[list[str]] = []
    for k in range(len(task_order) + 1):
        label = BASE_CHECKPOINT if k == 0 else f"after {task_order[k - 1]}"
        std_row = (matrix_std or {}).get(k, {})
        cells = [
            _format_cell(_cell(matrix_mean, k, task), std_row.get(task), matrix_std is not None, digits)
            for task in task_order
        ]
        body.append([label, *cells])
    return _render_table(header, body, text_columns=1)


__all__ = [
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "AggregateStepMetrics",
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
    "step_metrics",
]
