"""Parity gate of the benchmark: our fast paths compute what the naive baseline computes.

The benchmark (``bench/run_bench.py``) times slmcl against ``bench/naive.py`` (the study's way:
HF ``generate`` at batch 4, a second adapter-disabled forward for KL, micro-batch 2 x
accumulation 8 with HF's loss and gradient checkpointing). Its ratios mean something only if
both sides produce the same results, so this file holds them to it on the tiny random model
(fast) and, with very few rows, on the embedded SmolLM2:

* same generated tokens, hence the same extracted answers and accuracies;
* the same stability numbers (within 1e-4), with one forward per reference row per
  checkpoint on our side and two on the naive side;
* the same per-step training loss (within 1e-3 relative, LoRA dropout 0);
* an adapter that is silently ignored (outputs equal to the base's) fails.

No timing here: speed lives in the benchmark, never in pass/fail tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench import naive
from slmcl.config.spec import ModelSpec, spec_from_dict
from slmcl.inference.evaluation import render_prompt_ids
from slmcl.inference.generation import greedy_generate
from slmcl.inference.stability import last_position_logprobs
from slmcl.models.engine import Engine, stage_seed
from slmcl.models.loading import adapter_state, load_model
from slmcl.tasks.data import load_examples
from tests.conftest import tiny_spec_dict

TOL_STABILITY = 1e-4
TOL_LOSS = 1e-3


def _varied_weights(model: Any, seed: int = 0) -> None:
    """Random init with tied embeddings just repeats the last token; re-draw so outputs vary."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        for name, p in model.named_parameters():
            if p.dim() == 2 and "lm_head" not in name:
                p.normal_(0, 0.1)
    model.eval()


def _nonzero_lora_b(model: Any, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    raw = tiny_spec_dict(
        tiny_model_dir, data_dir, tmp_path_factory.mktemp("bench-parity"),
        tasks=["fomc", "scienceqa", "numgluecm"],
        lora={"dropout": 0.0},
        training={"max_examples": 20, "batch_size": 2, "grad_accum": 8, "lr": 1e-3},
        evaluation={"max_examples": 6, "max_new_tokens": 8, "batch_size": 32},
        reference={"max_examples": 10, "batch_size": 16},
    )
    spec = spec_from_dict(raw)
    loaded = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    _varied_weights(loaded.model)
    eng = Engine(spec, loaded=loaded)
    _nonzero_lora_b(eng.model, 0.05)
    return eng


@pytest.fixture()
def checkpoint(engine: Engine) -> dict[str, torch.Tensor]:
    """The adapted checkpoint every test starts from (tests may train it further)."""
    _nonzero_lora_b(engine.model, 0.05)
    return adapter_state(engine.model)


def _load(engine: Engine, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(engine.model, state)


# -- evaluation ----------------------------------------------------------------------------


def _compare_eval(engine: Engine) -> tuple[int, int]:
    """Every task: ours vs naive on the same checkpoint; returns (agreeing rows, rows)."""
    agree = total = 0
    for task in engine.spec.tasks:
        rows = engine.test_examples(task)
        ours = engine.evaluate(task)
        base = naive.naive_evaluate_task(engine.model, engine.loaded, engine.renderer, task, rows,
                                         max_new_tokens=engine.spec.evaluation.max_new_tokens)
        # Token-level: our batched, length-sorted, pruning loop gives HF generate's tokens.
        prompts = render_prompt_ids(engine.loaded, engine.renderer, task, rows)
        gens = greedy_generate(engine.model, prompts, pad_id=engine.loaded.pad_token_id,
                               stop_ids=engine.loaded.stop_token_ids,
                               max_new_tokens=engine.spec.evaluation.max_new_tokens, batch_size=32,
                               device=engine.loaded.device)
        assert [g.token_ids for g in gens] == [g.token_ids for g in base.generations], task.name
        assert [g.hit_max_tokens for g in gens] == [g.hit_max_tokens for g in base.generations], task.name
        assert [p.new_tokens for p in ours.predictions] == [len(g.token_ids) for g in base.generations]
        agree += sum(a.prediction == b.prediction for a, b in zip(ours.predictions, base.evaluation.predictions))
        total += len(rows)
        assert abs(ours.correct - base.evaluation.correct) <= 1, task.name
    return agree, total


@pytest.mark.slow  # > 10 s: HF generate and our loop on every task
def test_fast_evaluation_gives_the_naive_answers(engine: Engine, checkpoint: dict[str, torch.Tensor]) -> None:
    _load(engine, checkpoint)
    agree, total = _compare_eval(engine)
    assert total == 18
    assert agree / total >= 0.99


def test_fast_evaluation_matches_naive_with_early_stops(
    engine: Engine, checkpoint: dict[str, torch.Tensor]
) -> None:
    """Rows that stop at different steps: ours prunes them, HF keeps them as padding."""
    _load(engine, checkpoint)
    task = engine.spec.task("fomc")
    rows = engine.test_examples(task)
    prompts = render_prompt_ids(engine.loaded, engine.renderer, task, rows)
    free = greedy_generate(engine.model, prompts, pad_id=engine.loaded.pad_token_id,
                           stop_ids=engine.loaded.stop_token_ids, max_new_tokens=8, batch_size=32,
                           device=engine.loaded.device)
    extra = {free[0].token_ids[2], free[3].token_ids[0]}  # stop row 0 after 2 tokens, row 3 at once
    stop = sorted(set(engine.loaded.stop_token_ids) | extra)
    ours = greedy_generate(engine.model, prompts, pad_id=engine.loaded.pad_token_id, stop_ids=stop,
                           max_new_tokens=8, batch_size=32, device=engine.loaded.device)
    texts = [engine.renderer.prompt_text(task.instruction, ex.prompt) for ex in rows]
    theirs = []
    for start in range(0, len(texts), naive.NAIVE_EVAL_BATCH):
        gens, _ = naive.naive_generate(engine.model, engine.loaded.tokenizer, texts[start:start + 4], stop_ids=stop,
                                       pad_id=engine.loaded.pad_token_id, max_new_tokens=8,
                                       device=engine.loaded.device)
        theirs.extend(gens)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    assert [g.hit_max_tokens for g in ours] == [g.hit_max_tokens for g in theirs]
    assert len(ours[3].token_ids) == 0 and len(ours[0].token_ids) <= 2
    assert any(g.hit_max_tokens for g in ours)


def test_an_ignored_adapter_fails(engine: Engine, checkpoint: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """The adapted checkpoint's logits and outputs differ from the base's, also after a save/load."""
    _load(engine, checkpoint)
    ref = engine.reference()
    pad = engine.loaded.pad_token_id

    def logp(model: Any) -> torch.Tensor:
        return last_position_logprobs(model, ref.prompt_ids, pad_id=pad, batch_size=16, device=engine.loaded.device)

    adapted = logp(engine.model)
    with engine.base_model() as base_model:
        base = logp(base_model)
    assert (adapted - base).abs().max() > 1e-3, "the adapter changes nothing: silently ignored?"

    task = engine.spec.task("numgluecm")
    ours = engine.evaluate(task)
    ours_base = engine.evaluate(task, base=True)
    assert [p.raw_output for p in ours.predictions] != [p.raw_output for p in ours_base.predictions]

    # A checkpoint round trip (what evaluators do) must bring the adapter back, not the base.
    engine.save_adapter(tmp_path / "ckpt")
    engine.reset_adapter(0)  # lora_B = 0: the base's outputs
    assert torch.allclose(logp(engine.model), base, atol=1e-6)
    engine.load_adapter(tmp_path / "ckpt")
    torch.testing.assert_close(logp(engine.model), adapted, atol=1e-6, rtol=1e-5)
    again = engine.evaluate(task)
    assert [p.raw_output for p in again.predictions] == [p.raw_output for p in ours.predictions]


# -- stability -----------------------------------------------------------------------------


def test_stability_numbers_match_naive_with_one_forward_per_row(
    engine: Engine, checkpoint: dict[str, torch.Tensor]
) -> None:
    _load(engine, checkpoint)
    ref_rows = load_examples(engine.spec.reference.file, limit=engine.spec.reference.max_examples)
    n = len(ref_rows)
    instructions = engine.instructions()
    engine._base_logp = None  # noqa: SLF001 - count the first checkpoint's forwards from scratch
    before = engine.forward_passes
    ours_base = engine.stability(base=True)
    assert engine.forward_passes - before == n  # p_0, once
    ours = engine.stability()
    assert engine.forward_passes - before == 2 * n  # + exactly one forward per row for the checkpoint
    ours_again = engine.stability()
    assert engine.forward_passes - before == 3 * n  # p_0 is never recomputed
    assert ours_again.values == ours.values

    theirs = naive.naive_stability(engine.model, engine.loaded, engine.renderer, ref_rows, instructions, adapted=True)
    assert theirs.forward_rows == 2 * n  # the naive second, adapter-disabled pass
    theirs_base = naive.naive_stability(engine.model, engine.loaded, engine.renderer, ref_rows, instructions,
                                        adapted=False)
    assert ours.values["kl_to_base_mean"] > 1e-3  # a real drift, not a trivial zero
    for ours_v, theirs_v in ((ours.values, theirs.values), (ours_base.values, theirs_base.values)):
        keys = [k for k in theirs_v if k in ours_v]
        assert len(keys) == 9
        for k in keys:
            assert ours_v[k] == pytest.approx(theirs_v[k], abs=TOL_STABILITY), k


# -- training ------------------------------------------------------------------------------


@pytest.mark.slow  # > 10 s: two training stages, ours and the naive one with gradient checkpointing
def test_train_stage_loss_matches_the_naive_loop(engine: Engine, checkpoint: dict[str, torch.Tensor]) -> None:
    spec = engine.spec
    assert spec.lora.dropout == 0.0
    task = spec.task("scienceqa")
    seed, stage = 7, 1
    rows = load_examples(task.train_file, limit=spec.training.max_examples)
    assert len(rows) == 20  # 10 micro-batches of 2: one full step of 8 and a partial one of 2

    _load(engine, checkpoint)
    ours = engine.train(run_id="r", seed=seed, stage=stage, task=task, previous_tasks=[])
    ours_state = adapter_state(engine.model)

    _load(engine, checkpoint)
    s = stage_seed(seed, stage)
    torch.manual_seed(s)
    theirs = naive.naive_train_stage(engine.model, engine.loaded, engine.renderer, task, rows, spec.training,
                                     generator=torch.Generator().manual_seed(s))
    theirs_state = adapter_state(engine.model)

    ours_losses = [st.loss for st in ours.steps]
    assert len(ours_losses) == len(theirs.step_losses) == 2
    for a, b in zip(ours_losses, theirs.step_losses):
        assert a == pytest.approx(b, rel=TOL_LOSS)
    assert ours.tokens == theirs.tokens
    for k in ours_state:  # and both took the same optimizer steps
        torch.testing.assert_close(ours_state[k], theirs_state[k], atol=1e-5, rtol=1e-3, msg=k)
    assert any(not torch.equal(ours_state[k], checkpoint[k]) for k in ours_state)

    # The naive loop's switches are undone: the shared model is left as it found it.
    base = engine.model.get_base_model()
    assert not engine.model.training
    assert base.config.use_cache is True
    flag = ("is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    assert not getattr(base, flag)
    assert not getattr(base, "_require_grads_hooks", None)


def test_naive_training_turns_on_gradient_checkpointing(engine: Engine) -> None:
    base = engine.model.get_base_model()
    flag = ("is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    with naive.naive_training_mode(engine.model, gradient_checkpointing=True):
        assert getattr(base, flag)
        assert engine.model.training and base.config.use_cache is False
    assert not getattr(base, flag)


# -- the embedded model, very few rows -----------------------------------------------------


@pytest.mark.slow
def test_embedded_model_fast_and_naive_agree(data_dir: Path, tmp_path: Path) -> None:
    raw = {
        "data_dir": str(data_dir), "tasks": ["fomc", "numgluecm"], "device": "cpu", "output_dir": str(tmp_path),
        "lora": {"dropout": 0.0}, "evaluation": {"max_examples": 3, "max_new_tokens": 12},
        "reference": {"max_examples": 4},
    }
    engine = Engine(spec_from_dict(raw))
    _nonzero_lora_b(engine.model, 0.01)
    agree, total = _compare_eval(engine)
    assert agree == total == 6
    ref_rows = load_examples(engine.spec.reference.file, limit=4)
    ours = engine.stability()
    theirs = naive.naive_stability(engine.model, engine.loaded, engine.renderer, ref_rows, engine.instructions())
    for k in theirs.values:
        assert ours.values[k] == pytest.approx(theirs.values[k], abs=TOL_STABILITY), k
