"""Multiple choice: the answer is an option letter (A-E), scored by exact match."""

from __future__ import annotations

from collections.abc import Sequence

from slmcl.tasks.answers import clean_output, extract_choice
from slmcl.tasks.kinds import TASK_KINDS, TaskKind


@TASK_KINDS.register("multiple_choice")
class MultipleChoice(TaskKind):
    def training_target(self, answer: str) -> str:
        """Just the letter, as in the study.

        ScienceQA's gold is "letter\\nrationale"; training on the rationale would teach the
        model to write it, so only the letter of the first line is kept.
        """
        lines = [line.strip() for line in answer.splitlines() if line.strip()]
        first = lines[0] if lines else ""
        if len(first) == 1 and first.upper() in "ABCDE":
            return first.upper()
        return extract_choice(first)

    def normalize(self, text: str, extra_markers: Sequence[str] = ()) -> str:
        return extract_choice(clean_output(text, extra_markers))

    def score(self, prediction: str, gold: str) -> float:
        return 1.0 if prediction == gold else 0.0
