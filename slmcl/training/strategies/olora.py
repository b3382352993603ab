"""O-LoRA (Wang et al., EMNLP Findings 2023): one LoRA pair per task, new pairs kept orthogonal to old ones.

Each task t trains a fresh rank-r pair ``(A_t, B_t)`` while every earlier pair stays frozen in
the forward pass, and a penalty pushes the row space of the new ``A_t`` away from the earlier
ones. At inference the pairs are summed: ``dW = (alpha/r) * sum_t B_t A_t``, no task id.

Layout: one stacked adapter, not one adapter per task
    The run trains a single PEFT adapter of rank ``r * n`` (n = the run's number of stages,
    ``adapter_lora``), with alpha scaled by n too so PEFT's ``alpha'/r'`` equals each pair's
    ``alpha/r``. Task t owns rank slice t: rows ``[(t-1)r, tr)`` of every ``lora_A`` weight and
    the same columns of every ``lora_B`` weight. ``B A`` over the stack is exactly the sum of the
    pairs' ``B_t A_t``, so the checkpoint is a plain PEFT folder that ``PeftModel.from_pretrained``
    loads and that computes what the authors' concatenated ``lora_A``/``lora_B`` computes. The
    engine's reset gives every slice a fresh Kaiming A and a zero B, so each task starts a
    standard LoRA pair (Kaiming's bound depends on ``d_in`` only, not on the rank) and a slice
    not trained yet adds exactly zero. During stage t the other slices are frozen by hand:
    their gradients are zeroed after backward (so gradient clipping and AdamW see only slice t)
    and their values are written back after each optimizer step (AdamW's weight decay would
    otherwise shrink them), so an earlier pair is bit-identical after any later stage. This is
    the authors' forward pass (frozen old pairs + one trainable new pair), with one dropout mask
    shared by all pairs, as in their code. The cost is that every stage computes with the full
    ``r * n`` rank, trained or not.

Penalty (``extra_loss``), per LoRA module, with ``G = A_old @ A_t^T`` (``r(t-1) x r``, fp32):
    ``lambda1 * L_orth + lambda2 * L_2`` where ``L_orth = sum_modules ||G||`` and
    ``L_2 = sum_modules (||A_t||_F + ||B_t||_F)`` (not squared, as in the released code).
    ``norm="l1"`` is the released code's sum of ``|G|`` entries (its published numbers);
    ``norm="fro2"`` is the paper's squared Frobenius norm. ``reduce="mean"`` divides both sums by
    the number of LoRA modules: with all-linear targets the L1 sum is orders of magnitude above
    the LM loss (O-LoRA issue #33). PEFT's ``lora_A`` (the down-projection, ``r x d_in``) is what
    the released code penalises; the paper's notation calls the subspace's basis "A" but writes
    it as the up-projection (issue #39). Following the code, the constraint is on the input-side
    row space of each task's update; ``B`` is never constrained.

Where the paper is silent (choices made here):
    - Stage 1 has no earlier pair, so no orthogonality term; the L2 term applies from stage 1
      (the code adds it on every task). With ``lambda2 = 0`` stage 1 reports no strategy loss.
    - From stage 2 the earlier slices must be non-zero (A in every module, B somewhere for
      every earlier task): a penalty against an adapter that was never loaded is silently 0
      (issue #41), so that refuses to train instead.
    - ``lora.bias`` must be "none": a trained bias is shared by every task and the earlier
      tasks' updates would not stay frozen.
    - The per-task rank is not stored in the options: it is the adapter's rank over n, checked
      against the previous stage's exported ``rank_per_task``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from slmcl.errors import SpecError, TrainingError
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

    from slmcl.config.spec import LoraSpec

Norm = Literal["l1", "fro2"]
Reduce = Literal["sum", "mean"]


@dataclass(frozen=True)
class OLoRAOptions(StrategyOptions):
    lambda1: float = 0.5  # weight of the orthogonality penalty (the released scripts' value)
    lambda2: float = 0.0  # weight of the L2 term on the new pair (0 in the standard-benchmark scripts)
    norm: Norm = "l1"  # "l1": the released code; "fro2": the paper's squared Frobenius norm
    reduce: Reduce = "sum"  # over LoRA modules; "mean" keeps the penalty on the LM loss's scale

    def validate(self) -> None:
        for key in ("lambda1", "lambda2"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise option_error(key, f"must be a finite number >= 0, got {value}")


def orthogonality_loss(a_old: Sequence[torch.Tensor], a_new: Sequence[torch.Tensor], norm: Norm = "l1",
                       reduce: Reduce = "sum") -> torch.Tensor:
    """``L_orth`` over modules: ``a_old[i]`` (earlier A slices stacked) against ``a_new[i]``, in fp32."""
    import torch

    if len(a_old) != len(a_new) or not a_new:
        raise ValueError(f"need one earlier and one new A per module, got {len(a_old)} and {len(a_new)}")
    terms = []
    for old, new in zip(a_old, a_new, strict=True):
        g = old.float() @ new.float().T
        terms.append(g.abs().sum() if norm == "l1" else g.square().sum())
    total = torch.stack(terms).sum()
    return total / len(terms) if reduce == "mean" else total


def l2_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], reduce: Reduce = "sum") -> torch.Tensor:
    """The code's ``L_2``: Frobenius norms (not squared) of each module's new ``A_t`` and ``B_t``, in fp32."""
    import torch

    if not pairs:
        raise ValueError("need at least one (A, B) pair")
    total = torch.stack([a.float().norm() + b.float().norm() for a, b in pairs]).sum()
    return total / len(pairs) if reduce == "mean" else total


@dataclass
class _Module:
    """One LoRA module's stacked weights and their values when the stage began."""

    name: str
    a: Any  # lora_A weight, (r*n, d_in): a torch Parameter
    b: Any  # lora_B weight, (d_out, r*n)
    a0: Any
    b0: Any


@STRATEGIES.register("olora")
class OLoRA(StrategyBase):
    Options = OLoRAOptions
    options: OLoRAOptions
    rank: int  # per task: the adapter's rank over the run's stages
    lo: int  # this stage's rank slice is [lo, hi)
    hi: int
    modules: list[_Module]

    def adapter_lora(self, lora: LoraSpec, n_stages: int) -> LoraSpec:
        if n_stages < 1:
            raise SpecError(f"strategy 'olora': needs the run's number of stages (>= 1), got {n_stages}")
        if lora.bias != "none":
            raise SpecError(f"lora.bias: strategy 'olora' trains only the per-task LoRA pairs, so it must be "
                            f"'none' (a trained bias is shared by every task), got {lora.bias!r}")
        return dataclasses.replace(lora, rank=lora.rank * n_stages, alpha=lora.alpha * n_stages)

    def check_spec(self, lora: LoraSpec) -> list[tuple[str, str]]:
        if lora.bias != "none":
            return [("lora.bias", f"strategy 'olora' trains only the per-task LoRA pairs, so it must be 'none' "
                                  f"(a trained bias is shared by every task), got {lora.bias!r}")]
        return []

    def on_stage_start(self, ctx: StageContext) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        where = f"run {ctx.run_id} stage {ctx.stage}: strategy 'olora'"
        n = ctx.n_stages
        if n < 1 or not 1 <= ctx.stage <= n:
            raise TrainingError(f"{where} needs the run's number of stages, got stage {ctx.stage} of {n}")
        adapter = getattr(ctx.model, "active_adapter", None)  # the engine keeps one adapter per shape
        if not isinstance(adapter, str):
            raise TrainingError(f"{where} trains one active LoRA adapter, the model has {adapter!r}")
        layers: list[tuple[str, Any]] = [(name, m) for name, m in ctx.model.named_modules()  # PEFT's: untyped
                                         if isinstance(m, LoraLayer) and adapter in m.lora_A]
        if not layers:
            raise TrainingError(f"{where} found no layer of LoRA adapter {adapter!r} in the model")
        ranks = {int(m.r[adapter]) for _, m in layers}
        if len(ranks) != 1 or next(iter(ranks)) % n:
            raise TrainingError(
                f"{where}: the adapter's rank ({', '.join(map(str, sorted(ranks)))}) is not one rank-r pair per "
                f"stage x {n} stages; build the adapter with the strategy's adapter_lora(lora, n_stages)")
        self.rank = next(iter(ranks)) // n
        prev = ctx.state
        if ctx.stage >= 2 and "stage" in prev.meta and prev.meta["stage"] != ctx.stage - 1:
            raise TrainingError(f"{where} needs the state exported by stage {ctx.stage - 1}, "
                                f"got the state of stage {prev.meta['stage']}")
        if ctx.stage >= 2 and "rank_per_task" in prev.meta and prev.meta["rank_per_task"] != self.rank:
            raise TrainingError(f"{where}: the previous stage trained rank-{prev.meta['rank_per_task']} pairs, "
                                f"this adapter holds rank {self.rank} per stage ({n} stages)")

        self.modules = []
        for name, m in layers:
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            self.modules.append(_Module(name, a, b, a.detach().clone(), b.detach().clone()))
        own = {id(x) for mod in self.modules for x in (mod.a, mod.b)}
        stray = [name for name, p in ctx.model.named_parameters() if p.requires_grad and id(p) not in own]
        if stray:
            raise TrainingError(f"{where} trains only the LoRA pairs, but these parameters are trainable too: "
                                f"{stray[:3]} (set lora.bias to 'none')")
        if any(not mod.a.requires_grad or not mod.b.requires_grad for mod in self.modules):
            raise TrainingError(f"{where}: some LoRA weights are frozen; the stage's slice could not train")

        self.lo, self.hi = (ctx.stage - 1) * self.rank, ctx.stage * self.rank
        if ctx.stage >= 2:
            with torch.no_grad():
                zero_a = [mod.name for mod in self.modules if not mod.a0[: self.lo].any()]
                if zero_a:
                    raise TrainingError(f"{where}: the earlier tasks' A slices are all zeros in {zero_a[:3]}, so the "
                                        "penalty would be 0; the previous stage's adapter was not loaded")
                for i in range(1, ctx.stage):
                    cols = slice((i - 1) * self.rank, i * self.rank)
                    if not any(mod.b0[:, cols].any() for mod in self.modules):
                        raise TrainingError(
                            f"{where}: the LoRA pair of stage {i} (rank slice [{cols.start}, {cols.stop})) is "
                            "untrained (B all zeros in every module); the previous stage's adapter was not loaded")

    def extra_loss(self, ctx: StageContext) -> torch.Tensor | None:
        opts = self.options
        orth = ctx.stage >= 2 and opts.lambda1 > 0
        if not orth and opts.lambda2 == 0:
            return None
        lo, hi = self.lo, self.hi
        total: torch.Tensor | None = None
        if orth:
            total = opts.lambda1 * orthogonality_loss([m.a[:lo].detach() for m in self.modules],
                                                      [m.a[lo:hi] for m in self.modules], opts.norm, opts.reduce)
        if opts.lambda2 > 0:
            l2 = opts.lambda2 * l2_loss([(m.a[lo:hi], m.b[:, lo:hi]) for m in self.modules], opts.reduce)
            total = l2 if total is None else total + l2
        return total

    def after_backward(self, ctx: StageContext) -> None:
        lo, hi = self.lo, self.hi
        for m in self.modules:
            if m.a.grad is not None:
                m.a.grad[:lo].zero_()
                m.a.grad[hi:].zero_()
            if m.b.grad is not None:
                m.b.grad[:, :lo].zero_()
                m.b.grad[:, hi:].zero_()

    def after_step(self, ctx: StageContext) -> None:
        import torch

        lo, hi = self.lo, self.hi
        with torch.no_grad():
            for m in self.modules:
                m.a[:lo].copy_(m.a0[:lo])
                m.a[hi:].copy_(m.a0[hi:])
                m.b[:, :lo].copy_(m.b0[:, :lo])
                m.b[:, hi:].copy_(m.b0[:, hi:])

    def on_stage_end(self, ctx: StageContext) -> None:
        self.modules = []  # the stage-start copies: as large as the adapter

    def updated_parameters(self, ctx: StageContext, params: Sequence[torch.Tensor]) -> int:
        """One slice of the stacked adapter trains per stage: 1/n of what the optimizer holds."""
        return sum(p.numel() for p in params) // max(1, ctx.n_stages)

    def export(self, ctx: StageContext) -> StrategyState:
        return StrategyState(meta={"stage": ctx.stage, "rank_per_task": self.rank})
