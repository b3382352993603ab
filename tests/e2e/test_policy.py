"""The stability policy acting on a real run: a tiny model trained with a learning rate high enough
to push KL to base over a threshold on purpose, and each action's effect on checkpoints and records."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from slmcl.cli.main import main
from slmcl.config.spec import spec_from_dict
from slmcl.models.lora import adapter_state
from slmcl.protocol.embedded import ExperimentRunner
from slmcl.protocol.events import Event
from tests.conftest import tiny_spec_dict

TASKS = ["fomc", "scienceqa", "numgluecm"]
RID = "fomc.scienceqa.numgluecm-s7"
# With lr 0.05 on 8 rows per task, the tiny model's reference KL after stages 1, 2, 3 is about
# 0.004, 0.044, 0.006: stage 2 crosses 0.03 and stage 1 does not.
THRESHOLD = 0.03


class Interrupted(Exception):
    pass


def _spec(model: Path, data: Path, out: Path, policy: list[dict[str, Any]], **over: Any) -> Any:
    over.setdefault("training", {"lr": 0.05, "max_examples": 8})
    over.setdefault("monitoring", {"task_drift_examples": 4, "attribution": False})
    return spec_from_dict(tiny_spec_dict(model, data, out, tasks=TASKS, policy=policy, **over))


def _record(out: Path, step: int) -> dict[str, Any]:
    return json.loads((out / "runs" / RID / f"stage-{step}.json").read_text())


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _run(spec: Any, on_event: Any = None) -> list[Event]:
    events: list[Event] = []

    def progress(e: Event) -> None:
        events.append(e)
        if on_event is not None:
            on_event(e)

    ExperimentRunner(spec, progress).run()
    return events


@pytest.mark.slow
def test_stop_ends_the_run_after_the_stage_that_crossed(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = _spec(tiny_model_dir, data_dir, out, [{"action": "stop", "kl_mean": THRESHOLD}])
    events = _run(spec)
    assert [e.stage for e in events if e.kind == "stage_done"] == [1, 2]
    stops = [e for e in events if e.kind == "intervention"]
    assert [(e.stage, e.data["action"], e.data["statistic"]) for e in stops] == [(2, "stop", "kl_mean")]
    assert stops[0].data["value"] > THRESHOLD == stops[0].data["threshold"]

    # no later stage exists: no record, no training record, no checkpoint
    assert not (out / "runs" / RID / "stage-3.json").exists()
    assert not (out / "runs" / RID / "trained-3.json").exists()
    assert not (out / "checkpoints" / RID / "step-3").exists()
    assert json.loads((out / "runs" / RID / "stopped.json").read_text())["step"] == 2
    assert _record(out, 2)["interventions"][0]["action"] == "stop"
    # the stopping stage is the run's last, so it is fully evaluated, and the run counts as finished
    assert set(_record(out, 2)["scores"]) == set(TASKS)
    assert [r["intervention"] for r in _csv(out / "stability.csv")] == ["", "", "stop"]
    assert _csv(out / "interventions.csv")[0]["action"] == "stop"
    comparison = _csv(out / "comparison.csv")
    assert comparison[0]["runs"] == "1" and comparison[0]["op"] != ""

    # run again: the run is done, nothing is trained or recorded twice
    again = _run(spec)
    assert not [e for e in again if e.kind in ("stage_started", "stage_done")]
    assert len(list((out / "runs" / RID).glob("stage-*.json"))) == 3


@pytest.mark.slow
def test_revert_restarts_from_the_last_healthy_checkpoint(tiny_model_dir: Path, data_dir: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = _spec(tiny_model_dir, data_dir, out, [{"action": "revert", "kl_mean": THRESHOLD}])
    held: dict[int, dict[str, torch.Tensor]] = {}
    runner_box: list[ExperimentRunner] = []

    def on_event(e: Event) -> None:
        if e.kind == "stage_started":  # the weights the stage starts from, as the engine holds them
            engine = runner_box[0].engine
            held[e.stage] = {k: v.clone() for k, v in adapter_state(engine.model).items()}

    runner = ExperimentRunner(spec, on_event)
    runner_box.append(runner)
    runner.run()

    rec2, rec3 = _record(out, 2), _record(out, 3)
    assert rec2["interventions"][0]["action"] == "revert" and rec2["starts_from"] == 1
    assert set(rec2["scores"]) == set(TASKS)  # the reverted stage's matrix row is still recorded, and marked
    assert rec3["starts_from"] == 1  # stage 3 starts from stage 1's weights, not stage 2's
    ckpt1 = load_file(str(out / "checkpoints" / RID / "step-1" / "adapter_model.safetensors"))
    ckpt2 = load_file(str(out / "checkpoints" / RID / "step-2" / "adapter_model.safetensors"))
    start3 = held[3]
    assert len(ckpt1) == len(start3)
    for name, saved in ckpt1.items():  # bit-identical to checkpoint 1 ...
        resident = next(v for k, v in start3.items() if k.replace(".default", "") == name)
        assert torch.equal(resident, saved), name
    assert any(not torch.equal(ckpt1[n], ckpt2[n]) for n in ckpt1)  # ... which differs from checkpoint 2
    assert [r["intervention"] for r in _csv(out / "scores.csv") if r["step"] == "2"] == ["revert"] * len(TASKS)

    # interrupted right after the reverted stage, a resumed run follows the recorded decision
    out2 = tmp_path / "resumed"
    spec2 = _spec(tiny_model_dir, data_dir, out2, [{"action": "revert", "kl_mean": THRESHOLD}])

    def interrupt(e: Event) -> None:
        if e.kind == "stage_started" and e.stage == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(spec2, interrupt)
    _run(spec2)
    assert _record(out2, 3)["starts_from"] == 1
    assert _record(out2, 3)["stability"] == pytest.approx(rec3["stability"])
    a = load_file(str(out / "checkpoints" / RID / "step-3" / "adapter_model.safetensors"))
    b = load_file(str(out2 / "checkpoints" / RID / "step-3" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_alert_records_every_crossing_and_changes_nothing(tiny_model_dir: Path, data_dir: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the new-task signal drives it: KL on the stage's own training prompts, over a tiny p95 bound
    spec = _spec(tiny_model_dir, data_dir, out, [{"action": "alert", "signal": "task", "kl_p95": 1e-4}])
    events = _run(spec)
    alerts = [e for e in events if e.kind == "intervention"]
    assert [(e.stage, e.data["signal"]) for e in alerts] == [(1, "task"), (2, "task"), (3, "task")]
    for k in (1, 2, 3):
        rec = _record(out, k)
        assert rec["starts_from"] == k - 1  # nothing reverted
        assert rec["interventions"][0]["value"] == pytest.approx(rec["stability"]["task_kl_to_base_p95"])
        assert rec["stability"]["task_drift_examples"] == 4
    # the new-task signal before a stage is the previous checkpoint's drift on that task's prompts
    assert _record(out, 1)["stability"]["task_kl_to_base_mean_before"] == 0.0
    assert _record(out, 2)["stability"]["task_kl_to_base_mean_before"] > 0.0
    assert len(_csv(out / "interventions.csv")) == 3


@pytest.mark.slow
def test_early_stop_ends_the_stage_before_it_crosses(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    threshold = 0.01
    # 24 rows: 6 optimizer steps per stage at lr 0.1; checked after every step on the whole reference set
    spec = _spec(tiny_model_dir, data_dir, out, [
        {"action": "early-stop", "kl_mean": threshold, "every": 1, "examples": 6}],
        training={"lr": 0.1, "max_examples": 24})
    _run(spec)
    rec1 = _record(out, 1)
    stop = rec1["interventions"][0]
    assert stop["action"] == "early-stop"
    assert stop["kept_step"] < stop["at_step"] < stop["total_steps"] == 6  # ended before its last step
    assert len(rec1["train"]["steps"]) == stop["at_step"]  # no optimizer step after the check that crossed
    assert stop["value"] > threshold
    for k in (1, 2, 3):  # every stage's kept weights stay under the threshold on the reference set
        assert _record(out, k)["stability"]["kl_to_base_mean"] < threshold


@pytest.mark.slow
def test_evaluation_every_estimates_accuracy_between_full_evaluations(tiny_model_dir: Path, data_dir: Path,
                                                                      tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    spec = _spec(tiny_model_dir, data_dir, out, [], evaluation={"every": 2},
                 monitoring={"task_drift_examples": 0, "attribution": True, "layer_ablation": True,
                             "layer_ablation_examples": 4})
    events = _run(spec)
    assert _record(out, 1)["scores"] == {}  # between full evaluations: drift only
    assert _record(out, 1)["stability"]["kl_to_base_mean"] > 0
    assert set(_record(out, 2)["scores"]) == set(TASKS) == set(_record(out, 3)["scores"])
    done = {e.stage: e.data for e in events if e.kind == "stage_done"}
    assert done[1]["estimate"]["estimated"] is True and done[2]["estimate"] is None
    rows = {int(r["step"]): r for r in _csv(out / "estimates.csv")}
    assert rows[1]["kind"] == "estimated" and 0.0 <= float(rows[1]["avg_accuracy"]) <= 1.0
    assert rows[0]["kind"] == rows[2]["kind"] == rows[3]["kind"] == "measured"
    assert rows[1]["calibration_points"] == "3"  # base, stage 2, stage 3
    summary = json.loads((out / "summary.json").read_text())
    corr = summary["correlation"][spec.model.name]
    assert corr["points"] == 3 and "fewer than 6" in corr["warning"]
    # the attribution of every stage is written, module and layer rows of the tiny model's 2 layers
    attribution = _csv(out / "drift_attribution.csv")
    assert {r["step"] for r in attribution} == {"1", "2", "3"}
    layers = [r for r in attribution if r["scope"] == "layer"]
    assert {r["layer"] for r in layers} == {"0", "1"}
    assert all(r["kl_share_removed"] != "" for r in layers)  # the leave-one-layer-out pass ran
    assert all(r["kl_share_removed"] == "" for r in attribution if r["scope"] == "module")

    # the tables are derived: deleted, `slmcl tables` rebuilds them from the records and prints the report
    (out / "estimates.csv").unlink()
    assert main(["tables", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ESTIMATED average accuracy" in printed and "fewer than 6" in printed and "Where the drift sits" in printed
    assert _csv(out / "estimates.csv")[1]["kind"] == "estimated"
    assert main(["tables", str(tmp_path)]) == 2  # not a results directory: one line, exit 2
