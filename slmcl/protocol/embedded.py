"""The embedded mode: a whole experiment in one process, resumable, reporting progress.

The stage protocol (``slmcl.protocol.stages``) with a local ``Engine`` in every role: it trains
each run's stages, and measures every checkpoint in the same process (``LocalEvaluator``)
before the next stage trains. Restarted on the same output directory it skips what is
committed, measures what was trained but not committed, and trains the rest, so nothing is
recomputed and no row is written twice.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmcl.config.spec import spec_from_dict
from slmcl.errors import CancelledError, SpecError
from slmcl.protocol import layout
from slmcl.protocol.drift import DriftRows
from slmcl.protocol.events import Event, ProgressCallback
from slmcl.protocol.records import StageRecord, TrainedStage
from slmcl.protocol.results import read_stages
from slmcl.protocol.runs import RunPlan, plan_runs
from slmcl.protocol.stages import (
    BaseEvalCache,
    EvalProgress,
    ResultsTree,
    RunHooks,
    TaskResult,
    base_runs_missing,
    commit_base,
    commit_stage,
    measure,
    stage_tasks,
    train_run,
)
from slmcl.protocol.tables import live_estimate
from slmcl.storage.local import LocalStore
from slmcl.tasks.data import DataSummary, check_data, load_examples, spec_data_files
from slmcl.tracking import FAILED, KILLED, NullTracker, Tracker, open_tracker

if TYPE_CHECKING:
    from slmcl.config.spec import ExperimentSpec, TaskSpec
    from slmcl.inference.evaluation import TaskEvaluation
    from slmcl.models.engine import Engine

__all__ = ["Event", "ExperimentRunner", "LocalEvaluator", "ProgressCallback", "check_output_dir", "check_resumable",
           "mark_results", "run_experiment"]

# Settings whose change makes old results incomparable; seeds, orders and names may grow.
_RESUME_IGNORED = ("name", "seeds", "orders", "output_dir", "device", "tracking")


def _comparable(spec_dict: dict[str, Any]) -> dict[str, Any]:
    d = {k: v for k, v in spec_dict.items() if k not in _RESUME_IGNORED}
    d.get("evaluation", {}).pop("batch_size", None)
    d.get("evaluation", {}).pop("calibration_prior", None)  # it changes estimates only, which tables recompute
    d.get("reference", {}).pop("batch_size", None)
    d.get("training", {}).pop("tokens_per_forward", None)
    return d


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse a folder that holds anything but slmcl results: nothing of the user's is ever overwritten.

    A results directory is one with the marker ``.slmcl-results`` (written when a run starts), or one made
    before the marker existed (``spec.json`` beside ``runs/``). A missing or empty folder is fine.
    """
    out = Path(output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise SpecError(f"output_dir {out}: exists and is not a directory")
    if (out / layout.RESULTS_MARKER).is_file():
        return
    if (out / layout.SPEC_JSON).is_file() and (out / layout.runs_prefix()).is_dir():
        return
    if next(out.iterdir(), None) is not None:
        raise SpecError(f"output_dir {out}: holds files that are not slmcl results (no {layout.RESULTS_MARKER}); "
                        "choose a new or empty directory")


def _check_same_data(tree: ResultsTree, spec: ExperimentSpec, data: dict[str, DataSummary]) -> None:
    if not tree.store.exists(layout.DATA_JSON):
        return  # results made before the hashes were recorded: nothing to compare with
    recorded: dict[str, Any] = json.loads(tree.store.get_bytes(layout.DATA_JSON)).get("files", {})
    for field_name, path in spec_data_files(spec):
        was = recorded.get(path, {}).get("sha256")
        if was and was != data[path].sha256:
            raise SpecError(f"{field_name}: {path} changed since the results in {spec.output_dir} were made "
                            f"(sha256 {was[:12]}…, now {data[path].sha256[:12]}…); restore it or use a new output_dir")


def check_resumable(tree: ResultsTree, spec: ExperimentSpec) -> dict[str, DataSummary]:
    """Refuse a folder of the user's, and refuse to mix results of different settings or data in one output
    directory. Every row of every data file is checked on the way (their hashes are returned, for data.json)."""
    check_output_dir(spec.output_dir)
    old = tree.read_spec_dict()
    if old is not None:
        with contextlib.suppress(SpecError):  # settings added since those results were made take their defaults
            old = spec_from_dict(old, check_files=False).to_dict()
        before, now = _comparable(old), _comparable(spec.to_dict())
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise SpecError(
                f"output_dir {spec.output_dir} holds results of a different spec (changed: {', '.join(changed)}); "
                "use a new output_dir or delete the old one"
            )
    data = check_data(spec)
    _check_same_data(tree, spec, data)
    return data


def mark_results(tree: ResultsTree, data: dict[str, DataSummary]) -> None:
    """The marker of a results directory, and the data it is made from (kept from the first run on resume)."""
    if not tree.store.exists(layout.RESULTS_MARKER):
        tree.store.put_bytes(layout.RESULTS_MARKER, b"slmcl results directory (see README, 'The results directory')\n")
    if not tree.store.exists(layout.DATA_JSON):
        files = {path: {"sha256": d.sha256, "rows": d.rows, "bytes": d.size} for path, d in data.items()}
        tree.store.put_bytes(layout.DATA_JSON, json.dumps({"files": files}, indent=1, sort_keys=True).encode())


def write_environment(tree: ResultsTree, engine: Engine) -> None:
    """What the run computes on (device, versions), for the report: the results say where they came from.
    One entry per model, kept across resumed sessions (a resumed run on another machine adds its own)."""
    import platform
    from importlib import metadata

    import torch

    import slmcl

    device = engine.loaded.device
    entry = {"model": engine.spec.model.name, "device": str(device), "python": platform.python_version(),
             "torch": torch.__version__, "transformers": metadata.version("transformers"),
             "peft": metadata.version("peft"), "slmcl": slmcl.__version__, "cuda": torch.version.cuda or "",
             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    sessions: list[dict[str, Any]] = []
    if tree.store.exists(layout.ENVIRONMENT_JSON):
        sessions = json.loads(tree.store.get_bytes(layout.ENVIRONMENT_JSON)).get("sessions", [])
    same = {k: v for k, v in entry.items() if k != "date"}
    if not any({k: v for k, v in old.items() if k != "date"} == same for old in sessions):
        sessions.append(entry)
    tree.store.put_bytes(layout.ENVIRONMENT_JSON, json.dumps(
        {**{k: v for k, v in entry.items() if k != "model"}, "sessions": sessions}, indent=1).encode())


def read_prior(path: str) -> list[StageRecord]:
    """A calibration prior's evaluated stage records; a missing or empty directory is a ``SpecError``."""
    if not path:
        return []
    if path.startswith("experiment:"):
        raise SpecError(f"evaluation.calibration_prior: {path!r} names a service experiment; `slmcl run` reads a "
                        "results directory (pull one with `slmcl results ID --out DIR`)")
    folder = Path(path)
    records = [r for r in read_stages(LocalStore(folder)) if r.evaluated] if folder.is_dir() else []
    if not records:
        raise SpecError(f"evaluation.calibration_prior: {path} holds no evaluated stage records "
                        "(runs/*/stage-*.json of an slmcl results directory)")
    return records


def task_result(ev: TaskEvaluation) -> TaskResult:
    return TaskResult(ev.task, ev.score(), [p.as_dict() for p in ev.predictions], ev.seconds)


class LocalEvaluator:
    """The ``CheckpointEvaluator`` of one process: the engine that trains also measures."""

    parallel = False  # one model: generation and drift take turns

    def __init__(self, engine: Engine, tree: ResultsTree, cache: BaseEvalCache,
                 on_base_eval: Any = None) -> None:
        self.engine = engine
        self.tree = tree
        self.cache = cache
        self.resident: str | None = None  # the checkpoint whose weights the engine holds now
        self._on_base_eval = on_base_eval or (lambda result, evaluated_with: None)
        self._scratch = Path(tempfile.mkdtemp(prefix="slmcl-eval-"))

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _use(self, checkpoint: str) -> None:
        if checkpoint != self.resident:
            self.engine.load_adapter(self.tree.local_checkpoint(checkpoint, self._scratch))
            self.resident = checkpoint

    def evaluate(self, checkpoint: str | None, tasks: Sequence[TaskSpec],
                 on_progress: EvalProgress | None = None) -> list[TaskResult]:
        if checkpoint is not None:
            self._use(checkpoint)
            return [task_result(ev) for ev in self.engine.evaluate_all(tasks, on_progress=on_progress)]
        keys = {t.name: self.engine.base_eval_key(t) for t in tasks}
        cached = {t.name: self.cache.get(keys[t.name]) for t in tasks}
        missing = [t for t in tasks if cached[t.name] is None]
        if missing:
            evals = self.engine.evaluate_all(missing, base=True, on_progress=on_progress)
            for ev in evals:
                cached[ev.task] = result = task_result(ev)
                self.cache.put(keys[ev.task], result)
                self._on_base_eval(result, [e.task for e in evals])
        return [r for r in cached.values() if r is not None]

    def drift_rows(self, checkpoint: str | None) -> DriftRows:
        if checkpoint is None:
            return self.engine.drift_rows(self.cache.store, base=True)
        self._use(checkpoint)
        return self.engine.drift_rows(self.cache.store)


class ExperimentRunner:
    def __init__(self, spec: ExperimentSpec, progress: ProgressCallback | None = None,
                 engine: Engine | None = None) -> None:
        self.spec = spec
        self.model_spec = spec  # the experiment as the model being run sees it (``spec.for_model``)
        self.tree = ResultsTree(LocalStore(spec.output_dir))
        self.progress = progress or (lambda e: None)
        self._engine = engine
        self._evaluator: LocalEvaluator | None = None
        self.tracker: Tracker = NullTracker()

    @property
    def store(self) -> LocalStore:
        assert isinstance(self.tree.store, LocalStore)
        return self.tree.store

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from slmcl.models.engine import Engine

            t0 = time.perf_counter()
            self._engine = Engine(self.model_spec)
            write_environment(self.tree, self._engine)
            self.progress(Event("model_loaded", data={"model": self.model_spec.model.name,
                                                      "device": str(self._engine.loaded.device),
                                                      "seconds": time.perf_counter() - t0}))
        return self._engine

    @property
    def evaluator(self) -> LocalEvaluator:
        if self._evaluator is None:
            def on_base_eval(result: TaskResult, evaluated_with: list[str]) -> None:
                self.progress(Event("base_eval", task=result.task, data={
                    **result.score, "seconds": result.seconds, "evaluated_with": evaluated_with}))

            self._evaluator = LocalEvaluator(self.engine, self.tree, BaseEvalCache(self.tree.store), on_base_eval)
        return self._evaluator

    @functools.cached_property
    def prior(self) -> list[StageRecord]:
        """The fully evaluated checkpoints of ``evaluation.calibration_prior`` (another results directory)."""
        return read_prior(self.spec.evaluation.calibration_prior)

    def preflight(self) -> None:
        """Read every data file before the model loads: a bad row fails in a second, not after an hour."""
        for task in self.spec.tasks:
            load_examples(task.train_file, limit=self.spec.training.max_examples)
            load_examples(task.test_file, limit=self.spec.evaluation.max_examples)
        load_examples(self.spec.reference.file, limit=self.spec.reference.max_examples)

    def run(self) -> Path:
        spec, tree = self.spec, self.tree
        data = check_resumable(tree, spec)
        self.tracker = open_tracker(spec, tree, self._tracking_warning, source=str(Path(spec.output_dir).resolve()),
                                    report_dir=Path(spec.output_dir) / layout.REPORT_DIR)
        self.preflight()
        tree.write_spec(spec)
        mark_results(tree, data)
        runs = plan_runs(spec)
        records = tree.records()
        done = {(r.run_id, r.step) for r in records}
        self.tracker.sync(records)  # the tracker's run now, and whatever an earlier session could not log
        finished = sum(1 for r in runs for k in range(1, len(r.order) + 1) if (r.run_id, k) in done)
        self.progress(Event("experiment_started", data={
            "runs": len(runs), "stages": sum(len(r.order) for r in runs), "stages_done": finished,
            "output_dir": spec.output_dir}))
        try:
            for label in dict.fromkeys(r.model for r in runs):  # one model resident at a time
                self._use_model(label)
                for run in runs:
                    if run.model == label:
                        self._run(run, done)
        except BaseException as exc:
            # Stopped (Ctrl-C, a cancel) or failed: the tracker's runs say so instead of staying RUNNING.
            self._stop_tracker(KILLED if isinstance(exc, (KeyboardInterrupt, CancelledError)) else FAILED)
            raise
        finally:
            if self._evaluator is not None:
                self._evaluator.close()
        records = tree.write_tables(self.prior)
        self._write_report()
        self.tracker.finished(records)
        self.progress(Event("experiment_done", data={"output_dir": spec.output_dir}))
        return Path(spec.output_dir)

    def _stop_tracker(self, status: str) -> None:
        """Close the tracker's runs as ``status`` while an exception propagates, which must stay the one raised."""
        try:
            records = self.tree.records()
        except Exception as exc:  # noqa: BLE001 - reported as a warning; the run's own failure is what propagates
            self._tracking_warning(f"tracking: the committed stages could not be read ({exc}); closing the runs "
                                   f"as {status} without them")
            records = []
        self.tracker.stopped(records, status)

    def _tracking_warning(self, message: str) -> None:
        """The tracking server failed a call: the experiment goes on, and the user is told what is not logged."""
        self.progress(Event("tracking_warning", data={"message": message}))

    def _write_report(self) -> None:
        """The report (tables, figures, one HTML page) beside the results: ``<output_dir>/report/``."""
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            self.progress(Event("report_skipped", data={"reason": "matplotlib is not installed (pip install "
                                                                   "'slmcl[report]'; make setup installs it)"}))
            return
        from slmcl.report import build_report

        t0 = time.perf_counter()
        index = build_report(self.spec.output_dir, Path(self.spec.output_dir) / layout.REPORT_DIR)
        self.progress(Event("report_written", data={"path": str(index), "seconds": time.perf_counter() - t0}))

    def _use_model(self, label: str) -> None:
        """Run ``label``'s runs next: the previous model's engine is released before the next one loads."""
        model_spec = self.spec.for_model(label)
        if model_spec.model == self.model_spec.model:
            return
        if self._evaluator is not None:
            self._evaluator.close()
        self._evaluator = None
        self._engine = None
        gc.collect()
        self.model_spec = model_spec

    def _eval_progress(self, rid: str, stage: int) -> EvalProgress:
        def cb(task: str, done: int, total: int) -> None:
            self.progress(Event("eval_progress", rid, stage, task, {"done": done, "total": total}))
        return cb

    def _run(self, run: RunPlan, done: set[tuple[str, int]]) -> None:
        spec, rid, order, seed = self.model_spec, run.run_id, list(run.order), run.seed
        if all((rid, k) in done for k in range(0, self.tree.run_end(rid, len(order)) + 1)):
            self.progress(Event("run_done", rid, data={"skipped": True}))
            return
        self.progress(Event("run_started", rid, data={"order": order, "seed": seed, "strategy": run.strategy,
                                                      "model": spec.model.name}))
        if base_runs_missing(self.tree, spec):
            commit_base(self.tree, spec, measure(self.evaluator, None, spec.tasks, self._eval_progress("", 0)))
        stage_t0: dict[int, float] = {}

        def on_stage_start(step: int, task: str) -> None:
            stage_t0[step] = time.perf_counter()
            self.evaluator.resident = None  # training changes the weights
            self.progress(Event("stage_started", rid, step, task, {"order": order, "seed": seed}))

        def on_step(step: int, info: dict[str, Any]) -> None:
            self.progress(Event("train_step", rid, step, order[step - 1], info))

        def on_trained(trained: TrainedStage, resumed: bool) -> None:
            if self.tree.is_committed(rid, trained.step):
                self.progress(Event("stage_skipped", rid, trained.step, trained.task))
                return
            if not resumed:
                self.evaluator.resident = trained.checkpoint
            if not resumed:
                for record in trained.interventions:
                    self.progress(Event("intervention", rid, trained.step, trained.task, record))
            t_measure = time.perf_counter()
            m = measure(self.evaluator, trained.checkpoint, stage_tasks(spec, trained),
                        self._eval_progress(rid, trained.step))
            rec = commit_stage(self.tree, spec, trained, m)
            records = self.tree.write_tables(self.prior)
            self.tracker.sync(records)
            t0 = stage_t0.get(trained.step, t_measure)
            self.progress(Event("stage_done", rid, trained.step, trained.task, {
                "scores": m.scores, "stability": rec.stability, "train_seconds": trained.train.get("seconds"),
                "seconds": time.perf_counter() - t0, "final_loss": trained.final_loss,
                "estimate": None if m.scores else live_estimate(records, rec, self.prior),
                "action": trained.action}))

        train_run(self.engine, self.tree, spec, order, seed, strategy=run.strategy,
                  hooks=RunHooks(on_stage_start=on_stage_start, on_step=on_step, on_trained=on_trained))
        self.progress(Event("run_done", rid))


def run_experiment(spec: ExperimentSpec, progress: ProgressCallback | None = None) -> Path:
    """Run (or resume) an experiment; returns the results directory."""
    return ExperimentRunner(spec, progress).run()
