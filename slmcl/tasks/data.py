"""Task data: TRACE-format JSON files (a list of ``{"prompt", "answer"}`` rows).

A malformed row is reported with its file, row number and what is wrong, because users
bring their own data and a bare KeyError deep inside training helps nobody.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from slmcl.errors import DataError


@dataclass(frozen=True)
class Example:
    index: int  # row number in the file (0-based), kept so predictions point back to the data
    prompt: str
    answer: str
    task_name: str = ""  # the reference set mixes tasks: each row is rendered with its task's instruction


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_examples(path: str | Path, *, limit: int | None = None) -> list[Example]:
    """Read a TRACE-format file; ``limit`` keeps the first N rows (deterministic subsets)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data_dir or SLMCL_DATA_DIR to your copy of the TRACE data)")
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of {{\"prompt\", \"answer\"}} rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    examples: list[Example] = []
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path} row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
        answer = str(answer)
        if not answer.strip():
            raise DataError(f"{where}: 'answer' is empty")
        task_name = row.get("task_name", "")
        examples.append(Example(index=i, prompt=prompt, answer=answer, task_name=str(task_name or "")))
    return examples
