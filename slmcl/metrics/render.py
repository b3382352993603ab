"""Metrics and matrices as plain-text tables for terminals and reports.

"—" marks a value that is undefined or missing, never a 0; float noise never prints as "-0.000".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from slmcl.metrics.cl import BASE_CHECKPOINT, LABELS, METRIC_NAMES, Matrix, cell
from slmcl.metrics.seeds import AggregateStepMetrics

_MISSING = "—"


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
    header = ["step", "checkpoint", *(LABELS[name] for name in METRIC_NAMES)]
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
            _format_cell(cell(matrix_mean, k, task), std_row.get(task), matrix_std is not None, digits)
            for task in task_order
        ]
        body.append([label, *cells])
    return _render_table(header, body, text_columns=1)
