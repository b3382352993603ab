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

import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from monitor_service.evaluators import EvaluatorPool
from monitor_service.stages import MAX_REQUESTS_IN_FLIGHT, BaseRowsCache, RemoteEvaluator
from service_common import keys
from service_common.datasets import map_paths, parse_spec_json, sha256_hex, spec_paths
from service_common.run_queue import enqueue_run
from service_common.settings import Settings
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.errors import DataError, NotFoundError, SpecError
from slmcl.protocol import layout
from slmcl.protocol.layout import run_id
from slmcl.protocol.stages import (
    ResultsTree,
    base_runs_missing,
    commit_base,
    commit_stage,
    expected_records,
    measure,
)
from slmcl.storage.local import ArtifactStore
from slmcl.storage.prefixed import PrefixedStore
from slmcl.tasks.data import load_examples

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
        # Stages commit on several threads; reading the records and writing the tables from them
        # must be one step, or a stale reader overwrites the final tables after experiment_done.
        self._tables_lock = threading.Lock()
        self._specs: dict[str, ExperimentSpec] = {}
        self._stop = threading.Event()
        # Stage handlers wait on evaluation requests, which run on their own executor: a backlog of
        # stages can never take the threads its own requests need (the pool decides how many run at once).
        self._stages = ThreadPoolExecutor(max_workers=settings.monitor_stage_workers, thread_name_prefix="stage")
        self._requests = ThreadPoolExecutor(max_workers=MAX_REQUESTS_IN_FLIGHT, thread_name_prefix="eval-request")
        self._base_rows = BaseRowsCache()
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
        uploads: list[tuple[str, bytes]] = []
        for field_name, path in spec_paths(spec):  # everything checked before anything is written
            if path.startswith(keys.STORE_PREFIX):
                if not self.store.exists(path[len(keys.STORE_PREFIX):]):
                    raise SpecError(f"{field_name}: {path} is not in the store")
                continue
            f = by_path.get(path)
            if f is None:
                raise SpecError(f"{field_name}: the file {path} was not sent with the spec (files)")
            self._check_dataset(field_name, f)
            key = layout.dataset_key(f.sha256)
            uploads.append((key, f.content))
            rewrite[path] = keys.STORE_PREFIX + key
        stored_spec = map_paths(spec, lambda p: rewrite.get(p, p))
        exp_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        if client_request_id and not self.redis.set(keys.request_key(client_request_id), exp_id, nx=True):
            return self.redis.get(keys.request_key(client_request_id)).decode()  # a concurrent twin won
        for key, content in uploads:
            if not self.store.exists(key):
                self.store.put_bytes(key, content)
        now = time.time()
        tree = self.tree(exp_id)
        tree.store.put_bytes(layout.SPEC_JSON, stored_spec.to_json().encode())
        tree.store.put_bytes(layout.EXPERIMENT_JSON, json.dumps(
            {"id": exp_id, "name": spec.name, "client_request_id": client_request_id, "created_at": now}).encode())
        self.redis.hset(keys.experiment_hash(exp_id), mapping={
            "state": "queued", "error": "", "name": spec.name, "model": spec.model.name, "created_at": now,
            "updated_at": now, "client_request_id": client_request_id})
        self.redis.zadd(keys.EXPERIMENTS_ZSET, {exp_id: now})
        self._specs[exp_id] = stored_spec
        self.event(exp_id, "experiment_started", data={"runs": len(spec.orders) * len(spec.seeds)})
        try:
            for order in stored_spec.orders:
                for seed in stored_spec.seeds:
                    enqueue_run(self.queue, exp_id, order, seed)
        except Exception as exc:  # never a phantom "queued" experiment: it failed, and says why
            log.exception("experiment %s: enqueueing its runs failed", exp_id)
            self._fail(exp_id, f"could not enqueue its runs: {type(exc).__name__}: {exc}")
            raise
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

    def spec(self, exp_id: str) -> ExperimentSpec:
        if exp_id not in self._specs:
            try:
                raw = json.loads(self.tree(exp_id).store.get_bytes(layout.SPEC_JSON))
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
        trained = {k[len("runs/"):] for k in self.tree(exp_id).store.list_keys(layout.runs_prefix())}  # "<run_id>/trained-<k>.json", ...
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

    # ------------------------------------------------------------------ measuring and committing
    def tree(self, exp_id: str) -> ResultsTree:
        return ResultsTree(PrefixedStore(self.store, layout.experiment_prefix(exp_id)))

    def _evaluator(self, exp_id: str, spec: ExperimentSpec) -> RemoteEvaluator:
        def on_served(replicas: list[str]) -> None:
            self.redis.hincrby("slmcl:replica-requests", ",".join(replicas), 1)
            for rep in replicas:
                self.redis.hincrby("slmcl:replica-served", rep, 1)

        return RemoteEvaluator(self.pool, self._requests, exp_id, spec, self.settings.eval_shards_per_task,
                               base_rows=lambda: self._base_rows.get(exp_id), on_served=on_served)

    def _progress(self, exp_id: str, rid: str, step: int) -> Any:
        def cb(task: str, done: int, total: int) -> None:
            self.event(exp_id, "eval_progress", rid, step, task, {"done": done, "total": total})
        return cb

    def _base_stage(self, exp_id: str) -> None:
        """Stage 0 of every run: the base evaluated (cached by the evaluators) and its drift rows."""
        spec, tree = self.spec(exp_id), self.tree(exp_id)
        if not base_runs_missing(tree, spec):
            return
        evaluator = self._evaluator(exp_id, spec)
        m = measure(evaluator, None, spec.tasks, self._progress(exp_id, "", 0))
        for r in m.results:
            self.event(exp_id, "base_evaluated", task=r.task, data=r.score)
        for rid in commit_base(tree, spec, m):
            self._stage_committed(exp_id, rid, 0, "base", m.scores, m.stability)
        self._maybe_finish(exp_id)

    def process_stage(self, fields: dict[str, str]) -> None:
        """One announced stage: measure its checkpoint on the evaluators and commit its record (once)."""
        exp_id, rid, step = fields["experiment_id"], fields["run_id"], int(fields["step"])
        if not self.exists(exp_id) or self.state(exp_id) in TERMINAL:
            return
        spec, tree = self.spec(exp_id), self.tree(exp_id)
        if tree.is_committed(rid, step):
            return  # already committed (a redelivered event)
        trained = tree.read_trained(rid, step)
        self.redis.hset(keys.experiment_hash(exp_id), f"run:{rid}:state", "training")
        if self._base_rows.get(exp_id) is None:  # the base's rows, once per experiment (deltas need them)
            self._base_rows.put(exp_id, self._evaluator(exp_id, spec).drift_rows(None))
        m = measure(self._evaluator(exp_id, spec), trained.checkpoint, spec.tasks, self._progress(exp_id, rid, step))
        if self.state(exp_id) in TERMINAL:
            return  # cancelled or failed while it was measured: nothing is committed after the end
        rec = commit_stage(tree, spec, trained, m)
        self._stage_committed(exp_id, rid, step, rec.checkpoint_task, m.scores, m.stability)
        if step == len(trained.order):
            self.redis.hset(keys.experiment_hash(exp_id), f"run:{rid}:state", "done")
        self._maybe_finish(exp_id)

    def _stage_committed(self, exp_id: str, rid: str, step: int, task: str, scores: dict[str, Any],
                         stab: dict[str, Any]) -> None:
        self.event(exp_id, "stage_done", rid, step, task, {"scores": scores, "stability": stab})

    def _maybe_finish(self, exp_id: str) -> None:
        spec, tree = self.spec(exp_id), self.tree(exp_id)
        with self._tables_lock:
            records = tree.write_tables()
            if len(records) >= expected_records(spec) and self.state(exp_id) == "running":
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
        # Experiments whose base stage did not finish before a restart (_base_stage returns at once when it did);
        # one experiment that cannot be read fails alone, never the monitor.
        for exp_id in self.list_ids():
            if self.state(exp_id) == "running":
                threading.Thread(target=self._guard, args=(exp_id, self._base_stage, exp_id), daemon=True,
                                 name=f"base-{exp_id}").start()

    def stop(self) -> None:
        self._stop.set()
        self._stages.shutdown(wait=False, cancel_futures=True)
        self._requests.shutdown(wait=False, cancel_futures=True)

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


__all__ = ["Control", "SubmittedFile", "TERMINAL"]
