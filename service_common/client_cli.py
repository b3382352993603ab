"""``slmcl submit | watch | list | status | cancel | resume | results | pull``: the service client commands.

Added to the ``slmcl`` command through the ``slmcl.commands`` entry point (pyproject.toml):
the core finds ``register`` by name and never imports this package; this module imports the
core, never the other way. grpc is imported only when one of them runs. The server address
comes from ``--server`` or ``$SLMCL_SERVER`` (default 127.0.0.1:50051).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmcl.errors import SlmclError

STATE_NAMES = {0: "unspecified", 1: "queued", 2: "running", 3: "succeeded", 4: "failed", 5: "cancelled"}


def _client(args: argparse.Namespace) -> Any:
    from service_common.client import MonitorClient

    return MonitorClient(args.server)


def _grpc_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A gRPC failure becomes one line: the status and what the server said."""

    def wrapper(args: argparse.Namespace) -> int:
        import grpc

        from service_common.client import server_address

        try:
            return fn(args)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise SlmclError(f"cannot reach the monitor at {server_address(args.server)} "
                                 "(start it with `make stack`, or pass --server / set SLMCL_SERVER)") from None
            raise SlmclError(f"{code.name}: {exc.details()}") from None

    return wrapper


@_grpc_errors
def cmd_submit(args: argparse.Namespace) -> int:
    from slmcl.config.spec import load_spec

    spec = load_spec(args.spec)
    exp = _client(args).submit(spec, args.request_id)
    print(exp.id)
    return 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@_grpc_errors
def cmd_list(args: argparse.Namespace) -> int:
    from slmcl.cli.report import format_table

    rows = []
    for e in _client(args).list():
        done = sum(r.stages_evaluated for r in e.runs)
        total = sum(r.stages_total for r in e.runs)
        rows.append([e.id, e.name, STATE_NAMES[e.state], e.model, f"{done}/{total}", _when(e.created_at)])
    print(format_table(["id", "name", "state", "model", "stages", "created"], rows) if rows else "no experiments")
    return 0


@_grpc_errors
def cmd_status(args: argparse.Namespace) -> int:
    from slmcl.cli.report import format_table

    e = _client(args).get(args.id)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(e, preserving_proto_field_name=True), indent=1))
        return 0
    print(f"experiment {e.id} ({e.name}): {STATE_NAMES[e.state]}   model {e.model}   created {_when(e.created_at)}")
    if e.error:
        print(f"error: {e.error}")
    print(format_table(["run", "seed", "trained", "evaluated", "state", "error"],
                       [[r.run_id, r.seed, f"{r.stages_trained}/{r.stages_total}",
                         f"{r.stages_evaluated}/{r.stages_total}", r.state, r.error] for r in e.runs]))
    return 0


@_grpc_errors
def cmd_cancel(args: argparse.Namespace) -> int:
    e = _client(args).cancel(args.id)
    print(f"{e.id}: {STATE_NAMES[e.state]}")
    return 0


@_grpc_errors
def cmd_resume(args: argparse.Namespace) -> int:
    e = _client(args).resume(args.id)
    print(f"{e.id}: {STATE_NAMES[e.state]}")
    return 0


@_grpc_errors
def cmd_results(args: argparse.Namespace) -> int:
    from slmcl.cli.report import render_results

    out = _client(args).results(args.id, args.out, include_checkpoints=not args.no_checkpoints)
    print(render_results(out))
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:  # the report extra: drawn here, on the client
        from slmcl.report import build_report

        print(f"report: {build_report(out, Path(out) / 'report')}")
    return 0


def fetch_results(args: argparse.Namespace, exp_id: str, out: Path) -> Path:
    """The records and tables of experiment ``exp_id`` (no adapters) in ``out``: what `slmcl report ID` reads."""
    pulled: list[Path] = []

    @_grpc_errors
    def pull(a: argparse.Namespace) -> int:
        pulled.append(Path(_client(a).results(exp_id, out, include_checkpoints=False)))
        return 0

    pull(args)
    return pulled[0]


@_grpc_errors
def cmd_pull(args: argparse.Namespace) -> int:
    out = _client(args).pull(args.id, args.run, args.step, args.out)
    print(f"adapter of run {args.run} step {args.step} -> {out}")
    return 0


@_grpc_errors
def cmd_watch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service_common.client import event_data
    from slmcl.cli.display import intervention_line, stage_summary

    client = _client(args)
    bars: dict[str, tqdm] = {}
    final = None
    quiet = args.quiet

    def say(line: str) -> None:
        tqdm.write(line) if not quiet else print(line)

    for ev in client.watch(args.id):
        data = event_data(ev)
        final = ev.state
        if ev.kind == "experiment_started":
            say(f"experiment {args.id}: {data.get('runs', '?')} run(s)")
        elif ev.kind == "run_started":
            say(f"run {ev.run_id} started")
        elif ev.kind == "train_step" and not quiet:
            key = f"{ev.run_id}:{ev.step}"
            bar = bars.get(key)
            if bar is None:
                bar = bars[key] = tqdm(total=data.get("total_steps", 0), desc=f"train {ev.task} [{ev.run_id}]",
                                       unit="step", leave=False, dynamic_ncols=True)
            bar.n = data.get("step", 0)
            bar.set_postfix(loss=f"{data.get('loss', float('nan')):.4f}",
                            ex_s=f"{data.get('examples_per_s', float('nan')):.1f}", refresh=False)
            bar.refresh()
        elif ev.kind == "stage_trained":
            bar = bars.pop(f"{ev.run_id}:{ev.step}", None)
            if bar is not None:
                bar.close()
            say(f"  {ev.run_id} stage {ev.step} ({ev.task}) trained; evaluating")
        elif ev.kind == "base_evaluated":
            say(f"base  {ev.task:<12} accuracy {data['accuracy']:.3f} ({data['correct']}/{data['total']})")
        elif ev.kind == "intervention":
            say(intervention_line(ev.run_id, ev.step, ev.task, data))
        elif ev.kind == "stage_done":
            st = ev.stage
            label = "base" if st.step == 0 else f"after {st.checkpoint_task}"
            say(f"  {st.run_id} step {st.step} {label:<18} {stage_summary(data)}")
        elif ev.kind in ("run_failed", "experiment_failed"):
            say(f"FAILED {ev.run_id}: {data.get('error', '')}")
        elif ev.kind == "experiment_cancelled":
            say("cancelled")
        elif ev.kind == "experiment_resumed":
            say(f"experiment {args.id} resumed: {data.get('runs_enqueued', 0)} run(s) to train, "
                f"{data.get('stages_to_measure', 0)} stage(s) to measure")
        elif ev.kind == "experiment_done":
            say(f"experiment {args.id} succeeded: `slmcl results {args.id} --out DIR` for the results directory")
    for bar in bars.values():
        bar.close()
    state = STATE_NAMES.get(final or 0, "?")
    if state != "succeeded":
        print(f"experiment {args.id}: {state}", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    """Add the client commands to the ``slmcl`` subparsers (the ``slmcl.commands`` entry point)."""

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", help="monitor address host:port (default $SLMCL_SERVER or 127.0.0.1:50051)")
        return p

    report = sub.choices.get("report")  # slmcl report EXPERIMENT_ID: the core command, given the results pulled here
    if isinstance(report, argparse.ArgumentParser):
        common(report).set_defaults(fetch_results=fetch_results)
    p = common(sub.add_parser("submit", help="submit a spec to the monitor; prints the experiment id"))
    p.add_argument("spec")
    p.add_argument("--request-id", help="idempotency key: the same id returns the same experiment")
    p.set_defaults(func=cmd_submit)
    p = common(sub.add_parser("watch", help="follow an experiment live until it ends"))
    p.add_argument("id")
    p.add_argument("--quiet", action="store_true", help="no progress bars, one line per stage")
    p.set_defaults(func=cmd_watch)
    p = common(sub.add_parser("list", help="experiments known to the monitor"))
    p.set_defaults(func=cmd_list)
    p = common(sub.add_parser("status", help="one experiment's state and runs"))
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = common(sub.add_parser("cancel", help="stop an experiment (finished stages are kept)"))
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)
    p = common(sub.add_parser("resume", help="continue a failed or cancelled experiment after its last committed "
                                             "stages (nothing committed is recomputed)"))
    p.add_argument("id")
    p.set_defaults(func=cmd_resume)
    p = common(sub.add_parser("results", help="download an experiment's results directory"))
    p.add_argument("id")
    p.add_argument("--out", required=True)
    p.add_argument("--no-checkpoints", action="store_true", help="skip the adapters")
    p.set_defaults(func=cmd_results)
    p = common(sub.add_parser("pull", help="download one checkpoint as a PEFT adapter folder"))
    p.add_argument("id")
    p.add_argument("--run", required=True, help="run id, e.g. fomc.scienceqa.numgluecm-s42")
    p.add_argument("--step", required=True, type=int)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_pull)
