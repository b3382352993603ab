"""The experiment spec: the study's defaults, presets, path resolution and one-line field errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from slmcl.config.schema import render, spec_json_schema
from slmcl.config.spec import (
    BUILTIN_TASKS,
    DATA_DIR_ENV,
    EMBEDDED_MODEL,
    MATH_INSTRUCTION,
    MULTIPLE_CHOICE_INSTRUCTION,
    ExperimentSpec,
    TaskSpec,
    load_spec,
    spec_from_dict,
)
from slmcl.errors import SpecError

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
        ({"seeds": [-1]}, "seeds[0]: must be >= 0, got -1"),
        ({"seeds": [2**32]}, "seeds[0]: must be < 4294967296"),
        ({"lora": {"rank": 0}}, "lora.rank: must be > 0"),
        ({"lora": {"rank": -3}}, "lora.rank: must be > 0"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout: must be < 1, got 1.0"),
        ({"training": {"lr": 0}}, "training.lr: must be > 0"),
        ({"training": {"lr": -1e-4}}, "training.lr: must be > 0"),
        ({"evaluation": {"max_new_tokens": 5000}}, "evaluation.max_new_tokens: must be <= 4096"),
        ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens: must be > 0"),
        ({"strategy": {"name": "nope"}}, "strategy.name: unknown strategy 'nope'"),
        ({"device": "tpu"}, "device: must be auto, cpu, cuda or cuda:N"),
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


def test_overrides_reach_into_shorthands(data: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"data_dir: {data}\nmodel: embedded\ntasks: [fomc, numgluecm]\n")
    spec = load_spec(spec_file, overrides={"model.revision": "abc", "tasks[1].kind": "token_f1",
                                           "training.lr": "1e-4"})
    assert spec.model.name == EMBEDDED_MODEL and spec.model.revision == "abc"
    assert spec.task("numgluecm").kind == "token_f1" and spec.task("numgluecm").instruction == MATH_INSTRUCTION
    assert spec.training.lr == 1e-4


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"training.lr.x": 1}, "--set training.lr.x: training.lr is 0.0002, not a section"),
        ({"tasks.kind": "numeric"}, "--set tasks.kind: tasks is a list: index it"),
        ({"tasks[5].kind": "numeric"}, "--set tasks[5].kind: tasks has 1 item(s), no [5]"),
        ({"seeds[0]": 3}, "--set seeds[0]: seeds is not in the spec file"),
        ({"training..lr": 1}, "--set training..lr: not a setting path"),
        ({"": 1}, "not a setting path"),
        ({"training.bogus": 1}, "training.bogus: unknown key"),
        ({"nope.deeper": 1}, "nope: unknown key"),
        ({"training.lr": "fast"}, "training.lr: expected a number, got 'fast'"),
    ],
)
def test_bad_override_is_one_line_naming_the_path(overrides: dict[str, Any], expected: str, data: Path,
                                                  tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"data_dir: {data}\ntasks: [fomc]\ntraining: {{lr: 2.0e-4}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, overrides=overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


# -- registries ------------------------------------------------------------------------------


def test_task_kind_is_checked_against_the_registry(data: Path, tmp_path: Path) -> None:
    from slmcl.tasks.kinds import TASK_KINDS

    ok = build(base_raw(data, tasks=[{"name": "fomc", "kind": "token_f1"}]), tmp_path)
    assert ok.task("fomc").kind == "token_f1"
    msg = spec_error(base_raw(data, tasks=["fomc", {"name": "fomc2", "kind": "numerc", "train_file": "a",
                                                      "test_file": "b"}]), tmp_path)
    assert "tasks[1].kind: unknown task kind 'numerc'. Did you mean 'numeric'?" in msg
    assert all(k in msg for k in TASK_KINDS.names())
    with pytest.raises(ValueError, match="unknown task kind"):
        TaskSpec(name="x", kind="nope")


def test_strategy_options_are_checked_at_load(data: Path, tmp_path: Path) -> None:
    msg = spec_error(base_raw(data, strategy={"name": "lora", "options": {"rank": 4}}), tmp_path)
    assert "strategy.options.rank:" in msg
    msg = spec_error(base_raw(data, strategy={"name": "l2-anchr"}), tmp_path)
    assert "strategy.name: unknown strategy 'l2-anchr'. Did you mean 'l2-anchor'?" in msg


def test_strategy_defaults_are_recorded_and_round_trip(data: Path, tmp_path: Path) -> None:
    from slmcl.training.strategies import validate_strategy_options

    spec = build(base_raw(data, strategy={"name": "l2-anchor"}), tmp_path)
    assert spec.strategy.options == validate_strategy_options("l2-anchor", {}) != {}
    assert spec_from_dict(json.loads(spec.to_json()), environ={}) == spec


# -- the classes -----------------------------------------------------------------------------


def test_replace_keeps_working_and_validates(data: Path, tmp_path: Path) -> None:
    spec = build(base_raw(data), tmp_path)
    cuda = dataclasses.replace(spec, device="cuda")
    assert cuda.device == "cuda" and cuda.tasks == spec.tasks and spec.device == "auto"
    with pytest.raises(ValueError, match="device"):
        dataclasses.replace(spec, device="tpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.device = "cpu"  # type: ignore[misc]  # the point: frozen


def test_empty_sections_mean_defaults(data: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"data_dir: {data}\nmodel:\ntasks: [fomc]\ntraining:\nchat:\n")
    spec = load_spec(spec_file)
    assert spec.training.lr == 5e-5 and spec.model.name == EMBEDDED_MODEL


def test_type_errors_do_not_hide_errors_across_fields(data: Path, tmp_path: Path) -> None:
    msg = spec_error(base_raw(data, training={"lr": "abc"}, orders=[["fomc", "nope"]]), tmp_path)
    assert "training.lr: expected a number" in msg and "orders[0]: unknown task 'nope'" in msg


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"lora": {"target_modules": 3}}, "lora.target_modules: expected a string or a list, got 3"),
        ({"lora": {"target_modules": ["q_proj", 3]}}, "lora.target_modules[1]: expected a string, got 3"),
        ({"model": 5}, "model: expected a name or a mapping, got 5"),
        ({"tasks": ["fomc", 5]}, "tasks[1]: expected a name or a mapping, got 5"),
        ({"tasks": "fomc"}, "tasks: expected a list, got 'fomc'"),
        ({"model": {"dtype": "fp8"}}, "model.dtype: must be one of 'auto', 'float32', 'bfloat16' or 'float16'"),
        ({"training": {"lr": float("inf")}}, "training.lr: must be a finite number"),
        ({"chat": {"template_kwargs": {1: "x"}}}, "chat.template_kwargs: keys must be strings, got 1"),
        ({"lora": {5: 1}}, "lora: unknown key 5 (known: alpha, bias"),
        ({"reference": {"file": ""}}, "reference.file: must not be empty"),
        ({"seeds": [True]}, "seeds[0]: expected an integer, got True"),
    ],
)
def test_more_bad_fields_are_named(extra: dict[str, Any], expected: str, data: Path, tmp_path: Path) -> None:
    assert expected in spec_error(base_raw(data, **extra), tmp_path)


# -- random wrong types ------------------------------------------------------------------------

_SCALARS: dict[type, Any] = {
    int: st.integers(-5, 5),
    float: st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
    bool: st.booleans(),
    str: st.text(max_size=5).filter(lambda t: not _parses_as_float(t)),
    list: st.lists(st.integers(), max_size=2),
    dict: st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
}


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _accepted(tp: Any) -> set[type]:
    """The Python types a field's annotation lets through (an int counts as a float, a str as a Literal)."""
    if typing.get_origin(tp) is typing.Annotated:
        return _accepted(typing.get_args(tp)[0])
    if typing.get_origin(tp) is typing.Literal:
        return {str}  # a wrong str is still wrong for a Literal, but not a wrong *type*
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) not in (list, dict):
        return set().union(*(_accepted(a) for a in args))
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(origin):  # a nested section (tracking.mlflow) is written as a mapping
        return {origin, dict}
    return {origin, int} if origin is float else {origin}


def _leaf_fields() -> list[tuple[str, str, set[type]]]:
    """(section, field, accepted types) of every plain-data field of the sections."""
    out = []
    hints = typing.get_type_hints(ExperimentSpec)
    for f in dataclasses.fields(ExperimentSpec):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            fields = typing.get_type_hints(cls, include_extras=True)
            out += [(f.name, name, _accepted(tp)) for name, tp in fields.items()]
    for name, tp in typing.get_type_hints(TaskSpec, include_extras=True).items():
        out.append(("tasks[0]", name, _accepted(tp)))
    for name in ("name", "data_dir", "seeds", "orders", "device", "output_dir"):
        out.append(("", name, _accepted(typing.get_type_hints(ExperimentSpec, include_extras=True)[name])))
    return out


LEAVES = _leaf_fields()


@st.composite
def wrong_value(draw: st.DrawFn, accepted: set[type]) -> Any:
    """A value of a type the field does not take (True is no integer here: the spec is strict)."""
    return draw(st.one_of(*(strategy for t, strategy in _SCALARS.items() if t not in accepted)))


@pytest.mark.parametrize("section, name, accepted", LEAVES, ids=[f"{s}.{n}".lstrip(".") for s, n, _ in LEAVES])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_a_wrong_type_anywhere_is_a_spec_error_naming_the_field(section: str, name: str, accepted: set[type],
                                                                data: st.DataObject) -> None:
    value = data.draw(wrong_value(accepted))
    raw: dict[str, Any] = {"data_dir": str(REPO), "tasks": ["fomc"]}
    if section == "tasks[0]":
        raw["tasks"] = [{"name": "mine", "train_file": "a.json", "test_file": "b.json", name: value}]
    elif section:
        raw[section] = {name: value}
    else:
        raw[name] = value
    path = f"{section}.{name}" if section else name
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, base_dir=REPO, environ={}, check_files=False)
    assert f"{path}:" in str(info.value) or f"{path}[" in str(info.value), (path, value, str(info.value))


# -- JSON Schema -------------------------------------------------------------------------------


def test_committed_schema_is_the_generated_one() -> None:
    committed = (REPO / "docs" / "spec.schema.json").read_text(encoding="utf-8")
    assert committed == render(), "stale: run python -m slmcl.config.schema > docs/spec.schema.json"


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(example: Path, data: Path) -> None:
    raw = yaml.safe_load(example.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(spec_json_schema()).validate(raw)
    spec = spec_from_dict(raw, base_dir=example.parent, environ={DATA_DIR_ENV: str(data)}, source=str(example))
    assert spec.tasks and spec.orders


def test_schema_rejects_what_the_loader_rejects() -> None:
    validator = jsonschema.Draft202012Validator(spec_json_schema())
    jsonschema.Draft202012Validator.check_schema(spec_json_schema())
    for bad in ({"bogus": 1}, {"lora": {"rank": 0}}, {"tasks": [{"name": "x", "kind": "nope"}]},
                {"training": {"lr": True}}, {"strategy": {"name": "nope"}}, {"model": 5}):
        assert not validator.is_valid(bad), bad
    assert validator.is_valid({"model": "embedded", "tasks": ["fomc", {"name": "mine", "kind": "numeric"}]})


def test_schema_module_prints_it() -> None:
    proc = subprocess.run([sys.executable, "-m", "slmcl.config.schema"], capture_output=True, text=True,
                          cwd=REPO, check=True, timeout=60)
    assert json.loads(proc.stdout) == spec_json_schema()


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


def test_every_spec_dataclass_is_built_at_import_so_threads_never_race_to_build_it() -> None:
    """pydantic's deferred build is not thread-safe: monitor threads reading specs at once failed with "no
    attribute '__pydantic_validator__'" (1 process in 15 with 8 threads). A fresh interpreter, as a service's."""
    code = ("import slmcl.config.spec as m\n"
            "from pydantic.dataclasses import is_pydantic_dataclass\n"
            "classes = [v for v in vars(m).values() if isinstance(v, type) and is_pydantic_dataclass(v)]\n"
            "print(len(classes), sorted(c.__name__ for c in classes if not c.__pydantic_complete__))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split(" ", 1)
    assert int(out[0]) >= 10 and out[1].strip() == "[]", out
