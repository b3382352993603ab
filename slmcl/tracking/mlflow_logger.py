"""The MLflow tracker: an experiment's results mirrored to an MLflow tracking server.

Layout in MLflow: one parent run per results tree (its params are the flattened spec; at the end its
artifacts are the tables, ``spec.yaml`` and the report's figures), and under it one child run per slmcl
run (order x seed x strategy x model; tags ``slmcl.run_id``, ``slmcl.model``, ``slmcl.strategy``,
``slmcl.order``, ``slmcl.seed``) whose metrics are logged per stage with ``step`` = the stage, and whose
artifacts are the stages' adapters (``adapters/step-<k>/``).

Idempotence: the results tree remembers its parent run (``tracking.json``), the children are found by
their ``slmcl.run_id`` tag, and a stage counts as logged once its ``stage`` metric is there (the last
thing logged for it). A resumed or repeated session logs only the stages that lack it. A run's stages
are logged in step order, never past a gap (the services may commit stage 2 before stage 1), so a
stage's CL metrics always see every earlier row.

Outages: a failed call is a warning, and the tracker tries again at the next sync once ``RETRY_SECONDS``
have passed (and always at the end). What it could not log stays in the results tree, and any later
session on the same results logs it.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmcl import metrics as mx
from slmcl.errors import NotFoundError, SpecError
from slmcl.protocol import layout
from slmcl.protocol.tables import avg_accuracy

if TYPE_CHECKING:
    from slmcl.config.spec import ExperimentSpec, MlflowSpec
    from slmcl.protocol.records import StageRecord
    from slmcl.protocol.stages import ResultsTree

__all__ = ["RETRY_SECONDS", "STAGE_METRIC", "MlflowTracker", "flatten_params", "stage_metrics"]

log = logging.getLogger(__name__)

STAGE_METRIC = "stage"  # logged last for a stage, at step = the stage: "this stage is logged"
RETRY_SECONDS = 60.0  # after a failure, syncs are skipped this long (the final one always tries)
# MLflow's client retries a failed request 7 times with exponential backoff (minutes per call) and prints run
# URLs to stdout; under slmcl, unless the user set them, an outage costs seconds per sync and stdout stays ours.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
PARAMS_PER_BATCH = 100  # MLflow's limits on one log_batch
METRICS_PER_BATCH = 1000
_KEY_CHARS = re.compile(r"[^\w\-. /]")  # MLflow keys: alphanumerics, _ - . space /


def _key(name: str) -> str:
    return _KEY_CHARS.sub("_", name)


def flatten_params(spec_dict: dict[str, Any]) -> dict[str, str]:
    """The spec as MLflow params: nested sections and lists of sections dotted (``training.lr``,
    ``tasks.0.name``), other lists as JSON; ``tracking`` is left out (it says where, not what)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[_key(prefix)] = text[:MAX_PARAM_VALUE]

    walk("", {k: v for k, v in spec_dict.items() if k != "tracking"})
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def stage_metrics(record: StageRecord, matrix: dict[int, dict[str, float]]) -> dict[str, float]:
    """What one stage logs: ``acc/<task>``, ``avg_acc`` (every task evaluated), ``cl/<metric>`` (slmcl.metrics,
    those defined at this step), ``drift/<stability column>`` and ``train/<...>``; ``matrix`` is the run's
    accuracy matrix up to this stage (``{step: {task: accuracy}}``)."""
    out: dict[str, float] = {}
    for task in record.order:
        if task in record.scores:
            out[_key(f"acc/{task}")] = float(record.scores[task]["accuracy"])
    avg = avg_accuracy(record)
    if avg is not None:
        out["avg_acc"] = avg
    row = mx.step_metrics(matrix, record.order)[record.step]
    for name in mx.METRIC_NAMES:
        value = row.metric(name)
        if value is not None:
            out[f"cl/{name}"] = value
    for name, value in record.stability.items():
        if (v := _number(value)) is not None:
            out[_key(f"drift/{name}")] = v
    if record.step > 0:
        steps = record.train.get("steps") or []
        if steps and (v := _number(steps[-1].get("loss"))) is not None:
            out["train/final_loss"] = v
        for name in ("examples", "tokens", "seconds"):
            if (v := _number(record.train.get(name))) is not None:
                out[f"train/{name}"] = v
    return out


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}"


class MlflowTracker:
    """The ``Tracker`` of ``tracking.mlflow``: one instance per results tree and process, calls serialized."""

    def __init__(self, cfg: MlflowSpec, spec: ExperimentSpec, tree: ResultsTree, on_warning: Callable[[str], None],
                 source: str = "", report_dir: Path | None = None) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # Imported by name: mypy and the base install never need mlflow (the `tracking` extra).
        mlflow = importlib.import_module("mlflow")
        self._entities = importlib.import_module("mlflow.entities")
        self._mlflow_error: type[Exception] = importlib.import_module("mlflow.exceptions").MlflowException
        self.client: Any = mlflow.MlflowClient(tracking_uri=cfg.uri)
        self.cfg, self.spec, self.tree = cfg, spec, tree
        self.source = source
        self.report_dir = report_dir
        self._on_warning = on_warning
        self._lock = threading.Lock()
        self._experiment_id = ""
        self._parent = ""
        self._children: dict[str, str] | None = None  # slmcl run id -> MLflow run id (read once)
        self._logged: dict[str, set[int]] = {}  # slmcl run id -> stages logged (read once per child)
        self._retry_at = 0.0
        self._finished_with = -1  # how many records the last complete finish logged

    # ------------------------------------------------------------------ the Tracker calls
    def sync(self, records: Sequence[StageRecord]) -> None:
        with self._lock:
            if time.monotonic() >= self._retry_at:
                self._attempt(lambda: self._sync(records), records, "")

    def finished(self, records: Sequence[StageRecord]) -> None:
        with self._lock:
            if self._finished_with != len(records):
                self._attempt(lambda: self._finish(records), records,
                              "; the tables and figures too (a later session on these results logs them)")

    def stopped(self, records: Sequence[StageRecord], status: str) -> None:
        with self._lock:
            self._attempt(lambda: self._stop(records, status), records, f"; the runs stay RUNNING, not {status}")

    @property
    def parent_run_id(self) -> str:
        return self._parent

    # ------------------------------------------------------------------ internals
    def _attempt(self, fn: Callable[[], None], records: Sequence[StageRecord], after: str) -> None:
        try:
            fn()
            self._retry_at = 0.0
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the experiment: the warning says why
            self._retry_at = time.monotonic() + RETRY_SECONDS
            pending = sum(1 for r in records if r.step not in self._logged.get(r.run_id, set()))
            self._children, self._logged = None, {}  # what the server holds is read again after an outage
            message = (f"tracking.mlflow ({self.cfg.uri}): {_first_line(exc)}; {pending} stage(s) not logged yet, "
                       f"tried again after the next stage (at least {RETRY_SECONDS:.0f} s on) and at the end{after}")
            log.warning("%s", message, exc_info=log.isEnabledFor(logging.DEBUG))
            self._on_warning(message)

    def _sync(self, records: Sequence[StageRecord]) -> None:
        self._ensure_parent()
        by_run: dict[str, dict[int, StageRecord]] = {}
        for r in records:
            by_run.setdefault(r.run_id, {})[r.step] = r
        for rid, steps in by_run.items():
            first = steps[min(steps)]
            child = self._child(first)
            logged = self._logged_steps(rid, child)
            matrix: dict[int, dict[str, float]] = {}
            for k in range(max(steps) + 1):
                rec = steps.get(k)
                if rec is None:
                    break  # a later stage committed first: logged once the gap is filled
                matrix[k] = {t: float(s["accuracy"]) for t, s in rec.scores.items()}
                if k not in logged:
                    self._log_stage(child, rec, matrix)
                    logged.add(k)

    def _finish(self, records: Sequence[StageRecord]) -> None:
        self._sync(records)
        store = self.tree.store
        with tempfile.TemporaryDirectory(prefix="slmcl-mlflow-") as tmp:
            tables = Path(tmp) / "tables"
            tables.mkdir()
            for name in layout.TABLES:
                if store.exists(name):
                    (tables / name).write_bytes(store.get_bytes(name))
            self.client.log_artifacts(self._parent, str(tables), "tables")
            if store.exists(layout.SPEC_YAML):
                spec_file = Path(tmp) / layout.SPEC_YAML
                spec_file.write_bytes(store.get_bytes(layout.SPEC_YAML))
                self.client.log_artifact(self._parent, str(spec_file))
        figures = self.report_dir / "figures" if self.report_dir is not None else None
        if figures is not None and figures.is_dir() and any(figures.iterdir()):
            self.client.log_artifacts(self._parent, str(figures), "figures")
        for rid in dict.fromkeys(r.run_id for r in records):
            if self._children and rid in self._children:
                self.client.set_terminated(self._children[rid], "FINISHED")
        self.client.set_terminated(self._parent, "FINISHED")
        self._finished_with = len(records)

    def _stop(self, records: Sequence[StageRecord], status: str) -> None:
        self._sync(records)
        complete = {r.run_id for r in records if r.step == len(r.order)}  # its last stage committed
        for rid, child in (self._children or {}).items():
            self.client.set_terminated(child, "FINISHED" if rid in complete else status)
        self.client.set_terminated(self._parent, status)

    def _read_state(self) -> dict[str, Any]:
        if not self.tree.store.exists(layout.TRACKING_JSON):
            return {}
        state: dict[str, Any] = json.loads(self.tree.store.get_bytes(layout.TRACKING_JSON)).get("mlflow", {})
        return state

    def _missing(self, exc: Exception) -> bool:
        return isinstance(exc, self._mlflow_error) and getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"

    def _ensure_parent(self) -> None:
        """The parent run of these results: the one ``tracking.json`` names (on this server), else a new one."""
        if self._parent:
            return
        state = self._read_state()
        run = None
        if state.get("uri") == self.cfg.uri and state.get("run_id"):
            try:
                run = self.client.get_run(state["run_id"])
            except Exception as exc:
                if not self._missing(exc):
                    raise
            if run is not None and run.info.lifecycle_stage != "active":
                run = None  # deleted in MLflow: these results get a new run
        if run is None:
            experiment_id = self._experiment()
            run = self.client.create_run(experiment_id, run_name=self.spec.name, tags={
                "slmcl.kind": "experiment", "slmcl.experiment": self.spec.name, "slmcl.source": self.source})
            self.tree.store.put_bytes(layout.TRACKING_JSON, json.dumps({"mlflow": {
                "uri": self.cfg.uri, "experiment_id": experiment_id, "run_id": run.info.run_id}}, indent=1).encode())
            logged: dict[str, str] = {}
        else:
            logged = dict(run.data.params)
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")  # a new session of finished results
        self._experiment_id, run_id = run.info.experiment_id, run.info.run_id
        # Params are write-once in MLflow: a resumed session adds the keys it lacks (a setting added since);
        # a value that changed on resume (seeds, orders may grow) stays the first session's, spec.yaml has the last.
        params = [self._entities.Param(k, v) for k, v in flatten_params(self.spec.to_dict()).items() if k not in logged]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + PARAMS_PER_BATCH])
        self._parent = run_id

    def _experiment(self) -> str:
        name = self.cfg.experiment or self.spec.name
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return str(self.client.create_experiment(name))
            except Exception as exc:  # another process created it meanwhile
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise exc from None
        if exp.lifecycle_stage != "active":
            raise SpecError(f"tracking.mlflow.experiment: the MLflow experiment {name!r} is deleted; restore it "
                            "or name another")
        return str(exp.experiment_id)

    def _child(self, rec: StageRecord) -> str:
        if self._children is None:
            children: dict[str, str] = {}
            token = None
            while True:
                page = self.client.search_runs([self._experiment_id], max_results=1000, page_token=token,
                                               filter_string=f"tags.mlflow.parentRunId = '{self._parent}'")
                for run in page:
                    if "slmcl.run_id" in run.data.tags:
                        children[run.data.tags["slmcl.run_id"]] = run.info.run_id
                        if run.info.status in ("FAILED", "KILLED"):  # stopped early, continued by this session
                            self.client.update_run(run.info.run_id, status="RUNNING")
                token = page.token
                if not token:
                    break
            self._children = children
        if rec.run_id not in self._children:
            tags = {"mlflow.parentRunId": self._parent, "slmcl.run_id": rec.run_id, "slmcl.model": rec.model,
                    "slmcl.strategy": rec.strategy, "slmcl.order": layout.order_id(rec.order),
                    "slmcl.seed": str(rec.seed)}
            run = self.client.create_run(self._experiment_id, run_name=rec.run_id, tags=tags)  # one call: no orphan
            self._children[rec.run_id] = run.info.run_id
            self._logged[rec.run_id] = set()
        return self._children[rec.run_id]

    def _logged_steps(self, rid: str, child: str) -> set[int]:
        if rid not in self._logged:
            self._logged[rid] = {int(m.step) for m in self.client.get_metric_history(child, STAGE_METRIC)}
        return self._logged[rid]

    def _log_stage(self, child: str, rec: StageRecord, matrix: dict[int, dict[str, float]]) -> None:
        """The adapter first, the metrics after, ``stage`` last: the stage counts as logged only when all is there."""
        if self.cfg.log_adapters and rec.step > 0 and rec.checkpoint:
            self._log_adapter(child, rec)
        ts = int(time.time() * 1000)
        metric = self._entities.Metric
        items = [metric(k, v, ts, rec.step) for k, v in stage_metrics(rec, matrix).items()]
        items.append(metric(STAGE_METRIC, float(rec.step), ts, rec.step))
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(child, metrics=items[i:i + METRICS_PER_BATCH])

    def _log_adapter(self, child: str, rec: StageRecord) -> None:
        """A LoRA checkpoint's folder (adapter, strategy state); a merged model (OSF) is a whole model: not sent."""
        with tempfile.TemporaryDirectory(prefix="slmcl-mlflow-") as scratch:
            try:
                folder = self.tree.local_checkpoint(rec.checkpoint, Path(scratch))
            except NotFoundError:
                return  # no longer in the results (deleted by hand): nothing to send
            if (folder / layout.ADAPTER_FILES[0]).is_file():
                self.client.log_artifacts(child, str(folder), f"adapters/step-{rec.step}")
