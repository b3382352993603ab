"""Every strategy through the embedded protocol on a tiny model: a comparison experiment, checkpoints
that load without our code, and a resume after an interruption that gives the uninterrupted numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import spec_from_dict
from slmcl.protocol.embedded import ExperimentRunner
from slmcl.protocol.events import Event
from tests.conftest import tiny_spec_dict

STRATEGIES = ["lora", "olora", "osf", "procl", "replay"]


class Interrupted(Exception):
    pass


def _spec(model: Path, data: Path, out: Path) -> Any:
    return spec_from_dict(tiny_spec_dict(model, data, out, strategies=STRATEGIES, lora={"rank": 4, "alpha": 8},
                                         strategy={"name": "lora"}))


def _results(out: Path) -> dict[tuple[str, int], tuple[Any, Any]]:
    recs = {}
    for f in sorted((out / "runs").glob("*/stage-*.json")):
        rec = json.loads(f.read_text())
        recs[(rec["run_id"], rec["step"])] = (rec["scores"], rec["stability"])
    return recs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("strategies") / "out"
    ExperimentRunner(_spec(tiny_model_dir, data_dir, out)).run()
    return out


@pytest.mark.slow
def test_every_strategy_runs_and_is_compared(uninterrupted: Path) -> None:
    out = uninterrupted
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["strategy"] for r in rows] == sorted(STRATEGIES)
    assert all(r["runs"] == "1" and r["op"] != "" and r["seconds_per_stage"] != "" for r in rows)
    records = _results(out)
    assert len(records) == len(STRATEGIES) * 3  # base + 2 stages per run, each exactly once
    # O-LoRA's stacked adapter holds one rank-4 pair per task: twice the trainable parameters of one
    params = {r["strategy"]: float(r["trainable_params"]) for r in rows}
    assert params["olora"] == params["lora"] and params["procl"] > params["lora"]
    assert params["osf"] > params["lora"]
    sizes = {r["strategy"]: float(r["checkpoint_mb"]) for r in rows}
    assert sizes["olora"] > sizes["lora"] and sizes["osf"] > 10 * sizes["lora"]  # a whole model folder


@pytest.mark.slow
def test_every_checkpoint_loads_without_our_code(uninterrupted: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 17]])
    for strategy in STRATEGIES:
        suffix = "" if strategy == "lora" else f"-{strategy}"
        folder = uninterrupted / "checkpoints" / f"fomc.numgluecm-s7{suffix}" / "step-2"
        if strategy == "osf":
            model = AutoModelForCausalLM.from_pretrained(folder)
            assert not (folder / "adapter_config.json").exists()
        else:
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
            model = PeftModel.from_pretrained(base, folder)
            config = json.loads((folder / "adapter_config.json").read_text())
            assert config["r"] == (8 if strategy == "olora" else 4)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_each_strategy_resumes_with_the_uninterrupted_numbers(uninterrupted: Path, tmp_path: Path,
                                                              tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    spec = _spec(tiny_model_dir, data_dir, out)
    stopped: set[str] = set()

    def stop_before_stage_2(event: Event) -> None:
        if event.kind == "stage_started" and event.stage == 2 and event.run_id not in stopped:
            stopped.add(event.run_id)
            raise Interrupted(event.run_id)

    for _ in range(len(STRATEGIES)):  # each attempt is a fresh process's worth: a new runner, a new engine
        with pytest.raises(Interrupted):
            ExperimentRunner(spec, stop_before_stage_2).run()
    ExperimentRunner(spec, stop_before_stage_2).run()
    assert len(stopped) == len(STRATEGIES)
    assert _results(out) == _results(uninterrupted)
