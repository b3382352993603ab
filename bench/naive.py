"""The naive baseline: the straightforward way to run the protocol, as the study's code does it.

Every operation here is written the way ``tspthomas/slm_stability_cl`` (the study's own code)
does it, re-implemented (not copied) on top of the same resident PEFT model, tokenizer,
prompt rendering and answer scoring that slmcl uses, so that the benchmark compares *how*
the work is done, never *what* is computed:

* evaluation: HF ``generate`` on the unmerged PEFT model, greedy, ``use_cache=True``,
  batches of 4 in dataset order, left padding, a finished row keeps decoding (as padding)
  until every row of its batch stops or hits ``max_new_tokens``;
* stability: per batch of 4 in dataset order, one forward of the adapted model with full
  ``[B, L, V]`` logits, then a second forward inside ``disable_adapter()`` (full logits again)
  for the base distribution, at *every* checkpoint. One deliberate fix: the next-token
  distribution is read at the last position (``-1``, correct under left padding), not at
  ``attention_mask.sum() - 1`` as in the study's first release (that bug understated KL);
* training: micro-batch 2 x gradient accumulation 8 through a ``DataLoader`` (rows tokenized
  lazily in ``__getitem__``), PEFT's own ``torch.nn.Dropout``, right padding, gradient checkpointing on (plus
  ``enable_input_require_grads``), full logits and HF's own loss (mean over the micro-batch's
  target tokens) divided by 8, one backward per micro-batch, clip 1.0, AdamW re-created per
  stage, a leftover partial accumulation still steps;
* a run: the base model evaluated (and its stability measured) for every run, i.e. every
  seed and order, with nothing cached between runs.

The shuffle uses the same seeded permutation as slmcl's ``plan_steps`` (a ``RandomSampler``
with the stage's generator) so both paths see the same micro-batches; that changes no cost.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmcl.config.spec import BUILTIN_TASKS, TaskSpec, TrainingSpec
from slmcl.inference.evaluation import Prediction, TaskEvaluation, score_prediction
from slmcl.models.loading import LoadedModel, reset_lora
from slmcl.tasks.data import Example, load_examples
from slmcl.tasks.kinds import get_task_kind
from slmcl.tasks.prompts import PromptRenderer
from slmcl.training.loop import IGNORE, build_sft_example

NAIVE_EVAL_BATCH = 4
NAIVE_REFERENCE_BATCH = 4
NAIVE_REFERENCE_GEN_TOKENS = 256


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def left_padding(tokenizer: Any) -> Iterator[None]:
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


# ---------------------------------------------------------------------------------------
# Evaluation: HF generate, batch 4, dataset order.


@dataclass
class NaiveGeneration:
    token_ids: list[int]  # the new tokens before the first stop token
    hit_max_tokens: bool
    text: str  # decoded up to and including the stop token, stripped (the study's raw prediction)


@dataclass
class NaiveEval:
    evaluation: TaskEvaluation
    generations: list[NaiveGeneration]
    decode_slots: int  # rows x decode steps actually computed (finished rows still cost a slot)


def naive_generate(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    device: torch.device,
) -> tuple[list[NaiveGeneration], int]:
    """One ``generate`` call on a batch of rendered prompts; returns generations and decode slots."""
    with left_padding(tokenizer):
        inputs = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=list(stop_ids),
        )
    new = out[:, prompt_len:]
    stops = set(stop_ids)
    gens = []
    for row in new.tolist():
        cut = next((k for k, tok in enumerate(row) if tok in stops), None)
        kept = row if cut is None else row[:cut]
        with_stop = row if cut is None else row[: cut + 1]
        hit_max = cut is None and len(row) >= max_new_tokens
        gens.append(NaiveGeneration(kept, hit_max, tokenizer.decode(with_stop, skip_special_tokens=False).strip()))
    return gens, int(new.shape[0] * new.shape[1])


def naive_evaluate_task(
    model: Any,
    loaded: LoadedModel,
    renderer: PromptRenderer,
    task: TaskSpec,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int = NAIVE_EVAL_BATCH,
    on_progress: Callable[[int, int], None] | None = None,
) -> NaiveEval:
    """Accuracy of ``model`` on one task the study's way; scored with slmcl's normalization."""
    t0 = time.perf_counter()
    model.eval()
    kind = get_task_kind(task.kind)
    preds: list[Prediction] = []
    gens_all: list[NaiveGeneration] = []
    slots = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start: start + batch_size]
        texts = [renderer.prompt_text(task.instruction, ex.prompt, kind) for ex in batch]  # rendered per batch
        gens, n = naive_generate(model, loaded.tokenizer, texts, stop_ids=loaded.stop_token_ids,
                                 pad_id=loaded.pad_token_id, max_new_tokens=max_new_tokens, device=loaded.device)
        slots += n
        for ex, gen in zip(batch, gens):
            preds.append(score_prediction(kind, ex, gen.text, gen.hit_max_tokens, len(gen.token_ids),
                                          loaded.special_tokens))
        gens_all.extend(gens)
        if on_progress is not None:
            on_progress(len(preds), len(examples))
    ev = TaskEvaluation.of(task.name, preds, time.perf_counter() - t0)
    return NaiveEval(ev, gens_all, slots)


# ---------------------------------------------------------------------------------------
# Stability: full logits, a second adapter-disabled forward at every checkpoint.


def reference_instruction(ex: Example, instructions: Mapping[str, str]) -> str:
    return instructions.get(ex.task_name, BUILTIN_TASKS.get(ex.task_name, ("", "", ""))[2])


@dataclass
class NaiveStability:
    values: dict[str, float]
    forward_rows: int  # reference rows pushed through a forward pass (2 per row for an adapted checkpoint)
    forward_calls: int
    seconds: float


def _next_token_logprobs(model: Any, tokenizer: Any, texts: Sequence[str], device: torch.device,
                         max_length: int) -> torch.Tensor:
    with left_padding(tokenizer):
        inputs = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                           add_special_tokens=False).to(device)
    with torch.inference_mode():
        logits = model(**inputs).logits  # [B, L, V]: every position materialised
    return torch.log_softmax(logits[:, -1, :].float(), dim=-1)


def _summ(values: list[float], name: str) -> dict[str, float]:
    x = torch.tensor(values, dtype=torch.float32)
    return {f"{name}_mean": float(x.mean()), f"{name}_p10": float(torch.quantile(x, 0.10)),
            f"{name}_p95": float(torch.quantile(x, 0.95))}


def naive_stability(
    model: Any,
    loaded: LoadedModel,
    renderer: PromptRenderer,
    rows: Sequence[Example],
    instructions: Mapping[str, str],
    *,
    adapted: bool = True,
    batch_size: int = NAIVE_REFERENCE_BATCH,
    max_length: int = 512,
) -> NaiveStability:
    """KL/entropy/margin of the current checkpoint vs the base, the study's way.

    ``adapted=False`` is the base checkpoint (step 0): one forward with the adapter bypassed
    and KL set to 0, as the study does for its unwrapped base model.
    """
    t0 = time.perf_counter()
    model.eval()
    entropy: list[float] = []
    margin: list[float] = []
    kl: list[float] = []
    fwd_rows = fwd_calls = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        texts = [renderer.prompt_text(reference_instruction(ex, instructions), ex.prompt) for ex in batch]
        ctx = contextlib.nullcontext() if adapted else model.disable_adapter()
        with ctx:
            cur = _next_token_logprobs(model, loaded.tokenizer, texts, loaded.device, max_length)
        fwd_rows += len(batch)
        fwd_calls += 1
        p = cur.exp()
        entropy.extend((-(p * cur).sum(-1)).cpu().tolist())
        top2 = cur.topk(2, dim=-1).values
        margin.extend((top2[:, 0] - top2[:, 1]).cpu().tolist())
        if adapted:
            with model.disable_adapter():
                base = _next_token_logprobs(model, loaded.tokenizer, texts, loaded.device, max_length)
            fwd_rows += len(batch)
            fwd_calls += 1
            kl.extend((p * (cur - base)).sum(-1).cpu().tolist())
        else:
            kl.extend([0.0] * len(batch))
    values = {**_summ(kl, "kl_to_base"), **_summ(entropy, "entropy"), **_summ(margin, "margin")}
    return NaiveStability(values, fwd_rows, fwd_calls, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# Training: micro-batch 2 x accumulation 8, gradient checkpointing, full logits, HF loss.


class LazySFTDataset(torch.utils.data.Dataset):
    """Rows tokenized on access, as the study's dataset does (chat template, prompt masked)."""

    def __init__(self, loaded: LoadedModel, renderer: PromptRenderer, task: TaskSpec, examples: Sequence[Example],
                 max_length: int) -> None:
        self.loaded, self.renderer, self.task = loaded, renderer, task
        self.examples, self.max_length = examples, max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ex = build_sft_example(self.loaded.tokenizer, self.renderer, self.task, self.examples[int(idx)],
                               self.max_length)
        return {"input_ids": torch.tensor(ex.input_ids), "labels": torch.tensor(ex.labels),
                "attention_mask": torch.ones(len(ex.input_ids), dtype=torch.long)}


class RightPadCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = torch.nn.utils.rnn.pad_sequence
        return {
            "input_ids": pad([b["input_ids"] for b in batch], batch_first=True, padding_value=self.pad_id),
            "labels": pad([b["labels"] for b in batch], batch_first=True, padding_value=IGNORE),
            "attention_mask": pad([b["attention_mask"] for b in batch], batch_first=True, padding_value=0),
        }


@dataclass
class NaiveTrainResult:
    step_losses: list[float] = field(default_factory=list)  # per optimizer step: mean of micro-batch losses
    examples: int = 0
    tokens: int = 0  # real (non-pad) tokens processed
    padded_tokens: int = 0  # tokens processed including padding
    seconds: float = 0.0

    @property
    def padded_fraction(self) -> float:
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens


@contextlib.contextmanager
def peft_dropout(model: Any) -> Iterator[None]:
    """PEFT's own ``torch.nn.Dropout`` in every LoRA layer (slmcl installs ``LoraDropout``), put back after."""
    from peft.tuners.lora import LoraLayer

    from slmcl.training.dropout import LoraDropout

    swapped = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, drop in module.lora_dropout.items():
                if isinstance(drop, LoraDropout):
                    module.lora_dropout[name] = torch.nn.Dropout(drop.p)
                    swapped.append((module, name, drop))
    try:
        yield
    finally:
        for module, name, drop in swapped:
            module.lora_dropout[name] = drop


@contextlib.contextmanager
def naive_training_mode(model: Any, gradient_checkpointing: bool) -> Iterator[None]:
    """The study's training switches (and PEFT's dropout), undone afterwards: the shared model is left as found."""
    with peft_dropout(model), _study_switches(model, gradient_checkpointing):
        yield


@contextlib.contextmanager
def _study_switches(model: Any, gradient_checkpointing: bool) -> Iterator[None]:
    base = _base(model)
    use_cache = base.config.use_cache
    base.config.use_cache = False
    if gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable()
        else:  # transformers < 5
            base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    model.train()
    try:
        yield
    finally:
        if gradient_checkpointing:
            if hasattr(base, "activation_checkpointing_disable"):
                base.activation_checkpointing_disable()
            else:
                base.gradient_checkpointing_disable()
            base.disable_input_require_grads()
        base.config.use_cache = use_cache
        model.eval()


def naive_train_stage(
    model: Any,
    loaded: LoadedModel,
    renderer: PromptRenderer,
    task: TaskSpec,
    examples: Sequence[Example],
    spec: TrainingSpec,
    *,
    generator: torch.Generator,
    gradient_checkpointing: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> NaiveTrainResult:
    """One stage of the study's training loop on ``model``'s adapter."""
    dataset = LazySFTDataset(loaded, renderer, task, examples, spec.max_length)
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator)  # == plan_steps' permutation
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec.batch_size, sampler=sampler,
                                         collate_fn=RightPadCollator(loaded.pad_token_id))
    result = NaiveTrainResult(examples=len(dataset))
    t0 = time.perf_counter()
    with naive_training_mode(model, gradient_checkpointing):
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
        try:
            for _epoch in range(spec.epochs):
                optimizer.zero_grad(set_to_none=True)
                pending: list[float] = []
                count = 0
                for idx, batch in enumerate(loader):
                    result.tokens += int(batch["attention_mask"].sum())
                    result.padded_tokens += int(batch["input_ids"].numel())
                    batch = {k: v.to(loaded.device) for k, v in batch.items()}
                    loss = model(**batch).loss  # HF: mean over the micro-batch's target tokens, full logits
                    (loss / spec.grad_accum).backward()
                    pending.append(loss.item())
                    count += 1
                    if (idx + 1) % spec.grad_accum == 0:
                        torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        result.step_losses.append(sum(pending) / len(pending))
                        pending = []
                        if on_step is not None:
                            on_step(len(result.step_losses), result.step_losses[-1])
                if count % spec.grad_accum != 0:  # the leftover partial accumulation still steps
                    torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    result.step_losses.append(sum(pending) / len(pending))
                    if on_step is not None:
                        on_step(len(result.step_losses), result.step_losses[-1])
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------
# A whole run: base + one stage per task, nothing cached between runs.


def naive_reference_generation(model: Any, loaded: LoadedModel, renderer: PromptRenderer, rows: Sequence[Example],
                               instructions: Mapping[str, str], max_new_tokens: int) -> int:
    """The study also *generates* on the reference set at every checkpoint (optional here)."""
    slots = 0
    for start in range(0, len(rows), NAIVE_REFERENCE_BATCH):
        batch = rows[start: start + NAIVE_REFERENCE_BATCH]
        texts = [renderer.prompt_text(reference_instruction(ex, instructions), ex.prompt) for ex in batch]
        _, n = naive_generate(model, loaded.tokenizer, texts, stop_ids=loaded.stop_token_ids,
                              pad_id=loaded.pad_token_id, max_new_tokens=max_new_tokens, device=loaded.device)
        slots += n
    return slots


def naive_run(
    model: Any,
    loaded: LoadedModel,
    renderer: PromptRenderer,
    spec: Any,  # slmcl.config.spec.ExperimentSpec: tasks, training/evaluation/reference settings and subsets
    order: Sequence[str],
    seed: int,
    out_dir: str | Path,
    *,
    stage_seed: Callable[[int, int], int],
    reference_generation: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Base evaluation + stability, then train / evaluate all tasks / stability / save per stage."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    instructions = {t.name: t.instruction for t in spec.tasks}
    ev_spec = spec.evaluation
    ref_rows = load_examples(spec.reference.file, limit=spec.reference.max_examples)
    tests = {t.name: load_examples(t.test_file, limit=ev_spec.max_examples) for t in spec.tasks}
    timings: dict[str, float] = {"base_eval": 0.0, "train": 0.0, "eval": 0.0, "stability": 0.0, "save": 0.0,
                                 "reference_generation": 0.0}
    matrix: dict[int, dict[str, int]] = {}
    stab: dict[int, dict[str, float]] = {}
    losses: dict[int, list[float]] = {}

    def evaluate_all(step: int, adapted: bool) -> None:
        row: dict[str, int] = {}
        for t in spec.tasks:
            ctx = contextlib.nullcontext() if adapted else model.disable_adapter()
            with ctx:
                res = naive_evaluate_task(model, loaded, renderer, t, tests[t.name],
                                          max_new_tokens=ev_spec.max_new_tokens)
            row[t.name] = res.evaluation.correct
            (out / f"step{step}-{t.name}.json").write_text(
                json.dumps([p.as_dict() for p in res.evaluation.predictions]))
        matrix[step] = row

    reset_lora(model, seed)
    t = time.perf_counter()
    evaluate_all(0, adapted=False)
    timings["base_eval"] += time.perf_counter() - t
    t = time.perf_counter()
    stab[0] = naive_stability(model, loaded, renderer, ref_rows, instructions, adapted=False,
                              max_length=spec.training.max_length).values
    timings["stability"] += time.perf_counter() - t
    log(f"    naive run: base done ({timings['base_eval']:.1f}s eval)")
    for step, name in enumerate(order, start=1):
        task = spec.task(name)
        s = stage_seed(seed, step)
        torch.manual_seed(s)
        t = time.perf_counter()
        tr = naive_train_stage(model, loaded, renderer, task,
                               load_examples(task.train_file, limit=spec.training.max_examples), spec.training,
                               generator=torch.Generator().manual_seed(s))
        timings["train"] += time.perf_counter() - t
        losses[step] = tr.step_losses
        t = time.perf_counter()
        evaluate_all(step, adapted=True)
        timings["eval"] += time.perf_counter() - t
        if reference_generation:
            t = time.perf_counter()
            naive_reference_generation(model, loaded, renderer, ref_rows, instructions, NAIVE_REFERENCE_GEN_TOKENS)
            timings["reference_generation"] += time.perf_counter() - t
        t = time.perf_counter()
        stab[step] = naive_stability(model, loaded, renderer, ref_rows, instructions, adapted=True,
                                     max_length=spec.training.max_length).values
        timings["stability"] += time.perf_counter() - t
        t = time.perf_counter()
        ckpt = out / f"model_{name}_{seed}_lora"
        model.save_pretrained(str(ckpt))
        loaded.tokenizer.save_pretrained(str(ckpt))
        timings["save"] += time.perf_counter() - t
        log(f"    naive run: stage {step} ({name}) done")
    return {"matrix": matrix, "stability": stab, "losses": losses, "timings": timings}
