"""The ``slmcl`` command line: a thin layer over the Python API.

Every error a user can cause ends as one line on stderr and a non-zero exit; a traceback
means a bug in slmcl (set SLMCL_DEBUG=1 to see the traceback of a user error too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from slmcl.errors import SlmclError
from slmcl.models.runtime import keep_freed_memory

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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


# ---------------------------------------------------------------------------------------
# slmcl run / validate


def cmd_validate(args: argparse.Namespace) -> int:
    from slmcl.config.spec import load_spec

    spec = load_spec(args.spec)
    n_runs = len(spec.orders) * len(spec.seeds)
    print(f"{args.spec}: ok — model {spec.model.name}, {len(spec.tasks)} tasks, {len(spec.orders)} order(s) x "
          f"{len(spec.seeds)} seed(s) = {n_runs} run(s), {sum(len(o) for o in spec.orders) * len(spec.seeds)} "
          f"stages; results in {spec.output_dir}")
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
    from slmcl.protocol.embedded import run_experiment
    from slmcl.config.spec import load_spec

    overrides = _overrides(args.set or [])
    if args.output_dir:
        overrides["output_dir"] = os.path.abspath(args.output_dir)
    spec = load_spec(args.spec, overrides=overrides)
    with ProgressDisplay(enabled=not args.quiet) as display:
        out = run_experiment(spec, progress=display)
    print(render_results(out))
    return 0


def render_results(path: str | Path) -> str:
    """Accuracy matrix, CL metrics and stability, per order, as printed after a run."""
    from slmcl import metrics as mx
    from slmcl.protocol.results import read_results

    res = read_results(path)
    parts = [f"results: {path}"]
    for entry in res.summary["orders"]:
        order = entry["order"]
        seeds = entry["seeds"]
        parts.append(f"\n== order {' -> '.join(order)}  (seeds {', '.join(map(str, seeds))}; mean over seeds) ==")
        matrix = {int(k): v for k, v in entry["matrix_mean"].items()}
        parts.append("\nAccuracy matrix (rows: checkpoint, columns: task)\n" + mx.format_matrix(matrix, order))
        aggregates = [a for a in mx.aggregate_seeds(
            [mx.step_metrics(m, order) for m in mx.matrices_by_seed(
                [r for r in _score_rows(res, order)]).values()])]
        parts.append("\nContinual-learning metrics\n" + mx.format_metrics_table(aggregates))
        stab_rows = []
        for k, v in sorted(((int(k), v) for k, v in entry["stability_mean"].items())):
            label = "base" if k == 0 else f"after {order[k - 1]}"
            stab_rows.append([label, v.get("kl_to_base_mean"), v.get("kl_to_base_p95"), v.get("entropy_mean"),
                              v.get("entropy_delta_mean"), v.get("margin_mean"), v.get("margin_delta_mean")])
        parts.append("\nStability on the reference set (nats)\n" + format_table(
            ["checkpoint", "KL mean", "KL p95", "entropy", "Δentropy", "margin", "Δmargin"], stab_rows))
    return "\n".join(parts)


def _score_rows(res: Any, order: Sequence[str]) -> list[Any]:
    from slmcl import metrics as mx
    from slmcl.protocol.results import order_id, score_rows

    recs = [r for r in res.records if list(r.order) == list(order)]
    return [mx.ScoreRow(seed=x["seed"], step=x["step"], checkpoint_task=x["checkpoint_task"], eval_task=x["eval_task"],
                        accuracy=x["accuracy"], order=order_id(order), model=x["model"]) for x in score_rows(recs)]


# ---------------------------------------------------------------------------------------
# slmcl metrics / stability


def cmd_metrics(args: argparse.Namespace) -> int:
    from slmcl import metrics as mx

    rows = mx.read_scores_csv(args.scores)
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

    m = sub.add_parser("metrics", help="CL metrics from a long-format scores CSV")
    m.add_argument("--scores", required=True, help="CSV with seed,step,checkpoint_task,eval_task,accuracy")
    m.add_argument("--task-order", help="t1,t2,... (default: read from the checkpoint_task of steps 1..K)")
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

    try:  # the service client commands (grpc is imported only when one runs)
        from service_common import client_cli
    except ImportError:  # a core-only install
        pass
    else:
        client_cli.add_commands(sub)
    return p


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
    except KeyboardInterrupt:
        print("slmcl: interrupted (run the same command again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
