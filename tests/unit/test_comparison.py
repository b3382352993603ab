"""Strategies as an experiment axis: the spec's entries, the runs they expand to, the comparison table."""

from __future__ import annotations

import csv
import io

import pytest

from slmcl import metrics as mx
from slmcl.config.spec import spec_from_dict
from slmcl.errors import SpecError
from slmcl.protocol.records import StageRecord
from slmcl.protocol.runs import plan_runs
from slmcl.protocol.tables import COMPARISON_COLUMNS, comparison_markdown, comparison_rows, write_tables
from slmcl.storage.local import LocalStore

BASE = {"name": "x", "tasks": ["fomc", "numgluecm"], "data_dir": "/nowhere", "seeds": [1, 2]}


def _spec(**extra: object):  # type: ignore[no-untyped-def]  # ExperimentSpec
    return spec_from_dict({**BASE, **extra}, check_files=False, environ={})


def test_strategies_expand_into_runs_named_by_their_label() -> None:
    spec = _spec(strategies=["lora", {"name": "replay", "options": {"share": 0.5}},
                             {"name": "replay", "label": "replay-10", "options": {"share": 0.1}}])
    ids = [r.run_id for r in plan_runs(spec)]
    assert ids == ["fomc.numgluecm-s1", "fomc.numgluecm-s2", "fomc.numgluecm-s1-replay", "fomc.numgluecm-s2-replay",
                   "fomc.numgluecm-s1-replay-10", "fomc.numgluecm-s2-replay-10"]
    assert spec.strategy_entry("replay-10").options == {"share": 0.1}
    assert spec.strategy_entry("replay").options == {"share": 0.5}


def test_one_strategy_keeps_the_studys_run_ids() -> None:
    assert [r.run_id for r in plan_runs(_spec())] == ["fomc.numgluecm-s1", "fomc.numgluecm-s2"]
    spec = _spec(strategy={"name": "replay"})
    assert [r.run_id for r in plan_runs(spec)] == ["fomc.numgluecm-s1-replay", "fomc.numgluecm-s2-replay"]
    assert [s.key for s in spec.strategies] == ["replay"]


def test_the_resolved_spec_loads_again() -> None:  # services pass the resolved spec as JSON
    spec = _spec(strategies=["lora", "replay"])
    again = spec_from_dict(spec.to_dict(), check_files=False, environ={})
    assert again.strategies == spec.strategies and again.strategy == spec.strategy


@pytest.mark.parametrize(("strategies", "message"), [
    (["lora", "lora"], r"strategies: 'lora' is listed twice"),
    (["lora", {"name": "replay", "options": {"shar": 0.1}}], r"strategies\[1\]\.options\.shar: unknown option"),
    (["lroa"], r"strategies\[0\]\.name: unknown strategy 'lroa'\. Did you mean 'lora'\?"),
    ([{"name": "replay", "label": "Bad Label"}], r"strategies\[0\]\.label: must be lowercase"),
])
def test_bad_entries_name_the_field(strategies: list[object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(strategies=strategies)


def test_a_strategy_may_change_training_settings() -> None:
    spec = _spec(training={"lr": 2e-4}, strategies=["lora", {"name": "replay", "training": {"lr": 1e-5, "epochs": 2}}])
    assert spec.training_for(spec.strategy_entry("lora")).lr == 2e-4
    replay = spec.training_for(spec.strategy_entry("replay"))
    assert (replay.lr, replay.epochs, replay.batch_size) == (1e-5, 2, spec.training.batch_size)
    with pytest.raises(SpecError, match=r"strategies\[1\]\.training\.lr: must be > 0, got -1"):
        _spec(strategies=["lora", {"name": "replay", "training": {"lr": -1}}])
    with pytest.raises(SpecError, match=r"strategies\[0\]\.training\.lrr: unknown key"):
        _spec(strategies=[{"name": "replay", "training": {"lrr": 1}}])


def test_strategy_and_strategies_together_is_refused() -> None:
    with pytest.raises(SpecError, match=r"strategy: give either"):
        _spec(strategy={"name": "replay"}, strategies=["lora"])


def test_run_fwt_worked_by_hand() -> None:
    order = ["a", "b", "c"]
    matrix = {0: {"a": 0.1, "b": 0.2, "c": 0.3}, 1: {"a": 0.5, "b": 0.4, "c": 0.3},
              2: {"a": 0.4, "b": 0.6, "c": 0.6}, 3: {"a": 0.4, "b": 0.5, "c": 0.7}}
    # b before it was learned: R[1][b] - R[0][b] = 0.2; c: R[2][c] - R[0][c] = 0.3; mean 0.25
    assert mx.run_fwt(matrix, order) == pytest.approx(0.25)
    assert mx.run_fwt({0: {"a": 0.1}, 1: {"a": 0.2}}, ["a"]) is None


def _records(strategy: str, seed: int, accs: dict[int, dict[str, float]], kl: float, seconds: float,
             size: int) -> list[StageRecord]:
    order = ["a", "b"]
    rid = f"a.b-s{seed}-{strategy}"
    recs = []
    for step, row in accs.items():
        scores = {t: {"accuracy": v, "correct": 0, "total": 10, "score_sum": 0.0} for t, v in row.items()}
        stab = {"kl_to_base_mean": kl * step / 2, "entropy_delta_mean": -0.1 * step, "margin_delta_mean": 0.2 * step}
        recs.append(StageRecord(rid, order, seed, step, "base" if step == 0 else order[step - 1], "m", scores, stab,
                                timing={"train_seconds": seconds} if step else {}, strategy=strategy,
                                checkpoint_bytes=size if step else 0, trainable_params=100 if step else 0))
    return recs


def test_comparison_rows_worked_by_hand() -> None:
    base = {"a": 0.0, "b": 0.0}
    recs = (_records("lora", 1, {0: base, 1: {"a": 0.6, "b": 0.2}, 2: {"a": 0.4, "b": 0.8}}, 0.3, 2.0, 1_000_000)
            + _records("lora", 2, {0: base, 1: {"a": 0.8, "b": 0.0}, 2: {"a": 0.6, "b": 0.6}}, 0.5, 4.0, 1_000_000)
            + _records("osf", 1, {0: base, 1: {"a": 0.5, "b": 0.1}}, 0.2, 9.0, 5_000_000))  # unfinished run
    rows = {r["strategy"]: r for r in comparison_rows(recs)}
    lora = rows["lora"]
    assert lora["runs"] == 2
    # final average accuracy = OP at the last step: seed 1 (0.4+0.8)/2 = 0.6, seed 2 (0.6+0.6)/2 = 0.6
    assert lora["final_avg_acc"] == pytest.approx(0.6) and lora["final_avg_acc_std"] == pytest.approx(0.0)
    # BWT at step 2: seed 1: 0.4-0.6 = -0.2; seed 2: 0.6-0.8 = -0.2
    assert lora["bwt"] == pytest.approx(-0.2)
    # run FWT: R[1][b] - R[0][b]: 0.2 and 0.0 -> mean 0.1, sample std 0.1414
    assert lora["fwt"] == pytest.approx(0.1) and lora["fwt_std"] == pytest.approx(0.02 ** 0.5)
    # LA: mean diagonal: seed 1 (0.6+0.8)/2 = 0.7, seed 2 (0.8+0.6)/2 = 0.7
    assert lora["learning_accuracy"] == pytest.approx(0.7)
    assert lora["kl_to_base"] == pytest.approx(0.4) and lora["entropy_delta"] == pytest.approx(-0.2)
    assert lora["margin_delta"] == pytest.approx(0.4)
    assert lora["seconds_per_stage"] == pytest.approx(3.0) and lora["checkpoint_mb"] == pytest.approx(1.0)
    assert lora["trainable_params"] == 100
    assert rows["osf"]["runs"] == 0 and rows["osf"]["op"] is None  # a run counts once it is finished

    md = comparison_markdown(list(rows.values()))
    assert "| m | lora | 2 | 0.600 ± 0.000 |" in md and "| m | osf | 0 | — |" in md


def test_write_tables_writes_the_comparison(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = {"a": 0.0, "b": 0.0}
    recs = _records("lora", 1, {0: base, 1: {"a": 0.6, "b": 0.2}, 2: {"a": 0.4, "b": 0.8}}, 0.3, 2.0, 10)
    write_tables(LocalStore(tmp_path), recs)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "comparison.csv").read_text())))
    assert list(rows[0]) == COMPARISON_COLUMNS and rows[0]["strategy"] == "lora"
    assert (tmp_path / "comparison.md").read_text().startswith("| model | strategy | runs |")
