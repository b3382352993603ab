"""TRACE-format task files: malformed input is reported with file, row and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slmcl.errors import DataError
from slmcl.tasks.data import Example, file_sha256, load_examples


def write(tmp_path: Path, content: Any, name: str = "rows.json") -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content, encoding="utf-8")
    else:
        p.write_text(json.dumps(content), encoding="utf-8")
    return p


def load_error(path: Path, **kw: Any) -> str:
    with pytest.raises(DataError) as info:
        load_examples(path, **kw)
    return str(info.value)


def test_reads_rows_in_order(tmp_path: Path) -> None:
    p = write(tmp_path, [{"prompt": "p0", "answer": "A"}, {"prompt": "p1", "answer": "B", "extra": 1}])
    assert load_examples(p) == [Example(0, "p0", "A"), Example(1, "p1", "B")]


def test_missing_file(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "nope.json")
    assert "nope.json" in msg and "file not found" in msg


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    assert "file not found" in load_error(tmp_path)


def test_non_utf8(tmp_path: Path) -> None:
    p = write(tmp_path, b'[{"prompt": "caf\xe9", "answer": "A"}]')
    msg = load_error(p)
    assert "not UTF-8" in msg and str(p) in msg and "byte 16" in msg  # the é is byte 16 (0-based)


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, '[\n  {"prompt": "x", "answer": "A"},\n  {"prompt": "y" "answer": "B"}\n]')
    msg = load_error(p)
    assert "not valid JSON" in msg
    assert "line 3 column 18" in msg


def test_not_a_list(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, {"prompt": "x", "answer": "A"}))
    assert "expected a JSON list" in msg and "dict" in msg


def test_empty_list(tmp_path: Path) -> None:
    assert "no rows" in load_error(write(tmp_path, []))


def test_row_not_an_object(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, [{"prompt": "x", "answer": "A"}, ["x", "A"]]))
    assert "row 1" in msg and "expected an object" in msg and "list" in msg


def test_missing_key_names_row_and_key(tmp_path: Path) -> None:
    rows = [{"prompt": "x", "answer": "A"}, {"prompt": "y", "answer": "B"}, {"prompt": "z"}]
    msg = load_error(write(tmp_path, rows))
    assert "row 2" in msg and "'answer'" in msg and "'prompt'" not in msg


def test_missing_both_keys(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, [{"question": "x"}]))
    assert "row 0" in msg and "'prompt'" in msg and "'answer'" in msg


@pytest.mark.parametrize("prompt", ["", "   \n", None, 3])
def test_empty_or_non_string_prompt(tmp_path: Path, prompt: Any) -> None:
    msg = load_error(write(tmp_path, [{"prompt": prompt, "answer": "A"}]))
    assert "row 0" in msg and "'prompt' must be a non-empty string" in msg


@pytest.mark.parametrize("answer, fragment", [("", "'answer' is empty"), (" ", "'answer' is empty"),
                                              (None, "NoneType"), (True, "bool"), (["A"], "list")])
def test_bad_answer(tmp_path: Path, answer: Any, fragment: str) -> None:
    msg = load_error(write(tmp_path, [{"prompt": "x", "answer": answer}]))
    assert "row 0" in msg and fragment in msg


def test_numbers_as_answers_become_strings(tmp_path: Path) -> None:
    rows = load_examples(write(tmp_path, [{"prompt": "x", "answer": 186}, {"prompt": "y", "answer": 2.5}]))
    assert [r.answer for r in rows] == ["186", "2.5"]
    assert all(isinstance(r.answer, str) for r in rows)


def test_limit_keeps_the_first_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]
    got = load_examples(write(tmp_path, rows), limit=3)
    assert [(e.index, e.prompt) for e in got] == [(0, "p0"), (1, "p1"), (2, "p2")]
    assert len(load_examples(write(tmp_path, rows), limit=100)) == 10


def test_limit_does_not_validate_rows_past_it(tmp_path: Path) -> None:
    p = write(tmp_path, [{"prompt": "x", "answer": "A"}, {"bad": 1}])
    assert len(load_examples(p, limit=1)) == 1
    assert "row 1" in load_error(p)


def test_task_name_is_read_when_present(tmp_path: Path) -> None:
    rows = [{"prompt": "x", "answer": "A", "task_name": "fomc"}, {"prompt": "y", "answer": "1"},
            {"prompt": "z", "answer": "2", "task_name": None}]
    got = load_examples(write(tmp_path, rows))
    assert [e.task_name for e in got] == ["fomc", "", ""]


def test_real_reference_file_has_task_names(data_dir: Path) -> None:
    rows = load_examples(data_dir / "reference.json")
    assert len(rows) == 48
    assert {r.task_name for r in rows} >= {"fomc", "scienceqa", "numgluecm"}


def test_file_sha256_changes_with_content(tmp_path: Path) -> None:
    a = write(tmp_path, [{"prompt": "x", "answer": "A"}], "a.json")
    b = write(tmp_path, [{"prompt": "x", "answer": "B"}], "b.json")
    c = write(tmp_path, [{"prompt": "x", "answer": "A"}], "c.json")
    assert file_sha256(a) == file_sha256(c) != file_sha256(b)
    assert len(file_sha256(a)) == 64
