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
from slmcl.protocol import layout, policy
from slmcl.protocol.drift import DriftRows, summarize_drift
from slmcl.protocol.records import StageRecord, TrainedStage
from slmcl.protocol.results import read_stages
from slmcl.protocol.runs import plan_runs
from slmcl.protocol.tables import reference_accuracy_columns, write_tables
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

    def run_end(self, rid: str, n_stages: int) -> int:
        """The last stage of a run: ``n_stages``, or the stage after which the stability policy stopped it."""
        key = layout.stopped_key(rid)
        if not self.store.exists(key):
            return n_stages
        return int(json.loads(self.store.get_bytes(key))["step"])

    def write_stopped(self, rid: str, step: int, interventions: list[dict[str, Any]]) -> None:
        self.store.put_bytes(layout.stopped_key(rid), json.dumps(
            {"step": step, "interventions": interventions}, indent=1, sort_keys=True).encode())

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

    def write_tables(self, prior: Sequence[StageRecord] = ()) -> list[StageRecord]:
        """Rebuild the tables from the records; returns the records it read (callers count them).

        ``prior``: fully evaluated checkpoints of other experiments that also calibrate the accuracy
        estimate (``evaluation.calibration_prior``).
        """
        records = self.records()
        write_tables(self.store, records, prior=prior)
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
    for run in plan_runs(spec, model=spec.model_label):  # ``spec`` is its model's (``for_model``)
        rid = run.run_id
        if tree.is_committed(rid, 0):
            continue
        rec = StageRecord(rid, list(run.order), run.seed, 0, "base", spec.model.name, m.scores, m.stability,
                          timing={"eval_seconds": m.eval_seconds, "stability_seconds": m.stability_seconds},
                          strategy=run.strategy)
        tree.commit(rec, m.predictions if first else {}, pred_run=layout.base_run(spec.model_label))
        first = False
        committed.append(rid)
    return committed


def stage_tasks(spec: ExperimentSpec, trained: TrainedStage) -> list[TaskSpec]:
    """The tasks a trained stage is evaluated on: all of them every ``evaluation.every`` stages and at a
    run's last stage (its planned last, or the one the policy stopped it after); none in between, where
    drift alone is measured and the tables estimate accuracy from it."""
    every = spec.evaluation.every
    last = trained.step == len(trained.order) or trained.action == "stop"
    return list(spec.tasks) if every == 1 or last or trained.step % every == 0 else []


def commit_stage(tree: ResultsTree, spec: ExperimentSpec, trained: TrainedStage, m: Measurement) -> StageRecord:
    rec = StageRecord(
        trained.run_id, list(trained.order), trained.seed, trained.step, trained.task, spec.model.name,
        m.scores, {**m.stability, **trained.measured}, train=trained.train, checkpoint=trained.checkpoint,
        timing={"train_seconds": float(trained.train.get("seconds", 0.0)), "eval_seconds": m.eval_seconds,
                "stability_seconds": m.stability_seconds},
        strategy=trained.strategy, checkpoint_bytes=int(trained.train.get("checkpoint_bytes", 0)),
        trainable_params=int(trained.train.get("trainable_params", 0)),
        starts_from=trained.start, interventions=list(trained.interventions), attribution=list(trained.attribution),
    )
    tree.commit(rec, m.predictions)
    return rec


def base_runs_missing(tree: ResultsTree, spec: ExperimentSpec) -> bool:
    """Whether a run of ``spec``'s model (its ``for_model`` view) lacks its base stage."""
    return any(not tree.is_committed(run.run_id, 0) for run in plan_runs(spec, model=spec.model_label))


def expected_records(spec: ExperimentSpec, tree: ResultsTree | None = None) -> int:
    """Stage records of a finished experiment: base + every stage of each run (up to where a policy stopped it)."""
    if tree is None:
        return sum(len(run.order) + 1 for run in plan_runs(spec))
    return sum(tree.run_end(run.run_id, len(run.order)) + 1 for run in plan_runs(spec))


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

    Resumes after the last trained stage from its checkpoint and strategy state (or, when that stage
    was reverted, from the last healthy one), exactly as if never interrupted (each stage seeds its own
    random streams). After each stage the stability policy reads the drift of the weights just trained
    and decides: a ``stop`` ends the run there, a ``revert`` makes the next stage start from the weights
    this one started from; the decision is in the training record, so a resumed run follows it.
    """
    hooks = hooks or RunHooks()
    order = list(order)
    rid = layout.run_id(order, seed, strategy, spec.model_label)  # ``spec`` is its model's (``for_model``)
    entry = spec.strategy_entry(strategy)
    end = tree.run_end(rid, len(order))
    done = tree.last_trained(rid, end)
    for k in range(1, done + 1):
        hooks.on_trained(tree.read_trained(rid, k), True)
    if done == end:
        return []
    tmp = Path(tempfile.mkdtemp(dir=scratch, prefix=f"train-{rid}-"))
    try:
        start = tree.read_trained(rid, done).next_start if done else 0
        state = _hold(engine, tree, rid, seed, entry, len(order), start, tmp)
        trained_now = []
        for step in range(done + 1, len(order) + 1):
            hooks.check_stop()
            task_name = order[step - 1]
            task = spec.task(task_name)
            hooks.on_stage_start(step, task_name)
            before = engine.task_drift(task, tree.store) if spec.monitoring.task_drift_examples else None

            def on_step(info: dict[str, Any], _s: int = step) -> None:  # _s binds this stage's step
                hooks.on_step(_s, info)

            result = engine.train(run_id=rid, seed=seed, stage=step, task=task,
                                  previous_tasks=order[: step - 1], strategy_state=state, on_step=on_step,
                                  n_stages=len(order), strategy=entry, store=tree.store)
            local = (tree.store.path(layout.checkpoint_prefix(rid, step)) if isinstance(tree.store, LocalStore)
                     else tmp / f"step-{step}")
            engine.save_checkpoint(local, strategy_state=result.strategy_state)
            size = sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file())
            prefix = tree.save_checkpoint(rid, step, local)
            measured, interventions = _after_stage(engine, tree, spec, task, step, before, result)
            trained = TrainedStage(rid, order, seed, step, task_name, prefix, train={
                "steps": [s.__dict__ for s in result.steps], "examples": result.examples, "tokens": result.tokens,
                "padded_fraction": result.padded_fraction, "seconds": result.seconds,
                "trainable_params": result.trainable_params, "checkpoint_bytes": size}, strategy=strategy,
                starts_from=start, interventions=interventions, measured=measured,
                attribution=engine.attribution(spec.monitoring, tree.store) if spec.monitoring.attribution else [])
            if trained.action == "stop":  # before the record: a crash between the two retrains this stage alike
                tree.write_stopped(rid, step, interventions)
            tree.write_trained(trained)
            trained_now.append(step)
            hooks.on_trained(trained, False)
            if trained.action == "stop":
                break
            if trained.action == "revert":
                state = _hold(engine, tree, rid, seed, entry, len(order), start, tmp)
            else:
                start, state = step, result.strategy_state
        return trained_now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hold(engine: Engine, tree: ResultsTree, rid: str, seed: int, entry: Any, n_stages: int, step: int,
          tmp: Path) -> Any:
    """Make the engine hold the weights of stage ``step`` of the run (0: the run's fresh start, which is
    deterministic in the seed); returns the strategy state the next stage continues from."""
    engine.start_run(seed, entry, n_stages=n_stages)
    if not step:
        return None
    return engine.load_checkpoint(tree.local_checkpoint(layout.checkpoint_prefix(rid, step), tmp))


def _after_stage(engine: Engine, tree: ResultsTree, spec: ExperimentSpec, task: TaskSpec, step: int,
                 before: dict[str, Any] | None, result: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The signals of the weights a stage just trained, and what the stability policy makes of them."""
    rules = spec.policy
    measured: dict[str, Any] = {}
    task_after = None
    if before is not None:
        task_after = engine.task_drift(task, tree.store)
        measured.update(task_drift_columns(before, task_after))
    reference = engine.reference_drift(tree.store) if policy.needs(rules, "reference") else None
    accuracy = base_accuracy = None
    if spec.monitoring.reference_accuracy or policy.needs(rules, "accuracy"):
        measured.update(reference_accuracy_columns(engine.reference_accuracy(), engine.reference_accuracy(base=True)))
        accuracy, base_accuracy = measured["reference_accuracy"], measured["base_reference_accuracy"]
    signals = policy.Signals(reference, task_after, accuracy, base_accuracy)
    interventions = list(result.interventions) + policy.crossings(
        rules, signals, stage=step, actions=("alert", "stop", "revert"))
    return measured, interventions


def task_drift_columns(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The new-task drift signal as stability columns: KL to base on the stage's own prompts, after and before."""
    out: dict[str, Any] = {"task_drift_examples": after.get("num_reference_examples")}
    for key in ("kl_to_base_mean", "kl_to_base_p95", "entropy_delta_mean", "margin_delta_mean"):
        out[f"task_{key}"] = after.get(key)
    for key in ("kl_to_base_mean", "kl_to_base_p95"):
        out[f"task_{key}_before"] = before.get(key)
    return out


__all__ = [
    "BaseEvalCache", "CheckpointEvaluator", "EvalProgress", "Measurement", "ResultsTree", "RunHooks", "TaskResult",
    "base_runs_missing", "commit_base", "commit_stage", "expected_records", "measure", "stage_tasks",
    "task_drift_columns", "train_run",
]
