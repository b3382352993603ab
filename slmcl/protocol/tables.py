"""The tables of a results tree, rebuilt from its stage records (never appended to).

``scores.csv``, ``stability.csv``, ``train_loss.csv`` and ``summary.json`` are a pure function of
the committed stage records, so a resumed run can never duplicate a row, and the embedded
runner and the monitor write the same files from the same code.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from slmcl import metrics as mx
from slmcl.protocol.layout import order_id
from slmcl.protocol.records import StageRecord
from slmcl.storage.local import ArtifactStore

# The drift statistics and their summaries over the reference set (slmcl.inference.stability computes them).
STAT_NAMES = ("kl_to_base", "entropy", "margin")
SUMMARIES = ("mean", "p10", "p95")

SCORES_COLUMNS = ["seed", "step", "checkpoint_task", "eval_task", "eval_task_name", "accuracy", "correct", "total",
                  "order", "model"]
STABILITY_COLUMNS = (
    ["seed", "step", "checkpoint_task", "num_reference_examples"]
    + [f"{n}_{s}" for n in STAT_NAMES for s in SUMMARIES]
    + ["entropy_delta_mean", "margin_delta_mean", "order", "model"]
)
TRAIN_LOSS_COLUMNS = ["order", "seed", "step", "checkpoint_task", "optimizer_step", "loss", "lr", "tokens", "seconds"]


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue().encode()


def score_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        for task in rec.order:
            s = rec.scores.get(task)
            if s is None:
                continue
            rows.append({"seed": rec.seed, "step": rec.step, "checkpoint_task": rec.checkpoint_task,
                         "eval_task": task, "eval_task_name": task, "accuracy": s["accuracy"],
                         "correct": s["correct"], "total": s["total"], "order": order_id(rec.order),
                         "model": rec.model})
    return rows


def stability_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    return [{"seed": r.seed, "step": r.step, "checkpoint_task": r.checkpoint_task, **r.stability,
             "order": order_id(r.order), "model": r.model} for r in records]


def loss_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        for s in r.train.get("steps", []):
            rows.append({"order": order_id(r.order), "seed": r.seed, "step": r.step,
                         "checkpoint_task": r.checkpoint_task, "optimizer_step": s["step"], "loss": s["loss"],
                         "lr": s["lr"], "tokens": s["tokens"], "seconds": round(s["seconds"], 4)})
    return rows


def summarize(records: Sequence[StageRecord]) -> dict[str, Any]:
    """summary.json: per order, the mean matrix, CL metrics (mean ± std over seeds) and stability."""
    out: dict[str, Any] = {"orders": []}
    by_order: dict[str, list[StageRecord]] = {}
    for r in records:
        by_order.setdefault(order_id(r.order), []).append(r)
    for oid, recs in by_order.items():
        order = recs[0].order
        rows = [mx.ScoreRow(seed=x["seed"], step=x["step"], checkpoint_task=x["checkpoint_task"],
                            eval_task=x["eval_task"], accuracy=x["accuracy"], order=oid, model=x["model"])
                for x in score_rows(recs)]
        per_seed = mx.matrices_by_seed(rows)
        mean, std = mx.mean_matrix(list(per_seed.values()))
        aggregates = mx.aggregate_seeds([mx.step_metrics(m, order) for m in per_seed.values()])
        stab: dict[int, dict[str, float | None]] = {}
        for step in sorted({r.step for r in recs}):
            vals = [r.stability for r in recs if r.step == step]
            stab[step] = {k: _mean([v.get(k) for v in vals]) for k in vals[0] if k != "num_reference_examples"}
        out["orders"].append({
            "order": order,
            "seeds": sorted(per_seed),
            "matrix_mean": {str(k): v for k, v in mean.items()},
            "matrix_std": {str(k): v for k, v in std.items()},
            "metrics": [a.as_dict(include_std=True) for a in aggregates],
            "stability_mean": {str(k): v for k, v in stab.items()},
        })
    return out


def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def write_tables(store: ArtifactStore, records: Sequence[StageRecord]) -> None:
    store.put_bytes("scores.csv", _csv(SCORES_COLUMNS, score_rows(records)))
    store.put_bytes("stability.csv", _csv(STABILITY_COLUMNS, stability_rows(records)))
    store.put_bytes("train_loss.csv", _csv(TRAIN_LOSS_COLUMNS, loss_rows(records)))
    store.put_bytes("summary.json", json.dumps(summarize(records), indent=1).encode())
