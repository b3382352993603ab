"""The trainer's one RQ job: train one run (order, seed) of an experiment, stage after stage.

The training loop, the resume rule and the records are the core's stage protocol
(``slmcl.protocol.stages.train_run``), the same call ``slmcl run`` makes, so a job re-run after a
crash continues after the last trained stage and trains bit-identically to the embedded mode.
This module adds what a worker needs around it: the resident model, cancellation and shutdown
checks, progress events, and the notice that announces each trained stage to the monitor:

1. the adapter and 2. the training record are written by the protocol;
3. the notice   ``XADD slmcl:stage-events``  is published, at most once per (experiment, run, k)
   (an atomic script sets ``slmcl:stage-published:<id>`` with it), so a resumed job republishes
   only a notice that a crash between 2 and 3 lost, and a duplicate job never announces twice.

Progress goes to ``slmcl:events:<id>`` (kinds: run_started, train_step, stage_trained, run_done,
run_failed, run_cancelled, run_interrupted).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import redis

from service_common import keys
from service_common.datasets import localize
from service_common.redis_conn import redis_from_url
from service_common.settings import Settings
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.errors import CancelledError, SlmclError
from slmcl.models.engine import Engine
from slmcl.protocol import layout
from slmcl.protocol import stages as protocol
from slmcl.protocol.records import TrainedStage
from slmcl.protocol.stages import ResultsTree, RunHooks
from slmcl.storage.base import ArtifactStore
from slmcl.storage.factory import open_store
from slmcl.storage.prefixed import PrefixedStore

log = logging.getLogger("trainer_service")

EVENTS_MAXLEN = 100_000  # approximate trim of each experiment's event stream
STEP_EVENT_INTERVAL = 0.5  # s: at most ~2 train_step events per second per run
STAGE_MARKER_TTL = 30 * 24 * 3600  # the "announced" hash outlives any run by far


class WorkerShutdown(Exception):
    """The worker got SIGTERM: the job stops at the next step and goes back to the queue.

    Deliberately not a ``SlmclError``: the worker requeues the job without spending one of its retries.
    """


# Set by the worker's SIGTERM handler; checked at every optimizer step and between stages.
shutdown_requested = threading.Event()


# ---------------------------------------------------------------------------------------
# The resident engine: one base model per worker process, reused by every job.

_engine: Engine | None = None
_engine_key: str | None = None
_engine_lock = threading.Lock()


def resident_engine(spec: ExperimentSpec) -> tuple[Engine, float]:
    """The process's Engine for this spec (loaded once per base model / LoRA shape); returns (engine, load seconds)."""
    global _engine, _engine_key
    key = Engine.resident_key(spec)
    with _engine_lock:
        if _engine is not None and _engine_key == key:
            _engine.use_spec(spec)
            return _engine, 0.0
        if _engine is not None:  # another base: free the old one before loading (one model per GPU)
            log.info("switching resident model to %s", spec.model.name)
            _engine = _engine_key = None
            gc.collect()
            _empty_cuda_cache()
        t0 = time.perf_counter()
        engine = Engine(spec)
        _engine, _engine_key = engine, key
        seconds = time.perf_counter() - t0
        log.info("loaded %s on %s in %.1f s", spec.model.name, engine.loaded.device, seconds)
        return engine, seconds


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Events.


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become null, so every data_json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class RunEvents:
    """XADD progress of one run to ``slmcl:events:<id>``; the current stage/task ride along by default."""

    def __init__(self, r: redis.Redis, experiment_id: str, run_id: str) -> None:
        self.r = r
        self.stream = keys.events_stream(experiment_id)
        self.run_id = run_id
        self.step = 0
        self.task = ""

    def publish(self, kind: str, data: dict[str, Any] | None = None, *, step: int | None = None,
                task: str | None = None) -> None:
        self.r.xadd(self.stream, {
            "kind": kind,
            "run_id": self.run_id,
            "step": str(self.step if step is None else step),
            "task": self.task if task is None else task,
            "data_json": json.dumps(_json_safe(data or {}), allow_nan=False, sort_keys=True),
            "time": f"{time.time():.3f}",
        }, maxlen=EVENTS_MAXLEN, approximate=True)


# KEYS[1] the "announced" hash, KEYS[2] the stage stream; ARGV: field, ttl, then stream field/value pairs.
_PUBLISH_STAGE_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], '') == 0 then
  return false
end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HSET', KEYS[1], ARGV[1], id)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return id
"""


def publish_stage(r: redis.Redis, experiment_id: str, run_id: str, order: list[str], seed: int,
                  step: int) -> str | None:
    """Announce "stage k of this run is trained" on the stage stream, once ever; returns the entry id or None."""
    fields = {
        "experiment_id": experiment_id,
        "run_id": run_id,
        "step": str(step),
        "task": order[step - 1],
        "order": json.dumps(order),
        "seed": str(seed),
        "checkpoint": layout.checkpoint_prefix(run_id, step),
    }
    flat = [x for kv in fields.items() for x in kv]
    out = r.eval(_PUBLISH_STAGE_ONCE, 2, keys.stage_published_key(experiment_id), keys.STAGE_EVENTS_STREAM,
                 f"{run_id}/{step}", STAGE_MARKER_TTL, *flat)
    return out.decode() if isinstance(out, bytes) else out


def _cancelled(r: redis.Redis, experiment_id: str) -> bool:
    return bool(r.exists(keys.cancel_key(experiment_id)))


def _check_stop(r: redis.Redis, experiment_id: str) -> None:
    if shutdown_requested.is_set():
        raise WorkerShutdown("worker shutting down: the run goes back to the queue")
    if _cancelled(r, experiment_id):
        raise CancelledError(f"experiment {experiment_id} was cancelled")


# ---------------------------------------------------------------------------------------
# The spec of an experiment, as this worker runs it.


def load_spec(store: ArtifactStore, settings: Settings, experiment_id: str) -> ExperimentSpec:
    from service_common.auth import check_model  # the model policy (docs/security.md)

    raw = json.loads(store.get_bytes(f"{layout.experiment_prefix(experiment_id)}/{layout.SPEC_JSON}"))
    spec = spec_from_dict(raw, check_files=False, source=f"experiments/{experiment_id}/spec.json")
    for model in spec.models:  # again here: a spec already in the store never made this worker run a model's code
        check_model(model)
    if settings.device != "auto":  # the worker's hardware decides (SLMCL_DEVICE)
        spec = dataclasses.replace(spec, device=settings.device)
    return localize(spec, store, settings.work_dir)


def _retries_left() -> int:
    from rq import get_current_job

    job = get_current_job()
    return int(job.retries_left or 0) if job is not None else 0


# ---------------------------------------------------------------------------------------
# The job.


def train_run(experiment_id: str, order: list[str], seed: int, strategy: str = layout.DEFAULT_STRATEGY,
              model: str = "") -> dict[str, Any]:
    """RQ job (JSON arguments): train the run (order, seed, strategy, model) of an experiment, resuming from
    the store; ``model`` is the label of the spec's models entry ("" in a one-model experiment)."""
    settings = Settings()
    order, seed, strategy, model = [str(t) for t in order], int(seed), str(strategy), str(model)
    rid = layout.run_id(order, seed, strategy, model)
    r = redis_from_url(settings.redis_url)  # waits out a Redis restart (SLMCL_RETRY_BUDGET_SECONDS)
    events = RunEvents(r, experiment_id, rid)
    try:
        return _train_run(settings, r, events, experiment_id, order, seed, strategy, rid, model)
    except CancelledError as exc:
        _publish_quietly(events, "run_cancelled", {"reason": str(exc)})
        raise
    except WorkerShutdown as exc:
        _publish_quietly(events, "run_interrupted", {"reason": str(exc), "requeued": True})
        raise
    except Exception as exc:
        will_retry = not isinstance(exc, SlmclError) and _retries_left() > 0
        _publish_quietly(events, "run_failed", {"error": str(exc) or type(exc).__name__,
                                                "error_type": type(exc).__name__, "will_retry": will_retry})
        raise
    finally:
        r.close()


def _publish_quietly(events: RunEvents, kind: str, data: dict[str, Any]) -> None:
    try:
        events.publish(kind, data)
    except redis.RedisError:
        log.warning("could not publish %s for %s", kind, events.run_id, exc_info=True)


def _train_run(settings: Settings, r: redis.Redis, events: RunEvents, experiment_id: str, order: list[str],
               seed: int, strategy: str, rid: str, model: str = "") -> dict[str, Any]:
    t_job = time.perf_counter()
    _check_stop(r, experiment_id)
    store = open_store(settings.store_url)
    tree = ResultsTree(PrefixedStore(store, layout.experiment_prefix(experiment_id)))
    spec = load_spec(store, settings, experiment_id).for_model(model)  # SpecError on an unknown model
    for name in order:
        spec.task(name)  # SpecError on an unknown task, before the model loads
    spec.strategy_entry(strategy)  # and on an unknown strategy entry
    engine, load_seconds = resident_engine(spec)
    _check_stop(r, experiment_id)  # a cancel during the model load stops before the first step
    resumed_from = tree.last_trained(rid, len(order))
    events.publish("run_started", {"order": order, "seed": seed, "resumed_from": resumed_from,
                                   "stages": len(order), "model_load_seconds": load_seconds}, step=resumed_from)
    if resumed_from:
        log.info("%s: stages 1..%d already trained, resuming at %d", rid, resumed_from, resumed_from + 1)
    last_sent = [0.0]
    stage_t0 = [time.perf_counter()]

    def on_stage_start(step: int, task: str) -> None:
        events.step, events.task = step, task
        stage_t0[0] = time.perf_counter()

    def on_step(step: int, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last_sent[0] >= STEP_EVENT_INTERVAL or info.get("step") == info.get("total_steps"):
            last_sent[0] = now
            try:
                events.publish("train_step", {k: info.get(k) for k in (
                    "step", "total_steps", "loss", "examples_per_s", "tokens_per_s")})
            except redis.RedisError:  # progress is best effort; a lost Redis also stops heartbeats
                log.warning("train_step event not published", exc_info=True)
        _check_stop(r, experiment_id)

    def on_trained(trained: TrainedStage, resumed: bool) -> None:
        # The record is the commit point of training; the notice only announces it, once ever
        # (a crash between the two lost at most the last notice: a resumed run re-announces).
        announced = publish_stage(r, experiment_id, rid, order, seed, trained.step)
        if resumed:
            if announced:
                log.info("%s: re-announced stage %d (its notice was lost)", rid, trained.step)
            return
        for record in trained.interventions:  # the stability policy acted: say so before anything else
            events.publish("intervention", record, step=trained.step, task=trained.task)
        train_seconds = float(trained.train.get("seconds", 0.0))
        events.publish("stage_trained", {"train_seconds": train_seconds, "final_loss": trained.final_loss,
                                         "steps": len(trained.train.get("steps", [])),
                                         "examples": trained.train.get("examples"),
                                         "tokens": trained.train.get("tokens"), "checkpoint": trained.checkpoint,
                                         "seconds": time.perf_counter() - stage_t0[0]})
        log.info("%s: stage %d (%s) trained in %.1f s, final loss %s", rid, trained.step, trained.task,
                 train_seconds, f"{trained.final_loss:.4f}" if trained.final_loss is not None else "n/a")

    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    trained_steps = protocol.train_run(
        engine, tree, spec, order, seed, strategy=strategy, scratch=Path(settings.work_dir),
        hooks=RunHooks(on_stage_start=on_stage_start, on_step=on_step, on_trained=on_trained,
                       check_stop=lambda: _check_stop(r, experiment_id)))
    seconds = time.perf_counter() - t_job
    events.publish("run_done", {"stages": len(order), "trained": trained_steps, "resumed_from": resumed_from,
                                "seconds": seconds}, step=len(order), task=order[-1] if order else "")
    return {"experiment_id": experiment_id, "run_id": rid, "resumed_from": resumed_from, "trained": trained_steps,
            "stages": len(order), "seconds": seconds}
