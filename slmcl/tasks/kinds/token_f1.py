"""Free text: SQuAD-style token F1 between the normalized prediction and gold, so near misses earn partial credit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from slmcl.tasks.answers import clean_output, normalize_free_text
from slmcl.tasks.kinds import TASK_KINDS, TaskKind


@TASK_KINDS.register("token_f1")
class TokenF1(TaskKind):
    def training_target(self, answer: str) -> str:
        return answer.strip()

    def normalize(self, text: str, extra_markers: Sequence[str] = ()) -> str:
        return normalize_free_text(clean_output(text, extra_markers))

    def score(self, prediction: str, gold: str) -> float:
        """Harmonic mean of token precision and recall, each token counted as often as it occurs.

        Two empty answers agree (1.0); an empty one against a non-empty one scores 0, as in SQuAD.
        """
        pred_tokens, gold_tokens = prediction.split(), gold.split()
        if not pred_tokens or not gold_tokens:
            return 1.0 if pred_tokens == gold_tokens else 0.0
        same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pred_tokens), same / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)
