"""The study's method: one cumulative LoRA adapter, no regulariser, no replay."""

from __future__ import annotations

from typing import Any, Sequence

from slmcl.tasks.data import Example
from slmcl.training.strategies import StageContext


class SequentialLoRA:
    name = "lora"

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"strategy 'lora' takes no options, got {sorted(options)}")

    def stage_examples(self, ctx: StageContext, examples: Sequence[Example]) -> Sequence[Example]:
        return examples

    def on_stage_start(self, ctx: StageContext) -> None:
        return None

    def extra_loss(self, ctx: StageContext) -> None:
        return None

    def after_backward(self, ctx: StageContext) -> None:
        return None

    def after_step(self, ctx: StageContext) -> None:
        return None

    def on_stage_end(self, ctx: StageContext) -> None:
        return None

    def export(self, ctx: StageContext) -> dict[str, Any]:
        return {}
