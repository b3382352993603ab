"""Answer normalization rules, applied to gold and prediction alike by the task kinds (``slmcl.tasks.kinds``).

The multiple-choice and numeric rules are the study's own, so its accuracy numbers can be reproduced; the two
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
import string
from collections.abc import Sequence

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
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


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


def last_number(text: str) -> str | None:
    """The last number written in ``text`` as spelled there, or None when it has none."""
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
            number = last_number(text[match.end() :])
            if number is not None:
                return normalize_number(number)
    number = last_number(text)
    if number is not None:
        return normalize_number(number)
    return _last_line_upper(text)


def normalize_free_text(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces.

    Expects text already through ``clean_output``. The steps and their order are SQuAD's
    evaluation script's, so token-F1 numbers compare with published ones.
    """
    lowered = text.lower()
    no_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", no_punctuation).split())
