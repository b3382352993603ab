"""The ``slmcl`` command line: a thin layer over the Python API.

Every error a user can cause ends as one line on stderr and a non-zero exit; a traceback
means a bug in slmcl (set SLMCL_DEBUG=1 to see the traceback of a user error too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from slmcl.cli.report import format_table, render_results
from slmcl.errors import SlmclError
from slmcl.models.runtime import keep_freed_memory

__all__ = ["build_parser", "format_table", "main", "render_results"]

COMMANDS_GROUP = "slmcl.commands"

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------
# slmcl run / validate


def cmd_validate(args: argparse.Namespace) -> int:
    """What `slmcl run` checks before it loads a model: the spec, every row of every data file, the output_dir."""
    from slmcl.config.spec import load_spec
    from slmcl.protocol.embedded import check_output_dir
    from slmcl.tasks.data import check_data

    spec = load_spec(args.spec)
    data = check_data(spec)
    check_output_dir(spec.output_dir)
    from slmcl.protocol.runs import plan_runs

    runs = plan_runs(spec)
    strategies = [s.key for s in spec.strategies]
    models = [m.name for m in spec.models]
    print(f"{args.spec}: ok — model{'s' if len(models) > 1 else ''} {', '.join(models)}, {len(spec.tasks)} tasks, "
          f"strategy {', '.join(strategies)}; " + (f"{len(models)} models x " if len(models) > 1 else "") +
          f"{len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'} x {len(spec.orders)} order(s) x "
          f"{len(spec.seeds)} seed(s) = {len(runs)} run(s), {sum(len(r.order) for r in runs)} "
          f"stages; {len(data)} data files, {sum(d.rows for d in data.values())} rows; results in {spec.output_dir}")
    return 0


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for p in pairs:
        if "=" not in p:
            raise SlmclError(f"--set {p!r}: expected key=value, e.g. training.max_examples=32")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from slmcl.cli.display import ProgressDisplay
    from slmcl.config.spec import load_spec
    from slmcl.protocol.embedded import run_experiment

    overrides = _overrides(args.set or [])
    if args.output_dir:
        overrides["output_dir"] = os.path.abspath(args.output_dir)
    spec = load_spec(args.spec, overrides=overrides)
    with ProgressDisplay(enabled=not args.quiet) as display:
        out = run_experiment(spec, progress=display)
    print(render_results(out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slmcl.errors import NotFoundError

    results = Path(args.results)
    # The services' client (service_common.client_cli) adds this: an experiment id is pulled from the monitor.
    fetch: Callable[[argparse.Namespace, str, Path], Path] | None = getattr(args, "fetch_results", None)
    if not results.is_dir() and (fetch is None or os.sep in args.results):
        raise NotFoundError(f"{results}: no such results directory" + (
            "" if fetch else " (an experiment id of the services needs the client: pip install 'slmcl[client]')"))
    try:
        from slmcl.report import build_report
    except ImportError as exc:  # matplotlib: the report extra
        raise NotFoundError(f"the report needs matplotlib ({exc}): pip install 'slmcl[report]'") from None
    if results.is_dir():
        print(build_report(results, args.out or results / "report"))
        return 0
    assert fetch is not None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slmcl-report-") as tmp:  # the tables and records, not the adapters
        pulled = fetch(args, args.results, Path(tmp) / "results")
        print(build_report(pulled, args.out or Path(f"{args.results}-report")))
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from slmcl.errors import NotFoundError
    from slmcl.protocol.embedded import read_prior
    from slmcl.protocol.layout import RESULTS_MARKER, SPEC_JSON
    from slmcl.protocol.stages import ResultsTree
    from slmcl.storage.local import LocalStore

    out = Path(args.results)
    if not (out / RESULTS_MARKER).is_file() and not (out / SPEC_JSON).is_file():
        raise NotFoundError(f"{out}: not an slmcl results directory (no {RESULTS_MARKER} or {SPEC_JSON})")
    records = ResultsTree(LocalStore(out)).write_tables(read_prior(args.prior or ""))
    if not records:
        raise NotFoundError(f"{out}: no finished stages (runs/*/stage-*.json) in this directory")
    print(render_results(out))
    return 0


# ---------------------------------------------------------------------------------------
# slmcl metrics / stability


def cmd_metrics(args: argparse.Namespace) -> int:
    from slmcl import metrics as mx

    rows = mx.read_scores_csv(args.scores, last_row_wins=True)  # a re-run appends: its rows correct the earlier
    for warning in rows.warnings:
        print(f"slmcl: warning: {warning}", file=sys.stderr)
    order = [t.strip() for t in args.task_order.split(",") if t.strip()] if args.task_order else None
    groups = mx.metrics_for_scores(rows, order)
    if args.json:
        out = []
        for key, aggregates in groups:
            multi = any(a.n_seeds > 1 for a in aggregates)
            for a in aggregates:
                d = a.as_dict(include_std=multi)
                if len(groups) > 1:
                    d = {**{k: v for k, v in key.items() if v}, **d}
                out.append(d)
        print(json.dumps(out, indent=1))
        return 0
    for key, aggregates in groups:
        label = ", ".join(f"{k} {v}" for k, v in key.items() if v)
        if label:
            print(f"== {label} ==")
        print(mx.format_metrics_table(aggregates))
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from slmcl.models.engine import adapter_drift

    summary = adapter_drift(model=args.model, adapter=args.adapter, reference=args.reference,
                            raw_prompts=args.raw_prompts, device=args.device, max_examples=args.max_examples,
                            trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    rows = [[name, summary.get(f"{name}_mean"), summary.get(f"{name}_p10"), summary.get(f"{name}_p95")]
            for name in ("kl_to_base", "entropy", "margin")]
    if args.adapter:
        rows += [[f"base_{name}", summary.get(f"base_{name}_mean"), summary.get(f"base_{name}_p10"),
                  summary.get(f"base_{name}_p95")] for name in ("entropy", "margin")]
    print(f"{summary['num_reference_examples']} reference rows")
    print(format_table(["statistic", "mean", "p10", "p95"], rows))
    return 0


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slmcl", description="Sequential LoRA personalization of SLMs, monitored.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run (or resume) an experiment spec in this process")
    r.add_argument("spec")
    r.add_argument("--output-dir", help="override output_dir of the spec")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec setting, e.g. --set training.max_examples=32 (repeatable)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a spec without running it")
    v.add_argument("spec")
    v.set_defaults(func=cmd_validate)

    rp = sub.add_parser("report", help="tables (Markdown, CSV, LaTeX), figures (PNG, SVG) and one self-contained "
                                       "HTML page of a results directory")
    rp.add_argument("results", help="an slmcl results directory, or an experiment id of the services")
    rp.add_argument("--out", help="where to write it (default RESULTS/report, or ID-report for an experiment id); "
                                  "files of yours there are kept")
    rp.set_defaults(func=cmd_report)

    t = sub.add_parser("tables", help="rebuild a results directory's tables from its stage records, and print them")
    t.add_argument("results", help="an slmcl results directory")
    t.add_argument("--prior", help="a results directory whose evaluated checkpoints also calibrate the estimates")
    t.set_defaults(func=cmd_tables)

    m = sub.add_parser("metrics", help="CL metrics from a long-format scores CSV")
    m.add_argument("--scores", required=True, help="CSV with seed,step,checkpoint_task,eval_task,accuracy")
    m.add_argument("--task-order", help=("t1,t2,... (default: the order column when it lists the tasks, else the "
                                         "checkpoint_task of steps 1..K)"))
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_metrics)

    s = sub.add_parser("stability", help="drift of an adapter from its base on a reference set")
    s.add_argument("--model", default="embedded", help="HF id or local folder (default: the embedded SmolLM2)")
    s.add_argument("--adapter", help="PEFT adapter folder (none: the base alone, KL 0)")
    s.add_argument("--reference", required=True, help="JSON list of {prompt[, task_name]} rows")
    s.add_argument("--raw-prompts", action="store_true", help="feed prompts as-is, no chat template")
    s.add_argument("--max-examples", type=int)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stability)

    add_plugin_commands(sub)
    return p


def add_plugin_commands(sub: Any) -> None:
    """Subcommands of other installed packages (the service client's submit, watch, ...).

    Each ``slmcl.commands`` entry point names a function that adds its subparsers; the core
    finds them by name and never imports those packages itself. A plugin that cannot load is
    one line on stderr and the core commands still work.
    """
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register: Callable[[Any], None] = ep.load()
        except ImportError as exc:
            if os.environ.get("SLMCL_DEBUG"):
                raise
            print(f"slmcl: warning: commands {ep.name!r} ({ep.value}) not available: {exc}", file=sys.stderr)
            continue
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    keep_freed_memory()
    try:
        return func(args)
    except SlmclError as exc:
        if os.environ.get("SLMCL_DEBUG"):
            raise
        print(f"slmcl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a folder that cannot be written, a disk full: the user's to fix, not a bug
        if os.environ.get("SLMCL_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"slmcl: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("slmcl: interrupted (run the same command again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
