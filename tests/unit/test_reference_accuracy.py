"""Reference-set accuracy by generation: the stage-record values and reference_accuracy.csv, hand-worked."""

from __future__ import annotations

import math

import pytest

from slmcl.protocol.records import StageRecord
from slmcl.protocol.tables import reference_accuracy_by_task, reference_accuracy_columns, reference_accuracy_rows

ORDER = ["fomc", "scienceqa"]


def _record(step: int, after: dict[str, tuple[float, int]] | None, base: dict[str, tuple[float, int]]) -> StageRecord:
    stability = reference_accuracy_columns(after, base) if after is not None else {}
    return StageRecord(run_id="r", order=ORDER, seed=1, step=step, checkpoint_task=ORDER[step - 1] if step else "base",
                       model="m", scores={}, stability=stability)


def test_columns_pool_rows_not_tasks() -> None:
    # 3 of 4 fomc rows and 1 of 6 scienceqa rows: pooled 4/10 (the mean of task means would be 0.458)
    cols = reference_accuracy_columns({"fomc": (3.0, 4), "scienceqa": (1.0, 6)},
                                      {"fomc": (2.0, 4), "scienceqa": (3.0, 6)})
    assert cols["reference_accuracy"] == pytest.approx(0.4)
    assert cols["base_reference_accuracy"] == pytest.approx(0.5)
    assert reference_accuracy_by_task(cols) == {"fomc": (0.75, 4), "scienceqa": (pytest.approx(1 / 6), 6)}
    assert reference_accuracy_by_task(cols, base=True) == {"fomc": (0.5, 4), "scienceqa": (0.5, 6)}
    # flat numbers only: the wire's map<string, double>, the seed means of summary.json
    assert all(isinstance(v, (int, float)) for v in cols.values())


def test_columns_of_no_rows_are_nan_not_an_error() -> None:
    assert math.isnan(reference_accuracy_columns({}, {})["reference_accuracy"])


def test_rows_hold_the_base_once_per_run_then_each_stage_with_its_delta() -> None:
    base = {"fomc": (2.0, 4), "scienceqa": (3.0, 6)}
    records = [_record(0, None, base), _record(1, {"fomc": (4.0, 4), "scienceqa": (3.0, 6)}, base),
               _record(2, {"fomc": (1.0, 4), "scienceqa": (6.0, 6)}, base)]
    rows = reference_accuracy_rows(records)
    assert [(r["step"], r["task"]) for r in rows] == [(0, "fomc"), (0, "scienceqa"), (1, "fomc"), (1, "scienceqa"),
                                                      (2, "fomc"), (2, "scienceqa")]
    by = {(r["step"], r["task"]): r for r in rows}
    assert by[(0, "fomc")]["delta_vs_base"] == 0.0 and by[(0, "fomc")]["checkpoint_task"] == "base"
    assert by[(1, "fomc")]["accuracy"] == 1.0 and by[(1, "fomc")]["delta_vs_base"] == pytest.approx(0.5)
    assert by[(2, "fomc")]["delta_vs_base"] == pytest.approx(-0.25)
    assert by[(2, "scienceqa")]["delta_vs_base"] == pytest.approx(0.5) and by[(2, "scienceqa")]["total"] == 6


def test_stages_without_the_measurement_give_no_rows() -> None:
    assert reference_accuracy_rows([_record(1, None, {})]) == []
