"""Answer normalization: hand-worked cases for each rule of DESIGN.md §1 "Scoring".

The rules live in ``slmcl.tasks.answers``; the exact-match kinds (``slmcl.tasks.kinds``) apply
them, so they are exercised here through the kinds, as the evaluation uses them.
"""

from __future__ import annotations

import sys
import unicodedata
from decimal import Decimal

import pytest

from slmcl.tasks.answers import (
    END_MARKERS,
    ascii_digits,
    clean_output,
    extract_choice,
    extract_number,
    normalize_number,
    number_value,
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


# -- a marker ends the answer (issue 16) -------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Deleting the marker in place glued the next turn on: "BUSER", "123".
        ("B<|im_start|>user", "B"),
        ("12<|eot_id|>3", "12"),
        ("12<|im_end|>3", "12"),
        ("Paris<|im_end|>\n<|im_start|>user\nAnd Rome?", "Paris"),
        ("B</s><s>[INST] next question", "B"),
        ("Friday\n<start_of_turn>user\nthanks", "Friday"),
        # Markers that open a text or a turn carry no answer when they lead: skipped, with the role.
        ("<s>B", "B"),
        ("<|im_start|>B", "B"),
        ("<|im_start|>assistant\nB<|im_end|>", "B"),
        ("<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\nC<|eot_id|>", "C"),
        ("<start_of_turn>model\nD<end_of_turn>", "D"),
        ("[/INST] E</s>", "E"),
        # A leading end-of-turn: the model answered nothing, and what follows is not its answer.
        ("<|im_end|>B", ""),
        ("  <|eot_id|>\n12", ""),
        ("<|im_end|>", ""),
    ],
)
def test_a_marker_ends_the_answer(raw: str, expected: str) -> None:
    cleaned = clean_output(raw)
    assert cleaned == expected
    assert clean_output(cleaned) == cleaned


def test_the_issue_examples_through_the_kinds() -> None:
    assert normalize_answer("B<|im_start|>user", "multiple_choice") == "B"
    assert normalize_answer("12<|eot_id|>3", "numeric") == "12"
    assert get_task_kind("numeric").evaluate("12<|eot_id|>3", "12") == ("12", "12", 1.0)


def test_extra_markers_end_the_answer_and_are_skipped_when_they_lead() -> None:
    # A tokenizer's special tokens (pads, image tokens) come as extra markers: the same two rules apply.
    assert clean_output("<pad>B<pad><pad>", extra_markers=["<pad>"]) == "B"
    assert clean_output("42<|custom_end|>7", extra_markers=["<|custom_end|>"]) == "42"
    assert clean_output("42<|custom_end|>7") == "42<|custom_end|>7"
    # Empty strings among them are ignored rather than cutting everything.
    assert clean_output("B", extra_markers=[""]) == "B"


# -- <think> blocks -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<THINK>x</Think>B", "B"),
        ("<Think>maybe A\nor C</THINK>\n\nB<|im_end|>", "B"),
        # A marker inside a closed block does not end the answer: the block goes first.
        ("<think>A<|im_end|>?</think>B", "B"),
        # A closing tag without its opening (the template put "<think>" in the prompt): the reasoning before it goes.
        ("Option A? No.</think>B", "B"),
        ("Option A? No.</THINK>\n\nB<|im_end|>", "B"),
        ("first</think>second</think>C", "C"),
        # ...but one in the next turn, which the cut drops, does not cost the answer.
        ("B<|im_end|><|im_start|>user\nx</think>y", "B"),
        # The study keeps an unclosed block, whatever its case: it may be all the model wrote.
        ("<THINK>still thinking A", "<THINK>still thinking A"),
    ],
)
def test_think_blocks_go_whatever_their_case(raw: str, expected: str) -> None:
    assert clean_output(raw) == expected


def test_think_tags_among_extra_markers_stay_with_the_think_rules() -> None:
    # Some tokenizers list the tags as special tokens; as markers they would cut the answer off at the reasoning.
    assert clean_output("reasoning A</think>B", extra_markers=["<think>", "</think>"]) == "B"
    assert normalize_answer("<Think>Option A?</Think>B", "multiple_choice") == "B"


# -- numbers in any digit script, compared by exact value ----------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("١٨٦", "186"),  # Arabic-Indic
        ("۱۸۶", "186"),  # Extended Arabic-Indic
        ("１８６", "186"),  # full width
        ("１８٦", "186"),  # two scripts in one number
        ("१८६", "186"),  # Devanagari
        ("١٨٦.٥", "186.5"),
        ("١٨٦٫٥", "186.5"),  # Arabic decimal separator
        ("１８６．５０", "186.5"),  # full-width full stop
        ("١٬٢٣٤", "1234"),  # Arabic thousands separator
        ("１，２３４", "1234"),
        ("−5", "-5"),  # MINUS SIGN
        ("－５", "-5"),
        ("The answer is ١٨٦.", "186"),
        ("Final answer: −٣", "-3"),
        # An en dash is a range, not a minus sign, as an ASCII "3-5" would be read otherwise.
        ("3–5", "5"),
        # Word answers are compared as written: folding only touches numbers.
        ("ＦＲＩＤＡＹ", "ＦＲＩＤＡＹ"),
    ],
)
def test_digits_of_any_script_are_read_as_their_value(raw: str, expected: str) -> None:
    assert normalize_answer(raw, "numeric") == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("١٨٦", "186", 1.0),
        ("１８６", "186", 1.0),
        ("１８٦", "186.0", 1.0),
        ("١٨٦.٥", "186.5", 1.0),
        ("186", "186.5", 0.0),
        ("١٨٦", "186.5", 0.0),
        # Beyond float's 53 bits: the study's float read both as 12345678901234567168.
        ("12345678901234567891", "12345678901234567890", 0.0),
        ("123456789012345678901234567890.25", "123456789012345678901234567890.250", 1.0),
    ],
)
def test_numeric_answers_match_by_exact_value(prediction: str, gold: str, expected: float) -> None:
    assert get_task_kind("numeric").evaluate(prediction, gold)[2] == expected


def test_numeric_score_compares_values_not_spellings() -> None:
    numeric = get_task_kind("numeric")
    # Scores of already-normalized pairs, as the evaluation passes them, and of raw spellings alike.
    assert numeric.score("186", "186.0") == 1.0
    assert numeric.score("١٨٦", "186") == 1.0
    assert numeric.score("-0", "0") == 1.0
    assert numeric.score("1,234.50", "1234.5") == 1.0
    assert numeric.score("0.3", "0.30000000000000004") == 0.0
    assert numeric.score("186", "186.5") == 0.0
    # Words compare as text; "NaN" is not a number here, so it still matches itself.
    assert numeric.score("NAN", "NAN") == 1.0
    assert numeric.score("FRIDAY", "MONDAY") == 0.0
    assert numeric.score("186", "FRIDAY") == 0.0


def test_number_value_is_exact_and_reads_only_numbers() -> None:
    assert number_value("١٨٦.٥") == Decimal("186.5")
    assert number_value(" -1,234.50 ") == Decimal("-1234.5")
    big = "9" * 60 + ".000000000000000000000000000000001"
    assert number_value(big) == Decimal(big)
    assert number_value(big) != number_value("9" * 60)
    for text in ("NaN", "Infinity", "1e5", "$5", "five", "", "1,2,3", "١٨٦abc"):
        assert number_value(text) is None, text


def test_normalize_number_folds_digits() -> None:
    assert normalize_number("١٨٦") == "186"
    assert normalize_number("１８６．０") == "186"
    assert normalize_number(" -٠٠٧٫٥٠ ") == "-7.5"
    # Not a plain number: back stripped and unchanged, digits as written.
    assert normalize_number(" ١٨٦abc ") == "١٨٦abc"


def test_every_unicode_decimal_digit_folds_to_its_ascii_digit() -> None:
    digits = [chr(code) for code in range(sys.maxunicode + 1) if unicodedata.decimal(chr(code), None) is not None]
    assert len(digits) > 600  # dozens of scripts, ten digits each
    for digit in digits:
        assert ascii_digits(digit) == str(unicodedata.decimal(digit)), hex(ord(digit))
    text = "x١٨٦ y—z"
    assert ascii_digits(text) == "x186 y—z" and len(ascii_digits(text)) == len(text)
