"""Stability: last-position distributions under left padding, the drift statistics, and p_0's cache.

The reference here is the definition itself (DESIGN.md §1): each row alone, no padding, in
float64, softmax at the last position; KL(p_k || p_0), entropy, top-2 log-prob margin,
summarized as mean / p10 / p95 with ``torch.quantile``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import ChatSpec, LoraSpec, ModelSpec, spec_from_dict
from slmcl.errors import SpecError
from slmcl.inference import stability as stability_module
from slmcl.inference.stability import (
    drift_rows,
    last_position_logprobs,
    reference_prompt_ids,
    row_stats,
    stability_summary,
    tensor_from_bytes,
    tensor_to_bytes,
)
from slmcl.models.dtype import compute_dtype
from slmcl.models.engine import Engine
from slmcl.models.loading import attach_lora, load_model, resolve_dtype
from slmcl.models.lru import LRU
from slmcl.protocol.drift import DriftRows, quantile, summarize_drift
from slmcl.protocol.tables import STABILITY_COLUMNS, STAT_NAMES, TASK_DRIFT_COLUMNS
from slmcl.storage.local import LocalStore
from slmcl.tasks.data import load_examples
from slmcl.tasks.prompts import PromptRenderer
from tests.conftest import REPO, tiny_spec_dict

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


# -- one aggregation: summarize_drift (pure Python) against the torch path --------------------


def torch_summary(rows: DriftRows, base: DriftRows | None) -> dict[str, float]:
    """What stability_summary computed before the aggregation moved out of torch: the reference."""
    out: dict[str, float] = {"num_reference_examples": rows.num_rows}
    for name in STAT_NAMES:
        for key, value in summary_of(torch.tensor(getattr(rows, name), dtype=torch.float64)).items():
            out[f"{name}_{key}"] = value
    if base is None:
        out.update(entropy_delta_mean=0.0, margin_delta_mean=0.0, entropy_delta_p95=0.0, margin_delta_p95=0.0)
        return out
    b = {n: torch.tensor(getattr(base, n), dtype=torch.float64) for n in ("entropy", "margin")}
    out["entropy_delta_mean"] = out["entropy_mean"] - float(b["entropy"].mean())
    out["margin_delta_mean"] = out["margin_mean"] - float(b["margin"].mean())
    for name, values in b.items():
        for key, value in summary_of(values).items():
            out[f"base_{name}_{key}"] = value
    for name in ("entropy", "margin"):
        out[f"{name}_delta_p95"] = out[f"{name}_p95"] - out[f"base_{name}_p95"]
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 21, 100, 1001])
def test_summarize_drift_matches_torch_on_random_data(n: int) -> None:
    g = torch.Generator().manual_seed(n)

    def rows(scale: float) -> DriftRows:
        kl = (torch.randn(n, generator=g, dtype=torch.float64) * scale).abs()
        kl[: n // 4] = kl[0]  # ties, as a quantized model gives
        return DriftRows(kl.tolist(), (torch.rand(n, generator=g, dtype=torch.float64) * 9).tolist(),
                         (torch.randn(n, generator=g, dtype=torch.float64) * 1e3).tolist())

    ckpt, base = rows(0.3), rows(1e-6)
    for b in (None, base):
        got, want = summarize_drift(ckpt, b), torch_summary(ckpt, b)
        assert list(got) == list(want)  # the same keys, in the record's order
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        for key in ("p10", "p95"):  # the quantiles are torch's, bit for bit
            assert got[f"margin_{key}"] == want[f"margin_{key}"]
    not_drift = ("seed", "step", "checkpoint_task", "order", "model", "strategy", "reference_accuracy",
                 "base_reference_accuracy", "evaluated", "intervention", *TASK_DRIFT_COLUMNS)
    stat_columns = [c for c in STABILITY_COLUMNS if c not in not_drift]
    assert set(stat_columns) <= set(summarize_drift(ckpt, base))
    assert set(stat_columns) == set(summarize_drift(ckpt, None))


def test_stability_summary_is_summarize_drift_of_the_rows() -> None:
    torch.manual_seed(3)
    logp = torch.log_softmax(torch.randn(11, 40) * 2, dim=-1)
    base = torch.log_softmax(torch.randn(11, 40) * 2, dim=-1)
    rows, base_rows = drift_rows(logp, base), drift_rows(base, None)
    assert base_rows.kl_to_base == [0.0] * 11 and rows.num_rows == 11
    stats = row_stats(logp, base)
    assert rows.kl_to_base == stats["kl_to_base"].tolist() and rows.margin == stats["margin"].tolist()
    assert stability_summary(logp, base).as_dict() == summarize_drift(rows, base_rows)
    assert stability_summary(logp, None).as_dict() == summarize_drift(drift_rows(logp, None), None)


def test_drift_rows_in_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    logp = torch.log_softmax(torch.randn(9, 64) * 2, dim=-1)
    base = torch.log_softmax(torch.randn(9, 64) * 2, dim=-1)
    whole = drift_rows(logp, base)
    monkeypatch.setattr(stability_module, "ROW_CHUNK_BYTES", 2 * 8 * 64)  # two rows a chunk
    assert drift_rows(logp, base) == whole
    with pytest.raises(ValueError, match="differ"):
        drift_rows(logp, base[:5])


def test_drift_rows_validation_and_empty() -> None:
    with pytest.raises(ValueError, match="one value per reference row"):
        DriftRows([0.0, 0.0], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="not the same reference set"):
        summarize_drift(DriftRows([0.0], [1.0], [1.0]), DriftRows([0.0] * 2, [1.0] * 2, [1.0] * 2))
    empty = summarize_drift(DriftRows(), None)
    assert empty["num_reference_examples"] == 0 and math.isnan(empty["kl_to_base_mean"])
    assert math.isnan(quantile([1.0, math.nan], 0.5))
    assert quantile([5.0], 0.95) == 5.0 and quantile([0.0, 10.0], 0.10) == pytest.approx(1.0)


def test_the_aggregation_imports_no_torch() -> None:
    code = "import sys, slmcl.protocol.drift; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_engine_drift_rows_and_stability_share_the_aggregation(tiny_model_dir: Path, data_dir: Path,
                                                              tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    engine = make_engine(tiny_model_dir, data_dir, tmp_path)
    randomize_lora_b(engine.model, seed=2)
    base_rows = engine.drift_rows(store, base=True)
    rows = engine.drift_rows(store)
    assert base_rows.kl_to_base == [0.0] * 6 and min(rows.kl_to_base) > 0
    assert engine.stability(store).as_dict() == summarize_drift(rows, base_rows)
    assert engine.stability(store, base=True).as_dict() == summarize_drift(base_rows, None)
    p0 = engine.base_logprobs(store)
    assert rows == drift_rows(engine._logprobs(engine.model), p0)

    # A replica's shared p_0 cache: a second engine on the same base takes p_0 from it, no forward, no store.
    cache: LRU[str, torch.Tensor] = LRU(max_bytes=1 << 30, size=lambda t: t.numel() * t.element_size())
    first = make_engine(tiny_model_dir, data_dir, tmp_path)
    first.base_logprobs(None, cache)
    assert first.forward_passes == 6 and list(cache) == [first.reference().cache_key]
    second = make_engine(tiny_model_dir, data_dir, tmp_path)
    assert torch.equal(second.base_logprobs(None, cache), p0)
    assert second.forward_passes == 0


# -- the dtype rule and the bounded cache ---------------------------------------------------


def test_one_dtype_rule_for_every_mode(tiny_model_dir: Path) -> None:
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert compute_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(SpecError, match="model.dtype"):
        compute_dtype("float8", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cuda")) == compute_dtype("auto", torch.device("cuda"))
    assert load_model(ModelSpec(name=str(tiny_model_dir)), "cpu").dtype == compute_dtype("auto", CPU)


def test_lru_bounds_by_count_and_bytes() -> None:
    evicted: list[str] = []
    lru: LRU[str, bytes] = LRU(max_items=2, on_evict=lambda k, _v: evicted.append(k))
    lru.put("a", b"1")
    lru.put("b", b"2")
    assert lru.get("a") == b"1"  # a is now the most recent
    lru.put("c", b"3")
    assert evicted == ["b"] and list(lru) == ["a", "c"]
    lru.shrink(room=1)  # make room for one more before loading it
    assert evicted == ["b", "a"] and len(lru) == 1

    sized: LRU[str, bytes] = LRU(max_bytes=10, size=len)
    sized.put("x", b"12345")
    sized.put("y", b"123456")
    assert list(sized) == ["y"] and sized.total_bytes == 6
    sized.put("huge", b"x" * 50)  # the entry just put stays, alone, even over the bound
    assert list(sized) == ["huge"]

    pinned = {"p"}
    guarded: LRU[str, int] = LRU(max_items=1, evictable=lambda k, _v: k not in pinned)
    guarded.put("p", 1)
    guarded.put("q", 2)
    assert list(guarded) == ["p", "q"]  # p is protected: over the bound until it is released
    pinned.clear()
    guarded.shrink()
    assert list(guarded) == ["q"]
