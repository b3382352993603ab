"""Answer normalization: hand-worked cases for each rule of DESIGN.md §1 "Scoring".

The rules live in ``slmcl.tasks.answers``; the exact-match kinds (``slmcl.tasks.kinds``) apply
them, so they are exercised here through the kinds, as the evaluation uses them.
"""

from __future__ import annotations

import pytest

from slmcl.tasks.answers import (
    END_MARKERS,
    clean_output,
    extract_choice,
    extract_number,
    normalize_number,
)
from slmcl.tasks.kinds import get_task_kind


def normalize_answer(text: str, kind: str) -> str:
    return get_task_kind(kind).normalize(text)


@pytest.mark.parametrize(
    "marker", ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<|end|>"]
)
def test_end_markers_cover_common_templates(marker: str) -> None:
    assert marker in END_MARKERS


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("C<|im_end|>", "C"),
        ("B<|eot_id|>", "B"),
        ("A<end_of_turn>\n", "A"),
        ("D</s>", "D"),
        ("  Friday<|end_of_text|>  ", "Friday"),
        ("<think>maybe A?\nor B</think>\nC", "C"),
        ("<think>one</think>B<think>two</think>", "B"),
        ("**C**", "C"),
        ("__B__", "B"),
        # An unterminated block is kept: it may be all the model wrote.
        ("<think>still thinking A", "<think>still thinking A"),
    ],
)
def test_clean_output(raw: str, expected: str) -> None:
    assert clean_output(raw) == expected


def test_clean_output_extra_markers() -> None:
    assert clean_output("42<|custom_end|>") == "42<|custom_end|>"
    assert clean_output("42<|custom_end|>", extra_markers=["<|custom_end|>"]) == "42"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # End-of-turn markers of Qwen, Llama 3, Gemma and Mistral templates.
        ("C<|im_end|>", "C"),
        ("B<|eot_id|>", "B"),
        ("A<end_of_turn>", "A"),
        ("D</s>", "D"),
        # A thinking block that mentions another letter does not count.
        ("<think>Is it A? No.</think>The answer is B.", "B"),
        ("**C**", "C"),
        # The JSON-ish form the study's instruction ("in the answer field") invites.
        ('{"answer": "C"}', "C"),
        ("'answer': 'd'", "D"),
        ("The answer is B.", "B"),
        # "final answer" wins over an earlier "answer:", and is case-insensitive.
        ("answer: A\nHmm, wait.\nfinal answer: e", "E"),
        ("Option d is the best fit", "D"),
        ("My choice: choice C", "C"),
        # A leading letter followed by ")", ".", whitespace or the end.
        ("b) because it is warmer", "B"),
        ("C. neutral", "C"),
        ("A", "A"),
        # Last standalone upper-case letter when nothing else fires.
        ("I think C is wrong, so B it is", "B"),
        # Deviation from the study: the article "a" is not option A.
        ("This is a declarative sentence.", "THIS IS A DECLARATIVE SENTENCE."),
        ("it is\nhawkish", "HAWKISH"),
        ("", ""),
    ],
)
def test_normalize_multiple_choice(raw: str, expected: str) -> None:
    assert normalize_answer(raw, "multiple_choice") == expected


def test_extract_choice_works_on_already_cleaned_text() -> None:
    assert extract_choice("final answer - c") == "C"
    assert extract_choice("some text\n\n") == "SOME TEXT"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("186.0", "186"),
        ("1,234", "1234"),
        # The marker "answer:" is found; the last number after it is 13.
        ("answer: 12 apples, so 13 total", "13"),
        ("Therefore, 42.", "42"),
        ("3 + 4 = 7. Therefore, the answer is 7.", "7"),
        ("\\boxed{7}", "7"),
        ("We get $\\boxed{12}$<|im_end|>", "12"),
        ("x = -3.50", "-3.5"),
        ("Final answer: -5", "-5"),
        # A dash right before the digits is a minus sign, not the marker's separator.
        ("The answer -5", "-5"),
        ("It costs $1,000.", "1000"),
        ("12 apples and 1,234.50 dollars", "1234.5"),
        # The marker has no number after it, so the whole text's last number counts.
        ("We had 8 cards. Answer: none left", "8"),
        # Word answers compare upper-cased, end-of-turn marker removed.
        ("Friday<|im_end|>", "FRIDAY"),
        ("The day is\nfriday", "FRIDAY"),
        ("<think>about 3</think>**17**", "17"),
    ],
)
def test_normalize_numeric(raw: str, expected: str) -> None:
    assert normalize_answer(raw, "numeric") == expected


def test_extract_number_without_any_text() -> None:
    assert extract_number("") == ""


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("186.0", "186"),
        ("1,234", "1234"),
        ("-3.50", "-3.5"),
        ("42.", "42"),
        (" 12; ", "12"),
        ("$5", "5"),
        ("007", "7"),
        ("0.0", "0"),
        ("-0.0", "0"),
        ("17.48", "17.48"),
        ("123456789012345678901.10", "123456789012345678901.1"),
        ("Friday", "Friday"),
        ("  1e5 ", "1e5"),
    ],
)
def test_normalize_number(raw: str, expected: str) -> None:
    assert normalize_number(raw) == expected


@pytest.mark.parametrize(
    ("answer", "kind", "expected"),
    [
        # ScienceQA's gold is "letter\nrationale": only the letter is trained on.
        ("B\nFigures of speech are words or phrases that use language in a nonliteral way.", "multiple_choice", "B"),
        (" b \nThe answer is C because...", "multiple_choice", "B"),
        ("The answer is C\nrationale", "multiple_choice", "C"),
        ("C", "multiple_choice", "C"),
        ("186.0", "numeric", "186"),
        ("1,234", "numeric", "1234"),
        ("17.48", "numeric", "17.48"),
        # Word golds keep their casing: the model should learn to write "Friday".
        (" Friday ", "numeric", "Friday"),
    ],
)
def test_training_target(answer: str, kind: str, expected: str) -> None:
    assert get_task_kind(kind).training_target(answer) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "kind", "expected"),
    [
        ("The answer is B.", "B\nA clause is a group of words.", "multiple_choice", ("B", "B", 1.0)),
        ("C<|im_end|>", "B\nrationale", "multiple_choice", ("C", "B", 0.0)),
        ('{"answer": "A"}<|eot_id|>', "A", "multiple_choice", ("A", "A", 1.0)),
        ("186", "186.0", "numeric", ("186", "186", 1.0)),
        ("Friday<|im_end|>", "friday", "numeric", ("FRIDAY", "FRIDAY", 1.0)),
        ("Friday<end_of_turn>", "Friday", "numeric", ("FRIDAY", "FRIDAY", 1.0)),
        ("Monday", "Friday", "numeric", ("MONDAY", "FRIDAY", 0.0)),
        ("Therefore, 1,234", "1234", "numeric", ("1234", "1234", 1.0)),
    ],
)
def test_evaluate(prediction: str, gold: str, kind: str, expected: tuple[str, str, float]) -> None:
    assert get_task_kind(kind).evaluate(prediction, gold) == expected


def test_extra_markers_apply_to_both_sides() -> None:
    numeric = get_task_kind("numeric")
    assert numeric.evaluate("Friday<|x|>", "Friday")[2] == 0.0
    assert numeric.evaluate("Friday<|x|>", "Friday", extra_markers=["<|x|>"]) == ("FRIDAY", "FRIDAY", 1.0)
