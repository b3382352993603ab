"""The runs of an experiment: every (model, strategy, order, seed) is one run of sequential fine-tuning.

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
    model: str = ""  # the label of the spec's models entry; "" in a one-model experiment

    @property
    def run_id(self) -> str:
        return layout.run_id(self.order, self.seed, self.strategy, self.model)


def plan_runs(spec: ExperimentSpec, model: str | None = None) -> list[RunPlan]:
    """Models x strategies x orders x seeds, in that nesting (one model's runs finish before the next model
    loads, and a comparison finishes one method's runs first); ``model``: only that model's runs."""
    entries = spec.strategies or [spec.strategy]
    labels = [m.key for m in spec.models] if len(spec.models) > 1 else [""]
    return [RunPlan(tuple(order), seed, st.key, label) for label in labels if model is None or label == model
            for st in entries for order in spec.orders for seed in spec.seeds]


def run_plan(spec: ExperimentSpec, run_id: str) -> RunPlan:
    """The plan of a run by its id (``KeyError`` when the spec has no such run)."""
    for run in plan_runs(spec):
        if run.run_id == run_id:
            return run
    raise KeyError(run_id)
