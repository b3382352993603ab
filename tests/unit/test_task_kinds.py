"""Task kinds: the registry, each built-in kind's score on hand-worked rows, and float scores end to end."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from slmcl.config.spec import ChatSpec, ModelSpec, TaskSpec
from slmcl.errors import SpecError
from slmcl.inference.evaluation import evaluate_task
from slmcl.models.loading import LoadedModel, load_model
from slmcl.tasks.data import Example
from slmcl.tasks.kinds import TASK_KINDS, TaskKind, default_user_message, get_task_kind, task_kind_names
from slmcl.tasks.kinds.numeric import Numeric
from slmcl.tasks.kinds.token_f1 import TokenF1
from slmcl.tasks.prompts import PromptRenderer

BUILTIN = ("multiple_choice", "numeric", "token_f1")


# -- the registry ----------------------------------------------------------------------------
def test_builtin_kinds_are_registered_from_their_modules() -> None:
    assert set(BUILTIN) <= set(task_kind_names())
    assert task_kind_names() == sorted(task_kind_names())
    for name in BUILTIN:
        assert name in TASK_KINDS
        assert isinstance(get_task_kind(name), TaskKind)
    assert isinstance(get_task_kind("token_f1"), TokenF1)


def test_duplicate_name_raises_and_names_the_first_owner() -> None:
    class OtherNumeric(Numeric):
        pass

    with pytest.raises(ValueError, match=r"task kind 'numeric' is already registered by slmcl\.tasks\.kinds\.numeric"):
        TASK_KINDS.register("numeric")(OtherNumeric)
    assert isinstance(get_task_kind("numeric"), Numeric) and not isinstance(get_task_kind("numeric"), OtherNumeric)
    TASK_KINDS.add("numeric", Numeric)  # the same class again (a module imported twice) is harmless


def test_unknown_name_suggests_the_closest_and_lists_the_known() -> None:
    with pytest.raises(SpecError) as info:
        get_task_kind("token-f1")
    message = str(info.value)
    assert message.startswith("unknown task kind 'token-f1'. Did you mean 'token_f1'?")
    assert "Known: multiple_choice, numeric, token_f1" in message
    assert TASK_KINDS.unknown_message("numerik") == (
        "unknown task kind 'numerik'. Did you mean 'numeric'? Known: " + ", ".join(task_kind_names()))
    assert "Did you mean" not in TASK_KINDS.unknown_message("zzz")


@pytest.mark.parametrize("bad", ["Token_F1", "free text", "1st", "", "x" * 41])
def test_bad_name_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="must be lowercase letters"):
        TASK_KINDS.register(bad)(TokenF1)
    assert bad not in TASK_KINDS


def test_importing_the_kinds_needs_no_torch() -> None:
    code = ("import sys; from slmcl.tasks.kinds import TASK_KINDS, get_task_kind; TASK_KINDS.names(); "
            "get_task_kind('token_f1').evaluate('a', 'b'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- hand-worked scores ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "prediction", "gold", "expected"),
    [
        ("multiple_choice", "The answer is B.<|im_end|>", "B\nA clause is a group of words.", ("B", "B", 1.0)),
        ("multiple_choice", "C", "B\nrationale", ("C", "B", 0.0)),
        ("numeric", "Therefore, 1,234.0", "1234", ("1234", "1234", 1.0)),
        ("numeric", "12", "13", ("12", "13", 0.0)),
        ("numeric", "friday", "Friday", ("FRIDAY", "FRIDAY", 1.0)),
        # precision 2/2, recall 2/3: F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
        ("token_f1", "the cat sat", "a cat sat down", ("cat sat", "cat sat down", 0.8)),
        # a token counts as often as both sides have it: 1 common of 3 predicted, 2 gold -> 2 * 1/3 * 1/2 / (5/6) = 0.4
        ("token_f1", "cat cat cat", "cat sat", ("cat cat cat", "cat sat", 0.4)),
        # case, punctuation and extra whitespace do not count
        ("token_f1", "  PARIS!! ", "Paris.", ("paris", "paris", 1.0)),
        ("token_f1", "The Eiffel-Tower,  in PARIS.", "an eiffeltower in paris", ("eiffeltower in paris",) * 2 + (1.0,)),
        # the think block and the end-of-turn marker go before scoring
        ("token_f1", "<think>maybe Rome</think>Paris<|im_end|>", "Paris", ("paris", "paris", 1.0)),
        ("token_f1", "dog", "cat", ("dog", "cat", 0.0)),
        # an answer of only articles is empty: it matches only an empty gold
        ("token_f1", "the", "cat", ("", "cat", 0.0)),
        ("token_f1", "a", "the", ("", "", 1.0)),
    ],
)
def test_scores(kind: str, prediction: str, gold: str, expected: tuple[str, str, float]) -> None:
    pred, gold_norm, score = get_task_kind(kind).evaluate(prediction, gold)
    assert (pred, gold_norm) == expected[:2]
    assert score == pytest.approx(expected[2], abs=1e-12)


def test_token_f1_extra_markers_apply_to_both_sides() -> None:
    kind = get_task_kind("token_f1")
    # left in, the marker's letters become a token of their own: precision 2/3, recall 1 -> F1 0.8
    pred, gold, score = kind.evaluate("blue sky <|x|>", "blue sky")
    assert (pred, gold) == ("blue sky x", "blue sky") and score == pytest.approx(0.8, abs=1e-12)
    assert kind.evaluate("blue sky <|x|>", "blue sky<|x|>", extra_markers=["<|x|>"]) == ("blue sky", "blue sky", 1.0)


@pytest.mark.parametrize(
    ("kind", "answer", "expected"),
    [
        ("multiple_choice", " b \nbecause", "B"),
        ("numeric", "186.0", "186"),
        ("numeric", " Friday ", "Friday"),
        # free text is trained on as written, only stripped: casing and punctuation are what the model should write
        ("token_f1", "  The Eiffel Tower, in Paris.\n", "The Eiffel Tower, in Paris."),
    ],
)
def test_training_target(kind: str, answer: str, expected: str) -> None:
    assert get_task_kind(kind).training_target(answer) == expected


def test_default_user_message_is_the_study_layout() -> None:
    assert default_user_message("  Answer briefly. ", "\nWho wrote it?  ") == "Answer briefly.\n\nWho wrote it?"
    assert default_user_message("  ", " Who? ") == "Who?"
    for name in BUILTIN:
        assert get_task_kind(name).user_message("Do it.", "Q?") == "Do it.\n\nQ?"


# -- end to end on a tiny random model ------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    lm = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    torch.manual_seed(0)  # varied continuations, as in test_generation: the tied random init repeats its last token
    with torch.no_grad():
        lm.model.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.model.lm_head.weight))
        for name, p in lm.model.named_parameters():
            if p.dim() == 2 and "lm_head" not in name:
                p.normal_(0, 0.1)
    lm.model.eval()
    return lm


def prefix_f1(written: Sequence[str], shared: int) -> float:
    """F1 of a prediction of ``written`` words against a gold of its first ``shared`` words plus one it never wrote."""
    precision, recall = shared / len(written), shared / (shared + 1)
    return 2 * precision * recall / (precision + recall)


def test_token_f1_task_evaluates_to_the_mean_row_score(loaded: LoadedModel) -> None:
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    task = TaskSpec(name="qa", kind="token_f1", instruction="Answer in a few words.", train_file="a", test_file="b")
    questions = [f"Question {i}: what is the colour of object {i * 7}?" for i in range(5)]
    # First pass: learn what the greedy model writes, so golds can overlap it by a known amount.
    first = evaluate_task(loaded.model, loaded, renderer, task, [Example(i, q, "x") for i, q in enumerate(questions)],
                          max_new_tokens=8, batch_size=2)
    written = [p.prediction.split() for p in first.predictions]
    assert sum(1 for w in written if len(w) >= 2) >= 2, f"the model should write some words: {written}"
    foreign = "zzgoldonly"
    shared = [max(1, len(w) // 2) for w in written]
    golds = [" ".join(w[:k] + [foreign]) if w else foreign for w, k in zip(written, shared)]
    golds[0] = first.predictions[0].raw_output  # one row answered exactly (score 1.0)
    rows = [Example(i, q, g) for i, (q, g) in enumerate(zip(questions, golds))]
    ev = evaluate_task(loaded.model, loaded, renderer, task, rows, max_new_tokens=8, batch_size=2)

    assert [p.raw_output for p in ev.predictions] == [p.raw_output for p in first.predictions]
    want = [1.0] + [prefix_f1(w, k) if w else 0.0 for w, k in zip(written[1:], shared[1:])]
    assert [p.score for p in ev.predictions] == pytest.approx(want, abs=1e-12)
    assert any(0.0 < s < 1.0 for s in want), want
    assert [p.correct for p in ev.predictions] == [s == 1.0 for s in want]
    assert ev.score_sum == pytest.approx(sum(want), abs=1e-12)
    assert ev.accuracy == pytest.approx(sum(want) / len(want), abs=1e-12)
    assert 0.0 < ev.accuracy < 1.0 and ev.accuracy != ev.correct / ev.total
    assert ev.score() == {"accuracy": ev.accuracy, "correct": ev.correct, "total": 5, "score_sum": ev.score_sum}


def test_exact_match_task_accuracy_is_correct_over_total(loaded: LoadedModel) -> None:
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    task = TaskSpec(name="n", kind="numeric", instruction="Compute.", train_file="a", test_file="b")
    rows = [Example(i, f"{i} + {i} = ?", str(2 * i)) for i in range(4)]
    first = evaluate_task(loaded.model, loaded, renderer, task, rows, max_new_tokens=6, batch_size=4)
    rows[1] = Example(1, rows[1].prompt, first.predictions[1].raw_output)  # at least one hit
    ev = evaluate_task(loaded.model, loaded, renderer, task, rows, max_new_tokens=6, batch_size=4)
    assert ev.predictions[1].score == 1.0 and ev.correct >= 1
    assert all(p.score in (0.0, 1.0) and p.correct == (p.score == 1.0) for p in ev.predictions)
    assert ev.score_sum == ev.correct and ev.accuracy == ev.correct / ev.total


class Terse(TokenF1):
    """A kind that poses its question its own way (not registered: the renderer takes any kind)."""

    def user_message(self, instruction: str, prompt: str) -> str:
        return f"{prompt.strip()} ({instruction.strip()})"


def test_renderer_uses_the_kind_and_builtins_render_as_before(loaded: LoadedModel) -> None:
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    plain = renderer.prompt_text("Answer.", "Who?")
    assert "Answer.\n\nWho?" in plain
    for name in BUILTIN:
        kind = get_task_kind(name)
        assert renderer.prompt_text("Answer.", "Who?", kind) == plain
        assert renderer.full_text("Answer.", "Who?", "Me", kind) == renderer.full_text("Answer.", "Who?", "Me")
    terse = renderer.prompt_text("Answer.", "Who?", Terse())
    assert "Who? (Answer.)" in terse and "Answer.\n\nWho?" not in terse
