"""The LoRA adapter on the resident base: attach once, re-initialise, save, load and fold in.

One cumulative adapter per run rides on a base model that is loaded once per process and
stays frozen and shared: a new run re-initialises the adapter's weights in place and a
checkpoint swaps them in, so nothing ever reloads the base.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slmcl.config.spec import LoraSpec
from slmcl.errors import ModelError
from slmcl.training.dropout import install_lora_dropout

if TYPE_CHECKING:
    from slmcl.models.loading import LoadedModel

ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(lora: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int, used as a float (alpha / r)
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def attach_lora(loaded: LoadedModel, lora: LoraSpec) -> Any:
    """Wrap the base model with a LoRA adapter; the base stays shared and frozen."""
    from peft import get_peft_model

    peft_model = get_peft_model(loaded.model, lora_config(lora))
    install_lora_dropout(peft_model)
    peft_model.eval()
    return peft_model


def add_lora(peft_model: Any, name: str, config: Any) -> None:
    """Another adapter beside the first (another shape), inactive until selected."""
    peft_model.add_adapter(name, config)
    install_lora_dropout(peft_model)
    peft_model.eval()


def reset_lora(peft_model: Any, seed: int, adapter: str = ADAPTER_NAME) -> None:
    """Fresh LoRA weights for a new run, deterministic in the seed (no base reload)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            module.reset_lora_parameters(adapter, init_lora_weights=True)


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_weights(peft_model: Any, adapter_dir: str | Path, adapter: str = ADAPTER_NAME) -> None:
    """Swap a saved adapter's weights into the resident model (same LoRA shape required)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ModelError(f"adapter not found: {path}")
    state = load_file(str(path), device=str(next(peft_model.parameters()).device))
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter {adapter_dir}: weights that fit no LoRA layer: {unexpected[:3]}")


def save_adapter(peft_model: Any, out_dir: str | Path, extra: Callable[[Path], None] | None = None,
                 adapter: str = ADAPTER_NAME) -> Path:
    """Save in PEFT format (adapter_config.json + adapter_model.safetensors), atomically.

    ``extra`` writes more files into the folder before it is renamed into place (a
    strategy's state), so a reader never sees an adapter without the files that belong to it.
    """

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter])
        if adapter != ADAPTER_NAME:  # PEFT writes a named adapter into a subfolder of that name
            for f in (tmp / adapter).iterdir():
                f.rename(tmp / f.name)
            (tmp / adapter).rmdir()
        if extra is not None:
            extra(tmp)

    return write_folder(out_dir, write)


def write_folder(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """``write`` fills a temporary sibling folder, which then replaces ``out_dir`` by one rename: a reader
    sees the old checkpoint folder or the whole new one, never half of it."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def merged_adapter(peft_model: Any) -> Iterator[Any]:
    """The adapted model with each LoRA delta folded into a copy of its base weight.

    Generation with the adapter unmerged pays two extra small matmuls (and their dispatch)
    in every adapted linear layer at every decode step; folded in, a step is a plain base
    forward (~10-15 % faster on a CPU). The base weights are never written: each adapted
    layer gets a new merged tensor for the duration, and the original tensors are put back
    afterwards, so the resident base stays bit-exact for p_0 and base evaluation (PEFT's
    merge/unmerge would add and subtract the delta, leaving rounding residue). Costs a
    transient copy of the adapted weights. Models with LoRA layers other than ``Linear``
    are yielded unmerged.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers: list[Any] = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]  # PEFT's layers: untyped API
    if not layers or any(type(m) is not LoraLinear or m.merged for m in layers):
        yield peft_model
        return
    swapped: list[tuple[Any, torch.nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if not active:
                    continue
                base = layer.get_base_layer()
                original = base.weight
                merged = original.detach().clone()
                for name in active:
                    merged += layer.get_delta_weight(name).to(merged.dtype)
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
                swapped.append((base, original))
        with peft_model.disable_adapter():
            yield peft_model
    finally:
        for base, original in swapped:
            base.weight = original
