"""Task accuracy of a checkpoint: greedy generation (``slmcl.inference.generation``), then exact match
after normalization, with every prediction kept for the results directory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from slmcl.tasks.answers import is_correct
from slmcl.tasks.data import Example
from slmcl.inference.generation import greedy_generate
from slmcl.models.loading import LoadedModel
from slmcl.tasks.prompts import PromptRenderer
from slmcl.config.spec import TaskSpec


@dataclass(frozen=True)
class Prediction:
    index: int
    prompt: str
    gold: str
    gold_normalized: str
    prediction: str
    raw_output: str
    hit_max_tokens: bool
    correct: bool
    new_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskEvaluation:
    task: str
    correct: int
    total: int
    predictions: list[Prediction]
    seconds: float
    new_tokens: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def score(self) -> dict[str, Any]:
        """What a stage record keeps of it (the predictions go to their own file)."""
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


def one_task_progress(on_progress: Callable[[int, int], None] | None) -> Callable[[str, int, int], None] | None:
    """A one-task ``on_progress(done, total)`` as the ``(task, done, total)`` callback of ``evaluate_tasks``."""
    return None if on_progress is None else (lambda _task, done, total: on_progress(done, total))


def render_prompt_ids(loaded: LoadedModel, renderer: PromptRenderer, task: TaskSpec, examples: Sequence[Example]) -> list[list[int]]:
    return [
        loaded.tokenizer(renderer.prompt_text(task.instruction, ex.prompt), add_special_tokens=False).input_ids
        for ex in examples
    ]


def evaluate_tasks(
    model: Any,
    loaded: LoadedModel,
    renderer: PromptRenderer,
    work: Sequence[tuple[TaskSpec, Sequence[Example]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[TaskEvaluation]:
    """Accuracy and per-example predictions of ``model`` (base or adapted) on several tasks' test rows.

    The tasks' rows are generated together (``greedy_generate`` segments), so small tasks
    share decode batches. ``on_progress(task, done, total)`` follows each task's rows. Each
    result's ``seconds`` is the wall time of this whole call, shared by the tasks in it.
    """
    t0 = time.perf_counter()
    prompts: list[list[int]] = []
    segments: list[int] = []
    for k, (task, examples) in enumerate(work):
        prompts.extend(render_prompt_ids(loaded, renderer, task, examples))
        segments.extend([k] * len(examples))
    done = [0] * len(work)
    if on_progress is not None:  # every task's total up front, so one bar can follow the whole pass
        for task, examples in work:
            on_progress(task.name, 0, len(examples))

    def progressed(indices: list[int]) -> None:
        for k in dict.fromkeys(segments[i] for i in indices):
            done[k] += sum(1 for i in indices if segments[i] == k)
            if on_progress is not None:
                on_progress(work[k][0].name, done[k], len(work[k][1]))

    gens = greedy_generate(
        model, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids, segments=segments,
        max_new_tokens=max_new_tokens, batch_size=batch_size, device=loaded.device, on_batch=progressed,
    )
    seconds = time.perf_counter() - t0
    out, offset = [], 0
    for task, examples in work:
        preds: list[Prediction] = []
        for ex, gen in zip(examples, gens[offset: offset + len(examples)]):
            raw = loaded.tokenizer.decode(gen.token_ids, skip_special_tokens=False)
            pred, gold, ok = is_correct(raw, ex.answer, task.kind, extra_markers=loaded.special_tokens)
            preds.append(Prediction(ex.index, ex.prompt, ex.answer, gold, pred, raw, gen.hit_max_tokens, ok,
                                    len(gen.token_ids)))
        offset += len(examples)
        out.append(TaskEvaluation(task=task.name, correct=sum(p.correct for p in preds), total=len(preds),
                                  predictions=preds, seconds=seconds, new_tokens=sum(p.new_tokens for p in preds)))
    return out


def evaluate_task(
    model: Any,
    loaded: LoadedModel,
    renderer: PromptRenderer,
    task: TaskSpec,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> TaskEvaluation:
    """Accuracy and per-example predictions of ``model`` (base or adapted) on one task's test rows."""
    return evaluate_tasks(model, loaded, renderer, [(task, examples)], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, on_progress=one_task_progress(on_progress))[0]
