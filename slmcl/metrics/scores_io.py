"""Reading a long-format scores CSV (one matrix cell per line) into ``ScoreRow``s.

Every problem is a ``DataError`` naming the file and the line: a scores file comes from a
person or another tool, and "line 7: accuracy 'n/a' is not a number" is what they can fix.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from slmcl.errors import DataError


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
