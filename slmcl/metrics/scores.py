"""From score rows to metrics: the task order, each seed's matrix, each run group's metrics.

A scores file may hold several models, strategies and orders; rows are grouped first (by the
model, strategy and order columns) so that cells of different runs never land in one matrix.

A group's task order comes, first found, from: the order given by the caller; the order
column, when its value spells the tasks out (``fomc.scienceqa.numgluecm`` as slmcl writes
it, or with ``->``, ``>``, ``,`` between the names), which gives the whole order even for a
run still in progress; the checkpoint trained at each step. Errors name the file, the line
and the column where the rows were read from a file.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from slmcl.errors import DataError
from slmcl.metrics.cl import repeated_names, step_metrics
from slmcl.metrics.scores_io import ScoreRow, located
from slmcl.metrics.seeds import AggregateStepMetrics, aggregate_seeds

_DIGITS = re.compile(r"(\d+)")
# How an order column may join task names, most specific first: an arrow or '>' can sit
# beside '-' or '.' inside a task name, a '.' (what slmcl writes) only between names.
_SEPARATORS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern) for pattern in (r"\s*(?:->|=>|→)\s*", r"\s*>\s*", r"\s*,\s*", r"\s*;\s*", r"\s*\|\s*",
                                        r"\.", r"\s+")
)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort "task_2" before "task_10", which a plain string sort would not."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part)


def _error(rows: Sequence[ScoreRow], row: ScoreRow | None, label: str, text: str) -> DataError:
    """A one-line error that starts where the user can look: the row's line, else the file."""
    if row is not None and row.source:
        where = located(row)
    else:
        source = next((r.source for r in rows if r.source), "")
        where = f"{source}: " if source else ""
    return DataError(f"{where}{label}{text}")


def _task_names(rows: Sequence[ScoreRow]) -> set[str]:
    return {row.eval_task for row in rows} | {row.checkpoint_task for row in rows if row.step >= 1}


def order_from_column(value: str, tasks: Collection[str]) -> list[str] | None:
    """The task order an order-column value spells out, or ``None`` when it is only a name.

    A value spells an order when, split at its separator, it names each task once and every
    task of ``tasks`` (the rows' tasks) among them; names the rows do not hold yet are kept,
    since a run in progress has not reached them. "forward" or "fwd" are names.
    """
    value = value.strip()
    if not value:
        return None
    candidates = [[part.strip() for part in sep.split(value)] for sep in _SEPARATORS if sep.search(value)]
    candidates.append([value])
    for parts in candidates:
        if all(parts) and not repeated_names(parts) and set(tasks) <= set(parts):
            return parts
    return None


def _infer(rows: Sequence[ScoreRow], label: str, order_value: str) -> list[str]:
    trained: dict[int, ScoreRow] = {}
    for row in sorted(rows, key=lambda r: r.line):
        if row.step < 1:
            continue
        seen = trained.setdefault(row.step, row)
        if seen.checkpoint_task != row.checkpoint_task:
            where = f"; seed {seen.seed}'s is line {seen.line}" if seen.source else ""
            raise _error(
                rows, row, label,
                f"step {row.step} was trained on {seen.checkpoint_task!r} in seed {seen.seed} but on "
                f"{row.checkpoint_task!r} in seed {row.seed} (column checkpoint_task{where}); "
                "seeds of different task orders need an order column, or split the file by order",
            )
    if not trained:
        base_tasks = {row.eval_task for row in rows if row.step == 0}
        if not base_tasks:
            raise _error(rows, None, label, "no scores to infer a task order from")
        return sorted(base_tasks, key=_natural_key)
    last = max(trained)
    gaps = [str(step) for step in range(1, last + 1) if step not in trained]
    if gaps:
        raise _error(
            rows, None, label,
            f"cannot infer the task order: no scores for step(s) {', '.join(gaps)} (column step); "
            "pass the task order or write it in an order column",
        )
    order = [trained[step].checkpoint_task for step in range(1, last + 1)]
    repeated = repeated_names(order)
    if repeated:
        again = next(trained[step] for step in range(1, last + 1) if order.index(order[step - 1]) != step - 1)
        raise _error(
            rows, again, label,
            f"task(s) trained at more than one step: {', '.join(repeated)} (column checkpoint_task)",
        )
    untrained = sorted({row.eval_task for row in rows} - set(order), key=_natural_key)
    if untrained:
        first = min((row for row in rows if row.eval_task in untrained), key=lambda r: r.line)
        named = (
            f"; column order {order_value!r} does not list these tasks" if order_value else
            " or write it in an order column (e.g. t1.t2.t3)"
        )
        raise _error(
            rows, first, label,
            f"task(s) {', '.join(untrained)} were evaluated but no checkpoint was trained on them "
            f"(column eval_task), so the task order cannot be inferred (a run still in progress?): "
            f"pass the task order explicitly{named}",
        )
    return order


def infer_task_order(rows: Sequence[ScoreRow]) -> list[str]:
    """The training order, read off which task each checkpoint was trained on.

    Without any trained checkpoint, the study's convention applies: its tasks were named
    task_1, task_2, ..., so the sorted (naturally, so task_10 follows task_9) base-row task
    names give the order. Evaluated tasks that no checkpoint trained on make the order
    ambiguous (a run still in progress, or held-out tasks), so they are an error: pass the
    order explicitly, or spell it in an order column, in that case.
    """
    return _infer(rows, "", "")


def matrices_by_seed(rows: Sequence[ScoreRow]) -> dict[int, dict[int, dict[str, float]]]:
    """Each seed's accuracy matrix; rows of one (model, strategy, order) group only."""
    matrices: dict[int, dict[int, dict[str, float]]] = {}
    for row in rows:
        cells = matrices.setdefault(row.seed, {}).setdefault(row.step, {})
        if row.eval_task in cells:
            raise DataError(
                f"{located(row)}two scores for seed {row.seed}, step {row.step}, task {row.eval_task!r}; "
                "rows of several models or orders must be grouped first (see metrics_for_scores)"
            )
        cells[row.eval_task] = row.accuracy
    return dict(sorted(matrices.items()))


def _check_order_against_rows(
    order: Sequence[str], rows: Sequence[ScoreRow], label: str, origin: str, every_task_scored: bool
) -> None:
    """An order must fit the rows' checkpoints, or the metrics would silently mix up tasks.

    An order the caller typed must also name only tasks with scores (a typo would otherwise
    read as a task never evaluated); an order column may name tasks a run has not reached.
    """
    if every_task_scored:
        known = sorted({row.eval_task for row in rows}, key=_natural_key)
        unknown = [task for task in order if task not in known]
        if unknown:
            raise _error(
                rows, None, label,
                f"task(s) {', '.join(unknown)} of the task order have no scores; known tasks: {', '.join(known)}",
            )
    for row in sorted(rows, key=lambda r: r.line):
        if row.step > len(order):
            raise _error(rows, row, label, f"step {row.step} is past the {len(order)} task(s) of {origin}")
        if row.step >= 1 and row.checkpoint_task != order[row.step - 1]:
            raise _error(
                rows, row, label,
                f"step {row.step} was trained on {row.checkpoint_task!r} (column checkpoint_task), but "
                f"{origin} puts {order[row.step - 1]!r} there",
            )


def _group_order(
    group: Sequence[ScoreRow], task_order: Sequence[str] | None, order_value: str, label: str
) -> list[str]:
    spelled = order_from_column(order_value, _task_names(group))
    if task_order is not None:
        order = list(task_order)
        if spelled is not None and spelled != order:
            raise _error(
                group, min(group, key=lambda r: r.line), label,
                f"the task order {','.join(order)} contradicts column order {order_value!r}",
            )
        _check_order_against_rows(order, group, label, "the task order", every_task_scored=True)
        return order
    if spelled is not None:
        _check_order_against_rows(spelled, group, label, f"column order {order_value!r}", every_task_scored=False)
        return spelled
    return _infer(group, label, order_value)


def metrics_for_scores(
    rows: Sequence[ScoreRow], task_order: Sequence[str] | None = None
) -> list[tuple[dict[str, str], list[AggregateStepMetrics]]]:
    """Aggregated metrics of every (model, strategy, order) group of a scores file, in file order.

    An explicit ``task_order`` applies to every group and must agree with the checkpoints the
    rows name (and with an order column that spells an order); it is needed only when the
    order can be read off neither the order column nor the checkpoints. A group's key holds
    its ``model`` and ``order`` values, and its ``strategy`` when any row names one.
    """
    groups: dict[tuple[str, str, str], list[ScoreRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.strategy, row.order), []).append(row)
    with_strategy = any(row.strategy for row in rows)
    results: list[tuple[dict[str, str], list[AggregateStepMetrics]]] = []
    for (model, strategy, order_value), group in groups.items():
        label = _group_label(model, strategy, order_value)
        order = _group_order(group, task_order, order_value, label)
        matrices = matrices_by_seed(group)
        try:
            per_seed = [step_metrics(matrix, order) for matrix in matrices.values()]
        except ValueError as exc:
            raise _error(group, None, label, str(exc)) from None
        key = {"model": model, "strategy": strategy, "order": order_value} if with_strategy else \
            {"model": model, "order": order_value}
        results.append((key, aggregate_seeds(per_seed)))
    return results


def _group_label(model: str, strategy: str, order: str) -> str:
    parts = [f"model {model!r}" if model else "", f"strategy {strategy!r}" if strategy else "",
             f"order {order!r}" if order else ""]
    joined = ", ".join(part for part in parts if part)
    return f"{joined}: " if joined else ""
