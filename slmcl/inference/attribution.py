"""Where a checkpoint's drift comes from, read off its weights: per module and per transformer block.

For every adapted linear layer the accumulated update ΔW (a LoRA adapter's ``scaling · B @ A``,
or a merged checkpoint's override minus the base weight) is compared with its frozen base W:

- ``relative_norm`` ‖ΔW‖_F / ‖W‖_F: how far the layer moved, on the scale of the layer itself.
- ``effective_rank`` of ΔW (Roy & Vetterli 2007): exp of the Shannon entropy of σ_i / Σσ, so r
  equal singular values give r and one dominant direction gives ~1; 0 for no update.
- ``intruders`` (Shuttleworth et al. 2024, arXiv:2410.21228): how many of the top-k left singular
  vectors of W + ΔW resemble no left singular vector of W (max |cos| below a threshold). LoRA's
  forgetting concentrates in such new high-ranking directions; a full-rank update mostly rotates
  and rescales existing ones.

The base never changes within a process, so W's singular vectors are computed once per module
and cached by the caller (``svd_cache``); every later stage costs one symmetric eigensolve of
the updated layer's Gram matrix per module. A leave-one-layer-out pass then says how much of
the measured drift (KL on the reference set) each block's update is responsible for; it costs
one forward pass per layer and is optional.

Nothing here writes a weight: the base tensors are read, never modified, and the one context
manager that changes state (``lora_layer_disabled``) restores it exactly.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

TOP_K = 10
THRESHOLD = 0.5
# W's singular vectors are compared with a threshold of 0.5 on |cos|; half precision rounds a cosine by
# ~1e-3, and halves the cache (about 340 MB in float32 for SmolLM2-135M's 210 linear layers).
CACHE_DTYPE = torch.float16

# The block containers of common decoder families: Llama/Mistral/Qwen ``layers``, GPT-2/Falcon ``h``,
# BERT-style ``layer``, and ``blocks``. The index must be a whole dotted component.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")
_PEFT_PREFIX = "base_model.model."

STAT_KEYS = ("delta_norm", "base_norm", "relative_norm", "effective_rank", "intruders")
ROW_KEYS = ("scope", "name", "layer", "module", *STAT_KEYS)


def layer_of(name: str) -> int | None:
    """The transformer block index in a parameter or module name; None outside the blocks (embeddings, head)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def module_path(name: str) -> str:
    """A parameter or module name as the plain model spells the module: no PEFT wrapper prefix, no
    ``.base_layer``, no trailing ``.weight`` (so a LoRA row and a merged row of one layer share a name)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    name = name.replace(".base_layer", "")
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _module_within_block(path: str) -> str:
    m = _BLOCK.search(path)
    return path[m.end() + 1:] if m else path


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no truth value, so compare by identity
class ModuleUpdate:
    """One linear layer's accumulated update beside its base weight, both [out, in]."""

    name: str
    layer: int | None
    module: str
    base: torch.Tensor
    delta: torch.Tensor
    # LoRA's factors (scaling · B [out, r], A [r, in]) when known: the effective rank is then read off an
    # r x r core instead of a full spectrum of ΔW.
    factors: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, name: str, base: torch.Tensor, delta: torch.Tensor,
           factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleUpdate:
        path = module_path(name)
        return cls(name=path, layer=layer_of(path), module=_module_within_block(path), base=base,
                   delta=delta, factors=factors)


# -- reading updates off a model ----------------------------------------------------------------------

def _lora_linears(peft_model: torch.nn.Module, adapter: str) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora.layer import Linear as LoraLinear

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            yield name, module


def lora_updates(peft_model: torch.nn.Module, adapter: str) -> list[ModuleUpdate]:
    """ΔW = scaling · B @ A of every LoRA-wrapped Linear that carries ``adapter`` (others are skipped,
    so a model holding one adapter per shape yields only this one's layers).

    The base is the wrapped layer's own weight tensor (no copy); with ``fan_in_fan_out`` (GPT-2's
    Conv1D stores [in, out]) it is read transposed, so W and ΔW are both [out, in]. DoRA and other
    LoRA variants rescale W itself, so their update is not B @ A: they are refused rather than
    misreported. A layer PEFT has merged in place holds W + ΔW in its "base" weight and is refused too.
    """
    out = []
    for name, module in _lora_linears(peft_model, adapter):
        if adapter in getattr(module, "lora_variant", {}) or module.use_dora.get(adapter, False):
            raise ValueError(f"{name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); its update is not B @ A")
        if adapter in module.merged_adapters:
            raise ValueError(f"{name}: adapter {adapter!r} is merged into the base weight; unmerge it first")
        base = module.get_base_layer().weight.detach()
        if module.fan_in_fan_out:
            base = base.T
        with torch.no_grad():
            a = module.lora_A[adapter].weight.detach().to(base.device, torch.float32)
            b = module.lora_B[adapter].weight.detach().to(base.device, torch.float32) * float(module.scaling[adapter])
            delta = b @ a
        out.append(ModuleUpdate.of(name, base, delta, factors=(b, a)))
    return out


def override_updates(overrides: Mapping[str, torch.Tensor], resident: torch.nn.Module) -> list[ModuleUpdate]:
    """ΔW = override − base of a merged checkpoint, per Linear weight (``overrides`` keyed by the resident
    model's parameter names, as ``read_merged_overrides`` and ``dense_overrides`` give them).

    Only 2-D weights of ``nn.Linear`` layers: biases and norms have no spectrum, and an embedding's
    rows are tokens, not a linear map's outputs (its SVD would be vocabulary-sized for nothing that
    OSF or LoRA ever trains). A name the resident model lacks is a ``KeyError``, not a skipped row.
    """
    params = dict(resident.named_parameters())
    out = []
    for name in sorted(overrides):
        if name not in params:
            raise KeyError(f"override {name!r} is not a parameter of the resident model")
        owner_name, _, attr = name.rpartition(".")
        owner = resident.get_submodule(owner_name)
        base = params[name].detach()
        if attr != "weight" or not isinstance(owner, torch.nn.Linear) or base.dim() != 2:
            continue
        tensor = overrides[name]
        if tuple(tensor.shape) != tuple(base.shape):
            raise ValueError(f"override {name!r} has shape {tuple(tensor.shape)}, the base's is {tuple(base.shape)}")
        with torch.no_grad():
            delta = tensor.detach().to(base.device, torch.float32) - base.float()
        out.append(ModuleUpdate.of(name, base, delta))
    return out


# -- the statistics ---------------------------------------------------------------------------------

def _rank_tolerance(sigma_max: float, shape: Sequence[int]) -> float:
    """Singular values at or below this are zero: the usual numerical-rank cut (as NumPy's matrix_rank),
    with float32's epsilon because no weight here is stored more precisely than that."""
    return sigma_max * max(shape) * torch.finfo(torch.float32).eps


def _gram_eig(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigen-decomposition of the smaller Gram matrix of ``m``, largest first: (σ², vectors, tall).

    A symmetric eigensolve of the min(out, in)-sized Gram matrix is 2-4x faster than a full SVD on a
    CPU (SmolLM2's 1536 x 576: 33 ms against 92 ms on 2 cores). ``tall``: the vectors are right
    singular vectors (out > in), to be mapped to the left ones.
    """
    tall = m.shape[0] > m.shape[1]
    gram = m.T @ m if tall else m @ m.T
    eigvals, eigvecs = torch.linalg.eigh(gram)
    return eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1), tall


def _left_vectors(m: torch.Tensor, k: int | None) -> torch.Tensor:
    """The left singular vectors of ``m`` with nonzero singular value, largest first (at most ``k``)."""
    lam, vecs, tall = _gram_eig(m)
    sigma = lam.sqrt()
    keep = int((sigma > _rank_tolerance(float(sigma[0]), m.shape)).sum()) if sigma.numel() else 0
    if k is not None:
        keep = min(keep, k)
    if not tall:
        return vecs[:, :keep]
    return (m @ vecs[:, :keep]) / sigma[:keep]


def base_left_singular_vectors(base: torch.Tensor) -> torch.Tensor:
    """Every left singular vector of W with a nonzero singular value, [out, rank], float32, on W's device.

    Computed in float64 (through the Gram matrix): all of them are compared against, including the
    smallest, whose directions a float32 Gram matrix would blur. Vectors of zero singular values are
    left out: they are an arbitrary basis of W's left null space, and matching against them would
    make the intruder count depend on that arbitrary choice. The base never changes, so a caller
    computes this once per module and passes it as ``update_stats(base_svd=...)``.
    """
    with torch.no_grad():
        return _left_vectors(base.detach().double(), None).float()


def _effective_rank(sigma: torch.Tensor, shape: Sequence[int]) -> float:
    if sigma.numel() == 0 or float(sigma.max()) == 0.0:
        return 0.0
    sigma = sigma[sigma > _rank_tolerance(float(sigma.max()), shape)].double()
    p = sigma / sigma.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _update_singular_values(delta: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """ΔW's singular values: from the r x r core of B A (QR of B and Aᵀ) when the factors are known,
    else from ΔW's float64 Gram matrix (exact to ~1e-8 of the largest, far below the rank cut)."""
    if factors is not None:
        b, a = (f.detach().double() for f in factors)
        core = torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T
        return torch.linalg.svdvals(core)
    d = delta.double()
    gram = d.T @ d if d.shape[0] > d.shape[1] else d @ d.T
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt()


def update_stats(
    base: torch.Tensor,
    delta: torch.Tensor,
    *,
    top_k: int = TOP_K,
    threshold: float = THRESHOLD,
    base_svd: torch.Tensor | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Size, spread and novelty of one layer's update ΔW on its base W (both [out, in]).

    ``base_svd``: W's left singular vectors from ``base_left_singular_vectors`` (any float dtype),
    computed here when not given. ``factors``: (scaling · B, A) of a LoRA update, for its rank.
    Singular values of ΔW at or below the numerical-rank cut count as zero in the effective rank, so a
    rank-r update reads r, not r plus rounding noise.
    The top-k left singular vectors of W + ΔW come from a float32 Gram eigensolve: they lead the
    spectrum, where it is well separated, and are compared at a coarse |cos| threshold. A zero
    update has no intruders by definition (W + ΔW is W), so nothing is decomposed for it.
    """
    with torch.no_grad():
        w = base.detach().float()
        d = delta.detach().to(w.device, torch.float32)
        if d.shape != w.shape:
            raise ValueError(f"update of shape {tuple(d.shape)} on a weight of shape {tuple(w.shape)}")
        delta_norm = float(torch.linalg.vector_norm(d, dtype=torch.float64))
        base_norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
        if base_norm > 0.0:
            relative = delta_norm / base_norm
        else:
            relative = math.inf if delta_norm > 0.0 else 0.0
        if delta_norm == 0.0:
            return {"delta_norm": 0.0, "base_norm": base_norm, "relative_norm": 0.0, "effective_rank": 0.0,
                    "intruders": 0}
        erank = _effective_rank(_update_singular_values(d, factors), d.shape)
        u0 = base_left_singular_vectors(w) if base_svd is None else base_svd.to(w.device, torch.float32)
        top = _left_vectors(w + d, top_k)
        best = (u0.T @ top).abs().amax(dim=0) if u0.numel() else torch.zeros(top.shape[1], device=w.device)
        intruders = int((best < threshold).sum())
    return {"delta_norm": delta_norm, "base_norm": base_norm, "relative_norm": relative,
            "effective_rank": erank, "intruders": intruders}


def _order(row: Mapping[str, Any]) -> tuple[bool, int, str, str]:
    layer = row["layer"]
    return (layer is None, -1 if layer is None else int(layer), str(row["module"]), str(row["name"]))


def attribution_rows(
    updates: Sequence[ModuleUpdate],
    *,
    top_k: int = TOP_K,
    threshold: float = THRESHOLD,
    svd_cache: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """One ``scope="module"`` row per update and one ``scope="layer"`` row per transformer block.

    A layer row pools its modules: relative_norm = sqrt(Σ‖ΔW‖²) / sqrt(Σ‖W‖²) (the whole block as one
    parameter vector, so a large module is not averaged away by small ones), effective_rank = mean of
    its modules', intruders = their sum; its ``name`` is the block's path, its ``module`` is "".
    Rows are sorted by (layer, module): each block's row comes just before its modules' rows, and
    modules outside the blocks (layer None) come last. Every row has the keys ``ROW_KEYS``.

    ``svd_cache`` maps module names to W's left singular vectors; missing ones are computed and
    added (stored as ``CACHE_DTYPE``, and used in that precision on the first call too, so a
    cached and an uncached call give the same rows).
    """
    cache: dict[str, torch.Tensor] = {} if svd_cache is None else svd_cache
    rows: list[dict[str, Any]] = []
    layers: dict[int, list[tuple[ModuleUpdate, dict[str, float]]]] = {}
    for u in updates:
        u0 = cache.get(u.name)
        if u0 is None:
            u0 = base_left_singular_vectors(u.base).to(CACHE_DTYPE)
            cache[u.name] = u0
        stats = update_stats(u.base, u.delta, top_k=top_k, threshold=threshold, base_svd=u0, factors=u.factors)
        rows.append({"scope": "module", "name": u.name, "layer": u.layer, "module": u.module, **stats})
        if u.layer is not None:
            layers.setdefault(u.layer, []).append((u, stats))
    for layer, members in layers.items():
        delta_norm = math.sqrt(sum(s["delta_norm"] ** 2 for _, s in members))
        base_norm = math.sqrt(sum(s["base_norm"] ** 2 for _, s in members))
        relative = delta_norm / base_norm if base_norm > 0.0 else (math.inf if delta_norm > 0.0 else 0.0)
        first = members[0][0]
        block = first.name[: -len(first.module) - 1] if first.module else first.name
        rows.append({
            "scope": "layer", "name": block, "layer": layer, "module": "",
            "delta_norm": delta_norm, "base_norm": base_norm, "relative_norm": relative,
            "effective_rank": sum(s["effective_rank"] for _, s in members) / len(members),
            "intruders": sum(int(s["intruders"]) for _, s in members),
        })
    return sorted(rows, key=_order)


def top_layers(rows: Sequence[Mapping[str, Any]], n: int = 3, key: str = "relative_norm") -> list[dict[str, Any]]:
    """The ``n`` layer rows with the largest ``key`` (ties: lower layer first; NaN never leads)."""
    layer_rows = [dict(r) for r in rows if r.get("scope") == "layer"]

    def rank(r: Mapping[str, Any]) -> tuple[bool, float, int]:
        v = float(r[key])
        return (math.isnan(v), -v if not math.isnan(v) else 0.0, int(r["layer"]))

    return sorted(layer_rows, key=rank)[:n]


# -- leave one layer out ----------------------------------------------------------------------------

def lora_layers(peft_model: torch.nn.Module, adapter: str) -> list[int]:
    """The block indices where ``adapter`` has LoRA layers (what ``leave_one_layer_out`` iterates)."""
    return sorted({i for name, _ in _lora_linears(peft_model, adapter) if (i := layer_of(name)) is not None})


@contextlib.contextmanager
def lora_layer_disabled(peft_model: torch.nn.Module, adapter: str, layer: int) -> Iterator[None]:
    """``adapter``'s LoRA scaling set to 0 in every layer of block ``layer`` for the duration: that block
    computes with its base weights, the others keep their updates. The original scaling values are put
    back exactly afterwards, on an exception too.

    Acts on the unmerged forward (``lora_B(lora_A(x)) * scaling``): a layer PEFT has merged, or the
    engine's ``merged_adapter`` copies, would ignore it, so merged layers are refused.
    """
    from peft.tuners.lora import LoraLayer

    saved: list[tuple[Any, Any]] = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling and layer_of(name) == layer:
            if adapter in module.merged_adapters:
                raise ValueError(f"{name}: adapter {adapter!r} is merged; scaling it would change nothing")
            saved.append((module, module.scaling[adapter]))
    if not saved:
        raise ValueError(f"adapter {adapter!r} has no LoRA layer in block {layer}")
    try:
        for module, _ in saved:
            module.scaling[adapter] = 0.0
        yield
    finally:
        for module, value in saved:
            module.scaling[adapter] = value


def leave_one_layer_out(
    kl: Callable[[], float | None],
    layers: Sequence[int],
    disabled: Callable[[int], AbstractContextManager[Any]],
) -> dict[int, float]:
    """Share of the full drift removed when one layer's update is disabled: (KL_full − KL_without) / KL_full.

    ``kl()`` measures the drift of the model as it currently computes; ``disabled(layer)`` is a context
    in which that layer's update is absent (``lora_layer_disabled`` for an adapter; for a merged
    checkpoint, the overrides with that layer's entries put back to the base). One ``kl()`` for the
    full model, then one per layer.

    A share is at most 1 (KL is never negative) but may be negative: removing a layer's update can
    increase the drift when layers partly cancel. Shares need not sum to 1, as layers interact. When
    KL_full is 0 (no drift, nothing to attribute; also a tiny negative rounding) every share is 0.0,
    and when it is None or not finite every share is NaN; in both cases no per-layer pass is run.
    A layer whose own KL is None or not finite gets NaN.
    """
    full = kl()
    if full is None or not math.isfinite(full):
        return {layer: math.nan for layer in layers}
    if full <= 0.0:
        return {layer: 0.0 for layer in layers}
    shares: dict[int, float] = {}
    for layer in layers:
        with disabled(layer):
            without = kl()
        shares[layer] = math.nan if without is None or not math.isfinite(without) else (full - without) / full
    return shares
