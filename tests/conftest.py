"""Shared fixtures: the TRACE data folder, a tiny random-weight Llama, specs on top of them.

Tests never download anything: the tiny model reuses the embedded SmolLM2 tokenizer
(converted once into the user cache) with random weights of a real architecture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "trace" / "llm-cl-500"


@pytest.fixture(scope="session", autouse=True)
def model_allowlist(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The services load local model folders only under SLMCL_MODEL_ALLOWLIST (docs/security.md): the tests
    build theirs under pytest's temporary root, allowed here for this process and the services it starts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLMCL_MODEL_ALLOWLIST", f"{tmp_path_factory.getbasetemp()},*")
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("SLMCL_DATA_DIR") or DEFAULT_DATA)
    if not (d / "FOMC" / "train.json").is_file():
        pytest.fail(f"TRACE data not found at {d}: set SLMCL_DATA_DIR (see README 'Data')")
    return d


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from slmcl.models.loading import embedded_model_dir

    return embedded_model_dir()


def build_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights and the SmolLM2 tokenizer (and chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_qwen(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A second architecture for several-model experiments: a 2-layer Qwen2 with the same tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_dir)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"), embedded_dir)


def tiny_spec_dict(model_dir: Path, data_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "data_dir": str(data_dir),
        "tasks": ["fomc", "numgluecm"],
        "seeds": [7],
        "training": {"max_examples": 6, "batch_size": 2, "grad_accum": 2, "lr": 1e-3},
        "evaluation": {"max_examples": 4, "max_new_tokens": 6, "batch_size": 4},
        "reference": {"max_examples": 6, "batch_size": 4},
        "device": "cpu",
        "output_dir": str(out),
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    return spec
