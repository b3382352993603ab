"""The incremental reader: the same rows and the same messages as reading the file whole, at any chunk size,
in bounded memory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from slmcl.errors import DataError, LimitExceededError
from slmcl.tasks import data
from slmcl.tasks.data import file_sha256, iter_rows, load_examples, scan_data

ROWS: list[dict[str, Any]] = [
    {"prompt": "caf\u00e9 \u2014 na\u00efve \U0001f600", "answer": "A", "task_name": "fomc"},
    {"prompt": "escapes \\\" \n \t \u0000 \U0001f600", "answer": 12345.5e-3},
    {"prompt": "nested", "answer": "B", "meta": {"a": [1, 2, {"b": None}], "t": True, "f": False}},
    {"prompt": "x" * 5000, "answer": "-17"},
    {"prompt": "last", "answer": 1e10},
]


@pytest.fixture(params=[1, 2, 3, 7, 64, 1 << 20])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every chunk size cuts rows, strings, numbers, escapes and multi-byte characters somewhere."""
    monkeypatch.setattr(data, "CHUNK_BYTES", request.param)
    return int(request.param)


def _error(text: bytes, **kw: Any) -> str:
    with pytest.raises(DataError) as info:
        scan_data(io.BytesIO(text), name="f.json", **kw)
    return str(info.value)


@pytest.mark.parametrize("indent, ascii", [(None, False), (2, False), (None, True)])
def test_rows_equal_json_loads_at_any_chunk_size(chunk: int, indent: int | None, ascii: bool) -> None:
    raw = json.dumps(ROWS, indent=indent, ensure_ascii=ascii).encode()  # ascii: \uXXXX escapes, surrogate pairs
    got = [row for _, row in iter_rows(io.BytesIO(raw), name="f.json")]
    assert got == json.loads(raw)
    summary = scan_data(io.BytesIO(raw + b"\n  \n"), name="f.json")
    assert summary.rows == len(ROWS) and summary.size == len(raw) + 4


@pytest.mark.parametrize("text", [
    b'[\n  {"prompt": "x", "answer": "A"},\n  {"prompt": "y" "answer": "B"}\n]',
    b'[{"prompt": "x", "answer": "A"}',
    b'[{"prompt": "x", "answer": "A"},]',
    b'[{"prompt": "x", "answer": "A"}] trailing',
    b'[{"prompt": "x", "answer": tru}]',
    b'[{"prompt": "x", "answer": "\\u12"}]',
    b'\n\n   [{"prompt": "x", "answer": "A"}\n\n  {"prompt": "y"}]',
    b'',
    b'hello',
    b'[{"prompt": "unterminated',
])
def test_json_errors_name_the_same_line_and_column_as_json_loads(chunk: int, text: bytes) -> None:
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    msg = _error(text)
    assert msg.startswith("f.json: not valid JSON (")
    assert f"line {want.value.lineno} column {want.value.colno}" in msg, msg


def test_line_and_column_count_text_already_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "CHUNK_BYTES", 16)
    good = ",\n".join(json.dumps({"prompt": f"p{i}", "answer": "A"}) for i in range(500))
    text = ("[" + good + ',\n  {"prompt": "z",, "answer": "A"}]').encode()
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    assert f"line {want.value.lineno} column {want.value.colno}" in _error(text)


def test_non_utf8_names_the_byte_at_any_chunk_size(chunk: int) -> None:
    text = '[{"prompt": "\u00e9\u00e9", "answer": "A"}, {"prompt": "caf'.encode() + b'\xe9", "answer": "B"}]'
    msg = _error(text)
    assert "not UTF-8" in msg and f"byte {text.index(b'caf') + 3}" in msg, msg


def test_truncated_multibyte_character_at_the_end() -> None:
    msg = _error('[{"prompt": "\u00e9'.encode()[:-1])
    assert "not UTF-8" in msg


@pytest.mark.parametrize("rows, fragment", [
    ([], "the file holds no rows"),
    ([{"prompt": "x", "answer": "A"}, {"prompt": "y"}], "row 1: missing key(s) 'answer'"),
    ([{"prompt": "x", "answer": "A"}, {"answer": "B"}], "row 1: missing key(s) 'prompt'"),
    ([{"prompt": "x", "answer": "A"}, ["x", "A"]], "row 1: expected an object"),
    ([{"prompt": "x", "answer": "A"}] * 3 + [{"prompt": "", "answer": "A"}], "row 3: 'prompt' must be"),
    ({"prompt": "x", "answer": "A"}, "expected a JSON list"),
    ("text", "expected a JSON list"),
    (12, "expected a JSON list"),
])
def test_row_errors_name_file_and_row(chunk: int, rows: Any, fragment: str) -> None:
    msg = _error(json.dumps(rows).encode())
    assert msg.startswith("f.json") and fragment in msg, msg


def test_scan_checks_every_row_and_hashes_the_bytes(tmp_path: Path) -> None:
    p = tmp_path / "rows.json"
    p.write_text(json.dumps([{"prompt": f"p{i}", "answer": str(i)} for i in range(50)] + [{"bad": 1}]))
    assert len(load_examples(p, limit=10)) == 10  # a subset reads only its rows
    with pytest.raises(DataError, match=r"rows.json row 50: missing key"):
        scan_data(p)
    p.write_text(json.dumps([{"prompt": f"p{i}", "answer": str(i)} for i in range(50)]))
    summary = scan_data(p)
    assert (summary.rows, summary.sha256, summary.size) == (50, file_sha256(p), p.stat().st_size)


def test_row_limit_is_a_limit_error() -> None:
    text = json.dumps([{"prompt": "x", "answer": "A"}] * 5).encode()
    assert scan_data(io.BytesIO(text), max_rows=5).rows == 5
    with pytest.raises(LimitExceededError, match="more than 4 rows"):
        scan_data(io.BytesIO(text), name="f.json", max_rows=4)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json: file not found"):
        scan_data(tmp_path / "nope.json")


def test_peak_memory_stays_far_below_the_file_size(tmp_path: Path) -> None:
    """A ~20 MB file checked in a fresh process: its peak RSS grows by a small fraction of the file."""
    path = tmp_path / "big.json"
    row = {"prompt": "Question: " + "lorem ipsum dolor sit amet " * 20, "answer": "A", "task_name": "fomc"}
    line = json.dumps(row)
    n = 20_000_000 // (len(line) + 2)
    with open(path, "w") as fh:
        fh.write("[\n")
        for i in range(n):
            fh.write(line + (",\n" if i < n - 1 else "\n"))
        fh.write("]\n")
    size = path.stat().st_size
    code = textwrap.dedent(f"""
        import resource
        from slmcl.tasks.data import scan_data
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = scan_data({str(path)!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(s.rows, (after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    rows, grown = int(out[0]), int(out[1])
    assert rows == n
    assert grown < size / 4, f"peak RSS grew by {grown / 1e6:.1f} MB checking a {size / 1e6:.1f} MB file"
