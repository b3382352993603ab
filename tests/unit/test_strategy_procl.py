"""ProCL: routed program slots while a stage trains, a plain PEFT LoRA adapter in every checkpoint.

The defining property is the last one a user sees: after a ProCL stage the model is plain LoRA
again, and the saved adapter loads with ``PeftModel.from_pretrained`` and no code of ours. The
module tests pin the arithmetic (routing, M_exec, the EMA) on numbers one can check by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from slmcl.config.spec import StrategySpec, spec_from_dict
from slmcl.errors import SpecError, TrainingError
from slmcl.models.engine import Engine
from slmcl.models.loading import load_model
from slmcl.models.lora import ADAPTER_WEIGHTS
from slmcl.training.strategies import STATE_JSON, STATE_TENSORS, StrategyState, get_strategy, validate_strategy_options
from slmcl.training.strategies.procl import (
    ProCL,
    ProCLOptions,
    factor_class,
    unwrap_lora_factors,
    wrap_factor,
    wrap_lora_factors,
)
from tests.conftest import tiny_spec_dict

# -- options -----------------------------------------------------------------------------------


def test_defaults_and_registration() -> None:
    assert validate_strategy_options("procl", {}) == {
        "slots": 4, "key_dim": 16, "consolidation": 0.9, "temperature": 1.0, "slot_scale_init": -4.0}
    strategy = get_strategy("procl", {"slots": 2, "consolidation": 1})
    assert isinstance(strategy, ProCL) and strategy.options == ProCLOptions(slots=2, consolidation=1.0)


@pytest.mark.parametrize(("options", "message"), [
    ({"slots": 0}, r"^strategy\.options\.slots: must be an integer >= 1, got 0$"),
    ({"slots": 2.0}, r"^strategy\.options\.slots: must be int, got 2\.0 \(float\)$"),
    ({"key_dim": -1}, r"^strategy\.options\.key_dim: must be an integer >= 1, got -1$"),
    ({"consolidation": 0}, r"^strategy\.options\.consolidation: must be in \(0, 1\], got 0\.0$"),
    ({"consolidation": 1.5}, r"^strategy\.options\.consolidation: must be in \(0, 1\], got 1\.5$"),
    ({"consolidation": math.nan}, r"^strategy\.options\.consolidation: must be in \(0, 1\], got nan$"),
    ({"temperature": 0}, r"^strategy\.options\.temperature: must be a finite number > 0, got 0\.0$"),
    ({"temperature": math.inf}, r"^strategy\.options\.temperature: must be a finite number > 0, got inf$"),
    ({"slot_scale_init": -math.inf}, r"^strategy\.options\.slot_scale_init: must be a finite number, got -inf$"),
    ({"slot": 4}, r"^strategy\.options\.slot: unknown option of strategy 'procl'\. Did you mean 'slots'\?"),
])
def test_bad_options_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate_strategy_options("procl", options)


def test_options_need_no_torch() -> None:
    code = ("import sys, slmcl.training.strategies as s; "
            "s.validate_strategy_options('procl', {'slots': 2, 'temperature': 0.5}); "
            "assert 'procl' in s.STRATEGIES.names(); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# -- the wrapped factor, by hand -------------------------------------------------------------


def hand_factor(consolidation: float = 0.9) -> tuple[torch.nn.Linear, Any]:
    """M = [[1,0],[0,1],[2,0],[0,2]] in 2 slots; zero keys (uniform attention), s = 0, g = 0."""
    linear = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]))
    torch.manual_seed(0)
    factor = wrap_factor(linear, ProCLOptions(slots=2, key_dim=3, consolidation=consolidation,
                                              slot_scale_init=0.0))
    return linear, factor


def test_the_factor_starts_from_the_authors_init() -> None:
    linear, factor = hand_factor()
    assert factor.weight is linear.weight and factor.original is linear  # M is the LoRA weight itself
    assert torch.equal(factor.initial, linear.weight) and factor.initial.data_ptr() != linear.weight.data_ptr()
    assert float(factor.gate.detach()) == pytest.approx(-math.log(math.sqrt(1.25)))  # g = -log RMS(M0)
    assert torch.equal(factor.scales.detach(), torch.zeros(2))
    assert factor.keys.shape == (2, 2, 3) and float(factor.keys.detach().abs().max()) < 0.1  # 0.01 N(0, 1)
    _, again = hand_factor()
    assert torch.equal(again.keys, factor.keys)  # the same seed draws the same router


def test_execution_and_the_ema_on_numbers_checkable_by_hand() -> None:
    linear, factor = hand_factor()
    with torch.no_grad():
        factor.keys.zero_()  # every head attends uniformly: alpha = sigmoid(0) / 2 = 0.25
        factor.gate.zero_()  # gamma = 0.5
    factor.train()
    y = factor(torch.tensor([[[1.0, 1.0]]]))
    # Row block h of M_exec: 0.5 P_h + 0.25 (P_1 + P_2), P_1 = I, P_2 = 2 I  ->  1.25 I and 1.75 I.
    assert torch.allclose(y, torch.tensor([[[1.25, 1.25, 1.75, 1.75]]]))
    assert torch.equal(linear.weight.detach(), factor.initial)  # the forward does not touch M
    assert factor.consolidate()
    # M <- 0.1 M + 0.9 M_exec: 0.1 + 0.9 * 1.25 = 1.225 and 0.2 + 0.9 * 1.75 = 1.775.
    expected = torch.tensor([[1.225, 0.0], [0.0, 1.225], [1.775, 0.0], [0.0, 1.775]])
    assert torch.allclose(linear.weight.detach(), expected)
    assert not factor.consolidate()  # nothing executed since: no change
    assert torch.allclose(linear.weight.detach(), expected)
    factor.eval()  # evaluation runs M alone, and records nothing
    x = torch.tensor([[[1.0, -2.0], [0.5, 3.0]]])
    assert torch.equal(factor(x), F.linear(x, linear.weight))
    assert not factor.consolidate()


def test_a_step_consolidates_the_row_weighted_mean_of_its_forwards() -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(6, 8)
    factor = wrap_factor(linear, ProCLOptions(slots=4, key_dim=5, consolidation=0.7, slot_scale_init=0.0))
    with torch.no_grad():
        factor.keys.mul_(100.0)  # routing that depends on the input
    factor.train()
    x1, x2 = torch.randn(1, 3, 6), torch.randn(3, 5, 6)
    with torch.no_grad():
        e1, e2 = factor.executed(factor.routing(x1)), factor.executed(factor.routing(x2))
    assert not torch.allclose(e1, e2)
    y1 = factor(x1)
    assert torch.allclose(y1, F.linear(x1, e1, linear.bias))
    factor(x2).sum().backward()
    for name in ("weight", "keys", "scales", "gate"):  # the router learns, M learns through the slots
        grad = getattr(factor, name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in factor.encoder.parameters())
    before = linear.weight.detach().clone()
    assert factor.consolidate()
    assert torch.allclose(linear.weight.detach(), 0.3 * before + 0.7 * (e1 + 3 * e2) / 4, atol=1e-6)


def test_two_dimensional_input_is_one_sequence() -> None:
    torch.manual_seed(2)
    factor = wrap_factor(torch.nn.Linear(6, 4), ProCLOptions(slots=2, key_dim=4))
    factor.train()
    x = torch.randn(5, 6)
    assert torch.equal(factor(x), factor(x[None])[0])
    assert factor(x[0]).shape == (4,)


def test_wrapping_checks_every_factor_first_and_round_trips() -> None:
    from peft import LoraConfig, get_peft_model

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(8, 12)
            self.out = torch.nn.Linear(12, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.up(x)))

    torch.manual_seed(3)
    model = get_peft_model(Toy(), LoraConfig(r=4, target_modules=["up", "out"], init_lora_weights=False))
    model.eval()
    x = torch.randn(2, 3, 8)
    before = model(x)
    with pytest.raises(TrainingError, match=r"strategy\.options\.slots=4 must divide the output size of every "
                                            r"adapted layer, and .*out has 6"):
        wrap_lora_factors(model, ProCLOptions(slots=4))
    with pytest.raises(TrainingError, match=r"strategy\.options\.slots=3 must divide lora\.rank=4"):
        wrap_lora_factors(model, ProCLOptions(slots=3))
    assert unwrap_lora_factors(model) == 0  # a refusal wraps nothing
    factors = wrap_lora_factors(model, ProCLOptions(slots=2))
    assert len(factors) == 4
    assert torch.equal(model(x), before)  # eval runs M alone: the stored LoRA
    assert unwrap_lora_factors(model) == 4
    assert not any(isinstance(m, factor_class()) for m in model.modules())
    assert torch.equal(model(x), before)


# -- stages on the tiny model ------------------------------------------------------------------


def make_engine(tiny_model_dir: Path, data_dir: Path, out: Path, strategy: str = "procl",
                options: dict[str, Any] | None = None, **overrides: Any) -> Engine:
    raw = tiny_spec_dict(tiny_model_dir, data_dir, out, strategy={"name": strategy, "options": options or {}},
                         **overrides)
    spec = spec_from_dict(raw)
    return Engine(spec, loaded=load_model(spec.model, "cpu"))


def train(engine: Engine, stage: int, state: StrategyState | None = None, **kwargs: Any) -> Any:
    tasks = engine.spec.tasks
    return engine.train(run_id="r", seed=7, stage=stage, task=tasks[stage - 1],
                        previous_tasks=[t.name for t in tasks[: stage - 1]], strategy_state=state, n_stages=2,
                        **kwargs)


def lora_weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters() if p.requires_grad}


def wrapped(model: Any) -> int:
    return sum(isinstance(m, factor_class()) for m in model.modules())


def plain_lora(model: Any) -> bool:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(type(f) is torch.nn.Linear for m in layers for f in (*m.lora_A.values(),
                                                                                     *m.lora_B.values()))


def test_the_stage_2_checkpoint_is_a_plain_peft_adapter(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    engine = make_engine(tiny_model_dir, data_dir, tmp_path / "out")
    engine.reset_adapter(7)
    s1 = train(engine, 1)
    after_1 = lora_weights(engine)
    s2 = train(engine, 2, s1.strategy_state)
    assert wrapped(engine.model) == 0 and plain_lora(engine.model)
    assert s2.strategy_state == StrategyState(strategy="procl")
    after_2 = lora_weights(engine)
    assert after_2.keys() == after_1.keys()  # the router is gone from the model
    assert any(not torch.equal(after_2[k], after_1[k]) for k in after_1)  # and stage 2 trained

    folder = engine.save_adapter(tmp_path / "stage-2", strategy_state=s2.strategy_state)
    assert json.loads((folder / STATE_JSON).read_text())["meta"] == {} and not (folder / STATE_TENSORS).exists()
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    assert len(saved) == len(after_2) and all(".lora_A." in k or ".lora_B." in k for k in saved)

    ids = torch.tensor([engine.encode(engine.task_examples("numgluecm")[:1])[0]])
    engine.model.eval()
    with torch.no_grad():
        ours = engine.model(input_ids=ids).logits
        base = load_model(engine.spec.model, "cpu").model
        theirs = PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits
        with engine.base_model() as bare:
            plain = bare(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain, ours)  # the adapter does something: the comparison is not vacuous


def test_stage_1_is_lora_and_stage_2_routes(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No LoRA dropout: the router's initial draws shift torch's stream, and with dropout on, the masks
    # alone would make the two stage 2s differ. Without it, any difference is ProCL's.
    procl = make_engine(tiny_model_dir, data_dir, tmp_path / "p", lora={"dropout": 0.0})
    lora = make_engine(tiny_model_dir, data_dir, tmp_path / "l", "lora", lora={"dropout": 0.0})
    for engine in (procl, lora):
        engine.reset_adapter(7)
    p1, l1 = train(procl, 1), train(lora, 1)
    assert [s.loss for s in p1.steps] == [s.loss for s in l1.steps]
    start = lora_weights(procl)
    assert all(torch.equal(start[k], v) for k, v in lora_weights(lora).items())  # stage 1: plain LoRA

    calls: list[bool] = []
    original = factor_class().consolidate

    def counted(self: Any) -> bool:
        done: bool = original(self)
        calls.append(done)
        return done

    monkeypatch.setattr(factor_class(), "consolidate", counted)
    seen: list[int] = []
    t0 = time.perf_counter()
    p2 = train(procl, 2, p1.strategy_state, on_step=lambda info: seen.append(wrapped(procl.model)))
    procl_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    l2 = train(lora, 2, l1.strategy_state)
    lora_s = time.perf_counter() - t0
    print(f"\nstage 2 on the tiny model: procl {procl_s:.2f} s, lora {lora_s:.2f} s, "
          f"ratio {procl_s / lora_s:.2f}")

    n_factors = 2 * 7 * 2  # 2 blocks x 7 all-linear targets x (lora_A, lora_B)
    assert seen == [n_factors] * len(p2.steps)  # every step ran through the wrappers
    assert calls == [True] * (n_factors * len(p2.steps))  # one consolidation per factor per optimizer step
    assert p2.steps[0].loss != l2.steps[0].loss  # the routed factor runs from the first forward
    got, plain = lora_weights(procl), lora_weights(lora)
    assert got.keys() == plain.keys()
    assert all(not torch.equal(got[k], plain[k]) for k in got)  # every factor moved otherwise than LoRA's


def test_stage_2_resumed_from_the_checkpoint_folder_equals_the_uninterrupted_run(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    whole = make_engine(tiny_model_dir, data_dir, tmp_path / "a")
    whole.reset_adapter(7)
    s1 = train(whole, 1)
    ckpt = whole.save_adapter(tmp_path / "stage-1", strategy_state=s1.strategy_state)
    s2 = train(whole, 2, s1.strategy_state)
    expected = lora_weights(whole)

    resumed = make_engine(tiny_model_dir, data_dir, tmp_path / "b")  # a fresh process
    state = resumed.load_adapter(ckpt)
    assert state == StrategyState(strategy="procl")
    r2 = train(resumed, 2, state)
    got = lora_weights(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [s.loss for s in r2.steps] == [s.loss for s in s2.steps]


def test_slots_that_do_not_divide_the_rank_are_refused_before_anything_is_wrapped(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    # The spec refuses it when it loads ...
    with pytest.raises(SpecError, match=r"strategy\.options\.slots: 3 slots must divide lora\.rank=8"):
        make_engine(tiny_model_dir, data_dir, tmp_path / "out", options={"slots": 3})
    # ... and a stage handed such options anyway (the engine's API takes any entry) refuses before wrapping.
    engine = make_engine(tiny_model_dir, data_dir, tmp_path / "out")
    bad = StrategySpec(name="procl", options={"slots": 3})
    engine.reset_adapter(7)
    s1 = train(engine, 1, strategy=bad)  # stage 1 is plain LoRA: the slots play no part yet
    before = lora_weights(engine)
    with pytest.raises(TrainingError, match=r"^run r stage 2: strategy 'procl': strategy\.options\.slots=3 must "
                                            r"divide lora\.rank=8 .*choose slots among the divisors of the rank"):
        train(engine, 2, s1.strategy_state, strategy=bad)
    assert wrapped(engine.model) == 0 and plain_lora(engine.model)
    after = lora_weights(engine)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_wrappers_a_failed_stage_left_behind_are_removed(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model_dir, data_dir, tmp_path / "out")
    engine.reset_adapter(7)
    wrap_lora_factors(engine.model, ProCLOptions())  # as a stage that raised would leave them
    assert wrapped(engine.model) == 28
    reference = make_engine(tiny_model_dir, data_dir, tmp_path / "ref")
    reference.reset_adapter(7)
    got, expected = train(engine, 1), train(reference, 1)
    assert wrapped(engine.model) == 0 and plain_lora(engine.model)
    assert [s.loss for s in got.steps] == [s.loss for s in expected.steps]
