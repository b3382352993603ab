"""per_task.csv and per_task_steps.csv: each task's forgetting and transfer, on a hand-made accuracy matrix."""

from __future__ import annotations

import pytest

from slmcl.protocol.records import StageRecord
from slmcl.protocol.tables import per_task_rows, per_task_step_rows

ORDER = ["a", "b", "c"]
# R[k][task]: rows are checkpoints 0..3
R = {0: {"a": 0.1, "b": 0.2, "c": 0.3},
     1: {"a": 0.8, "b": 0.25, "c": 0.35},
     2: {"a": 0.6, "b": 0.7, "c": 0.4},
     3: {"a": 0.5, "b": 0.65, "c": 0.9}}


def _records(matrix: dict[int, dict[str, float]]) -> list[StageRecord]:
    return [StageRecord("a.b.c-s1", ORDER, 1, k, "base" if k == 0 else ORDER[k - 1], "m",
                        {t: {"accuracy": v} for t, v in row.items()}, {}) for k, row in matrix.items()]


def test_each_task_by_hand() -> None:
    rows = {r["task"]: r for r in per_task_rows(_records(R))}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["base_acc"], a["previous_acc"], a["learned_acc"], a["final_acc"]) == (0.1, 0.1, 0.8, 0.5)
    assert a["forgetting"] == pytest.approx(0.8 - 0.5)  # its peak over steps 1..2 was 0.8
    assert a["bwt"] == pytest.approx(0.5 - 0.8) and a["fwt"] is None  # nothing came before the first task
    assert a["next_task_fwt"] == pytest.approx(0.25 - 0.2)  # learning a moved b from 0.2 to 0.25
    assert b["forgetting"] == pytest.approx(0.7 - 0.65) and b["fwt"] == pytest.approx(0.25 - 0.2)
    assert b["previous_acc"] == 0.25 and b["next_task_fwt"] == pytest.approx(0.4 - 0.3)
    assert c["forgetting"] is None and c["bwt"] is None  # the last task has no later checkpoint
    assert c["fwt"] == pytest.approx(0.4 - 0.3) and c["next_task_fwt"] is None


def test_a_stopped_run_and_a_missing_row() -> None:
    stopped = {k: v for k, v in R.items() if k <= 2}  # the policy stopped the run after step 2
    rows = per_task_rows(_records(stopped))
    assert [r["task"] for r in rows] == ["a", "b"]  # c was never learned
    assert rows[0]["final_acc"] == 0.6 and rows[0]["forgetting"] == pytest.approx(0.8 - 0.6)
    assert rows[1]["next_task_fwt"] == pytest.approx(0.4 - 0.3)
    sparse = dict(R)
    sparse[1] = {}  # stage 1 measured by drift only (evaluation.every)
    a = per_task_rows(_records(sparse))[0]
    assert a["learned_acc"] is None and a["forgetting"] is None and a["bwt"] is None  # never guessed
    assert a["final_acc"] == 0.5


def test_forgetting_is_from_the_peak_not_from_when_learned() -> None:
    # a keeps improving after it is learned (0.8 -> 0.9 at step 2), then falls to 0.5: forgetting counts from
    # the peak (0.4), where the study's -BWT counts from when it was learned (0.3)
    later_peak = {**R, 2: {**R[2], "a": 0.9}}
    a = per_task_rows(_records(later_peak))[0]
    assert a["forgetting"] == pytest.approx(0.9 - 0.5) and -a["bwt"] == pytest.approx(0.8 - 0.5)


def test_every_task_at_every_step_by_hand() -> None:
    rows = {(r["step"], r["task"]): r for r in per_task_step_rows(_records(R))}
    assert len(rows) == 4 * 3
    assert [rows[(0, t)]["fwt"] for t in ORDER] == [0.0, 0.0, 0.0]  # the base: no transfer yet, as the study writes
    assert rows[(0, "a")]["bwt"] is None and rows[(0, "a")]["acc"] == 0.1
    one_a, one_b, one_c = rows[(1, "a")], rows[(1, "b")], rows[(1, "c")]
    assert one_a["bwt"] is one_a["fwt"] is one_a["forgetting"] is None  # the task being learned has neither
    assert one_b["fwt"] == pytest.approx(0.25 - 0.2) and one_c["fwt"] == pytest.approx(0.35 - 0.3)
    two_a, two_c = rows[(2, "a")], rows[(2, "c")]
    assert two_a["bwt"] == pytest.approx(0.6 - 0.8) and two_a["forgetting"] == pytest.approx(0.8 - 0.6)
    assert two_c["fwt"] == pytest.approx(0.4 - 0.3) and two_c["bwt"] is None
    # At the run's end the table is per_task.csv's forgetting and BWT, task by task.
    for r in per_task_rows(_records(R)):
        end = rows[(3, r["task"])]
        assert (end["bwt"], end["forgetting"]) == (r["bwt"], r["forgetting"])


def test_steps_with_a_gap_and_a_drift_only_checkpoint() -> None:
    sparse = {**R, 2: {}}  # stage 2 measured by drift only (evaluation.every)
    rows = {(r["step"], r["task"]): r for r in per_task_step_rows(_records(sparse))}
    assert {k for k, _ in rows} == {0, 1, 3}  # no rows for a checkpoint without accuracies
    assert rows[(3, "a")]["forgetting"] is None  # its peak over steps 1..2 is unknown: never guessed
    assert rows[(3, "a")]["bwt"] == pytest.approx(0.5 - 0.8) and rows[(3, "b")]["bwt"] is None
