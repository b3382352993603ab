"""The runs of an experiment: every (strategy, order, seed) is one run of sequential fine-tuning.

One function expands a spec into its runs, so the embedded runner, the monitor and the
tables agree on what the runs are and what they are called.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmcl.config.spec import ExperimentSpec
from slmcl.protocol import layout


@dataclass(frozen=True)
class RunPlan:
    order: tuple[str, ...]
    seed: int
    strategy: str = layout.DEFAULT_STRATEGY  # the label of the spec's strategies entry

    @property
    def run_id(self) -> str:
        return layout.run_id(self.order, self.seed, self.strategy)


def plan_runs(spec: ExperimentSpec) -> list[RunPlan]:
    """Strategies x orders x seeds, in that nesting (a comparison finishes one method's runs first)."""
    entries = spec.strategies or [spec.strategy]
    return [RunPlan(tuple(order), seed, st.key) for st in entries for order in spec.orders for seed in spec.seeds]
