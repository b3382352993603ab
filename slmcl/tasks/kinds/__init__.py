"""Task kinds: how a task's prompt is rendered, what the model is trained to write, and how an answer scores.

A kind is one module of this package that registers a ``TaskKind`` subclass with
``@TASK_KINDS.register("name")``; a spec names it in ``tasks[i].kind``, and the training
loop, the evaluation and the services look it up by that name, so adding a kind touches no
if-chain anywhere. Scores are floats in [0, 1] (a task's score is the mean over its rows),
so graded kinds such as token F1 sit beside exact match without a second code path.

Stdlib only: the spec validates ``kind`` against ``TASK_KINDS`` without importing torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from slmcl.registry import Registry


def default_user_message(instruction: str, prompt: str) -> str:
    """The study's layout: the instruction, a blank line, then the example prompt."""
    if not instruction.strip():
        return prompt.strip()
    return f"{instruction.strip()}\n\n{prompt.strip()}"


class TaskKind(ABC):
    """One way of posing and scoring a task; instances are stateless, so one serves every row."""

    def user_message(self, instruction: str, prompt: str) -> str:
        """The user turn the chat template wraps; a kind overrides it only to pose its questions differently."""
        return default_user_message(instruction, prompt)

    @abstractmethod
    def training_target(self, answer: str) -> str:
        """The assistant text a model is fine-tuned to produce from a gold ``answer`` field."""

    @abstractmethod
    def normalize(self, text: str, extra_markers: Sequence[str] = ()) -> str:
        """The comparable form of a raw answer; the same function serves gold and prediction."""

    @abstractmethod
    def score(self, prediction: str, gold: str) -> float:
        """How well a normalized prediction matches the normalized gold, in [0, 1] (1.0 counts as correct)."""

    def evaluate(self, prediction_raw: str, gold_raw: str, extra_markers: Sequence[str] = ()) -> tuple[str, str, float]:
        """Score one row; the normalized pair is returned so reports can show why it scored what it did."""
        prediction = self.normalize(prediction_raw, extra_markers)
        gold = self.normalize(gold_raw, extra_markers)
        return prediction, gold, self.score(prediction, gold)


TASK_KINDS = Registry[type[TaskKind]]("task kind", package="slmcl.tasks.kinds")


def get_task_kind(name: str) -> TaskKind:
    """The kind a spec names; an unknown name is a ``SpecError`` listing the known kinds and the closest one."""
    return TASK_KINDS.get(name)()


def task_kind_names() -> list[str]:
    return TASK_KINDS.names()
