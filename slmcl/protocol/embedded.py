"""The embedded mode: a whole experiment in one process, resumable, reporting progress.

For every (order, seed): stage 0 is the base, evaluated once per experiment and shared by
all runs; then for each task of the order, train the cumulative adapter, save the
checkpoint, evaluate every task, measure drift, and commit the stage record. Restarted
on the same output directory, it skips every committed stage and reloads the last
checkpoint, so nothing is recomputed and no row is written twice.

Progress goes to one callback as ``Event``s (plain JSON-able data), which a CLI draws as
bars, an RQ job forwards to Redis, or a gRPC stream sends on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmcl.tasks.data import load_examples
from slmcl.models.engine import Engine
from slmcl.errors import SpecError
from slmcl.protocol.results import (
    StageRecord,
    checkpoint_prefix,
    predictions_key,
    read_stages,
    run_id,
    write_predictions,
    write_stage,
    write_tables,
)
from slmcl.config.spec import ExperimentSpec
from slmcl.storage.local import LocalStore, get_dir


@dataclass(frozen=True)
class Event:
    kind: str  # experiment_started, model_loaded, base_eval, run_started, stage_started, train_step,
    #            eval_progress, stage_done, stage_skipped, run_done, experiment_done
    run_id: str = ""
    stage: int = 0
    task: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "run_id": self.run_id, "stage": self.stage, "task": self.task, "data": self.data}


ProgressCallback = Callable[[Event], None]

# Settings whose change makes old results incomparable; seeds, orders and names may grow.
_RESUME_IGNORED = ("name", "seeds", "orders", "output_dir", "device")


def _comparable(spec_dict: dict[str, Any]) -> dict[str, Any]:
    d = {k: v for k, v in spec_dict.items() if k not in _RESUME_IGNORED}
    d.get("evaluation", {}).pop("batch_size", None)
    d.get("reference", {}).pop("batch_size", None)
    d.get("training", {}).pop("tokens_per_forward", None)
    return d


def check_resumable(store: LocalStore, spec: ExperimentSpec) -> None:
    """Refuse to mix results of different settings in one output directory."""
    if not store.exists("spec.json"):
        return
    old = json.loads(store.get_bytes("spec.json"))
    if _comparable(old) != _comparable(spec.to_dict()):
        changed = sorted(k for k in set(_comparable(old)) | set(_comparable(spec.to_dict()))
                         if _comparable(old).get(k) != _comparable(spec.to_dict()).get(k))
        raise SpecError(
            f"output_dir {spec.output_dir} holds results of a different spec (changed: {', '.join(changed)}); "
            "use a new output_dir or delete the old one"
        )


class ExperimentRunner:
    def __init__(self, spec: ExperimentSpec, progress: ProgressCallback | None = None,
                 engine: Engine | None = None) -> None:
        self.spec = spec
        self.store = LocalStore(spec.output_dir)
        self.progress = progress or (lambda e: None)
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            t0 = time.perf_counter()
            self._engine = Engine(self.spec)
            self.progress(Event("model_loaded", data={"model": self.spec.model.name,
                                                      "device": str(self._engine.loaded.device),
                                                      "seconds": time.perf_counter() - t0}))
        return self._engine

    def preflight(self) -> None:
        """Read every data file before the model loads: a bad row fails in a second, not after an hour."""
        for task in self.spec.tasks:
            load_examples(task.train_file, limit=self.spec.training.max_examples)
            load_examples(task.test_file, limit=self.spec.evaluation.max_examples)
        load_examples(self.spec.reference.file, limit=self.spec.reference.max_examples)

    def run(self) -> Path:
        spec = self.spec
        check_resumable(self.store, spec)
        self.preflight()
        self.store.put_bytes("spec.json", json.dumps(spec.to_dict(), indent=1, sort_keys=True).encode())
        self.store.put_bytes("spec.yaml", spec.to_yaml().encode())
        runs = [(order, seed) for order in spec.orders for seed in spec.seeds]
        done = {(r.run_id, r.step) for r in read_stages(self.store)}
        total_stages = sum(len(o) for o, _ in runs)
        finished = sum(1 for o, s in runs for k in range(1, len(o) + 1) if (run_id(o, s), k) in done)
        self.progress(Event("experiment_started", data={"runs": len(runs), "stages": total_stages,
                                                        "stages_done": finished, "output_dir": spec.output_dir}))
        for order, seed in runs:
            self._run_sequence(order, seed, done)
        records = read_stages(self.store)
        write_tables(self.store, records)
        self.progress(Event("experiment_done", data={"output_dir": spec.output_dir}))
        return Path(spec.output_dir)

    # -- base (stage 0), shared by all runs ------------------------------------------------
    def _base_scores(self) -> dict[str, dict[str, Any]]:
        """Base accuracy per task: evaluated once per (model, task data, decoding) and cached."""
        scores: dict[str, dict[str, Any]] = {}
        engine = self.engine
        keys = {t.name: f"cache/base-eval/{engine.base_eval_key(t)}.json" for t in self.spec.tasks}
        missing = []
        for task in self.spec.tasks:
            if self.store.exists(keys[task.name]):
                scores[task.name] = json.loads(self.store.get_bytes(keys[task.name]))
            else:
                missing.append(task)
        if missing:
            evals = engine.evaluate_all(missing, base=True, on_progress=self._eval_progress("", 0))
            for ev in evals:
                write_predictions(self.store, predictions_key("base", 0, ev.task), [p.as_dict() for p in ev.predictions])
                scores[ev.task] = ev.score()
                self.store.put_bytes(keys[ev.task], json.dumps(scores[ev.task]).encode())
                self.progress(Event("base_eval", task=ev.task, data={
                    **scores[ev.task], "seconds": ev.seconds, "evaluated_with": [e.task for e in evals]}))
        return {t.name: scores[t.name] for t in self.spec.tasks}

    def _eval_progress(self, rid: str, stage: int) -> Callable[[str, int, int], None]:
        def cb(task: str, done: int, total: int) -> None:
            self.progress(Event("eval_progress", rid, stage, task, {"done": done, "total": total}))
        return cb

    # -- one run --------------------------------------------------------------------------
    def _run_sequence(self, order: list[str], seed: int, done: set[tuple[str, int]]) -> None:
        spec, rid = self.spec, run_id(order, seed)
        if all((rid, k) in done for k in range(0, len(order) + 1)):
            self.progress(Event("run_done", rid, data={"skipped": True}))
            return
        engine = self.engine
        self.progress(Event("run_started", rid, data={"order": order, "seed": seed}))
        if (rid, 0) not in done:
            base_stab = engine.stability(self.store, base=True)
            write_stage(self.store, StageRecord(rid, order, seed, 0, "base", spec.model.name,
                                                self._base_scores(), base_stab.as_dict()))
        engine.reset_adapter(seed)
        resumed_from = 0
        strategy_state: dict[str, Any] = {}
        for step, task_name in enumerate(order, start=1):
            if (rid, step) in done:
                resumed_from = step
                self.progress(Event("stage_skipped", rid, step, task_name))
                continue
            if resumed_from and resumed_from == step - 1:
                # Continue from the last committed checkpoint, exactly as if never interrupted.
                local = Path(spec.output_dir) / checkpoint_prefix(rid, resumed_from)
                engine.load_adapter(local if local.is_dir() else get_dir(self.store, checkpoint_prefix(rid, resumed_from),
                                                                          local))
                prev = json.loads(self.store.get_bytes(f"runs/{rid}/stage-{resumed_from}.json"))
                strategy_state = prev.get("train", {}).get("strategy_state", {})
            self._stage(order, seed, step, task_name, strategy_state)
        self.progress(Event("run_done", rid))

    def _stage(self, order: list[str], seed: int, step: int, task_name: str, strategy_state: dict[str, Any]) -> None:
        spec, engine, rid = self.spec, self.engine, run_id(order, seed)
        task = spec.task(task_name)
        self.progress(Event("stage_started", rid, step, task_name, {"order": order, "seed": seed}))
        t0 = time.perf_counter()

        def on_step(info: dict[str, Any]) -> None:
            self.progress(Event("train_step", rid, step, task_name, info))

        trained = engine.train(run_id=rid, seed=seed, stage=step, task=task, previous_tasks=order[: step - 1],
                               strategy_state=strategy_state, on_step=on_step)
        strategy_state.clear()
        strategy_state.update(trained.strategy_state)
        prefix = checkpoint_prefix(rid, step)
        engine.save_adapter(Path(spec.output_dir) / prefix)
        t_train = time.perf_counter() - t0
        scores: dict[str, dict[str, Any]] = {}
        t_eval = time.perf_counter()
        for ev in engine.evaluate_all(on_progress=self._eval_progress(rid, step)):
            write_predictions(self.store, predictions_key(rid, step, ev.task), [p.as_dict() for p in ev.predictions])
            scores[ev.task] = ev.score()
        eval_seconds = time.perf_counter() - t_eval
        t_stab = time.perf_counter()
        stab = engine.stability(self.store)
        timing = {"train_seconds": trained.seconds, "eval_seconds": eval_seconds,
                  "stability_seconds": time.perf_counter() - t_stab}
        rec = StageRecord(
            rid, order, seed, step, task_name, spec.model.name, scores, stab.as_dict(),
            train={"steps": [s.__dict__ for s in trained.steps], "examples": trained.examples,
                   "tokens": trained.tokens, "padded_fraction": trained.padded_fraction,
                   "seconds": trained.seconds, "strategy_state": trained.strategy_state},
            checkpoint=prefix,
            timing=timing,
        )
        write_stage(self.store, rec)  # the commit point of this stage
        write_tables(self.store, read_stages(self.store))
        self.progress(Event("stage_done", rid, step, task_name, {
            "scores": scores, "stability": stab.as_dict(), "train_seconds": t_train,
            "seconds": time.perf_counter() - t0, "final_loss": trained.steps[-1].loss if trained.steps else None}))


def run_experiment(spec: ExperimentSpec, progress: ProgressCallback | None = None) -> Path:
    """Run (or resume) an experiment; returns the results directory."""
    return ExperimentRunner(spec, progress).run()
