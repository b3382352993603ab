"""`slmcl run` end to end: a tiny random model (fast, exact checks) and the real SmolLM2."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slmcl.config.spec import spec_from_dict
from slmcl.errors import CancelledError
from slmcl.protocol.embedded import ExperimentRunner
from tests.conftest import REPO, tiny_spec_dict

SLMCL = [sys.executable, "-m", "slmcl.cli.main"]

# Markers (pyproject): `integration` where the test starts `slmcl` processes, `slow` where it takes > ~10 s.


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_run_writes_the_results_layout(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    spec_file = _write_spec(tmp_path / "spec.yaml", tiny_spec_dict(
        tiny_model_dir, data_dir, out, orders=[["fomc", "numgluecm"], ["numgluecm", "fomc"]], seeds=[1, 2]))
    proc = subprocess.run([*SLMCL, "run", str(spec_file), "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Accuracy matrix" in proc.stdout and "Continual-learning metrics" in proc.stdout
    assert "Stability on the reference set" in proc.stdout

    scores = _csv(out / "scores.csv")
    # 2 orders x 2 seeds x (base + 2 stages) x 2 tasks, each exactly once
    keys = [(r["order"], r["seed"], r["step"], r["eval_task"]) for r in scores]
    assert len(keys) == 2 * 2 * 3 * 2 == len(set(keys))
    assert list(scores[0])[:8] == ["seed", "step", "checkpoint_task", "eval_task", "eval_task_name", "accuracy",
                                   "correct", "total"]
    # the base is evaluated once and shared: step-0 rows agree across seeds and orders
    base = {(r["eval_task"], r["accuracy"]) for r in scores if r["step"] == "0"}
    assert len(base) == 2
    assert len(list((out / "cache" / "base-eval").iterdir())) == 2

    stab = _csv(out / "stability.csv")
    assert len(stab) == 2 * 2 * 3
    for r in stab:
        kl = float(r["kl_to_base_mean"])
        assert (kl == 0.0) if r["step"] == "0" else (kl > 0.0)
        assert int(r["num_reference_examples"]) == 6

    for order in ("fomc.numgluecm", "numgluecm.fomc"):
        for step in (1, 2):
            ckpt = out / "checkpoints" / f"{order}-s1" / f"step-{step}"
            assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    pred = (out / "predictions" / "fomc.numgluecm-s1" / "step-1" / "fomc.jsonl").read_text().splitlines()
    row = json.loads(pred[0])
    assert set(row) >= {"prompt", "gold", "prediction", "raw_output", "hit_max_tokens", "correct"}
    losses = _csv(out / "train_loss.csv")
    assert len(losses) == 2 * 2 * 2 * 2  # 6 rows / (2 x 2) = 2 optimizer steps per stage
    summary = json.loads((out / "summary.json").read_text())
    assert [o["order"] for o in summary["orders"]] == [["fomc", "numgluecm"], ["numgluecm", "fomc"]]
    # the metrics command reads the scores we wrote
    m = subprocess.run([*SLMCL, "metrics", "--scores", str(out / "scores.csv"), "--json"],
                       capture_output=True, text=True, cwd=REPO)
    assert m.returncode == 0, m.stderr
    steps = json.loads(m.stdout)
    assert len(steps) == 2 * 3 and {"op", "bwt", "fwt", "op_std"} <= set(steps[0])


def test_checkpoint_loads_with_peft_and_changes_outputs(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, out, tasks=["fomc"]))
    ExperimentRunner(spec).run()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "checkpoints" / "fomc-s7" / "step-1").eval()
        after = adapted(ids).logits
    assert not torch.allclose(before, after), "the saved adapter does not change the model"


@pytest.mark.slow
def test_resume_recomputes_nothing_and_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    full = tmp_path / "full"
    ExperimentRunner(spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, full))).run()

    part = tmp_path / "part"
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, part))

    def stop_after_stage_one(event) -> None:
        if event.kind == "stage_started" and event.stage == 2:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        ExperimentRunner(spec, stop_after_stage_one).run()
    first = (part / "runs" / "fomc.numgluecm-s7" / "stage-1.json").stat().st_mtime_ns
    assert not (part / "runs" / "fomc.numgluecm-s7" / "stage-2.json").exists()

    events = []
    ExperimentRunner(spec, events.append).run()
    assert [e.stage for e in events if e.kind == "stage_skipped"] == [1]
    assert [e.stage for e in events if e.kind == "stage_started"] == [2]
    assert not any(e.kind == "base_eval" for e in events)  # the base evaluation came from the cache
    assert (part / "runs" / "fomc.numgluecm-s7" / "stage-1.json").stat().st_mtime_ns == first
    assert _csv(part / "scores.csv") == _csv(full / "scores.csv")
    for a, b in zip(_csv(part / "stability.csv"), _csv(full / "stability.csv")):
        for k in a:
            if k.startswith(("kl_", "entropy", "margin")):
                assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-6), k


@pytest.mark.integration
@pytest.mark.slow
def test_changed_spec_refuses_to_mix_results(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    spec_file = _write_spec(tmp_path / "a.yaml", tiny_spec_dict(tiny_model_dir, data_dir, out, tasks=["fomc"]))
    assert subprocess.run([*SLMCL, "run", str(spec_file), "--quiet"], capture_output=True, cwd=REPO).returncode == 0
    changed = _write_spec(tmp_path / "b.yaml", tiny_spec_dict(tiny_model_dir, data_dir, out, tasks=["fomc"],
                                                             training={"lr": 5e-4}))
    proc = subprocess.run([*SLMCL, "run", str(changed), "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith("slmcl: error:") and "training" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("case", ["bad_yaml", "bad_field", "missing_file", "bad_dataset"])
def test_bad_inputs_give_one_clear_line(case: str, tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    spec = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "out", tasks=["fomc"])
    expect = ""
    if case == "bad_yaml":
        (tmp_path / "s.yaml").write_text("tasks: [fomc\nseeds: 1\n")
        expect = "line"
    elif case == "bad_field":
        spec["training"]["lr"] = -1
        _write_spec(tmp_path / "s.yaml", spec)
        expect = "training.lr"
    elif case == "missing_file":
        spec["reference"]["file"] = str(tmp_path / "nope.json")
        _write_spec(tmp_path / "s.yaml", spec)
        expect = "nope.json"
    else:
        bad = tmp_path / "data"
        shutil.copytree(data_dir / "FOMC", bad / "FOMC")
        shutil.copy(data_dir / "reference.json", bad / "reference.json")
        rows = json.loads((bad / "FOMC" / "train.json").read_text())
        del rows[3]["answer"]
        (bad / "FOMC" / "train.json").write_text(json.dumps(rows))
        spec["data_dir"] = str(bad)
        _write_spec(tmp_path / "s.yaml", spec)
        expect = "row 3"
    proc = subprocess.run([*SLMCL, "run", str(tmp_path / "s.yaml"), "--quiet"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slmcl: error:"), proc.stderr
    assert expect in lines[0]


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_run_killed_midway_resumes(tmp_path: Path, data_dir: Path, embedded_dir: Path) -> None:
    """The real embedded model: SIGKILL after the first stage commits, then resume to the end."""
    out = tmp_path / "out"
    spec = {
        "name": "smol", "data_dir": str(data_dir), "tasks": ["fomc", "scienceqa"], "seeds": [42],
        "training": {"max_examples": 16, "lr": 2e-4},
        "evaluation": {"max_examples": 6, "max_new_tokens": 8, "batch_size": 6},
        "reference": {"max_examples": 6}, "device": "cpu", "output_dir": str(out),
    }
    spec_file = _write_spec(tmp_path / "smol.yaml", spec)
    stage1 = out / "runs" / "fomc.scienceqa-s42" / "stage-1.json"
    proc = subprocess.Popen([*SLMCL, "run", str(spec_file), "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 900  # a generous bound on a loaded 2-core machine, not a speed check
    while not stage1.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stage1.exists(), proc.communicate()[1][-2000:] if proc.poll() is not None else "stage 1 never committed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    mtime = stage1.stat().st_mtime_ns
    done = subprocess.run([*SLMCL, "run", str(spec_file)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stage 1 (fomc) already done: skipped" in done.stderr
    assert stage1.stat().st_mtime_ns == mtime
    scores = _csv(out / "scores.csv")
    keys = [(r["step"], r["eval_task"]) for r in scores]
    assert len(keys) == 3 * 2 == len(set(keys))
    stab = {r["step"]: float(r["kl_to_base_mean"]) for r in _csv(out / "stability.csv")}
    assert stab["0"] == 0.0 and stab["1"] > 0 and stab["2"] > 0
    stab_json = subprocess.run(
        [*SLMCL, "stability", "--adapter", str(out / "checkpoints" / "fomc.scienceqa-s42" / "step-2"),
         "--reference", str(data_dir / "reference.json"), "--max-examples", "6", "--device", "cpu", "--json"],
        capture_output=True, text=True, cwd=REPO)
    assert stab_json.returncode == 0, stab_json.stderr[-2000:]
    drift = json.loads(stab_json.stdout)
    # the standalone command measures the same drift as the run did for that checkpoint
    assert drift["kl_to_base_mean"] == pytest.approx(stab["2"], rel=1e-3, abs=1e-6)
    assert {"base_entropy_mean", "margin_p95"} <= set(drift)
