"""The stage protocol, once, for every host: train a run stage by stage, measure each checkpoint, commit.

Three roles call it. The embedded runner does all of it in one process; a trainer worker runs
``train_run`` and announces each trained stage; the monitor runs ``measure_and_commit`` for each
announced stage with the evaluators as its ``CheckpointEvaluator``. Because the records, the
resume rule, the base-evaluation cache and the key layout are written here and nowhere else,
both modes produce the same files for the same spec, seed and device.

Per stage k of run r (a crash between any two steps loses nothing that was written before it):

1. train on task k, starting from checkpoint k-1 (or a fresh adapter at k = 1);
2. the adapter (and the strategy's state) -> ``checkpoints/<r>/step-<k>/``;
3. the training record -> ``runs/<r>/trained-<k>.json``: the stage is *trained* and is never
   trained again;
4. evaluate every task and measure drift at the checkpoint; predictions, then the stage
   record ``runs/<r>/stage-<k>.json``: the stage is *committed*.

This module imports no torch: the monitor, which only aggregates, uses it without a model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slmcl.errors import NotFoundError
from slmcl.protocol import layout
from slmcl.protocol.drift import DriftRows, summarize_drift
from slmcl.protocol.records import StageRecord, TrainedStage
from slmcl.protocol.results import read_stages
from slmcl.protocol.runs import plan_runs
from slmcl.protocol.tables import write_tables
from slmcl.storage.local import ArtifactStore, LocalStore, get_dir, put_dir

if TYPE_CHECKING:
    from slmcl.config.spec import ExperimentSpec, TaskSpec
    from slmcl.models.engine import Engine

EvalProgress = Callable[[str, int, int], None]  # (task, rows done, rows total)


# ---------------------------------------------------------------------------------------
# The results tree of one experiment, over any store.


class ResultsTree:
    """One experiment's results: a folder (``slmcl run``) or ``experiments/<id>/`` of the object store."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    # -- spec ------------------------------------------------------------------------------
    def write_spec(self, spec: ExperimentSpec) -> None:
        self.store.put_bytes(layout.SPEC_JSON, json.dumps(spec.to_dict(), indent=1, sort_keys=True).encode())
        self.store.put_bytes(layout.SPEC_YAML, spec.to_yaml().encode())

    def read_spec_dict(self) -> dict[str, Any] | None:
        if not self.store.exists(layout.SPEC_JSON):
            return None
        raw: dict[str, Any] = json.loads(self.store.get_bytes(layout.SPEC_JSON))
        return raw

    # -- training --------------------------------------------------------------------------
    def write_trained(self, trained: TrainedStage) -> None:
        self.store.put_bytes(layout.trained_key(trained.run_id, trained.step), trained.to_json().encode())

    def read_trained(self, rid: str, step: int) -> TrainedStage:
        """The training record of a stage; a stage committed before training records existed reads from its record."""
        try:
            return TrainedStage.from_json(self.store.get_bytes(layout.trained_key(rid, step)))
        except NotFoundError:
            rec = StageRecord.from_json(self.store.get_bytes(layout.stage_key(rid, step)))
            return TrainedStage(rid, rec.order, rec.seed, step, rec.checkpoint_task, rec.checkpoint, rec.train)

    def last_trained(self, rid: str, n_stages: int) -> int:
        """The resume rule: the highest k whose adapter is complete and whose training (or stage) record exists."""
        run_keys = set(self.store.list_keys(layout.runs_prefix(rid)))
        ckpt_keys = set(self.store.list_keys(f"checkpoints/{rid}"))
        for k in range(n_stages, 0, -1):
            prefix = layout.checkpoint_prefix(rid, k)
            recorded = layout.trained_key(rid, k) in run_keys or layout.stage_key(rid, k) in run_keys
            names = {key[len(prefix) + 1:] for key in ckpt_keys if key.startswith(prefix + "/")}
            if recorded and layout.checkpoint_complete(names):
                return k
        return 0

    def save_checkpoint(self, rid: str, step: int, local_dir: Path) -> str:
        """Upload an adapter folder (a no-op when the folder already is the store's own)."""
        prefix = layout.checkpoint_prefix(rid, step)
        if isinstance(self.store, LocalStore) and Path(local_dir).resolve() == self.store.path(prefix).resolve():
            return prefix
        put_dir(self.store, prefix, local_dir)
        return prefix

    def local_checkpoint(self, prefix: str, scratch: Path) -> Path:
        """A local folder holding the checkpoint: the store's own folder when it is local, else a download."""
        if isinstance(self.store, LocalStore) and layout.checkpoint_complete(
                {p.name for p in self.store.path(prefix).glob("*")}):
            return self.store.path(prefix)
        return get_dir(self.store, prefix, scratch / prefix.replace("/", "_"))

    # -- committed stages ----------------------------------------------------------------
    def committed(self, rid: str | None = None) -> set[tuple[str, int]]:
        return {(r.run_id, r.step) for r in self.records(rid)}

    def is_committed(self, rid: str, step: int) -> bool:
        return self.store.exists(layout.stage_key(rid, step))

    def records(self, rid: str | None = None) -> list[StageRecord]:
        return read_stages(self.store, rid)

    def commit(self, record: StageRecord, predictions: dict[str, list[dict[str, Any]]], pred_run: str = "") -> None:
        """Predictions first, the record last: a record on disk means everything of its stage is there."""
        for task, rows in predictions.items():
            key = layout.predictions_key(pred_run or record.run_id, record.step, task)
            self.store.put_bytes(key, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        self.store.put_bytes(layout.stage_key(record.run_id, record.step), record.to_json().encode())

    def write_tables(self) -> list[StageRecord]:
        """Rebuild the tables from the records; returns the records it read (callers count them)."""
        records = self.records()
        write_tables(self.store, records)
        return records


# ---------------------------------------------------------------------------------------
# Measuring a checkpoint: the port that the embedded engine and the evaluator pool implement.


@dataclass(frozen=True)
class TaskResult:
    task: str
    score: dict[str, Any]  # {"accuracy", "correct", "total", "score_sum"}
    predictions: list[dict[str, Any]]
    seconds: float


class CheckpointEvaluator(Protocol):
    """Evaluates a checkpoint (``None``: the base model) on tasks, and gives its per-row drift from the base."""

    parallel: bool  # True when evaluation and drift may run at once (remote replicas); False for one local model

    def evaluate(self, checkpoint: str | None, tasks: Sequence[TaskSpec],
                 on_progress: EvalProgress | None = None) -> list[TaskResult]: ...

    def drift_rows(self, checkpoint: str | None) -> DriftRows: ...


@dataclass(frozen=True)
class Measurement:
    results: list[TaskResult]
    stability: dict[str, Any]
    eval_seconds: float
    stability_seconds: float

    @property
    def scores(self) -> dict[str, dict[str, Any]]:
        return {r.task: r.score for r in self.results}

    @property
    def predictions(self) -> dict[str, list[dict[str, Any]]]:
        return {r.task: r.predictions for r in self.results}


class BaseEvalCache:
    """Base evaluations by fingerprint (model, test bytes, rendering, decoding): the base never changes,
    so every run, experiment and replica that asks the same question reuses one answer."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def get(self, fingerprint: str, shard: str = "") -> TaskResult | None:
        key = layout.base_eval_cache_key(fingerprint, shard)
        if not self.store.exists(key):
            return None
        raw = json.loads(self.store.get_bytes(key))
        return TaskResult(raw["task"], raw["score"], raw["predictions"], float(raw.get("seconds", 0.0)))

    def put(self, fingerprint: str, result: TaskResult, shard: str = "") -> None:
        blob = {"task": result.task, "score": result.score, "predictions": result.predictions,
                "seconds": result.seconds}
        self.store.put_bytes(layout.base_eval_cache_key(fingerprint, shard), json.dumps(blob).encode())


def measure(evaluator: CheckpointEvaluator, checkpoint: str | None, tasks: Sequence[TaskSpec],
            on_progress: EvalProgress | None = None) -> Measurement:
    """Task scores and drift summary of one checkpoint; the monitor owns what the drift summary is."""

    def drift() -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        rows = evaluator.drift_rows(checkpoint)
        base = None if checkpoint is None else evaluator.drift_rows(None)
        return summarize_drift(rows, base), time.perf_counter() - t0

    t0 = time.perf_counter()
    if evaluator.parallel:  # drift on one replica while the others evaluate
        with ThreadPoolExecutor(1, thread_name_prefix="drift") as ex:
            fut = ex.submit(drift)
            results = evaluator.evaluate(checkpoint, tasks, on_progress)
            eval_seconds = time.perf_counter() - t0
            stability, stab_seconds = fut.result()
    else:
        results = evaluator.evaluate(checkpoint, tasks, on_progress)
        eval_seconds = time.perf_counter() - t0
        stability, stab_seconds = drift()
    order = {t.name: i for i, t in enumerate(tasks)}
    results = sorted(results, key=lambda r: order[r.task])
    return Measurement(results, stability, eval_seconds, stab_seconds)


def commit_base(tree: ResultsTree, spec: ExperimentSpec, m: Measurement) -> list[str]:
    """Stage 0 of every run (shared base measurement); returns the run ids it committed."""
    committed = []
    first = True
    for run in plan_runs(spec):
        rid = run.run_id
        if tree.is_committed(rid, 0):
            continue
        rec = StageRecord(rid, list(run.order), run.seed, 0, "base", spec.model.name, m.scores, m.stability,
                          timing={"eval_seconds": m.eval_seconds, "stability_seconds": m.stability_seconds},
                          strategy=run.strategy)
        tree.commit(rec, m.predictions if first else {}, pred_run=layout.BASE_RUN)
        first = False
        committed.append(rid)
    return committed


def commit_stage(tree: ResultsTree, spec: ExperimentSpec, trained: TrainedStage, m: Measurement) -> StageRecord:
    rec = StageRecord(
        trained.run_id, list(trained.order), trained.seed, trained.step, trained.task, spec.model.name,
        m.scores, m.stability, train=trained.train, checkpoint=trained.checkpoint,
        timing={"train_seconds": float(trained.train.get("seconds", 0.0)), "eval_seconds": m.eval_seconds,
                "stability_seconds": m.stability_seconds},
        strategy=trained.strategy, checkpoint_bytes=int(trained.train.get("checkpoint_bytes", 0)),
        trainable_params=int(trained.train.get("trainable_params", 0)),
    )
    tree.commit(rec, m.predictions)
    return rec


def base_runs_missing(tree: ResultsTree, spec: ExperimentSpec) -> bool:
    return any(not tree.is_committed(run.run_id, 0) for run in plan_runs(spec))


def expected_records(spec: ExperimentSpec) -> int:
    return sum(len(run.order) + 1 for run in plan_runs(spec))


# ---------------------------------------------------------------------------------------
# Training a run.


@dataclass
class RunHooks:
    """What a host does around the protocol's training loop (all optional)."""

    on_stage_start: Callable[[int, str], None] = lambda step, task: None
    on_step: Callable[[int, dict[str, Any]], None] = lambda step, info: None  # may raise to stop the run
    # (trained stage, resumed): resumed stages were trained before this call (the trainer re-announces them,
    # the embedded runner measures those it had not committed).
    on_trained: Callable[[TrainedStage, bool], None] = lambda trained, resumed: None
    check_stop: Callable[[], None] = lambda: None  # between stages; raises to stop


def train_run(engine: Engine, tree: ResultsTree, spec: ExperimentSpec, order: Sequence[str], seed: int, *,
              strategy: str = layout.DEFAULT_STRATEGY, hooks: RunHooks | None = None,
              scratch: Path | None = None) -> list[int]:
    """Train the stages of run (order, seed) that are not trained yet; returns the steps trained now.

    Resumes after the last trained stage from its checkpoint and strategy state, exactly as if never
    interrupted (each stage seeds its own random streams).
    """
    hooks = hooks or RunHooks()
    order = list(order)
    rid = layout.run_id(order, seed, strategy)
    entry = spec.strategy_entry(strategy)
    done = tree.last_trained(rid, len(order))
    for k in range(1, done + 1):
        hooks.on_trained(tree.read_trained(rid, k), True)
    if done == len(order):
        return []
    tmp = Path(tempfile.mkdtemp(dir=scratch, prefix=f"train-{rid}-"))
    try:
        engine.start_run(seed, entry, n_stages=len(order))
        state = None
        if done:
            state = engine.load_checkpoint(tree.local_checkpoint(layout.checkpoint_prefix(rid, done), tmp))
        trained_now = []
        for step in range(done + 1, len(order) + 1):
            hooks.check_stop()
            task_name = order[step - 1]
            hooks.on_stage_start(step, task_name)

            def on_step(info: dict[str, Any], _s: int = step) -> None:  # _s binds this stage's step
                hooks.on_step(_s, info)

            result = engine.train(run_id=rid, seed=seed, stage=step, task=spec.task(task_name),
                                  previous_tasks=order[: step - 1], strategy_state=state, on_step=on_step,
                                  n_stages=len(order), strategy=entry)
            state = result.strategy_state
            local = (tree.store.path(layout.checkpoint_prefix(rid, step)) if isinstance(tree.store, LocalStore)
                     else tmp / f"step-{step}")
            engine.save_checkpoint(local, strategy_state=state)
            size = sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file())
            prefix = tree.save_checkpoint(rid, step, local)
            trained = TrainedStage(rid, order, seed, step, task_name, prefix, train={
                "steps": [s.__dict__ for s in result.steps], "examples": result.examples, "tokens": result.tokens,
                "padded_fraction": result.padded_fraction, "seconds": result.seconds,
                "trainable_params": result.trainable_params, "checkpoint_bytes": size}, strategy=strategy)
            tree.write_trained(trained)
            trained_now.append(step)
            hooks.on_trained(trained, False)
        return trained_now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "BaseEvalCache", "CheckpointEvaluator", "EvalProgress", "Measurement", "ResultsTree", "RunHooks", "TaskResult",
    "base_runs_missing", "commit_base", "commit_stage", "expected_records", "measure", "train_run",
]
