"""Loading the base model once: tokenizer, weights, device, dtype and the facts evaluation needs.

The base model is loaded once per process and stays resident: runs, seeds and
evaluations swap LoRA weights in place (``slmcl.models.lora``) instead of reloading it.
The embedded models (``embedded:...`` names) are read from their cached conversions (``slmcl.models.gguf``).

The names that lived here before the split (GGUF cache, LoRA helpers) are re-exported so
existing imports keep working; new code imports them from their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from slmcl.config.spec import ModelSpec
from slmcl.errors import ModelError
from slmcl.models.fingerprint import model_fingerprint
from slmcl.models.gguf import (  # noqa: F401 - re-exported for existing importers
    CACHE_ENV,
    EMBEDDED_GGUF,
    EMBEDDED_PACKAGE,
    cache_dir,
    embedded_gguf_path,
    embedded_model_dir,
    is_embedded,
)
from slmcl.models.lora import (  # noqa: F401 - re-exported for existing importers
    ADAPTER_NAME,
    adapter_state,
    attach_lora,
    load_adapter_weights,
    merged_adapter,
    reset_lora,
    save_adapter,
)

# End-of-turn markers of common chat templates: generation stops at any that is in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|eom_id|>")


def resolve_device(requested: str) -> torch.device:
    if requested.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(requested.partition(":")[2] or 0)
        if index >= count:
            raise ModelError(f"device: {requested!r} was asked for but torch sees {count} CUDA device(s)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    from slmcl.models.dtype import compute_dtype  # the one dtype rule of every mode

    return compute_dtype(requested, device)


@dataclass
class LoadedModel:
    """A resident base model, its tokenizer and the facts evaluation needs about them."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    name: str
    fingerprint: str
    stop_token_ids: list[int] = field(default_factory=list)
    special_tokens: list[str] = field(default_factory=list)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def model_source(spec: ModelSpec) -> str:
    """The folder or hub id transformers loads: an embedded model's cached conversion, else the name itself."""
    return str(embedded_model_dir(spec.name)) if is_embedded(spec.name) else spec.name


def quiet_transformers() -> None:
    """Our own progress display replaces the library's bars and known-harmless warnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_model(spec: ModelSpec, device: str = "auto") -> LoadedModel:
    """Load tokenizer and base model; raise ``ModelError`` with the cause in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    dev = resolve_device(device)
    dtype = resolve_dtype(spec.dtype, dev)
    source = model_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=spec.trust_remote_code, revision=spec.revision
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=spec.trust_remote_code, revision=spec.revision
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.name {spec.name!r}: cannot load ({first})") from exc
    return prepare_loaded(model, tokenizer, dev, name=spec.name, source=source)


def prepare_loaded(model: Any, tokenizer: Any, device: torch.device, *, name: str, source: str = "") -> LoadedModel:
    """Common set-up for a loaded (or test-built) model: padding, stop tokens, fingerprint."""
    tokenizer.padding_side = "left"  # generation and last-position scoring both need it
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"model {name!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.config.use_cache = True
    stop: list[int] = []

    def add(x: Any) -> None:
        if isinstance(x, (list, tuple)):
            for v in x:
                add(v)
        elif isinstance(x, int) and x >= 0 and x not in stop:
            stop.append(x)

    add(tokenizer.eos_token_id)
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab:
            add(vocab[tok])
    dtype = next(model.parameters()).dtype
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        name=name,
        fingerprint=model_fingerprint(model, name, source, dtype),
        stop_token_ids=stop,
        special_tokens=sorted(set(tokenizer.all_special_tokens) | {t for t in END_OF_TURN_TOKENS if t in vocab}),
    )
