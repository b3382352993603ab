"""Run the study's own analysis code beside slmcl on one slmcl results directory, number by number.

The study (github.com/tspthomas/slm_stability_cl) computes its tables with three scripts
(``scripts/combine_scores.py``, ``scripts/compute_metrics.py``, ``scripts/analyze_stability.py``)
over files its training loop writes (``scores_seed_<seed>.csv``, ``stability_seed_<seed>/
stability_scores.csv``), and scores generations with ``src/utils.normalize_answer``. This tool
writes an slmcl run's numbers in those formats, runs the study's functions on them (imported at
run time from ``--study-repo``: nothing of the study is copied here) and prints, for every number
the study produces, ours beside theirs.

    git --git-dir=<mirror> archive HEAD src scripts | tar -x -C /tmp/study
    .venv/bin/python tools/compare_study.py --study-repo /tmp/study runs/compare runs/demo-compare
    .venv/bin/python tools/compare_study.py --study-repo /tmp/study --model-check 8 runs/compare

Sections (``section`` column):

* ``matrix``   accuracy by checkpoint and task, mean and std over seeds: the study's
  ``accuracy_matrix_long_summary.csv`` against summary.json ``matrix_mean`` / ``matrix_std``.
* ``rescore``  accuracy recomputed by the study's answer normalizer from our saved generations
  (``predictions/**.jsonl``: gold and raw output) against our scores.csv: does our scoring agree
  with theirs on the same text?
* ``cl``       the study's per-checkpoint metrics (``summarize_metrics``, mean and std over seeds)
  against summary.json ``metrics``; ``cl-cli`` the same against ``slmcl metrics --json`` reading
  the study's own ``scores_all.csv``, the file as a user of the study has it.
* ``task``     the study's per-seed extra columns and per-task JSON breakdowns (next-task FWT,
  current task's base and previous accuracy, ``bwt_by_task``, ``forgetting_by_task``,
  ``fwt_by_task``, ``learning_accuracy_by_task``) against our per_task.csv; ``task-steps`` the
  by-task breakdowns at every step against per_task_steps.csv.
* ``stab``     the study's stability summary (9 statistics and 6 deltas to the base, mean and std
  over seeds) against our report's grouping of the stage records (``slmcl.report.study``).
* ``pooled:``  the strategies of a results directory that share one order, taken as if they were
  seeds of one group: the runs here have one seed each, so this is what exercises the std.
* ``model``    (``--model-check N``) the study's KL / entropy / margin code run on the embedded
  SmolLM2 with a LoRA checkpoint of the run, beside ``slmcl.models.engine.adapter_drift``.

Tolerance: 1e-9 for everything computed from accuracies (both sides do float64 arithmetic on the
same inputs; the differences are summation order, ~1e-16). The model check compares float32
model outputs whose summaries the study takes in float32 (``torch.tensor(values, float32)``)
while ours are float64, and our forward batches rows and feeds a shared prompt head once where the
study runs each row alone: float32 logits computed in a different order differ by ~1e-6, and a top-2
margin (a difference of two log-probs) measured 2e-5 apart. The tolerance there is 1e-4 absolute,
still three orders of magnitude below the smallest real divergence found (the study's batched reading
position, 0.1 to 3 nats). A row whose values differ by
definition (not by error) is marked ``by design`` and counted apart; ``absent`` means slmcl has
no such number in that results directory.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import math
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from slmcl.protocol.layout import order_id  # noqa: E402
from slmcl.protocol.tables import per_task_rows, per_task_step_rows  # noqa: E402
from slmcl.report.study import OrderGroup, Run, Stat, load_study  # noqa: E402

EXACT_TOL = 1e-9
# A run still in progress: the study fills steps not trained yet from the cells that are there (LA over
# the diagonal so far, base and previous accuracy of a task not learned yet); slmcl leaves them undefined.
UNFINISHED = "by design: step not trained yet in this run; slmcl leaves it undefined"
FLOAT32_TOL = 1e-4
CL_METRICS = ("op", "bwt", "forgetting", "fwt", "avg_all_tasks", "current_acc", "current_delta_vs_base",
              "adaptation_gain", "learning_accuracy")
# The study's 9 statistics (analyze_stability.STABILITY_METRICS) are our stability keys of the same name;
# its 6 deltas to the base map onto ours as follows (KL to base is 0 at the base, so its delta is itself).
DELTA_KEYS = {"entropy_mean": "entropy_delta_mean", "entropy_p95": "entropy_delta_p95",
              "margin_mean": "margin_delta_mean", "margin_p95": "margin_delta_p95",
              "kl_to_base_mean": "kl_to_base_mean", "kl_to_base_p95": "kl_to_base_p95"}


# --------------------------------------------------------------------------- comparison rows


def num(value: Any) -> float | None:
    """A number or None: pandas' NaN / NA and the study's ``None`` all read as 'undefined'."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


@dataclass
class Row:
    section: str
    quantity: str
    ours: float | None
    theirs: float | None
    tol: float = EXACT_TOL
    note: str = ""  # "by design: ..." or "absent: ..." where a difference is expected

    @property
    def diff(self) -> float | None:
        return None if self.ours is None or self.theirs is None else abs(self.ours - self.theirs)

    @property
    def status(self) -> str:
        same = (self.ours is None and self.theirs is None) or (self.diff is not None and self.diff <= self.tol)
        if same:
            return "ok"
        if self.note.startswith("absent"):
            return "absent"
        return "by design" if self.note.startswith("by design") else "MISMATCH"


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.10g}"


def print_rows(rows: Sequence[Row]) -> None:
    header = ("section", "quantity", "ours", "theirs", "|diff|", "status")
    table = [header] + [(r.section, r.quantity, fmt(r.ours), fmt(r.theirs),
                         "—" if r.diff is None else f"{r.diff:.2e}", r.status + (f" ({r.note})" if r.note and
                                                                                  r.status != "ok" else ""))
                        for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(5)]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t[:5], widths)) + "  " + t[5])


# --------------------------------------------------------------------------- the study's code


def _load_file(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json_rows(path: str) -> list[dict[str, Any]]:
    """The reference set: one JSON list of rows (the study's and ours)."""
    loaded = json.loads(Path(path).read_text())
    if not isinstance(loaded, list):
        raise SystemExit(f"{path}: expected a JSON list of rows")
    return loaded


class StudyCode:
    """The study's modules, imported from its checkout (its ``src`` holds flat modules: ``utils``, ``data``...)."""

    def __init__(self, repo: Path) -> None:
        src, scripts = repo / "src", repo / "scripts"
        for needed in (src / "stability.py", scripts / "compute_metrics.py"):
            if not needed.is_file():
                raise SystemExit(f"--study-repo {repo}: no {needed.relative_to(repo)} (not the study's checkout?)")
        sys.path.insert(0, str(src))
        self.combine_scores = _load_file(scripts / "combine_scores.py", "study_combine_scores")
        self.compute_metrics = _load_file(scripts / "compute_metrics.py", "study_compute_metrics")
        self.analyze_stability = _load_file(scripts / "analyze_stability.py", "study_analyze_stability")
        self.utils = importlib.import_module("utils")

    def stability(self) -> Any:
        """``src/stability.py``; it imports Hugging Face ``datasets`` only to read a JSON list, so where
        that package is missing a stand-in that reads the same file is registered first."""
        try:
            importlib.import_module("datasets")
        except ImportError:
            stub = types.ModuleType("datasets")
            stub.load_dataset = lambda kind, data_files, split: _json_rows(data_files)  # type: ignore[attr-defined]  # a stand-in module
            sys.modules["datasets"] = stub
        return importlib.import_module("stability")


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The study's functions print their tables and progress bars; the comparison prints its own."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- our results, in the study's formats


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class Group:
    """One (model, strategy, order) of our results and what the study is given for it."""

    label: str
    order: tuple[str, ...]
    task_ids: dict[str, str]  # our task name -> the study's task id (task_1 ... by the spec's task list)
    seeds: dict[tuple[str, int], int]  # (strategy, our seed) -> the seed the study sees
    runs: list[Run]
    score_rows: list[dict[str, str]]
    stability_rows: list[dict[str, str]]
    summary: dict[str, Any] | None  # summary.json's entry, None for a pooled group

    @property
    def last_step(self) -> dict[int, int]:
        """Each (study) seed's last evaluated step: a run still in progress stops short of K."""
        out: dict[int, int] = {}
        for r in self.score_rows:
            out[self.seed_of(r)] = max(out.get(self.seed_of(r), 0), int(r["step"]))
        return out

    @property
    def study_order(self) -> list[str]:
        return [self.task_ids[t] for t in self.order]

    def seed_of(self, row: dict[str, str]) -> int:
        return self.seeds[(row["strategy"], int(row["seed"]))]


def write_scores(g: Group, out: Path) -> None:
    """scores_seed_<seed>.csv as the study's ``append_score_rows`` writes them: task ids, not names."""
    columns = ["seed", "step", "checkpoint_task", "eval_task", "eval_task_name", "accuracy", "correct", "total"]
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(g.score_rows, key=lambda r: (int(r["step"]), g.order.index(r["eval_task"]))):
        step = int(r["step"])
        by_seed.setdefault(g.seed_of(r), []).append({
            "seed": g.seed_of(r), "step": step,
            "checkpoint_task": "base" if step == 0 else g.task_ids[g.order[step - 1]],
            "eval_task": g.task_ids[r["eval_task"]], "eval_task_name": r["eval_task"],
            "accuracy": r["accuracy"], "correct": r["correct"], "total": r["total"]})
    out.mkdir(parents=True, exist_ok=True)
    for seed, rows in by_seed.items():
        with (out / f"scores_seed_{seed}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)


def write_stability(g: Group, study: StudyCode, out: Path) -> None:
    """stability_seed_<seed>/stability_scores.csv as the study's ``save_stability_results`` writes them."""
    columns = ["seed", "step", "checkpoint_task", "num_reference_examples", *study.analyze_stability.STABILITY_METRICS]
    for r in g.stability_rows:
        seed, step = g.seed_of(r), int(r["step"])
        d = out / f"stability_seed_{seed}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "stability_scores.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({**r, "seed": seed,
                        "checkpoint_task": "base" if step == 0 else g.task_ids[g.order[step - 1]]})


def groups_of(results: Path) -> list[Group]:
    """Every (model, strategy, order) of a results directory, and the pooled groups (strategies as seeds)."""
    spec = json.loads((results / "spec.json").read_text())
    names = [t["name"] if isinstance(t, dict) else str(t) for t in spec.get("tasks", [])]
    study = load_study(results)
    scores, stability = read_csv(results / "scores.csv"), read_csv(results / "stability.csv")
    summary = json.loads((results / "summary.json").read_text())
    out: list[Group] = []
    for og in study.groups:
        oid = order_id(og.order)

        def mine(r: dict[str, str], g: OrderGroup = og, o: str = oid) -> bool:
            return r["order"] == o and r["strategy"] == g.strategy and r.get("model", g.model) == g.model

        entry = next((e for e in summary["orders"] if e["strategy"] == og.strategy and tuple(e["order"]) == og.order
                      and e.get("model", og.model) == og.model), None)
        ids = {t: f"task_{names.index(t) + 1}" if t in names else t for t in og.order}
        out.append(Group(f"{results.name} {og.strategy} {oid}", og.order, ids,
                         {(og.strategy, run.seed): run.seed for run in og.runs}, list(og.runs),
                         [r for r in scores if mine(r)], [r for r in stability if mine(r)], entry))
    by_order: dict[tuple[str, tuple[str, ...]], list[Group]] = {}
    for g in out:
        by_order.setdefault((g.runs[0].model, g.order), []).append(g)
    for (_, order), gs in by_order.items():
        runs = [run for g in gs for run in g.runs]
        if len(runs) < 2:
            continue
        seeds = {(run.strategy, run.seed): i for i, run in enumerate(runs, start=1)}
        out.append(Group(f"pooled:{results.name} {order_id(order)} ({len(runs)} runs as seeds)", order,
                         gs[0].task_ids, seeds, runs, [r for g in gs for r in g.score_rows],
                         [r for g in gs for r in g.stability_rows], None))
    return out


# --------------------------------------------------------------------------- the comparisons


def stat_of(values: Iterable[float | None]) -> Stat:
    return Stat.of(list(values))


def compare_matrix(g: Group, study: StudyCode, work: Path, section: str) -> list[Row]:
    quiet(study.combine_scores.combine_scores, work / "outputs", work / "cl")
    rows: list[Row] = []
    for r in read_csv(work / "cl" / "accuracy_matrix_long_summary.csv"):
        step, task = int(r["step"]), r["eval_task_name"]
        if g.summary is not None:
            ours_mean = g.summary["matrix_mean"].get(str(step), {}).get(task)
            ours_std = g.summary["matrix_std"].get(str(step), {}).get(task)
        else:
            s = stat_of(run.matrix.get(step, {}).get(task) for run in g.runs)
            ours_mean, ours_std = s.mean, s.std
        rows.append(Row(section, f"acc[{step}][{task}] mean", num(ours_mean), num(r["accuracy_mean"])))
        rows.append(Row(section, f"acc[{step}][{task}] std", num(ours_std), num(r["accuracy_std"])))
    return rows


def compare_cl(g: Group, study: StudyCode, work: Path, section: str) -> tuple[list[Row], Any]:
    cm = study.compute_metrics
    by_seed = cm.compute_metrics(cm.load_scores(work / "cl" / "scores_all.csv"), g.study_order)
    summary = cm.summarize_metrics(by_seed)
    K = len(g.order)
    if g.summary is not None:
        ours = {int(m["step"]): m for m in g.summary["metrics"]}
    else:
        og = OrderGroup(g.runs[0].model, "pooled", g.order, tuple(g.runs))
        ours = {k: {**{n: og.metric(k, n).mean for n in CL_METRICS}, **{f"{n}_std": og.metric(k, n).std
                                                                       for n in CL_METRICS}} for k in range(K + 1)}
    rows: list[Row] = []
    done = min(g.last_step.values())
    for s in summary.to_dict("records"):
        k = int(s["step"])
        for name in CL_METRICS:
            note = ("by design: ours is the running mean of the diagonal up to this step, theirs the final LA "
                    "on every row" if name == "learning_accuracy" and k < K else "")
            if k > done:
                note = UNFINISHED
            for stat, key in (("mean", name), ("std", f"{name}_std")):
                rows.append(Row(section, f"step {k} {name} {stat}", num(ours.get(k, {}).get(key)),
                                num(s[f"{name}_{stat}"]), note=note))
    return rows, by_seed


def compare_cli(g: Group, study: StudyCode, work: Path, section: str) -> list[Row]:
    """`slmcl metrics --json` on the study's scores_all.csv, with and without --task-order."""
    rows: list[Row] = []
    cm = study.compute_metrics
    summary = cm.summarize_metrics(cm.compute_metrics(cm.load_scores(work / "cl" / "scores_all.csv"), g.study_order))
    theirs = {int(s["step"]): s for s in summary.to_dict("records")}
    K = len(g.order)
    done = min(g.last_step.values())
    for flags, tag in (([], "inferred order"), (["--task-order", ",".join(g.study_order)], "--task-order")):
        proc = subprocess.run([sys.executable, "-m", "slmcl.cli", "metrics", "--scores",
                               str(work / "cl" / "scores_all.csv"), "--json", *flags],
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            why = ("by design: a run in progress names only its trained checkpoints, so slmcl will not guess "
                   "the rest of the order (the study sorts task ids)" if min(g.last_step.values()) < K else "")
            rows.append(Row(section, f"slmcl metrics ({tag}) failed: {proc.stderr.strip()[:100]}", None, 0.0,
                            note=why))
            continue
        ours = {int(d["step"]): d for d in json.loads(proc.stdout)}
        for k, s in theirs.items():
            for name in CL_METRICS:
                note = "by design: running LA" if name == "learning_accuracy" and k < K else ""
                note = UNFINISHED if k > done else note
                rows.append(Row(section, f"[{tag}] step {k} {name} mean", num(ours.get(k, {}).get(name)),
                                num(s[f"{name}_mean"]), note=note))
                if any(f"{n}_std" in d for d in ours.values() for n in CL_METRICS):
                    rows.append(Row(section, f"[{tag}] step {k} {name} std", num(ours.get(k, {}).get(f"{name}_std")),
                                    num(s[f"{name}_std"]), note=note))
    return rows


def our_table(results: Path, g: Group, name: str,
              compute: Callable[[Sequence[Any]], list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], str]:
    """Our table ``name`` as the user has it (an older results directory without it: slmcl's same function,
    in memory), kept to the group's rows with the study's seed in ``study_seed``. A results directory of
    several models holds the same (strategy, order, seed) for each, so the model is matched too."""
    path = results / name
    if path.is_file():
        src, rows = name, [dict(r) for r in read_csv(path)]
    else:
        src, rows = f"{compute.__name__}()", compute([rec for run in g.runs for rec in run.records])
    strategies, models = {run.strategy for run in g.runs}, {run.model for run in g.runs}
    return [{**r, "study_seed": g.seeds[(str(r["strategy"]), int(r["seed"]))]} for r in rows
            if r["model"] in models and r["strategy"] in strategies and r["order"] == order_id(g.order)], src


def our_per_task(results: Path, g: Group) -> tuple[dict[tuple[int, str], dict[str, Any]], str]:
    """per_task.csv by (study seed, task)."""
    rows, src = our_table(results, g, "per_task.csv", per_task_rows)
    return {(r["study_seed"], str(r["task"])): r for r in rows}, src


def compare_tasks(g: Group, results: Path, by_seed: Any, section: str) -> list[Row]:
    ours, src = our_per_task(results, g)
    names = {v: k for k, v in g.task_ids.items()}
    K = len(g.order)
    rows: list[Row] = []
    last = g.last_step
    for s in by_seed.to_dict("records"):
        seed, k = int(s["seed"]), int(s["step"])
        sec = f"{section} seed {seed}"
        if k > last[seed]:
            continue  # a step this run has not trained: slmcl has no row for its task (see the cl section)
        if k >= 1:
            task = g.order[k - 1]
            mine = ours.get((seed, task), {})
            for theirs_key, our_key in (("current_acc", "learned_acc"), ("current_base_acc", "base_acc"),
                                        ("current_prev_acc", "previous_acc")):
                rows.append(Row(sec, f"step {k} {theirs_key} vs {src} {task}.{our_key}", num(mine.get(our_key)),
                                num(s[theirs_key])))
            if k < K:
                rows.append(Row(sec, f"step {k} next_fwt vs {src} {task}.next_task_fwt",
                                num(mine.get("next_task_fwt")), num(s["next_fwt"])))
        if k == K:
            for tid, v in json.loads(s["bwt_by_task"]).items():
                rows.append(Row(sec, f"final bwt_by_task[{names[tid]}] vs {names[tid]}.bwt",
                                num(ours.get((seed, names[tid]), {}).get("bwt")), num(v)))
            for tid, v in json.loads(s["forgetting_by_task"]).items():
                rows.append(Row(sec, f"final forgetting_by_task[{names[tid]}] vs {names[tid]}.forgetting",
                                num(ours.get((seed, names[tid]), {}).get("forgetting")), num(v),
                                note="by design: ours is max_l R[l][j] - R[K][j] (Chaudhry), theirs -BWT_j"))
            for tid, v in json.loads(s["learning_accuracy_by_task"]).items():
                rows.append(Row(sec, f"learning_accuracy_by_task[{names[tid]}] vs {names[tid]}.learned_acc",
                                num(ours.get((seed, names[tid]), {}).get("learned_acc")), num(v)))
        # fwt_by_task at step k covers the tasks after k; ours keeps the one that matters for task j: step j-1.
        if 1 <= k < K and k + 1 <= last[seed]:
            nxt = g.order[k]
            v = json.loads(s["fwt_by_task"]).get(g.task_ids[nxt])
            rows.append(Row(sec, f"step {k} fwt_by_task[{nxt}] vs {nxt}.fwt",
                            num(ours.get((seed, nxt), {}).get("fwt")), num(v)))
    return rows


def our_per_task_steps(results: Path, g: Group) -> tuple[dict[tuple[int, int, str], dict[str, Any]], str]:
    """per_task_steps.csv by (study seed, step, task)."""
    rows, src = our_table(results, g, "per_task_steps.csv", per_task_step_rows)
    return {(r["study_seed"], int(r["step"]), str(r["task"])): r for r in rows}, src


def compare_task_steps(g: Group, results: Path, by_seed: Any, section: str) -> list[Row]:
    """The study's ``bwt_by_task``, ``forgetting_by_task`` and ``fwt_by_task`` at every step, task by task."""
    ours, src = our_per_task_steps(results, g)
    names = {v: k for k, v in g.task_ids.items()}
    rows: list[Row] = []
    for s in by_seed.to_dict("records"):
        seed, k = int(s["seed"]), int(s["step"])
        if k > g.last_step[seed]:
            continue
        for theirs_key, our_key, note in (
                ("bwt_by_task", "bwt", ""), ("fwt_by_task", "fwt", ""),
                ("forgetting_by_task", "forgetting", "by design: ours is max_l R[l][j] - R[k][j] (Chaudhry), "
                                                     "theirs -BWT_j")):
            for tid, v in json.loads(s[theirs_key]).items():
                task = names[tid]
                rows.append(Row(f"{section} seed {seed}", f"step {k} {theirs_key}[{task}] vs {src} {task}.{our_key}",
                                num(ours.get((seed, k, task), {}).get(our_key)), num(v), note=note))
    return rows


def compare_stability(g: Group, study: StudyCode, work: Path, section: str) -> list[Row]:
    st = study.analyze_stability
    df = st.add_delta_vs_base(st.load_stability_scores(work / "outputs"))
    metrics = list(st.STABILITY_METRICS) + [f"{m}_delta_vs_base" for m in st.DELTA_METRICS]
    summary = st.summarize_by_step(df, metrics)
    og = OrderGroup(g.runs[0].model, "pooled", g.order, tuple(g.runs))
    rows: list[Row] = []
    for s in summary.to_dict("records"):
        k = int(s["step"])
        for m in metrics:
            key = DELTA_KEYS[m.removesuffix("_delta_vs_base")] if m.endswith("_delta_vs_base") else m
            ours = og.stability(k, key)
            note = "absent: this results directory predates the key" if ours.n == 0 and k > 0 else ""
            if k == 0 and ours.n == 0:  # the base: every delta is 0 by definition, our older records omit it
                ours = stat_of(0.0 for _ in g.runs)
            rows.append(Row(section, f"step {k} {m} mean (ours: {key})", ours.mean, num(s[f"{m}_mean"]), note=note))
            rows.append(Row(section, f"step {k} {m} std", ours.std, num(s[f"{m}_std"]), note=note))
    return rows


def compare_rescore(g: Group, study: StudyCode, results: Path) -> list[Row]:
    """The study's normalize_answer on our generations: its accuracy per (run, step, task) against ours."""
    rows: list[Row] = []
    base_dirs = sorted(results.glob("predictions/base*/step-0"))
    for run in g.runs:
        for rec in run.records:
            if rec.step == 0:
                base = [d for d in base_dirs if d.parent.name.endswith(run.model.split(":")[-1])] or base_dirs
                folder = base[0] if base else None
            else:
                folder = results / "predictions" / rec.run_id / f"step-{rec.step}"
            for task in run.order:
                path = None if folder is None else folder / f"{task}.jsonl"
                if path is None or not path.is_file() or task not in rec.scores:
                    continue
                preds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                norm = study.utils.normalize_answer
                ok = [norm(p["raw_output"], task) == norm(p["gold"], task) for p in preds]
                disagree = sum(1 for p, o in zip(preds, ok) if bool(p["correct"]) != o)
                rows.append(Row("rescore", f"{run.strategy} step {rec.step} {task} accuracy ({disagree}/{len(preds)} "
                                f"rows judged differently)", num(rec.scores[task]["accuracy"]),
                                sum(ok) / len(ok) if ok else None,
                                note="by design: different answer extraction" if disagree else ""))
    return rows


# --------------------------------------------------------------------------- the model check


def model_check(results: Path, study: StudyCode, n: int) -> list[Row]:
    """The study's stability code and ours on the embedded model with one of the run's LoRA adapters."""
    import torch
    from peft import PeftModel

    from slmcl.config.spec import EMBEDDED_MODEL, ChatSpec, ModelSpec
    from slmcl.models import loading
    from slmcl.models.engine import adapter_drift
    from slmcl.tasks.data import load_examples
    from slmcl.tasks.prompts import PromptRenderer

    torch.set_num_threads(2)
    spec = json.loads((results / "spec.json").read_text())
    reference = spec["reference"]["file"]
    adapters = sorted(p.parent for p in results.glob("checkpoints/*/step-*/adapter_config.json"))
    lora = [a for a in adapters if not any(s in a.parent.name for s in ("-olora", "-osf", "-procl", "-replay"))]
    adapter = (lora or adapters)[-1]
    rows_json = _json_rows(reference)[:n]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rows_json, f)
        ref_file = f.name

    ours = adapter_drift(model=EMBEDDED_MODEL, adapter=str(adapter), reference=ref_file, device="cpu")
    loaded = loading.load_model(ModelSpec(name=EMBEDDED_MODEL), "cpu")
    tok = loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    stab = study.stability()
    consts = importlib.import_module("constants")
    # Rendering: the study's text of each reference row against ours (same instruction table, no system prompt).
    theirs_text = stab.build_prompt_texts(rows_json, tok, consts.DEFAULT_SYSTEM_PROMPT, False)
    renderer = PromptRenderer(tok, ChatSpec())
    from slmcl.config.spec import BUILTIN_TASKS

    our_text = [renderer.prompt_text(BUILTIN_TASKS[ex.task_name][2], ex.prompt) for ex in load_examples(ref_file)]
    same = sum(a == b for a, b in zip(theirs_text, our_text))
    out = [Row("model", f"reference prompts rendered identically ({same}/{len(our_text)})",
               float(same), float(len(our_text)), tol=0.0)]
    model = PeftModel.from_pretrained(loaded.model, str(adapter))
    for bs, note in ((1, ""), (4, "by design: the study reads attention_mask.sum()-1 under left padding, the wrong "
                                  "position for every row shorter than its batch's longest")):
        theirs = quiet(stab._compute_reference_stability_metrics, model=model, tokenizer=tok, reference_file=ref_file,
                       system_prompt=consts.DEFAULT_SYSTEM_PROMPT, device="cpu", seed=0, step=1,
                       checkpoint_task="x", batch_size=bs, max_length=512, use_system_prompt=False)
        for stat in ("kl_to_base", "entropy", "margin"):
            for summ in ("mean", "p10", "p95"):
                key = f"{stat}_{summ}"
                mine, their = num(ours.get(key)), num(theirs.get(key))
                out.append(Row("model", f"{adapter.parent.name}/{adapter.name} {n} rows, study batch {bs}: {key}",
                               mine, their, tol=FLOAT32_TOL, note=note))
    Path(ref_file).unlink()
    return out


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="slmcl results directories")
    p.add_argument("--study-repo", required=True, help="a checkout of tspthomas/slm_stability_cl (src/, scripts/)")
    p.add_argument("--model-check", type=int, default=0, metavar="N",
                   help="also run both stability computations on N reference rows with the embedded model (CPU)")
    args = p.parse_args(argv)
    study = StudyCode(Path(args.study_repo))
    all_rows: list[Row] = []
    for res in map(Path, args.results):
        for g in groups_of(res):
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                write_scores(g, work / "outputs")
                write_stability(g, study, work / "outputs")
                rows = compare_matrix(g, study, work, "matrix")
                cl_rows, by_seed = compare_cl(g, study, work, "cl")
                rows += cl_rows + compare_cli(g, study, work, "cl-cli")
                rows += compare_tasks(g, res, by_seed, "task")
                rows += compare_task_steps(g, res, by_seed, "task-steps")
                rows += compare_stability(g, study, work, "stab")
                if g.summary is not None:
                    rows += compare_rescore(g, study, res)
            print(f"\n=== {g.label}: study task ids {g.task_ids}, seeds {sorted(set(g.seeds.values()))}")
            print_rows(rows)
            all_rows += rows
        if args.model_check:
            rows = model_check(res, study, args.model_check)
            print(f"\n=== {res.name}: model check")
            print_rows(rows)
            all_rows += rows
    counts: dict[str, int] = {}
    for r in all_rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    print(f"\n{len(all_rows)} numbers compared: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"(ok: within {EXACT_TOL:g}, or {FLOAT32_TOL:g} for the float32 model check; "
          "both undefined counts as ok)")
    return 1 if counts.get("MISMATCH") else 0


if __name__ == "__main__":
    sys.exit(main())
