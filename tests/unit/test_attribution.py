"""Drift attribution from the weights: hand-checkable statistics on built matrices, the update read off a
PEFT model equal to PEFT's own merge, and a planted update found by both the weights and the KL.

The matrices of the statistics tests are built from chosen singular vectors and values, so every
expected number (a norm ratio, an entropy, an intruder count) follows from the construction.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import LoraSpec, ModelSpec
from slmcl.inference.attribution import (
    ROW_KEYS,
    ModuleUpdate,
    attribution_rows,
    base_left_singular_vectors,
    layer_of,
    leave_one_layer_out,
    lora_layer_disabled,
    lora_layers,
    lora_updates,
    module_path,
    override_updates,
    top_layers,
    update_stats,
)
from slmcl.models.checkpoints import dense_overrides
from slmcl.models.loading import attach_lora, load_model
from slmcl.models.lora import add_lora, lora_config

N = 48


def orthonormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


@pytest.fixture(scope="module")
def svd_parts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = U diag(s) Vᵀ with distinct, well separated singular values 10 .. 1."""
    return orthonormal(N, 1), torch.linspace(10.0, 1.0, N, dtype=torch.float64), orthonormal(N, 2)


def weight(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    u, s, v = parts
    return ((u * s) @ v.T).float()


def rank_one(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    return (scale * torch.outer(x / x.norm(), y / y.norm())).float()


# -- names -------------------------------------------------------------------------------------------

def test_layer_of_reads_the_block_index_and_nothing_else() -> None:
    assert layer_of("base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight") == 3
    assert layer_of("model.layers.12.mlp.down_proj") == 12
    assert layer_of("transformer.h.5.attn.c_attn.weight") == 5
    assert layer_of("model.layers.7") == 7
    for outside in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers_x.3.q",
                    "model.sublayers.2.q_proj"):
        assert layer_of(outside) is None, outside
    assert module_path("base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight") == \
        "model.layers.3.self_attn.q_proj"
    u = ModuleUpdate.of("model.layers.3.mlp.up_proj.base_layer.weight", torch.zeros(2, 2), torch.zeros(2, 2))
    assert (u.name, u.layer, u.module) == ("model.layers.3.mlp.up_proj", 3, "mlp.up_proj")


# -- the statistics on built matrices ----------------------------------------------------------------

def test_a_zero_update_has_no_size_no_rank_and_no_intruders(svd_parts: Any) -> None:
    w = weight(svd_parts)
    stats = update_stats(w, torch.zeros_like(w))
    assert stats["delta_norm"] == 0.0 and stats["relative_norm"] == 0.0
    assert stats["effective_rank"] == 0.0 and stats["intruders"] == 0
    assert stats["base_norm"] == pytest.approx(float(svd_parts[1].norm()), rel=1e-6)  # ‖W‖_F = ‖s‖


@pytest.mark.parametrize("c", [-0.3, 2.0])
def test_a_multiple_of_the_base_moves_by_that_multiple_and_intrudes_nowhere(svd_parts: Any, c: float) -> None:
    w = weight(svd_parts)
    stats = update_stats(w, c * w)
    assert stats["relative_norm"] == pytest.approx(abs(c), rel=1e-6)
    assert stats["intruders"] == 0
    assert stats["effective_rank"] == pytest.approx(update_stats(w, w)["effective_rank"], rel=1e-6)


def test_effective_rank_of_known_spectra(svd_parts: Any) -> None:
    u, _, v = svd_parts
    w = weight(svd_parts)
    assert update_stats(w, rank_one(u[:, 3], v[:, 7], 5.0))["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    three_equal = (u[:, :3] @ v[:, 10:13].T * 0.7).float()
    assert update_stats(w, three_equal)["effective_rank"] == pytest.approx(3.0, abs=1e-6)
    # σ = (3, 1): p = (3/4, 1/4), exp(H) = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) ≈ 1.7548
    two = (3.0 * torch.outer(u[:, 0], v[:, 1]) + torch.outer(u[:, 5], v[:, 9])).float()
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert update_stats(w, two)["effective_rank"] == pytest.approx(expected, abs=1e-6)


def test_lora_factors_give_the_same_rank_as_the_dense_update(svd_parts: Any) -> None:
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(N, 4, generator=g), torch.randn(4, N, generator=g)
    w = weight(svd_parts)
    dense = update_stats(w, b @ a)
    factored = update_stats(w, b @ a, factors=(b, a))
    assert 1.0 < factored["effective_rank"] < 4.0
    assert factored["effective_rank"] == pytest.approx(dense["effective_rank"], rel=1e-5)


def test_a_new_direction_spread_over_the_base_is_one_intruder(svd_parts: Any) -> None:
    """x mixes 20 of W's left singular vectors equally (|cos| = 1/√20 with each): made the largest direction
    of W + ΔW, it is new. The other nine leading vectors are W's own (untouched block): no intruders."""
    u, _, v = svd_parts
    w = weight(svd_parts)
    x = u[:, 20:40].sum(dim=1)
    stats = update_stats(w, rank_one(x, v[:, 30], 20.0))
    assert stats["intruders"] == 1
    assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-6)


def test_a_promoted_base_direction_is_no_intruder_but_a_two_way_mix_depends_on_the_threshold(
        svd_parts: Any) -> None:
    """Intruders are judged against *every* singular vector of W: W's weakest direction pushed to the top is
    not new. A mix of two base directions has |cos| = 1/√2 with each: not new at 0.5, new at 0.8."""
    u, _, v = svd_parts
    w = weight(svd_parts)
    assert update_stats(w, rank_one(u[:, N - 1], v[:, N - 1], 20.0))["intruders"] == 0
    pair = rank_one(u[:, 30] + u[:, 31], v[:, 30], 20.0)
    assert update_stats(w, pair)["intruders"] == 0
    assert update_stats(w, pair, threshold=0.8)["intruders"] == 1


def test_cached_base_vectors_give_the_same_stats(svd_parts: Any) -> None:
    u, _, v = svd_parts
    w = weight(svd_parts)
    delta = rank_one(u[:, 20:40].sum(dim=1), v[:, 3], 20.0) + 0.01 * w
    fresh = update_stats(w, delta)
    u0 = base_left_singular_vectors(w)
    assert u0.shape == (N, N)
    torch.testing.assert_close(u0.T @ u0, torch.eye(N), atol=1e-5, rtol=0)
    assert update_stats(w, delta, base_svd=u0) == fresh
    assert update_stats(w, delta, base_svd=u0.half()) == fresh


def test_tall_and_wide_weights_compare_only_the_base_range() -> None:
    """A tall W (out > in) has `in` left singular vectors; a direction outside their span is new."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 12, generator=g)
    assert base_left_singular_vectors(w).shape == (40, 12)
    assert base_left_singular_vectors(w.T).shape == (12, 12)
    q, _ = torch.linalg.qr(w.double())
    outside = torch.randn(40, generator=g, dtype=torch.float64)
    outside -= q @ (q.T @ outside)  # orthogonal to every left singular vector of W
    stats = update_stats(w, rank_one(outside, torch.ones(12, dtype=torch.float64), 50.0))
    assert stats["intruders"] == 1


# -- rows --------------------------------------------------------------------------------------------

def test_attribution_rows_pool_each_layer_and_read_the_cache(svd_parts: Any) -> None:
    u, _, v = svd_parts
    w = weight(svd_parts)
    intruding = rank_one(u[:, 20:40].sum(dim=1), v[:, 30], 20.0)
    updates = [
        ModuleUpdate.of("model.layers.1.self_attn.q_proj.base_layer.weight", w, 0.5 * w),
        ModuleUpdate.of("lm_head.weight", w, 0.1 * w),
        ModuleUpdate.of("model.layers.0.mlp.up_proj", 2 * w, intruding),
        ModuleUpdate.of("model.layers.1.mlp.down_proj", w, intruding),
    ]
    cache: dict[str, torch.Tensor] = {}
    rows = attribution_rows(updates, svd_cache=cache)
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert [(r["scope"], r["layer"], r["module"]) for r in rows] == [
        ("layer", 0, ""), ("module", 0, "mlp.up_proj"),
        ("layer", 1, ""), ("module", 1, "mlp.down_proj"), ("module", 1, "self_attn.q_proj"),
        ("module", None, "lm_head"),
    ]
    layer1 = rows[2]
    assert layer1["name"] == "model.layers.1"
    norm_w, norm_i = float(w.norm()), float(intruding.norm())
    expected = math.sqrt((0.5 * norm_w) ** 2 + norm_i ** 2) / math.sqrt(2 * norm_w ** 2)
    assert layer1["relative_norm"] == pytest.approx(expected, rel=1e-6)
    assert layer1["intruders"] == 1 and rows[1]["intruders"] == 1 and rows[4]["intruders"] == 0
    assert layer1["effective_rank"] == pytest.approx((rows[3]["effective_rank"] + rows[4]["effective_rank"]) / 2)
    assert set(cache) == {up.name for up in updates}
    # The cache is what the next call reads: a wrong basis for one module changes that module's count.
    cache["model.layers.1.self_attn.q_proj"] = orthonormal(N, 9).half()
    again = {(r["scope"], r["name"]): r for r in attribution_rows(updates, svd_cache=cache)}
    assert again[("module", "model.layers.1.self_attn.q_proj")]["intruders"] > 0
    assert again[("module", "model.layers.1.mlp.down_proj")] == rows[3]


def test_top_layers_orders_layer_rows_by_the_key() -> None:
    rows: list[dict[str, Any]] = [
        {"scope": "layer", "layer": 0, "relative_norm": 0.2, "intruders": 5},
        {"scope": "module", "layer": 0, "relative_norm": 9.0, "intruders": 9},
        {"scope": "layer", "layer": 1, "relative_norm": math.nan, "intruders": 0},
        {"scope": "layer", "layer": 2, "relative_norm": 0.7, "intruders": 1},
        {"scope": "layer", "layer": 3, "relative_norm": 0.2, "intruders": 2},
    ]
    assert [r["layer"] for r in top_layers(rows)] == [2, 0, 3]
    assert [r["layer"] for r in top_layers(rows, n=2, key="intruders")] == [0, 3]
    assert [r["layer"] for r in top_layers(rows, n=10)] == [2, 0, 3, 1]


# -- reading a PEFT model ----------------------------------------------------------------------------

def randomize_lora(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lora_updates_equal_peft_merge_beside_another_adapter(tiny_model_dir: Path) -> None:
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    model = attach_lora(loaded, LoraSpec(dropout=0.0, rank=4, alpha=12.0))
    add_lora(model, "shape1", lora_config(LoraSpec(dropout=0.0, rank=2, target_modules=["q_proj", "v_proj"])))
    randomize_lora(model, seed=0)
    base = {module_path(n): p.detach().clone() for n, p in model.named_parameters()
            if ".lora_" not in n and p.dim() == 2}

    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["default"])
    updates = lora_updates(model, "default")
    assert len(updates) == 7 * 2  # every linear layer of both blocks
    for u in updates:
        merged_w = merged.get_submodule(u.name).weight.detach()
        torch.testing.assert_close(u.delta, merged_w - base[u.name], atol=1e-6, rtol=1e-5)
        assert torch.equal(u.base, base[u.name])
        assert u.factors is not None and u.factors[1].shape[0] == 4

    other = lora_updates(model, "shape1")
    assert sorted(u.name for u in other) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj"))
    assert lora_layers(model, "shape1") == [0, 1]

    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="merged"):
        lora_updates(model, "default")


def test_fan_in_fan_out_layers_are_read_as_out_by_in() -> None:
    """GPT-2's Conv1D stores W as [in, out]: both W and ΔW come back [out, in], ΔW equal to PEFT's merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_fc"], fan_in_fan_out=True)
    model: Any = get_peft_model(GPT2LMHeadModel(cfg), config)
    randomize_lora(model, seed=1)
    base = {module_path(n): p.detach().clone() for n, p in model.named_parameters()
            if ".lora_" not in n and p.dim() == 2}
    merged = copy.deepcopy(model).merge_and_unload()
    updates = lora_updates(model, "default")
    assert sorted((u.layer, u.module) for u in updates) == [
        (i, m) for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    for u in updates:
        stored = base[u.name]  # [in, out]
        assert u.base.shape == stored.T.shape == u.delta.shape
        torch.testing.assert_close(u.delta, (merged.get_submodule(u.name).weight.detach() - stored).T,
                                   atol=1e-6, rtol=1e-5)


def test_override_updates_read_a_merged_checkpoint(tiny_model_dir: Path) -> None:
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    attach_lora(loaded, LoraSpec(dropout=0.0))  # the resident model: LoRA-wrapped, as in the engine
    dense = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu").model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q = dense.model.layers[1].self_attn.q_proj.weight
        step = torch.randn(q.shape, generator=g) * 0.01
        q += step
        dense.model.layers[0].input_layernorm.weight += 0.5  # 1-D: no spectrum, no row
    overrides = dense_overrides(dense, loaded.model)
    assert len(overrides) == 2
    updates = override_updates(overrides, loaded.model)
    assert [(u.name, u.layer, u.module) for u in updates] == [
        ("model.layers.1.self_attn.q_proj", 1, "self_attn.q_proj")]
    torch.testing.assert_close(updates[0].delta, step, atol=1e-6, rtol=0)
    with pytest.raises(KeyError):
        override_updates({"model.layers.9.q.weight": step}, loaded.model)


# -- the planted layer -------------------------------------------------------------------------------

LAYERS, PLANTED = 4, 1


@pytest.fixture()
def planted() -> Any:
    """A 4-block Llama whose LoRA update is large in block 1 and tiny everywhere else."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), lora_config(LoraSpec(dropout=0.0, rank=4)))
    model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                std = 0.5 if layer_of(name) == PLANTED else 0.01
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def last_position_kl(model: Any) -> Any:
    """Mean KL(adapted || base) of the next-token distribution after a few random prompts."""
    prompts = torch.randint(0, 96, (6, 12), generator=torch.Generator().manual_seed(2))

    @torch.inference_mode()
    def logp() -> torch.Tensor:
        return torch.log_softmax(model(input_ids=prompts).logits[:, -1].double(), dim=-1)

    with model.disable_adapter():
        base = logp()

    def kl() -> float:
        lp = logp()
        return float((lp.exp() * (lp - base)).sum(-1).mean())

    return kl


def test_the_planted_layer_leads_by_weights_and_by_leave_one_layer_out(planted: Any) -> None:
    rows = attribution_rows(lora_updates(planted, "default"))
    assert top_layers(rows, n=1)[0]["layer"] == PLANTED
    kl = last_position_kl(planted)
    assert kl() > 1e-3
    layers = lora_layers(planted, "default")
    assert layers == list(range(LAYERS))
    shares = leave_one_layer_out(kl, layers, lambda i: lora_layer_disabled(planted, "default", i))
    assert set(shares) == set(layers)
    assert max(shares, key=lambda i: shares[i]) == PLANTED
    assert shares[PLANTED] > 0.5 and all(shares[i] < 0.5 for i in layers if i != PLANTED)


def test_lora_layer_disabled_bypasses_one_block_and_restores_scaling_exactly(planted: Any) -> None:
    from peft.tuners.lora import LoraLayer

    def scalings() -> dict[str, Any]:
        return {n: dict(m.scaling) for n, m in planted.named_modules() if isinstance(m, LoraLayer)}

    before = scalings()
    assert before and all(v == 16.0 / 4 for s in before.values() for v in s.values())  # alpha / rank
    ids = torch.arange(10).reshape(1, 10)
    with torch.inference_mode():
        adapted = planted(input_ids=ids).logits
        with planted.disable_adapter():
            plain = planted(input_ids=ids).logits
        with every_layer_disabled(planted):
            bypassed = planted(input_ids=ids).logits
            inside = scalings()
    torch.testing.assert_close(bypassed, plain, atol=0, rtol=0)  # every block off = no adapter
    assert all(v == 0.0 for s in inside.values() for v in s.values())
    assert scalings() == before
    with pytest.raises(KeyboardInterrupt), lora_layer_disabled(planted, "default", PLANTED):
        raise KeyboardInterrupt
    assert scalings() == before
    with torch.inference_mode():
        torch.testing.assert_close(planted(input_ids=ids).logits, adapted, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no LoRA layer"):
        with lora_layer_disabled(planted, "default", LAYERS):
            pass


@contextlib.contextmanager
def every_layer_disabled(model: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for i in range(LAYERS):
            stack.enter_context(lora_layer_disabled(model, "default", i))
        yield


# -- leave one layer out, generic ---------------------------------------------------------------------

def test_leave_one_layer_out_shares_and_the_no_drift_cases() -> None:
    state: dict[str, int | None] = {"off": None}
    kls = {None: 2.0, 0: 0.5, 1: 2.0, 2: 2.5}

    @contextlib.contextmanager
    def disabled(layer: int) -> Iterator[None]:
        state["off"] = layer
        try:
            yield
        finally:
            state["off"] = None

    shares = leave_one_layer_out(lambda: kls[state["off"]], [0, 1, 2], disabled)
    assert shares == {0: 0.75, 1: 0.0, 2: -0.25}

    entered: list[int] = []

    def counting(layer: int) -> Any:
        entered.append(layer)
        return contextlib.nullcontext()

    assert leave_one_layer_out(lambda: 0.0, [0, 1], counting) == {0: 0.0, 1: 0.0}
    nan = leave_one_layer_out(lambda: math.nan, [0, 1], counting)
    assert all(math.isnan(v) for v in nan.values())
    assert entered == []  # no drift to attribute: no per-layer pass
