"""L2 anchor: a toy strategy that shows the seam, a loss term and state that holds tensors.

Each stage adds ``weight * sum ||theta - theta_prev||^2`` over the adapter's trainable
(LoRA) parameters, where ``theta_prev`` is where they stood when the stage began. The
anchor of the next stage is this stage's final weights, handed over as ``StrategyState``
tensors and saved beside the adapter, so a resumed run restores it from the checkpoint
folder. Stage 2 onwards refuses to start without it rather than silently anchoring to
something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slmcl.errors import TrainingError
from slmcl.training.strategies import (
    STRATEGIES,
    StageContext,
    StrategyBase,
    StrategyOptions,
    StrategyState,
    option_error,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class L2AnchorOptions(StrategyOptions):
    weight: float = 0.01  # strength of the pull towards the stage's starting weights

    def validate(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise option_error("weight", f"must be a finite number >= 0, got {self.weight}")


@STRATEGIES.register("l2-anchor")
class L2Anchor(StrategyBase):
    Options = L2AnchorOptions
    options: L2AnchorOptions

    def on_stage_start(self, ctx: StageContext) -> None:
        self.params = _trainable(ctx.model)
        if ctx.stage == 1:  # nothing before: anchor to the fresh adapter
            self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
            return
        prev = ctx.state
        if not prev.tensors or prev.meta.get("stage") != ctx.stage - 1:
            raise TrainingError(
                f"run {ctx.run_id} stage {ctx.stage}: strategy 'l2-anchor' needs the state exported by stage "
                f"{ctx.stage - 1} (strategy_state.* in its checkpoint folder), got "
                + (f"the state of stage {prev.meta.get('stage')}" if prev.tensors else "none")
            )
        if prev.tensors.keys() != self.params.keys():
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: the l2-anchor state does not fit this adapter")
        self.anchor = {n: prev.tensors[n].to(p.device, p.dtype) for n, p in self.params.items()}

    def extra_loss(self, ctx: StageContext) -> torch.Tensor | None:
        if self.options.weight == 0 or not self.params:
            return None
        import torch

        total = torch.stack([(p.float() - self.anchor[n].float()).pow(2).sum() for n, p in self.params.items()]).sum()
        return self.options.weight * total

    def export(self, ctx: StageContext) -> StrategyState:
        return StrategyState(meta={"stage": ctx.stage},
                             tensors={n: p.detach().clone() for n, p in _trainable(ctx.model).items()})


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
