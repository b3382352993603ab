"""The control plane: accept experiments, drive them to the end, keep their results.

Training runs on the trainer workers (one RQ job per run); each trained stage arrives as
an entry of the ``slmcl:stage-events`` stream (a consumer group, so an entry not yet
acknowledged is processed again after a monitor restart). For each one the monitor fans
the checkpoint's tasks out over the evaluator pool while the trainer goes on with the
next stage, measures drift against the cached base distributions, and commits the same
stage record that ``slmcl run`` writes. The object store holds every result; Redis holds
queues, live state and the event streams that ``slmcl watch`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from monitor_service.evaluators import EvaluatorPool
from service_common import keys
from service_common.datasets import localize, map_paths, parse_spec_json, sha256_hex, spec_paths
from service_common.s3_store import PrefixedStore
from service_common.settings import Settings
from slmcl.tasks.data import load_examples
from slmcl.models.engine import Engine
from slmcl.errors import DataError, NotFoundError, SpecError
from slmcl.protocol.results import (
    StageRecord,
    checkpoint_prefix,
    predictions_key,
    read_stages,
    run_id,
    stage_key,
    write_predictions,
    write_stage,
    write_tables,
)
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.storage.local import ArtifactStore, get_dir
from slmcl_api.v1 import evaluator_pb2

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class SubmittedFile:
    path: str
    content: bytes
    sha256: str


class Control:
    def __init__(self, settings: Settings, store: ArtifactStore, r: redis.Redis, pool: EvaluatorPool) -> None:
        self.settings = settings
        self.store = store
        self.redis = r
        self.pool = pool
        self.queue = Queue(settings.queue, connection=r, serializer=JSONSerializer)
        self._engines: dict[str, Engine] = {}
        self._engine_lock = threading.Lock()
        # Stages commit on several threads; reading the records and writing the tables from them
        # must be one step, or a stale reader overwrites the final tables after experiment_done.
        self._tables_lock = threading.Lock()
        self._specs: dict[str, ExperimentSpec] = {}
        self._stop = threading.Event()
        self._stages = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stage")
        self._threads: list[threading.Thread] = []
        self.consumer = f"monitor-{socket.gethostname()}"

    # ------------------------------------------------------------------ submit / read
    def submit(self, spec_json: str, files: Sequence[SubmittedFile], client_request_id: str) -> str:
        if client_request_id:
            existing = self.redis.get(keys.request_key(client_request_id))
            if existing:
                return existing.decode()
        spec = parse_spec_json(spec_json)
        by_path = {f.path: f for f in files}
        for f in files:
            if sha256_hex(f.content) != f.sha256:
                raise DataError(f"files: content of {f.path} does not match its sha256")
        rewrite: dict[str, str] = {}
        for field_name, path in spec_paths(spec):
            if path.startswith(keys.STORE_PREFIX):
                if not self.store.exists(path[len(keys.STORE_PREFIX):]):
                    raise SpecError(f"{field_name}: {path} is not in the store")
                continue
            f = by_path.get(path)
            if f is None:
                raise SpecError(f"{field_name}: the file {path} was not sent with the spec (files)")
            self._check_dataset(field_name, f)
            key = keys.dataset_key(f.sha256)
            if not self.store.exists(key):
                self.store.put_bytes(key, f.content)
            rewrite[path] = keys.STORE_PREFIX + key
        stored_spec = map_paths(spec, lambda p: rewrite.get(p, p))
        exp_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        if client_request_id and not self.redis.set(keys.request_key(client_request_id), exp_id, nx=True):
            return self.redis.get(keys.request_key(client_request_id)).decode()  # a concurrent twin won
        now = time.time()
        prefix = keys.experiment_prefix(exp_id)
        self.store.put_bytes(f"{prefix}/spec.json", stored_spec.to_json().encode())
        self.store.put_bytes(f"{prefix}/experiment.json", json.dumps(
            {"id": exp_id, "name": spec.name, "client_request_id": client_request_id, "created_at": now}).encode())
        self.redis.hset(keys.experiment_hash(exp_id), mapping={
            "state": "queued", "error": "", "name": spec.name, "model": spec.model.name, "created_at": now,
            "updated_at": now, "client_request_id": client_request_id})
        self.redis.zadd(keys.EXPERIMENTS_ZSET, {exp_id: now})
        self._specs[exp_id] = stored_spec
        self.event(exp_id, "experiment_started", data={"runs": len(spec.orders) * len(spec.seeds)})
        for order in stored_spec.orders:
            for seed in stored_spec.seeds:
                self._enqueue(exp_id, order, seed)
        self._set_state(exp_id, "running")
        threading.Thread(target=self._guard, args=(exp_id, self._base_stage, exp_id), daemon=True,
                         name=f"base-{exp_id}").start()
        return exp_id

    @staticmethod
    def _check_dataset(field_name: str, f: SubmittedFile) -> None:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            tmp.write(f.content)
            tmp.flush()
            try:
                load_examples(tmp.name)
            except DataError as exc:
                raise DataError(f"{field_name} ({f.path}): {str(exc).split(': ', 1)[-1]}") from None

    def _enqueue(self, exp_id: str, order: list[str], seed: int) -> None:
        from trainer_service.enqueue import enqueue_run

        enqueue_run(self.queue, exp_id, order, seed)

    def spec(self, exp_id: str) -> ExperimentSpec:
        if exp_id not in self._specs:
            key = f"{keys.experiment_prefix(exp_id)}/spec.json"
            try:
                raw = json.loads(self.store.get_bytes(key))
            except NotFoundError:
                raise NotFoundError(f"no experiment {exp_id!r}") from None
            self._specs[exp_id] = spec_from_dict(raw, check_files=False)
        return self._specs[exp_id]

    def exists(self, exp_id: str) -> bool:
        return bool(self.redis.exists(keys.experiment_hash(exp_id)))

    def experiment(self, exp_id: str) -> dict[str, Any]:
        h = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.experiment_hash(exp_id)).items()}
        if not h:
            raise NotFoundError(f"no experiment {exp_id!r}")
        spec = self.spec(exp_id)
        results = PrefixedStore(self.store, keys.experiment_prefix(exp_id))
        trained = {k[len("runs/"):] for k in results.list_keys("runs")}  # "<run_id>/trained-<k>.json", ...
        runs = []
        for order in spec.orders:
            for seed in spec.seeds:
                rid = run_id(order, seed)
                n_trained = sum(1 for k in range(1, len(order) + 1) if f"{rid}/trained-{k}.json" in trained)
                n_done = sum(1 for k in range(1, len(order) + 1) if f"{rid}/stage-{k}.json" in trained)
                state = h.get(f"run:{rid}:state", "queued")
                runs.append({"run_id": rid, "order": order, "seed": seed, "stages_total": len(order),
                             "stages_trained": n_trained, "stages_evaluated": n_done, "state": state,
                             "error": h.get(f"run:{rid}:error", "")})
        return {"id": exp_id, "name": h.get("name", ""), "state": h.get("state", ""), "model": h.get("model", ""),
                "error": h.get("error", ""), "created_at": float(h.get("created_at", 0)),
                "updated_at": float(h.get("updated_at", 0)), "client_request_id": h.get("client_request_id", ""),
                "runs": runs}

    def list_ids(self) -> list[str]:
        return [x.decode() for x in self.redis.zrange(keys.EXPERIMENTS_ZSET, 0, -1)]

    # ------------------------------------------------------------------ state & events
    def _set_state(self, exp_id: str, state: str, error: str = "") -> None:
        fields: dict[str, Any] = {"state": state, "updated_at": time.time()}
        if error:
            fields["error"] = error
        self.redis.hset(keys.experiment_hash(exp_id), mapping=fields)

    def state(self, exp_id: str) -> str:
        s = self.redis.hget(keys.experiment_hash(exp_id), "state")
        return s.decode() if s else ""

    def event(self, exp_id: str, kind: str, run: str = "", step: int = 0, task: str = "",
              data: dict[str, Any] | None = None) -> None:
        self.redis.xadd(keys.events_stream(exp_id), {
            "kind": kind, "run_id": run, "step": str(step), "task": task,
            "data_json": json.dumps(data or {}), "time": repr(time.time())}, maxlen=100_000, approximate=True)

    def events(self, exp_id: str, after: str = "0-0", block_ms: int = 1000) -> Iterator[tuple[str, dict[str, str]]]:
        """Replay then follow the experiment's events until it ends and nothing is left."""
        if not self.exists(exp_id):
            raise NotFoundError(f"no experiment {exp_id!r}")
        last = after or "0-0"
        while not self._stop.is_set():
            terminal = self.state(exp_id) in TERMINAL
            got = self.redis.xread({keys.events_stream(exp_id): last}, count=500, block=None if terminal else block_ms)
            entries = got[0][1] if got else []
            for eid, fields in entries:
                last = eid.decode()
                yield last, {k.decode(): v.decode() for k, v in fields.items()}
            if terminal and not entries:
                return

    # ------------------------------------------------------------------ cancel
    def cancel(self, exp_id: str) -> None:
        if not self.exists(exp_id):
            raise NotFoundError(f"no experiment {exp_id!r}")
        if self.state(exp_id) in TERMINAL:
            return
        self.redis.set(keys.cancel_key(exp_id), "1")
        spec = self.spec(exp_id)
        for order in spec.orders:
            for seed in spec.seeds:
                try:
                    job = Job.fetch(keys.train_job_id(exp_id, run_id(order, seed)), connection=self.redis,
                                    serializer=JSONSerializer)
                except Exception:  # noqa: BLE001 - a job that is gone needs no cancelling
                    continue
                if job.get_status() in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                    job.cancel()
        self._set_state(exp_id, "cancelled")
        self.event(exp_id, "experiment_cancelled")

    # ------------------------------------------------------------------ engines
    def engine(self, spec: ExperimentSpec) -> Engine:
        """The monitor's resident model for drift (loaded once per base model and LoRA shape)."""
        if spec.device == "auto":
            spec = dataclasses.replace(spec, device=self.settings.device)
        key = Engine.resident_key(spec)
        if key not in self._engines:
            self._engines[key] = Engine(spec)
        engine = self._engines[key]
        engine.use_spec(spec)
        return engine

    def _local_spec(self, exp_id: str) -> ExperimentSpec:
        return localize(self.spec(exp_id), self.store, self.settings.work_dir)

    # ------------------------------------------------------------------ stage 0: the base
    def _base_stage(self, exp_id: str) -> None:
        """Base accuracy (on the evaluators, once per model/task data/decoding) and base drift."""
        spec = self._local_spec(exp_id)
        results = PrefixedStore(self.store, keys.experiment_prefix(exp_id))
        scores: dict[str, dict[str, Any]] = {}
        with self._engine_lock:
            eval_keys = {t.name: self.engine(spec).base_eval_key(t) for t in spec.tasks}
        futures = {}
        for task in spec.tasks:
            cache_key = f"cache/base-eval/{eval_keys[task.name]}.json"
            if self.store.exists(cache_key):
                cached = json.loads(self.store.get_bytes(cache_key))
                scores[task.name] = cached["score"]
                write_predictions(results, predictions_key("base", 0, task.name), cached["predictions"])
                continue
            futures[task.name] = self._stages.submit(self._evaluate_task, exp_id, "", task.name, "", 0)
        with self._engine_lock:  # p_0 while the evaluators work (a first experiment: nothing cached yet)
            base_stab = self.engine(spec).stability(self.store, base=True).as_dict()
        base_eval_seconds = 0.0
        for name, fut in futures.items():
            score, preds, seconds = fut.result()
            base_eval_seconds += seconds
            scores[name] = score
            write_predictions(results, predictions_key("base", 0, name), preds)
            self.store.put_bytes(f"cache/base-eval/{eval_keys[name]}.json",
                                 json.dumps({"score": score, "predictions": preds}).encode())
            self.event(exp_id, "base_evaluated", task=name, data=score)
        for order in spec.orders:
            for seed in spec.seeds:
                rid = run_id(order, seed)
                if not results.exists(stage_key(rid, 0)):
                    write_stage(results, StageRecord(rid, order, seed, 0, "base", spec.model.name, scores, base_stab,
                                                     timing={"eval_seconds": base_eval_seconds}))
                self._stage_committed(exp_id, rid, 0, "base", scores, base_stab)
        self._maybe_finish(exp_id)

    # ------------------------------------------------------------------ stages 1..K
    def _evaluate_task(self, exp_id: str, rid: str, task: str, ckpt: str, step: int
                       ) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        spec_json = self.spec(exp_id).to_json()
        shards = max(1, self.settings.eval_shards_per_task)
        prefix = f"{keys.experiment_prefix(exp_id)}/{ckpt}" if ckpt else ""

        def one(i: int) -> evaluator_pb2.EvaluateResult:
            def progress(done: int, total: int) -> None:
                self.event(exp_id, "eval_progress", rid, step, task, {"done": done, "total": total, "shard": i})

            req = evaluator_pb2.EvaluateRequest(experiment_id=exp_id, spec_json=spec_json, checkpoint_prefix=prefix,
                                                task=task, shard_index=i, shard_count=shards)
            return self.pool.evaluate(req, on_progress=progress)

        if shards == 1:
            parts = [one(0)]
        else:
            with ThreadPoolExecutor(max_workers=shards) as ex:
                parts = list(ex.map(one, range(shards)))
        correct = sum(p.score.correct for p in parts)
        total = sum(p.score.total for p in parts)
        preds = sorted((_pred_dict(x) for p in parts for x in p.predictions), key=lambda d: d["index"])
        self.redis.hincrby("slmcl:replica-requests", ",".join(sorted({p.replica_id for p in parts})), 1)
        for p in parts:
            self.redis.hincrby("slmcl:replica-served", p.replica_id, 1)
        score = {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}
        return score, preds, sum(p.seconds for p in parts)

    def process_stage(self, fields: dict[str, str]) -> None:
        exp_id, rid, step, task = fields["experiment_id"], fields["run_id"], int(fields["step"]), fields["task"]
        order, seed, ckpt = json.loads(fields["order"]), int(fields["seed"]), fields["checkpoint"]
        if not self.exists(exp_id) or self.state(exp_id) in ("cancelled", "failed"):
            return
        results = PrefixedStore(self.store, keys.experiment_prefix(exp_id))
        if results.exists(stage_key(rid, step)):
            return  # already committed (a redelivered event)
        spec = self._local_spec(exp_id)
        self.redis.hset(keys.experiment_hash(exp_id), f"run:{rid}:state", "training")
        futures = {t.name: self._stages.submit(self._evaluate_task, exp_id, rid, t.name, ckpt, step)
                   for t in spec.tasks}
        # Drift while the evaluators work: the adapter into the monitor's resident model.
        local = Path(self.settings.work_dir) / "adapters" / exp_id / ckpt
        if not (local / "adapter_model.safetensors").is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}-"))
            try:  # complete or absent: a crash mid-download leaves no half adapter behind
                get_dir(results, ckpt, tmp)
                shutil.rmtree(local, ignore_errors=True)
                os.rename(tmp, local)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        with self._engine_lock:
            t_stab = time.perf_counter()
            engine = self.engine(spec)
            engine.load_adapter(local)
            stab = engine.stability(self.store).as_dict()
            stab_seconds = time.perf_counter() - t_stab
        scores, eval_seconds = {}, 0.0
        for name, fut in futures.items():
            score, preds, seconds = fut.result()
            scores[name] = score
            eval_seconds += seconds
            write_predictions(results, predictions_key(rid, step, name), preds)
        trained = json.loads(results.get_bytes(keys.trained_key(rid, step)))
        train = trained.get("train", {})
        rec = StageRecord(rid, order, seed, step, task, spec.model.name, scores, stab, train=train,
                          checkpoint=checkpoint_prefix(rid, step),
                          timing={"train_seconds": float(train.get("seconds", 0.0)), "eval_seconds": eval_seconds,
                                  "stability_seconds": stab_seconds})
        write_stage(results, rec)
        self._stage_committed(exp_id, rid, step, task, scores, stab)
        if step == len(order):
            self.redis.hset(keys.experiment_hash(exp_id), f"run:{rid}:state", "done")
        self._maybe_finish(exp_id)

    def _stage_committed(self, exp_id: str, rid: str, step: int, task: str, scores: dict[str, Any],
                         stab: dict[str, Any]) -> None:
        self.event(exp_id, "stage_done", rid, step, task, {"scores": scores, "stability": stab})

    def _maybe_finish(self, exp_id: str) -> None:
        spec = self.spec(exp_id)
        results = PrefixedStore(self.store, keys.experiment_prefix(exp_id))
        expected = sum(len(o) + 1 for o in spec.orders) * len(spec.seeds)
        with self._tables_lock:
            records = read_stages(results)
            write_tables(results, records)
            if len(records) >= expected and self.state(exp_id) == "running":
                self._set_state(exp_id, "succeeded")
                self.event(exp_id, "experiment_done")

    def _fail(self, exp_id: str, message: str) -> None:
        if self.state(exp_id) in TERMINAL:
            return
        self._set_state(exp_id, "failed", message)
        self.event(exp_id, "experiment_failed", data={"error": message})

    def _guard(self, exp_id: str, fn: Any, *args: Any) -> None:
        """Run background work for an experiment; a failure fails the experiment, never silently."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - recorded on the experiment and logged
            log.exception("experiment %s: %s failed", exp_id, getattr(fn, "__name__", fn))
            self._fail(exp_id, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ background loops
    def start(self) -> None:
        try:
            self.redis.xgroup_create(keys.STAGE_EVENTS_STREAM, keys.MONITOR_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        for target, name in ((self._consume_stages, "stage-consumer"), (self._janitor, "janitor")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        # Experiments whose base stage did not finish before a restart.
        for exp_id in self.list_ids():
            if self.state(exp_id) == "running":
                spec = self.spec(exp_id)
                results = PrefixedStore(self.store, keys.experiment_prefix(exp_id))
                if not all(results.exists(stage_key(run_id(o, s), 0)) for o in spec.orders for s in spec.seeds):
                    threading.Thread(target=self._guard, args=(exp_id, self._base_stage, exp_id), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._stages.shutdown(wait=False, cancel_futures=True)

    def _consume_stages(self) -> None:
        backlog = True  # first our own unacknowledged entries (a restart), then new ones
        while not self._stop.is_set():
            try:
                got = self.redis.xreadgroup(keys.MONITOR_GROUP, self.consumer,
                                            {keys.STAGE_EVENTS_STREAM: "0" if backlog else ">"}, count=16, block=1000)
            except redis.ConnectionError:
                log.warning("redis unreachable; retrying")
                time.sleep(1)
                continue
            entries = got[0][1] if got else []
            if backlog and not entries:
                backlog = False
                continue
            for eid, raw in entries:
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                self._stages.submit(self._handle_stage_entry, eid, fields)
            if backlog:
                backlog = False  # the pending ones are dispatched; go on with new entries

    def _handle_stage_entry(self, eid: bytes, fields: dict[str, str]) -> None:
        exp_id = fields.get("experiment_id", "")
        try:
            self.process_stage(fields)
        except Exception as exc:  # noqa: BLE001 - recorded on the experiment
            log.exception("stage %s of %s failed", fields.get("step"), fields.get("run_id"))
            self._fail(exp_id, f"stage {fields.get('step')} of {fields.get('run_id')}: {type(exc).__name__}: {exc}")
        self.redis.xack(keys.STAGE_EVENTS_STREAM, keys.MONITOR_GROUP, eid)

    def _janitor(self) -> None:
        """Re-queue work of crashed trainers promptly, and fail experiments whose runs failed for good."""
        while not self._stop.wait(5.0):
            try:
                StartedJobRegistry(queue=self.queue).cleanup()
                for exp_id in self.list_ids():
                    if self.state(exp_id) == "running":
                        self._check_jobs(exp_id)
            except redis.ConnectionError:
                log.warning("redis unreachable; janitor retries")
            except Exception:  # noqa: BLE001 - the loop must survive; the error is logged
                log.exception("janitor pass failed")

    def _check_jobs(self, exp_id: str) -> None:
        spec = self.spec(exp_id)
        for order in spec.orders:
            for seed in spec.seeds:
                rid = run_id(order, seed)
                try:
                    job = Job.fetch(keys.train_job_id(exp_id, rid), connection=self.redis, serializer=JSONSerializer)
                except Exception:  # noqa: BLE001 - expired job data: nothing to check
                    continue
                if job.get_status() == JobStatus.FAILED:
                    result = job.latest_result()
                    reason = (result.exc_string or "").strip().splitlines()[-1:] if result else []
                    message = reason[0] if reason else "trainer job failed"
                    self.redis.hset(keys.experiment_hash(exp_id), mapping={f"run:{rid}:state": "failed",
                                                                           f"run:{rid}:error": message})
                    self._fail(exp_id, f"run {rid}: {message}")


def _pred_dict(p: Any) -> dict[str, Any]:
    return {"index": p.index, "prompt": p.prompt, "gold": p.gold, "gold_normalized": p.gold_normalized,
            "prediction": p.prediction, "raw_output": p.raw_output, "hit_max_tokens": p.hit_max_tokens,
            "correct": p.correct, "new_tokens": p.new_tokens}


__all__ = ["Control", "SubmittedFile", "TERMINAL"]
