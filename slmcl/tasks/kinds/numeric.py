"""Numeric: the answer is the final number (or a word such as "Friday"), scored by exact match of its value."""

from __future__ import annotations

from collections.abc import Sequence

from slmcl.tasks.answers import clean_output, extract_number, last_number, numbers_match
from slmcl.tasks.kinds import TASK_KINDS, TaskKind


@TASK_KINDS.register("numeric")
class Numeric(TaskKind):
    def training_target(self, answer: str) -> str:
        """The gold's final number, normalized; word golds keep their casing.

        The model should learn to write "Friday" naturally; scoring upper-cases both sides anyway.
        """
        if last_number(answer) is None:
            return answer.strip()
        return self.normalize(answer)

    def normalize(self, text: str, extra_markers: Sequence[str] = ()) -> str:
        return extract_number(clean_output(text, extra_markers))

    def score(self, prediction: str, gold: str) -> float:
        """Numbers match by exact decimal value, so a caller's unnormalized "186.0" still equals "186"."""
        return 1.0 if numbers_match(prediction, gold) else 0.0
