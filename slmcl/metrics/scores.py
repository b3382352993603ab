"""From score rows to metrics: the task order, each seed's matrix, each (model, order) group's metrics.

A scores file may hold several models and orders; rows are grouped first so that cells of
different runs never land in one matrix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from slmcl.errors import DataError
from slmcl.metrics.cl import repeated_names, step_metrics
from slmcl.metrics.scores_io import ScoreRow
from slmcl.metrics.seeds import AggregateStepMetrics, aggregate_seeds

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
    repeated = repeated_names(order)
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
