"""The text the command line prints: plain tables and the results report of an experiment.

Shared by the core commands and by the commands other packages add through the
``slmcl.commands`` entry points (``slmcl results`` prints what ``slmcl run`` prints), so it
lives in the core and imports nothing from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_results(path: str | Path) -> str:
    """Accuracy matrix, CL metrics and stability, per order, as printed after a run."""
    from slmcl import metrics as mx
    from slmcl.protocol.results import read_results

    res = read_results(path)
    parts = [f"results: {path}"]
    several = len({e.get("strategy", "lora") for e in res.summary["orders"]}) > 1
    models = len({e.get("model") for e in res.summary["orders"]}) > 1
    for entry in res.summary["orders"]:
        order = entry["order"]
        seeds = entry["seeds"]
        strategy = entry.get("strategy", "lora")
        head = (f"model {entry.get('model')}, " if models else "") + (f"strategy {strategy}, " if several else "")
        parts.append(f"\n== {head}order {' -> '.join(order)}  (seeds {', '.join(map(str, seeds))}; mean over seeds) ==")
        matrix = {int(k): v for k, v in entry["matrix_mean"].items()}
        parts.append("\nAccuracy matrix (rows: checkpoint, columns: task)\n" + mx.format_matrix(matrix, order))
        aggregates = mx.aggregate_seeds([mx.step_metrics(m, order) for m in mx.matrices_by_seed(
            _score_rows(res, order, strategy, entry.get("model"))).values()])
        parts.append("\nContinual-learning metrics\n" + mx.format_metrics_table(aggregates))
        stab_rows = []
        for k, v in sorted(((int(k), v) for k, v in entry["stability_mean"].items())):
            label = "base" if k == 0 else f"after {order[k - 1]}"
            stab_rows.append([label, v.get("kl_to_base_mean"), v.get("kl_to_base_p95"), v.get("entropy_mean"),
                              v.get("entropy_delta_mean"), v.get("margin_mean"), v.get("margin_delta_mean")])
        parts.append("\nStability on the reference set (nats)\n" + format_table(
            ["checkpoint", "KL mean", "KL p95", "entropy", "Δentropy", "margin", "Δmargin"], stab_rows))
    if several or models:
        parts.append("\n" + render_comparison(res.comparison))
    parts += render_self_aware(res.records, res.summary)
    return "\n".join(parts)


def render_self_aware(records: Sequence[Any], summary: dict[str, Any]) -> list[str]:
    """What the stability policy did, the estimates between full evaluations, the KL-accuracy correlation
    and where the drift sits: the parts of the final print that read the whole experiment."""
    from slmcl.protocol.policy import describe
    from slmcl.protocol.tables import estimate_rows

    parts = []
    acted = [(r, iv) for r in records for iv in r.interventions]
    if acted:
        parts.append("\nStability policy (interventions.csv)")
        parts += [f"  {r.run_id} stage {r.step} ({r.checkpoint_task}): {describe(iv)}" for r, iv in acted]
    estimated = [e for e in estimate_rows(records) if e["kind"] == "estimated"]
    if estimated:
        rows = [[e["order"], e["seed"], e["step"], e["kl_to_base_mean"], e["avg_accuracy"], e.get("low"),
                 e.get("high")] for e in estimated]
        parts.append("\nESTIMATED average accuracy between full evaluations (estimates.csv; from KL to base)\n"
                     + format_table(["order", "seed", "step", "KL mean", "estimate", "low 95%", "high 95%"], rows))
    cal = summary.get("calibration", {})
    loo = cal.get("leave_one_out") or {}
    if loo.get("mae") is not None:
        cover = loo.get("coverage")
        parts.append(f"Estimate error against full evaluations (leave-one-out over {loo['points']} checkpoints): "
                     f"MAE {loo['mae']:.3f}, max {loo['max_abs_error']:.3f}"
                     + (f", {cover:.0%} inside the 95% interval" if cover is not None else ""))
    for model, corr in (summary.get("correlation") or {}).items():
        if corr.get("points", 0) < 2:
            continue
        parts.append(f"\nKL to base vs average accuracy ({model}, {corr['points']} checkpoints): Pearson r "
                     f"{_fmt(corr.get('pearson'))}, Spearman rho {_fmt(corr.get('spearman'))}")
        if corr.get("warning"):
            parts.append(f"  warning: {corr['warning']}")
    last: dict[str, Any] = {}
    for r in records:
        if r.attribution and (r.run_id not in last or r.step > last[r.run_id].step):
            last[r.run_id] = r
    if last:
        parts.append("\nWhere the drift sits (drift_attribution.csv; last checkpoint of each run, top layers by "
                     "relative update norm)")
        for rid, r in sorted(last.items()):
            layers = sorted((x for x in r.attribution if x.get("scope") == "layer"),
                            key=lambda x: -(x.get("relative_norm") or 0.0))[:3]
            cells = [f"layer {x['layer']} {x['relative_norm']:.2e} ({x.get('intruders', 0)} intruders"
                     + (f", {x['kl_share_removed']:.0%} of KL" if x.get("kl_share_removed") is not None else "")
                     + ")" for x in layers]
            parts.append(f"  {rid} stage {r.step}: " + "; ".join(cells))
    return parts


def render_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """The strategies side by side (comparison.csv): final metrics, drift and cost, mean over runs."""
    from slmcl.protocol.tables import COMPARISON_VALUES

    def cell(row: dict[str, Any], name: str) -> Any:
        v = row.get(name)
        if v is None:
            return None
        if name == "trainable_params":
            return f"{v:,.0f}"
        if name in ("seconds_per_stage", "checkpoint_mb"):
            return f"{v:.1f}"
        return float(v)

    models = sorted({str(r["model"]) for r in rows})
    if len(models) > 1:  # the stability fingerprints of several models side by side
        body = [[r["model"], r["strategy"], r["runs"]] + [cell(r, n) for n, _ in COMPARISON_VALUES] for r in rows]
        title = "Models compared (mean over each model's runs; comparison.csv has the std)"
        return title + "\n" + format_table(["model", "strategy", "runs"] + [label for _, label in COMPARISON_VALUES],
                                           body)
    body = [[r["strategy"], r["runs"]] + [cell(r, n) for n, _ in COMPARISON_VALUES] for r in rows]
    title = f"Strategies compared ({', '.join(models)}; mean over each strategy's runs; comparison.csv has the std)"
    return title + "\n" + format_table(["strategy", "runs"] + [label for _, label in COMPARISON_VALUES], body)


def _score_rows(res: Any, order: Sequence[str], strategy: str = "lora", model: str | None = None) -> list[Any]:
    from slmcl import metrics as mx
    from slmcl.protocol.layout import order_id
    from slmcl.protocol.tables import score_rows

    recs = [r for r in res.records if list(r.order) == list(order) and r.strategy == strategy
            and (model is None or r.model == model)]
    return [mx.ScoreRow(seed=x["seed"], step=x["step"], checkpoint_task=x["checkpoint_task"], eval_task=x["eval_task"],
                        accuracy=x["accuracy"], order=order_id(order), model=x["model"]) for x in score_rows(recs)]
