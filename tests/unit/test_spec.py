"""The experiment spec: the study's defaults, presets, path resolution and one-line field errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from slmcl.errors import SpecError
from slmcl.config.spec import (
    BUILTIN_TASKS,
    DATA_DIR_ENV,
    EMBEDDED_MODEL,
    MATH_INSTRUCTION,
    MULTIPLE_CHOICE_INSTRUCTION,
    ExperimentSpec,
    load_spec,
    spec_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
ALL_TASKS = ["fomc", "scienceqa", "numgluecm"]


def make_data_tree(root: Path) -> Path:
    """A minimal TRACE-shaped folder: every built-in task's train/test file and reference.json."""
    row = json.dumps([{"prompt": "Q?", "answer": "A"}])
    for folder, _kind, _instr in BUILTIN_TASKS.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "train.json").write_text(row)
        (root / folder / "test.json").write_text(row)
    (root / "reference.json").write_text(row)
    return root


def build(raw: dict[str, Any], tmp_path: Path, **kw: Any) -> ExperimentSpec:
    kw.setdefault("environ", {})
    kw.setdefault("base_dir", tmp_path)
    return spec_from_dict(raw, **kw)


def spec_error(raw: dict[str, Any], tmp_path: Path, **kw: Any) -> str:
    with pytest.raises(SpecError) as info:
        build(raw, tmp_path, **kw)
    return str(info.value)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_data_tree(tmp_path / "trace")


def base_raw(data: Path, **extra: Any) -> dict[str, Any]:
    return {"data_dir": str(data), "tasks": list(ALL_TASKS), **extra}


# -- defaults and presets ------------------------------------------------------------------


def test_defaults_are_the_studys(data_dir: Path, tmp_path: Path) -> None:
    spec = build({"data_dir": str(data_dir), "tasks": list(ALL_TASKS)}, tmp_path)
    assert spec.model.name == EMBEDDED_MODEL
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (8, 16.0, 0.05)
    assert spec.lora.bias == "none" and spec.lora.target_modules == "all-linear"
    tr = spec.training
    assert (tr.lr, tr.batch_size, tr.grad_accum, tr.max_length, tr.epochs, tr.max_grad_norm) == (
        5e-5, 2, 8, 512, 1, 1.0)
    assert spec.evaluation.max_new_tokens == 256
    assert spec.seeds == [33, 42, 123]
    assert spec.chat.system_prompt is None
    assert spec.strategy.name == "lora"


def test_builtin_tasks_are_filled(data_dir: Path, tmp_path: Path) -> None:
    spec = build({"data_dir": str(data_dir), "tasks": list(ALL_TASKS)}, tmp_path)
    kinds = {t.name: t.kind for t in spec.tasks}
    assert kinds == {"fomc": "multiple_choice", "scienceqa": "multiple_choice", "numgluecm": "numeric"}
    assert spec.task("fomc").instruction == MULTIPLE_CHOICE_INSTRUCTION
    assert spec.task("scienceqa").instruction == MULTIPLE_CHOICE_INSTRUCTION
    assert spec.task("numgluecm").instruction == MATH_INSTRUCTION
    root = data_dir.resolve()
    assert spec.task("fomc").train_file == str(root / "FOMC" / "train.json")
    assert spec.task("scienceqa").test_file == str(root / "ScienceQA" / "test.json")
    assert spec.task("numgluecm").train_file == str(root / "NumGLUE-cm" / "train.json")
    assert spec.reference.file == str(root / "reference.json")
    for t in spec.tasks:
        assert Path(t.train_file).is_file() and Path(t.test_file).is_file()


def test_preset_fields_can_be_overridden(data: Path, tmp_path: Path) -> None:
    raw = base_raw(data)
    raw["tasks"] = [{"name": "fomc", "instruction": "Answer."}, "numgluecm"]
    spec = build(raw, tmp_path)
    assert spec.task("fomc").instruction == "Answer."
    assert spec.task("fomc").kind == "multiple_choice"


def test_no_orders_gives_the_declared_task_order(data: Path, tmp_path: Path) -> None:
    spec = build(base_raw(data, tasks=["numgluecm", "fomc", "scienceqa"]), tmp_path)
    assert spec.orders == [["numgluecm", "fomc", "scienceqa"]]


def test_explicit_orders_are_kept(data: Path, tmp_path: Path) -> None:
    orders = [ALL_TASKS, list(reversed(ALL_TASKS))]
    spec = build(base_raw(data, orders=orders), tmp_path)
    assert spec.orders == orders


# -- data_dir --------------------------------------------------------------------------------


def test_data_dir_from_environment(data: Path, tmp_path: Path) -> None:
    spec = build({"tasks": ["fomc"]}, tmp_path, environ={DATA_DIR_ENV: str(data)})
    assert spec.data_dir == str(data.resolve())
    assert spec.task("fomc").train_file == str(data.resolve() / "FOMC" / "train.json")


def test_spec_data_dir_wins_over_environment(data: Path, tmp_path: Path) -> None:
    spec = build(base_raw(data), tmp_path, environ={DATA_DIR_ENV: str(tmp_path / "elsewhere")})
    assert spec.data_dir == str(data.resolve())


def test_relative_data_dir_is_resolved_against_the_spec_folder(tmp_path: Path) -> None:
    make_data_tree(tmp_path / "mydata")
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "exp.yaml"
    spec_file.write_text("data_dir: ../mydata\ntasks: [fomc]\noutput_dir: out\n")
    spec = load_spec(spec_file)
    assert spec.data_dir == str((tmp_path / "mydata").resolve())
    assert spec.task("fomc").test_file == str((tmp_path / "mydata" / "FOMC" / "test.json").resolve())
    assert spec.output_dir == str((tmp_path / "specs" / "out").resolve())


def test_relative_env_data_dir_is_resolved_against_base_dir(tmp_path: Path) -> None:
    make_data_tree(tmp_path / "d")
    spec = build({"tasks": ["fomc"]}, tmp_path, environ={DATA_DIR_ENV: "d"})
    assert spec.data_dir == str((tmp_path / "d").resolve())


def test_missing_data_dir_is_one_error(tmp_path: Path) -> None:
    msg = spec_error({"tasks": list(ALL_TASKS)}, tmp_path, environ={})
    body = msg.split(": ", 1)[1]
    lines = body.split("; ")
    assert len(lines) == 1, msg
    assert lines[0].startswith("data_dir:")
    assert DATA_DIR_ENV in msg


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = spec_error({"data_dir": str(empty), "tasks": ["fomc"]}, tmp_path)
    assert "tasks[0].train_file: file not found" in msg
    assert str(empty.resolve() / "FOMC" / "train.json") in msg
    assert "reference.file: file not found" in msg


def test_check_files_false_skips_the_file_check(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = build({"data_dir": str(empty), "tasks": ["fomc"]}, tmp_path, check_files=False)
    assert spec.task("fomc").train_file.endswith("FOMC/train.json")


# -- field errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"lora": {"bogus": 1}}, "lora.bogus: unknown key"),
        ({"training": {"lr": "abc"}}, "training.lr: expected a number"),
        ({"training": {"batch_size": "two"}}, "training.batch_size: expected an integer"),
        ({"training": {"batch_size": 2.5}}, "training.batch_size: expected an integer"),
        ({"lora": {"rank": True}}, "lora.rank: expected an integer"),
        ({"orders": [["fomc", "nope"]]}, "orders[0]: unknown task 'nope'"),
        ({"orders": [[]]}, "orders[0]: empty order"),
        ({"orders": [["fomc", "fomc"]]}, "orders[0]: task(s) fomc appear more than once"),
        ({"orders": [ALL_TASKS, ALL_TASKS]}, "orders: the same order is listed twice"),
        ({"tasks": ["fomc", "fomc"]}, "tasks[0].name: duplicate task 'fomc'"),
        ({"tasks": ["base"]}, "tasks[0].name: 'base' is reserved"),
        ({"tasks": []}, "tasks: at least one task"),
        ({"seeds": [1, 2, 1]}, "seeds: duplicate seeds"),
        ({"seeds": []}, "seeds: at least one seed"),
        ({"seeds": list(range(1000))}, "seeds: 1000 seeds is more than 64"),
        ({"seeds": [-1]}, "seeds[0]: must be in [0, 2**32)"),
        ({"lora": {"rank": 0}}, "lora.rank: must be > 0"),
        ({"lora": {"rank": -3}}, "lora.rank: must be > 0"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout: must be in [0, 1)"),
        ({"training": {"lr": 0}}, "training.lr: must be > 0"),
        ({"training": {"lr": -1e-4}}, "training.lr: must be > 0"),
        ({"evaluation": {"max_new_tokens": 5000}}, "evaluation.max_new_tokens: must be <= 4096"),
        ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens: must be > 0"),
        ({"strategy": {"name": "nope"}}, "strategy.name: unknown strategy 'nope'"),
        ({"device": "tpu"}, "device: must be one of"),
        ({"lora": "big"}, "lora: expected a mapping"),
        ({"tasks": [{"name": "mine", "train_file": "a.json"}]}, "tasks[0].test_file: missing"),
    ],
)
def test_bad_field_is_named(extra: dict[str, Any], expected: str, data: Path, tmp_path: Path) -> None:
    msg = spec_error(base_raw(data, **extra), tmp_path)
    assert msg.startswith("invalid spec")
    assert expected in msg


def test_all_errors_are_reported_together(data: Path, tmp_path: Path) -> None:
    msg = spec_error(base_raw(data, lora={"rank": 0}, training={"lr": 0}, seeds=[1, 1]), tmp_path)
    for expected in ("lora.rank", "training.lr", "seeds: duplicate"):
        assert expected in msg


def test_source_is_named_in_the_message(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("tasks: [fomc]\nlora: {rank: 0}\n")
    with pytest.raises(SpecError, match=r"invalid spec .*s\.yaml: .*lora\.rank"):
        load_spec(spec_file, check_files=False)


# -- YAML ------------------------------------------------------------------------------------


def test_yaml_exponent_without_dot_is_a_float(data: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"data_dir: {data}\ntasks: [fomc]\ntraining:\n  lr: 5e-5\n  weight_decay: 1e-2\n")
    spec = load_spec(spec_file)
    assert isinstance(spec.training.lr, float) and spec.training.lr == 5e-5
    assert spec.training.weight_decay == 0.01


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: x\ntasks: [fomc\nseeds: [1]\n")
    with pytest.raises(SpecError, match=r"line 3: not valid YAML"):
        load_spec(spec_file)


def test_non_mapping_yaml(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("- fomc\n- numgluecm\n")
    with pytest.raises(SpecError, match=r"must be a mapping.*list"):
        load_spec(spec_file)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_apply_dotted_keys(data: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"data_dir: {data}\ntasks: [fomc]\n")
    spec = load_spec(spec_file, overrides={"training.max_examples": 32, "seeds": [5]})
    assert spec.training.max_examples == 32 and spec.seeds == [5]


# -- round trip ------------------------------------------------------------------------------


def test_to_json_round_trips(data: Path, tmp_path: Path) -> None:
    raw = base_raw(
        data,
        orders=[ALL_TASKS, list(reversed(ALL_TASKS))],
        seeds=[1, 2],
        lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]},
        training={"lr": "2e-4", "max_examples": 10},
        chat={"system_prompt": "Be brief.", "template_kwargs": {"date_string": "01 Jan 2026"}},
    )
    spec = build(raw, tmp_path)
    again = spec_from_dict(json.loads(spec.to_json()), base_dir=tmp_path / "elsewhere", environ={})
    assert again == spec
    assert again.to_json() == spec.to_json()


# -- CLI -------------------------------------------------------------------------------------


def _slmcl() -> list[str]:
    exe = Path(sys.executable).parent / "slmcl"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "slmcl.cli.main"]


def test_cli_validate_bad_spec_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [fomc, nope]\nlora: {rank: 0, bogus: 1}\ntraining: {lr: abc}\n")
    proc = subprocess.run(_slmcl() + ["validate", str(bad)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("slmcl: error:")
    assert "lora.bogus" in lines[0] and "training.lr" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_validate_good_spec(data: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(f"data_dir: {data}\ntasks: [fomc, numgluecm]\nseeds: [1, 2]\n")
    proc = subprocess.run(_slmcl() + ["validate", str(good)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "2 run(s)" in proc.stdout
