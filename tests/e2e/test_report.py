"""`build_report` on a real (tiny) experiment: tables equal to the metrics module's, valid figures, an HTML
page that needs no network, sparse evaluations never drawn as 0, and an OUT folder whose other files survive.

One tiny run (two orders, one the reverse of the other, two seeds) is shared by the module. The tiny random
model scores 0 on every task, so a table could swap cells or formulas and still match; its records' accuracies
are replaced by distinct deterministic values (the base shared by every run, as in a real experiment) and the
results tables rebuilt from them, so every number below can only match if the report computes it right.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import platform
import random
import re
import shutil
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html import escape
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmcl.config.spec import spec_from_dict
from slmcl.errors import NotFoundError
from slmcl.protocol.embedded import ExperimentRunner
from slmcl.protocol.layout import order_id
from slmcl.protocol.records import StageRecord
from slmcl.protocol.results import read_stages
from slmcl.protocol.tables import avg_accuracy, write_tables
from slmcl.report import build_report, load_study
from slmcl.report.study import Stat, order_roles
from slmcl.report.study_tables import fmt_stat, latex_escape, latex_number
from slmcl.storage.local import LocalStore
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.slow

ORDERS = [["fomc", "numgluecm"], ["numgluecm", "fomc"]]
SEEDS = [1, 2]
# Smaller than tiny_spec_dict's defaults: the report reads records, it does not need more examples.
SMALL: dict[str, Any] = {
    "training": {"max_examples": 4, "batch_size": 2, "grad_accum": 1},
    "evaluation": {"max_examples": 2, "max_new_tokens": 4},
    "reference": {"max_examples": 3},
    "monitoring": {"attribution": False, "task_drift_examples": 2},
}
TABLES = ("task_acquisition", "cl_metrics", "stability", "order_robustness")
FIXED_SIZES = {"kl_vs_accuracy": (1100, 550), "avg_accuracy_by_step": (1100, 550),
               "stability_trajectories": (1300, 440)}
TOTAL = 40  # examples per task in the rewritten scores: accuracies in steps of 1/40


def _stage_files(root: Path) -> Iterator[Path]:
    return iter(sorted(root.glob("runs/*/stage-*.json")))


def _rewrite_accuracies(root: Path) -> None:
    for path in _stage_files(root):
        rec = StageRecord.from_json(path.read_text())
        for task, score in rec.scores.items():
            rng = random.Random(f"base/{task}" if rec.step == 0 else f"{rec.run_id}/{rec.step}/{task}")
            correct = rng.randint(0, TOTAL)
            score.update(correct=correct, total=TOTAL, accuracy=correct / TOTAL, score_sum=float(correct))
        path.write_text(rec.to_json())
    store = LocalStore(root)
    write_tables(store, read_stages(store))  # summary.json and the CSVs agree with the rewritten records


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("report-results") / "out"
    spec = tiny_spec_dict(tiny_model_dir, data_dir, out, orders=ORDERS, seeds=SEEDS, **SMALL)
    ExperimentRunner(spec_from_dict(spec)).run()
    _rewrite_accuracies(out)
    return out


@pytest.fixture(scope="module")
def report(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    index = build_report(results, out)
    assert index == out / "index.html"
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def _records(results: Path) -> list[StageRecord]:
    return read_stages(LocalStore(results))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    return (statistics.fmean(values) if values else None, statistics.stdev(values) if len(values) > 1 else None)


def _same(cell: str, expected: float | None) -> bool:
    got = _num(cell)
    return got is None if expected is None else got is not None and math.isclose(got, expected, rel_tol=1e-12,
                                                                                abs_tol=1e-15)


# --------------------------------------------------------------------------- layout


def _label(results: Path) -> str:
    """The model's short name in the report: the tiny model is a local folder, shown by its last component."""
    return Path(_records(results)[0].model).name


def test_the_report_has_its_layout(results: Path, report: Path) -> None:
    for name in TABLES:
        for ext in ("md", "csv", "tex"):
            assert (report / "tables" / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    figures = {p.stem for p in (report / "figures").glob("*.png")}
    assert figures == {p.stem for p in (report / "figures").glob("*.svg")}
    m = _label(results)
    assert figures == {"kl_vs_accuracy", "avg_accuracy_by_step", "stability_trajectories", f"train_loss_{m}",
                       f"matrix_{m}"}


# --------------------------------------------------------------------------- tables


def test_cl_tables_equal_the_metrics_module(results: Path, report: Path) -> None:
    """Every accuracy-based cell against summary.json's metrics (slmcl.metrics: per seed, then mean ± std)."""
    summary = json.loads((results / "summary.json").read_text())
    model = _records(results)[0].model
    expected = {(order_id(e["order"]), m["step"]): m for e in summary["orders"] for m in e["metrics"]}
    columns = {"task_acquisition": {"after_learning": "current_acc", "immediate_gain": "adaptation_gain",
                                    "delta_vs_base": "current_delta_vs_base", "avg_accuracy": "avg_all_tasks"},
               "cl_metrics": {"op": "op", "bwt": "bwt", "fwt": "fwt"}}
    for table, cols in columns.items():
        rows = _csv(report / "tables" / f"{table}.csv")
        assert sorted((r["order"], int(r["step"])) for r in rows) == sorted(
            (order_id(o), k) for o in ORDERS for k in (1, 2))
        for row in rows:
            want = expected[(row["order"], int(row["step"]))]
            assert row["model"] == model and row["seeds"] == "2"
            for col, metric in cols.items():
                assert _same(row[col], want[metric]), (table, row["order"], row["step"], col)
                assert _same(row[f"{col}_std"], want[f"{metric}_std"]), (table, row["order"], row["step"], col)
    # the numbers are not all alike (the check above would be weak if they were)
    accs = {r["after_learning"] for r in _csv(report / "tables" / "task_acquisition.csv")}
    assert len(accs) == 4


def _acc(runs: list[StageRecord], seed: int, step: int, task: str) -> float:
    return float(next(r for r in runs if r.seed == seed and r.step == step).scores[task]["accuracy"])


def test_acquisition_cells_are_the_matrix_differences(results: Path, report: Path) -> None:
    """Independently of the metrics module: R[k][k], R[k][k] - R[k-1][k], R[k][k] - R[0][k], mean of row k."""
    recs = _records(results)
    for row in _csv(report / "tables" / "task_acquisition.csv"):
        k = int(row["step"])
        runs = [r for r in recs if order_id(r.order) == row["order"]]
        task = runs[0].order[k - 1]
        assert row["learned_task"] == task
        def at(seed: int, step: int, runs: list[StageRecord] = runs, task: str = task) -> float:
            return _acc(runs, seed, step, task)

        finals = [next(r for r in runs if r.seed == s and r.step == k) for s in SEEDS]
        cells: dict[str, list[float | None]] = {
            "after_learning": [at(s, k) for s in SEEDS],
            "immediate_gain": [at(s, k) - at(s, k - 1) for s in SEEDS],
            "delta_vs_base": [at(s, k) - at(s, 0) for s in SEEDS],
            "avg_accuracy": [avg_accuracy(r) for r in finals],
        }
        for col, values in cells.items():
            mean, std = _mean_std([v for v in values if v is not None])
            assert _same(row[col], mean) and _same(row[f"{col}_std"], std), (row["order"], k, col)


def test_stability_table_is_the_seed_mean_of_the_records(results: Path, report: Path) -> None:
    recs = _records(results)
    rows = _csv(report / "tables" / "stability.csv")
    assert len(rows) == 4
    fields = {"entropy_delta": "entropy_delta_mean", "margin_delta": "margin_delta_mean",
              "kl_to_base": "kl_to_base_mean", "kl_to_base_p95": "kl_to_base_p95"}
    for row in rows:
        at = [r for r in recs if order_id(r.order) == row["order"] and r.step == int(row["step"])]
        assert len(at) == 2 and row["checkpoint"] == f"after {at[0].checkpoint_task}"
        for col, key in fields.items():
            mean, std = _mean_std([float(r.stability[key]) for r in at])
            assert _same(row[col], mean) and _same(row[f"{col}_std"], std), (row["order"], row["step"], col)
    assert all(float(r["kl_to_base"]) > 0 for r in rows)


def test_order_table_pairs_an_order_with_its_reverse(results: Path, report: Path) -> None:
    recs = _records(results)
    rows = _csv(report / "tables" / "order_robustness.csv")
    assert [r["order"] for r in rows] == ["fomc.numgluecm"]  # the first order of the spec is the original
    row = rows[0]
    for role, order in (("original", ORDERS[0]), ("reversed", ORDERS[1])):
        finals = [r for r in recs if r.order == order and r.step == len(order)]
        assert len(finals) == 2 and row[f"seeds_{role}"] == "2"
        accs = [avg_accuracy(r) for r in finals]
        mean, std = _mean_std([a for a in accs if a is not None])
        assert _same(row[f"final_avg_accuracy_{role}"], mean) and _same(row[f"final_avg_accuracy_{role}_std"], std)
        mean, std = _mean_std([float(r.stability["kl_to_base_mean"]) for r in finals])
        assert _same(row[f"final_kl_to_base_{role}"], mean) and _same(row[f"final_kl_to_base_{role}_std"], std)


def _md_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines[2:]]


def _tex_rows(text: str) -> list[list[str]]:
    body = text.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    return [[c.strip() for c in ln.removesuffix(r"\\").split(" & ")] for ln in body.strip().splitlines()
            if ln.strip() != r"\midrule"]


def test_markdown_and_latex_show_the_csv_numbers(results: Path, report: Path) -> None:
    """Every mean ± std cell of the Markdown and LaTeX files is the CSV's numbers, formatted; booktabs rules."""
    for name in TABLES:
        rows = _csv(report / "tables" / f"{name}.csv")
        md = _md_rows((report / "tables" / f"{name}.md").read_text())
        tex_text = (report / "tables" / f"{name}.tex").read_text()
        tex = _tex_rows(tex_text)
        assert len(md) == len(tex) == len(rows) > 0
        assert all(rule in tex_text for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"))
        header = list(rows[0])
        stat_cols = [c for c in header if f"{c}_std" in header]
        display_cols = [c for c in header if not c.endswith("_std")]
        assert len(md[0]) == len(tex[0]) == len(display_cols)
        for row, md_row, tex_row in zip(rows, md, tex):
            for col in stat_cols:
                stat = Stat(_num(row[col]), _num(row[f"{col}_std"]), 2)
                i = display_cols.index(col)
                assert md_row[i] == fmt_stat(stat) and tex_row[i] == latex_number(fmt_stat(stat)), (name, col)
                assert " ± " in md_row[i] or md_row[i] == "—"  # two seeds: the std is shown
        assert md[0][0] == _label(results)
        assert all(r[0] == "" for r in md[1:])  # the model named once per block, as in the study


def test_latex_escaping_and_one_seed_formatting() -> None:
    assert latex_escape("a_b & 50% #1 {x} $ ~ ^ \\ Δ → ±") == (
        r"a\_b \& 50\% \#1 \{x\} \$ \textasciitilde{} \textasciicircum{} \textbackslash{} $\Delta$ "
        r"$\rightarrow$ $\pm$")
    assert fmt_stat(Stat(0.5, None, 1)) == "0.500"  # one seed: no std
    assert fmt_stat(Stat(0.5, 0.1, 2)) == "0.500 ± 0.100"
    assert fmt_stat(Stat(None, None, 0)) == "—"
    assert fmt_stat(Stat(0.000155, 0.00003, 2)) == "1.55e-04 ± 3.00e-05"  # a tiny KL does not read 0.000
    assert latex_number("1.55e-04 ± 3.00e-05") == r"$1.55\times10^{-4} \pm 3.00\times10^{-5}$"


def test_reversed_orders_are_detected() -> None:
    ab, ba, ac, a = ("a", "b"), ("b", "a"), ("a", "c"), ("a",)
    roles = order_roles([ab, ac, ba, a])
    assert roles == {ab: ("original", ba), ba: ("reversed", ab), ac: ("single", None), a: ("single", None)}
    assert order_roles([ba, ab])[ba] == ("original", ab)  # whichever comes first is the original


# --------------------------------------------------------------------------- figures


def test_figures_are_valid_non_blank_images(report: Path) -> None:
    import matplotlib.image as mpimg

    manifest = json.loads((report / ".slmcl-report.json").read_text())
    sizes = {f["name"]: (f["width"], f["height"]) for f in manifest["figures"]}
    assert set(sizes) == {p.stem for p in (report / "figures").glob("*.png")}
    for name, size in FIXED_SIZES.items():
        assert sizes[name] == size, name
    for name, (width, height) in sizes.items():
        png = report / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = mpimg.imread(png)
        assert pixels.shape[:2] == (height, width), name
        assert float(np.var(pixels[..., :3])) > 0.005, f"{name} looks blank"
        root = ET.parse(report / "figures" / f"{name}.svg").getroot()
        assert root.tag.endswith("svg"), name


# --------------------------------------------------------------------------- the page


def test_html_is_self_contained_and_complete(results: Path, report: Path) -> None:
    import slmcl

    page = (report / "index.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script|<link|@import|url\(", page, re.IGNORECASE)
    for ref in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert ref.startswith(("data:image/png;base64,", "#", "figures/", "tables/")), ref
    for png in (report / "figures").glob("*.png"):
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in page, png.name
    assert escape((results / "spec.yaml").read_text()) in page
    for name in ("torch", "transformers", "peft"):
        assert f"<dt>{name}</dt><dd>{metadata.version(name)}</dd>" in page
    assert f"<dt>Python</dt><dd>{platform.python_version()}</dd>" in page
    assert f"<dt>slmcl</dt><dd>{slmcl.__version__}</dd>" in page
    assert "<dt>device</dt><dd>cpu (environment.json)</dd>" in page  # what the run itself recorded
    assert "run (stage records written)" in page
    for name in TABLES:
        assert f'id="table-{name}"' in page


# --------------------------------------------------------------------------- sparse evaluation


@pytest.fixture(scope="module")
def sparse(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment as ``evaluation.every: 2`` would have left it: stage 1 of one order not evaluated
    (its record keeps its drift and loss, and its scores are empty, as the runner writes them); with an
    ``environment.json`` as a run that records its device and versions would write."""
    out = tmp_path_factory.mktemp("sparse") / "out"
    out.mkdir()
    for name in ("spec.json", "spec.yaml"):
        shutil.copy(results / name, out / name)
    shutil.copytree(results / "runs", out / "runs")
    # what a run that records its environment would leave (the device it resolved "auto" to, say)
    (out / "environment.json").write_text(json.dumps({"device": "cuda:0", "torch": "2.99.0"}))
    for seed in SEEDS:
        path = out / "runs" / f"fomc.numgluecm-s{seed}" / "stage-1.json"
        rec = StageRecord.from_json(path.read_text())
        rec.scores = {}
        path.write_text(rec.to_json())
    return out


def _series(fig: Any) -> dict[str, Any]:
    """The data line of each errorbar series of a figure's first axes, by its legend label."""
    return {str(c.get_label()): c.lines[0] for c in fig.axes[0].containers}


def test_a_stage_without_scores_is_never_plotted_as_zero(sparse: Path, tmp_path: Path) -> None:
    from slmcl.report import figures

    study = load_study(sparse)
    lines = _series(figures.avg_accuracy_figure(study))
    sparse_line = next(line for label, line in lines.items() if "fomc → numgluecm" in label)
    full_line = next(line for label, line in lines.items() if "numgluecm → fomc" in label)
    assert list(sparse_line.get_xdata()) == [0, 2]  # no point at stage 1, not a 0 there
    assert list(full_line.get_xdata()) == [0, 1, 2]

    # the base once, fomc → numgluecm's stage 2, both stages of the other order
    assert len(_series(figures.kl_accuracy_figure(study))) == 1 + 1 + 2

    fig = figures.matrix_figure(study, study.models[0])
    panels = {ax.get_title(): ax for ax in fig.axes if ax.images}
    assert len(panels) == 4  # one per run
    for title, ax in panels.items():
        data = ax.images[0].get_array()
        assert data is not None
        mask = np.ma.getmaskarray(data)
        sparse_run = title.startswith("fomc → numgluecm")
        assert bool(mask[1].all()) == sparse_run and not mask[2].any(), title
        assert bool([t for t in ax.texts if t.get_position()[1] == 1]) != sparse_run  # no number in a blank row

    out = tmp_path / "report"
    build_report(sparse, out)
    rows = {(r["order"], r["step"]): r for r in _csv(out / "tables" / "task_acquisition.csv")}
    assert rows[("fomc.numgluecm", "1")]["after_learning"] == "" and rows[("fomc.numgluecm", "1")]["avg_accuracy"] == ""
    assert rows[("fomc.numgluecm", "2")]["avg_accuracy"] != "" and rows[("numgluecm.fomc", "1")]["avg_accuracy"] != ""
    stab = {(r["order"], r["step"]): r for r in _csv(out / "tables" / "stability.csv")}
    assert float(stab[("fomc.numgluecm", "1")]["kl_to_base"]) > 0  # drift is measured at every stage
    page = (out / "index.html").read_text()
    assert "<dt>device</dt><dd>cuda:0 (environment.json)</dd>" in page  # the run's device, not the report's
    assert "<dt>torch</dt><dd>2.99.0 (environment.json)</dd>" in page


# --------------------------------------------------------------------------- errors and OUT


def test_a_folder_that_is_not_results_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(NotFoundError) as err:
            build_report(path, tmp_path / "out")
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_out_keeps_files_that_are_not_the_reports(sparse: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "mine.png").write_bytes(b"not ours")
    build_report(sparse, out)
    # an earlier report wrote a figure this one no longer does: that one, and only that one, goes
    manifest = json.loads((out / ".slmcl-report.json").read_text())
    (out / "figures" / "matrix_old.png").write_bytes(b"stale")
    manifest["files"].append("figures/matrix_old.png")
    (out / ".slmcl-report.json").write_text(json.dumps(manifest))
    build_report(sparse, out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "figures" / "mine.png").read_bytes() == b"not ours"
    assert not (out / "figures" / "matrix_old.png").exists()
    assert (out / "index.html").is_file()
