"""``build_report``: a results directory in, ``OUT/index.html`` + ``OUT/tables/`` + ``OUT/figures/`` out.

OUT may be a folder the user already keeps things in, so the report deletes nothing it did not
write: it lists its files (and each figure's size in pixels) in ``OUT/.slmcl-report.json``, and on a
rebuild removes only the files of the previous list that the new report no longer writes (the
figures of a model no longer in the results), never anything else. ``index.html`` is written last
and atomically, so a reader never opens a page whose figures are missing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from slmcl.errors import SlmclError
from slmcl.report.study import load_study
from slmcl.report.study_tables import RENDERERS, study_tables

MANIFEST = ".slmcl-report.json"
OWN_DIRS = ("tables", "figures")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for sharing, like the figures beside it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _previous_files(out: Path) -> set[str]:
    try:
        listed = json.loads((out / MANIFEST).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in listed if isinstance(f, str)}


def _remove_stale(out: Path, stale: set[str]) -> None:
    """Delete files an earlier report wrote and this one does not: only plain files under tables/ or figures/."""
    root = out.resolve()
    for rel in sorted(stale):
        parts = Path(rel).parts
        if len(parts) != 2 or parts[0] not in OWN_DIRS or ".." in parts:
            continue
        path = (out / rel).resolve()
        if path.parent.parent == root and path.is_file() and not path.is_symlink():
            path.unlink()


def build_report(results_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the report of ``results_dir`` into ``out_dir`` (created if needed); returns ``index.html``'s path.

    Raises ``NotFoundError`` when ``results_dir`` is not an slmcl results directory.
    """
    from slmcl.report.figures import build_figures
    from slmcl.report.html import render_html

    study = load_study(results_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlmclError(f"{out}: the report's output exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    before = _previous_files(out)

    written: list[str] = []
    tables = study_tables(study)
    for table in tables:
        for ext, render in RENDERERS.items():
            rel = f"tables/{table.name}.{ext}"
            _write(out / rel, render(table))
            written.append(rel)
    figures = build_figures(study, out)
    written += [p for f in figures for p in (f.png, f.svg)]

    index = out / "index.html"
    _write(index, render_html(study, tables, figures, out))
    _remove_stale(out, before - set(written))
    _write(out / MANIFEST, json.dumps({
        "results_dir": str(study.path.resolve()), "files": sorted(written),
        "figures": [{"name": f.name, "width": f.width, "height": f.height} for f in figures]}, indent=1))
    return index
