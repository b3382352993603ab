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

    def to_json(self) -> str:
        return _dump(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainedStage:
        raw = json.loads(text)
        return cls(**{k: raw[k] for k in ("run_id", "order", "seed", "step", "task", "checkpoint")},
                   train=raw.get("train", {}), strategy=raw.get("strategy", "lora"))

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

    def to_json(self) -> str:
        return _dump(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> StageRecord:
        return cls(**json.loads(text))
