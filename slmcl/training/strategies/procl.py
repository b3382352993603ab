"""ProCL (Le & Venkatesh 2026, "Continual Fine-Tuning of LLMs via Program Memory"), minimal faithful version.

Stage 1 is plain LoRA. From stage 2 on, every LoRA factor ``M`` of the active adapter (``lora_A``:
r x d_in, ``lora_B``: d_out x r) trains through a wrapper that splits it into N "program" slots
(contiguous row blocks, views of M) and, in train mode, executes

    M_exec = sigmoid(g) * M0 + dM,    dM_h = sum_j sigmoid(s_j) * mean_b softmax_j(q_bh . K_hj / tau) * P_j

where M0 is M frozen at the stage's start, q_b = encoder(mean over tokens of the wrapper's own input
x_b) and the attention is averaged over the forward pass's rows (one M_exec per forward, as in the
authors' code). After every optimizer step M is consolidated, ``M <- (1 - lambda) M + lambda M_exec``,
so the adapter follows the routed composition; evaluation (and every checkpoint) uses M alone, which
is why ProCL costs nothing at inference. At the stage's end the wrappers are removed: M already *is*
the plain ``lora_A``/``lora_B`` weight (the wrapper trains that very Parameter), so the model is a
plain PEFT LoRA model again, ``save_pretrained`` writes a standard adapter, and the router (keys,
slot scales, gate, encoder) is dropped, re-initialised each task as in the authors' code. Nothing
else carries over: ``export`` is empty, the adapter is the state.

Choices where the paper and code leave room (see also cl_methods.md 3.5-3.6):

- Consolidation once per optimizer step (``after_step``), not per forward as the authors' code does:
  with gradient accumulation a per-forward EMA rewrites M between the micro-batches of one step,
  under Adam. Within a step every parameter is fixed, so the step's executed factor is the
  row-weighted mean of its forwards' M_exec (= M_exec at the step's mean attention); it is the
  factor as executed, computed before the optimizer moved M, like the authors' stored M_exec.
- Slot scales start at ``slot_scale_init = -4`` (sigmoid 0.018), not the authors' 0, so stage 2
  starts near the stage-1 function instead of with a loss bump; the gate keeps the authors' init
  g = -log RMS(M0) (clipped to +-10), i.e. gamma = 1 / (1 + RMS(M0)), close to 1 for LoRA factors.
  Caveat: with lambda = 0.9 the EMA pins M near (I - A)^-1 gamma M0 (A: the N x N slot mixing), so
  what stage 2 can learn is mostly set by A's size, which a small ``slot_scale_init`` keeps small.
  ``slot_scale_init: 0`` gives the authors' setting.
- Routing pools the wrapper's input over all tokens, padding included: a LoRA factor sees hidden
  states, not the attention mask (the authors' code does not mask either). ``lora_A``'s input is
  PEFT's dropout(x), so in training the route sees the dropped-out input. Gradients flow through
  the router into that input, as plain autograd has it. The routing batch is one forward pass of
  ``train_stage``, i.e. a length-sorted chunk of an optimizer step's rows, so unlike plain LoRA a
  ProCL stage depends on ``training.tokens_per_forward``. A 1-D or 2-D input is one sequence.
- No DEAL MLP (the authors' harness applies it to their baseline too; "entirely within the LoRA
  parameterization" says ProCL proper has none), and lambda is fixed (no learnable-lambda variant).
- The router draws its random initialisation on the CPU from torch's global generator, in module
  order (per factor: keys, encoder), after the engine seeded it for the stage: a resumed stage
  draws the same numbers, on any device. It is kept in float32 whatever the factor's dtype.

Importing this module needs no torch (the spec lists strategies without it): the wrapper class is
built on first use, ``factor_class()``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

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

    from slmcl.config.spec import LoraSpec

KEY_INIT_SCALE = 0.01  # keys ~ 0.01 N(0, 1), the authors' scale: routing starts almost uniform
GATE_CLIP = 10.0  # |g| bound of the authors' gate init


@dataclass(frozen=True)
class ProCLOptions(StrategyOptions):
    slots: int = 4  # N program slots per LoRA factor; must divide the LoRA rank and every adapted d_out
    key_dim: int = 16  # d_k of the routing keys and queries
    consolidation: float = 0.9  # lambda of M <- (1 - lambda) M + lambda M_exec, once per optimizer step
    temperature: float = 1.0  # tau of the routing softmax
    slot_scale_init: float = -4.0  # s at a stage's start (sigmoid(s) scales the slots); the authors use 0

    def validate(self) -> None:
        if self.slots < 1:
            raise option_error("slots", f"must be an integer >= 1, got {self.slots}")
        if self.key_dim < 1:
            raise option_error("key_dim", f"must be an integer >= 1, got {self.key_dim}")
        if not (math.isfinite(self.consolidation) and 0.0 < self.consolidation <= 1.0):
            raise option_error("consolidation", f"must be in (0, 1], got {self.consolidation}")
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise option_error("temperature", f"must be a finite number > 0, got {self.temperature}")
        if not math.isfinite(self.slot_scale_init):
            raise option_error("slot_scale_init", f"must be a finite number, got {self.slot_scale_init}")


class ProCLFactor(Protocol):
    """What the strategy and the tests use of a wrapped LoRA factor (an ``nn.Module``)."""

    weight: torch.nn.Parameter  # M: the wrapped Linear's own weight Parameter, trained in place
    initial: torch.Tensor  # M0
    keys: torch.nn.Parameter  # K: (N, N, d_k)
    scales: torch.nn.Parameter  # s: (N,)
    gate: torch.nn.Parameter  # g: scalar, gamma = sigmoid(g)
    encoder: torch.nn.Sequential
    training: bool

    @property
    def original(self) -> torch.nn.Linear: ...

    def routing(self, x: torch.Tensor) -> torch.Tensor: ...

    def executed(self, alpha: torch.Tensor) -> torch.Tensor: ...

    def consolidate(self) -> bool: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@functools.cache
def factor_class() -> type[Any]:
    """The ``nn.Module`` that wraps one LoRA factor (built here so that importing this module needs no torch)."""
    import torch
    import torch.nn.functional as F

    class ProCLLinear(torch.nn.Module):
        initial: torch.Tensor  # M0 (buffer)
        _exec_sum: torch.Tensor  # buffer
        bias: torch.nn.Parameter | None

        def __init__(self, linear: torch.nn.Linear, *, slots: int, key_dim: int, consolidation: float,
                     temperature: float, slot_scale_init: float) -> None:
            super().__init__()
            rows, cols = linear.weight.shape
            if slots < 1 or rows % slots:
                raise ValueError(f"{slots} slots do not split a factor of {rows} rows into equal blocks")
            self.slots, self.key_dim = slots, key_dim
            self.consolidation, self.temperature = consolidation, temperature
            self.__dict__["_original"] = linear  # put back at the stage's end; not a submodule
            self.weight = linear.weight
            self.register_parameter("bias", linear.bias)
            device = linear.weight.device
            m0 = linear.weight.detach().clone()
            self.register_buffer("initial", m0, persistent=False)
            # The router's random draws: CPU, global generator, fixed order (keys, then the encoder).
            keys = torch.randn(slots, slots, key_dim) * KEY_INIT_SCALE
            encoder = torch.nn.Sequential(torch.nn.Linear(cols, key_dim), torch.nn.Tanh(),
                                          torch.nn.Linear(key_dim, slots * key_dim))
            rms = m0.double().pow(2).mean().sqrt().clamp_min(1e-30)
            gate = (-rms.log()).clamp(-GATE_CLIP, GATE_CLIP).float()
            self.keys = torch.nn.Parameter(keys.to(device))
            self.scales = torch.nn.Parameter(torch.full((slots,), float(slot_scale_init), device=device))
            self.gate = torch.nn.Parameter(gate.to(device))
            self.encoder = encoder.to(device)
            # The executed factors of the current optimizer step, summed with their forward's row count.
            self.register_buffer("_exec_sum", torch.zeros(m0.shape, dtype=torch.float32, device=device),
                                 persistent=False)
            self._exec_rows = 0

        @property
        def original(self) -> torch.nn.Linear:
            linear: torch.nn.Linear = self.__dict__["_original"]
            return linear

        def routing(self, x: torch.Tensor) -> torch.Tensor:
            """alpha (N heads x N slots): slot scales times the attention averaged over the batch's rows."""
            cols = x.shape[-1]
            seqs = x.reshape(1, -1, cols) if x.dim() < 3 else x.reshape(-1, x.shape[-2], cols)
            pooled = seqs.float().mean(dim=1)  # (B, n); padding included (see the module docstring)
            queries = self.encoder(pooled).view(-1, self.slots, self.key_dim).transpose(0, 1)  # (heads, B, d_k)
            scores = torch.bmm(queries, self.keys.transpose(1, 2)) / self.temperature  # (heads, B, slots)
            attention = torch.softmax(scores, dim=-1).mean(dim=1)  # (heads, slots)
            return torch.sigmoid(self.scales) * attention

        def executed(self, alpha: torch.Tensor) -> torch.Tensor:
            """M_exec = gamma M0 + dM, where row block h of dM is sum_j alpha[h, j] P_j."""
            rows, cols = self.weight.shape
            programs = self.weight.reshape(self.slots, (rows // self.slots) * cols)  # slot j: row block j, flattened
            delta = torch.mm(alpha.to(self.weight.dtype), programs).view(rows, cols)
            return torch.sigmoid(self.gate).to(self.weight.dtype) * self.initial + delta

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return F.linear(x, self.weight, self.bias)
            factor = self.executed(self.routing(x))
            n_rows = 1 if x.dim() < 3 else math.prod(x.shape[:-2])
            with torch.no_grad():
                self._exec_sum.add_(factor.detach().float(), alpha=n_rows)
                self._exec_rows += n_rows
            return F.linear(x, factor, self.bias)

        @torch.no_grad()
        def consolidate(self) -> bool:
            """M <- (1 - lambda) M + lambda M_exec, M_exec being this step's executed factor; False if none ran."""
            if self._exec_rows == 0:
                return False
            executed = (self._exec_sum / self._exec_rows).to(self.weight.dtype)
            self.weight.mul_(1.0 - self.consolidation).add_(executed, alpha=self.consolidation)
            self._exec_sum.zero_()
            self._exec_rows = 0
            return True

        def extra_repr(self) -> str:
            rows, cols = self.weight.shape
            return (f"rows={rows}, cols={cols}, slots={self.slots}, key_dim={self.key_dim}, "
                    f"consolidation={self.consolidation}, temperature={self.temperature}")

    return ProCLLinear


def wrap_factor(linear: torch.nn.Linear, options: ProCLOptions) -> ProCLFactor:
    """One LoRA factor wrapped for a ProCL stage (draws its router from torch's global generator)."""
    module = factor_class()(linear, slots=options.slots, key_dim=options.key_dim,
                            consolidation=options.consolidation, temperature=options.temperature,
                            slot_scale_init=options.slot_scale_init)
    return cast(ProCLFactor, module)


def wrap_lora_factors(model: Any, options: ProCLOptions, where: str = "procl") -> list[ProCLFactor]:
    """Wrap ``lora_A`` and ``lora_B`` of the active adapter in every LoRA layer; all checked before any is wrapped."""
    import torch
    from peft.tuners.lora import LoraLayer

    n = options.slots
    planned: list[tuple[Any, str, torch.nn.Linear]] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            for side in ("lora_A", "lora_B"):
                container = getattr(layer, side)
                linear = container[adapter]
                if type(linear) is not torch.nn.Linear:
                    raise TrainingError(f"{where}: ProCL wraps Linear LoRA factors only, and {name}.{side} "
                                        f"is a {type(linear).__name__}")
                rows = linear.weight.shape[0]
                if rows % n == 0:
                    planned.append((container, adapter, linear))
                elif side == "lora_A":
                    raise TrainingError(
                        f"{where}: strategy.options.slots={n} must divide lora.rank={rows} ({name}): ProCL "
                        f"splits each LoRA factor into {n} equal row blocks; choose slots among the divisors "
                        "of the rank")
                else:
                    raise TrainingError(
                        f"{where}: strategy.options.slots={n} must divide the output size of every adapted "
                        f"layer, and {name} has {rows} (its lora_B is split into {n} equal row blocks)")
    wrapped = []
    for container, adapter, linear in planned:
        factor = wrap_factor(linear, options)
        factor.train(linear.training)  # a new module is in train mode: take the mode of the one it replaces
        container[adapter] = factor
        wrapped.append(factor)
    return wrapped


def unwrap_lora_factors(model: Any) -> int:
    """Put every wrapped factor's own Linear back (its weight is M); returns how many were wrapped."""
    import torch
    from peft.tuners.lora import LoraLayer

    cls = factor_class()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    count = 0
    for layer in layers:
        for container in (layer.lora_A, layer.lora_B):
            for adapter, module in list(container.items()):
                if isinstance(module, cls):
                    factor = cast(ProCLFactor, module)
                    linear = factor.original
                    if linear.weight is not factor.weight:  # someone swapped M: write it back
                        with torch.no_grad():
                            linear.weight.copy_(factor.weight)
                    container[adapter] = linear
                    count += 1
    return count


@STRATEGIES.register("procl")
class ProCL(StrategyBase):
    """Routed program slots over the LoRA factors from stage 2 on; a plain LoRA adapter in every checkpoint."""

    Options = ProCLOptions
    options: ProCLOptions

    def __init__(self, options: StrategyOptions | None = None) -> None:
        super().__init__(options)
        self.factors: list[ProCLFactor] = []

    def check_spec(self, lora: LoraSpec) -> list[tuple[str, str]]:
        if lora.rank % self.options.slots:
            return [("strategy.options.slots", f"{self.options.slots} slots must divide lora.rank={lora.rank}: "
                                               "each slot is an equal block of the factor's rows")]
        return []

    def on_stage_start(self, ctx: StageContext) -> None:
        # A stage that failed never reached on_stage_end, and left its wrappers in the resident model.
        unwrap_lora_factors(ctx.model)
        if ctx.stage < 2:
            return  # task 1 is plain LoRA, as in the authors' code
        self.factors = wrap_lora_factors(ctx.model, self.options,
                                         where=f"run {ctx.run_id} stage {ctx.stage}: strategy 'procl'")

    def after_step(self, ctx: StageContext) -> None:
        for factor in self.factors:
            factor.consolidate()

    def on_stage_end(self, ctx: StageContext) -> None:
        unwrap_lora_factors(ctx.model)
        self.factors = []

    def on_stage_abort(self, ctx: StageContext) -> None:
        """For a loop that calls it when a stage fails: leave a plain LoRA model behind."""
        self.on_stage_end(ctx)

    def export(self, ctx: StageContext) -> StrategyState:
        return StrategyState()  # the adapter is the whole state; the router is re-initialised each task
