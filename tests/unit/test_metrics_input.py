"""What users' scores files hold: re-run rows, several orders, runs in progress, and what stays ambiguous.

Every expected number is worked out by hand from the matrix below; every line number is the
file's own (header = line 1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from slmcl.cli.main import main
from slmcl.errors import DataError
from slmcl.metrics import AggregateStepMetrics, metrics_for_scores, read_scores_csv
from slmcl.metrics.scores import order_from_column

# R[k][task] of one run in the order fomc -> sciqa -> numglue (k = 0 is the base model).
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
BASIC = "seed,step,checkpoint_task,eval_task,accuracy\n"
WITH_ORDER = "seed,step,checkpoint_task,eval_task,accuracy,order\n"


def _lines(order: list[str], seed: int, order_cell: str | None = None, last_step: int = 3) -> str:
    """One run's rows, 3 per step in the column order of MATRIX: step k's rows are lines 3k+2 .. 3k+4."""
    out = []
    for step in range(last_step + 1):
        checkpoint = "base" if step == 0 else order[step - 1]
        for task, accuracy in MATRIX[step].items():
            cells = [str(seed), str(step), checkpoint, task, str(accuracy)]
            if order_cell is not None:
                cells.append(order_cell)
            out.append(",".join(cells) + "\n")
    return "".join(out)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scores.csv"
    path.write_text(text, encoding="utf-8")
    return path


def _means(aggregates: Sequence[AggregateStepMetrics], name: str) -> list[float | None]:
    return [agg.mean[name] for agg in aggregates]


def _close(actual: list[float | None], expected: list[float | None]) -> None:
    assert [a is None for a in actual] == [e is None for e in expected]
    for a, e in zip(actual, expected):
        if e is not None:
            assert a == pytest.approx(e, abs=1e-12)


# ----------------------------------------------------------------------------- re-run rows


def _rerun_file(tmp_path: Path) -> Path:
    # Lines 2-13: the run. Lines 14-16: a re-run of step 1 appended, R1[fomc] first 0.5 then 0.6
    # (the last row wins), R1[sciqa] repeated unchanged. Line 5 is the first R1[fomc].
    rerun = "1,1,fomc,fomc,0.5\n1,1,fomc,fomc,0.6\n1,1,fomc,sciqa,0.6\n"
    return _write(tmp_path, BASIC + _lines(FORWARD, 1) + rerun)


def test_rerun_rows_replace_earlier_ones_and_change_the_metrics(tmp_path: Path) -> None:
    """R1[fomc] 0.8 -> 0.6. By hand: OP_1 = 0.6; adaptation gain_1 = 0.6 - 0.4 = 0.2;
    BWT_2 = R2[fomc] - R1[fomc] = 0.7 - 0.6 = 0.1 (was -0.1); BWT_3 = mean(0.6 - 0.6, 0.7 - 0.9) = -0.1
    (was -0.2); LA_3 = mean(0.6, 0.9, 0.5) = 2/3. FWT_1 = mean(0.6 - 0.5, 0.3 - 0.2) = 0.1 is untouched."""
    path = _rerun_file(tmp_path)
    rows = read_scores_csv(path, last_row_wins=True)
    assert rows.superseded == 3
    assert len(rows) == 12
    [(key, aggregates)] = metrics_for_scores(rows)
    assert key == {"model": "", "order": ""}
    _close(_means(aggregates, "op"), [None, 0.6, 0.8, 0.6])
    _close(_means(aggregates, "bwt"), [None, None, 0.1, -0.1])
    _close(_means(aggregates, "forgetting"), [None, None, -0.1, 0.1])
    _close(_means(aggregates, "adaptation_gain"), [None, 0.2, 0.3, 0.4])
    _close(_means(aggregates, "learning_accuracy"), [None, 0.6, 0.75, 2 / 3])
    _close(_means(aggregates, "fwt"), [0.0, 0.1, -0.1, None])


def test_rerun_warning_names_the_file_the_count_and_the_key(tmp_path: Path) -> None:
    path = _rerun_file(tmp_path)
    assert read_scores_csv(path, last_row_wins=True).warnings == [
        f"{path}: 3 rows repeat an earlier (seed, step, checkpoint_task, eval_task) and replace it "
        "(the last row per key wins; the first is line 14, which replaces line 5)"
    ]
    one = _write(tmp_path, BASIC + _lines(FORWARD, 1) + "1,3,numglue,numglue,0.25\n")
    assert read_scores_csv(one, last_row_wins=True).warnings == [
        f"{one}: 1 row repeats an earlier (seed, step, checkpoint_task, eval_task) and replaces it "
        "(the last row per key wins; the first is line 14, which replaces line 13)"
    ]


def test_a_file_without_repeats_has_no_warning(tmp_path: Path) -> None:
    rows = read_scores_csv(_write(tmp_path, BASIC + _lines(FORWARD, 1) + _lines(FORWARD, 2)), last_row_wins=True)
    assert rows.superseded == 0 and rows.warnings == []


def test_repeats_stay_an_error_unless_asked_to_replace(tmp_path: Path) -> None:
    path = _rerun_file(tmp_path)
    with pytest.raises(DataError, match=rf"^{path} line 14: duplicate score for seed 1, step 1, task 'fomc' "
                                        r"\(first on line 5\)$"):
        read_scores_csv(path)


def test_cli_prints_the_warning_and_the_corrected_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _rerun_file(tmp_path)
    assert main(["metrics", "--scores", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"slmcl: warning: {path}: 3 rows repeat an earlier (seed, step, checkpoint_task, eval_task) and replace "
        "it (the last row per key wins; the first is line 14, which replaces line 5)\n"
    )
    steps = json.loads(captured.out)
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert steps[2]["bwt"] == pytest.approx(0.1) and steps[3]["bwt"] == pytest.approx(-0.1)


def test_group_columns_are_part_of_the_key(tmp_path: Path) -> None:
    """Two strategies of the same run key are two runs, not a re-run: no warning, two groups."""
    header = "seed,step,checkpoint_task,eval_task,accuracy,strategy\n"
    lora = "".join(line.rstrip("\n") + ",lora\n" for line in _lines(FORWARD, 1).splitlines(keepends=True))
    replay = "".join(line.rstrip("\n") + ",replay\n" for line in _lines(FORWARD, 1).splitlines(keepends=True))
    rows = read_scores_csv(_write(tmp_path, header + lora + replay), last_row_wins=True)
    assert rows.superseded == 0
    results = metrics_for_scores(rows)
    assert [key for key, _ in results] == [
        {"model": "", "strategy": "lora", "order": ""},
        {"model": "", "strategy": "replay", "order": ""},
    ]
    for _, aggregates in results:
        _close(_means(aggregates, "bwt"), [None, None, -0.1, -0.2])


# ----------------------------------------------------------------------------- orders


def test_two_orders_in_one_file_give_two_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Forward (seeds 1 and 2) and reversed (seed 1) in one file; the same numbers read in each order.
    By hand, forward: OP = .8, .8, .6; BWT_2 = .7-.8 = -.1, BWT_3 = mean(.6-.8, .7-.9) = -.2.
    Reversed: OP = R1[numglue] = .3, mean(.1, .9) = .5, mean(.5, .7, .6) = .6;
    BWT_2 = .1-.3 = -.2, BWT_3 = mean(.5-.3, .7-.9) = 0; FWT_1 = mean(.6-.5, .8-.4) = .25.
    A re-run row of the forward order (R3[numglue], line 38), appended after the reversed rows,
    keeps the groups in file order."""
    fwd, rev = "fomc.sciqa.numglue", "numglue.sciqa.fomc"
    text = WITH_ORDER + _lines(FORWARD, 1, fwd) + _lines(FORWARD, 2, fwd) + _lines(REVERSED, 1, rev)
    path = _write(tmp_path, text + f"2,3,numglue,numglue,0.5,{fwd}\n")
    rows = read_scores_csv(path, last_row_wins=True)
    assert rows.superseded == 1
    results = metrics_for_scores(rows)
    assert [key for key, _ in results] == [{"model": "", "order": fwd}, {"model": "", "order": rev}]
    (_, forward), (_, reversed_) = results
    assert [agg.checkpoint_task for agg in forward] == ["base", *FORWARD]
    assert [agg.n_seeds for agg in forward] == [2, 2, 2, 2] and [agg.n_seeds for agg in reversed_] == [1, 1, 1, 1]
    _close(_means(forward, "op"), [None, 0.8, 0.8, 0.6])
    _close(_means(forward, "bwt"), [None, None, -0.1, -0.2])
    assert [agg.checkpoint_task for agg in reversed_] == ["base", *REVERSED]
    _close(_means(reversed_, "op"), [None, 0.3, 0.5, 0.6])
    _close(_means(reversed_, "bwt"), [None, None, -0.2, 0.0])
    _close(_means(reversed_, "fwt"), [0.0, 0.25, 0.3, None])

    assert main(["metrics", "--scores", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(out) if line.startswith("== ")]
    assert [out[i] for i in headers] == [f"== order {fwd} ==", f"== order {rev} =="]
    second = out[headers[1] + 3:headers[1] + 7]  # header, column names, rule, then steps 0-3
    assert [line.split()[1] for line in second] == ["base", *REVERSED]
    assert second[1].split()[2] == "0.300"  # OP_1 of the reversed order


@pytest.mark.parametrize(
    "cell",
    ["fomc.sciqa.numglue", "fomc>sciqa>numglue", "fomc -> sciqa -> numglue", "fomc → sciqa → numglue",
     '"fomc,sciqa,numglue"', "fomc;sciqa;numglue"],
)
def test_order_column_gives_the_order_of_a_run_in_progress(tmp_path: Path, cell: str) -> None:
    """Steps 0 and 1 only: the checkpoints name fomc alone, the order column the rest.
    By hand: OP_1 = .8, FWT_1 = mean(.6-.5, .3-.2) = .1, avg all_1 = 1.7/3; steps 2 and 3 have no scores."""
    path = _write(tmp_path, WITH_ORDER + _lines(FORWARD, 1, cell, last_step=1))
    [(_, aggregates)] = metrics_for_scores(read_scores_csv(path, last_row_wins=True))
    assert [agg.checkpoint_task for agg in aggregates] == ["base", *FORWARD]
    _close(_means(aggregates, "op"), [None, 0.8, None, None])
    _close(_means(aggregates, "fwt"), [0.0, 0.1, None, None])
    _close(_means(aggregates, "avg_all_tasks"), [1.1 / 3, 1.7 / 3, None, None])


def test_order_column_may_name_tasks_not_reached_yet() -> None:
    assert order_from_column("fomc.sciqa.numglue", {"fomc"}) == FORWARD


def test_order_column_values_that_are_names() -> None:
    tasks = {"fomc", "sciqa"}
    assert order_from_column("forward", tasks) is None
    assert order_from_column("", tasks) is None
    assert order_from_column("fomc.piqa", tasks) is None  # does not list sciqa
    assert order_from_column("fomc.sciqa.fomc", tasks) is None  # a task twice is no order
    # An arrow or '>' is tried before '.', so names with '.' or '-' survive; a lone name is an order of one.
    assert order_from_column("FOMC -> NumGLUE-cm.v2", {"FOMC", "NumGLUE-cm.v2"}) == ["FOMC", "NumGLUE-cm.v2"]
    assert order_from_column("numglue.cm", {"numglue.cm"}) == ["numglue.cm"]


def test_our_own_scores_csv_layout(tmp_path: Path) -> None:
    """The columns slmcl writes (order = tasks joined by '.', plus model and strategy), a run stopped at step 2."""
    header = "seed,step,checkpoint_task,eval_task,eval_task_name,accuracy,correct,total,order,model,strategy\n"
    body = "".join(
        f"42,{step},{'base' if step == 0 else FORWARD[step - 1]},{task},{task},{acc},1,2,"
        "fomc.sciqa.numglue,smol,lora\n"
        for step in (0, 1, 2) for task, acc in MATRIX[step].items()
    )
    [(key, aggregates)] = metrics_for_scores(read_scores_csv(_write(tmp_path, header + body), last_row_wins=True))
    assert key == {"model": "smol", "strategy": "lora", "order": "fomc.sciqa.numglue"}
    assert [agg.checkpoint_task for agg in aggregates] == ["base", *FORWARD]
    _close(_means(aggregates, "bwt"), [None, None, -0.1, None])


# ----------------------------------------------------------------------------- what stays ambiguous


def test_two_orders_of_one_seed_without_an_order_column(tmp_path: Path) -> None:
    # Lines 2-13 forward, 14-25 reversed, same seed: step 0 repeats, step 1 (line 17) cannot.
    path = _write(tmp_path, BASIC + _lines(FORWARD, 1) + _lines(REVERSED, 1))
    message = (
        f"{path} line 17: checkpoint_task 'numglue' at seed 1, step 1 contradicts 'fomc' on line 5; "
        "two task orders in one file? add an order column (e.g. t1.t2.t3) to tell their runs apart"
    )
    with pytest.raises(DataError) as info:
        read_scores_csv(path, last_row_wins=True)
    assert str(info.value) == message


def test_one_order_value_with_two_checkpoints_at_a_step(tmp_path: Path) -> None:
    path = _write(tmp_path, WITH_ORDER + _lines(FORWARD, 1, "x") + "1,2,numglue,fomc,0.1,x\n")
    with pytest.raises(DataError) as info:
        read_scores_csv(path, last_row_wins=True)
    assert str(info.value) == (
        f"{path} line 14: checkpoint_task 'numglue' at seed 1, step 2 contradicts 'sciqa' on line 8; "
        "both rows name order 'x', so one of them is in the wrong run"
    )


def test_empty_order_cell_beside_named_orders_of_the_seed(tmp_path: Path) -> None:
    path = _write(tmp_path, WITH_ORDER + _lines(FORWARD, 1, "fomc.sciqa.numglue") + "1,2,sciqa,fomc,0.7,\n")
    with pytest.raises(DataError) as info:
        read_scores_csv(path, last_row_wins=True)
    assert str(info.value) == (
        f"{path} line 14: order is empty, but seed 1 also has rows of order 'fomc.sciqa.numglue' (line 2); "
        "fill in the order column so that every row belongs to one run"
    )


def test_order_column_contradicting_the_checkpoints(tmp_path: Path) -> None:
    path = _write(tmp_path, WITH_ORDER + _lines(REVERSED, 1, "fomc.sciqa.numglue"))
    with pytest.raises(DataError) as info:
        metrics_for_scores(read_scores_csv(path, last_row_wins=True))
    assert str(info.value) == (
        f"{path} line 5: order 'fomc.sciqa.numglue': step 1 was trained on 'numglue' (column checkpoint_task), "
        "but column order 'fomc.sciqa.numglue' puts 'fomc' there"
    )


def test_explicit_order_contradicting_the_order_column(tmp_path: Path) -> None:
    path = _write(tmp_path, WITH_ORDER + _lines(FORWARD, 1, "fomc.sciqa.numglue", last_step=1))
    with pytest.raises(DataError) as info:
        metrics_for_scores(read_scores_csv(path, last_row_wins=True), task_order=REVERSED)
    assert str(info.value) == (
        f"{path} line 2: order 'fomc.sciqa.numglue': the task order numglue,sciqa,fomc contradicts "
        "column order 'fomc.sciqa.numglue'"
    )


def test_seeds_of_different_orders_without_an_order_column(tmp_path: Path) -> None:
    path = _write(tmp_path, BASIC + _lines(FORWARD, 1) + _lines(REVERSED, 2))
    with pytest.raises(DataError) as info:
        metrics_for_scores(read_scores_csv(path, last_row_wins=True))
    assert str(info.value) == (
        f"{path} line 17: step 1 was trained on 'fomc' in seed 1 but on 'numglue' in seed 2 "
        "(column checkpoint_task; seed 1's is line 5); seeds of different task orders need an order column, "
        "or split the file by order"
    )


@pytest.mark.parametrize(("header", "cell", "label", "hint"), [
    (BASIC, None, "", " or write it in an order column (e.g. t1.t2.t3)"),
    (WITH_ORDER, "forward", "order 'forward': ", "; column order 'forward' does not list these tasks"),
])
def test_run_in_progress_without_a_spelled_order(
    tmp_path: Path, header: str, cell: str | None, label: str, hint: str
) -> None:
    # Line 3 (step 0, sciqa) is the first row of a task no checkpoint trained on.
    path = _write(tmp_path, header + _lines(FORWARD, 1, cell, last_step=1))
    with pytest.raises(DataError) as info:
        metrics_for_scores(read_scores_csv(path, last_row_wins=True))
    assert str(info.value) == (
        f"{path} line 3: {label}task(s) numglue, sciqa were evaluated but no checkpoint was trained on them "
        "(column eval_task), so the task order cannot be inferred (a run still in progress?): "
        f"pass the task order explicitly{hint}"
    )
    [(_, aggregates)] = metrics_for_scores(read_scores_csv(path, last_row_wins=True), task_order=FORWARD)
    assert [agg.step for agg in aggregates] == [0, 1, 2, 3]


def test_cli_error_is_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, BASIC + _lines(FORWARD, 1) + _lines(REVERSED, 1))
    assert main(["metrics", "--scores", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"slmcl: error: {path} line 17: checkpoint_task 'numglue'")
    assert captured.err.count("\n") == 1
