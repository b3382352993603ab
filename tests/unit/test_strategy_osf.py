"""OSF on the tiny Llama: the frozen subspace really is frozen, ranks follow their schedules, and the
merged checkpoint is a plain model that resumes bit for bit.

Each stage is run the way the engine runs a ``merged`` strategy: a private copy of the plain base
holding the previous stage's weights goes through ``stage_model``, ``train_stage`` trains what it
returns, and ``merged_model`` folds it back into dense weights.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.errors import SpecError, TrainingError
from slmcl.models.engine import stage_seed
from slmcl.models.loading import LoadedModel, load_model
from slmcl.tasks.data import Example, load_examples
from slmcl.tasks.prompts import PromptRenderer
from slmcl.training.loop import build_sft_example, train_stage
from slmcl.training.strategies import STRATEGIES, StageContext, get_strategy, validate_strategy_options
from slmcl.training.strategies.osf import (
    OSF,
    adaptive_ranks,
    layer_importance,
    osf_layers,
    progressive_rank,
    target_shapes,
)
from tests.conftest import tiny_spec_dict

TASKS = ["fomc", "numgluecm", "scienceqa"]
SEED = 7


class Harness:
    """What the engine hands a merged strategy, built from a spec without the engine's LoRA model."""

    def __init__(self, spec: ExperimentSpec, loaded: LoadedModel) -> None:
        self.spec = spec
        self.loaded = loaded
        self.renderer = PromptRenderer(loaded.tokenizer, spec.chat)

    def rows(self, name: str) -> list[Example]:
        task = self.spec.task(name)
        return [dataclasses.replace(r, task_name=name)
                for r in load_examples(task.train_file, limit=self.spec.training.max_examples)]

    def encode(self, rows: Sequence[Example]) -> list[list[int]]:
        return [build_sft_example(self.loaded.tokenizer, self.renderer, self.spec.task(r.task_name), r,
                                  self.spec.training.max_length).input_ids for r in rows]

    def stage(self, base: Any, stage: int, options: dict[str, Any] | None = None,
              n_stages: int = len(TASKS)) -> tuple[OSF, Any, StageContext, dict[str, Any]]:
        """One stage on ``base`` (consumed): the strategy, the trained PEFT model, its context, the state's meta."""
        strategy = get_strategy("osf", options or {})
        assert isinstance(strategy, OSF)
        name = TASKS[stage - 1]
        ctx = StageContext(model=None, run_id="r", seed=SEED, stage=stage, task=name, previous_tasks=TASKS[: stage - 1],
                           options=options or {}, n_stages=n_stages, task_examples=self.rows, encode=self.encode)
        model = strategy.stage_model(ctx, base)
        ctx.model = model
        sft = [build_sft_example(self.loaded.tokenizer, self.renderer, self.spec.task(name), ex,
                                 self.spec.training.max_length) for ex in self.rows(name)]
        s = stage_seed(SEED, stage)
        torch.manual_seed(s)
        result = train_stage(model, sft, self.spec.training, strategy, ctx, pad_id=self.loaded.pad_token_id,
                             device=torch.device("cpu"), generator=torch.Generator().manual_seed(s))
        return strategy, model, ctx, result.strategy_state.meta


@pytest.fixture(scope="module")
def harness(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Harness:
    raw = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path_factory.mktemp("osf-out"), tasks=TASKS,
                         strategy={"name": "osf"})
    spec = spec_from_dict(raw)
    return Harness(spec, load_model(spec.model, "cpu"))


def fresh_base(h: Harness) -> Any:
    return copy.deepcopy(h.loaded.model)


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def logits(model: Any, h: Harness) -> torch.Tensor:
    ids = h.encode(h.rows("fomc")[:2])
    width = max(len(r) for r in ids)
    x = torch.full((len(ids), width), h.loaded.pad_token_id)
    mask = torch.zeros_like(x)
    for i, r in enumerate(ids):
        x[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask).logits * mask[..., None]


# -- the defining property ---------------------------------------------------------------------


def test_the_frozen_top_subspace_of_every_weight_survives_the_stage(harness: Harness) -> None:
    """dW = W_after - W_before has no component in W_before's top-k left or right singular subspace,
    on stage 1 and on stage 2, whose SVD is of stage 1's updated weights; and dW is not zero."""
    base = fresh_base(harness)
    targets = target_shapes(base, "all-linear")
    assert len(targets) == 14 and not any("lm_head" in n for n in targets)
    for stage in (1, 2):
        before = weights(base)
        strategy, model, ctx, meta = harness.stage(base, stage)
        base = strategy.merged_model(ctx, model)
        after = weights(base)
        preserved = meta["preserved"]
        assert set(preserved) == set(targets)
        for name in targets:
            w0, w1 = before[f"{name}.weight"].double(), after[f"{name}.weight"].double()
            k = preserved[name]
            # PEFT's own decomposition (fp32, the same LAPACK call): near a small singular gap an fp64 SVD
            # picks a top-k subspace that differs by eps/gap, which would be measured as leakage.
            u, _, vh = (t.double() for t in torch.linalg.svd(w0.float(), full_matrices=False))
            u_h, v_h = u[:, :k], vh[:k].T
            dw = w1 - w0
            assert dw.norm() > 1e-4 * w0.norm(), f"stage {stage} {name}: no update"
            assert (u_h.T @ dw).norm() < 1e-4 * dw.norm(), f"stage {stage} {name}: left leak"
            assert (dw @ v_h).norm() < 1e-4 * dw.norm(), f"stage {stage} {name}: right leak"
        for name, w in before.items():  # everything but the targets is frozen
            if name.removesuffix(".weight") not in targets:
                assert torch.equal(w, after[name]), name


def test_reprojection_keeps_adam_from_leaking_into_the_frozen_subspace(harness: Harness) -> None:
    """PEFT projects gradients only; Adam's per-coordinate steps then leak into the frozen subspace,
    which the post-step re-projection removes (``max_leak`` is measured on the trained factors)."""
    leaks = {}
    for reproject in (False, True):
        meta = harness.stage(fresh_base(harness), 1, {"rank_schedule": "uniform", "reproject": reproject})[3]
        leaks[reproject] = meta["max_leak"]
    print(f"\nmax leak into the frozen subspace: without reprojection {leaks[False]:.2e}, with {leaks[True]:.2e}")
    assert leaks[True] < 1e-5
    assert leaks[False] > 100 * leaks[True]


def test_factors_are_fp32_and_the_bf16_base_is_untouched(harness: Harness) -> None:
    """The pitfall of PEFT decomposing in the weight's dtype: a bf16 base still gets fp32 factors, and its
    own weights come back bit-exact (the SVD runs on an fp32 copy)."""
    base = fresh_base(harness).to(torch.bfloat16)
    before = weights(base)
    strategy = get_strategy("osf", {"rank_schedule": "uniform"})
    ctx = StageContext(model=None, run_id="r", seed=SEED, stage=1, task="fomc", previous_tasks=[], options={},
                       n_stages=3)
    model = strategy.stage_model(ctx, base)
    layers = osf_layers(model)
    for layer in layers.values():
        assert all(p.dtype == torch.float32 for p in layer.osf_svd_params.parameters())
        assert all(b.dtype == torch.float32 for b in layer.buffers() if b.ndim)
        w = layer.get_base_layer().weight
        assert w.dtype == torch.bfloat16
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, before[f"{name}.weight"])


# -- ranks -------------------------------------------------------------------------------------


def test_progressive_preserved_rank_grows_stage_by_stage(harness: Harness) -> None:
    base = fresh_base(harness)
    history: list[dict[str, int]] = []
    for stage in (1, 2, 3):
        strategy, model, ctx, meta = harness.stage(base, stage)
        assert meta["stage"] == stage and meta["rank_schedule"] == "progressive"
        # what PEFT froze is what the state reports
        assert {n: layer.effective_rank["default"] for n, layer in osf_layers(model).items()} == meta["preserved"]
        history.append(meta["preserved"])
        base = strategy.merged_model(ctx, model)
    dims = meta["min_dim"]
    assert set(dims.values()) == {32, 64}  # k/v projections are 32 wide here, the rest 64
    for name, p in dims.items():
        ks = [h[name] for h in history]
        assert ks == [1, p // 3, 2 * p // 3], name  # stage 1 would be 0, which PEFT refuses: 1
        assert ks[0] < ks[1] < ks[2]


def test_rank_rules_by_hand() -> None:
    assert [progressive_rank(64, t, 4) for t in (1, 2, 3, 4)] == [1, 16, 32, 48]
    assert progressive_rank(3, 5, 5) == 2  # never the whole matrix: p - 1 at most
    # mean importance 1: r = 0.1 + I (0.8 - 0.1) -> 0.45, 0.8, 1.15 clipped to 1 - 1/p
    got = adaptive_ranks({"a": 0.5, "b": 1.0, "c": 1.5}, {"a": 64, "b": 64, "c": 64}, 0.1, 0.8)
    assert got == {"a": 28, "b": 51, "c": 63}
    # a negative cosine clips at mrr; p enters per matrix
    got = adaptive_ranks({"a": -1.0, "b": 2.0, "c": 2.0}, {"a": 40, "b": 64, "c": 32}, 0.1, 0.8)
    assert got == {"a": 4, "b": 63, "c": 31}
    # a non-positive mean importance carries no ranking: every matrix gets trr
    assert adaptive_ranks({"a": -0.5, "b": 0.2}, {"a": 100, "b": 10}, 0.1, 0.8) == {"a": 80, "b": 8}


def test_importance_is_the_mean_cosine_of_input_and_output(harness: Harness) -> None:
    """cos(x, Wx) per token: 1 for the identity, -1 for its negative, and for non-square W the shorter
    vector is zero-padded: [I; 0] keeps x (1), [I; I] keeps half its energy in the shared coordinates (1/sqrt 2)."""
    base = fresh_base(harness)
    layer = base.model.layers[0]
    eye = torch.eye(64)
    with torch.no_grad():
        layer.self_attn.q_proj.weight.copy_(eye)
        layer.self_attn.o_proj.weight.copy_(-eye)
        layer.mlp.up_proj.weight.copy_(torch.cat([eye, torch.zeros(64, 64)]))  # 128 x 64
        layer.mlp.gate_proj.weight.copy_(torch.cat([eye, eye]))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj",
             "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
    ids = harness.encode(harness.rows("fomc")[:3])
    got = layer_importance(base, names, ids)
    assert got[names[0]] == pytest.approx(1.0, abs=1e-5)
    assert got[names[1]] == pytest.approx(-1.0, abs=1e-5)
    assert got[names[2]] == pytest.approx(1.0, abs=1e-5)
    assert got[names[3]] == pytest.approx(2 ** -0.5, abs=1e-5)
    assert abs(got[names[4]]) < 0.5  # random weights: near-orthogonal output


def test_adaptive_ranks_follow_importance_on_the_previous_task(harness: Harness) -> None:
    """Stage 2 measures importance on stage 1's task rows: a layer that passes its input through
    (identity) is the most important and keeps p - 1 directions; every rank lies in [mrr p, p - 1]
    and the retained fractions differ across layers. Stage 1 has no previous task: trr everywhere."""
    opts = {"rank_schedule": "adaptive", "importance_rows": 4}
    strategy, model, ctx, meta1 = harness.stage(fresh_base(harness), 1, opts)
    assert "importance" not in meta1
    assert meta1["preserved"] == {n: int(0.8 * p) for n, p in meta1["min_dim"].items()}
    base = strategy.merged_model(ctx, model)
    q0 = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        base.get_submodule(q0).weight.copy_(torch.eye(64))
    seen: list[tuple[int, set[str]]] = []

    def encode(rows: Sequence[Example]) -> list[list[int]]:
        seen.append((len(rows), {r.task_name for r in rows}))
        return harness.encode(rows)

    second = get_strategy("osf", opts)
    assert isinstance(second, OSF)
    ctx = StageContext(model=None, run_id="r", seed=SEED, stage=2, task=TASKS[1], previous_tasks=TASKS[:1],
                       options=opts, n_stages=3, task_examples=harness.rows, encode=encode)
    second.stage_model(ctx, base)
    assert seen == [(4, {"fomc"})]  # importance_rows rows, all of the previous task
    imp, ks, dims = second.importance, second.preserved, second.min_dim
    assert imp is not None and max(imp, key=lambda n: imp[n]) == q0
    assert ks[q0] == 63
    for name, k in ks.items():
        assert int(0.1 * dims[name]) <= k <= dims[name] - 1, name
    assert len({round(k / dims[n], 3) for n, k in ks.items()}) > 3


def test_target_modules_option_picks_the_layers(harness: Harness) -> None:
    base = fresh_base(harness)
    strategy = get_strategy("osf", {"target_modules": ["q_proj", "v_proj"]})
    ctx = StageContext(model=None, run_id="r", seed=SEED, stage=2, task="numgluecm", previous_tasks=["fomc"],
                       options={}, n_stages=3)
    model = strategy.stage_model(ctx, base)
    wrapped = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert sorted(osf_layers(model)) == wrapped
    assert all("osf_svd_params" in n for n, p in model.named_parameters() if p.requires_grad)
    regex = target_shapes(fresh_base(harness), r"model\.layers\.1\.mlp\..*")
    assert sorted(regex) == [f"model.layers.1.mlp.{m}" for m in ("down_proj", "gate_proj", "up_proj")]
    with pytest.raises(TrainingError, match="output layer"):
        target_shapes(fresh_base(harness), ["lm_head"])
    with pytest.raises(TrainingError, match="matches no linear layer"):
        get_strategy("osf", {"target_modules": ["nope"]}).stage_model(ctx, fresh_base(harness))


# -- the checkpoint ------------------------------------------------------------------------------


def test_merged_model_is_a_plain_model_that_loads_without_us(harness: Harness, tmp_path: Path) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    base = fresh_base(harness)
    before = weights(base)
    strategy, model, ctx, _ = harness.stage(base, 1)
    trained = logits(model, harness)
    dense = strategy.merged_model(ctx, model)
    assert type(dense) is type(harness.loaded.model)
    assert not any(isinstance(m, BaseTunerLayer) for m in dense.modules())
    assert sorted(weights(dense)) == sorted(before)
    assert not torch.equal(weights(dense)["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])  # merged, not unloaded
    merged = logits(dense, harness)
    assert torch.allclose(merged, trained, atol=1e-4, rtol=1e-4)  # the function that was trained
    dense.save_pretrained(tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("adapter_*"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(back, harness), merged)


def test_resume_from_the_saved_folder_is_bit_identical(harness: Harness, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    strategy, model, ctx, _ = harness.stage(fresh_base(harness), 1, {"rank_schedule": "adaptive", "importance_rows": 3})
    dense = strategy.merged_model(ctx, model)
    dense.save_pretrained(tmp_path / "stage1")
    straight = copy.deepcopy(dense)
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "stage1")
    results = []
    for base in (straight, resumed):
        s2, m2, c2, meta = harness.stage(base, 2, {"rank_schedule": "adaptive", "importance_rows": 3})
        results.append((weights(s2.merged_model(c2, m2)), meta))
    (w_a, meta_a), (w_b, meta_b) = results
    assert meta_a == meta_b
    assert w_a.keys() == w_b.keys()
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_stage_hooks_refuse_a_model_stage_model_did_not_build(harness: Harness) -> None:
    strategy = get_strategy("osf")
    ctx = StageContext(model=fresh_base(harness), run_id="r", seed=SEED, stage=1, task="fomc", previous_tasks=[],
                       options={}, n_stages=3)
    with pytest.raises(TrainingError, match="stage_model"):
        strategy.on_stage_start(ctx)
    strategy.stage_model(ctx, fresh_base(harness))
    with pytest.raises(TrainingError, match="another model"):
        strategy.on_stage_start(ctx)
    bad = StageContext(model=None, run_id="r", seed=SEED, stage=3, task="x", previous_tasks=["a", "b"], options={},
                       n_stages=2)
    with pytest.raises(TrainingError, match="n_stages=2"):
        get_strategy("osf").stage_model(bad, fresh_base(harness))


# -- options -------------------------------------------------------------------------------------


def test_registered_as_a_merged_strategy_with_defaults() -> None:
    assert STRATEGIES.get("osf") is OSF and OSF.checkpoint == "merged"
    assert validate_strategy_options("osf", {}) == {
        "rank_schedule": "progressive", "preserve": 0.5, "mrr": 0.1, "trr": 0.8, "importance_rows": 128,
        "reproject": True, "target_modules": "all-linear"}
    assert validate_strategy_options("osf", {"target_modules": ["q_proj"], "preserve": 0})["preserve"] == 0.0


@pytest.mark.parametrize(("options", "message"), [
    ({"rank_schedule": "fixed"}, r"^strategy\.options\.rank_schedule: must be 'progressive' \| 'uniform' \| "),
    ({"preserve": 1.0}, r"^strategy\.options\.preserve: must be in \[0, 1\), got 1\.0$"),
    ({"preserve": -0.1}, r"^strategy\.options\.preserve: must be in \[0, 1\)"),
    ({"mrr": 1.5}, r"^strategy\.options\.mrr: must be in \[0, 1\)"),
    ({"mrr": 0.5, "trr": 0.4}, r"^strategy\.options\.trr: must be in \[mrr, 1\) = \[0\.5, 1\), got 0\.4$"),
    ({"trr": 1.0}, r"^strategy\.options\.trr: must be in \[mrr, 1\)"),
    ({"importance_rows": 0}, r"^strategy\.options\.importance_rows: must be >= 1, got 0$"),
    ({"importance_rows": 1.5}, r"^strategy\.options\.importance_rows: must be int"),
    ({"reproject": "yes"}, r"^strategy\.options\.reproject: must be bool"),
    ({"target_modules": []}, r"^strategy\.options\.target_modules: must be a non-empty list"),
    ({"target_modules": ""}, r"^strategy\.options\.target_modules: must not be empty$"),
    ({"target_modules": "q_proj("}, r"^strategy\.options\.target_modules: not a regular expression"),
    ({"target_modules": [1]}, r"^strategy\.options\.target_modules: must be str or list of str"),
    ({"rank": 3}, r"^strategy\.options\.rank: unknown option of strategy 'osf'"),
])
def test_bad_options_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate_strategy_options("osf", options)
