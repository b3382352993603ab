"""The two records of a stage: what training produced, and what was measured at the checkpoint.

``TrainedStage`` is written by whoever trained the stage (the embedded runner or a trainer
worker) right after the adapter; ``StageRecord`` is written once the checkpoint has been
evaluated and its drift measured, and is the commit point of the stage: tables, resume and
"is this stage done" all read stage records, never anything else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, allow_nan=False)


@dataclass
class TrainedStage:
    """Stage ``step`` of run ``run_id`` was trained; its adapter is at ``checkpoint``."""

    run_id: str
    order: list[str]
    seed: int
    step: int
    task: str
    checkpoint: str
    train: dict[str, Any] = field(default_factory=dict)  # steps (loss, lr, tokens, seconds), examples, tokens, seconds
    strategy: str = "lora"  # the label of the run's strategies entry
    # The step whose weights this stage started from: step - 1, or earlier after a reverted stage (0: fresh).
    starts_from: int | None = None
    # What the stability policy did at this stage (slmcl.protocol.policy): one record per crossed threshold.
    interventions: list[dict[str, Any]] = field(default_factory=list)
    # Measured by the training role beside the checkpoint: drift on the stage's own task prompts (before and
    # after), reference-set accuracy when a rule reads it; merged into the stage record's ``stability``.
    measured: dict[str, Any] = field(default_factory=dict)
    attribution: list[dict[str, Any]] = field(default_factory=list)  # drift_attribution.csv rows of this stage

    def to_json(self) -> str:
        return _dump(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainedStage:
        raw = json.loads(text)
        return cls(**{k: raw[k] for k in ("run_id", "order", "seed", "step", "task", "checkpoint")},
                   train=raw.get("train", {}), strategy=raw.get("strategy", "lora"),
                   starts_from=raw.get("starts_from"), interventions=raw.get("interventions", []),
                   measured=raw.get("measured", {}), attribution=raw.get("attribution", []))

    @property
    def start(self) -> int:
        """The step whose weights this stage started from."""
        return self.step - 1 if self.starts_from is None else self.starts_from

    @property
    def action(self) -> str | None:
        """The strongest action the policy took at this stage (None: healthy)."""
        from slmcl.protocol.policy import strongest

        return strongest(self.interventions)

    @property
    def next_start(self) -> int:
        """The step whose weights the next stage starts from: this one, unless it was reverted."""
        return self.start if self.action == "revert" else self.step

    @property
    def final_loss(self) -> float | None:
        steps = self.train.get("steps") or []
        return steps[-1]["loss"] if steps else None


@dataclass
class StageRecord:
    """Everything measured at one checkpoint of one run (step 0 is the base)."""

    run_id: str
    order: list[str]
    seed: int
    step: int
    checkpoint_task: str
    model: str
    scores: dict[str, dict[str, Any]]  # task -> {"accuracy", "correct", "total", "score_sum"}
    stability: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)  # losses per optimizer step, tokens, seconds
    checkpoint: str = ""  # store prefix of the adapter
    timing: dict[str, float] = field(default_factory=dict)  # train/eval/stability seconds (benchmarks read it)
    strategy: str = "lora"  # the label of the run's strategies entry (records made before strategies: lora)
    # The checkpoint's size in bytes and the strategy's trainable parameters (the comparison table reads them).
    checkpoint_bytes: int = 0
    trainable_params: int = 0
    starts_from: int | None = None  # see TrainedStage
    interventions: list[dict[str, Any]] = field(default_factory=list)  # the policy's records of this stage
    attribution: list[dict[str, Any]] = field(default_factory=list)  # where this checkpoint's drift sits

    @property
    def evaluated(self) -> bool:
        """Whether every task was evaluated here (``evaluation.every`` skips stages between full evaluations)."""
        return bool(self.scores)

    @property
    def action(self) -> str | None:
        from slmcl.protocol.policy import strongest

        return strongest(self.interventions)

    def to_json(self) -> str:
        return _dump(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> StageRecord:
        return cls(**json.loads(text))
