"""O-LoRA on the tiny Llama: earlier pairs stay bit-exact, the penalty lowers the overlap, resume and PEFT loading.

The spec says rank 4, alpha 16 per task; ``Engine.start_run(seed, n_stages=2)`` builds the stacked
adapter ``OLoRA.adapter_lora`` asks for (rank 8, alpha 32) and selects it, as a run does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import spec_from_dict
from slmcl.errors import SpecError, TrainingError
from slmcl.models.engine import Engine
from slmcl.models.loading import load_model
from slmcl.training.loop import StageTrainResult
from slmcl.training.strategies import (
    STRATEGIES,
    StageContext,
    StrategyState,
    get_strategy,
    validate_strategy_options,
)
from slmcl.training.strategies.olora import OLoRA, l2_loss, orthogonality_loss
from tests.conftest import tiny_spec_dict

RANK = 4  # per task
N_STAGES = 2


def olora_engine(tiny_model_dir: Path, data_dir: Path, out: Path, options: dict[str, Any] | None = None,
                 **overrides: Any) -> Engine:
    raw = tiny_spec_dict(tiny_model_dir, data_dir, out, strategy={"name": "olora", "options": options or {}},
                         lora={"rank": RANK, "alpha": 16}, **overrides)
    spec = spec_from_dict(raw)
    return Engine(spec, loaded=load_model(spec.model, "cpu"))


def begin_run(engine: Engine) -> None:
    """A new run: the stacked adapter, fresh (Kaiming A, zero B in every slice)."""
    engine.start_run(7, n_stages=N_STAGES)


def train(engine: Engine, stage: int, state: StrategyState | None = None) -> StageTrainResult:
    names = [t.name for t in engine.spec.tasks]
    return engine.train(run_id="r", seed=7, stage=stage, task=engine.spec.task(names[stage - 1]),
                        previous_tasks=names[: stage - 1], strategy_state=state, n_stages=N_STAGES)


def lora_pairs(engine: Engine) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every LoRA module's (A, B) weights, copied: A is (RANK * N_STAGES, d_in), B (d_out, RANK * N_STAGES)."""
    from peft.tuners.lora import LoraLayer

    ad = engine.adapter
    layers: list[tuple[str, Any]] = [(n, m) for n, m in engine.model.named_modules()
                                     if isinstance(m, LoraLayer) and ad in m.lora_A]
    return {name: (m.lora_A[ad].weight.detach().clone(), m.lora_B[ad].weight.detach().clone()) for name, m in layers}


def slice_of(t: int) -> slice:
    return slice((t - 1) * RANK, t * RANK)


def total_overlap(engine: Engine) -> float:
    """sum over modules of sum |A_1 A_2^T|, computed here independently of the strategy."""
    return sum(float((a[slice_of(1)].double() @ a[slice_of(2)].double().T).abs().sum())
               for a, _ in lora_pairs(engine).values())


# -- the penalty, by hand ----------------------------------------------------------------------


def test_penalty_values_worked_by_hand() -> None:
    # Module 1: A_old = [[1, 2, 0], [0, 1, -1]], A_t = [[3, -1, 2]] -> G = [[1], [-3]]: l1 4, fro2 10.
    # Module 2: A_old = [[2, 0]], A_t = [[1, 1], [0, -1]] -> G = [[2, 0]]: l1 2, fro2 4.
    old = [torch.tensor([[1.0, 2, 0], [0, 1, -1]]), torch.tensor([[2.0, 0]])]
    new = [torch.tensor([[3.0, -1, 2]]), torch.tensor([[1.0, 1], [0, -1]])]
    assert orthogonality_loss(old, new, "l1").item() == 6.0
    assert orthogonality_loss(old, new, "fro2").item() == 14.0
    assert orthogonality_loss(old, new, "l1", "mean").item() == 3.0
    assert orthogonality_loss(old, new, "fro2", "mean").item() == 7.0
    # bf16 inputs are computed in fp32 (the result is fp32, same numbers).
    got = orthogonality_loss([o.bfloat16() for o in old], [n.bfloat16() for n in new], "fro2")
    assert got.dtype == torch.float32 and got.item() == 14.0
    # L2: Frobenius norms, not squared: ||[[3, 4]]|| = 5, ||[[0], [0]]|| = 0; ||[[1]]|| = 1, ||[[2, 2, 1]]|| = 3.
    pairs = [(torch.tensor([[3.0, 4]]), torch.zeros(2, 1)), (torch.tensor([[1.0]]), torch.tensor([[2.0, 2, 1]]))]
    assert l2_loss(pairs).item() == 9.0 and l2_loss(pairs, "mean").item() == 4.5
    # The gradient of the L1 penalty w.r.t. A_t is sign(G)^T A_old: module 1 -> [1, 2, 0] - [0, 1, -1].
    a_t = new[0].clone().requires_grad_(True)
    orthogonality_loss([old[0]], [a_t], "l1").backward()
    assert a_t.grad is not None and a_t.grad.tolist() == [[1.0, 1.0, 1.0]]
    # B_t starts at zero: the L2 term's gradient there is 0, not NaN.
    b_t = torch.zeros(2, 1, requires_grad=True)
    l2_loss([(torch.ones(1, 1), b_t)]).backward()
    assert b_t.grad is not None and torch.equal(b_t.grad, torch.zeros(2, 1))


# -- options and the adapter's shape -----------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"lamda1": 1.0}, r"^strategy\.options\.lamda1: unknown option of strategy 'olora'\. Did you mean 'lambda1'\? "
                      r"Known: lambda1, lambda2, norm, reduce$"),
    ({"lambda1": -0.5}, r"^strategy\.options\.lambda1: must be a finite number >= 0, got -0\.5$"),
    ({"lambda2": math.nan}, r"^strategy\.options\.lambda2: must be a finite number >= 0, got nan$"),
    ({"lambda1": "0.5"}, r"^strategy\.options\.lambda1: must be float, got '0\.5' \(str\)$"),
    ({"norm": "l2"}, r"^strategy\.options\.norm: must be 'l1' \| 'fro2', got 'l2' \(str\)$"),
    ({"reduce": "max"}, r"^strategy\.options\.reduce: must be 'sum' \| 'mean', got 'max' \(str\)$"),
])
def test_bad_options_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate_strategy_options("olora", options)
    with pytest.raises(SpecError, match=message):
        get_strategy("olora", options)


def test_defaults_follow_the_released_code_and_the_adapter_stacks_one_pair_per_stage() -> None:
    assert STRATEGIES.get("olora") is OLoRA
    assert validate_strategy_options("olora", {}) == {"lambda1": 0.5, "lambda2": 0.0, "norm": "l1", "reduce": "sum"}
    assert validate_strategy_options("olora", {"lambda1": 5}) == {"lambda1": 5.0, "lambda2": 0.0, "norm": "l1",
                                                                 "reduce": "sum"}
    from slmcl.config.spec import LoraSpec

    lora = LoraSpec(rank=8, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"])
    stacked = OLoRA().adapter_lora(lora, 5)
    assert (stacked.rank, stacked.alpha) == (40, 160) and stacked.alpha / stacked.rank == lora.alpha / lora.rank
    assert (stacked.dropout, stacked.target_modules) == (lora.dropout, lora.target_modules)
    with pytest.raises(SpecError, match=r"^lora\.bias: strategy 'olora' .* must be 'none'"):
        OLoRA().adapter_lora(dataclasses.replace(lora, bias="all"), 5)


def test_an_adapter_not_built_for_the_stages_is_refused(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    # Started for one stage, the adapter is the spec's own rank 3, which cannot hold 2 equal per-stage pairs.
    raw = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path, strategy={"name": "olora"}, lora={"rank": 3})
    spec = spec_from_dict(raw)
    engine = Engine(spec, loaded=load_model(spec.model, "cpu"))
    engine.start_run(7, n_stages=1)
    with pytest.raises(TrainingError, match=r"stage 1: strategy 'olora': the adapter's rank \(3\) is not one rank-r "
                                            r"pair per stage x 2 stages; build the adapter with the strategy's "
                                            r"adapter_lora"):
        train(engine, 1)


# -- training on the tiny model ----------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_the_hooks_confine_gradients_and_updates_to_the_stage_slice(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, stage: int
) -> None:
    """Each hook on its own: after_backward leaves gradient only in slice ``stage`` (so clipping and AdamW
    see only it), after_step puts every other slice back whatever the optimizer did to it."""
    engine = olora_engine(tiny_model_dir, data_dir, tmp_path)
    begin_run(engine)
    lora_params = [p for n, p in engine.model.named_parameters() if ".lora_" in n and f".{engine.adapter}." in n]
    with torch.no_grad():
        for p in lora_params:
            p.normal_()  # every slice trained-looking, so stage 2's check of the earlier pair passes
    start = lora_pairs(engine)
    strategy = OLoRA()
    ctx = StageContext(model=engine.model, run_id="r", seed=7, stage=stage, task="fomc", previous_tasks=[],
                       options={}, n_stages=N_STAGES)
    strategy.on_stage_start(ctx)
    for p in lora_params:
        p.grad = torch.ones_like(p)
    strategy.after_backward(ctx)
    with torch.no_grad():
        for p in lora_params:
            p.add_(1.0)  # what an optimizer step might do to every slice
    strategy.after_step(ctx)
    ours, other = slice_of(stage), slice_of(3 - stage)
    for name, (a, b) in lora_pairs(engine).items():
        layer = engine.model.get_submodule(name)
        grad_a, grad_b = layer.lora_A[engine.adapter].weight.grad, layer.lora_B[engine.adapter].weight.grad
        assert bool((grad_a[ours] == 1).all()) and bool((grad_b[:, ours] == 1).all()), name
        assert not grad_a[other].any() and not grad_b[:, other].any(), name
        assert torch.equal(a[ours], start[name][0][ours] + 1) and torch.equal(b[:, ours], start[name][1][:, ours] + 1)
        assert torch.equal(a[other], start[name][0][other]) and torch.equal(b[:, other], start[name][1][:, other])


def test_earlier_pairs_stay_bit_identical_and_only_the_stage_slice_trains(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    engine = olora_engine(tiny_model_dir, data_dir, tmp_path, {"lambda1": 0.5, "lambda2": 0.1},
                          training={"weight_decay": 0.5})
    begin_run(engine)
    fresh = lora_pairs(engine)
    assert fresh and all(a.shape[0] == b.shape[1] == RANK * N_STAGES for a, b in fresh.values())
    r1 = train(engine, 1)
    after1 = lora_pairs(engine)
    assert r1.strategy_state.meta == {"stage": 1, "rank_per_task": RANK}
    for name, (a, b) in after1.items():
        # Stage 1 trained slice 1 only: slice 2 is still its fresh Kaiming A and zero B (it adds nothing).
        assert torch.equal(a[slice_of(2)], fresh[name][0][slice_of(2)]), name
        assert torch.equal(b[:, slice_of(2)], torch.zeros_like(b[:, slice_of(2)])), name
        assert fresh[name][0][slice_of(2)].any(), name
    assert all(not torch.equal(a[slice_of(1)], fresh[n][0][slice_of(1)]) for n, (a, _) in after1.items())
    assert any(b[:, slice_of(1)].any() for _, b in after1.values())

    r2 = train(engine, 2, r1.strategy_state)
    after2 = lora_pairs(engine)
    assert r2.strategy_state.meta == {"stage": 2, "rank_per_task": RANK}
    for name, (a, b) in after2.items():
        # Weight decay 0.5 and the penalty's gradient through A_old would both move slice 1 if it trained.
        assert torch.equal(a[slice_of(1)], after1[name][0][slice_of(1)]), name
        assert torch.equal(b[:, slice_of(1)], after1[name][1][:, slice_of(1)]), name
        assert not torch.equal(a[slice_of(2)], after1[name][0][slice_of(2)]), name
    assert any(b[:, slice_of(2)].any() for _, b in after2.values())


def test_the_penalty_lowers_the_overlap_and_is_reported_apart_from_the_lm_loss(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    base = olora_engine(tiny_model_dir, data_dir, tmp_path / "s1")
    begin_run(base)
    r1 = train(base, 1)
    assert [s.strategy_loss for s in r1.steps] == [None] * len(r1.steps)  # no earlier pair, lambda2 = 0
    ckpt = base.save_adapter(tmp_path / "stage-1", strategy_state=r1.strategy_state)
    start = total_overlap(base)
    assert start > 0

    overlap, runs = {}, {}
    for lam in (0.0, 5.0):
        engine = olora_engine(tiny_model_dir, data_dir, tmp_path / f"l{lam}", {"lambda1": lam})
        state = engine.load_adapter(ckpt)
        runs[lam] = train(engine, 2, state)
        overlap[lam] = total_overlap(engine)
    assert overlap[5.0] < start and overlap[5.0] < 0.95 * overlap[0.0], (start, overlap)

    # strategy_loss is lambda1 x the penalty on the weights the step started from: at step 1 the
    # stage-1 checkpoint's sum |A_1 A_2^T|. loss is the LM loss alone: step 1's is the same either way.
    with_penalty, without = runs[5.0].steps, runs[0.0].steps
    assert with_penalty[0].strategy_loss == pytest.approx(5.0 * start, rel=1e-5)
    assert all(s.strategy_loss is not None and s.strategy_loss > 0 for s in with_penalty)
    assert all(s.strategy_loss is None for s in without)
    assert with_penalty[0].loss == without[0].loss

    # fro2 at step 1 is the squared Frobenius norm of the same products; "mean" divides by the modules.
    pairs = lora_pairs(base)
    fro2 = sum(float((a[slice_of(1)].double() @ a[slice_of(2)].double().T).square().sum()) for a, _ in pairs.values())
    for options, expected in (({"norm": "fro2", "lambda1": 2.0}, 2.0 * fro2),
                              ({"reduce": "mean", "lambda1": 1.0}, start / len(pairs))):
        engine = olora_engine(tiny_model_dir, data_dir, tmp_path / str(options), options)
        first = train(engine, 2, engine.load_adapter(ckpt)).steps[0].strategy_loss
        assert first == pytest.approx(expected, rel=1e-5), options


def test_resumed_from_the_checkpoint_folder_equals_the_uninterrupted_run(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    options = {"lambda1": 2.0, "lambda2": 0.1}
    whole = olora_engine(tiny_model_dir, data_dir, tmp_path / "a", options, training={"weight_decay": 0.1})
    begin_run(whole)
    s1 = train(whole, 1)
    ckpt = whole.save_adapter(tmp_path / "stage-1", strategy_state=s1.strategy_state)
    s2 = train(whole, 2, s1.strategy_state)
    expected = lora_pairs(whole)

    resumed = olora_engine(tiny_model_dir, data_dir, tmp_path / "b", options, training={"weight_decay": 0.1})
    # A fresh process that forgot to load the checkpoint: slice 1 is untrained, and that is refused.
    begin_run(resumed)
    with pytest.raises(TrainingError, match=r"stage 2: strategy 'olora': the LoRA pair of stage 1 \(rank slice "
                                            r"\[0, 4\)\) is untrained .* not loaded"):
        train(resumed, 2)
    state = resumed.load_adapter(ckpt)
    assert state == StrategyState(meta={"stage": 1, "rank_per_task": RANK}, strategy="olora")
    r2 = train(resumed, 2, state)
    got = lora_pairs(resumed)
    assert got.keys() == expected.keys()
    for name, (a, b) in expected.items():
        assert torch.equal(got[name][0], a) and torch.equal(got[name][1], b), name
    assert [s.loss for s in r2.steps] == [s.loss for s in s2.steps]
    assert [s.strategy_loss for s in r2.steps] == [s.strategy_loss for s in s2.steps]

    # A state from another stage, or from pairs of another rank, is refused rather than trusted.
    with pytest.raises(TrainingError, match=r"stage 2: strategy 'olora' needs the state exported by stage 1, "
                                            r"got the state of stage 2"):
        train(resumed, 2, r2.strategy_state)
    with pytest.raises(TrainingError, match=r"the previous stage trained rank-8 pairs, this adapter holds rank 4"):
        train(resumed, 2, StrategyState(meta={"stage": 1, "rank_per_task": 8}))


def test_the_checkpoint_loads_with_plain_peft_and_gives_the_same_logits(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = olora_engine(tiny_model_dir, data_dir, tmp_path / "out", {"lambda1": 1.0})
    begin_run(engine)
    s1 = train(engine, 1)
    train(engine, 2, s1.strategy_state)
    folder = engine.save_adapter(tmp_path / "ckpt")

    ids = torch.tensor([[1, 15, 27, 300, 41, 9, 2048, 7]])
    engine.model.eval()
    with torch.no_grad():
        ours = engine.model(input_ids=ids).logits
        with engine.base_model() as base:
            plain = base(input_ids=ids).logits
    assert not torch.equal(ours, plain)  # the adapter does something

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
    peft.eval()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK * N_STAGES, 16 * N_STAGES)
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
