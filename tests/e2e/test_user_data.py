"""Nothing of the user's is touched, and their data is checked whole: `slmcl validate` and `slmcl run` refuse a
folder that is not a results directory, a data path that leaves data_dir, a bad row anywhere in a file, and a
resume on changed data, each as one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from slmcl.config.spec import spec_from_dict
from slmcl.errors import SpecError
from slmcl.protocol import layout
from slmcl.protocol.embedded import ExperimentRunner
from tests.conftest import REPO, tiny_spec_dict

SLMCL = [sys.executable, "-m", "slmcl.cli.main"]


@pytest.fixture()
def data_copy(data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the TRACE subset, free to be edited."""
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def _spec_file(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _slmcl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLMCL, *args], capture_output=True, text=True, cwd=REPO)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("slmcl: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_validate_checks_every_row_of_every_file(tmp_path: Path, data_copy: Path, tiny_model_dir: Path) -> None:
    spec = tiny_spec_dict(tiny_model_dir, data_copy, tmp_path / "out")  # training.max_examples: 6 rows
    ok = _slmcl("validate", str(_spec_file(tmp_path, spec)))
    assert ok.returncode == 0, ok.stderr
    n_rows = sum(len(json.loads(p.read_text())) for p in [data_copy / "FOMC" / "train.json",
                                                            data_copy / "FOMC" / "test.json",
                                                            data_copy / "NumGLUE-cm" / "train.json",
                                                            data_copy / "NumGLUE-cm" / "test.json",
                                                            data_copy / "reference.json"])
    assert f"5 data files, {n_rows} rows" in ok.stdout

    train = data_copy / "FOMC" / "train.json"
    rows = json.loads(train.read_text())
    del rows[-1]["answer"]  # the last row: far past what the spec's subsets read
    train.write_text(json.dumps(rows))
    err = _one_line_error(_slmcl("validate", str(_spec_file(tmp_path, spec))))
    assert f"tasks[0].train_file: {train} row {len(rows) - 1}: missing key(s) 'answer'" in err
    err = _one_line_error(_slmcl("run", str(_spec_file(tmp_path, spec)), "--quiet"))
    assert f"row {len(rows) - 1}" in err and not (tmp_path / "out").exists()  # refused before anything is written


def test_a_path_leaving_data_dir_is_refused(tmp_path: Path, data_copy: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "outside.json").write_text(json.dumps([{"prompt": "x", "answer": "A"}]))
    spec = tiny_spec_dict(tiny_model_dir, data_copy, tmp_path / "out",
                          tasks=["fomc", {"name": "mine", "kind": "numeric", "instruction": "A number.",
                                          "train_file": "../outside.json", "test_file": "FOMC/test.json"}])
    err = _one_line_error(_slmcl("validate", str(_spec_file(tmp_path, spec))))
    assert "tasks[1].train_file: '../outside.json' leaves data_dir" in err
    # the same file named by its absolute path is the user's explicit choice
    spec["tasks"][1]["train_file"] = str(tmp_path / "outside.json")
    assert _slmcl("validate", str(_spec_file(tmp_path, spec))).returncode == 0


def test_run_refuses_a_folder_of_the_users(tmp_path: Path, data_copy: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    spec = tiny_spec_dict(tiny_model_dir, data_copy, out)
    for args in (["validate"], ["run", "--quiet"]):
        err = _one_line_error(_slmcl(*args, str(_spec_file(tmp_path, spec))))
        assert f"output_dir {out}: holds files that are not slmcl results" in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    spec["output_dir"] = str(tmp_path / "file")
    assert "is not a directory" in _one_line_error(_slmcl("validate", str(_spec_file(tmp_path, spec))))


@pytest.mark.slow
def test_resume_refuses_changed_data_naming_the_file(tmp_path: Path, data_copy: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_copy, out, tasks=["fomc"]))
    ExperimentRunner(spec).run()
    assert (out / layout.RESULTS_MARKER).is_file()
    recorded = json.loads((out / layout.DATA_JSON).read_text())["files"]
    test_file = data_copy / "FOMC" / "test.json"
    assert recorded[str(test_file)]["rows"] == len(json.loads(test_file.read_text()))

    ExperimentRunner(spec).run()  # the same data: resumes (nothing to do)
    rows = json.loads(test_file.read_text())
    rows[-1]["answer"] = rows[-1]["answer"] + " (edited)"  # past the spec's subset, still a different dataset
    test_file.write_text(json.dumps(rows))
    with pytest.raises(SpecError, match=rf"tasks\[0\]\.test_file: {test_file} changed since the results"):
        ExperimentRunner(spec).run()
    # a results directory of slmcl is accepted even with other files in it (its own tables)
    assert (out / "scores.csv").is_file()
