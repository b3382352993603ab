"""Continual-learning strategies: how a stage trains, as hooks around one fixed loop.

The training loop (``slmcl.training.loop``) never changes for a new method: O-LoRA adds an
orthogonality term through ``extra_loss``, OSFT projects gradients in ``after_backward``,
replay mixes old rows in through ``stage_examples``, and each can save its own state with
``export``. A strategy is named in the spec (``strategy.name``) and looked up here, so the
name, not code, is what travels between processes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:  # keep this module importable without torch (spec validation uses it)
    import torch

    from slmcl.tasks.data import Example


@dataclass
class StageContext:
    """What a strategy may look at during a stage."""

    model: Any  # the PEFT model being trained
    run_id: str
    seed: int
    stage: int  # 1-based
    task: str
    previous_tasks: list[str]
    options: dict[str, Any]
    optimizer: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # the strategy's own memory across stages


class Strategy(Protocol):
    name: str

    def stage_examples(self, ctx: StageContext, examples: Sequence["Example"]) -> Sequence["Example"]: ...

    def on_stage_start(self, ctx: StageContext) -> None: ...

    def extra_loss(self, ctx: StageContext) -> "torch.Tensor | None": ...

    def after_backward(self, ctx: StageContext) -> None: ...

    def after_step(self, ctx: StageContext) -> None: ...

    def on_stage_end(self, ctx: StageContext) -> None: ...

    def export(self, ctx: StageContext) -> dict[str, Any]: ...


# name -> "module:Class", imported on first use so that listing names needs no torch.
STRATEGIES: dict[str, str] = {
    "lora": "slmcl.training.strategies.lora:SequentialLoRA",
}


def get_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    try:
        target = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(**(options or {}))
