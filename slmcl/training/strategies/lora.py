"""The study's method: one cumulative LoRA adapter, no regulariser, no replay (every hook a no-op)."""

from __future__ import annotations

from slmcl.training.strategies import STRATEGIES, StrategyBase


@STRATEGIES.register("lora")
class SequentialLoRA(StrategyBase):
    """No options and no state: the stage is the plain loop."""
