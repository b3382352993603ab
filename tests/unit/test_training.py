"""One training stage: prompt masking, the study's step plan, and the gradient of the fast loop.

The key test holds ``train_stage`` (length-sorted merged forwards, logits only at target
positions, per-token weights) to the naive loop of the study: micro-batches of 2, right
padding, full logits, HF's mean loss over the micro-batch's target tokens divided by the
accumulation, one backward per micro-batch.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from slmcl.config.spec import BUILTIN_TASKS, ChatSpec, LoraSpec, ModelSpec, TaskSpec, TrainingSpec
from slmcl.errors import DataError, TrainingError
from slmcl.models.loading import LoadedModel, attach_lora, load_model
from slmcl.tasks.data import Example, load_examples
from slmcl.tasks.prompts import PromptRenderer
from slmcl.training.loop import (
    IGNORE,
    SFTExample,
    _chunks,
    build_sft_example,
    plan_steps,
    train_stage,
    weighted_chunk_loss,
)
from slmcl.training.strategies import StageContext
from slmcl.training.strategies.lora import SequentialLoRA

CPU = torch.device("cpu")


def task_spec(name: str, data_dir: Path) -> TaskSpec:
    folder, kind, instruction = BUILTIN_TASKS[name]
    return TaskSpec(name=name, kind=kind, instruction=instruction,
                    train_file=str(data_dir / folder / "train.json"), test_file=str(data_dir / folder / "test.json"))


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> LoadedModel:
    """A tiny model without adapter, for tokenizer-only tests (never wrapped with LoRA)."""
    return load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="module")
def renderer(base: LoadedModel) -> PromptRenderer:
    return PromptRenderer(base.tokenizer, ChatSpec())


def fresh_lora(tiny_model_dir: Path, seed: int = 0) -> tuple[LoadedModel, Any]:
    """A new tiny model with a dropout-free LoRA whose B matrices are non-zero (so A gets gradients)."""
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    model = attach_lora(loaded, LoraSpec(dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return loaded, model


def ctx_for(model: Any) -> StageContext:
    return StageContext(model=model, run_id="r", seed=0, stage=1, task="t", previous_tasks=[], options={})


# -- build_sft_example -----------------------------------------------------------------------


def test_prompt_tokens_are_masked_and_answer_plus_end_of_turn_supervised(
    base: LoadedModel, renderer: PromptRenderer, data_dir: Path
) -> None:
    tok = base.tokenizer
    task = task_spec("fomc", data_dir)
    ex = load_examples(task.train_file, limit=1)[0]
    sft = build_sft_example(tok, renderer, task, ex, max_length=4096)
    prompt_ids = tok(renderer.prompt_text(task.instruction, ex.prompt), add_special_tokens=False).input_ids
    n = len(prompt_ids)
    assert sft.input_ids[:n] == prompt_ids
    assert sft.labels[:n] == [IGNORE] * n
    assert sft.labels[n:] == sft.input_ids[n:]
    assert IGNORE not in sft.labels[n:]
    assert sft.n_targets == len(sft.input_ids) - n
    supervised = tok.decode(sft.labels[n:])
    target = ex.answer.strip()
    assert len(target) == 1 and target in "ABC"
    assert supervised.startswith(target + "<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in sft.labels[n:]


def test_scienceqa_target_is_the_letter_only(base: LoadedModel, renderer: PromptRenderer, data_dir: Path) -> None:
    task = task_spec("scienceqa", data_dir)
    ex = load_examples(task.train_file, limit=1)[0]
    assert "\n" in ex.answer  # "letter\nrationale"
    sft = build_sft_example(base.tokenizer, renderer, task, ex, max_length=4096)
    supervised = base.tokenizer.decode([x for x in sft.labels if x != IGNORE])
    assert supervised.startswith(ex.answer[0] + "<|im_end|>")
    assert supervised.strip() == ex.answer[0] + "<|im_end|>"


def test_numeric_target_is_the_final_number(base: LoadedModel, renderer: PromptRenderer) -> None:
    task = TaskSpec(name="m", kind="numeric", instruction="Solve.", train_file="x", test_file="y")
    ex = Example(0, "How many?", "The answer is 1,234.0")
    sft = build_sft_example(base.tokenizer, renderer, task, ex, max_length=4096)
    supervised = base.tokenizer.decode([x for x in sft.labels if x != IGNORE])
    assert supervised.startswith("1234<|im_end|>")


def test_left_truncation_keeps_the_answer(base: LoadedModel, renderer: PromptRenderer, data_dir: Path) -> None:
    task = task_spec("fomc", data_dir)
    ex = load_examples(task.train_file, limit=1)[0]
    full = build_sft_example(base.tokenizer, renderer, task, ex, max_length=4096)
    cut = len(full.input_ids) - 17
    short = build_sft_example(base.tokenizer, renderer, task, ex, max_length=cut)
    assert len(short.input_ids) == cut
    assert short.input_ids == full.input_ids[-cut:]
    assert short.labels == full.labels[-cut:]
    assert short.n_targets == full.n_targets


def test_answer_that_does_not_fit_raises(base: LoadedModel, renderer: PromptRenderer, data_dir: Path) -> None:
    task = task_spec("fomc", data_dir)
    ex = load_examples(task.train_file, limit=1)[0]
    n_answer = build_sft_example(base.tokenizer, renderer, task, ex, max_length=4096).n_targets
    # The answer plus one context token to predict its first token from: the smallest that fits.
    tight = build_sft_example(base.tokenizer, renderer, task, ex, max_length=n_answer + 1)
    assert len(tight.input_ids) == n_answer + 1
    assert tight.labels[0] == IGNORE and tight.n_targets == n_answer
    for max_length in (n_answer, 1):
        with pytest.raises(DataError, match=r"fomc row 0: the answer does not fit in training\.max_length"):
            build_sft_example(base.tokenizer, renderer, task, ex, max_length=max_length)


# -- plan_steps and _chunks ------------------------------------------------------------------


def test_plan_groups_micro_batches_with_a_partial_last_step() -> None:
    spec = TrainingSpec()  # batch 2, accumulation 8
    plan = plan_steps(37, spec, torch.Generator().manual_seed(0))
    assert [len(step) for step in plan] == [8, 8, 3]
    micro = [mb for step in plan for mb in step]
    assert len(micro) == math.ceil(37 / 2) == 19
    assert [len(mb) for mb in micro] == [2] * 18 + [1]
    assert sorted(i for mb in micro for i in mb) == list(range(37))


def test_plan_is_deterministic_in_the_generator_seed() -> None:
    spec = TrainingSpec()
    a = plan_steps(37, spec, torch.Generator().manual_seed(5))
    b = plan_steps(37, spec, torch.Generator().manual_seed(5))
    c = plan_steps(37, spec, torch.Generator().manual_seed(6))
    assert a == b
    assert a != c


def test_plan_epochs_reshuffle() -> None:
    spec = TrainingSpec(epochs=2, batch_size=3, grad_accum=2)
    plan = plan_steps(10, spec, torch.Generator().manual_seed(0))
    micro = [mb for step in plan for mb in step]
    assert [len(mb) for mb in micro] == [3, 3, 3, 1] * 2
    assert [len(s) for s in plan] == [2, 2, 2, 2]
    first, second = micro[:4], micro[4:]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(10))
    assert first != second


@pytest.mark.parametrize("budget", [1, 40, 100, 4096])
def test_chunks_keep_every_row_once_within_budget(budget: int) -> None:
    rng = random.Random(budget)
    items = [(SFTExample(input_ids=[1] * rng.randint(3, 60), labels=[IGNORE, 1]), rng.random()) for _ in range(23)]
    groups = _chunks(items, budget)
    flat = [it for g in groups for it in g]
    assert sorted(map(id, flat)) == sorted(map(id, items))
    for g in groups:
        width = max(len(ex.input_ids) for ex, _ in g)
        assert len(g) == 1 or width * len(g) <= budget
    if budget == 1:
        assert len(groups) == len(items)
    if budget == 4096:
        assert len(groups) < len(items)


# -- the gradient of the fast loop equals the naive loop's ----------------------------------


class GradCapture(SequentialLoRA):
    """A strategy that records the accumulated gradients of every step before clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.grads: list[dict[str, torch.Tensor]] = []

    def after_backward(self, ctx: StageContext) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad})


def sft_rows(loaded: LoadedModel, data_dir: Path, max_length: int) -> list[SFTExample]:
    """7 rows of three tasks, left-truncated to mixed lengths up to ``max_length`` (fast, yet ragged)."""
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    rows = []
    for name, n in (("fomc", 3), ("numgluecm", 2), ("scienceqa", 2)):
        task = task_spec(name, data_dir)
        for ex in load_examples(task.train_file, limit=n):
            length = max_length - 7 * len(rows)
            rows.append(build_sft_example(loaded.tokenizer, renderer, task, ex, length))
    return rows


def naive_step_grads(model: Any, sft: list[SFTExample], micro_batches: list[list[int]], pad_id: int,
                     grad_accum: int) -> tuple[dict[str, torch.Tensor], float]:
    """The study's loop: right-padded micro-batches, full logits, HF mean loss / accumulation."""
    model.zero_grad(set_to_none=True)
    model.train()
    losses = []
    for mb in micro_batches:
        width = max(len(sft[i].input_ids) for i in mb)
        ids = torch.full((len(mb), width), pad_id)
        labels = torch.full((len(mb), width), IGNORE)
        mask = torch.zeros((len(mb), width), dtype=torch.long)
        for r, i in enumerate(mb):
            n = len(sft[i].input_ids)
            ids[r, :n] = torch.tensor(sft[i].input_ids)
            labels[r, :n] = torch.tensor(sft[i].labels)
            mask[r, :n] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)  # mean over the micro-batch's target tokens
        (loss / grad_accum).backward()
        losses.append(loss.item())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads, sum(losses) / len(losses)


@pytest.mark.parametrize("tokens_per_forward", [4096, 96])
def test_one_step_has_the_naive_loops_gradient(
    tiny_model_dir: Path, data_dir: Path, tokens_per_forward: int
) -> None:
    loaded, model = fresh_lora(tiny_model_dir)
    sft = sft_rows(loaded, data_dir, max_length=80)  # 7 rows, prompts left-truncated to keep it fast
    assert len({len(s.input_ids) for s in sft}) > 1 and len({s.n_targets for s in sft}) > 1
    spec = TrainingSpec(batch_size=2, grad_accum=8, lr=1e-3, tokens_per_forward=tokens_per_forward)
    plan = plan_steps(len(sft), spec, torch.Generator().manual_seed(11))
    assert [len(mb) for mb in plan[0]] == [2, 2, 2, 1]  # one step, a partial accumulation

    ref_grads, ref_loss = naive_step_grads(model, sft, plan[0], loaded.pad_token_id, spec.grad_accum)
    assert any(g.abs().max() > 0 for n, g in ref_grads.items() if "lora_A" in n)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    strategy = GradCapture()
    result = train_stage(model, sft, spec, strategy, ctx_for(model), pad_id=loaded.pad_token_id, device=CPU,
                         generator=torch.Generator().manual_seed(11))
    assert len(result.steps) == 1 and len(strategy.grads) == 1
    got = strategy.grads[0]
    assert got.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # The reported loss is the study's: mean over micro-batches of each one's mean loss.
    assert result.steps[0].loss == pytest.approx(ref_loss, rel=1e-5)
    assert result.steps[0].tokens == sum(len(s.input_ids) for s in sft)
    # And the step was taken: every LoRA weight with a gradient moved.
    after = dict(model.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert set(moved) == {n for n, g in ref_grads.items() if g.abs().max() > 0}
    assert not model.training


def test_weighted_chunk_loss_same_with_and_without_logits_to_keep(tiny_model_dir: Path, data_dir: Path) -> None:
    loaded, model = fresh_lora(tiny_model_dir, seed=1)
    sft = sft_rows(loaded, data_dir, max_length=64)[:4]
    chunk = [(ex, 1.0 / (i + 1)) for i, ex in enumerate(sft)]
    with torch.no_grad():
        keep, n_tok, n_pad = weighted_chunk_loss(model, chunk, loaded.pad_token_id, CPU, True)
        full, n_tok2, n_pad2 = weighted_chunk_loss(model, chunk, loaded.pad_token_id, CPU, False)
        # Per-row reference, no padding at all.
        expected = 0.0
        for ex, w in chunk:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            ce = F.cross_entropy(logits[:-1], torch.tensor(ex.labels[1:]), ignore_index=IGNORE, reduction="sum")
            expected += w * ce.item()
    assert keep.item() == pytest.approx(full.item(), rel=1e-5)
    assert keep.item() == pytest.approx(expected, rel=1e-5)
    assert n_tok == n_tok2 == sum(len(ex.input_ids) for ex in sft)
    assert n_pad == n_pad2 == len(sft) * max(len(ex.input_ids) for ex in sft)


def test_several_steps_and_progress(tiny_model_dir: Path) -> None:
    loaded, model = fresh_lora(tiny_model_dir, seed=2)
    rng = random.Random(0)
    sft = []
    for _ in range(37):
        n = rng.randint(6, 14)
        ids = [rng.randrange(100, 5000) for _ in range(n)]
        sft.append(SFTExample(ids, [IGNORE] * (n - 3) + ids[-3:]))
    spec = TrainingSpec(lr=1e-3)  # batch 2, accumulation 8: 19 micro-batches, 3 steps
    events: list[dict[str, Any]] = []
    result = train_stage(model, sft, spec, SequentialLoRA(), ctx_for(model), pad_id=loaded.pad_token_id,
                         device=CPU, generator=torch.Generator().manual_seed(0), on_step=events.append)
    assert [s.step for s in result.steps] == [1, 2, 3]
    assert all(math.isfinite(s.loss) and s.loss > 0 for s in result.steps)
    assert [e["examples_done"] for e in events] == [16, 32, 37]
    assert all(e["total_steps"] == 3 and e["examples_total"] == 37 for e in events)
    assert result.tokens == sum(len(s.input_ids) for s in sft)
    assert result.examples == 37
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_loss_raises(tiny_model_dir: Path, data_dir: Path) -> None:
    loaded, model = fresh_lora(tiny_model_dir, seed=3)
    sft = sft_rows(loaded, data_dir, max_length=48)[:4]
    with torch.no_grad():
        name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
        p[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"run r stage 1 \(t\) step 1: loss is nan"):
        train_stage(model, sft, TrainingSpec(lr=1e-3), SequentialLoRA(), ctx_for(model),
                    pad_id=loaded.pad_token_id, device=CPU, generator=torch.Generator().manual_seed(0))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
