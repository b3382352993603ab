"""The trainer's one RQ job: train one run (order, seed) of an experiment, stage after stage.

``train_run`` resumes from the store (the source of truth), so a job re-run after a crash
continues exactly where the last *published* stage left off and trains bit-identically to
``slmcl run``: the same ``Engine.train`` call, with per-stage seeding inside it.

Per stage k, in this order (the record is the commit point, the event only announces it):

1. the adapter  ``experiments/<id>/checkpoints/<run_id>/step-<k>/``  is uploaded;
2. the record   ``experiments/<id>/runs/<run_id>/trained-<k>.json``  is written;
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
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from service_common import keys
from service_common.datasets import localize
from service_common.s3_store import S3Store
from service_common.settings import Settings
from slmcl.models.engine import Engine
from slmcl.errors import CancelledError, SlmclError
from slmcl.protocol.results import checkpoint_prefix
from slmcl.protocol.results import run_id as make_run_id
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.storage.local import ArtifactStore, get_dir, put_dir

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
        "checkpoint": checkpoint_prefix(run_id, step),
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
# Resume.


def last_done_stage(store: ArtifactStore, exp_prefix: str, run_id: str, n_stages: int) -> int:
    """The highest k whose adapter (config + weights) and trained-k.json are both in the store; 0 if none."""
    run_keys = set(store.list_keys(f"{exp_prefix}/runs/{run_id}"))
    ckpt_keys = set(store.list_keys(f"{exp_prefix}/checkpoints/{run_id}"))
    for k in range(n_stages, 0, -1):
        ckpt = f"{exp_prefix}/{checkpoint_prefix(run_id, k)}"
        if (f"{exp_prefix}/{keys.trained_key(run_id, k)}" in run_keys
                and f"{ckpt}/adapter_model.safetensors" in ckpt_keys
                and f"{ckpt}/adapter_config.json" in ckpt_keys):
            return k
    return 0


def load_spec(store: ArtifactStore, settings: Settings, experiment_id: str) -> ExperimentSpec:
    raw = json.loads(store.get_bytes(f"{keys.experiment_prefix(experiment_id)}/spec.json"))
    spec = spec_from_dict(raw, check_files=False, source=f"experiments/{experiment_id}/spec.json")
    if settings.device != "auto":  # the worker's hardware decides (SLMCL_DEVICE)
        spec = dataclasses.replace(spec, device=settings.device)
    return localize(spec, store, settings.work_dir)


def _retries_left() -> int:
    from rq import get_current_job

    job = get_current_job()
    return int(job.retries_left or 0) if job is not None else 0


# ---------------------------------------------------------------------------------------
# The job.


def train_run(experiment_id: str, order: list[str], seed: int) -> dict[str, Any]:
    """RQ job (JSON arguments): train the run (order, seed) of an experiment, resuming from the store."""
    settings = Settings()
    order, seed = [str(t) for t in order], int(seed)
    rid = make_run_id(order, seed)
    r = redis.Redis.from_url(settings.redis_url)
    events = RunEvents(r, experiment_id, rid)
    try:
        return _train_run(settings, r, events, experiment_id, order, seed, rid)
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
               seed: int, rid: str) -> dict[str, Any]:
    t_job = time.perf_counter()
    _check_stop(r, experiment_id)
    store = S3Store.from_settings(settings)
    exp = keys.experiment_prefix(experiment_id)
    spec = load_spec(store, settings, experiment_id)
    tasks = [spec.task(name) for name in order]  # SpecError on an unknown task, before the model loads
    engine, load_seconds = resident_engine(spec)

    done = last_done_stage(store, exp, rid, len(order))
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=settings.work_dir, prefix=f"train-{rid}-"))
    try:
        # Exactly runner.py's sequence: fresh adapter for the seed, then the last checkpoint if resuming.
        engine.reset_adapter(seed)
        strategy_state: dict[str, Any] = {}
        if 0 < done < len(order):
            engine.load_adapter(get_dir(store, f"{exp}/{checkpoint_prefix(rid, done)}", work / f"resume-{done}"))
            prev = json.loads(store.get_bytes(f"{exp}/{keys.trained_key(rid, done)}"))
            strategy_state = dict(prev.get("train", {}).get("strategy_state", {}))
        for k in range(1, done + 1):  # a crash between record and notice lost at most the last one
            if publish_stage(r, experiment_id, rid, order, seed, k):
                log.info("%s: re-announced stage %d (its notice was lost)", rid, k)
        events.publish("run_started", {"order": order, "seed": seed, "resumed_from": done,
                                       "stages": len(order), "model_load_seconds": load_seconds}, step=done)
        if done:
            log.info("%s: stages 1..%d already trained, resuming at %d", rid, done, done + 1)

        trained_steps = []
        for step in range(done + 1, len(order) + 1):
            _check_stop(r, experiment_id)
            task = tasks[step - 1]
            events.step, events.task = step, task.name
            t0 = time.perf_counter()
            last_sent = [0.0]

            def on_step(info: dict[str, Any], _step: int = step) -> None:
                now = time.monotonic()
                if now - last_sent[0] >= STEP_EVENT_INTERVAL or info.get("step") == info.get("total_steps"):
                    last_sent[0] = now
                    try:
                        events.publish("train_step", {k: info.get(k) for k in (
                            "step", "total_steps", "loss", "examples_per_s", "tokens_per_s")})
                    except redis.RedisError:  # progress is best effort; a lost Redis also stops heartbeats
                        log.warning("train_step event not published", exc_info=True)
                _check_stop(r, experiment_id)

            trained = engine.train(run_id=rid, seed=seed, stage=step, task=task, previous_tasks=order[: step - 1],
                                   strategy_state=strategy_state, on_step=on_step)
            strategy_state = dict(trained.strategy_state)
            train_seconds = time.perf_counter() - t0

            # 1. adapter, 2. record (the commit point), 3. notice.
            ckpt = checkpoint_prefix(rid, step)
            local = engine.save_adapter(work / f"step-{step}")
            put_dir(store, f"{exp}/{ckpt}", local)
            shutil.rmtree(local, ignore_errors=True)
            record = {
                "run_id": rid, "order": order, "seed": seed, "step": step, "task": task.name, "checkpoint": ckpt,
                "train": {"steps": [s.__dict__ for s in trained.steps], "examples": trained.examples,
                          "tokens": trained.tokens, "padded_fraction": trained.padded_fraction,
                          "seconds": trained.seconds, "strategy_state": trained.strategy_state},
            }
            store.put_bytes(f"{exp}/{keys.trained_key(rid, step)}",
                            json.dumps(record, sort_keys=True, indent=1, allow_nan=False).encode())
            publish_stage(r, experiment_id, rid, order, seed, step)
            final_loss = trained.steps[-1].loss if trained.steps else None
            events.publish("stage_trained", {"train_seconds": train_seconds, "final_loss": final_loss,
                                             "steps": len(trained.steps), "examples": trained.examples,
                                             "tokens": trained.tokens, "checkpoint": ckpt,
                                             "seconds": time.perf_counter() - t0})
            log.info("%s: stage %d (%s) trained in %.1f s, final loss %s", rid, step, task.name, train_seconds,
                     f"{final_loss:.4f}" if final_loss is not None else "n/a")
            trained_steps.append(step)

        seconds = time.perf_counter() - t_job
        events.publish("run_done", {"stages": len(order), "trained": trained_steps, "resumed_from": done,
                                    "seconds": seconds}, step=len(order), task=order[-1] if order else "")
        return {"experiment_id": experiment_id, "run_id": rid, "resumed_from": done, "trained": trained_steps,
                "stages": len(order), "seconds": seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)
