"""LoRA dropout with cheap CPU masks: Bernoulli(p) exactly, seeded by torch, identity in eval mode."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from slmcl.config.spec import LoraSpec, ModelSpec
from slmcl.models.loading import attach_lora, load_model
from slmcl.training.dropout import LoraDropout, bernoulli_mask


@pytest.mark.parametrize("p", [0.05, 0.3, 1 / 3])
def test_drop_rate_is_p(p: float) -> None:
    n = 2_000_000
    torch.manual_seed(0)
    rate = bernoulli_mask((n,), p).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < 5 * sigma


def test_the_threshold_tie_is_settled_by_a_second_draw() -> None:
    """p below one 16-bit step: only the tie value can drop, with probability p * 65536; a plain
    16-bit comparison would never drop anything (it would round p down to 0)."""
    p = 0.5 / 65536
    n = 4_000_000
    torch.manual_seed(1)
    dropped = int(bernoulli_mask((n,), p).sum())
    expected = p * n  # 30.5
    assert abs(dropped - expected) < 5 * math.sqrt(expected)


def test_masks_follow_torch_manual_seed_and_are_independent_per_call() -> None:
    torch.manual_seed(7)
    a, b = bernoulli_mask((64, 33), 0.2), bernoulli_mask((64, 33), 0.2)
    torch.manual_seed(7)
    assert torch.equal(a, bernoulli_mask((64, 33), 0.2))
    assert not torch.equal(a, b)


def test_forward_scales_kept_values_and_backward_uses_the_same_mask() -> None:
    drop = LoraDropout(0.25).train()
    x = torch.randn(50, 40, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert 0.6 < kept.double().mean() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.75))
    drop.eval()
    assert drop(x) is x


def test_attach_lora_installs_it_in_every_lora_layer(tiny_model_dir: Path) -> None:
    from peft.tuners.lora import LoraLayer

    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    model = attach_lora(loaded, LoraSpec(dropout=0.05))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_dropout["default"], LoraDropout) for m in layers)
    assert all(m.lora_dropout["default"].p == 0.05 for m in layers)


def test_rejects_p_outside_0_1() -> None:
    with pytest.raises(ValueError, match="dropout probability"):
        LoraDropout(1.0)
