"""Several base models in one experiment: two tiny architectures, each a run per order and seed, each
with its own base evaluation, grouped by model in every table; resumable like any experiment."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from slmcl.cli.report import render_results
from slmcl.config.spec import spec_from_dict
from slmcl.errors import SpecError
from slmcl.protocol.embedded import ExperimentRunner
from slmcl.protocol.events import Event
from slmcl.protocol.results import read_results
from tests.conftest import tiny_spec_dict


def _spec(llama: Path, qwen: Path, data: Path, out: Path) -> Any:
    return spec_from_dict(tiny_spec_dict(llama, data, out, model=None, models=[
        {"name": str(llama), "label": "llama"}, {"name": str(qwen), "label": "qwen"}]))


@pytest.mark.slow
def test_two_models_run_side_by_side_and_are_grouped_by_model(tiny_model_dir: Path, tiny_qwen_dir: Path,
                                                              data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = _spec(tiny_model_dir, tiny_qwen_dir, data_dir, out)
    events: list[Event] = []
    ExperimentRunner(spec, events.append).run()

    loaded = [e.data["model"] for e in events if e.kind == "model_loaded"]
    assert loaded == [str(tiny_model_dir), str(tiny_qwen_dir)]  # one model resident at a time, in spec order
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["fomc.numgluecm-s7-mllama", "fomc.numgluecm-s7-mqwen"]
    for rid, model in zip(runs, (tiny_model_dir, tiny_qwen_dir), strict=True):
        recs = [json.loads((out / "runs" / rid / f"stage-{k}.json").read_text()) for k in range(3)]
        assert {r["model"] for r in recs} == {str(model)}
    # each model's base is evaluated once and its predictions kept apart
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "base-llama", "base-qwen", "fomc.numgluecm-s7-mllama", "fomc.numgluecm-s7-mqwen"]
    base_llama = json.loads((out / "runs" / runs[0] / "stage-0.json").read_text())
    base_qwen = json.loads((out / "runs" / runs[1] / "stage-0.json").read_text())
    assert base_llama["stability"]["entropy_mean"] != base_qwen["stability"]["entropy_mean"]  # two models

    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == [str(tiny_model_dir), str(tiny_qwen_dir)]
    res = read_results(out)
    assert res.models == [str(tiny_model_dir), str(tiny_qwen_dir)]
    assert res.matrix(model=str(tiny_qwen_dir))[0] == {t: s["accuracy"] for t, s in base_qwen["scores"].items()}
    printed = render_results(out)
    assert f"model {tiny_qwen_dir}" in printed and "Models compared" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["correlation"]) == {str(tiny_model_dir), str(tiny_qwen_dir)}

    again: list[Event] = []
    ExperimentRunner(spec, again.append).run()  # resumed: everything is committed, no model even loads
    assert not [e for e in again if e.kind in ("model_loaded", "stage_started")]


def test_model_and_models_together_and_duplicate_labels_are_refused(tmp_path: Path, data_dir: Path) -> None:
    raw = tiny_spec_dict(tmp_path / "a", data_dir, tmp_path / "out", models=[str(tmp_path / "b"), str(tmp_path / "c")])
    with pytest.raises(SpecError, match="give either `model:` .* or `models:`"):
        spec_from_dict(raw, check_files=False)
    raw = tiny_spec_dict(tmp_path / "a", data_dir, tmp_path / "out", model=None,
                         models=[{"name": "org/m", "label": "x"}, {"name": "other/m", "label": "x"}])
    with pytest.raises(SpecError, match="two models are labelled 'x'"):
        spec_from_dict(raw, check_files=False)
    one = spec_from_dict(tiny_spec_dict(tmp_path / "a", data_dir, tmp_path / "out"), check_files=False)
    assert [m.name for m in one.models] == [one.model.name] and one.model_label == ""  # one model: short run ids
