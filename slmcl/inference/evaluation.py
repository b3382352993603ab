"""Task accuracy of a checkpoint: greedy generation (``slmcl.inference.generation``), then the task
kind's score of each row after normalization (``slmcl.tasks.kinds``), with every prediction kept
for the results directory."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from slmcl.config.spec import TaskSpec
from slmcl.inference.generation import greedy_generate
from slmcl.models.loading import LoadedModel
from slmcl.tasks.data import Example
from slmcl.tasks.kinds import TaskKind, get_task_kind
from slmcl.tasks.prompts import PromptRenderer


@dataclass(frozen=True)
class Prediction:
    index: int
    prompt: str
    gold: str
    gold_normalized: str
    prediction: str
    raw_output: str
    hit_max_tokens: bool
    correct: bool  # score == 1.0
    new_tokens: int
    score: float  # the task kind's score of this row, in [0, 1]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskEvaluation:
    task: str
    correct: int  # rows that scored 1.0
    total: int
    predictions: list[Prediction]
    seconds: float
    new_tokens: int
    score_sum: float  # sum of the rows' scores: shards add up exactly, and equals ``correct`` for exact-match kinds

    @property
    def accuracy(self) -> float:
        """The mean row score (correct / total for exact-match kinds)."""
        return self.score_sum / self.total if self.total else float("nan")

    def score(self) -> dict[str, Any]:
        """What a stage record keeps of it (the predictions go to their own file)."""
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "score_sum": self.score_sum}

    @classmethod
    def of(cls, task: str, predictions: list[Prediction], seconds: float) -> TaskEvaluation:
        """The totals of ``predictions``, so every evaluator (ours, the naive bench) sums them the same way."""
        return cls(task=task, correct=sum(p.correct for p in predictions), total=len(predictions),
                   predictions=predictions, seconds=seconds, new_tokens=sum(p.new_tokens for p in predictions),
                   score_sum=sum(p.score for p in predictions))


def score_prediction(
    kind: TaskKind, example: Example, raw: str, hit_max_tokens: bool, new_tokens: int, extra_markers: Sequence[str]
) -> Prediction:
    """One row's prediction record, scored by its task's kind."""
    pred, gold, score = kind.evaluate(raw, example.answer, extra_markers)
    return Prediction(index=example.index, prompt=example.prompt, gold=example.answer, gold_normalized=gold,
                      prediction=pred, raw_output=raw, hit_max_tokens=hit_max_tokens, correct=score == 1.0,
                      new_tokens=new_tokens, score=score)


def one_task_progress(on_progress: Callable[[int, int], None] | None) -> Callable[[str, int, int], None] | None:
    """A one-task ``on_progress(done, total)`` as the ``(task, done, total)`` callback of ``evaluate_tasks``."""
    return None if on_progress is None else (lambda _task, done, total: on_progress(done, total))


def render_prompt_ids(
    loaded: LoadedModel, renderer: PromptRenderer, task: TaskSpec, examples: Sequence[Example]
) -> list[list[int]]:
    kind = get_task_kind(task.kind)
    return [
        loaded.tokenizer(renderer.prompt_text(task.instruction, ex.prompt, kind), add_special_tokens=False).input_ids
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
        kind = get_task_kind(task.kind)
        preds = [
            score_prediction(kind, ex, loaded.tokenizer.decode(gen.token_ids, skip_special_tokens=False),
                             gen.hit_max_tokens, len(gen.token_ids), loaded.special_tokens)
            for ex, gen in zip(examples, gens[offset: offset + len(examples)])
        ]
        offset += len(examples)
        out.append(TaskEvaluation.of(task.name, preds, seconds))
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
