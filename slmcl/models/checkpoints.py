"""Checkpoints of the two formats on one resident base: LoRA adapters of any shape, and merged models.

A resident ``PeftModel`` can hold several LoRA adapters side by side (PEFT's named adapters):
one per shape the experiment's strategies train (the spec's ``lora``, O-LoRA's stacked
rank-r·n adapter), created on first use and matched by shape when a checkpoint folder
arrives. A merged checkpoint (OSF) is a whole model folder; on the resident model it becomes
a set of *override* tensors (the weights that differ from the base), swapped into the base
layers only while that checkpoint is evaluated, so the base stays bit-exact for p_0 and the
base evaluation, and no second model is ever loaded to evaluate it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from slmcl.errors import ModelError
from slmcl.models.lora import write_folder
from slmcl.protocol.layout import ADAPTER_FILES, MERGED_FILES

ADAPTER_FORMAT, MERGED_FORMAT = "adapter", "merged"


def checkpoint_format(folder: str | Path) -> str:
    """Which format a local checkpoint folder holds, or ``ModelError`` naming what is missing."""
    folder = Path(folder)
    if all((folder / f).is_file() for f in ADAPTER_FILES):
        return ADAPTER_FORMAT
    if all((folder / f).is_file() for f in MERGED_FILES):
        return MERGED_FORMAT
    raise ModelError(f"checkpoint {folder}: neither a PEFT adapter ({', '.join(ADAPTER_FILES)}) "
                     f"nor a merged model folder ({', '.join(MERGED_FILES)})")


def shape_signature(config: Any) -> str:
    """What makes two LoRA adapters interchangeable for a weight swap (PEFT's resolved config)."""
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple, frozenset)) else str(targets)
    return json.dumps({"r": config.r, "alpha": float(config.lora_alpha), "targets": targets, "bias": config.bias,
                       "rank_pattern": config.rank_pattern or {}, "alpha_pattern": config.alpha_pattern or {}},
                      sort_keys=True)


def base_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """Plain-model parameter name -> the resident (LoRA-wrapped) model's name for it; LoRA weights left out."""
    names = {}
    for name, _ in model.named_parameters():
        if ".lora_" in name or name.startswith("lora_"):
            continue
        names[name.replace(".base_layer.", ".")] = name
    return names


def read_merged_overrides(folder: str | Path, resident: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a merged model folder that differ from the resident base's (resident names), kept
    in the folder's dtype (fp32 for OSF): they are the next stage's starting weights, and a bf16 copy
    would round most of a stage's small update away. ``swapped_weights`` casts them for evaluation.

    Every tensor of the folder must be one of the base's parameters with the same shape: a
    folder of another architecture is refused here, not half-applied.
    """
    from safetensors.torch import load_file

    names = base_parameter_names(resident)
    params = dict(resident.named_parameters())
    overrides: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        for name, tensor in load_file(str(shard)).items():
            target = names.get(name)
            if target is None:
                raise ModelError(f"checkpoint {folder}: weight {name!r} is not in the base model")
            param = params[target]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ModelError(f"checkpoint {folder}: weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the base's is {tuple(param.shape)}")
            tensor = tensor.to(param.device)
            if not torch.equal(tensor, param.detach().to(tensor.dtype)):
                overrides[target] = tensor
    return overrides


def dense_overrides(dense: torch.nn.Module, resident: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a trained plain model that differ from the resident base's (resident names), in the
    trained model's dtype (see ``read_merged_overrides``)."""
    names = base_parameter_names(resident)
    params = dict(resident.named_parameters())
    out = {}
    for name, tensor in dense.named_parameters():
        target = names.get(name)
        if target is None:
            continue
        param = params[target]
        t = tensor.detach().to(param.device)
        if not torch.equal(t, param.detach().to(t.dtype)):
            out[target] = t.clone()
    return out


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, overrides: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``overrides`` in place of the named parameters for the duration, in each parameter's dtype (the one
    dtype rule of every forward pass); the originals are put back."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for name, tensor in overrides.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            original = getattr(owner, attr)
            swapped.append((owner, attr, original))
            setattr(owner, attr, torch.nn.Parameter(tensor.to(original.dtype), requires_grad=False))
        yield
    finally:
        for owner, attr, original in reversed(swapped):
            setattr(owner, attr, original)


def save_merged(dense: Any, tokenizer: Any, out_dir: str | Path,
                extra: Callable[[Path], None] | None = None) -> Path:
    """A merged checkpoint: the plain model folder (+ tokenizer and ``extra`` files), renamed into place."""
    def write(tmp: Path) -> None:
        dense.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)

    return write_folder(out_dir, write)
