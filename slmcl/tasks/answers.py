"""Answer normalization rules, applied to gold and prediction alike by the task kinds (``slmcl.tasks.kinds``).

The multiple-choice and numeric rules are the study's own, so its accuracy numbers can be reproduced; where
they differ it is on purpose, flagged where it happens (README "Answer normalization" has the same list):

* every chat template's marker is recognised, not only Qwen's ``<|im_end|>`` and ``<|endoftext|>``
  (the study left Llama's and Gemma's in: ``Friday<|eot_id|>`` was ``FRIDAY<|EOT_ID|>``, never ``FRIDAY``);
* a marker *ends* the answer instead of being deleted, so text is never glued across it
  (``12<|im_end|>3`` was 123 in the study, ``12<|eot_id|>3`` was 3; both are 12 here). Markers that open
  a turn or a text (``<s>``, ``<|im_start|>assistant``...) are skipped when they lead, and an end-of-turn
  marker that leads leaves an empty answer (``<|im_end|>B`` was B, is empty here);
* ``<think>`` blocks go whatever their case (``<THINK>Option A?</THINK>B`` was A, is B), and a ``</think>``
  left without its opening (the template put ``<think>`` in the prompt) drops the reasoning before it
  (``Option A? No.</think>B`` was A, is B). An unclosed ``<think>`` stays, as in the study;
* numbers are compared by exact value, never through ``float`` (the study read
  12345678901234567891 and 12345678901234567890 both as 12345678901234567168, so they matched);
  digits of any script are read as their value, as the study's ``float`` did (``١٨٦`` and ``１８６`` are
  186), and so are the Unicode minus, the full-width ``．，－`` and the Arabic ``٫٬`` (``１８６．５`` was 5,
  is 186.5; ``−5`` was 5, is -5);
* a dash right before digits after "answer" is a minus sign (``The answer -5`` was 5, is -5);
* the multiple-choice "answer" marker accepts the JSON-ish quoted form (``{"answer": "C", "why": "not A"}``
  was A, is C);
* the last-resort option letter must be an upper-case standalone letter in the original text
  (the study upper-cased first, so the English article "a" counted as option A).

Everything here is pure string work, with no torch, so the client CLI can score prediction
files without the GPU stack.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from decimal import Decimal

# Markers of the chat templates users are likely to run (ChatML/Qwen, Llama 3, Gemma,
# Phi-3, Mistral/Llama 2, GPT-2-style). Start markers are listed too: a model that runs past
# its end-of-turn sometimes opens the next turn, and whatever follows is no longer its answer.
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
# The markers that close a turn or a text. Leading the output, they mean the model answered
# nothing; every other marker (a BOS, a turn or header opener, a header closer, a pad or other
# special token) carries no answer of its own there and is skipped.
_TURN_ENDS = frozenset(
    ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<end_of_turn>",
     "<eos>", "</s>")
)
# Openers followed by a role name on the same line ("<|im_start|>assistant\n"): the role goes with them.
_ROLE_OPENERS = frozenset(("<|im_start|>", "<|start_header_id|>", "<start_of_turn>"))
_ROLE = re.compile(r"[ \t]*(?:assistant|model|user|system)(?=[ \t]*(?:\r?\n|<\|end_header_id\|>|\Z))")
# Tokenizers may list the reasoning tags among their special tokens; the think rules own them.
_THINK_TAGS = frozenset(("<think>", "</think>"))

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
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

# The number rules run on text whose digits were folded to ASCII (``ascii_digits``), so the
# patterns name ASCII digits only.
_NUMBER = re.compile(r"-?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")
_NUMBER_MARKERS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern, re.IGNORECASE)
    # A dash directly before a digit is a minus sign, not a separator: "answer -5" is -5.
    for pattern in (
        r"final answer\s*(?::|-(?![0-9]))",
        r"answer\s*(?::|-(?![0-9]))",
        r"the answer is",
        r"therefore,?",
    )
)
_PLAIN_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
_TRAILING_PUNCTUATION = ".$,;:"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

# Signs and separators of other scripts that play the ASCII ones' part in a number. The en dash
# is left out on purpose: "3–5" is a range, not 3 and -5.
_NUMBER_PUNCTUATION = {
    "\u2212": "-",  # MINUS SIGN
    "\uff0d": "-",  # FULLWIDTH HYPHEN-MINUS
    "\uff0e": ".",  # FULLWIDTH FULL STOP
    "\uff0c": ",",  # FULLWIDTH COMMA
    "\u066b": ".",  # ARABIC DECIMAL SEPARATOR
    "\u066c": ",",  # ARABIC THOUSANDS SEPARATOR
}


class _AsciiDigitTable(dict[int, int | str]):
    """A ``str.translate`` table built on demand: there are 660 decimal digits across Unicode, and
    listing them up front would mean walking every code point at import."""

    def __missing__(self, code: int) -> int | str:
        char = chr(code)
        value = unicodedata.decimal(char, None)
        mapped: int | str = str(value) if value is not None else _NUMBER_PUNCTUATION.get(char, code)
        self[code] = mapped
        return mapped


_ASCII_DIGITS = _AsciiDigitTable()


def ascii_digits(text: str) -> str:
    """``text`` with every decimal digit of any script as its ASCII digit, and number signs and separators as ASCII.

    One character for one, so positions are kept. The study's ``float`` read ``١٨٦`` as 186;
    folding first keeps that while the comparison stays exact.
    """
    if text.isascii():
        return text
    return text.translate(_ASCII_DIGITS)


def _answer_span(text: str, markers: Sequence[str]) -> str:
    """The text between the markers that may lead an answer and the first marker after it.

    A marker never gets deleted in place: that would glue the text around it ("B<|im_start|>user"
    would read "Buser"). Leading markers that end a turn are not skipped, so the span is empty.
    """
    skippable = sorted((m for m in markers if m not in _TURN_ENDS), key=len, reverse=True)
    start = 0
    while True:
        while start < len(text) and text[start].isspace():
            start += 1
        marker = next((m for m in skippable if text.startswith(m, start)), None)
        if marker is None:
            break
        start += len(marker)
        if marker in _ROLE_OPENERS:
            role = _ROLE.match(text, start)
            if role:
                start = role.end()
    found = (text.find(m, start) for m in markers)
    end = min((i for i in found if i >= 0), default=len(text))
    return text[start:end]


def clean_output(text: str, extra_markers: Sequence[str] = ()) -> str:
    """What is left of an answer once reasoning, template markers and emphasis are gone.

    Closed ``<think>`` blocks go first, in any case, so a marker inside one cannot end the answer.
    Then the answer is cut at its first marker (see ``_answer_span``), and only after that is a
    ``</think>`` left without its opening looked for: what precedes it is reasoning whose ``<think>``
    was in the prompt, while one in text the cut dropped (the next turn) must not cost the answer.
    An unclosed ``<think>`` stays, as in the study: it may hold the only answer the model gave
    before running out of tokens, and the extractors can still find it there.
    """
    markers = [m for m in dict.fromkeys((*END_MARKERS, *extra_markers)) if m and m.lower() not in _THINK_TAGS]
    cleaned = _answer_span(_THINK_BLOCK.sub("", text), markers)
    closers = list(_THINK_CLOSE.finditer(cleaned))
    if closers:
        cleaned = cleaned[closers[-1].end() :]
    for token in _EMPHASIS:
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
    """A canonical ASCII spelling of a number, so "1,234", "1234.", "1234.0" and "١٢٣٤" compare equal.

    Works on the digits rather than through ``float`` so large integers and long decimals
    are never rounded. Text that is not a plain number comes back stripped and unchanged.
    """
    stripped = text.strip()
    candidate = ascii_digits(stripped).replace(",", "").rstrip(_TRAILING_PUNCTUATION).lstrip("$").strip()
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


def number_value(text: str) -> Decimal | None:
    """The exact value of a number written as the extractors find one (``-1,234.5``), in any digit script; else None.

    Only that form is read: ``Decimal`` alone would also take "NaN" and "Infinity", and a NaN
    does not equal itself, so a word answer could fail to match its own gold.
    """
    folded = ascii_digits(text.strip())
    return Decimal(normalize_number(folded)) if _NUMBER.fullmatch(folded) else None


def numbers_match(prediction: str, gold: str) -> bool:
    """Equal by exact value when both sides are numbers, else equal as text (word answers)."""
    predicted, expected = number_value(prediction), number_value(gold)
    if predicted is not None and expected is not None:
        return predicted == expected
    return prediction == gold


def last_number(text: str) -> str | None:
    """The last number written in ``text``, its digits in ASCII, or None when it has none."""
    numbers = _NUMBER.findall(ascii_digits(text))
    return numbers[-1] if numbers else None


def extract_number(text: str) -> str:
    """The final number of a numeric answer, normalized; word answers come back upper-cased.

    A marker only counts when a number follows it; otherwise the next marker is tried, then
    the whole text. Non-numeric answers (weekdays, months) fall back to the last line
    upper-cased, which is how the study compared them; that line is taken as written, so
    folding digits changes nothing for them.
    """
    folded = ascii_digits(text)
    for pattern in _NUMBER_MARKERS:
        match = pattern.search(folded)
        if match:
            number = last_number(folded[match.end() :])
            if number is not None:
                return normalize_number(number)
    number = last_number(folded)
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
