"""One training stage: the study's loop, with the same per-token loss weights, done faster.

The study trains with micro-batch 2 and gradient accumulation 8: each target token's loss
is weighted by 1 / (target tokens of its micro-batch x 8), and a leftover partial
accumulation still steps. We keep exactly those weights (the logical micro-batches are
drawn as in the study, from a seeded shuffle) but execute an optimizer step's examples as
few length-sorted forward passes as fit ``tokens_per_forward``, and compute logits only at
the supervised positions. Same gradient, less padding, fewer kernel launches; equality
with the naive loop is exact up to floating-point order (and LoRA dropout's random draws).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from slmcl.config.spec import TaskSpec, TrainingSpec
from slmcl.errors import DataError, TrainingError
from slmcl.tasks.data import Example
from slmcl.tasks.kinds import get_task_kind
from slmcl.tasks.prompts import PromptRenderer
from slmcl.training.batching import length_batches
from slmcl.training.strategies import StageContext, Strategy, StrategyState

IGNORE = -100


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens: only the assistant's answer is learned

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def build_sft_example(
    tokenizer: Any, renderer: PromptRenderer, task: TaskSpec, example: Example, max_length: int
) -> SFTExample:
    """Tokenize prompt and prompt+answer; mask the prompt; keep the last ``max_length`` tokens."""
    kind = get_task_kind(task.kind)
    target = kind.training_target(example.answer)
    prompt_text = renderer.prompt_text(task.instruction, example.prompt, kind)
    full_text = renderer.full_text(task.instruction, example.prompt, target, kind)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"task {task.name} row {example.index}: the chat template renders the prompt differently "
            "with and without the answer, so prompt tokens cannot be masked"
        )
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids):]
    # Left truncation drops prompt tokens first, so the answer is lost only when it (plus the one
    # context token its first token is predicted from) is longer than max_length; checking the
    # labels *after* truncation could never fire, and would train on a beheaded answer.
    if len(full_ids) - len(prompt_ids) >= max_length:
        raise DataError(
            f"task {task.name} row {example.index}: the answer does not fit in training.max_length={max_length}"
        )
    if len(full_ids) > max_length:  # left truncation keeps the answer
        full_ids, labels = full_ids[-max_length:], labels[-max_length:]
    return SFTExample(input_ids=full_ids, labels=labels)


def plan_steps(n_examples: int, spec: TrainingSpec, generator: torch.Generator) -> list[list[list[int]]]:
    """Optimizer steps -> logical micro-batches -> example indices, as the study's DataLoader draws them."""
    steps: list[list[list[int]]] = []
    for _ in range(spec.epochs):
        order = torch.randperm(n_examples, generator=generator).tolist()
        micro = [order[i: i + spec.batch_size] for i in range(0, n_examples, spec.batch_size)]
        steps.extend(micro[i: i + spec.grad_accum] for i in range(0, len(micro), spec.grad_accum))
    return steps


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    tokens: int
    padded_tokens: int
    seconds: float
    # The strategy's own loss term at this step (O-LoRA's penalty, already times its weight), kept
    # apart from ``loss`` (the language-model loss, the study's number): they differ by orders of magnitude.
    strategy_loss: float | None = None


# Early-stop: called after every optimizer step with (model, step, total steps); returns None when it did
# not check at this step, [] when the weights are healthy, else the crossing records (slmcl.protocol.policy).
StageMonitor = Callable[[Any, int, int], "list[dict[str, Any]] | None"]


@dataclass
class StageTrainResult:
    steps: list[StepRecord] = field(default_factory=list)
    interventions: list[dict[str, Any]] = field(default_factory=list)  # an early stop, with where it happened
    examples: int = 0
    seconds: float = 0.0
    strategy_state: StrategyState = field(default_factory=StrategyState)
    trainable_params: int = 0  # what the optimizer updated (the comparison table reports it)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    @property
    def padded_fraction(self) -> float:
        padded = sum(s.padded_tokens for s in self.steps)
        return 0.0 if not padded else 1.0 - self.tokens / padded


def _chunks(items: list[tuple[SFTExample, float]], budget: int) -> list[list[tuple[SFTExample, float]]]:
    """An optimizer step's rows as forward passes with the least padding (budget/16 overhead each)."""
    groups = length_batches([len(ex.input_ids) for ex, _ in items], max_rows=len(items) or 1,
                            token_budget=budget, overhead=max(1, budget // 16))
    return [[items[i] for i in g] for g in groups]


def _accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def weighted_chunk_loss(
    model: Any, chunk: list[tuple[SFTExample, float]], pad_id: int, device: torch.device, use_keep: bool
) -> tuple[torch.Tensor, int, int]:
    """Sum over target tokens of weight x cross-entropy, with logits only where a target sits."""
    width = max(len(ex.input_ids) for ex, _ in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    # Position t predicts token t+1: collect (row, t) for supervised t+1, right padding.
    rows, cols, targets, weights = [], [], [], []
    for r, (ex, w) in enumerate(chunk):
        n = len(ex.input_ids)
        ids[r, :n] = torch.tensor(ex.input_ids)
        mask[r, :n] = 1
        for t in range(1, n):
            if ex.labels[t] != IGNORE:
                rows.append(r)
                cols.append(t - 1)
                targets.append(ex.labels[t])
                weights.append(w)
    ids, mask = ids.to(device), mask.to(device)
    if use_keep:
        keep = sorted(set(cols))
        index_of = {c: i for i, c in enumerate(keep)}
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor(keep, device=device))
        logits = out.logits[torch.tensor(rows, device=device), torch.tensor([index_of[c] for c in cols], device=device)]
    else:
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    ce = F.cross_entropy(logits.float(), torch.tensor(targets, device=device), reduction="none")
    loss = (ce * torch.tensor(weights, device=device, dtype=torch.float32)).sum()
    return loss, int(mask.sum()), ids.numel()


ProgressFn = Callable[[dict[str, Any]], None]


def _snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, saved, strict=True):
            p.copy_(v)


def train_stage(
    model: Any,
    sft: Sequence[SFTExample],
    spec: TrainingSpec,
    strategy: Strategy,
    ctx: StageContext,
    *,
    pad_id: int,
    device: torch.device,
    generator: torch.Generator,
    on_step: ProgressFn | None = None,
    monitor: StageMonitor | None = None,
) -> StageTrainResult:
    """Train the adapter on one task; raise ``TrainingError`` on a non-finite loss.

    With a ``monitor`` (the early-stop rules), the trainable weights are copied at every healthy check
    (and at the start); when a check crosses, they are put back and the stage ends there, so the stage's
    checkpoint is the last healthy weights and the optimizer steps after them are dropped.
    """
    strategy.on_stage_start(ctx)  # first: it may add parameters (ProCL's router) or freeze some
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)  # fresh each stage
    ctx.optimizer = optimizer
    plan = plan_steps(len(sft), spec, generator)
    use_keep = _accepts_logits_to_keep(model)
    result = StageTrainResult(examples=len(sft), trainable_params=strategy.updated_parameters(ctx, trainable))
    model.train()
    t_stage = time.perf_counter()
    completed = False
    healthy = (0, _snapshot(trainable)) if monitor is not None else None
    try:
        for step_idx, micro_batches in enumerate(plan, start=1):
            t0 = time.perf_counter()
            weighted: list[tuple[SFTExample, float]] = []
            for mb in micro_batches:
                n_tgt = sum(sft[i].n_targets for i in mb)
                weighted.extend((sft[i], 1.0 / (n_tgt * spec.grad_accum)) for i in mb)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            tokens = padded = 0
            for chunk in _chunks(weighted, spec.tokens_per_forward):
                loss, n_tok, n_pad = weighted_chunk_loss(model, chunk, pad_id, device, use_keep)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"run {ctx.run_id} stage {ctx.stage} ({ctx.task}) step {step_idx}: loss is {loss.item()}; "
                        "lower training.lr or check the data. No checkpoint of this stage is published."
                    )
                loss.backward()
                step_loss += loss.item()
                tokens += n_tok
                padded += n_pad
            extra = strategy.extra_loss(ctx)
            extra_value = None
            if extra is not None:
                if not torch.isfinite(extra):
                    raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy loss is {extra.item()}")
                extra.backward()
                extra_value = float(extra.item())
            strategy.after_backward(ctx)
            torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm)
            optimizer.step()
            strategy.after_step(ctx)
            # Report the study's number: the mean over micro-batches of each one's mean loss.
            reported = step_loss * spec.grad_accum / len(micro_batches)
            rec = StepRecord(step_idx, reported, spec.lr, tokens, padded, time.perf_counter() - t0, extra_value)
            result.steps.append(rec)
            if on_step is not None:
                done = sum(len(mb) for step in plan[:step_idx] for mb in step)
                elapsed = time.perf_counter() - t_stage
                on_step({"step": step_idx, "total_steps": len(plan), "loss": reported, "strategy_loss": extra_value,
                         "examples_done": done, "examples_total": len(sft) * spec.epochs,
                         "examples_per_s": done / elapsed if elapsed > 0 else math.nan,
                         "tokens_per_s": sum(s.tokens for s in result.steps) / elapsed if elapsed > 0 else math.nan})
            if monitor is not None and healthy is not None:
                model.eval()
                crossed = monitor(model, step_idx, len(plan))
                model.train()
                if crossed == []:
                    healthy = (step_idx, _snapshot(trainable))
                elif crossed:
                    _restore(trainable, healthy[1])
                    result.interventions = [{**c, "at_step": step_idx, "kept_step": healthy[0],
                                             "total_steps": len(plan)} for c in crossed]
                    break
        completed = True
    finally:
        optimizer.zero_grad(set_to_none=True)
        ctx.optimizer = None
        model.eval()
        if not completed:  # the resident model is shared: a strategy undoes what it changed (ProCL's wrappers)
            strategy.on_stage_abort(ctx)
    strategy.on_stage_end(ctx)
    result.strategy_state = strategy.export(ctx)
    result.seconds = time.perf_counter() - t_stage
    return result
