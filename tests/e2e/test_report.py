"""`build_report` on a real (tiny) experiment: tables equal to the metrics module's, valid figures, an HTML
page that needs no network, sparse evaluations never drawn as 0, and an OUT folder whose other files survive.

One tiny experiment is shared by the module: two tiny random architectures as two models, two orders (one the
reverse of the other), two seeds. The tiny random models score 0 on every task, so a table could swap cells,
formulas or models and still match; the records' accuracies (task scores and reference-set accuracy by
generation) are replaced by distinct deterministic values (each model's base shared by its runs, as in a real
experiment, and different between the models) and the results tables rebuilt from them, so every number below
can only match if the report computes it right for each (model, order).
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
from collections.abc import Iterator, Sequence
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
from slmcl.protocol.tables import avg_accuracy, reference_accuracy_by_task, write_tables
from slmcl.report import build_report, load_study
from slmcl.report.study import Stat, order_roles
from slmcl.report.study_tables import fmt_stat, latex_escape, latex_number
from slmcl.storage.local import LocalStore
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.slow

ORDERS = [["fomc", "numgluecm"], ["numgluecm", "fomc"]]
SEEDS = [1, 2]
LABELS = ("llama", "qwen")  # the two models' labels in the spec, in its order
# Smaller than tiny_spec_dict's defaults: the report reads records, it does not need more examples.
SMALL: dict[str, Any] = {
    "training": {"max_examples": 4, "batch_size": 2, "grad_accum": 1},
    "evaluation": {"max_examples": 2, "max_new_tokens": 4},
    "reference": {"max_examples": 3},
    "monitoring": {"attribution": False, "task_drift_examples": 2},
}
TABLES = ("task_acquisition", "cl_metrics", "stability", "order_robustness", "per_task", "reference_accuracy")
# the stability figure grows by 20 px per three (model, order) series, its legend's rows: four here
FIXED_SIZES = {"kl_vs_accuracy": (1100, 550), "avg_accuracy_by_step": (1100, 550),
               "stability_trajectories": (1300, 460)}
TOTAL = 40  # examples per task in the rewritten scores: accuracies in steps of 1/40


def _stage_files(root: Path) -> Iterator[Path]:
    return iter(sorted(root.glob("runs/*/stage-*.json")))


def _draw(key: str, total: int = TOTAL) -> float:
    return random.Random(key).randint(0, total) / total


def _rewrite_accuracies(root: Path, labels: dict[str, str]) -> None:
    """Distinct deterministic accuracies, drawn by the model's label (not its temporary folder, so every session
    sees the same numbers); a base (step 0 and the base reference accuracy) is drawn by (model, task) only:
    shared by the runs of a model, different between the models."""
    for path in _stage_files(root):
        rec = StageRecord.from_json(path.read_text())
        model = labels[rec.model]
        for task, score in rec.scores.items():
            correct = round(_draw(f"base/{model}/{task}" if rec.step == 0 else f"{rec.run_id}/{rec.step}/{task}")
                            * TOTAL)
            score.update(correct=correct, total=TOTAL, accuracy=correct / TOTAL, score_sum=float(correct))
        if rec.step:  # measured after every trained stage (monitoring.reference_accuracy is on by default)
            for base in (False, True):
                by_task = reference_accuracy_by_task(rec.stability, base=base)
                assert by_task, f"{path}: no per-task reference accuracy (base={base})"
                pooled = "base_reference_accuracy" if base else "reference_accuracy"
                prefix = f"base/{model}" if base else f"{rec.run_id}/{rec.step}"
                drawn = {task: _draw(f"reference/{prefix}/{task}", 1000) for task in by_task}  # rows are kept
                rec.stability.update({f"{pooled}:{task}": acc for task, acc in drawn.items()})
                rec.stability[pooled] = (sum(drawn[t] * n for t, (_, n) in by_task.items())
                                         / sum(n for _, n in by_task.values()))
        path.write_text(rec.to_json())
    store = LocalStore(root)
    write_tables(store, read_stages(store))  # summary.json and the CSVs agree with the rewritten records


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_qwen_dir: Path,
            data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("report-results") / "out"
    models = [{"name": str(tiny_model_dir), "label": "llama"}, {"name": str(tiny_qwen_dir), "label": "qwen"}]
    spec = tiny_spec_dict(tiny_model_dir, data_dir, out, model=None, models=models, orders=ORDERS, seeds=SEEDS,
                          **SMALL)
    ExperimentRunner(spec_from_dict(spec)).run()
    _rewrite_accuracies(out, {m["name"]: m["label"] for m in models})
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


def _check_stat(row: dict[str, str], col: str, values: Sequence[float | None], where: Any) -> None:
    """A CSV mean ± std cell pair against the seed mean and sample std of ``values`` (None: not defined)."""
    mean, std = _mean_std([v for v in values if v is not None])
    assert _same(row[col], mean) and _same(row[f"{col}_std"], std), (where, col, row[col], row[f"{col}_std"])


# --------------------------------------------------------------------------- layout


def _labels(results: Path) -> dict[str, str]:
    """Each model's name in the records (its folder) -> its label in the report: the spec's ``label``."""
    spec = json.loads((results / "spec.json").read_text())
    return {m["name"]: m["label"] for m in spec["models"]}


def _models(results: Path) -> list[str]:
    models = list(_labels(results))
    assert [_labels(results)[m] for m in models] == list(LABELS)
    return models


def _groups(results: Path) -> list[tuple[str, str]]:
    """(model, order id) of every group the tables average over, in the report's order (models, then orders)."""
    return [(m, order_id(o)) for m in _models(results) for o in ORDERS]


def _runs(recs: list[StageRecord], model: str, oid: str) -> list[StageRecord]:
    return [r for r in recs if r.model == model and order_id(r.order) == oid]


def test_the_report_has_its_layout(results: Path, report: Path) -> None:
    for name in TABLES:
        for ext in ("md", "csv", "tex"):
            assert (report / "tables" / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    figures = {p.stem for p in (report / "figures").glob("*.png")}
    assert figures == {p.stem for p in (report / "figures").glob("*.svg")}
    assert figures == {"kl_vs_accuracy", "avg_accuracy_by_step", "stability_trajectories",
                       *(f"{kind}_{m}" for kind in ("train_loss", "matrix") for m in LABELS)}
    runs = sorted(p.name for p in (results / "runs").iterdir())
    assert runs == sorted(f"{order_id(o)}-s{s}-m{m}" for o in ORDERS for s in SEEDS for m in LABELS)


def test_each_models_base_is_shared_by_its_runs_and_differs_between_models(results: Path) -> None:
    """The rewritten records are what a two-model experiment leaves: the premise of every check below."""
    recs = _records(results)
    bases = {m: {json.dumps(r.scores, sort_keys=True) for r in recs if r.model == m and r.step == 0}
             for m in _models(results)}
    assert all(len(b) == 1 for b in bases.values()) and len(set().union(*bases.values())) == 2
    ref_bases = {m: {json.dumps(reference_accuracy_by_task(r.stability, base=True), sort_keys=True)
                     for r in recs if r.model == m and r.step} for m in _models(results)}
    assert all(len(b) == 1 for b in ref_bases.values()) and len(set().union(*ref_bases.values())) == 2


# --------------------------------------------------------------------------- tables


def test_cl_tables_equal_the_metrics_module(results: Path, report: Path) -> None:
    """Every accuracy-based cell against summary.json's metrics (slmcl.metrics: per seed, then mean ± std),
    summary.json's entries being per (model, strategy, order)."""
    summary = json.loads((results / "summary.json").read_text())
    expected = {(e["model"], order_id(e["order"]), m["step"]): m for e in summary["orders"] for m in e["metrics"]}
    assert len(summary["orders"]) == len(_groups(results))
    columns = {"task_acquisition": {"after_learning": "current_acc", "immediate_gain": "adaptation_gain",
                                    "delta_vs_base": "current_delta_vs_base", "avg_accuracy": "avg_all_tasks"},
               "cl_metrics": {"op": "op", "bwt": "bwt", "fwt": "fwt"}}
    for table, cols in columns.items():
        rows = _csv(report / "tables" / f"{table}.csv")
        # the report's order: models as the spec lists them, then orders, then steps
        assert [(r["model"], r["order"], int(r["step"])) for r in rows] == [
            (m, oid, k) for m, oid in _groups(results) for k in (1, 2)]
        for row in rows:
            want = expected[(row["model"], row["order"], int(row["step"]))]
            assert row["seeds"] == "2"
            for col, metric in cols.items():
                where = (table, row["model"], row["order"], row["step"], col)
                assert _same(row[col], want[metric]), where
                assert _same(row[f"{col}_std"], want[f"{metric}_std"]), where
    # the numbers are not all alike (the check above would be weak if they were)
    accs = {r["after_learning"] for r in _csv(report / "tables" / "task_acquisition.csv")}
    assert len(accs) == 8


def _acc(runs: list[StageRecord], seed: int, step: int, task: str) -> float:
    return float(next(r for r in runs if r.seed == seed and r.step == step).scores[task]["accuracy"])


def test_acquisition_cells_are_the_matrix_differences(results: Path, report: Path) -> None:
    """Independently of the metrics module: R[k][k], R[k][k] - R[k-1][k], R[k][k] - R[0][k], mean of row k."""
    recs = _records(results)
    for row in _csv(report / "tables" / "task_acquisition.csv"):
        k = int(row["step"])
        runs = _runs(recs, row["model"], row["order"])
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
            _check_stat(row, col, values, (row["model"], row["order"], k))


def _matrix(runs: list[StageRecord], seed: int) -> dict[int, dict[str, float]]:
    return {r.step: {t: float(s["accuracy"]) for t, s in r.scores.items()} for r in runs if r.seed == seed}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def test_per_task_table_is_the_seed_mean_of_each_tasks_history(results: Path, report: Path) -> None:
    """Independently of per_task_rows: each task j of a run that ended at K, from the run's matrix R."""
    recs = _records(results)
    rows = _csv(report / "tables" / "per_task.csv")
    assert [(r["model"], r["order"], int(r["position"])) for r in rows] == [
        (m, oid, j) for m, oid in _groups(results) for j in (1, 2)]
    for row in rows:
        runs = _runs(recs, row["model"], row["order"])
        order = runs[0].order
        j = int(row["position"])
        task = order[j - 1]
        assert row["task"] == task and row["seeds"] == "2"
        cells: dict[str, list[float | None]] = {}
        for seed in SEEDS:
            m = _matrix(runs, seed)
            end = max(m)
            assert end == len(order)
            following = order[j] if j < len(order) else None
            seed_cells = {
                "base_acc": m[0][task], "previous_acc": m[j - 1][task], "learned_acc": m[j][task],
                "final_acc": m[end][task],
                "forgetting": max(m[s][task] for s in range(j, end)) - m[end][task] if j < end else None,
                "bwt": m[end][task] - m[j][task] if j < end else None,
                "fwt": m[j - 1][task] - m[0][task] if j > 1 else None,
                "next_task_fwt": _diff(m[j][following], m[0][following]) if following else None,
            }
            for col, v in seed_cells.items():
                cells.setdefault(col, []).append(v)
        for col, values in cells.items():
            _check_stat(row, col, values, (row["model"], row["order"], j))
    # the first task has no FWT, the last no forgetting or BWT or next task; the others are numbers
    for row in rows:
        first, last = row["position"] == "1", row["position"] == "2"
        assert (row["fwt"] == "") == first and (row["forgetting"] == "") == last and (row["bwt"] == "") == last
        assert (row["next_task_fwt"] == "") == last and row["final_acc"] != ""
    assert len({r["learned_acc"] for r in rows}) == len(rows)  # a swap of models or orders would show


def test_per_task_steps_csv_is_each_runs_matrix_at_every_step(results: Path) -> None:
    """The results' per_task_steps.csv, independently of per_task_step_rows: every run, checkpoint and task."""
    recs = _records(results)
    rows = _csv(results / "per_task_steps.csv")
    by_key = {(r["model"], r["order"], int(r["seed"]), int(r["step"]), r["task"]): r for r in rows}
    assert len(by_key) == len(rows) == len(_groups(results)) * len(SEEDS) * 3 * 2  # checkpoints 0..2, 2 tasks
    for model, oid in _groups(results):
        runs = _runs(recs, model, oid)
        order = runs[0].order
        for seed in SEEDS:
            m = _matrix(runs, seed)
            for k in m:
                for j, task in enumerate(order, start=1):
                    row = by_key[(model, oid, seed, k, task)]
                    want = {"acc": m[k][task],
                            "bwt": m[k][task] - m[j][task] if j < k else None,
                            "forgetting": max(m[s][task] for s in range(j, k)) - m[k][task] if j < k else None,
                            "fwt": m[k][task] - m[0][task] if j > k else None}
                    for col, v in want.items():
                        assert (row[col] == "") == (v is None), (model, oid, seed, k, task, col)
                        if v is not None:
                            assert float(row[col]) == pytest.approx(v, abs=1e-12), (model, oid, seed, k, task, col)


def test_reference_accuracy_table_is_the_seed_mean_of_the_records(results: Path, report: Path) -> None:
    """Per (model, order, checkpoint, task of the reference rows): accuracy by generation, its change from the
    model's base and the KL to base on the same prompts, over the seeds; the base as step 0 (KL 0)."""
    recs = _records(results)
    rows = _csv(report / "tables" / "reference_accuracy.csv")
    expected: list[tuple[str, str, int, str]] = []
    for model, oid in _groups(results):
        runs = _runs(recs, model, oid)
        trained = [r for r in runs if r.step]
        tasks = list(reference_accuracy_by_task(trained[0].stability, base=True))
        assert tasks and all(list(reference_accuracy_by_task(r.stability)) == tasks for r in trained)
        expected += [(model, oid, k, t) for k in range(len(ORDERS[0]) + 1) for t in tasks]
    assert [(r["model"], r["order"], int(r["step"]), r["task"]) for r in rows] == expected
    for row in rows:
        k, task = int(row["step"]), row["task"]
        runs = _runs(recs, row["model"], row["order"])
        at = {s: next(r for r in runs if r.seed == s and r.step == max(k, 1)) for s in SEEDS}
        base = {s: reference_accuracy_by_task(at[s].stability, base=True)[task] for s in SEEDS}  # (acc, rows)
        cell = {s: reference_accuracy_by_task(at[s].stability)[task] if k else base[s] for s in SEEDS}
        assert row["checkpoint"] == ("base" if k == 0 else f"after {at[SEEDS[0]].checkpoint_task}")
        assert row["seeds"] == "2" and row["rows"] == str(cell[SEEDS[0]][1])
        where = (row["model"], row["order"], k, task)
        _check_stat(row, "accuracy", [cell[s][0] for s in SEEDS], where)
        _check_stat(row, "delta_vs_base", [cell[s][0] - base[s][0] for s in SEEDS], where)
        kls = [float(at[s].stability["kl_to_base_mean"]) if k else 0.0 for s in SEEDS]
        _check_stat(row, "kl_to_base", kls, where)
    trained_rows = [r for r in rows if r["step"] != "0"]
    assert len({r["accuracy"] for r in trained_rows}) == len(trained_rows)  # the check above could tell a swap
    assert all(float(r["kl_to_base"]) > 0 for r in trained_rows)
    base_rows = {(r["model"], r["task"]): r["accuracy"] for r in rows if r["step"] == "0"}
    assert len(set(base_rows.values())) == len(base_rows)  # each model its own base


def test_stability_table_is_the_seed_mean_of_the_records(results: Path, report: Path) -> None:
    recs = _records(results)
    rows = _csv(report / "tables" / "stability.csv")
    assert [(r["model"], r["order"], int(r["step"])) for r in rows] == [
        (m, oid, k) for m, oid in _groups(results) for k in (1, 2)]
    fields = {"entropy_delta": "entropy_delta_mean", "margin_delta": "margin_delta_mean",
              "kl_to_base": "kl_to_base_mean", "kl_to_base_p95": "kl_to_base_p95"}
    for row in rows:
        at = [r for r in _runs(recs, row["model"], row["order"]) if r.step == int(row["step"])]
        assert len(at) == 2 and row["checkpoint"] == f"after {at[0].checkpoint_task}"
        for col, key in fields.items():
            _check_stat(row, col, [float(r.stability[key]) for r in at], (row["model"], row["order"], row["step"]))
    assert all(float(r["kl_to_base"]) > 0 for r in rows)


def test_order_table_pairs_an_order_with_its_reverse(results: Path, report: Path) -> None:
    recs = _records(results)
    rows = _csv(report / "tables" / "order_robustness.csv")
    # one row per model; the first order of the spec is the original
    assert [(r["model"], r["order"]) for r in rows] == [(m, "fomc.numgluecm") for m in _models(results)]
    for row in rows:
        for role, order in (("original", ORDERS[0]), ("reversed", ORDERS[1])):
            finals = [r for r in recs if r.model == row["model"] and r.order == order and r.step == len(order)]
            assert len(finals) == 2 and row[f"seeds_{role}"] == "2"
            where = (row["model"], role)
            _check_stat(row, f"final_avg_accuracy_{role}", [avg_accuracy(r) for r in finals], where)
            _check_stat(row, f"final_kl_to_base_{role}", [float(r.stability["kl_to_base_mean"]) for r in finals],
                        where)
    assert rows[0]["final_avg_accuracy_original"] != rows[1]["final_avg_accuracy_original"]


def _md_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines[2:]]


def _tex_rows(text: str) -> list[list[str]]:
    body = text.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    return [[c.strip() for c in ln.removesuffix(r"\\").split(" & ")] for ln in body.strip().splitlines()
            if ln.strip() != r"\midrule"]


def test_markdown_and_latex_show_the_csv_numbers(results: Path, report: Path) -> None:
    """Every mean ± std cell of the Markdown and LaTeX files is the CSV's numbers, formatted; booktabs rules;
    each model named once, on the first row of its block (a rule between the blocks in LaTeX)."""
    labels = _labels(results)
    for name in TABLES:
        rows = _csv(report / "tables" / f"{name}.csv")
        md = _md_rows((report / "tables" / f"{name}.md").read_text())
        tex_text = (report / "tables" / f"{name}.tex").read_text()
        tex = _tex_rows(tex_text)
        assert len(md) == len(tex) == len(rows) > 0
        assert all(rule in tex_text for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"))
        assert tex_text.count(r"\midrule") == 2  # below the header, between the two models' blocks
        header = list(rows[0])
        stat_cols = [c for c in header if f"{c}_std" in header]
        display_cols = [c for c in header if not c.endswith("_std")]
        assert len(md[0]) == len(tex[0]) == len(display_cols)
        for i, (row, md_row, tex_row) in enumerate(zip(rows, md, tex)):
            for col in stat_cols:
                stat = Stat(_num(row[col]), _num(row[f"{col}_std"]), 2)
                j = display_cols.index(col)
                assert md_row[j] == fmt_stat(stat) and tex_row[j] == latex_number(fmt_stat(stat)), (name, col)
                assert " ± " in md_row[j] or md_row[j] == "—"  # two seeds: the std is shown
            starts = i == 0 or rows[i - 1]["model"] != row["model"]
            assert md_row[0] == tex_row[0] == (labels[row["model"]] if starts else ""), (name, i)
        assert [r[0] for r in md if r[0]] == list(LABELS), name  # two blocks, in the spec's order


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


def _series(fig: Any) -> dict[str, Any]:
    """The data line of each errorbar series of a figure's first axes, by its legend label."""
    return {str(c.get_label()): c.lines[0] for c in fig.axes[0].containers}


def test_the_shared_figures_show_both_models(results: Path) -> None:
    """Average accuracy per step: a line per (model, order) at the metrics' means, coloured by model; KL vs
    accuracy: each model's checkpoints (its base once) and a legend entry per model and for all models."""
    from matplotlib.colors import to_hex

    from slmcl.report import figures

    study = load_study(results)
    summary = json.loads((results / "summary.json").read_text())
    means = {(e["model"], order_id(e["order"])): {m["step"]: m["avg_all_tasks"] for m in e["metrics"]}
             for e in summary["orders"]}
    lines = _series(figures.avg_accuracy_figure(study))
    assert len(lines) == len(_groups(results))
    colours: dict[str, set[str]] = {}
    for (model, oid), role in zip(_groups(results), ("original", "reversed") * 2):
        label = f"{_labels(results)[model]}: {oid.replace('.', ' → ')} ({role})"
        line = lines[label]
        assert list(line.get_xdata()) == [0, 1, 2], label
        assert np.allclose(line.get_ydata(), [means[(model, oid)][k] for k in (0, 1, 2)]), label
        colours.setdefault(model, set()).add(to_hex(line.get_color()))
    assert all(len(c) == 1 for c in colours.values()) and len(set().union(*colours.values())) == 2

    fig = figures.kl_accuracy_figure(study)
    assert len(fig.axes[0].containers) == 2 * (1 + len(ORDERS) * 2)  # per model: the base once, every stage
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    for label in (*LABELS, "all models"):
        assert any(text.startswith(f"{label} (") or text.startswith(f"{label}:") for text in legend), label


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
    """The experiment as ``evaluation.every: 2`` would have left it for one model: stage 1 of llama's first
    order not evaluated (its record keeps its drift and loss, and its scores are empty, as the runner writes
    them), qwen's runs whole; with an ``environment.json`` as a run that records its device and versions
    would write."""
    out = tmp_path_factory.mktemp("sparse") / "out"
    out.mkdir()
    for name in ("spec.json", "spec.yaml"):
        shutil.copy(results / name, out / name)
    shutil.copytree(results / "runs", out / "runs")
    # what a run that records its environment would leave (the device it resolved "auto" to, say)
    (out / "environment.json").write_text(json.dumps({"device": "cuda:0", "torch": "2.99.0"}))
    for seed in SEEDS:
        path = out / "runs" / f"fomc.numgluecm-s{seed}-m{LABELS[0]}" / "stage-1.json"
        rec = StageRecord.from_json(path.read_text())
        rec.scores = {}
        path.write_text(rec.to_json())
    return out


def test_a_stage_without_scores_is_never_plotted_as_zero(sparse: Path, tmp_path: Path) -> None:
    from slmcl.report import figures

    study = load_study(sparse)
    llama, qwen = _models(sparse)
    lines = _series(figures.avg_accuracy_figure(study))
    assert len(lines) == 4
    for label, line in lines.items():
        sparse_line = label.startswith(f"{LABELS[0]}: fomc → numgluecm")
        # no point at stage 1, not a 0 there; the other order and the other model keep every point
        assert list(line.get_xdata()) == ([0, 2] if sparse_line else [0, 1, 2]), label

    # llama: the base once, fomc → numgluecm's stage 2, both stages of the other order; qwen: all of its own
    assert len(figures.kl_accuracy_figure(study).axes[0].containers) == (1 + 1 + 2) + (1 + 2 + 2)

    for model in (llama, qwen):
        fig = figures.matrix_figure(study, model)
        panels = {ax.get_title(): ax for ax in fig.axes if ax.images}
        assert len(panels) == 4  # one per run of this model
        for title, ax in panels.items():
            data = ax.images[0].get_array()
            assert data is not None
            mask = np.ma.getmaskarray(data)
            sparse_run = model == llama and title.startswith("fomc → numgluecm")
            assert bool(mask[1].all()) == sparse_run and not mask[2].any(), (model, title)
            assert bool([t for t in ax.texts if t.get_position()[1] == 1]) != sparse_run  # no number in a blank row

    out = tmp_path / "report"
    build_report(sparse, out)
    rows = {(r["model"], r["order"], r["step"]): r for r in _csv(out / "tables" / "task_acquisition.csv")}
    assert rows[(llama, "fomc.numgluecm", "1")]["after_learning"] == ""
    assert rows[(llama, "fomc.numgluecm", "1")]["avg_accuracy"] == ""
    assert rows[(llama, "fomc.numgluecm", "2")]["avg_accuracy"] != ""
    assert rows[(llama, "numgluecm.fomc", "1")]["avg_accuracy"] != ""
    assert rows[(qwen, "fomc.numgluecm", "1")]["avg_accuracy"] != ""  # the other model's runs are whole
    stab = {(r["model"], r["order"], r["step"]): r for r in _csv(out / "tables" / "stability.csv")}
    assert float(stab[(llama, "fomc.numgluecm", "1")]["kl_to_base"]) > 0  # drift is measured at every stage
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
