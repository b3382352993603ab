"""The study's four tables, each rendered as Markdown, CSV and LaTeX (booktabs) from one definition.

A table is a list of columns and a list of rows of raw values; the three renderers differ only
in how a cell is written. CSV keeps full precision and splits ``mean`` and ``std`` into two
columns (a reader computes with them); Markdown and LaTeX print ``mean ± std`` (the std left out
with one seed) and show a model's name only on the first row of its block, as the study does.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from slmcl.protocol.layout import order_id
from slmcl.protocol.tables import per_task_rows, reference_accuracy_rows
from slmcl.report.study import NO_STAT, OrderGroup, Stat, Study, order_text

Kind = Literal["model", "text", "order", "int", "stat"]


@dataclass(frozen=True)
class Column:
    key: str  # the CSV header (and the key of a row's value)
    label: str  # the Markdown / LaTeX header
    kind: Kind = "text"


@dataclass
class Table:
    name: str  # the file stem under tables/
    title: str
    caption: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_labels: dict[str, str] = field(default_factory=dict)

    @property
    def stat_keys(self) -> list[str]:
        return [c.key for c in self.columns if c.kind == "stat"]


# --------------------------------------------------------------------------- numbers


def fmt_number(v: float) -> str:
    """Three decimals, or three significant digits below 0.001 (a tiny model's KL would read 0.000)."""
    if v != 0 and abs(v) < 0.001:
        return f"{v:.2e}"
    text = f"{v:.3f}"
    return "0.000" if text == "-0.000" else text


def fmt_stat(s: Stat | None) -> str:
    """``mean ± std`` over seeds, ``mean`` with one seed, ``—`` where undefined."""
    if s is None or s.mean is None:
        return "—"
    return fmt_number(s.mean) if s.std is None else f"{fmt_number(s.mean)} ± {fmt_number(s.std)}"


def cell_text(col: Column, value: Any, labels: dict[str, str]) -> str:
    if value is None:
        return "—"
    if col.kind == "stat":
        return fmt_stat(value)
    if col.kind == "order":
        return order_text(value)
    if col.kind == "model":
        return labels.get(value, str(value))
    return str(value)


def blanked_rows(table: Table) -> list[dict[str, Any]]:
    """Rows with a model (and its strategy) shown only where its block starts: the study's layout."""
    out: list[dict[str, Any]] = []
    prev: dict[str, Any] = {}
    for row in table.rows:
        shown = dict(row)
        if prev and row.get("model") == prev.get("model"):
            shown["model"] = ""
            if "strategy" in row and row.get("strategy") == prev.get("strategy"):
                shown["strategy"] = ""
        prev = row
        out.append(shown)
    return out


# --------------------------------------------------------------------------- renderers


def to_csv(table: Table) -> str:
    headers: list[str] = []
    for c in table.columns:
        headers += [c.key, f"{c.key}_std"] if c.kind == "stat" else [c.key]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for row in table.rows:
        cells: list[Any] = []
        for c in table.columns:
            v = row.get(c.key)
            if c.kind == "stat":
                s: Stat = v or NO_STAT
                cells += ["" if s.mean is None else repr(s.mean), "" if s.std is None else repr(s.std)]
            elif c.kind == "order":
                cells.append("" if v is None else order_id(v))
            else:
                cells.append("" if v is None else v)
        w.writerow(cells)
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    numeric = ("stat", "int")
    lines = [f"**{_md_escape(table.title)}**", "",
             "| " + " | ".join(_md_escape(c.label) for c in table.columns) + " |",
             "|" + "|".join("---:" if c.kind in numeric else "---" for c in table.columns) + "|"]
    for row in blanked_rows(table):
        cells = [cell_text(c, row.get(c.key), table.model_labels) if row.get(c.key) != "" else ""
                 for c in table.columns]
        lines.append("| " + " | ".join(_md_escape(x) for x in cells) + " |")
    lines += ["", _md_escape(table.caption)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "→": r"$\rightarrow$", "—": "---", "–": "--", "−": "$-$", "·": r"$\cdot$",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    """Text made safe for a LaTeX document (pdflatex: the few non-ASCII signs we print become math)."""
    return _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group(0)], text)


_SCI = re.compile(r"(-?\d+\.\d+)e([+-])0*(\d+)")


def latex_number(text: str) -> str:
    """A formatted ``mean ± std`` in math mode: a real minus sign, ``\\pm``, and 1.5\\times10^{-4}."""
    if text == "—":
        return "---"
    body = _SCI.sub(lambda m: f"{m.group(1)}\\times10^{{{'-' if m.group(2) == '-' else ''}{m.group(3)}}}", text)
    return "$" + body.replace(" ± ", r" \pm ") + "$"


def to_latex(table: Table) -> str:
    align = "".join("r" if c.kind in ("stat", "int") else "l" for c in table.columns)
    lines = [r"% Generated by slmcl report; needs \usepackage{booktabs}.",
             r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(table.caption)}}}",
             rf"\label{{tab:slmcl-{table.name.replace('_', '-')}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c.label) for c in table.columns) + r" \\", r"\midrule"]
    leading = [c.key for c in table.columns if c.key in ("model", "strategy")]
    prev: tuple[Any, ...] | None = None
    for raw, row in zip(table.rows, blanked_rows(table)):
        key = tuple(raw.get(k) for k in leading)
        if prev is not None and leading and key != prev:
            lines.append(r"\midrule")
        prev = key
        cells = []
        for c in table.columns:
            v = row.get(c.key)
            if v == "":
                cells.append("")
            elif c.kind == "stat":
                cells.append(latex_number(fmt_stat(v)))
            else:
                cells.append(latex_escape(cell_text(c, v, table.model_labels)))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[Table], str]] = {"md": to_markdown, "csv": to_csv, "tex": to_latex}


# --------------------------------------------------------------------------- the study's tables


def _lead(study: Study) -> list[Column]:
    cols = [Column("model", "Model", "model")]
    if study.several_strategies:
        cols.append(Column("strategy", "Strategy"))
    return cols


def _base_row(study: Study, g: OrderGroup) -> dict[str, Any]:
    row: dict[str, Any] = {"model": g.model, "order": g.order}
    if study.several_strategies:
        row["strategy"] = g.strategy
    return row


def _trained_steps(g: OrderGroup) -> list[int]:
    return [k for k in g.steps if k >= 1]


def _committed(g: OrderGroup, step: int) -> int:
    """How many seeds have committed ``step`` (a row's "Seeds"; an accuracy cell may use fewer: evaluated ones)."""
    return sum(1 for run in g.runs if run.record(step) is not None)


def _seeds_note(study: Study) -> str:
    return ("Mean ± sample std over seeds (metrics computed per seed, then averaged); "
            "one seed: no std; — : undefined or not evaluated at that checkpoint.")


def acquisition_table(study: Study) -> Table:
    """The study's Table 3: what each stage learned, what it gained, and the average over all tasks."""
    t = Table("task_acquisition", "Task acquisition per stage",
              "Per model, order and step k: the task learned, its accuracy after learning R[k][k], the immediate "
              "gain R[k][k] − R[k−1][k], the change vs base R[k][k] − R[0][k] and the average accuracy over all "
              "tasks at k. " + _seeds_note(study),
              [*_lead(study), Column("order", "Order", "order"), Column("step", "Step", "int"),
               Column("learned_task", "Learned task"), Column("after_learning", "After learning", "stat"),
               Column("immediate_gain", "Immediate gain", "stat"), Column("delta_vs_base", "Δ vs base", "stat"),
               Column("avg_accuracy", "Average accuracy", "stat"), Column("seeds", "Seeds", "int")],
              model_labels=study.model_labels)
    for g in study.groups:
        for k in _trained_steps(g):
            t.rows.append({**_base_row(study, g), "step": k, "learned_task": g.order[k - 1],
                           "after_learning": g.metric(k, "current_acc"),
                           "immediate_gain": g.metric(k, "adaptation_gain"),
                           "delta_vs_base": g.metric(k, "current_delta_vs_base"),
                           "avg_accuracy": g.metric(k, "avg_all_tasks"), "seeds": _committed(g, k)})
    return t


def cl_metrics_table(study: Study) -> Table:
    """The study's Table 4: OP, BWT and FWT per checkpoint."""
    t = Table("cl_metrics", "Continual-learning metrics per checkpoint",
              "OP: mean accuracy over the tasks learned so far; BWT: mean change on earlier tasks since each was "
              "learned; FWT: mean change vs base on the tasks not learned yet. " + _seeds_note(study),
              [*_lead(study), Column("order", "Order", "order"), Column("step", "Step", "int"),
               Column("checkpoint", "Checkpoint"), Column("op", "OP", "stat"), Column("bwt", "BWT", "stat"),
               Column("fwt", "FWT", "stat"), Column("seeds", "Seeds", "int")],
              model_labels=study.model_labels)
    for g in study.groups:
        for k in _trained_steps(g):
            t.rows.append({**_base_row(study, g), "step": k, "checkpoint": g.checkpoint_label(k),
                           "op": g.metric(k, "op"), "bwt": g.metric(k, "bwt"), "fwt": g.metric(k, "fwt"),
                           "seeds": _committed(g, k)})
    return t


STABILITY_KEYS = (("entropy_delta", "ΔEntropy", "entropy_delta_mean"),
                  ("margin_delta", "ΔMargin", "margin_delta_mean"),
                  ("kl_to_base", "KL to base (mean)", "kl_to_base_mean"),
                  ("entropy_delta_p95", "ΔEntropy (p95)", "entropy_delta_p95"),
                  ("margin_delta_p95", "ΔMargin (p95)", "margin_delta_p95"),
                  ("kl_to_base_p95", "KL to base (p95)", "kl_to_base_p95"))


def stability_table(study: Study) -> Table:
    """The study's Table 5: drift on the reference set relative to the base, per checkpoint."""
    t = Table("stability", "Stability on the reference set",
              "Next-token drift on the fixed reference set relative to the base model (nats): change of mean "
              "entropy and of mean top-2 log-probability margin, KL to base (mean and 95th percentile over the "
              "reference examples). Measured at every checkpoint, evaluated or not. " + _seeds_note(study),
              [*_lead(study), Column("order", "Order", "order"), Column("step", "Step", "int"),
               Column("checkpoint", "Checkpoint"), *(Column(k, label, "stat") for k, label, _ in STABILITY_KEYS),
               Column("seeds", "Seeds", "int")],
              model_labels=study.model_labels)
    for g in study.groups:
        for k in _trained_steps(g):
            t.rows.append({**_base_row(study, g), "step": k, "checkpoint": g.checkpoint_label(k),
                           **{key: g.stability(k, field) for key, _, field in STABILITY_KEYS},
                           "seeds": _committed(g, k)})
    return t


def order_table(study: Study) -> Table:
    """The study's Table 6: final average accuracy and final KL, original order against its reverse.

    Without any reversed pair in the experiment, one row per order (final accuracy and KL only).
    """
    note = ("Final = the last checkpoint of each finished run (every task learned, or stopped by the "
            "stability policy); average accuracy over all tasks, KL to base mean (nats). ")
    if not study.has_reversed:
        t = Table("order_robustness", "Final results per task order", note + _seeds_note(study),
                  [*_lead(study), Column("order", "Order", "order"),
                   Column("final_avg_accuracy", "Final average accuracy", "stat"),
                   Column("final_kl_to_base", "Final KL to base", "stat"), Column("seeds", "Seeds", "int")],
                  model_labels=study.model_labels)
        for g in study.groups:
            acc, kl = g.final()
            t.rows.append({**_base_row(study, g), "final_avg_accuracy": acc, "final_kl_to_base": kl,
                           "seeds": acc.n})
        return t
    t = Table("order_robustness", "Final results: original vs reversed task order",
              note + "Reversed: the order that is the exact reverse of the original in this experiment. "
              + _seeds_note(study),
              [*_lead(study), Column("order", "Original order", "order"),
               Column("final_avg_accuracy_original", "Final avg. accuracy (original)", "stat"),
               Column("final_avg_accuracy_reversed", "Final avg. accuracy (reversed)", "stat"),
               Column("final_kl_to_base_original", "Final KL to base (original)", "stat"),
               Column("final_kl_to_base_reversed", "Final KL to base (reversed)", "stat"),
               Column("seeds_original", "Seeds (original)", "int"),
               Column("seeds_reversed", "Seeds (reversed)", "int")],
              model_labels=study.model_labels)
    for _, _, groups in study.by_model_strategy():
        by_order = {g.order: g for g in groups}
        done: set[tuple[str, ...]] = set()
        orig: OrderGroup | None
        rev: OrderGroup | None
        for g in groups:
            if g.order in done:
                continue  # a reversed order, shown on its original's row
            if g.role == "reversed" and g.partner is not None:  # its original has no runs for this model
                orig, rev, order = by_order.get(g.partner), g, g.partner
            else:
                orig, rev, order = g, by_order.get(g.partner) if g.partner else None, g.order
            done |= {x.order for x in (orig, rev) if x is not None}
            acc_o, kl_o = orig.final() if orig is not None else (NO_STAT, NO_STAT)
            acc_r, kl_r = rev.final() if rev is not None else (NO_STAT, NO_STAT)
            t.rows.append({**_base_row(study, g), "order": order,
                           "final_avg_accuracy_original": acc_o, "final_avg_accuracy_reversed": acc_r,
                           "final_kl_to_base_original": kl_o, "final_kl_to_base_reversed": kl_r,
                           "seeds_original": acc_o.n, "seeds_reversed": acc_r.n})
    return t


PER_TASK_KEYS = (("base_acc", "Base"), ("previous_acc", "Before learning"), ("learned_acc", "After learning"),
                 ("final_acc", "Final"), ("forgetting", "Forgetting"), ("bwt", "BWT"), ("fwt", "FWT"),
                 ("next_task_fwt", "Next-task FWT"))


def per_task_table(study: Study) -> Table:
    """Forgetting and transfer by task (the study's per-task breakdown), from ``per_task.csv``'s definitions."""
    t = Table("per_task", "Forgetting and transfer by task",
              "Per model, order and task (at its position in the order): its base accuracy R[0][j], before learning "
              "R[j−1][j], after learning R[j][j], final R[K][j], forgetting (max over l in [j, K−1] of R[l][j] − "
              "R[K][j]), BWT R[K][j] − R[j][j], FWT R[j−1][j] − R[0][j] and next-task FWT R[j][j+1] − R[0][j+1]. "
              + _seeds_note(study),
              [*_lead(study), Column("order", "Order", "order"), Column("position", "Position", "int"),
               Column("task", "Task"), *(Column(k, label, "stat") for k, label in PER_TASK_KEYS),
               Column("seeds", "Seeds", "int")],
              model_labels=study.model_labels)
    for g in study.groups:
        rows = per_task_rows([rec for run in g.runs for rec in run.records])
        for j, task in enumerate(g.order, start=1):
            cells = [r for r in rows if r["position"] == j]
            if cells:
                t.rows.append({**_base_row(study, g), "position": j, "task": task, "seeds": len(cells),
                               **{k: Stat.of([c[k] for c in cells]) for k, _ in PER_TASK_KEYS}})
    return t


def reference_accuracy_table(study: Study) -> Table:
    """Accuracy on the reference set's rows by generation (per task of its rows) beside the drift of those rows."""
    t = Table("reference_accuracy", "Reference-set accuracy by generation",
              "Per model, order and checkpoint: accuracy on the reference rows of each task (greedy generation, "
              "scored by the task's kind), its change from the base, and the KL to base on the same prompts. "
              + _seeds_note(study),
              [*_lead(study), Column("order", "Order", "order"), Column("step", "Step", "int"),
               Column("checkpoint", "Checkpoint"), Column("task", "Rows of"), Column("rows", "Rows", "int"),
               Column("accuracy", "Accuracy", "stat"), Column("delta_vs_base", "Δ vs base", "stat"),
               Column("kl_to_base", "KL to base (mean)", "stat"), Column("seeds", "Seeds", "int")],
              model_labels=study.model_labels)
    for g in study.groups:
        rows = reference_accuracy_rows([rec for run in g.runs for rec in run.records])
        for k in sorted({r["step"] for r in rows}):
            for task in dict.fromkeys(r["task"] for r in rows if r["step"] == k):
                cells = [r for r in rows if r["step"] == k and r["task"] == task]
                t.rows.append({**_base_row(study, g), "step": k, "checkpoint": g.checkpoint_label(k), "task": task,
                               "rows": cells[0]["total"], "accuracy": Stat.of([c["accuracy"] for c in cells]),
                               "delta_vs_base": Stat.of([c["delta_vs_base"] for c in cells]),
                               "kl_to_base": g.stability(k, "kl_to_base_mean") if k else Stat.of([0.0] * len(cells)),
                               "seeds": len(cells)})
    return t


def study_tables(study: Study) -> list[Table]:
    tables = [acquisition_table(study), cl_metrics_table(study), stability_table(study), order_table(study),
              per_task_table(study)]
    reference = reference_accuracy_table(study)
    return tables + ([reference] if reference.rows else [])

