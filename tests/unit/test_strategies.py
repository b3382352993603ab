"""Strategies: the registry, options checked at spec load, and state (tensors too) saved beside the adapter.

The resume test is the contract the stage protocol relies on: stage 1, save the checkpoint
folder, a fresh process loads it and trains stage 2, and the result is bit-for-bit the
uninterrupted run's, for a strategy whose next stage depends on tensors in its state.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import spec_from_dict
from slmcl.errors import ModelError, SpecError, TrainingError
from slmcl.models.engine import Engine
from slmcl.models.loading import load_model
from slmcl.models.lora import adapter_state
from slmcl.training.strategies import (
    STATE_JSON,
    STATE_TENSORS,
    STRATEGIES,
    StrategyBase,
    StrategyOptionError,
    StrategyOptions,
    StrategyState,
    get_strategy,
    validate_strategy_options,
)
from slmcl.training.strategies.l2_anchor import L2Anchor
from slmcl.training.strategies.lora import SequentialLoRA
from tests.conftest import tiny_spec_dict

# -- the registry ------------------------------------------------------------------------------


def test_names_and_options_need_no_torch() -> None:
    code = ("import sys, slmcl.training.strategies as s; names = s.STRATEGIES.names(); "
            "s.validate_strategy_options('l2-anchor', {'weight': 0.5}); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {"lora", "l2-anchor"} <= set(out.stdout.strip().split(","))


def test_builtins_are_the_modules_classes() -> None:
    assert STRATEGIES.get("lora") is SequentialLoRA
    assert STRATEGIES.get("l2-anchor") is L2Anchor


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(SpecError, match=r"unknown strategy 'l2anchor'\. Did you mean 'l2-anchor'\?"):
        STRATEGIES.get("l2anchor")
    with pytest.raises(SpecError, match=r"^strategy\.name: unknown strategy 'lroa'\. Did you mean 'lora'\?"):
        validate_strategy_options("lroa", {})
    with pytest.raises(SpecError, match=r"^strategy\.name: unknown strategy 'lroa'"):
        get_strategy("lroa")


def test_a_second_strategy_under_a_taken_name_is_rejected() -> None:
    class Impostor(StrategyBase):
        pass

    with pytest.raises(ValueError, match=r"strategy 'lora' is already registered by .*SequentialLoRA"):
        STRATEGIES.register("lora")(Impostor)
    assert STRATEGIES.get("lora") is SequentialLoRA
    STRATEGIES.register("lora")(SequentialLoRA)  # the same class again (a module imported twice) is fine
    with pytest.raises(ValueError, match=r"must be lowercase"):
        STRATEGIES.register("L2 Anchor")(Impostor)


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options", "message"), [
    ("lora", {"x": 1}, r"^strategy\.options\.x: unknown option: strategy 'lora' takes no options$"),
    ("l2-anchor", {"wieght": 1.0}, r"^strategy\.options\.wieght: unknown option of strategy 'l2-anchor'\. "
                                   r"Did you mean 'weight'\? Known: weight$"),
    ("l2-anchor", {"weight": "0.1"}, r"^strategy\.options\.weight: must be float, got '0\.1' \(str\)$"),
    ("l2-anchor", {"weight": True}, r"^strategy\.options\.weight: must be float, got True \(bool\)$"),
    ("l2-anchor", {"weight": [1]}, r"^strategy\.options\.weight: must be float, got list$"),
    ("l2-anchor", {"weight": -0.5}, r"^strategy\.options\.weight: must be a finite number >= 0, got -0\.5$"),
    ("l2-anchor", {"weight": math.nan}, r"^strategy\.options\.weight: must be a finite number >= 0, got nan$"),
    ("l2-anchor", {"weight": math.inf}, r"^strategy\.options\.weight: must be a finite number >= 0, got inf$"),
    ("l2-anchor", ["weight"], r"^strategy\.options: must be a mapping, got list$"),
])
def test_bad_options_name_the_field(name: str, options: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate_strategy_options(name, options)
    with pytest.raises(SpecError, match=message):
        get_strategy(name, options)


def test_every_bad_option_is_reported_at_once() -> None:
    with pytest.raises(StrategyOptionError) as info:
        validate_strategy_options("l2-anchor", {"weight": "x", "anchor": 1})
    assert [path for path, _ in info.value.problems] == ["strategy.options.weight", "strategy.options.anchor"]


def test_good_options_come_back_typed_with_defaults() -> None:
    assert validate_strategy_options("lora", {}) == {}
    assert validate_strategy_options("lora", None) == {}
    assert validate_strategy_options("l2-anchor", {}) == {"weight": 0.01}
    got = validate_strategy_options("l2-anchor", {"weight": 2})
    assert got == {"weight": 2.0} and type(got["weight"]) is float
    strategy = get_strategy("l2-anchor", {"weight": 3})
    assert isinstance(strategy, L2Anchor) and strategy.options.weight == 3.0


def test_every_registered_strategy_has_valid_defaults() -> None:
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        assert issubclass(cls.Options, StrategyOptions), name
        validate_strategy_options(name, {})  # raises if a default breaks validate()


def test_options_of_richer_types() -> None:
    """The checker a new strategy's Options relies on: Literal, optional, lists, ints kept exact."""

    @dataclass(frozen=True)
    class RichOptions(StrategyOptions):
        mode: str = "a"
        k: int = 1
        ratio: float | None = None
        tasks: list[str] | None = None

    class Rich(StrategyBase):
        Options = RichOptions

    STRATEGIES.register("test-rich")(Rich)
    try:
        assert validate_strategy_options("test-rich", {"k": 3, "ratio": None, "tasks": ["x"]}) == {
            "mode": "a", "k": 3, "ratio": None, "tasks": ["x"]}
        with pytest.raises(SpecError, match=r"strategy\.options\.k: must be int, got 1\.5 \(float\)"):
            validate_strategy_options("test-rich", {"k": 1.5})
        with pytest.raises(SpecError, match=r"strategy\.options\.tasks: must be list of str or null, got list"):
            validate_strategy_options("test-rich", {"tasks": [1]})
    finally:
        STRATEGIES._items.pop("test-rich")  # noqa: SLF001 - keep the registry as the other tests expect


def test_the_spec_checks_options_when_it_loads(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    bad = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path, strategy={"name": "l2-anchor", "options": {"weight": -1}})
    with pytest.raises(SpecError, match=r"strategy\.options\.weight: must be a finite number >= 0, got -1"):
        spec_from_dict(bad)
    good = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path, strategy={"name": "l2-anchor"})
    assert spec_from_dict(good).strategy.options == {"weight": 0.01}


# -- engines on the tiny model -----------------------------------------------------------------


def make_engine(tiny_model_dir: Path, data_dir: Path, out: Path, strategy: str,
                options: dict[str, Any] | None = None) -> Engine:
    raw = tiny_spec_dict(tiny_model_dir, data_dir, out, strategy={"name": strategy, "options": options or {}})
    spec = spec_from_dict(raw)
    return Engine(spec, loaded=load_model(spec.model, "cpu"))


def lora_weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters() if p.requires_grad}


def train(engine: Engine, stage: int, state: StrategyState | None = None) -> Any:
    task = engine.spec.tasks[stage - 1]
    return engine.train(run_id="r", seed=7, stage=stage, task=task,
                        previous_tasks=[t.name for t in engine.spec.tasks[: stage - 1]], strategy_state=state)


def test_state_round_trips_through_the_checkpoint_folder(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    engine = make_engine(tiny_model_dir, data_dir, tmp_path / "out", "l2-anchor")
    engine.reset_adapter(3)
    with torch.no_grad():
        for n, p in engine.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    weights = adapter_state(engine.model)
    state = StrategyState(
        meta={"stage": 1, "seen": ["fomc"], "nested": {"x": 0.5}},
        tensors={"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).to(torch.bfloat16),
                 "view": torch.randn(4, 4)[:, 1]},  # a non-contiguous view
    )
    folder = engine.save_adapter(tmp_path / "ckpt", strategy_state=state)
    assert (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file()
    assert json.loads((folder / STATE_JSON).read_text())["strategy"] == "l2-anchor"

    engine.reset_adapter(4)
    back = engine.load_adapter(folder)
    assert back.strategy == "l2-anchor" and back.meta == state.meta
    assert back.tensors.keys() == state.tensors.keys()
    for k, v in state.tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v), k
    after = adapter_state(engine.model)
    assert all(torch.equal(after[k], weights[k]) for k in weights)

    # No tensors: the JSON alone. No state given: no state files, and an empty state back.
    folder = engine.save_adapter(tmp_path / "meta-only", strategy_state=StrategyState(meta={"k": 1}))
    assert (folder / STATE_JSON).is_file() and not (folder / STATE_TENSORS).exists()
    assert engine.load_adapter(folder) == StrategyState(meta={"k": 1}, strategy="l2-anchor")
    folder = engine.save_adapter(tmp_path / "plain")
    assert not (folder / STATE_JSON).exists() and not (folder / STATE_TENSORS).exists()
    assert engine.load_adapter(folder).empty

    # A folder whose JSON lists tensors that are gone, or meta that is not JSON, is refused.
    (tmp_path / "ckpt" / STATE_TENSORS).unlink()
    with pytest.raises(ModelError, match=r"lists tensors but strategy_state\.safetensors is missing"):
        engine.load_adapter(tmp_path / "ckpt")
    with pytest.raises(ModelError, match=r"strategy 'l2-anchor': its state's meta is not plain JSON"):
        engine.save_adapter(tmp_path / "bad", strategy_state=StrategyState(meta={"t": torch.zeros(1)}))
    assert not (tmp_path / "bad").exists()  # the atomic save left nothing behind


def test_lora_state_is_empty_and_names_its_strategy(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model_dir, data_dir, tmp_path / "out", "lora")
    engine.reset_adapter(7)
    result = train(engine, 1)
    assert result.strategy_state == StrategyState(strategy="lora")
    folder = engine.save_adapter(tmp_path / "ckpt", strategy_state=result.strategy_state)
    assert not (folder / STATE_TENSORS).exists()
    assert engine.load_adapter(folder) == StrategyState(strategy="lora")
    with pytest.raises(SpecError, match=r"strategy\.name: 'lora', but the previous stage's state was written by "
                                        r"strategy 'l2-anchor'"):
        train(engine, 2, StrategyState(meta={"stage": 1}, strategy="l2-anchor"))


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)


def test_l2_anchor_stays_closer_to_the_stage_start_than_lora(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    moved = {}
    for name, options in (("lora", {}), ("l2-anchor", {"weight": 200.0})):
        engine = make_engine(tiny_model_dir, data_dir, tmp_path / name, name, options)
        engine.reset_adapter(7)
        start = lora_weights(engine)
        result = train(engine, 1)
        moved[name] = distance(lora_weights(engine), start)
        if name == "l2-anchor":  # the next stage's anchor is this stage's end
            assert result.strategy_state.meta == {"stage": 1}
            end = lora_weights(engine)
            assert all(torch.equal(result.strategy_state.tensors[k], end[k]) for k in end)
    assert moved["lora"] > 0
    assert moved["l2-anchor"] < 0.5 * moved["lora"], moved


def test_l2_anchor_resumed_from_the_checkpoint_folder_equals_the_uninterrupted_run(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    options = {"weight": 50.0}
    whole = make_engine(tiny_model_dir, data_dir, tmp_path / "a", "l2-anchor", options)
    whole.reset_adapter(7)
    s1 = train(whole, 1)
    ckpt = whole.save_adapter(tmp_path / "stage-1", strategy_state=s1.strategy_state)
    s2 = train(whole, 2, s1.strategy_state)
    expected = lora_weights(whole)

    resumed = make_engine(tiny_model_dir, data_dir, tmp_path / "b", "l2-anchor", options)  # a fresh process
    with pytest.raises(TrainingError, match=r"stage 2: strategy 'l2-anchor' needs the state exported by stage 1"):
        train(resumed, 2)
    state = resumed.load_adapter(ckpt)
    r2 = train(resumed, 2, state)
    got = lora_weights(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [s.loss for s in r2.steps] == [s.loss for s in s2.steps]
    assert all(torch.equal(r2.strategy_state.tensors[k], s2.strategy_state.tensors[k]) for k in expected)

    # The state is used: anchored elsewhere (zeros), the same stage trains to other weights.
    other = make_engine(tiny_model_dir, data_dir, tmp_path / "c", "l2-anchor", options)
    other.load_adapter(ckpt)
    zeros = StrategyState(meta={"stage": 1}, tensors={k: torch.zeros_like(v) for k, v in state.tensors.items()})
    train(other, 2, zeros)
    assert distance(lora_weights(other), expected) > 0
