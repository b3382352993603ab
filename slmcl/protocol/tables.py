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
from slmcl.metrics.cl import cell, difference
from slmcl.metrics.seeds import mean_std
from slmcl.protocol.layout import order_id
from slmcl.protocol.records import StageRecord
from slmcl.storage.local import ArtifactStore

# The drift statistics and their summaries over the reference set (slmcl.inference.stability computes them).
STAT_NAMES = ("kl_to_base", "entropy", "margin")
SUMMARIES = ("mean", "p10", "p95")

SCORES_COLUMNS = ["seed", "step", "checkpoint_task", "eval_task", "eval_task_name", "accuracy", "correct", "total",
                  "order", "model", "strategy", "intervention"]
# The new-task signal: KL to base on the stage's own training prompts, after the stage and before it.
TASK_DRIFT_COLUMNS = ["task_drift_examples", "task_kl_to_base_mean", "task_kl_to_base_p95",
                      "task_kl_to_base_mean_before", "task_kl_to_base_p95_before", "task_entropy_delta_mean",
                      "task_margin_delta_mean"]
STABILITY_COLUMNS = (
    ["seed", "step", "checkpoint_task", "num_reference_examples"]
    + [f"{n}_{s}" for n in STAT_NAMES for s in SUMMARIES]
    + ["entropy_delta_mean", "margin_delta_mean", "entropy_delta_p95", "margin_delta_p95"] + TASK_DRIFT_COLUMNS
    + ["reference_accuracy", "base_reference_accuracy", "evaluated", "intervention", "order", "model", "strategy"]
)
TASK_SEP = ":"  # between a per-task stability key's name and its task: reference_accuracy:fomc
# Accuracy on the reference rows by generation, per task of the rows, beside the drift on the same prompts.
REFERENCE_ACCURACY_COLUMNS = ["model", "strategy", "order", "seed", "step", "checkpoint_task", "task", "total",
                              "accuracy", "base_accuracy", "delta_vs_base"]
INTERVENTION_COLUMNS = ["strategy", "order", "seed", "stage", "checkpoint_task", "rule", "action", "signal",
                        "statistic", "value", "threshold", "at_step", "kept_step", "total_steps", "starts_from"]
# Average accuracy per checkpoint: measured where every task was evaluated, else estimated from KL to base.
ESTIMATE_COLUMNS = ["strategy", "order", "seed", "step", "checkpoint_task", "kl_to_base_mean", "avg_accuracy",
                    "kind", "low", "high", "calibration_points", "method"]
ATTRIBUTION_COLUMNS = ["strategy", "order", "seed", "step", "checkpoint_task", "scope", "layer", "module", "name",
                       "relative_norm", "delta_norm", "base_norm", "effective_rank", "intruders", "kl_share_removed"]
TRAIN_LOSS_COLUMNS = ["order", "seed", "step", "checkpoint_task", "optimizer_step", "loss", "lr", "tokens", "seconds",
                      "strategy_loss", "strategy"]
# comparison.csv: one row per (model, strategy), mean and std over its runs (seeds x orders) of each value.
COMPARISON_VALUES = (
    ("final_avg_acc", "final avg acc"), ("op", "OP"), ("bwt", "BWT"), ("fwt", "FWT"),
    ("learning_accuracy", "LA"), ("kl_to_base", "KL to base"), ("entropy_delta", "ΔEntropy"),
    ("margin_delta", "ΔMargin"), ("trainable_params", "trainable params"), ("seconds_per_stage", "s/stage"),
    ("checkpoint_mb", "checkpoint MB"),
)
COMPARISON_COLUMNS = ["model", "strategy", "runs"] + [c for name, _ in COMPARISON_VALUES for c in (name, f"{name}_std")]


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
                         "model": rec.model, "strategy": rec.strategy, "intervention": rec.action})
    return rows


def stability_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    return [{"seed": r.seed, "step": r.step, "checkpoint_task": r.checkpoint_task, **r.stability,
             "evaluated": int(r.evaluated), "intervention": r.action,
             "order": order_id(r.order), "model": r.model, "strategy": r.strategy} for r in records]


def reference_accuracy_columns(after: dict[str, tuple[float, int]], base: dict[str, tuple[float, int]],
                               ) -> dict[str, float | int]:
    """Reference-set accuracy by generation as stage-record values: pooled over the rows, and per task of the
    rows as flat ``reference_accuracy:TASK`` / ``base_reference_accuracy:TASK`` / ``reference_rows:TASK`` keys,
    so a record's stability stays a flat map of numbers (the wire's ``map<string, double>``, seed means)."""
    def pooled(parts: dict[str, tuple[float, int]]) -> float:
        total = sum(n for _, n in parts.values())
        return sum(s for s, _ in parts.values()) / total if total else math.nan

    out: dict[str, float | int] = {"reference_accuracy": pooled(after), "base_reference_accuracy": pooled(base)}
    for prefix, parts in (("reference_accuracy", after), ("base_reference_accuracy", base)):
        out.update({f"{prefix}{TASK_SEP}{t}": s / n if n else math.nan for t, (s, n) in sorted(parts.items())})
    out.update({f"reference_rows{TASK_SEP}{t}": n for t, (_, n) in sorted({**base, **after}.items())})
    return out


def reference_accuracy_by_task(stability: dict[str, Any], *, base: bool = False) -> dict[str, tuple[float, int]]:
    """The per-task (accuracy, rows) that :func:`reference_accuracy_columns` flattened; empty if not measured."""
    prefix = f"{'base_' if base else ''}reference_accuracy{TASK_SEP}"
    return {k[len(prefix):]: (float(v), int(stability.get(f"reference_rows{TASK_SEP}{k[len(prefix):]}", 0)))
            for k, v in sorted(stability.items()) if k.startswith(prefix)}


def reference_accuracy_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """reference_accuracy.csv: per checkpoint (the base as step 0, once per run) and task of the reference rows,
    the accuracy by generation and its change from the base's; empty where it was not measured."""
    rows: list[dict[str, Any]] = []
    base_done: set[str] = set()

    def add(r: StageRecord, step: int, task_name: str, by_task: dict[str, tuple[float, int]],
            base: dict[str, tuple[float, int]]) -> None:
        for task, (acc, total) in by_task.items():
            b = base[task][0] if task in base else None
            rows.append({"model": r.model, "strategy": r.strategy, "order": order_id(r.order), "seed": r.seed,
                         "step": step, "checkpoint_task": task_name, "task": task, "total": total,
                         "accuracy": acc, "base_accuracy": b, "delta_vs_base": None if b is None else acc - b})

    for r in records:
        after, base = reference_accuracy_by_task(r.stability), reference_accuracy_by_task(r.stability, base=True)
        if not after or not base:
            continue
        if r.run_id not in base_done:
            base_done.add(r.run_id)
            add(r, 0, "base", base, base)
        add(r, r.step, r.checkpoint_task, after, base)
    return rows


def intervention_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """interventions.csv: every action of the stability policy (which stage, signal, value, threshold)."""
    return [{"strategy": r.strategy, "order": order_id(r.order), "seed": r.seed, "checkpoint_task": r.checkpoint_task,
             "starts_from": r.starts_from, **iv} for r in records for iv in r.interventions]


def attribution_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """drift_attribution.csv: per stage, module and layer, where the accumulated update sits."""
    return [{"strategy": r.strategy, "order": order_id(r.order), "seed": r.seed, "step": r.step,
             "checkpoint_task": r.checkpoint_task, **row} for r in records for row in r.attribution]


# ---------------------------------------------------------------------------------------
# Accuracy from KL: the calibration between full evaluations, and the correlation over checkpoints.


def avg_accuracy(record: StageRecord) -> float | None:
    """A checkpoint's mean accuracy over every task (the study's Figure 1); None where tasks were not evaluated."""
    accs = [record.scores[t]["accuracy"] for t in record.order if t in record.scores]
    return sum(accs) / len(accs) if accs and len(accs) == len(record.order) else None


def kl_accuracy_points(records: Sequence[StageRecord]) -> list[tuple[float, float]]:
    """(KL to base, average accuracy) of every fully evaluated checkpoint; the base once per model
    (every run shares it, and repeating it would weigh the fit and the correlation towards it)."""
    points, seen_base = [], set()
    for r in records:
        acc, kl = avg_accuracy(r), r.stability.get("kl_to_base_mean")
        if acc is None or kl is None or (isinstance(kl, float) and math.isnan(kl)):
            continue
        if r.step == 0:
            if r.model in seen_base:
                continue
            seen_base.add(r.model)
        points.append((float(kl), acc))
    return points


# The estimate regresses accuracy on log(1 + KL), not KL: KL to base is heavy-tailed (one merged-weights
# checkpoint of the 5-strategy demo sits at 8 nats, the rest under 1.7), and a line in raw KL is pulled by
# such points. Measured on that run (README "Stability policy"): leave-one-out MAE 0.044 vs 0.048 in raw KL.
CALIBRATION_X = "log(1 + KL to base)"


def _calibration_points(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(math.log1p(kl), acc) for kl, acc in points]


def _estimate(points: Sequence[tuple[float, float]], kl: float | None) -> dict[str, Any] | None:
    from slmcl.metrics.calibration import fit_calibration

    if kl is None or not points:
        return None
    return fit_calibration(_calibration_points(points), CALIBRATION_X).predict(math.log1p(float(kl))).as_dict()


def live_estimate(records: Sequence[StageRecord], record: StageRecord,
                  prior: Sequence[StageRecord] = ()) -> dict[str, Any] | None:
    """The estimated average accuracy of a checkpoint that was not fully evaluated (labelled ``estimated``)."""
    return _estimate(kl_accuracy_points([*prior, *records]), record.stability.get("kl_to_base_mean"))


def estimate_rows(records: Sequence[StageRecord], prior: Sequence[StageRecord] = ()) -> list[dict[str, Any]]:
    """estimates.csv: per checkpoint, its measured average accuracy or, between full evaluations, the
    estimate from KL to base with its 95 % prediction interval (``kind`` says which: never mixed up)."""
    points = kl_accuracy_points([*prior, *records])
    rows = []
    for r in records:
        kl = r.stability.get("kl_to_base_mean")
        row: dict[str, Any] = {"strategy": r.strategy, "order": order_id(r.order), "seed": r.seed, "step": r.step,
                               "checkpoint_task": r.checkpoint_task, "kl_to_base_mean": kl}
        acc = avg_accuracy(r)
        if acc is not None:
            row.update(avg_accuracy=acc, kind="measured")
        else:
            est = _estimate(points, kl)
            if est is None:
                continue
            row.update(avg_accuracy=est["value"], kind="estimated", low=est["low"], high=est["high"],
                       calibration_points=est["points"], method=est["method"])
        rows.append(row)
    return rows


def calibration_summary(records: Sequence[StageRecord], prior: Sequence[StageRecord] = ()) -> dict[str, Any]:
    """summary.json "calibration": the fit behind the estimates, and its error measured against full
    evaluations (each evaluated checkpoint predicted from the others: leave-one-out)."""
    from slmcl.metrics.calibration import fit_calibration, leave_one_out

    points = _calibration_points(kl_accuracy_points([*prior, *records]))
    out: dict[str, Any] = {"points": len(points), "prior_points": len(kl_accuracy_points(prior)), "x": CALIBRATION_X}
    if points:
        fit = fit_calibration(points, CALIBRATION_X)
        out["fit"] = {"intercept": fit.intercept, "slope": fit.slope, "residual_std": fit.residual_std}
    loo = leave_one_out(points)
    loo.pop("errors", None)
    out["leave_one_out"] = loo
    return out


def correlation_summary(records: Sequence[StageRecord]) -> dict[str, Any]:
    """summary.json "correlation": KL to base against average accuracy over every evaluated checkpoint,
    Pearson and Spearman with the number of points (the study's Figure 1 claim), per model."""
    from slmcl.metrics.correlation import correlation_report

    return {model: correlation_report(kl_accuracy_points([r for r in records if r.model == model]))
            for model in sorted({r.model for r in records})}


def loss_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        for s in r.train.get("steps", []):
            rows.append({"order": order_id(r.order), "seed": r.seed, "step": r.step,
                         "checkpoint_task": r.checkpoint_task, "optimizer_step": s["step"], "loss": s["loss"],
                         "lr": s["lr"], "tokens": s["tokens"], "seconds": round(s["seconds"], 4),
                         "strategy_loss": s.get("strategy_loss"), "strategy": r.strategy})
    return rows


def summarize(records: Sequence[StageRecord], prior: Sequence[StageRecord] = ()) -> dict[str, Any]:
    """summary.json: per strategy and order, the mean matrix, CL metrics (mean ± std over seeds) and stability;
    the comparison of strategies, the KL-accuracy correlation and the calibration behind the estimates."""
    out: dict[str, Any] = {"orders": [], "comparison": comparison_rows(records),
                           "correlation": correlation_summary(records),
                           "calibration": calibration_summary(records, prior),
                           "interventions": len(intervention_rows(records))}
    by_order: dict[tuple[str, str, str], list[StageRecord]] = {}
    for r in records:
        by_order.setdefault((r.model, r.strategy, order_id(r.order)), []).append(r)
    for (model, strategy, oid), recs in by_order.items():
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
            keys = dict.fromkeys(k for v in vals for k in v if k != "num_reference_examples")
            stab[step] = {k: _mean([v.get(k) for v in vals]) for k in keys}
        out["orders"].append({
            "model": model,
            "strategy": strategy,
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


def _final_values(recs: Sequence[StageRecord]) -> dict[str, float | None]:
    """One run's row of the comparison: its last checkpoint's metrics and drift, its cost."""
    order = recs[0].order
    matrix = _accuracy_matrix(recs)
    last = max(recs, key=lambda r: r.step)
    ended = last.step == len(order) or last.action == "stop"  # a run the policy stopped is finished too
    metrics = mx.step_metrics(matrix, order)[last.step] if ended else None
    trained = [r for r in recs if r.step > 0]

    def metric(name: str) -> float | None:
        return None if metrics is None else metrics.metric(name)

    return {
        "final_avg_acc": metric("op"), "op": metric("op"), "bwt": metric("bwt"),
        "fwt": mx.run_fwt(matrix, order) if metrics else None,
        "learning_accuracy": metric("learning_accuracy"),
        "kl_to_base": last.stability.get("kl_to_base_mean") if metrics else None,
        "entropy_delta": last.stability.get("entropy_delta_mean") if metrics else None,
        "margin_delta": last.stability.get("margin_delta_mean") if metrics else None,
        "trainable_params": float(max((r.trainable_params for r in trained), default=0)) or None,
        "seconds_per_stage": _mean([r.timing.get("train_seconds") for r in trained]),
        "checkpoint_mb": (last.checkpoint_bytes / 1e6) if last.checkpoint_bytes else None,
    }


PER_TASK_COLUMNS = ["model", "strategy", "order", "seed", "task", "position", "base_acc", "previous_acc",
                    "learned_acc", "final_acc", "forgetting", "bwt", "fwt", "next_task_fwt"]


def _accuracy_matrix(recs: Sequence[StageRecord]) -> dict[int, dict[str, float]]:
    """R[step][task] of one run's records (a checkpoint measured by drift only has an empty row)."""
    return {r.step: {t: s["accuracy"] for t, s in r.scores.items()} for r in recs}


def _runs(records: Sequence[StageRecord]) -> list[list[StageRecord]]:
    """The records grouped by run, each run's in step order."""
    runs: dict[str, list[StageRecord]] = {}
    for r in records:
        runs.setdefault(r.run_id, []).append(r)
    return [sorted(recs, key=lambda r: r.step) for recs in runs.values()]


def _run_columns(first: StageRecord) -> dict[str, Any]:
    return {"model": first.model, "strategy": first.strategy, "order": order_id(first.order), "seed": first.seed}


def _peak_forgetting(matrix: mx.cl.Matrix, task: str, learned: int, k: int) -> float | None:
    """Chaudhry's forgetting of ``task`` (learned at step ``learned``) at checkpoint k: its best accuracy over
    steps learned..k-1 minus its accuracy at k; undefined when any of those cells was not evaluated."""
    seen = [cell(matrix, step, task) for step in range(learned, k)]
    known = [v for v in seen if v is not None]
    peak = max(known) if known and len(known) == len(seen) else None
    return difference(peak, cell(matrix, k, task))


def per_task_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """per_task.csv: each task of each run, where the run-level metrics come from.

    For task j learned at step j of a run that ended at step K (R: the run's accuracy matrix):
    ``base_acc`` R[0][j]; ``previous_acc`` R[j-1][j] (what the model knew of it just before learning it);
    ``learned_acc`` R[j][j]; ``final_acc`` R[K][j]; ``forgetting`` max over l in [j, K-1] of R[l][j] minus
    R[K][j] (Chaudhry et al.; none for the last task); ``bwt`` R[K][j] - R[j][j]; ``fwt`` R[j-1][j] - R[0][j]
    (none for the first task); ``next_task_fwt`` R[j][j+1] - R[0][j+1], the study's column: what learning
    task j did for the next one. A cell that was not evaluated leaves the values that need it empty.
    """
    rows = []
    for recs in _runs(records):
        order, m, end = list(recs[0].order), _accuracy_matrix(recs), recs[-1].step
        for j, task in enumerate(order[:end], start=1):
            nxt = order[j] if j < len(order) else None
            rows.append({
                **_run_columns(recs[0]),
                "task": task, "position": j, "base_acc": cell(m, 0, task), "previous_acc": cell(m, j - 1, task),
                "learned_acc": cell(m, j, task), "final_acc": cell(m, end, task),
                "forgetting": _peak_forgetting(m, task, j, end) if j < end else None,
                "bwt": difference(cell(m, end, task), cell(m, j, task)) if j < end else None,
                "fwt": difference(cell(m, j - 1, task), cell(m, 0, task)) if j > 1 else None,
                "next_task_fwt": difference(cell(m, j, nxt), cell(m, 0, nxt)) if nxt is not None else None,
            })
    return rows


PER_TASK_STEP_COLUMNS = ["model", "strategy", "order", "seed", "step", "task", "position", "acc", "bwt",
                         "forgetting", "fwt"]


def per_task_step_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """per_task_steps.csv: every task at every evaluated checkpoint, the study's per-task breakdowns by step.

    At checkpoint k of a run (R: its accuracy matrix), task j of the order (``position``): ``acc`` R[k][j];
    for a task learned before (j < k) ``bwt`` R[k][j] - R[j][j] and ``forgetting`` max over l in [j, k-1] of
    R[l][j] minus R[k][j] (per_task.csv's definitions, at k instead of the run's end); for a task still to come
    (j > k) ``fwt`` R[k][j] - R[0][j], what the tasks learned so far did for it (0 at the base, as the study
    writes it). The current task (j = k) has neither. A cell that was not evaluated leaves what needs it empty.
    """
    rows = []
    for recs in _runs(records):
        m = _accuracy_matrix(recs)
        for k in sorted(m):
            if not m[k]:
                continue  # measured by drift only (evaluation.every): no accuracy at this checkpoint
            for j, task in enumerate(recs[0].order, start=1):
                rows.append({
                    **_run_columns(recs[0]), "step": k, "task": task, "position": j, "acc": cell(m, k, task),
                    "bwt": difference(cell(m, k, task), cell(m, j, task)) if j < k else None,
                    "forgetting": _peak_forgetting(m, task, j, k) if j < k else None,
                    "fwt": difference(cell(m, k, task), cell(m, 0, task)) if j > k else None,
                })
    return rows


def comparison_rows(records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """Per model and strategy, mean ± std over its finished runs of the final metrics, drift and cost.

    A run counts once its last stage is committed (FWT and the rest are the final checkpoint's);
    ``final_avg_acc`` is OP at the last step (every task of the order has been learned).
    """
    runs: dict[tuple[str, str], dict[str, list[StageRecord]]] = {}
    for r in records:
        runs.setdefault((r.model, r.strategy), {}).setdefault(r.run_id, []).append(r)
    rows = []
    for (model, strategy), by_run in runs.items():
        finals = [_final_values(recs) for recs in by_run.values()]
        finals = [f for f in finals if f["op"] is not None]
        row: dict[str, Any] = {"model": model, "strategy": strategy, "runs": len(finals)}
        for name, _ in COMPARISON_VALUES:
            vals = [float(v) for f in finals if (v := f[name]) is not None and not math.isnan(float(v))]
            mean, std = mean_std(vals)
            row[name], row[f"{name}_std"] = mean, std
        rows.append(row)
    return rows


def comparison_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """comparison.md: the comparison as a Markdown table, ``mean ± std`` where there are several runs."""
    def formatted(row: dict[str, Any], name: str) -> str:
        mean, std = row.get(name), row.get(f"{name}_std")
        if mean is None:
            return "—"
        digits = 0 if name == "trainable_params" else 1 if name in ("seconds_per_stage", "checkpoint_mb") else 3
        text = f"{mean:,.{digits}f}"
        return f"{text} ± {std:.{digits}f}" if std is not None else text

    headers = ["model", "strategy", "runs"] + [label for _, label in COMPARISON_VALUES]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join([str(row["model"]), str(row["strategy"]), str(row["runs"])]
                                        + [formatted(row, name) for name, _ in COMPARISON_VALUES]) + " |")
    return "\n".join(lines) + "\n"


def write_tables(store: ArtifactStore, records: Sequence[StageRecord], prior: Sequence[StageRecord] = ()) -> None:
    summary = summarize(records, prior)  # holds the comparison rows too: computed once for both files
    store.put_bytes("interventions.csv", _csv(INTERVENTION_COLUMNS, intervention_rows(records)))
    store.put_bytes("estimates.csv", _csv(ESTIMATE_COLUMNS, estimate_rows(records, prior)))
    store.put_bytes("drift_attribution.csv", _csv(ATTRIBUTION_COLUMNS, attribution_rows(records)))
    store.put_bytes("reference_accuracy.csv", _csv(REFERENCE_ACCURACY_COLUMNS, reference_accuracy_rows(records)))
    store.put_bytes("per_task.csv", _csv(PER_TASK_COLUMNS, per_task_rows(records)))
    store.put_bytes("per_task_steps.csv", _csv(PER_TASK_STEP_COLUMNS, per_task_step_rows(records)))
    store.put_bytes("comparison.csv", _csv(COMPARISON_COLUMNS, summary["comparison"]))
    store.put_bytes("comparison.md", comparison_markdown(summary["comparison"]).encode())
    store.put_bytes("scores.csv", _csv(SCORES_COLUMNS, score_rows(records)))
    store.put_bytes("stability.csv", _csv(STABILITY_COLUMNS, stability_rows(records)))
    store.put_bytes("train_loss.csv", _csv(TRAIN_LOSS_COLUMNS, loss_rows(records)))
    store.put_bytes("summary.json", json.dumps(summary, indent=1).encode())
