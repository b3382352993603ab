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
    for entry in res.summary["orders"]:
        order = entry["order"]
        seeds = entry["seeds"]
        strategy = entry.get("strategy", "lora")
        head = f"strategy {strategy}, " if several else ""
        parts.append(f"\n== {head}order {' -> '.join(order)}  (seeds {', '.join(map(str, seeds))}; mean over seeds) ==")
        matrix = {int(k): v for k, v in entry["matrix_mean"].items()}
        parts.append("\nAccuracy matrix (rows: checkpoint, columns: task)\n" + mx.format_matrix(matrix, order))
        aggregates = mx.aggregate_seeds(
            [mx.step_metrics(m, order) for m in mx.matrices_by_seed(_score_rows(res, order, strategy)).values()])
        parts.append("\nContinual-learning metrics\n" + mx.format_metrics_table(aggregates))
        stab_rows = []
        for k, v in sorted(((int(k), v) for k, v in entry["stability_mean"].items())):
            label = "base" if k == 0 else f"after {order[k - 1]}"
            stab_rows.append([label, v.get("kl_to_base_mean"), v.get("kl_to_base_p95"), v.get("entropy_mean"),
                              v.get("entropy_delta_mean"), v.get("margin_mean"), v.get("margin_delta_mean")])
        parts.append("\nStability on the reference set (nats)\n" + format_table(
            ["checkpoint", "KL mean", "KL p95", "entropy", "Δentropy", "margin", "Δmargin"], stab_rows))
    if several:
        parts.append("\n" + render_comparison(res.comparison))
    return "\n".join(parts)


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

    body = [[r["strategy"], r["runs"]] + [cell(r, n) for n, _ in COMPARISON_VALUES] for r in rows]
    models = sorted({str(r["model"]) for r in rows})
    title = f"Strategies compared ({', '.join(models)}; mean over each strategy's runs; comparison.csv has the std)"
    return title + "\n" + format_table(["strategy", "runs"] + [label for _, label in COMPARISON_VALUES], body)


def _score_rows(res: Any, order: Sequence[str], strategy: str = "lora") -> list[Any]:
    from slmcl import metrics as mx
    from slmcl.protocol.layout import order_id
    from slmcl.protocol.tables import score_rows

    recs = [r for r in res.records if list(r.order) == list(order) and r.strategy == strategy]
    return [mx.ScoreRow(seed=x["seed"], step=x["step"], checkpoint_task=x["checkpoint_task"], eval_task=x["eval_task"],
                        accuracy=x["accuracy"], order=order_id(order), model=x["model"]) for x in score_rows(recs)]
