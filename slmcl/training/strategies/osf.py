"""OSF: orthogonal subspace fine-tuning (Nayak et al., "Sculpting Subspaces"), through PEFT's OSF tuner.

Every target weight W (d_out x d_in, p = min(d_out, d_in)) of the previous stage's merged
model is split by an fp32 SVD into its top-k singular directions, frozen, and the other
p - k, trained; PEFT projects the gradients of the trainable factors off the frozen left and
right subspaces, so the stage cannot move ``U_h S_h V_h^T``. After the stage the update is
folded into dense weights (``merge_and_unload``) and the next stage decomposes *those*: a
direction a task learned may rank among the top k next time, which is how knowledge gets
protected over the sequence. The checkpoint is a plain model folder (format ``merged``).

Choices the paper leaves open, made here on purpose:

- Only the target matrices train; embeddings, norms and the output layer stay frozen, as
  PEFT does (the authors' code trains them unconstrained, and so unprotected).
- Rank schedules (``rank_schedule``), k always clipped to [1, p - 1]:
  ``progressive`` (default) k = floor((t - 1) p / n) at stage t of n, PEFT's advice for a
  known sequence. Stage 1 would preserve nothing, but PEFT refuses k = 0, so stage 1
  freezes the single top direction: a negligible constraint on a stage that has nothing of
  its own to protect yet, and one code path for every stage.
  ``uniform`` k = floor(preserve p). ``adaptive`` is the paper's rule, below.
- Adaptive importance of a matrix: I = mean over the previous task's non-padding tokens of
  cos(x, W x), with the previous stage's weights, bias left out. For d_out != d_in the two
  vectors live in spaces of different size; the smaller is embedded in the larger by zero
  padding (x's and y's first p coordinates are the shared ones), so the cosine is a true
  cosine, |I| <= 1, and a map that sends its input's energy into coordinates outside the
  shared ones counts as not preserving it (the authors' commented-out code instead drops
  the extra coordinates of both vectors, which can report 1 for such a map). Then
  r = mrr + (I / mean I)(trr - mrr), clipped to [mrr, 1 - 1/p], k = floor(r p). If the mean
  importance is not positive (cosines can be negative) the ratio means nothing, and every
  matrix gets r = trr. Stage 1 has no previous task: every matrix gets r = trr, the rule's
  mean, which also keeps a run from measuring the task it is about to learn.
- The previous task's rows are its first ``importance_rows`` training rows (as
  ``training.max_examples`` limits them): the method assumes those rows are kept.
- Adam rescales the projected gradient per coordinate, which leaks a little of every
  step into the frozen subspace; with ``reproject`` (default) the trainable factors are
  projected back onto the complement after every optimizer step, in fp32, so the frozen
  part is preserved to rounding. The factors are fp32 whatever the model's dtype (PEFT
  would round them to a bf16 weight's dtype, which breaks W = U S V^T before any step).
- k is computed with a 1e-9 slack before the floor so that, e.g., 0.57 x 100 is 57, not 56.

Precision of what is merged: a bf16 base would round each stage's merged update to bf16, and
with small learning rates most of it vanishes (SmolLM2-135M, 4 steps at lr 1e-5: 86% of the
entries' updates round away, and the rounding error also lands in the frozen subspace). So the
engine hands ``stage_model`` an fp32 copy and keeps the merged checkpoint in fp32 whatever the
device's dtype; only evaluation casts it to the dtype every forward pass uses.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from slmcl.errors import TrainingError
from slmcl.training.strategies import (
    STRATEGIES,
    CheckpointFormat,
    StageContext,
    StrategyBase,
    StrategyOptions,
    StrategyState,
    option_error,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER = "default"
ALL_LINEAR = "all-linear"
_IMPORTANCE_BATCH = 8  # rows per no-grad forward when measuring importance
_SLACK = 1e-9


@dataclass(frozen=True)
class OSFOptions(StrategyOptions):
    rank_schedule: Literal["progressive", "uniform", "adaptive"] = "progressive"
    preserve: float = 0.5  # uniform: fraction of min(d_out, d_in) frozen at every stage
    mrr: float = 0.1  # adaptive: the least retained fraction
    trr: float = 0.8  # adaptive: the mean retained fraction
    importance_rows: int = 128  # adaptive: previous-task rows the importance is measured on
    reproject: bool = True  # project the trainable factors back after every optimizer step
    target_modules: str | list[str] = ALL_LINEAR  # PEFT's syntax: a regex, or names matched as suffixes

    def validate(self) -> None:
        if not (math.isfinite(self.preserve) and 0 <= self.preserve < 1):
            raise option_error("preserve", f"must be in [0, 1), got {self.preserve}")
        if not (math.isfinite(self.mrr) and 0 <= self.mrr < 1):
            raise option_error("mrr", f"must be in [0, 1), got {self.mrr}")
        if not (math.isfinite(self.trr) and self.mrr <= self.trr < 1):
            raise option_error("trr", f"must be in [mrr, 1) = [{self.mrr}, 1), got {self.trr}")
        if self.importance_rows < 1:
            raise option_error("importance_rows", f"must be >= 1, got {self.importance_rows}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise option_error("target_modules", "must not be empty")
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as exc:
                    raise option_error("target_modules", f"not a regular expression ({exc})") from None
        elif not targets or any(not t for t in targets):
            raise option_error("target_modules", "must be a non-empty list of non-empty module names")


@STRATEGIES.register("osf")
class OSF(StrategyBase):
    Options = OSFOptions
    options: OSFOptions
    checkpoint: ClassVar[CheckpointFormat] = "merged"

    def __init__(self, options: StrategyOptions | None = None) -> None:
        super().__init__(options)
        self._model: Any = None
        self._layers: dict[str, Any] = {}  # module name -> PEFT OSF layer
        self.preserved: dict[str, int] = {}
        self.min_dim: dict[str, int] = {}
        self.importance: dict[str, float] | None = None

    # -- the stage's model ----------------------------------------------------------------

    def stage_model(self, ctx: StageContext, base: Any) -> Any:
        """Decompose ``base``'s target weights (the previous stage's merged ones) and wrap them for training."""
        import torch
        from peft import OSFConfig, get_peft_model

        shapes = target_shapes(base, self.options.target_modules)
        if not shapes:
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': target_modules="
                                f"{self.options.target_modules!r} matches no linear layer of the model")
        narrow = [n for n, (o, i) in shapes.items() if min(o, i) < 2]
        if narrow:
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': {narrow[0]} has min(d_out, d_in)"
                                " < 2, so no split leaves both a frozen and a trainable direction; leave it out "
                                "of target_modules")
        self.min_dim = {n: min(s) for n, s in shapes.items()}
        t0 = time.perf_counter()
        self.importance = None
        if self.options.rank_schedule == "adaptive" and ctx.stage > 1:
            self.importance = self._previous_task_importance(ctx, base, list(shapes))
        self.preserved = self._ranks(ctx)
        t1 = time.perf_counter()

        # fp32 factors: PEFT decomposes the weight in its own dtype's precision and stores the
        # factors in it, so a bf16 weight is upcast for the SVD and put back (bit-exact) after.
        linears = {n: base.get_submodule(n) for n in shapes}
        restore = {n: m.weight.dtype for n, m in linears.items() if m.weight.dtype != torch.float32}
        for n in restore:
            linears[n].to(torch.float32)
        config = OSFConfig(
            target_modules=list(shapes),  # full names: PEFT matches a name as a suffix, so each finds itself
            effective_rank=1,  # every module has its own pattern below; ints only (1.0 would freeze all)
            rank_pattern={f"^{re.escape(n)}$": int(k) for n, k in self.preserved.items()},  # anchored: first match wins
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
        for n, dtype in restore.items():
            linears[n].to(dtype)
        self._layers = osf_layers(model)
        if set(self._layers) != set(shapes):
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': PEFT wrapped "
                                f"{sorted(set(self._layers) ^ set(shapes))[:3]} unlike the targets resolved here")
        for n, layer in self._layers.items():
            if layer.effective_rank[ADAPTER] != self.preserved[n]:
                raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': PEFT froze rank "
                                    f"{layer.effective_rank[ADAPTER]} of {n}, not {self.preserved[n]}")
        log.info("osf stage %d: %d matrices, importance %.2fs, SVD %.2fs", ctx.stage, len(shapes), t1 - t0,
                 time.perf_counter() - t1)
        self._model = model
        return model

    def merged_model(self, ctx: StageContext, model: Any) -> Any:
        """Fold the trained factors into dense weights; ``unload()`` would drop them (PEFT's own example does)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        try:
            dense = model.merge_and_unload(safe_merge=True)
        except ValueError as exc:  # PEFT's NaN check
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': {exc}") from None
        left = [n for n, m in dense.named_modules() if isinstance(m, BaseTunerLayer)]
        if left or any("osf_" in n for n, _ in dense.named_parameters()):
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': the merged model still "
                                f"holds OSF layers ({left[:3]})")
        dense.eval()
        return dense

    # -- hooks ------------------------------------------------------------------------------

    def on_stage_start(self, ctx: StageContext) -> None:
        if self._model is None:
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf' trains the model its "
                                "stage_model returned, and it was not called")
        if ctx.model is not self._model:
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': the stage trains another "
                                "model than the one stage_model returned")

    def after_step(self, ctx: StageContext) -> None:
        if self.options.reproject:
            reproject(self._layers)

    def export(self, ctx: StageContext) -> StrategyState:
        meta: dict[str, Any] = {
            "stage": ctx.stage,
            "rank_schedule": self.options.rank_schedule,
            "preserved": dict(self.preserved),
            "min_dim": dict(self.min_dim),
            # Health: the largest share of a trainable factor inside its frozen subspace (~1e-7 with reproject).
            "max_leak": max(leakage(self._layers).values(), default=0.0),
        }
        if self.importance is not None:
            meta["importance"] = dict(self.importance)
            # <= 0: the rule fell back to trr everywhere (per-matrix cosines of a real LLM average about 0)
            meta["importance_mean"] = sum(self.importance.values()) / len(self.importance)
        return StrategyState(meta=meta)

    # -- ranks ------------------------------------------------------------------------------

    def _ranks(self, ctx: StageContext) -> dict[str, int]:
        o = self.options
        if o.rank_schedule == "progressive":
            if ctx.n_stages < ctx.stage:
                raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf': the progressive schedule "
                                    f"needs the run's number of stages, got n_stages={ctx.n_stages}")
            return {n: progressive_rank(p, ctx.stage, ctx.n_stages) for n, p in self.min_dim.items()}
        if o.rank_schedule == "uniform":
            return {n: _clip_rank(math.floor(o.preserve * p + _SLACK), p) for n, p in self.min_dim.items()}
        if self.importance is None:  # stage 1: the rule's mean
            return {n: _clip_rank(math.floor(min(o.trr, 1 - 1 / p) * p + _SLACK), p) for n, p in self.min_dim.items()}
        return adaptive_ranks(self.importance, self.min_dim, o.mrr, o.trr)

    def _previous_task_importance(self, ctx: StageContext, base: Any, names: list[str]) -> dict[str, float]:
        previous = ctx.previous_tasks[-1] if ctx.previous_tasks else ""
        rows = ctx.task_examples(previous)[: self.options.importance_rows] if previous else []
        ids = [r for r in ctx.encode(rows) if r] if rows else []
        if not ids:
            raise TrainingError(f"run {ctx.run_id} stage {ctx.stage}: strategy 'osf' (adaptive) needs training rows "
                                f"of the previous task {previous!r} to measure layer importance, got none")
        return layer_importance(base, names, ids)


# -- the rules, as functions the tests call directly ----------------------------------------------


def _clip_rank(k: int, p: int) -> int:
    return max(1, min(p - 1, k))


def progressive_rank(p: int, stage: int, n_stages: int) -> int:
    """floor((stage - 1) p / n), in integers, clipped to [1, p - 1] (PEFT refuses 0)."""
    return _clip_rank(((stage - 1) * p) // n_stages, p)


def adaptive_ranks(importance: Mapping[str, float], min_dim: Mapping[str, int], mrr: float,
                   trr: float) -> dict[str, int]:
    """The paper's rule: r = mrr + (I / mean I)(trr - mrr) clipped to [mrr, 1 - 1/p], k = floor(r p)."""
    mean = sum(importance.values()) / len(importance) if importance else 0.0
    ranks = {}
    for name, p in min_dim.items():
        rel = importance[name] / mean if mean > 0 else 1.0
        r = min(max(mrr + rel * (trr - mrr), mrr), 1 - 1 / p)
        ranks[name] = _clip_rank(math.floor(r * p + _SLACK), p)
    return ranks


def target_shapes(model: Any, targets: str | Sequence[str]) -> dict[str, tuple[int, int]]:
    """The ``nn.Linear`` layers OSF adapts, as PEFT matches ``target_modules``, with their (d_out, d_in).

    ``all-linear`` leaves out the output layer (as PEFT does: it is often tied to the embeddings,
    and its vocabulary-wide matrix is no place to protect a subspace); naming it is refused.
    """
    import torch

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if isinstance(targets, str):
            hit = targets == ALL_LINEAR or re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if not hit:
            continue
        if module is out:
            if targets == ALL_LINEAR:
                continue
            raise TrainingError(f"strategy 'osf': target_modules names the output layer {name!r}, which OSF does "
                                "not adapt (it may be tied to the input embeddings)")
        d_out, d_in = module.weight.shape
        shapes[name] = (int(d_out), int(d_in))
    return shapes


def layer_importance(model: Any, names: Sequence[str], ids: Sequence[Sequence[int]]) -> dict[str, float]:
    """Mean over the rows' tokens of cos(x, W x) per named linear layer (zero-padded when d_out != d_in).

    Tokens where x or W x is the zero vector have no cosine and are left out of the mean.
    """
    import inspect

    import torch

    device = next(model.parameters()).device
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    keep: dict[str, torch.Tensor] = {}  # the current batch's non-padding positions, flattened

    def hook(name: str, module: torch.nn.Linear) -> Any:
        def fn(_: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            sel = keep["mask"]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[sel].float()
            y = output.reshape(-1, output.shape[-1])[sel].float()
            if module.bias is not None:
                y = y - module.bias.float()
            p = min(x.shape[-1], y.shape[-1])
            num = (x[:, :p] * y[:, :p]).sum(-1)
            den = x.norm(dim=-1) * y.norm(dim=-1)
            ok = den > 0  # a zero vector has no direction (a padding-index embedding, a dead unit): not counted
            sums[name] += float((num[ok] / den[ok]).double().sum())
            counts[name] += int(ok.sum())
        return fn

    handles = []
    for n in names:
        module = model.get_submodule(n)
        handles.append(module.register_forward_hook(hook(n, module)))
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    try:
        with torch.no_grad():
            for start in range(0, len(order), _IMPORTANCE_BATCH):
                batch = [ids[i] for i in order[start: start + _IMPORTANCE_BATCH]]
                width = max(len(r) for r in batch)
                x = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, row in enumerate(batch):
                    x[r, : len(row)] = torch.tensor(row)
                    mask[r, : len(row)] = 1
                keep["mask"] = mask.reshape(-1).bool().to(device)
                extra = {"logits_to_keep": 1} if keep_logits else {}
                model(input_ids=x.to(device), attention_mask=mask.to(device), **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: sums[n] / counts[n] if counts[n] else 0.0 for n in names}


# -- the PEFT layers --------------------------------------------------------------------------------


def osf_layers(model: Any) -> dict[str, Any]:
    """PEFT's OSF layers of a wrapped model, by the name of the linear layer they wrap in the base."""
    from peft.tuners.osf import OSFLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n: m for n, m in base.named_modules() if isinstance(m, OSFLayer)}


def _frozen_complement(layer: Any) -> tuple[Any, Any]:
    """Functions that remove the frozen-subspace part of U_low's columns and of V_low's rows.

    PEFT keeps U_high (V_high) only when the factor is not square; for a square one the
    complement of the frozen subspace is exactly spanned by the initial trainable factor,
    so projecting onto that span is the same map with a smaller matrix.
    """
    try:
        u_high, v_high = layer._osf_U_high, layer._osf_V_high
        u_init, v_init = layer._osf_U_low_init[ADAPTER], layer._osf_V_low_init[ADAPTER]
    except (AttributeError, KeyError):
        raise TrainingError("strategy 'osf': this PEFT's OSF layer does not keep the frozen subspace where this "
                            "strategy reads it (peft 0.21 layout)") from None

    def off_u(u: torch.Tensor) -> torch.Tensor:
        if ADAPTER in u_high:
            h = u_high[ADAPTER]
            return u - h @ (h.T @ u)
        return u_init @ (u_init.T @ u)

    def off_v(v: torch.Tensor) -> torch.Tensor:
        if ADAPTER in v_high:
            h = v_high[ADAPTER]
            return v - (v @ h.T) @ h
        return (v @ v_init.T) @ v_init

    return off_u, off_v


def reproject(layers: Mapping[str, Any]) -> None:
    """Put every trainable factor back into the complement of its frozen subspace (fp32, in place)."""
    import torch

    with torch.no_grad():
        for layer in layers.values():
            params = layer.osf_svd_params[ADAPTER]
            off_u, off_v = _frozen_complement(layer)
            params["U_low"].copy_(off_u(params["U_low"]))
            params["V_low"].copy_(off_v(params["V_low"]))


def leakage(layers: Mapping[str, Any]) -> dict[str, float]:
    """Per layer, the larger of ||P_h U_low|| / ||U_low|| and ||V_low P_h|| / ||V_low|| (0 = exactly orthogonal)."""
    import torch

    out: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            params = layer.osf_svd_params[ADAPTER]
            off_u, off_v = _frozen_complement(layer)
            u, v = params["U_low"], params["V_low"]
            lu = (u - off_u(u)).norm() / u.norm().clamp_min(1e-30)
            lv = (v - off_v(v)).norm() / v.norm().clamp_min(1e-30)
            out[name] = float(torch.maximum(lu, lv))
    return out
