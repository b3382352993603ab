"""The results directory: one record per finished stage, and the tables derived from them.

Each completed stage writes ``runs/<run_id>/stage-<k>.json`` last, after its checkpoint
and predictions: the record is the commit point. ``scores.csv``, ``stability.csv``,
``train_loss.csv`` and ``summary.json`` are rebuilt from the records, so a resumed run can
never duplicate a row, and the monitor service writes the same layout from the same code.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from slmcl import metrics as mx
from slmcl.errors import NotFoundError
from slmcl.storage.local import ArtifactStore, LocalStore

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


def order_id(order: Sequence[str]) -> str:
    return ".".join(order)  # '.' never appears in a task name


def run_id(order: Sequence[str], seed: int) -> str:
    return f"{order_id(order)}-s{seed}"


def stage_key(rid: str, step: int) -> str:
    return f"runs/{rid}/stage-{step}.json"


def checkpoint_prefix(rid: str, step: int) -> str:
    return f"checkpoints/{rid}/step-{step}"


def predictions_key(rid: str, step: int, task: str) -> str:
    return f"predictions/{rid}/step-{step}/{task}.jsonl"


@dataclass
class StageRecord:
    """Everything measured at one checkpoint of one run (step 0 is the base)."""

    run_id: str
    order: list[str]
    seed: int
    step: int
    checkpoint_task: str
    model: str
    scores: dict[str, dict[str, Any]]  # task -> {"accuracy", "correct", "total"}
    stability: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)  # losses per optimizer step, tokens, seconds
    checkpoint: str = ""  # store prefix of the adapter
    timing: dict[str, float] = field(default_factory=dict)  # eval_seconds, stability_seconds (benchmarks read it)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, indent=1, allow_nan=False, default=_nan_to_none)

    @classmethod
    def from_json(cls, text: str) -> "StageRecord":
        return cls(**json.loads(text))


def _nan_to_none(o: Any) -> Any:
    raise TypeError(f"not JSON serializable: {o!r}")


def write_stage(store: ArtifactStore, rec: StageRecord) -> None:
    store.put_bytes(stage_key(rec.run_id, rec.step), rec.to_json().encode())


def read_stages(store: ArtifactStore, rid: str | None = None) -> list[StageRecord]:
    keys = [k for k in store.list_keys(f"runs/{rid}" if rid else "runs") if k.rsplit("/", 1)[-1].startswith("stage-")]
    recs = [StageRecord.from_json(store.get_bytes(k).decode()) for k in keys]
    return sorted(recs, key=lambda r: (order_id(r.order), r.seed, r.step))


def write_predictions(store: ArtifactStore, key: str, rows: Sequence[dict[str, Any]]) -> None:
    store.put_bytes(key, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


# ---------------------------------------------------------------------------------------
# Derived tables.


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


# ---------------------------------------------------------------------------------------
# Reading a results directory back (Python API).


@dataclass(frozen=True)
class Results:
    """A results directory as objects: per order, the matrix, metrics and stability."""

    path: Path
    records: list[StageRecord]
    summary: dict[str, Any]

    @property
    def orders(self) -> list[list[str]]:
        return [o["order"] for o in self.summary["orders"]]

    def matrix(self, order: Sequence[str] | None = None) -> dict[int, dict[str, float]]:
        return {int(k): v for k, v in self._order(order)["matrix_mean"].items()}

    def metrics(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return self._order(order)["metrics"]

    def stability(self, order: Sequence[str] | None = None) -> dict[int, dict[str, float | None]]:
        return {int(k): v for k, v in self._order(order)["stability_mean"].items()}

    def _order(self, order: Sequence[str] | None) -> dict[str, Any]:
        entries = self.summary["orders"]
        if order is None:
            return entries[0]
        for e in entries:
            if list(e["order"]) == list(order):
                return e
        raise NotFoundError(f"no results for order {'>'.join(order)} in {self.path}")


def read_results(path: str | Path) -> Results:
    store = LocalStore(path)
    if not Path(path).is_dir():
        raise NotFoundError(f"results directory not found: {path}")
    records = read_stages(store)
    if not records:
        raise NotFoundError(f"{path}: no finished stages (runs/*/stage-*.json) in this directory")
    return Results(Path(path), records, summarize(records))
