"""Progress as plain data: one ``Event`` type for the embedded run, the trainer and the monitor.

A CLI draws them as bars, a trainer forwards them to Redis, a gRPC stream sends them on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    kind: str  # experiment_started, model_loaded, base_eval, run_started, stage_started, train_step,
    #            eval_progress, stage_done, stage_skipped, run_done, experiment_done
    run_id: str = ""
    stage: int = 0
    task: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "run_id": self.run_id, "stage": self.stage, "task": self.task, "data": self.data}


ProgressCallback = Callable[[Event], None]
