"""Evaluation folds the LoRA delta into copies of the base weights: same outputs, base untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmcl.config.spec import LoraSpec, ModelSpec
from slmcl.models.loading import attach_lora, load_model, merged_adapter


@pytest.fixture()
def adapted(tiny_model_dir: Path) -> torch.nn.Module:
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    model = attach_lora(loaded, LoraSpec(dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@torch.inference_mode()
def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(20, 52).reshape(2, 16)
    return model(input_ids=ids).logits


def test_merged_matches_unmerged_and_leaves_the_base_bit_exact(adapted: torch.nn.Module) -> None:
    before = base_weights(adapted)
    unmerged = logits(adapted)
    with adapted.disable_adapter():
        base = logits(adapted)
    assert not torch.allclose(unmerged, base, atol=1e-3), "the adapter should change the outputs"
    with merged_adapter(adapted) as m:
        merged = logits(m)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    after = base_weights(adapted)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the base weights must come back bit-exact"
    torch.testing.assert_close(logits(adapted), unmerged, atol=0, rtol=0)  # adapter active again, unmerged


def test_an_error_inside_restores_the_base(adapted: torch.nn.Module) -> None:
    before = base_weights(adapted)
    with pytest.raises(KeyboardInterrupt), merged_adapter(adapted):
        raise KeyboardInterrupt
    assert all(torch.equal(before[k], v) for k, v in base_weights(adapted).items())
    assert not adapted.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters
