"""What the monitor's live dashboard draws, as plain JSON: the report's figures as data, and live progress.

The dashboard draws in the browser (the monitor's image has no matplotlib), so this module hands it numbers
only, computed by the same code as the report: the records are grouped by ``slmcl.report.study`` (metrics per
seed first, then mean ± std over seeds), the KL-accuracy correlation is ``slmcl.protocol.tables``'s points and
``slmcl.metrics.correlation``'s report. A page built from these numbers can never disagree with
``slmcl report`` on the same records. No HTTP here, no framework: the monitor serves it, tests call it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from slmcl.metrics.correlation import correlation_report
from slmcl.protocol.records import StageRecord
from slmcl.protocol.tables import kl_accuracy_points
from slmcl.report.study import OrderGroup, Run, Stat, groups_of, model_labels, order_text, spec_model_labels

# The drift panels of the report's stability figure (slmcl.report.figures.STABILITY_PANELS; that module
# imports matplotlib, which the monitor's image lacks): reference-set statistics measured at every checkpoint.
STABILITY_KEYS = (("kl_to_base_mean", "KL to base (nats)"), ("entropy_delta_mean", "ΔEntropy vs base (nats)"),
                  ("margin_delta_mean", "ΔMargin vs base (nats)"))


def _num(value: Any) -> float | None:
    """A finite float or None: NaN and infinities are not JSON, and a failed measurement is no point to draw."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _stat(s: Stat) -> dict[str, Any]:
    return {"mean": _num(s.mean), "std": _num(s.std), "n": s.n}


def _group_key(g: OrderGroup) -> dict[str, Any]:
    return {"model": g.model, "strategy": g.strategy, "order": list(g.order), "order_text": order_text(g.order),
            "role": g.role}


def _run_key(run: Run) -> dict[str, Any]:
    return {"model": run.model, "strategy": run.strategy, "order": list(run.order), "seed": run.seed,
            "order_text": order_text(run.order), "run_id": run.records[0].run_id}


def _matrix(run: Run) -> dict[str, Any]:
    """R[k][task] of one run, every checkpoint a row: a stage not (yet) evaluated is a row of nulls, never 0."""
    rows = []
    for k in range(len(run.order) + 1):
        cells = run.matrix.get(k, {})
        rows.append({"step": k, "label": "base" if k == 0 else f"after {run.order[k - 1]}",
                     "cells": [_num(cells.get(t)) for t in run.order]})
    return {**_run_key(run), "tasks": list(run.order), "rows": rows}


def _losses(run: Run) -> dict[str, Any]:
    """The optimizer-step losses of each trained stage of a run, in stage order (the report's loss figure)."""
    stages = [{"step": r.step, "task": r.checkpoint_task,
               "losses": [_num(s.get("loss")) for s in r.train.get("steps") or []]}
              for r in run.records if r.step > 0]
    return {**_run_key(run), "stages": stages}


def _kl_accuracy(groups: Sequence[OrderGroup], records: Sequence[StageRecord]) -> dict[str, Any]:
    """The report's KL-vs-accuracy figure: mean ± std over seeds per (group, checkpoint), the base once per model;
    Pearson and Spearman per model over every evaluated checkpoint (``correlation_summary``'s numbers)."""
    points: list[dict[str, Any]] = []
    base_drawn: set[str] = set()
    for g in groups:
        for k in g.steps:
            acc = g.metric(k, "avg_all_tasks")
            kl = g.evaluated_stability(k, "kl_to_base_mean")
            if _num(acc.mean) is None or _num(kl.mean) is None:
                continue
            if k == 0:
                if g.model in base_drawn:
                    continue
                base_drawn.add(g.model)
            points.append({**_group_key(g), "step": k, "kl": _stat(kl), "acc": _stat(acc)})
    by_model = {}
    for model in dict.fromkeys(g.model for g in groups):
        report = correlation_report(kl_accuracy_points([r for r in records if r.model == model]))
        by_model[model] = {k: (_num(v) if k in ("pearson", "spearman") else v) for k, v in report.items()}
    overall = correlation_report(kl_accuracy_points(records))
    return {"points": points, "correlation": by_model,
            "overall": {k: (_num(v) if k in ("pearson", "spearman") else v) for k, v in overall.items()}}


def _series(g: OrderGroup, values: Iterable[Stat]) -> dict[str, Any]:
    return {**_group_key(g), "points": [{"step": k, **_stat(s)} for k, s in enumerate(values)]}


def payload(records: Sequence[StageRecord], spec: Mapping[str, Any] | None = None,
            progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the dashboard draws for one experiment, from its committed stage records.

    ``stages_done`` counts committed trained stages (step >= 1, base rows excluded): the page shows it, and
    it rises exactly when a ``stage_done`` of a trained stage is committed.
    """
    spec = dict(spec or {})
    orders = [tuple(o) for o in spec.get("orders") or [] if isinstance(o, list)]
    groups = groups_of(records, orders, spec)
    models = list(dict.fromkeys(g.model for g in groups))
    runs = [run for g in groups for run in g.runs]
    return {
        "records": len(records),
        "stages_done": sum(1 for r in records if r.step > 0),
        "models": [{"name": m, "label": label}
                   for m, label in model_labels(models, spec_model_labels(spec)).items()],
        "kl_accuracy": _kl_accuracy(groups, records),
        "avg_accuracy": [_series(g, [g.metric(k, "avg_all_tasks") for k in range(len(g.order) + 1)])
                         for g in groups],
        "matrices": [_matrix(run) for run in runs],
        "stability": {key: {"label": label,
                            "series": [_series(g, [g.stability(k, key) for k in range(len(g.order) + 1)])
                                       for g in groups]}
                      for key, label in STABILITY_KEYS},
        "loss": [_losses(run) for run in runs],
        "progress": dict(progress or {}),
    }


# --------------------------------------------------------------------------- live progress from events


def _data(event: Mapping[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    return dict(data) if isinstance(data, Mapping) else {}


def progress(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Where each run is, from an experiment's events oldest first (the trainer's and the monitor's kinds).

    Training and evaluation overlap (the monitor measures stage k while the trainer trains k + 1), so a run
    has both: ``training`` (the stage, its optimizer step of how many, the last loss) and ``evaluation`` (the
    stage, examples done of total over the tasks reported so far). The base's evaluation is under ``""``.
    Each event is ``{"kind", "run_id", "step", "task", "data"}``, the shape of ``Event.as_dict`` (with
    ``step`` for its ``stage``).
    """
    runs: dict[str, dict[str, Any]] = {}
    evals: dict[tuple[str, int], dict[str, tuple[int, int]]] = {}
    for ev in events:
        kind, rid, data = str(ev.get("kind", "")), str(ev.get("run_id", "")), _data(ev)
        try:
            step = int(ev.get("step") or 0)
        except (TypeError, ValueError):
            continue
        run = runs.setdefault(rid, {"state": "queued", "training": None, "evaluation": None, "stages_done": []})
        if kind == "run_started":
            run["state"] = "training"
        elif kind == "train_step":
            run["state"] = "training"
            run["training"] = {"stage": step, "task": ev.get("task", ""), "step": data.get("step"),
                               "total_steps": data.get("total_steps"), "loss": _num(data.get("loss"))}
        elif kind == "stage_trained":
            tr = run["training"] or {"stage": step, "task": ev.get("task", "")}
            run["training"] = {**tr, "stage": step, "trained": True, "loss": _num(data.get("final_loss"))}
        elif kind == "eval_progress":
            per_task = evals.setdefault((rid, step), {})
            per_task[str(ev.get("task", ""))] = (int(data.get("done") or 0), int(data.get("total") or 0))
            run["evaluation"] = {"stage": step, "done": sum(d for d, _ in per_task.values()),
                                 "total": sum(t for _, t in per_task.values()), "tasks": len(per_task)}
        elif kind == "stage_done":
            if step not in run["stages_done"]:
                run["stages_done"].append(step)
            if run["evaluation"] and run["evaluation"]["stage"] == step:
                run["evaluation"] = {**run["evaluation"], "committed": True}
        elif kind in ("run_done", "run_failed", "run_cancelled"):
            run["state"] = kind[len("run_"):]
    return runs
