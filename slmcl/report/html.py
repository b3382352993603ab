"""The report as one self-contained HTML page: inline CSS, PNGs as base64 data URIs, no script, no font, no URL.

It must open from a laptop's disk, an e-mail attachment or an air-gapped cluster exactly as it was
written, so nothing in it points at the network; the only links are relative ones to the report's
own SVG, CSV, Markdown and LaTeX files beside it. Everything taken from the results (names, the
spec, intervention records) is HTML-escaped.
"""

from __future__ import annotations

import base64
import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape
from importlib import metadata
from pathlib import Path
from typing import Any

from slmcl.protocol.policy import describe
from slmcl.protocol.tables import correlation_summary
from slmcl.report.figures import FigureFile
from slmcl.report.study import Study
from slmcl.report.study_tables import Table, blanked_rows, cell_text

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 .3em;font-size:.88em}
th,td{padding:.25em .6em;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
th{border-bottom:2px solid #888;background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:bottom;text-align:left;color:#555;font-size:.9em;padding-top:.3em;max-width:1000px}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.85em}
.muted{color:#666;font-size:.9em}.files a{margin-right:.6em}dl{display:grid;grid-template-columns:max-content auto;
gap:.2em 1em}dt{font-weight:600}dd{margin:0}nav a{margin-right:1em}
"""

PACKAGES = ("torch", "transformers", "peft", "matplotlib")


def _version(name: str) -> str:
    """A package's installed version without importing it (importing torch alone takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


RUN_ENVIRONMENT = "environment.json"  # optional: what the run itself recorded (device, versions), if it did


def run_environment(study: Study) -> dict[str, str]:
    """What the results say about the machine that made them: ``environment.json`` (flat name -> value) where
    a run wrote one, else the device the spec asked for. Never the report machine's ``torch.cuda``: a report
    is often written on a laptop from results made on a GPU server."""
    recorded: dict[str, str] = {}
    path = study.path / RUN_ENVIRONMENT
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except ValueError:
            raw = {}
        if isinstance(raw, dict):
            recorded = {str(k): str(v) for k, v in raw.items() if isinstance(v, (str, int, float, bool))}
    rows: dict[str, str] = {}
    device = study.spec.get("device")
    if "device" in recorded:
        rows["device"] = f"{recorded.pop('device')} ({RUN_ENVIRONMENT})"
    elif not device:
        rows["device"] = "unknown (the results record no device)"
    elif device == "auto":
        rows["device"] = "auto (spec.json; the device it resolved to is not recorded in the results)"
    else:
        rows["device"] = f"{device} (spec.json)"
    dtype = (study.spec.get("model") or {}).get("dtype")
    if dtype:
        rows["model dtype"] = f"{dtype} (spec.json)"
    rows.update({k: f"{v} ({RUN_ENVIRONMENT})" for k, v in recorded.items()})
    return rows


def report_environment() -> list[tuple[str, str]]:
    import slmcl

    return [("Python", platform.python_version()), *((name, _version(name)) for name in PACKAGES),
            ("slmcl", getattr(slmcl, "__version__", _version("slmcl"))), ("platform", platform.platform())]


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def dates(study: Study) -> list[tuple[str, str]]:
    rows = [("report written", _utc(datetime.now(tz=timezone.utc).timestamp()))]
    mtimes = [p.stat().st_mtime for p in study.stage_files]
    if mtimes:
        rows.append(("run (stage records written)", f"{_utc(min(mtimes))} – {_utc(max(mtimes))}"))
    else:
        rows.append(("run", "no finished stage yet"))
    return rows


def _dl(rows: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows) + "</dl>"


def table_html(table: Table) -> str:
    head = "".join(f"<th>{escape(c.label)}</th>" for c in table.columns)
    body = []
    for row in blanked_rows(table):
        cells = []
        for c in table.columns:
            v = row.get(c.key)
            text = "" if isinstance(v, str) and v == "" else cell_text(c, v, table.model_labels)
            cls = ' class="num"' if c.kind in ("stat", "int") else ""
            cells.append(f"<td{cls}>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(table.columns)}" class="muted">no data yet</td></tr>')
    return (f"<table><caption>{escape(table.caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape('' if v is None else str(v))}</td>" for v in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(out: Path, fig: FigureFile) -> str:
    data = base64.b64encode((out / fig.png).read_bytes()).decode("ascii")
    return (f'<figure id="fig-{escape(fig.name)}"><img src="data:image/png;base64,{data}" alt="{escape(fig.title)}" '
            f'width="{fig.width}" height="{fig.height}"><figcaption><b>{escape(fig.title)}.</b> '
            f'{escape(fig.caption)} <span class="files"><a href="{escape(fig.svg)}">SVG</a></span>'
            f"</figcaption></figure>")


def _overview(study: Study) -> list[tuple[str, str]]:
    labels = study.model_labels
    models = "; ".join(m if labels[m] == m else f"{labels[m]} = {m}" for m in study.models) or "none yet"
    orders = list(dict.fromkeys(" → ".join(g.order) + (f" ({g.role})" if g.role != "single" else "")
                                for g in study.groups))
    seeds = sorted({s for g in study.groups for s in g.seeds})
    runs = sum(len(g.runs) for g in study.groups)
    return [("results directory", str(study.path.resolve())), ("experiment", str(study.spec.get("name", "—"))),
            ("models", models), ("strategies", ", ".join(study.strategies) or "—"),
            ("orders", "; ".join(orders) or "—"), ("seeds", ", ".join(map(str, seeds)) or "—"),
            ("runs / stage records", f"{runs} / {len(study.records)}"),
            ("fully evaluated stages", str(sum(1 for r in study.records if r.evaluated)))]


def _correlation(study: Study) -> str:
    rows = []
    for model, rep in correlation_summary(study.records).items():
        def num(v: Any) -> str:
            return "—" if v is None else f"{v:+.3f}"
        rows.append([study.model_labels.get(model, model), rep["points"], num(rep["pearson"]), num(rep["spearman"]),
                     rep["warning"] or ""])
    return _plain_table(["model", "points", "Pearson r", "Spearman ρ", "note"], rows)


def _interventions(study: Study) -> str:
    acted = [(r, iv) for r in study.records for iv in r.interventions]
    if not acted:
        return '<p class="muted">The stability policy took no action (or none was configured).</p>'
    rows = [[study.model_labels.get(r.model, r.model), r.strategy, " → ".join(r.order), r.seed, r.step,
             r.checkpoint_task, iv.get("action"), describe(iv)] for r, iv in acted]
    return _plain_table(["model", "strategy", "order", "seed", "stage", "task", "action", "what happened"], rows)


def render_html(study: Study, tables: Sequence[Table], figures: Sequence[FigureFile], out: Path) -> str:
    name = str(study.spec.get("name") or study.path.name)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>slmcl report: {escape(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>slmcl report: {escape(name)}</h1>",
        '<nav><a href="#tables">Tables</a><a href="#figures">Figures</a><a href="#interventions">Interventions</a>'
        '<a href="#environment">Environment</a><a href="#spec">Spec</a></nav>',
        "<h2>Overview</h2>", _dl(_overview(study) + dates(study)),
    ]
    if not study.records:
        parts.append('<p class="muted">No stage of this experiment has finished yet: no tables or figures.</p>')
    parts.append('<h2 id="tables">Tables</h2>')
    for t in tables:
        links = " ".join(f'<a href="tables/{escape(t.name)}.{ext}">{ext.upper()}</a>' for ext in ("md", "csv", "tex"))
        parts += [f'<h3 id="table-{escape(t.name)}">{escape(t.title)}</h3>', table_html(t),
                  f'<p class="files">{links}</p>']
    parts += ["<h3>KL to base vs average accuracy: correlation</h3>", _correlation(study)]
    parts.append('<h2 id="figures">Figures</h2>')
    parts += [_figure_html(out, f) for f in figures] or ['<p class="muted">No figures yet.</p>']
    parts += ['<h2 id="interventions">Interventions</h2>', _interventions(study)]
    parts += ['<h2 id="environment">Environment</h2>', "<h3>The run (what the results say)</h3>",
              _dl(list(run_environment(study).items())),
              "<h3>The report</h3>", '<p class="muted">The Python and package versions of the environment that '
              f"wrote this report (the run's own, where recorded, are above in {RUN_ENVIRONMENT}).</p>",
              _dl(report_environment())]
    spec = study.spec_text or "(no spec.yaml or spec.json in the results directory)"
    parts += ['<h2 id="spec">Spec</h2>', "<p class=\"muted\">spec.yaml of the results directory.</p>",
              f"<pre>{escape(spec)}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"
