"""Task data: TRACE-format JSON files (a list of ``{"prompt", "answer"}`` rows).

A malformed row is reported with its file, row number and what is wrong, because users
bring their own data and a bare KeyError deep inside training helps nobody.

Files are read incrementally (``iter_rows``): chunks of bytes decoded as UTF-8 as they come and
one row object decoded at a time, so checking a file of any size holds one chunk and one row,
never the whole file (let alone the file as bytes *and* as text). ``scan_data`` checks every row
and hashes the bytes in the same pass; ``load_examples`` keeps the first rows for training and
evaluation. The CLI, the embedded runner and the monitor (on uploaded bytes) use the same reader,
so a bad file gets the same message wherever it is found.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from slmcl.errors import DataError, LimitExceededError

if TYPE_CHECKING:
    from slmcl.config.spec import ExperimentSpec

CHUNK_BYTES = 1 << 20
_WHITESPACE = " \t\n\r"
# How close to the end of what is buffered a decode error must be to mean "read more" rather than "malformed":
# a truncated number, literal or \\u escape fails a few characters before the buffer's end.
_TRUNCATION_MARGIN = 16
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Example:
    index: int  # row number in the file (0-based), kept so predictions point back to the data
    prompt: str
    answer: str
    task_name: str = ""  # the reference set mixes tasks: each row is rendered with its task's instruction


@dataclass(frozen=True)
class DataSummary:
    """What one full pass over a file found: every row valid, how many, and the bytes' hash."""

    rows: int
    sha256: str
    size: int


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ByteReader(Protocol):
    """What the row parser reads from: a binary file, a ``BytesIO``, or a wrapper such as ``_HashingReader``."""

    def read(self, n: int, /) -> bytes: ...


class _HashingReader:
    """Feeds every byte read through a hash and counts them, so one pass both checks and fingerprints a file."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


class _Text:
    """The decoded text of a byte stream, buffered from the first unconsumed character.

    Keeps what a JSON error message needs (line and column in the whole file) for the part of the
    text already dropped from the buffer.
    """

    def __init__(self, stream: Any, name: str) -> None:
        self.stream = stream
        self.name = name
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.bytes_fed = 0
        self.lines_before = 0  # newlines in the text dropped from the buffer
        self.column_before = 0  # characters after the last dropped newline

    def more(self, at_least: int = CHUNK_BYTES) -> bool:
        """Append at least one more chunk of text; False at the end of the stream."""
        if self.eof:
            return False
        data = self.stream.read(max(at_least, CHUNK_BYTES))
        final = not data
        try:
            text = self.decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            pending = len(self.decoder.getstate()[0])  # bytes of the last call still undecoded: the error counts them
            byte = self.bytes_fed - pending + exc.start
            raise DataError(f"{self.name}: not UTF-8 text ({exc.reason} at byte {byte})") from None
        self.bytes_fed += len(data)
        if final:
            self.eof = True
        self.buf += text
        return bool(text) or not final

    def compact(self) -> None:
        """Drop the consumed text (kept only as a line/column offset)."""
        if self.pos < CHUNK_BYTES:
            return
        dropped = self.buf[: self.pos]
        newlines = dropped.count("\n")
        if newlines:
            self.lines_before += newlines
            self.column_before = len(dropped) - dropped.rindex("\n") - 1
        else:
            self.column_before += len(dropped)
        self.buf = self.buf[self.pos:]
        self.pos = 0

    def skip_ws(self) -> str:
        """The next non-blank character ("" at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            self.compact()
            if not self.more():
                return ""

    def where(self, pos: int) -> str:
        newlines = self.buf.count("\n", 0, pos)
        line = self.lines_before + newlines + 1
        column = pos - self.buf.rindex("\n", 0, pos) if newlines else self.column_before + pos + 1
        return f"line {line} column {column}"

    def invalid(self, pos: int, msg: str) -> DataError:
        return DataError(f"{self.name}: not valid JSON ({self.where(pos)}: {msg})")

    def value(self) -> Any:
        """Decode the JSON value that starts at ``pos``, reading more while it may merely be incomplete."""
        self.compact()  # the buffer holds this row and what follows, never the rows before it
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                incomplete = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf) - _TRUNCATION_MARGIN
                # doubling what is read keeps one huge row linear, not quadratic, in its size
                if incomplete and self.more(len(self.buf) - self.pos):
                    continue
                raise self.invalid(exc.pos, exc.msg) from None
            if end >= len(self.buf) and not self.eof and not isinstance(value, (dict, list, str)):
                # a number or literal at the buffer's end may go on in the next chunk ("12" of "125")
                if self.more():
                    continue
            self.pos = end
            return value


_KIND_OF_FIRST = {"{": "dict", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}


def iter_rows(source: str | Path | ByteReader, *, name: str | None = None,
              max_rows: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row number, row object)`` of a JSON array of objects, reading ``source`` a chunk at a time.

    ``source`` is a path or a binary stream (uploaded bytes in a ``BytesIO``); ``name`` is what messages call
    it. Raises DataError naming the file (and the row, or the line and column) for non-UTF-8 bytes, text that
    is not JSON, a top level that is not a list, a row that is not an object and an empty list;
    LimitExceededError past ``max_rows`` rows.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: file not found (set data_dir or SLMCL_DATA_DIR to your copy of the TRACE data)")
        with open(path, "rb") as fh:
            yield from iter_rows(fh, name=name or str(path), max_rows=max_rows)
        return
    text = _Text(source, name or "<data>")
    first = text.skip_ws()
    if first != "[":
        if first in _KIND_OF_FIRST or first.isdigit() or first == "-":
            kind = _KIND_OF_FIRST.get(first, "number")
            raise DataError(f"{text.name}: expected a JSON list of {{\"prompt\", \"answer\"}} rows, got {kind}")
        raise text.invalid(text.pos, "Expecting value")
    text.pos += 1
    index = 0
    while True:
        c = text.skip_ws()
        if c == "]" and index == 0:
            raise DataError(f"{text.name}: the file holds no rows")
        if c == "":
            raise text.invalid(text.pos, "Expecting value" if index == 0 else "Expecting ',' delimiter")
        if max_rows is not None and index >= max_rows:
            raise LimitExceededError(f"{text.name}: more than {max_rows} rows (the limit of this service)")
        row = text.value()
        if not isinstance(row, dict):
            raise DataError(f"{text.name} row {index}: expected an object with 'prompt' and 'answer', "
                            f"got {type(row).__name__}")
        yield index, row
        index += 1
        c = text.skip_ws()
        if c == ",":
            text.pos += 1
            if text.skip_ws() == "]":
                raise text.invalid(text.pos, "Expecting value")
            continue
        if c == "]":
            text.pos += 1
            break
        raise text.invalid(text.pos, "Expecting ',' delimiter")
    if text.skip_ws() != "":
        raise text.invalid(text.pos, "Extra data")


def example(row: dict[str, Any], index: int, name: str) -> Example:
    """One row checked: a non-empty string prompt and a string or numeric answer."""
    where = f"{name} row {index}"
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
    return Example(index=index, prompt=prompt, answer=answer, task_name=str(task_name or ""))


def load_examples(path: str | Path, *, limit: int | None = None) -> list[Example]:
    """Read a TRACE-format file; ``limit`` keeps the first N rows (deterministic subsets).

    Rows past ``limit`` are not read at all (training and evaluation load their subsets often);
    ``scan_data`` is the check of a whole file.
    """
    name = str(path)
    examples: list[Example] = []
    if limit is not None and limit <= 0:
        return examples
    for index, row in iter_rows(path, name=name):
        examples.append(example(row, index, name))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def scan_data(source: str | Path | IO[bytes], *, name: str | None = None,
              max_rows: int | None = None) -> DataSummary:
    """Check every row of a file (or stream) and hash its bytes in the same pass; nothing is kept."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: file not found (set data_dir or SLMCL_DATA_DIR to your copy of the TRACE data)")
        with open(path, "rb") as fh:
            return scan_data(fh, name=name or str(path), max_rows=max_rows)
    reader = _HashingReader(source)
    label = name or "<data>"
    rows = 0
    for index, row in iter_rows(reader, name=label, max_rows=max_rows):
        example(row, index, label)
        rows += 1
    while reader.read(CHUNK_BYTES):  # whatever trailing whitespace the parser did not need, for the hash
        pass
    return DataSummary(rows=rows, sha256=reader.sha.hexdigest(), size=reader.size)


def spec_data_files(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """(spec field, path) of every data file a spec reads, in the spec's order."""
    out: list[tuple[str, str]] = []
    for i, t in enumerate(spec.tasks):
        out += [(f"tasks[{i}].train_file", t.train_file), (f"tasks[{i}].test_file", t.test_file)]
    out.append(("reference.file", spec.reference.file))
    return out


def check_data(spec: ExperimentSpec) -> dict[str, DataSummary]:
    """Every row of every data file of a spec, each file once: {path: summary}. The first bad row raises,
    naming the spec field, the file and the row."""
    summaries: dict[str, DataSummary] = {}
    for field_name, path in spec_data_files(spec):
        if path in summaries:
            continue
        try:
            summaries[path] = scan_data(path)
        except DataError as exc:
            raise DataError(f"{field_name}: {exc}") from None
    return summaries


__all__ = ["CHUNK_BYTES", "DataSummary", "Example", "check_data", "example", "file_sha256", "iter_rows",
           "load_examples", "scan_data", "spec_data_files"]
