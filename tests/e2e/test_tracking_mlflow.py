"""`tracking.mlflow` end to end: a real MLflow tracking server on loopback, a tiny embedded experiment.

The server (``mlflow server`` of the `tracking` extra) is started once for the module and stopped by its
process group. The tracked experiment is interrupted after stage 1 and resumed, so every check below also
holds for a resumed run; what MLflow holds is compared with the results' own tables, value for value.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service_common.local_servers import free_port
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.errors import CancelledError, SpecError
from slmcl.metrics import METRIC_NAMES
from slmcl.protocol.embedded import ExperimentRunner
from slmcl.protocol.events import Event
from slmcl.protocol.tables import STABILITY_COLUMNS
from tests.conftest import tiny_spec_dict

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RID = "fomc.numgluecm-s7"
# MLflow's telemetry off in the server and in this process: the tests reach nothing beyond loopback.
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
NOT_STABILITY = {"seed", "step", "checkpoint_task", "evaluated", "intervention", "order", "model", "strategy"}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen[bytes]
    log: Path
    start_seconds: float


def _start_mlflow(work: Path) -> MlflowServer:
    port = free_port()
    log = work / "mlflow.log"
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
            "--artifacts-destination", str(work / "artifacts"), "--workers", "1"]
    t0 = time.monotonic()
    with open(log, "wb") as fh:  # its own session: stopped as a group (the server runs uvicorn in a child)
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
                                env={**os.environ, **QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return MlflowServer(uri, proc, log, time.monotonic() - t0)
        except OSError:
            time.sleep(0.25)
    _stop(proc)
    raise RuntimeError(f"mlflow server not healthy after 180 s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    pytest.importorskip("mlflow", reason="the `tracking` extra (requirements-tracking.txt) is not installed")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in QUIET.items():
            mp.setenv(k, v)
        server = _start_mlflow(tmp_path_factory.mktemp("mlflow"))
        try:
            print(f"mlflow server healthy after {server.start_seconds:.1f} s")
            yield server
        finally:
            _stop(server.proc)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _tracked_spec(model: Path, data: Path, out: Path, uri: str, experiment: str) -> ExperimentSpec:
    return spec_from_dict(tiny_spec_dict(model, data, out, tracking={"mlflow": {"uri": uri, "experiment": experiment}}))


@dataclass
class Tracked:
    out: Path
    client: Any
    parent: Any
    child: Any
    sessions: list[list[Event]]


@pytest.fixture(scope="module")
def tracked(mlflow_server: MlflowServer, tiny_model_dir: Path, data_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    """A tracked experiment stopped after stage 1, then resumed to the end."""
    out = tmp_path_factory.mktemp("tracked") / "out"
    spec = _tracked_spec(tiny_model_dir, data_dir, out, mlflow_server.uri, "tracked")
    first: list[Event] = []

    def stop_before_stage_two(event: Event) -> None:
        first.append(event)
        if event.kind == "stage_started" and event.stage == 2:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        ExperimentRunner(spec, stop_before_stage_two).run()
    client = _client(mlflow_server.uri)
    stopped = _statuses(client, "tracked")
    second: list[Event] = []
    ExperimentRunner(spec, second.append).run()
    assert stopped == {"experiment": "KILLED", RID: "KILLED"}, "a stopped session must not leave runs RUNNING"

    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("slmcl.kind") == "experiment"]
    children = [r for r in runs if "slmcl.run_id" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1 and len(runs) == 2, [r.data.tags for r in runs]
    return Tracked(out, client, parents[0], children[0], [first, second])


def _statuses(client: Any, experiment: str) -> dict[str, str]:
    """Each run's status, by slmcl run id (the parent: "experiment")."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    return {r.data.tags.get("slmcl.run_id", r.data.tags.get("slmcl.kind", "?")): r.info.status for r in runs}


def test_a_failed_run_closes_its_runs_as_failed(mlflow_server: MlflowServer, tiny_model_dir: Path, data_dir: Path,
                                               tmp_path: Path) -> None:
    def fail_in_stage_two(event: Event) -> None:
        if event.kind == "stage_started" and event.stage == 2:
            raise RuntimeError("boom")

    spec = _tracked_spec(tiny_model_dir, data_dir, tmp_path / "out", mlflow_server.uri, "failed")
    with pytest.raises(RuntimeError, match="boom"):  # the run's own error, not the tracker's
        ExperimentRunner(spec, fail_in_stage_two).run()
    client = _client(mlflow_server.uri)
    assert _statuses(client, "failed") == {"experiment": "FAILED", RID: "FAILED"}
    (child,) = [r for r in client.search_runs([client.get_experiment_by_name("failed").experiment_id])
                if "slmcl.run_id" in r.data.tags]
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "stage")) == [0, 1]  # what committed


def _history(t: Tracked, key: str) -> dict[int, float]:
    """A metric's values by step; a step logged twice fails here (what a resume must never do)."""
    hist = t.client.get_metric_history(t.child.info.run_id, key)
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)), f"{key}: steps logged twice: {sorted(steps)}"
    return {m.step: m.value for m in hist}


def test_one_parent_run_with_the_spec_and_one_child_run_per_slmcl_run(tracked: Tracked) -> None:
    from slmcl.tracking.mlflow_logger import flatten_params

    assert [e.stage for e in tracked.sessions[1] if e.kind == "stage_skipped"] == [1]  # it did resume
    assert not [e for s in tracked.sessions for e in s if e.kind == "tracking_warning"]
    parent, child = tracked.parent, tracked.child
    spec = json.loads((tracked.out / "spec.json").read_text())
    assert parent.data.params == flatten_params(spec)
    assert parent.data.params["training.lr"] == "0.001" and parent.data.params["tasks.1.name"] == "numgluecm"
    assert not any(k.startswith("tracking") for k in parent.data.params)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {k: child.data.tags[k] for k in ("slmcl.run_id", "slmcl.strategy", "slmcl.order", "slmcl.seed")} == {
        "slmcl.run_id": RID, "slmcl.strategy": "lora", "slmcl.order": "fomc.numgluecm", "slmcl.seed": "7"}
    assert parent.info.status == child.info.status == "FINISHED"
    state = json.loads((tracked.out / "tracking.json").read_text())["mlflow"]
    assert state["run_id"] == parent.info.run_id


def test_stage_metrics_equal_the_tables_and_no_stage_is_logged_twice(tracked: Tracked) -> None:
    out = tracked.out
    assert _history(tracked, "stage") == {0: 0.0, 1: 1.0, 2: 2.0}
    for row in _csv(out / "scores.csv"):
        assert _history(tracked, f"acc/{row['eval_task']}")[int(row["step"])] == float(row["accuracy"])
    for row in _csv(out / "stability.csv"):
        step = int(row["step"])
        logged = [c for c in STABILITY_COLUMNS if c not in NOT_STABILITY and row.get(c, "") != ""]
        assert "kl_to_base_mean" in logged and "entropy_delta_mean" in logged
        for col in logged:
            assert _history(tracked, f"drift/{col}")[step] == float(row[col]), col
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["orders"]
    for step, (row, matrix_row) in enumerate(zip(entry["metrics"], entry["matrix_mean"].values())):
        assert _history(tracked, "avg_acc")[step] == pytest.approx(sum(matrix_row.values()) / len(matrix_row),
                                                                   abs=1e-12)
        for name in METRIC_NAMES:
            hist = _history(tracked, f"cl/{name}")
            if row[name] is None:
                assert step not in hist, name
            else:
                assert hist[step] == row[name], (name, step)
    last_loss: dict[int, float] = {}
    for row in _csv(out / "train_loss.csv"):
        last_loss[int(row["step"])] = float(row["loss"])
    assert _history(tracked, "train/final_loss") == last_loss


def test_adapters_tables_spec_and_figures_are_artifacts(tracked: Tracked, tmp_path: Path) -> None:
    client, out = tracked.client, tracked.out
    for step in (1, 2):
        names = {Path(f.path).name for f in client.list_artifacts(tracked.child.info.run_id, f"adapters/step-{step}")}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
        got = Path(client.download_artifacts(tracked.child.info.run_id, f"adapters/step-{step}", str(tmp_path)))
        ckpt = out / "checkpoints" / RID / f"step-{step}"
        assert (got / "adapter_model.safetensors").read_bytes() == (ckpt / "adapter_model.safetensors").read_bytes()
    parent = tracked.parent.info.run_id
    tables = {Path(f.path).name for f in client.list_artifacts(parent, "tables")}
    assert {"scores.csv", "stability.csv", "summary.json", "comparison.csv"} <= tables
    got = Path(client.download_artifacts(parent, "tables/scores.csv", str(tmp_path)))
    assert got.read_bytes() == (out / "scores.csv").read_bytes()
    assert "spec.yaml" in {f.path for f in client.list_artifacts(parent)}
    figures = out / "report" / "figures"
    if figures.is_dir():  # the report needs matplotlib (the `report` extra)
        assert {Path(f.path).name for f in client.list_artifacts(parent, "figures")} == {
            p.name for p in figures.iterdir()}


def test_a_tracking_outage_never_fails_the_experiment_and_a_later_session_logs_it(
        tracked: Tracked, mlflow_server: MlflowServer, tiny_model_dir: Path, data_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once: the test needs no backoff
    out = tmp_path / "out"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    events: list[Event] = []
    ExperimentRunner(_tracked_spec(tiny_model_dir, data_dir, out, down, "outage"), events.append).run()
    assert events[-1].kind == "experiment_done"
    warnings = [e.data["message"] for e in events if e.kind == "tracking_warning"]
    assert warnings and all(m.startswith(f"tracking.mlflow ({down}): ") for m in warnings), warnings
    assert "3 stage(s) not logged yet" in warnings[-1]  # the final attempt says what is missing
    assert _csv(out / "scores.csv") == _csv(tracked.out / "scores.csv")  # the results are those of the tracked run
    for a, b in zip(_csv(out / "stability.csv"), _csv(tracked.out / "stability.csv")):
        for col in a:
            if col.startswith(("kl_", "entropy", "margin")):
                assert float(a[col]) == pytest.approx(float(b[col]), abs=1e-6), col

    # The server is back (here: the spec names the live one; tracking settings never block a resume).
    again: list[Event] = []
    ExperimentRunner(_tracked_spec(tiny_model_dir, data_dir, out, mlflow_server.uri, "outage"), again.append).run()
    assert not [e for e in again if e.kind in ("tracking_warning", "stage_started")]
    client = _client(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    (child,) = [r for r in runs if "slmcl.run_id" in r.data.tags]
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "stage")) == [0, 1, 2]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_missing_mlflow_is_one_clear_line_before_anything_runs(tmp_path: Path, tiny_model_dir: Path,
                                                                 data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc

    import slmcl.tracking
    from monitor_service.control import Control
    from service_common.grpc_server import status_for

    monkeypatch.setattr(slmcl.tracking, "mlflow_available", lambda: False)
    out = tmp_path / "out"
    spec = _tracked_spec(tiny_model_dir, data_dir, out, "http://127.0.0.1:1", "x")
    with pytest.raises(SpecError, match=r"^tracking\.mlflow: .*pip install 'slmcl\[tracking\]'") as err:
        ExperimentRunner(spec).run()
    assert "\n" not in str(err.value)
    assert not out.exists()  # refused before anything was written or loaded

    # The monitor (whose image has no mlflow) refuses the submit: INVALID_ARGUMENT, naming the field.
    control = Control.__new__(Control)  # submit checks the spec before it touches Redis or the store
    with pytest.raises(SpecError, match=r"^tracking\.mlflow: this server's monitor") as err:
        control.submit(spec.to_json(), [], "")
    assert status_for(err.value) == grpc.StatusCode.INVALID_ARGUMENT


def _all_metrics(client: Any, run_id: str) -> dict[str, dict[int, float]]:
    run = client.get_run(run_id)
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in run.data.metrics}


def test_the_monitor_logs_what_the_embedded_run_logged(tracked: Tracked, mlflow_server: MlflowServer,
                                                       tmp_path: Path) -> None:
    """The monitor's hook (Control._maybe_finish) over the same stage records, read through its store."""
    import shutil

    import redis

    from monitor_service.control import Control
    from service_common import keys
    from service_common.local_servers import start_redis
    from service_common.settings import Settings
    from slmcl.protocol import layout
    from slmcl.storage.local import LocalStore

    exp_id = "20260101-000000-abcdef"
    root = tmp_path / "store" / layout.experiment_prefix(exp_id)
    for name in ("runs", "checkpoints"):  # the committed records and adapters, not tracking.json
        shutil.copytree(tracked.out / name, root / name)
    spec = json.loads((tracked.out / "spec.json").read_text())
    spec["tracking"]["mlflow"]["experiment"] = "monitor"
    (root / "spec.json").write_text(json.dumps(spec))
    server = start_redis(tmp_path / "redis")
    try:
        r = redis.Redis(port=server.port)
        r.hset(keys.experiment_hash(exp_id), mapping={"state": "running"})
        ctl = Control(Settings(), LocalStore(tmp_path / "store"), r, pool=None)  # type: ignore[arg-type]
        ctl._maybe_finish(exp_id)
        assert ctl.state(exp_id) == "succeeded"
        kinds = [f[b"kind"].decode() for _, f in r.xrange(keys.events_stream(exp_id))]
        assert "tracking_warning" not in kinds and kinds[-1] == "experiment_done"
        # Another experiment over the same records fails: its runs are closed as FAILED (the slmcl run whose
        # stages all committed as FINISHED), off the caller's thread.
        failed_id = "20260101-000000-fedcba"
        shutil.copytree(root, tmp_path / "store" / layout.experiment_prefix(failed_id),
                        ignore=shutil.ignore_patterns(layout.TRACKING_JSON))  # runs of its own, not the first's
        spec["tracking"]["mlflow"]["experiment"] = "monitor-failed"
        (tmp_path / "store" / layout.experiment_prefix(failed_id) / "spec.json").write_text(json.dumps(spec))
        r.hset(keys.experiment_hash(failed_id), mapping={"state": "running"})
        ctl._fail(failed_id, "boom")
        deadline = time.monotonic() + 60
        while _statuses(tracked.client, "monitor-failed").get("experiment") != "FAILED":
            assert time.monotonic() < deadline, _statuses(tracked.client, "monitor-failed")
            time.sleep(0.2)
        assert _statuses(tracked.client, "monitor-failed") == {"experiment": "FAILED", RID: "FINISHED"}
    finally:
        server.stop()

    client = tracked.client
    runs = client.search_runs([client.get_experiment_by_name("monitor").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("slmcl.kind") == "experiment"]
    (child,) = [x for x in runs if "slmcl.run_id" in x.data.tags]
    assert parent.data.tags["slmcl.source"] == f"experiment:{exp_id}"
    assert parent.data.params == tracked.parent.data.params
    assert _all_metrics(client, child.info.run_id) == _all_metrics(client, tracked.child.info.run_id)
    for step in (1, 2):
        names = {Path(f.path).name for f in client.list_artifacts(child.info.run_id, f"adapters/step-{step}")}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert {"scores.csv", "summary.json"} <= {Path(f.path).name for f in client.list_artifacts(parent.info.run_id,
                                                                                             "tables")}
