"""Reading a long-format scores CSV (one matrix cell per line) into ``ScoreRow``s.

Every problem is a ``DataError`` naming the file and the line: a scores file comes from a
person or another tool, and "line 7: accuracy 'n/a' is not a number" is what they can fix.

A file that a re-run appended to holds the same cell twice. Read with ``last_row_wins``, the
later row replaces the earlier one (a re-run is a correction) and the returned ``ScoreRows``
count and describe what was replaced, so a caller can warn without this module printing.
Only what cannot be resolved is refused: one run step trained on two different tasks (two
task orders in one file without an order column to tell them apart), or rows of one seed of
which some name an order and some do not.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slmcl.errors import DataError


@dataclass(frozen=True)
class ScoreRow:
    """One matrix cell of one run, as stored in a long-format scores CSV.

    ``source`` and ``line`` say where the row was read, for error messages only: two rows
    with the same values are equal wherever they came from.
    """

    seed: int
    step: int
    checkpoint_task: str
    eval_task: str
    accuracy: float
    order: str = ""
    model: str = ""
    strategy: str = ""
    source: str = field(default="", compare=False, repr=False)
    line: int = field(default=0, compare=False, repr=False)


REQUIRED_COLUMNS: tuple[str, ...] = ("seed", "step", "checkpoint_task", "eval_task", "accuracy")
OPTIONAL_COLUMNS: tuple[str, ...] = ("order", "model", "strategy")
# The columns that tell runs apart, in the order a group is labelled by.
GROUP_COLUMNS: tuple[str, ...] = ("model", "strategy", "order")


class ScoreRows(list[ScoreRow]):
    """The rows of one scores file, with what reading it had to resolve.

    A list (so it compares equal to a plain list of the same rows) that also carries
    ``superseded``, how many rows a later row of the same key replaced, and ``warnings``,
    the sentences a command line prints for it.
    """

    def __init__(
        self, rows: Iterable[ScoreRow] = (), *, source: str = "", superseded: int = 0, warnings: Sequence[str] = ()
    ) -> None:
        super().__init__(rows)
        self.source = source
        self.superseded = superseded
        self.warnings: list[str] = list(warnings)


def located(row: ScoreRow) -> str:
    """``"scores.csv line 7: "`` for a row read from a file, ``""`` for a row built in code."""
    return f"{row.source} line {row.line}: " if row.source else ""


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


def _parse_row(record: Mapping[str, str | None], where: str, source: str, line: int) -> ScoreRow:
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
        strategy=(record.get("strategy") or "").strip(),
        source=source,
        line=line,
    )


_RunStep = tuple[str, str, str, int, int]  # (model, strategy, order, seed, step)


def _run_step(row: ScoreRow) -> _RunStep:
    return (row.model, row.strategy, row.order, row.seed, row.step)


def _checkpoint_conflict(row: ScoreRow, earlier: ScoreRow, has_order: bool) -> DataError:
    """One step of one run trained on two tasks: two runs share the key, and no column parts them."""
    run = f"seed {row.seed}, step {row.step}"
    if has_order:
        cause = f"both rows name order {row.order!r}, so one of them is in the wrong run"
    else:
        cause = "two task orders in one file? add an order column (e.g. t1.t2.t3) to tell their runs apart"
    return DataError(
        f"{located(row)}checkpoint_task {row.checkpoint_task!r} at {run} contradicts "
        f"{earlier.checkpoint_task!r} on line {earlier.line}; {cause}"
    )


def _check_order_cells(rows: Sequence[ScoreRow]) -> None:
    """Rows of one seed without an order, beside rows of that seed with one, belong to no known run."""
    named: dict[tuple[str, str, int], ScoreRow] = {}
    for row in rows:
        if row.order:
            named.setdefault((row.model, row.strategy, row.seed), row)
    for row in sorted(rows, key=lambda r: r.line):
        other = named.get((row.model, row.strategy, row.seed))
        if not row.order and other is not None:
            raise DataError(
                f"{located(row)}order is empty, but seed {row.seed} also has rows of order {other.order!r} "
                f"(line {other.line}); fill in the order column so that every row belongs to one run"
            )


def _superseded_warning(name: str, count: int, key_columns: Sequence[str], first: tuple[int, int]) -> str:
    rows = "1 row repeats" if count == 1 else f"{count} rows repeat"
    replace = "replaces" if count == 1 else "replace"
    return (
        f"{name}: {rows} an earlier ({', '.join(key_columns)}) and {replace} it "
        f"(the last row per key wins; the first is line {first[0]}, which replaces line {first[1]})"
    )


def read_scores_csv(path: str | Path, *, last_row_wins: bool = False) -> ScoreRows:
    """Read a long-format scores file; every problem is a ``DataError`` naming file and line.

    A missing matrix cell is a missing row, never an empty accuracy, so an empty value is an
    error rather than a silent 0. Line numbers are the file's own (header = line 1).

    A key is (model, strategy, order, seed, step, checkpoint_task, eval_task); the group
    columns count where the file has them. A repeated key is an error unless
    ``last_row_wins``: then the later row takes the earlier one's place, and the result's
    ``superseded`` and ``warnings`` say how many rows were replaced.
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
        has_order = "order" in reader.fieldnames
        key_columns = [c for c in GROUP_COLUMNS if c in reader.fieldnames] + list(REQUIRED_COLUMNS[:4])
        rows: list[ScoreRow] = []
        position: dict[tuple[str, str, str, int, int, str], int] = {}
        checkpoint_of: dict[_RunStep, ScoreRow] = {}
        superseded = 0
        first_repeat: tuple[int, int] | None = None
        for record in reader:
            where = f"{name} line {reader.line_num}"
            if all(not (value or "").strip() for value in record.values() if isinstance(value, str)):
                continue  # a blank line is layout, not a score
            row = _parse_row(record, where, name, reader.line_num)
            earlier = checkpoint_of.setdefault(_run_step(row), row)
            if earlier.checkpoint_task != row.checkpoint_task:
                raise _checkpoint_conflict(row, earlier, has_order)
            key = (*_run_step(row), row.eval_task)
            if key not in position:
                position[key] = len(rows)
                rows.append(row)
                continue
            previous = rows[position[key]]
            if not last_row_wins:
                raise DataError(
                    f"{where}: duplicate score for seed {row.seed}, step {row.step}, task "
                    f"{row.eval_task!r} (first on line {previous.line})"
                )
            superseded += 1
            first_repeat = first_repeat or (row.line, previous.line)
            rows[position[key]] = row  # in the earlier row's place, so groups keep their file order
    if not rows:
        raise DataError(f"{name}: no score rows after the header")
    if has_order:
        _check_order_cells(rows)
    warnings = [_superseded_warning(name, superseded, key_columns, first_repeat)] if first_repeat else []
    return ScoreRows(rows, source=name, superseded=superseded, warnings=warnings)
