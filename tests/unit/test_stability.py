"""Stability: last-position distributions under left padding, the drift statistics, and p_0's cache.

The reference here is the definition itself (DESIGN.md §1): each row alone, no padding, in
float64, softmax at the last position; KL(p_k || p_0), entropy, top-2 log-prob margin,
summarized as mean / p10 / p95 with ``torch.quantile``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.tasks.data import load_examples
from slmcl.models.engine import Engine
from slmcl.models.loading import attach_lora, load_model
from slmcl.tasks.prompts import PromptRenderer
from slmcl.config.spec import ChatSpec, LoraSpec, ModelSpec, spec_from_dict
from slmcl.inference.stability import (
    last_position_logprobs,
    reference_prompt_ids,
    row_stats,
    stability_summary,
    tensor_from_bytes,
    tensor_to_bytes,
)
from slmcl.storage.local import LocalStore
from tests.conftest import tiny_spec_dict

CPU = torch.device("cpu")
CACHE_PREFIX = "cache/base-reference-logp"


def randomize_lora_b(model: Any, seed: int = 0, std: float = 0.3) -> None:
    """LoRA B starts at zero (adapter = identity); random B makes the adapter change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def reference_stats(logp: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
    p = logp.exp()
    top2 = logp.topk(2, dim=-1).values
    pb = base.exp()
    top2b = base.topk(2, dim=-1).values
    return {
        "kl_to_base": (p * (logp - base)).sum(-1),
        "entropy": -(p * logp).sum(-1),
        "margin": top2[:, 0] - top2[:, 1],
        "base_entropy": -(pb * base).sum(-1),
        "base_margin": top2b[:, 0] - top2b[:, 1],
    }


def summary_of(v: torch.Tensor) -> dict[str, float]:
    return {"mean": float(v.mean()), "p10": float(torch.quantile(v, 0.10)), "p95": float(torch.quantile(v, 0.95))}


def test_last_position_logprobs_and_summary_match_a_float64_reference(tiny_model_dir: Path, data_dir: Path) -> None:
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    model = attach_lora(loaded, LoraSpec(dropout=0.0))
    randomize_lora_b(model)
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    rows = load_examples(data_dir / "reference.json", limit=7)
    prompts = reference_prompt_ids(loaded, renderer, rows, {})
    assert len({len(p) for p in prompts}) == 7  # mixed lengths: real left padding in every batch

    forwards: list[int] = []
    with model.disable_adapter():
        base32 = last_position_logprobs(model, prompts, pad_id=loaded.pad_token_id, batch_size=3, device=CPU)
    adapted32 = last_position_logprobs(model, prompts, pad_id=loaded.pad_token_id, batch_size=3, device=CPU,
                                       on_forward=forwards.append)
    assert base32.shape == adapted32.shape == (7, len(loaded.tokenizer))
    assert base32.dtype == torch.float32
    assert sum(forwards) == 7 and max(forwards) <= 3  # each row in exactly one forward, batches of <= 3
    got = stability_summary(adapted32, base32)

    model.double()  # the reference: one row at a time, no padding, float64
    with torch.no_grad():
        def row_logp(p: list[int]) -> torch.Tensor:
            return torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].double(), dim=-1)

        adapted64 = torch.stack([row_logp(p) for p in prompts])
        with model.disable_adapter():
            base64 = torch.stack([row_logp(p) for p in prompts])

    assert (adapted32.double() - adapted64).abs().max() < 1e-4
    assert (base32.double() - base64).abs().max() < 1e-4
    ref = reference_stats(adapted64, base64)
    assert float(ref["kl_to_base"].mean()) > 1e-2, "the adapter should move the distribution"
    assert ref["kl_to_base"].std() > 0 and ref["margin"].std() > 0  # rows differ from each other

    assert got.num_reference_examples == 7
    for name in ("kl_to_base", "entropy", "margin", "base_entropy", "base_margin"):
        for key, value in summary_of(ref[name]).items():
            assert got.values[f"{name}_{key}"] == pytest.approx(value, abs=1e-4), f"{name}_{key}"
    assert got.values["entropy_delta_mean"] == pytest.approx(
        float(ref["entropy"].mean() - ref["base_entropy"].mean()), abs=1e-4)
    assert got.values["margin_delta_mean"] == pytest.approx(
        float(ref["margin"].mean() - ref["base_margin"].mean()), abs=1e-4)


def test_batch_size_does_not_change_logprobs(tiny_model_dir: Path, data_dir: Path) -> None:
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    prompts = reference_prompt_ids(loaded, renderer, load_examples(data_dir / "reference.json", limit=5), {})
    one = last_position_logprobs(loaded.model, prompts, pad_id=loaded.pad_token_id, batch_size=1, device=CPU)
    five = last_position_logprobs(loaded.model, prompts, pad_id=loaded.pad_token_id, batch_size=5, device=CPU)
    assert (one - five).abs().max() < 5e-5


def test_base_against_itself_has_zero_kl() -> None:
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(9, 50) * 3, dim=-1)
    alone = stability_summary(logp, None)
    for key in ("mean", "p10", "p95"):
        assert alone.values[f"kl_to_base_{key}"] == 0.0
    assert alone.values["entropy_delta_mean"] == 0.0 and alone.values["margin_delta_mean"] == 0.0
    self_kl = stability_summary(logp, logp)
    assert self_kl.values["kl_to_base_mean"] == pytest.approx(0.0, abs=1e-12)
    assert self_kl.values["entropy_mean"] == pytest.approx(alone.values["entropy_mean"])
    other = torch.log_softmax(torch.randn(9, 50) * 3, dim=-1)
    assert stability_summary(other, logp).values["kl_to_base_mean"] > 0.1


def test_row_stats_by_hand() -> None:
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)
    stats = row_stats(p.log(), q.log())
    assert float(stats["entropy"][0]) == pytest.approx(1.5 * torch.log(torch.tensor(2.0)).item())
    assert float(stats["margin"][0]) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert float(stats["kl_to_base"][0]) == pytest.approx(0.25 * torch.log(torch.tensor(2.0)).item())


def test_tensor_bytes_round_trip() -> None:
    t = torch.log_softmax(torch.randn(3, 11), dim=-1)
    assert torch.equal(tensor_from_bytes(tensor_to_bytes(t)), t)


# -- Engine: p_0 once per (model, reference, rendering) --------------------------------------


def make_engine(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, **overrides: Any) -> Engine:
    raw = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "out", **overrides)
    spec = spec_from_dict(raw, base_dir=tmp_path, environ={})
    return Engine(spec, loaded=load_model(spec.model, "cpu"))


def test_engine_computes_base_distributions_once(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    engine = make_engine(tiny_model_dir, data_dir, tmp_path)
    rows = len(engine.reference().rows)
    assert rows == 6
    randomize_lora_b(engine.model, seed=1)

    first = engine.stability(store)
    assert engine.forward_passes == 2 * rows  # base once + checkpoint
    assert first.values["kl_to_base_mean"] > 1e-3
    assert len(store.list_keys(CACHE_PREFIX)) == 1

    second = engine.stability(store)
    assert engine.forward_passes == 3 * rows  # the checkpoint only
    assert second.values == pytest.approx(first.values)

    base = engine.stability(store, base=True)
    assert engine.forward_passes == 3 * rows  # p_0 itself costs nothing more
    assert base.values["kl_to_base_mean"] == base.values["kl_to_base_p95"] == 0.0
    assert base.values["entropy_mean"] == pytest.approx(first.values["base_entropy_mean"])

    # A new process (new Engine, same store) reuses the cached p_0 file.
    adapter = engine.save_adapter(tmp_path / "adapter")
    again = make_engine(tiny_model_dir, data_dir, tmp_path)
    again.load_adapter(adapter)
    assert again.reference().cache_key == engine.reference().cache_key
    third = again.stability(store)
    assert again.forward_passes == rows
    assert third.values == pytest.approx(first.values, abs=1e-6)
    assert len(store.list_keys(CACHE_PREFIX)) == 1


def test_engine_without_store_keeps_p0_in_memory(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model_dir, data_dir, tmp_path, reference={"max_examples": 3})
    engine.stability()
    engine.stability()
    assert engine.forward_passes == 3 * 3


def test_reference_subset_changes_the_cache_key(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    six = make_engine(tiny_model_dir, data_dir, tmp_path)
    six.stability(store)
    five = make_engine(tiny_model_dir, data_dir, tmp_path, reference={"max_examples": 5})
    assert five.reference().cache_key != six.reference().cache_key
    five.stability(store)
    assert five.forward_passes == 2 * 5  # not served from the 6-row cache
    assert len(store.list_keys(CACHE_PREFIX)) == 2
    sys_prompt = make_engine(tiny_model_dir, data_dir, tmp_path, chat={"system_prompt": "Be brief."})
    assert sys_prompt.reference().cache_key not in {five.reference().cache_key, six.reference().cache_key}


def test_rows_of_one_task_share_their_head_and_get_the_same_distributions(tiny_model_dir: Path, data_dir: Path) -> None:
    """Reference rows rendered with their task's instruction share a head: fed once per task,
    then one forward per row over its tail only, with the same log-probs as full rows."""
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    model = attach_lora(loaded, LoraSpec(dropout=0.0))
    randomize_lora_b(model)
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    rows = load_examples(data_dir / "reference.json", limit=9)
    instructions = {"fomc": "Classify the stance.", "scienceqa": "Pick the option.", "numgluecm": "Give a number."}
    prompts = reference_prompt_ids(loaded, renderer, rows, instructions)
    segments = [r.task_name for r in rows]
    assert len(set(segments)) >= 2 and len(set(segments)) < len(rows)
    widths: list[int] = []

    class Widths:
        config = model.config

        def __call__(self, **kw: Any) -> Any:
            widths.append(int(kw["input_ids"].shape[1]))
            return model(**kw)

    forwards: list[int] = []
    shared = last_position_logprobs(Widths(), prompts, pad_id=loaded.pad_token_id, batch_size=4, device=CPU,
                                    segments=segments, on_forward=forwards.append)
    full = last_position_logprobs(model, prompts, pad_id=loaded.pad_token_id, batch_size=4, device=CPU)
    assert sum(forwards) == len(rows)
    assert max(widths) < max(len(p) for p in prompts), "every forward after the heads fed tails only"
    assert (shared - full).abs().max() < 1e-4
