"""The benchmark's Markdown report: one table row per result row, and a checks line that is never blank."""

from __future__ import annotations

from typing import Any

from bench.run_bench import markdown


def _result(checks: dict[str, Any]) -> dict[str, Any]:
    return {
        "device_name": "test cpu", "date": "2026-12-02", "model": "tiny", "dtype": "float32", "reps": 3,
        "wall_seconds": 12.0, "sizes": {"eval_rows": 2}, "checks": checks,
        "versions": {"torch": "x"}, "loadavg_start": [0.0], "loadavg_end": [0.0],
        "rows": [
            {"name": "eval_seconds", "unit": "s/checkpoint", "naive": 47.18, "ours": 14.85, "ratio": 3.177,
             "note": "n"},
            {"name": "stability_base_p0_seconds", "unit": "s once", "naive": None, "ours": 2.42, "ratio": None,
             "note": ""},
        ],
    }


def test_rows_render_with_ratios_and_dashes_for_missing_values() -> None:
    text = markdown(_result({"eval_answer_agreement": 1.0}))
    assert "| eval_seconds | s/checkpoint | 47.18 | 14.85 | 3.18x | n |" in text
    assert "| stability_base_p0_seconds | s once | — | 2.42 | — |  |" in text
    assert "Checks (naive vs ours on the same inputs): eval_answer_agreement=1.0" in text


def test_a_report_without_checks_says_so() -> None:
    line = next(ln for ln in markdown(_result({})).splitlines() if ln.startswith("Checks"))
    assert line.endswith("none in these rows (the service tests check the services' answers)")
