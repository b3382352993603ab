"""Replay: a share of earlier tasks' training rows mixed into each stage.

The oldest continual-learning baseline and the one TRACE reports beside every method. Our
choices, where the literature varies:

- ``share`` is the fraction of the *stage's* rows that are replayed: with n rows of the new
  task, ``round(n * share / (1 - share))`` earlier rows join them (so share 0.2 over 48 new
  rows adds 12, and 12 of the 60 rows are old).
- The replayed rows are drawn without replacement from the pooled training rows of every
  earlier task of the run (as ``training.max_examples`` limits them), uniformly, so each
  earlier task contributes in proportion to its size; when the pool is smaller than asked,
  all of it is replayed.
- The draw is seeded by (seed, stage) alone: the same rows for the same run whatever the
  process, so a resumed stage replays exactly what the uninterrupted one did.
- Each replayed row keeps its own task: it is rendered with that task's instruction and
  target format. The loop's shuffle mixes old and new rows within the stage.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slmcl.training.strategies import STRATEGIES, StageContext, StrategyBase, StrategyOptions, option_error

if TYPE_CHECKING:
    from slmcl.tasks.data import Example


@dataclass(frozen=True)
class ReplayOptions(StrategyOptions):
    share: float = 0.2  # fraction of each stage's rows drawn from earlier tasks

    def validate(self) -> None:
        if not (math.isfinite(self.share) and 0 <= self.share < 1):
            raise option_error("share", f"must be in [0, 1), got {self.share}")


def replay_count(n_new: int, share: float) -> int:
    """Earlier rows to add to ``n_new`` new ones so that they make ``share`` of the stage."""
    return round(n_new * share / (1 - share))


@STRATEGIES.register("replay")
class Replay(StrategyBase):
    Options = ReplayOptions
    options: ReplayOptions

    def stage_examples(self, ctx: StageContext, examples: Sequence[Example]) -> Sequence[Example]:
        if not ctx.previous_tasks or self.options.share == 0:
            return examples
        pool = [row for name in ctx.previous_tasks for row in ctx.task_examples(name)]
        k = min(len(pool), replay_count(len(examples), self.options.share))
        rng = random.Random(f"replay/{ctx.seed}/{ctx.stage}")
        return [*examples, *rng.sample(pool, k)]
