"""Answer normalization: exact match after normalization, applied to gold and prediction alike.

The default rules are the study's own, so its accuracy numbers can be reproduced; the two
places where they differ are deliberate fixes, flagged where they happen:

* every chat template's end-of-turn marker is removed, not only Qwen's (the study left
  Llama's and Gemma's markers in, so a word answer such as "Friday" could never match);
* the last-resort option letter must be an upper-case standalone letter in the original text
  (the study upper-cased first, so the English article "a" counted as option A).

Everything here is pure string work, with no torch, so the client CLI can score prediction
files without the GPU stack.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ANSWER_KINDS: tuple[str, ...] = ("multiple_choice", "numeric")

# Markers of the chat templates users are likely to run (ChatML/Qwen, Llama 3, Gemma,
# Phi-3, Mistral/Llama 2, GPT-2-style). Start markers are listed too: a model that runs past
# its end-of-turn sometimes opens the next turn, and a stray header would spoil a word answer.
END_MARKERS: tuple[str, ...] = (
    "<|im_end|>",
    "<|im_start|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<|assistant|>",
    "<|user|>",
    "<|system|>",
    "<end_of_turn>",
    "<start_of_turn>",
    "<bos>",
    "<eos>",
    "<s>",
    "</s>",
    "[/INST]",
    "[INST]",
)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_EMPHASIS = ("**", "__")

_LETTERS = "A-E"
# Explicit markers, in priority order: the first pattern that matches anywhere wins, so a
# "final answer" line beats an earlier, tentative "answer:". The optional quotes accept the
# JSON-ish form ("answer": "C") that the study's instruction ("in the answer field") invites.
_CHOICE_MARKERS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        rf"final answer\s*[:\-]\s*([{_LETTERS}])\b",
        rf"answer[\"']?\s*[:\-]\s*[\"']?([{_LETTERS}])\b",
        rf"the answer is\s*([{_LETTERS}])\b",
        rf"option\s*([{_LETTERS}])\b",
        rf"choice\s*([{_LETTERS}])\b",
    )
)
_LEADING_LETTER = re.compile(rf"^([{_LETTERS}])(?:[.)]|\s|$)", re.IGNORECASE)
# Case-sensitive on purpose (see the module docstring): only "B", never the article "a".
_STANDALONE_LETTER = re.compile(rf"\b([{_LETTERS}])\b")

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_NUMBER_MARKERS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern, re.IGNORECASE)
    # A dash directly before a digit is a minus sign, not a separator: "answer -5" is -5.
    for pattern in (
        r"final answer\s*(?::|-(?!\d))",
        r"answer\s*(?::|-(?!\d))",
        r"the answer is",
        r"therefore,?",
    )
)
_PLAIN_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?")
_TRAILING_PUNCTUATION = ".$,;:"


def clean_output(text: str, extra_markers: Sequence[str] = ()) -> str:
    """Remove what is never part of an answer: reasoning blocks, emphasis and template markers.

    Only closed ``<think>`` blocks go: an unterminated one may hold the only answer the model
    gave before running out of tokens, and the extractors can still find it there.
    """
    cleaned = _THINK_BLOCK.sub("", text)
    for token in (*_EMPHASIS, *END_MARKERS, *extra_markers):
        if token:
            cleaned = cleaned.replace(token, "")
    return cleaned.strip()


def _last_line_upper(text: str) -> str:
    """The fallback when no rule fires: compare the last thing said, ignoring case."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].upper() if lines else ""


def extract_choice(text: str) -> str:
    """The option letter (A–E) a multiple-choice answer names, upper-cased.

    Falls back to the last non-empty line, upper-cased, so that an answer with no letter
    still compares as itself rather than as an empty string.
    """
    for pattern in _CHOICE_MARKERS:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    match = _LEADING_LETTER.match(text.strip())
    if match:
        return match.group(1).upper()
    letters = _STANDALONE_LETTER.findall(text)
    if letters:
        return letters[-1]
    return _last_line_upper(text)


def normalize_number(text: str) -> str:
    """A canonical spelling of a number, so "1,234", "1234." and "1234.0" compare equal.

    Works on the digits rather than through ``float`` so large integers and long decimals
    are never rounded. Text that is not a plain number comes back stripped and unchanged.
    """
    stripped = text.strip()
    candidate = stripped.replace(",", "").rstrip(_TRAILING_PUNCTUATION).lstrip("$").strip()
    match = _PLAIN_NUMBER.fullmatch(candidate)
    if not match:
        return stripped
    sign, integer, fraction = match.group(1), match.group(2), match.group(3) or ""
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    number = f"{integer}.{fraction}" if fraction else integer
    if number == "0":
        sign = ""
    return f"{sign}{number}"


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_number(text: str) -> str:
    """The final number of a numeric answer, normalized; word answers come back upper-cased.

    A marker only counts when a number follows it; otherwise the next marker is tried, then
    the whole text. Non-numeric answers (weekdays, months) fall back to the last line
    upper-cased, which is how the study compared them.
    """
    for pattern in _NUMBER_MARKERS:
        match = pattern.search(text)
        if match:
            number = _last_number(text[match.end() :])
            if number is not None:
                return normalize_number(number)
    number = _last_number(text)
    if number is not None:
        return normalize_number(number)
    return _last_line_upper(text)


def _check_kind(kind: str) -> None:
    if kind not in ANSWER_KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {', '.join(ANSWER_KINDS)}")


def normalize_answer(text: str, kind: str, extra_markers: Sequence[str] = ()) -> str:
    """The comparable form of a raw answer; the same function serves gold and prediction."""
    _check_kind(kind)
    cleaned = clean_output(text, extra_markers)
    if kind == "multiple_choice":
        return extract_choice(cleaned)
    return extract_number(cleaned)


def training_target(answer: str, kind: str) -> str:
    """The assistant text a model is fine-tuned to produce: just the answer, as in the study.

    ScienceQA's gold is "letter\\nrationale"; training on the rationale would teach the model
    to write it, so only the letter is kept. Numeric golds keep their final number, and word
    golds ("Friday") keep their original casing because the model should learn to write them
    naturally; scoring upper-cases both sides anyway.
    """
    _check_kind(kind)
    if kind == "multiple_choice":
        lines = [line.strip() for line in answer.splitlines() if line.strip()]
        first = lines[0] if lines else ""
        if len(first) == 1 and first.upper() in "ABCDE":
            return first.upper()
        return extract_choice(first)
    if _last_number(answer) is None:
        return answer.strip()
    return normalize_answer(answer, "numeric")


def is_correct(
    prediction_raw: str, gold_raw: str, kind: str, extra_markers: Sequence[str] = ()
) -> tuple[str, str, bool]:
    """Score one prediction; the normalized pair is returned so reports can show why it failed."""
    prediction = normalize_answer(prediction_raw, kind, extra_markers)
    gold = normalize_answer(gold_raw, kind, extra_markers)
    return prediction, gold, prediction == gold
