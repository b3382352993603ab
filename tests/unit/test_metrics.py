"""Continual-learning metrics: every expected value below is worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from slmcl.errors import DataError
from slmcl.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    METRICS,
    AggregateStepMetrics,
    ScoreRow,
    StepMetrics,
    aggregate_seeds,
    format_matrix,
    format_metrics_table,
    infer_task_order,
    matrices_by_seed,
    mean_matrix,
    metrics_for_scores,
    read_scores_csv,
    step_metrics,
)

# The hand-worked matrix R[k][task] (rows: checkpoints, k = 0 is the base model).
#
#                 fomc  sciqa  numglue
#   0 base        0.4   0.5    0.2
#   1 after fomc  0.8   0.6    0.3
#   2 after sciqa 0.7   0.9    0.1
#   3 after numg  0.6   0.7    0.5
MATRIX: dict[int, dict[str, float]] = {
    0: {"fomc": 0.4, "sciqa": 0.5, "numglue": 0.2},
    1: {"fomc": 0.8, "sciqa": 0.6, "numglue": 0.3},
    2: {"fomc": 0.7, "sciqa": 0.9, "numglue": 0.1},
    3: {"fomc": 0.6, "sciqa": 0.7, "numglue": 0.5},
}
FORWARD = ["fomc", "sciqa", "numglue"]
REVERSED = ["numglue", "sciqa", "fomc"]

# Forward order, by hand:
# k=0: FWT = 0 (definition); avg all = (0.4+0.5+0.2)/3 = 1.1/3; the rest undefined.
# k=1: OP = R1[fomc] = 0.8; FWT = mean(0.6-0.5, 0.3-0.2) = 0.1; avg all = 1.7/3;
#      current = 0.8; Δ vs base = 0.8-0.4 = 0.4; gain = 0.8-R0[fomc] = 0.4; LA = 0.8.
# k=2: OP = mean(0.7, 0.9) = 0.8; BWT = 0.7-0.8 = -0.1; forgetting 0.1;
#      FWT = R2[numglue]-R0[numglue] = 0.1-0.2 = -0.1; avg all = 1.7/3; current 0.9;
#      Δ vs base = 0.9-0.5 = 0.4; gain = 0.9-R1[sciqa] = 0.3; LA = mean(0.8, 0.9) = 0.85.
# k=3: OP = mean(0.6, 0.7, 0.5) = 0.6; BWT = mean(0.6-0.8, 0.7-0.9) = -0.2; forgetting 0.2;
#      FWT undefined; avg all = 0.6; current 0.5; Δ vs base = 0.5-0.2 = 0.3;
#      gain = 0.5-R2[numglue] = 0.4; LA = mean(0.8, 0.9, 0.5) = 2.2/3.
N = None
EXPECTED_FORWARD: dict[str, list[float | None]] = {
    "op": [N, 0.8, 0.8, 0.6],
    "bwt": [N, N, -0.1, -0.2],
    "forgetting": [N, N, 0.1, 0.2],
    "fwt": [0.0, 0.1, -0.1, N],
    "avg_all_tasks": [1.1 / 3, 1.7 / 3, 1.7 / 3, 0.6],
    "current_acc": [N, 0.8, 0.9, 0.5],
    "current_delta_vs_base": [N, 0.4, 0.4, 0.3],
    "adaptation_gain": [N, 0.4, 0.3, 0.4],
    "learning_accuracy": [N, 0.8, 0.85, 2.2 / 3],
}

# The same numbers read as the reversed order (numglue, sciqa, fomc), by hand:
# k=1: OP = R1[numglue] = 0.3; FWT = mean(0.6-0.5, 0.8-0.4) = 0.25; current 0.3;
#      Δ vs base = 0.3-0.2 = 0.1; gain 0.1; LA 0.3.
# k=2: OP = mean(0.1, 0.9) = 0.5; BWT = R2[numglue]-R1[numglue] = 0.1-0.3 = -0.2;
#      FWT = R2[fomc]-R0[fomc] = 0.7-0.4 = 0.3; current 0.9; Δ 0.9-0.5 = 0.4;
#      gain 0.9-0.6 = 0.3; LA = mean(0.3, 0.9) = 0.6.
# k=3: OP = mean(0.5, 0.7, 0.6) = 0.6; BWT = mean(0.5-0.3, 0.7-0.9) = 0.0; current
#      R3[fomc] = 0.6; Δ 0.6-0.4 = 0.2; gain 0.6-R2[fomc] = -0.1; LA = mean(0.3, 0.9, 0.6) = 0.6.
# avg all does not depend on the order.
EXPECTED_REVERSED: dict[str, list[float | None]] = {
    "op": [N, 0.3, 0.5, 0.6],
    "bwt": [N, N, -0.2, 0.0],
    "forgetting": [N, N, 0.2, 0.0],
    "fwt": [0.0, 0.25, 0.3, N],
    "avg_all_tasks": [1.1 / 3, 1.7 / 3, 1.7 / 3, 0.6],
    "current_acc": [N, 0.3, 0.9, 0.6],
    "current_delta_vs_base": [N, 0.1, 0.4, 0.2],
    "adaptation_gain": [N, 0.1, 0.3, -0.1],
    "learning_accuracy": [N, 0.3, 0.6, 0.6],
}


def _column(rows: list[StepMetrics], name: str) -> list[float | None]:
    return [getattr(row, name) for row in rows]


def _assert_close(actual: list[float | None], expected: list[float | None]) -> None:
    assert [value is None for value in actual] == [value is None for value in expected]
    for a, e in zip(actual, expected):
        if e is not None:
            assert a == pytest.approx(e, abs=1e-12)


def test_metric_names_and_directions() -> None:
    assert set(HIGHER_IS_BETTER) == set(METRIC_NAMES)
    assert HIGHER_IS_BETTER["forgetting"] is False
    assert all(HIGHER_IS_BETTER[name] for name in METRIC_NAMES if name != "forgetting")


def test_metrics_are_declared_once() -> None:
    """Names, directions, labels and rows all come from METRICS: a new metric is one line there."""
    assert METRIC_NAMES == tuple(m.name for m in METRICS)
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    header = format_metrics_table([]).splitlines()[0].split("  ")
    assert [h.strip() for h in header if h.strip()] == ["step", "checkpoint", *(m.label for m in METRICS)]
    row = step_metrics(MATRIX, FORWARD)[1]
    assert [getattr(row, name) for name in METRIC_NAMES] == [row.metric(name) for name in METRIC_NAMES]
    assert "op=0.8" in repr(row)
    with pytest.raises(AttributeError, match="no attribute 'accuracy'"):
        row.accuracy  # noqa: B018 - the attribute access is what is tested
    with pytest.raises(ValueError, match="2 values for 9 metrics"):
        StepMetrics(step=0, checkpoint_task="base", values=(None, None))


@pytest.mark.parametrize(("order", "expected"), [(FORWARD, EXPECTED_FORWARD), (REVERSED, EXPECTED_REVERSED)])
def test_step_metrics_hand_worked(order: list[str], expected: dict[str, list[float | None]]) -> None:
    rows = step_metrics(MATRIX, order)
    assert [row.step for row in rows] == [0, 1, 2, 3]
    assert [row.checkpoint_task for row in rows] == ["base", *order]
    for name in METRIC_NAMES:
        _assert_close(_column(rows, name), expected[name])


def test_order_changes_the_metrics() -> None:
    forward, reversed_ = step_metrics(MATRIX, FORWARD), step_metrics(MATRIX, REVERSED)
    assert forward[1].op != pytest.approx(reversed_[1].op)
    assert forward[3].bwt != pytest.approx(reversed_[3].bwt)


def test_forgetting_of_zero_bwt_is_positive_zero() -> None:
    # BWT_2 = R2[a] - R1[a] = 0.75 - 0.75, exactly 0.0: forgetting must be 0.0, not -0.0
    # (which would print as "-0.000").
    matrix = {0: {"a": 0.5, "b": 0.5}, 1: {"a": 0.75, "b": 0.5}, 2: {"a": 0.75, "b": 1.0}}
    last = step_metrics(matrix, ["a", "b"])[2]
    assert last.bwt == 0.0 and last.forgetting == 0.0
    assert math.copysign(1.0, last.forgetting) == 1.0


def test_missing_cell_gives_none_never_zero() -> None:
    matrix = {step: dict(row) for step, row in MATRIX.items()}
    del matrix[1]["numglue"]  # R[1][numglue] was never evaluated
    rows = step_metrics(matrix, FORWARD)
    # Step 1 still has OP/current (they only need R[1][fomc]) but no FWT or average.
    assert rows[1].op == pytest.approx(0.8)
    assert rows[1].fwt is None
    assert rows[1].avg_all_tasks is None
    # R[1][numglue] is neither a diagonal nor a BWT term, so later steps are untouched.
    assert rows[3].bwt == pytest.approx(-0.2)
    assert rows[3].adaptation_gain == pytest.approx(0.4)  # uses R[2][numglue], not R[1]


def test_missing_diagonal_cell_propagates_to_dependent_metrics() -> None:
    matrix = {step: dict(row) for step, row in MATRIX.items()}
    del matrix[1]["fomc"]  # R[1][1] missing
    rows = step_metrics(matrix, FORWARD)
    assert rows[1].op is None and rows[1].current_acc is None and rows[1].learning_accuracy is None
    assert rows[2].bwt is None and rows[2].forgetting is None  # needs R[1][1]
    assert rows[2].learning_accuracy is None
    assert rows[2].op == pytest.approx(0.8)  # needs only row 2


def test_missing_rows_still_appear() -> None:
    rows = step_metrics({0: MATRIX[0], 1: MATRIX[1]}, FORWARD)  # a run still in progress
    assert [row.step for row in rows] == [0, 1, 2, 3]
    assert all(getattr(rows[3], name) is None for name in METRIC_NAMES)
    assert rows[2].adaptation_gain is None and rows[2].current_delta_vs_base is None


def test_missing_base_row_makes_fwt0_none() -> None:
    rows = step_metrics({1: MATRIX[1]}, FORWARD)
    assert rows[0].fwt is None
    assert rows[1].current_delta_vs_base is None
    assert rows[1].op == pytest.approx(0.8)


def test_step_metrics_rejects_bad_orders() -> None:
    with pytest.raises(ValueError, match="empty"):
        step_metrics(MATRIX, [])
    with pytest.raises(ValueError, match="fomc"):
        step_metrics(MATRIX, ["fomc", "sciqa", "fomc"])


def test_step_metrics_as_dict() -> None:
    row = step_metrics(MATRIX, FORWARD)[2]
    flat = row.as_dict()
    assert list(flat) == ["step", "checkpoint_task", *METRIC_NAMES]
    assert flat["checkpoint_task"] == "sciqa"
    assert flat["learning_accuracy"] == pytest.approx(0.85)


# Three seeds, order (a, b):
#   seed 1: base (.5, .5); after a (.9, .5); after b (.7, .9)
#   seed 2: base (.5, .5); after a (.7, .5); after b (.5, .7)
#   seed 3: base (.5, .5); after a (.8, .5); after b (.7, .8)
# OP_1 = .9, .7, .8: mean .8; deviations .1, -.1, 0 -> sample var .02/2 = .01 -> std .1.
# BWT_2 = .7-.9, .5-.7, .7-.8 = -.2, -.2, -.1: mean -1/6; deviations -1/30, -1/30, 2/30
#   -> sample var (1+1+4)/900/2 = 1/300 -> std sqrt(1/300).
SEED_MATRICES: dict[int, dict[int, dict[str, float]]] = {
    1: {0: {"a": 0.5, "b": 0.5}, 1: {"a": 0.9, "b": 0.5}, 2: {"a": 0.7, "b": 0.9}},
    2: {0: {"a": 0.5, "b": 0.5}, 1: {"a": 0.7, "b": 0.5}, 2: {"a": 0.5, "b": 0.7}},
    3: {0: {"a": 0.5, "b": 0.5}, 1: {"a": 0.8, "b": 0.5}, 2: {"a": 0.7, "b": 0.8}},
}


def test_aggregate_seeds_mean_and_sample_std() -> None:
    aggregates = aggregate_seeds([step_metrics(m, ["a", "b"]) for m in SEED_MATRICES.values()])
    assert [agg.step for agg in aggregates] == [0, 1, 2]
    assert all(agg.n_seeds == 3 for agg in aggregates)
    assert aggregates[1].mean["op"] == pytest.approx(0.8)
    assert aggregates[1].std["op"] == pytest.approx(0.1)
    assert aggregates[2].mean["bwt"] == pytest.approx(-1 / 6)
    assert aggregates[2].std["bwt"] == pytest.approx(math.sqrt(1 / 300))
    assert aggregates[2].mean["forgetting"] == pytest.approx(1 / 6)
    # Undefined for every seed stays undefined.
    assert aggregates[0].mean["op"] is None and aggregates[0].std["op"] is None
    assert aggregates[2].mean["fwt"] is None
    # FWT_0 is 0 in every seed: mean 0, std 0.
    assert aggregates[0].mean["fwt"] == 0.0 and aggregates[0].std["fwt"] == 0.0


def test_aggregate_uses_only_seeds_where_defined() -> None:
    partial = {0: SEED_MATRICES[2][0], 1: SEED_MATRICES[2][1]}  # seed 2 stopped after step 1
    aggregates = aggregate_seeds([step_metrics(SEED_MATRICES[1], ["a", "b"]), step_metrics(partial, ["a", "b"])])
    # BWT_2 is defined for seed 1 only (-0.2): mean of one value, no std.
    assert aggregates[2].mean["bwt"] == pytest.approx(-0.2)
    assert aggregates[2].std["bwt"] is None
    # OP_1: (.9 + .7)/2 = .8; sample std of two values = |.9-.7|/sqrt(2).
    assert aggregates[1].std["op"] == pytest.approx(0.2 / math.sqrt(2))


def test_aggregate_rejects_seeds_with_different_orders() -> None:
    with pytest.raises(ValueError, match="step 1"):
        aggregate_seeds([step_metrics(MATRIX, FORWARD), step_metrics(MATRIX, REVERSED)])


def test_aggregate_as_dict() -> None:
    agg = AggregateStepMetrics(
        step=1, checkpoint_task="a", n_seeds=2, mean=dict.fromkeys(METRIC_NAMES, 0.5), std=dict.fromkeys(METRIC_NAMES)
    )
    with_std = agg.as_dict(include_std=True)
    assert list(with_std)[:4] == ["step", "checkpoint_task", "op", "op_std"]
    assert with_std["op"] == 0.5 and with_std["op_std"] is None
    without = agg.as_dict(include_std=False)
    assert list(without) == ["step", "checkpoint_task", *METRIC_NAMES]


def test_mean_matrix() -> None:
    mean, std = mean_matrix(SEED_MATRICES.values())
    assert mean[1]["a"] == pytest.approx(0.8)
    assert std[1]["a"] == pytest.approx(0.1)
    assert mean[0]["b"] == pytest.approx(0.5) and std[0]["b"] == 0.0
    single_mean, single_std = mean_matrix([SEED_MATRICES[1]])
    assert single_mean[2]["b"] == pytest.approx(0.9) and single_std[2]["b"] is None


def test_format_metrics_table() -> None:
    aggregates = aggregate_seeds([step_metrics(m, ["a", "b"]) for m in SEED_MATRICES.values()])
    lines = format_metrics_table(aggregates).splitlines()
    assert lines[0].split()[:4] == ["step", "checkpoint", "OP", "BWT"]
    assert "Δ vs base" in lines[0] and "Adapt. gain" in lines[0] and lines[0].rstrip().endswith("LA")
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + 3
    assert lines[2].split()[:3] == ["0", "base", "—"]  # OP is undefined at the base model
    assert "0.800 ± 0.100" in lines[3]
    assert "-0.167 ± 0.058" in lines[4]
    single = format_metrics_table(aggregate_seeds([step_metrics(MATRIX, FORWARD)]), digits=2)
    assert "±" not in single
    assert "0.85" in single.splitlines()[4]  # LA at step 2


def test_format_metrics_table_hides_float_noise_sign() -> None:
    agg = AggregateStepMetrics(step=1, checkpoint_task="a", n_seeds=1, mean={"op": -1e-17}, std={})
    assert "-0.000" not in format_metrics_table([agg])
    assert "0.000" in format_metrics_table([agg])


def test_format_matrix() -> None:
    matrix = {step: dict(row) for step, row in MATRIX.items()}
    del matrix[2]["sciqa"]
    lines = format_matrix(matrix, FORWARD, digits=2).splitlines()
    assert lines[0].split() == ["checkpoint", "fomc", "sciqa", "numglue"]
    assert lines[2].split() == ["base", "0.40", "0.50", "0.20"]
    assert lines[3].split() == ["after", "fomc", "0.80", "0.60", "0.30"]
    assert lines[4].split() == ["after", "sciqa", "0.70", "—", "0.10"]
    mean, std = mean_matrix(SEED_MATRICES.values())
    assert "0.80 ± 0.10" in format_matrix(mean, ["a", "b"], digits=2, matrix_std=std)


# ----------------------------------------------------------------------------- score files

HEADER = "model,order,seed,step,checkpoint_task,eval_task,accuracy\n"


def _write(tmp_path: Path, text: str, name: str = "scores.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _score_lines(matrix: dict[int, dict[str, float]], order: list[str], seed: int, label: str) -> str:
    lines = []
    for step, row in matrix.items():
        checkpoint = "base" if step == 0 else order[step - 1]
        for task, accuracy in row.items():
            lines.append(f"smol,{label},{seed},{step},{checkpoint},{task},{accuracy}\n")
    return "".join(lines)


def test_read_scores_csv(tmp_path: Path) -> None:
    text = "seed,step,checkpoint_task,eval_task,accuracy,notes\n33,0,base,fomc,0.5,x\n33,1,fomc,fomc, 0.75 ,\n"
    path = _write(tmp_path, text)
    rows = read_scores_csv(path)
    assert rows == [
        ScoreRow(seed=33, step=0, checkpoint_task="base", eval_task="fomc", accuracy=0.5),
        ScoreRow(seed=33, step=1, checkpoint_task="fomc", eval_task="fomc", accuracy=0.75),
    ]
    with_groups = read_scores_csv(_write(tmp_path, HEADER + "smol,fwd,42,0,base,a,0.25\n", "g.csv"))
    assert with_groups[0].model == "smol" and with_groups[0].order == "fwd"


def test_read_scores_csv_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed,step,checkpoint_task,accuracy\n1,0,base,0.5\n")
    with pytest.raises(DataError) as info:
        read_scores_csv(path)
    message = str(info.value)
    assert "scores.csv: missing column(s) eval_task" in message
    assert "expected seed,step,checkpoint_task,eval_task,accuracy" in message


def test_read_scores_csv_bad_number_names_line_and_column(tmp_path: Path) -> None:
    body = "".join(f"1,0,base,t{i},0.5\n" for i in range(5))  # lines 2-6
    path = _write(tmp_path, "seed,step,checkpoint_task,eval_task,accuracy\n" + body + "1,0,base,x,abc\n")
    with pytest.raises(DataError, match=r"scores\.csv line 7: accuracy 'abc' is not a number"):
        read_scores_csv(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("x,0,base,a,0.5", r"line 2: seed 'x' is not an integer"),
        ("1,1.5,a,a,0.5", r"line 2: step '1.5' is not an integer"),
        ("1,-1,a,a,0.5", r"line 2: step -1 is negative"),
        ("1,0,base,,0.5", r"line 2: eval_task is empty"),
        ("1,0,base,a,nan", r"line 2: accuracy 'nan' is not a finite number"),
        ("1,0,base,a,", r"line 2: accuracy '' is not a number"),
    ],
)
def test_read_scores_csv_bad_values(tmp_path: Path, row: str, message: str) -> None:
    path = _write(tmp_path, f"seed,step,checkpoint_task,eval_task,accuracy\n{row}\n")
    with pytest.raises(DataError, match=message):
        read_scores_csv(path)


def test_read_scores_csv_duplicate_row(tmp_path: Path) -> None:
    text = HEADER + "smol,fwd,1,0,base,a,0.5\nsmol,rev,1,0,base,a,0.5\nsmol,fwd,1,0,base,a,0.6\n"
    with pytest.raises(DataError, match=r"scores\.csv line 4: duplicate .*first on line 2"):
        read_scores_csv(_write(tmp_path, text))


@pytest.mark.parametrize(("text", "message"), [("", "empty"), (HEADER, "no score rows")])
def test_read_scores_csv_empty(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_scores_csv(_write(tmp_path, text))


def test_read_scores_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.csv"):
        read_scores_csv(tmp_path / "nope.csv")


def _rows(matrix: dict[int, dict[str, float]], order: list[str], seed: int = 1, label: str = "") -> list[ScoreRow]:
    return [
        ScoreRow(seed, step, "base" if step == 0 else order[step - 1], task, accuracy, order=label)
        for step, row in matrix.items()
        for task, accuracy in row.items()
    ]


def test_infer_task_order() -> None:
    rows = _rows(MATRIX, REVERSED, seed=1) + _rows(MATRIX, REVERSED, seed=2)
    assert infer_task_order(rows) == REVERSED


def test_infer_task_order_from_base_row_only() -> None:
    # The study's convention: no trained checkpoint yet, tasks named task_1, task_2, ...
    rows = [ScoreRow(1, 0, "base", name, 0.5) for name in ("task_10", "task_2", "task_1")]
    assert infer_task_order(rows) == ["task_1", "task_2", "task_10"]


def test_infer_task_order_seeds_disagree() -> None:
    rows = _rows(MATRIX, FORWARD, seed=1) + _rows(MATRIX, REVERSED, seed=2)
    with pytest.raises(DataError, match="step 1 was trained on 'fomc' in seed 1 but on 'numglue' in seed 2"):
        infer_task_order(rows)


def test_infer_task_order_missing_step() -> None:
    rows = [row for row in _rows(MATRIX, FORWARD) if row.step != 2]
    with pytest.raises(DataError, match=r"step\(s\) 2"):
        infer_task_order(rows)


def test_infer_task_order_untrained_tasks_are_ambiguous() -> None:
    rows = [row for row in _rows(MATRIX, FORWARD) if row.step <= 1]  # run in progress
    with pytest.raises(DataError, match="numglue, sciqa were evaluated"):
        infer_task_order(rows)


def test_matrices_by_seed() -> None:
    matrices = matrices_by_seed(_rows(MATRIX, FORWARD, seed=42) + _rows(SEED_MATRICES[1], ["a", "b"], seed=7))
    assert list(matrices) == [7, 42]
    assert matrices[42] == MATRIX
    with pytest.raises(DataError, match="grouped"):
        matrices_by_seed(_rows(MATRIX, FORWARD) + _rows(MATRIX, REVERSED))


def test_metrics_for_scores_two_orders_in_one_file(tmp_path: Path) -> None:
    text = HEADER + "".join(
        _score_lines(MATRIX, order, seed, label)
        for label, order in (("forward", FORWARD), ("reversed", REVERSED))
        for seed in (33, 42)
    )
    results = metrics_for_scores(read_scores_csv(_write(tmp_path, text)))
    assert [key for key, _ in results] == [
        {"model": "smol", "order": "forward"},
        {"model": "smol", "order": "reversed"},
    ]
    for (_, aggregates), expected, order in zip(results, (EXPECTED_FORWARD, EXPECTED_REVERSED), (FORWARD, REVERSED)):
        assert [agg.checkpoint_task for agg in aggregates] == ["base", *order]
        assert all(agg.n_seeds == 2 for agg in aggregates)
        for name in METRIC_NAMES:
            _assert_close([agg.mean[name] for agg in aggregates], expected[name])
        # Both seeds are identical: every defined std is exactly 0.
        assert all(agg.std[name] in (None, 0.0) for agg in aggregates for name in METRIC_NAMES)


def test_metrics_for_scores_explicit_order_for_run_in_progress() -> None:
    rows = [row for row in _rows(MATRIX, FORWARD) if row.step <= 1]
    [(key, aggregates)] = metrics_for_scores(rows, task_order=FORWARD)
    assert key == {"model": "", "order": ""}
    assert [agg.step for agg in aggregates] == [0, 1, 2, 3]
    assert aggregates[1].mean["fwt"] == pytest.approx(0.1)
    assert aggregates[2].mean["op"] is None


def test_metrics_for_scores_unknown_task_in_order() -> None:
    message = r"task\(s\) piqa of the task order have no scores; known tasks: fomc, numglue, sciqa"
    with pytest.raises(DataError, match=message):
        metrics_for_scores(_rows(MATRIX, FORWARD), task_order=["fomc", "piqa", "sciqa"])


def test_metrics_for_scores_order_contradicting_checkpoints() -> None:
    with pytest.raises(DataError, match="order 'fwd': step 1 was trained on 'fomc'"):
        metrics_for_scores(_rows(MATRIX, FORWARD, label="fwd"), task_order=REVERSED)


def test_metrics_and_answers_do_not_import_torch() -> None:
    code = "import slmcl.metrics, slmcl.tasks.answers, sys; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
