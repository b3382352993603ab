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

import io
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from monitor_service.evaluators import EvaluationFailed, EvaluationRejected, EvaluatorPool
from monitor_service.stages import MAX_REQUESTS_IN_FLIGHT, BaseRowsCache, RemoteEvaluator
from service_common import keys
from service_common.datasets import map_paths, parse_spec_json, sha256_hex, spec_paths
from service_common.redis_conn import HashFields, is_redis_outage, stream_entries, text, text_fields
from service_common.retry import RetryPolicy, call_with_retry
from service_common.run_queue import enqueue_run
from service_common.s3_store import is_transient as is_store_outage
from service_common.settings import Settings
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.errors import DataError, LimitExceededError, NotFoundError, SlmclError, SpecError
from slmcl.protocol import layout
from slmcl.protocol.records import StageRecord
from slmcl.protocol.runs import RunPlan, plan_runs, run_plan
from slmcl.protocol.stages import (
    ResultsTree,
    base_runs_missing,
    commit_base,
    commit_stage,
    expected_records,
    measure,
    stage_tasks,
)
from slmcl.protocol.tables import live_estimate
from slmcl.storage.local import ArtifactStore
from slmcl.storage.prefixed import PrefixedStore
from slmcl.tasks.data import scan_data
from slmcl.tracking import FAILED, KILLED, NullTracker, Tracker, check_tracking, open_tracker

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
PRIOR_PREFIX = "experiment:"  # evaluation.calibration_prior in the services: another experiment of the server
RESUMABLE = ("failed", "cancelled")
MLFLOW_MISSING = ("tracking.mlflow: this server's monitor cannot log to MLflow (the mlflow package is not installed "
                  "in its image: requirements-tracking.txt); remove tracking.mlflow from the spec, or ask the operator")
PENDING_SWEEP_SECONDS = 10.0  # how often stage notices left unacknowledged (an outage) are handled again


class NotResumableError(SlmclError):
    """Resume asked of an experiment that is not failed or cancelled (running, queued or succeeded)."""


def is_outage(exc: BaseException) -> bool:
    """A failure that waiting may cure: Redis or the store unreachable, no evaluator answering (an evaluator
    that answered by rejecting the request is no outage)."""
    return (is_redis_outage(exc) or is_store_outage(exc)
            or (isinstance(exc, EvaluationFailed) and not isinstance(exc, EvaluationRejected)))


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
        self.retry_policy = RetryPolicy.from_env()
        # Stage notices being handled (an entry is dispatched once at a time), and when each first met an outage.
        self._inflight: set[str] = set()
        self._outage_since: dict[str, float] = {}
        self._inflight_lock = threading.Lock()
        # One handler of a stage at a time (a notice and a resume may both bring it): [lock, handlers waiting or in].
        self._stage_locks: dict[tuple[str, str, int], list[Any]] = {}
        # Bumped by each resume: background work started before it (a base stage or a stage handler still
        # retrying an outage) must not fail the resumed experiment when it finally gives up.
        self._epochs: dict[str, int] = {}
        self._trackers: dict[str, Tracker] = {}  # per experiment: its syncs to the tracking server, serialized
        self._trackers_lock = threading.Lock()

    # ------------------------------------------------------------------ submit / read
    def submit(self, spec_json: str, files: Sequence[SubmittedFile], client_request_id: str) -> str:
        if client_request_id:
            existing = self.redis.get(keys.request_key(client_request_id))
            if existing:
                return text(existing)
        spec = parse_spec_json(spec_json)
        check_tracking(spec, MLFLOW_MISSING)
        limits = self.settings
        n_runs = len(plan_runs(spec))
        if n_runs > limits.max_runs_per_experiment:
            n_strategies = len(spec.strategies or [spec.strategy])
            raise LimitExceededError(
                f"strategies x orders x seeds: {n_strategies} x {len(spec.orders)} x {len(spec.seeds)} = {n_runs} "
                "runs, more than this server's "
                f"limit of {limits.max_runs_per_experiment} (SLMCL_MAX_RUNS_PER_EXPERIMENT)")
        ids = self.list_ids()
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.hget(keys.experiment_hash(i), "state")
        in_flight = sum(1 for st in pipe.execute() if st in (b"queued", b"running"))
        if in_flight >= limits.max_experiments_in_flight:  # soft: two submits racing may both pass
            raise LimitExceededError(
                f"{in_flight} experiments are queued or running, this server's limit "
                f"(SLMCL_MAX_EXPERIMENTS_IN_FLIGHT={limits.max_experiments_in_flight}); submit again when one ends")
        prior = spec.evaluation.calibration_prior
        if prior and not (prior.startswith(PRIOR_PREFIX) and self.exists(prior[len(PRIOR_PREFIX):])):
            raise SpecError(f"evaluation.calibration_prior: {prior!r} is not an experiment of this server; "
                            f"name one as {PRIOR_PREFIX}<id>")
        by_path = {f.path: f for f in files}
        for f in files:
            if len(f.content) > limits.max_dataset_bytes:
                raise LimitExceededError(
                    f"files: {f.path} is {len(f.content)} bytes, more than this server's limit of "
                    f"{limits.max_dataset_bytes} (SLMCL_MAX_DATASET_BYTES)")
            if sha256_hex(f.content) != f.sha256:
                raise DataError(f"files: content of {f.path} does not match its sha256")
        rewrite: dict[str, str] = {}
        uploads: list[tuple[str, bytes]] = []
        for field_name, path in spec_paths(spec):  # everything checked before anything is written
            if path.startswith(keys.STORE_PREFIX):
                if not self.store.exists(path[len(keys.STORE_PREFIX):]):
                    raise SpecError(f"{field_name}: {path} is not in the store")
                continue
            sent = by_path.get(path)
            if sent is None:
                raise SpecError(f"{field_name}: the file {path} was not sent with the spec (files)")
            self._check_dataset(field_name, sent, limits.max_dataset_rows)
            key = layout.dataset_key(sent.sha256)
            uploads.append((key, sent.content))
            rewrite[path] = keys.STORE_PREFIX + key
        stored_spec = map_paths(spec, lambda p: rewrite.get(p, p))
        exp_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        if client_request_id and not self.redis.set(keys.request_key(client_request_id), exp_id, nx=True):
            twin = self.redis.get(keys.request_key(client_request_id))  # a concurrent twin won
            if twin is None:  # the key has no expiry: only someone deleting it by hand gets here
                raise RuntimeError(f"client_request_id: the key of {client_request_id!r} vanished during this submit")
            return text(twin)
        for key, content in uploads:
            if not self.store.exists(key):
                self.store.put_bytes(key, content)
        now = time.time()
        tree = self.tree(exp_id)
        tree.store.put_bytes(layout.SPEC_JSON, stored_spec.to_json().encode())
        tree.store.put_bytes(layout.EXPERIMENT_JSON, json.dumps(
            {"id": exp_id, "name": spec.name, "client_request_id": client_request_id, "created_at": now}).encode())
        created: HashFields = {
            "state": "queued", "error": "", "name": spec.name, "model": ", ".join(m.name for m in spec.models),
            "created_at": now,
            "updated_at": now, "client_request_id": client_request_id}
        self.redis.hset(keys.experiment_hash(exp_id), mapping=created)
        self.redis.zadd(keys.EXPERIMENTS_ZSET, {exp_id: now})
        self._specs[exp_id] = stored_spec
        self.event(exp_id, "experiment_started", data={"runs": len(plan_runs(spec))})
        try:
            for run in plan_runs(stored_spec):
                enqueue_run(self.queue, exp_id, run.order, run.seed, run.strategy, run.model)
        except Exception as exc:  # never a phantom "queued" experiment: it failed, and says why
            log.exception("experiment %s: enqueueing its runs failed", exp_id)
            self._fail(exp_id, f"could not enqueue its runs: {type(exc).__name__}: {exc}")
            raise
        self._set_state(exp_id, "running")
        threading.Thread(target=self._guard, args=(exp_id, self._base_stage, exp_id), daemon=True,
                         name=f"base-{exp_id}").start()
        return exp_id

    @staticmethod
    def _check_dataset(field_name: str, f: SubmittedFile, max_rows: int | None = None) -> None:
        """Every row, with the reader and the messages of ``slmcl validate`` (the bytes read in place)."""
        scan_data(io.BytesIO(f.content), name=f"{field_name} ({f.path})", max_rows=max_rows)

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
        h = text_fields(self.redis.hgetall(keys.experiment_hash(exp_id)))
        if not h:
            raise NotFoundError(f"no experiment {exp_id!r}")
        spec = self.spec(exp_id)
        # "<run_id>/trained-<k>.json", "<run_id>/stage-<k>.json", ...
        trained = {k[len("runs/"):] for k in self.tree(exp_id).store.list_keys(layout.runs_prefix())}
        runs = []
        for run in plan_runs(spec):
            rid, order, seed = run.run_id, list(run.order), run.seed
            n_trained = sum(1 for k in range(1, len(order) + 1) if f"{rid}/trained-{k}.json" in trained)
            n_done = sum(1 for k in range(1, len(order) + 1) if f"{rid}/stage-{k}.json" in trained)
            state = h.get(f"run:{rid}:state", "queued")
            end = self.tree(exp_id).run_end(rid, len(order)) if f"{rid}/stopped.json" in trained else len(order)
            if n_done == end:
                state = "done"  # the records decide: a late or repeated stage handler may have said "training"
            elif h.get("state") == "cancelled":
                state = "cancelled"  # whatever it was doing: a cancelled experiment's unfinished runs stopped
            runs.append({"run_id": rid, "order": order, "seed": seed, "stages_total": len(order),
                         "stages_trained": n_trained, "stages_evaluated": n_done, "state": state,
                         "error": h.get(f"run:{rid}:error", ""), "strategy": run.strategy,
                         "model": spec.for_model(run.model).model.name})
        return {"id": exp_id, "name": h.get("name", ""), "state": h.get("state", ""), "model": h.get("model", ""),
                "error": h.get("error", ""), "created_at": float(h.get("created_at", 0)),
                "updated_at": float(h.get("updated_at", 0)), "client_request_id": h.get("client_request_id", ""),
                "runs": runs}

    def list_ids(self) -> list[str]:
        # redis-py's ZSetRangeResponse also lists the WITHSCORES shapes; without it the reply is the members.
        return [text(x) for x in cast("list[bytes | str]", self.redis.zrange(keys.EXPERIMENTS_ZSET, 0, -1))]

    # ------------------------------------------------------------------ state & events
    def _set_state(self, exp_id: str, state: str, error: str = "") -> None:
        fields: HashFields = {"state": state, "updated_at": time.time()}
        if error:
            fields["error"] = error
        self.redis.hset(keys.experiment_hash(exp_id), mapping=fields)

    def state(self, exp_id: str) -> str:
        s = self.redis.hget(keys.experiment_hash(exp_id), "state")
        return text(s) if s else ""

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
            entries = stream_entries(got)
            for eid, fields in entries:
                last = eid
                yield eid, fields
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
        for run in plan_runs(spec):
            try:
                job = Job.fetch(keys.train_job_id(exp_id, run.run_id), connection=self.redis,
                                serializer=JSONSerializer)
            except Exception:  # noqa: BLE001 - a job that is gone needs no cancelling
                continue
            if job.get_status() in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                job.cancel()
        h = text_fields(self.redis.hgetall(keys.experiment_hash(exp_id)))
        runs: HashFields = {f"run:{r.run_id}:state": "cancelled" for r in plan_runs(spec)
                            if h.get(f"run:{r.run_id}:state") != "done"}
        if runs:
            self.redis.hset(keys.experiment_hash(exp_id), mapping=runs)
        self._set_state(exp_id, "cancelled")
        self.event(exp_id, "experiment_cancelled")
        self._stop_tracker(exp_id, KILLED)

    # ------------------------------------------------------------------ resume
    def resume(self, exp_id: str) -> None:
        """Continue a failed or cancelled experiment after the last committed stage of each run.

        Runs with untrained stages are enqueued again (the trainer resumes after its last trained stage),
        trained stages without a record are measured here, the base stage is redone if it is missing:
        nothing already committed is recomputed.
        """
        if not self.exists(exp_id):
            raise NotFoundError(f"no experiment {exp_id!r}")
        state = self.state(exp_id)
        if state not in RESUMABLE:
            raise NotResumableError(f"experiment {exp_id} is {state or 'in no known state'}: only a failed or "
                                    "cancelled experiment can be resumed")
        spec, tree = self.spec(exp_id), self.tree(exp_id)
        fields: HashFields = {"state": "running", "error": "", "updated_at": time.time()}
        enqueue: list[RunPlan] = []
        measure_now: list[dict[str, str]] = []
        for run in plan_runs(spec):
            rid, n = run.run_id, tree.run_end(run.run_id, len(run.order))  # n: where the policy stopped it
            trained = tree.last_trained(rid, n)
            committed = {k for r, k in tree.committed(rid) if r == rid}
            for k in range(1, trained + 1):
                if k not in committed:
                    measure_now.append({"experiment_id": exp_id, "run_id": rid, "step": str(k)})
            if trained < n:
                enqueue.append(run)
            else:
                self._forget_failed_job(exp_id, rid)  # trained to the end: its old failure is no failure now
            done = trained == n and all(k in committed for k in range(1, n + 1))
            fields[f"run:{rid}:state"] = "done" if done else ("queued" if trained < n else "training")
            fields[f"run:{rid}:error"] = ""
        self._epochs[exp_id] = self._epochs.get(exp_id, 0) + 1
        self.redis.delete(keys.cancel_key(exp_id))
        self.redis.hset(keys.experiment_hash(exp_id), mapping=fields)
        log.info("experiment %s resumed: %d run(s) re-enqueued, %d trained stage(s) to measure", exp_id,
                 len(enqueue), len(measure_now))
        self.event(exp_id, "experiment_resumed", data={"runs_enqueued": len(enqueue),
                                                        "stages_to_measure": len(measure_now)})
        try:
            for run in enqueue:
                enqueue_run(self.queue, exp_id, run.order, run.seed, run.strategy, run.model)
        except Exception as exc:
            log.exception("experiment %s: re-enqueueing its runs failed", exp_id)
            self._fail(exp_id, f"resume could not enqueue its runs: {type(exc).__name__}: {exc}")
            raise
        for stage in measure_now:
            self._stages.submit(self._guard, exp_id, self._measure_until_done, stage)
        threading.Thread(target=self._guard, args=(exp_id, self._base_stage, exp_id), daemon=True,
                         name=f"base-{exp_id}").start()
        self._maybe_finish(exp_id)  # everything may already be committed (a failure after the last commit)

    def _forget_failed_job(self, exp_id: str, rid: str) -> None:
        try:
            job = Job.fetch(keys.train_job_id(exp_id, rid), connection=self.redis, serializer=JSONSerializer)
        except Exception:  # noqa: BLE001 - no job data left: nothing for the janitor to misread
            return
        if job.get_status() == JobStatus.FAILED:
            job.delete()

    def _measure_until_done(self, fields: dict[str, str]) -> None:
        """A stage no notice will announce again (resume): measured, an outage waited out within the budget."""
        call_with_retry(lambda: self.process_stage(fields), what=f"stage {fields['step']} of {fields['run_id']}",
                        is_transient=is_outage, policy=self.retry_policy, logger=log)

    # ------------------------------------------------------------------ measuring and committing
    def tree(self, exp_id: str) -> ResultsTree:
        return ResultsTree(PrefixedStore(self.store, layout.experiment_prefix(exp_id)))

    def _evaluator(self, exp_id: str, spec: ExperimentSpec) -> RemoteEvaluator:
        def on_served(replicas: list[str]) -> None:
            self.redis.hincrby("slmcl:replica-requests", ",".join(replicas), 1)
            for rep in replicas:
                self.redis.hincrby("slmcl:replica-served", rep, 1)

        key = f"{exp_id}/{spec.model_label}"  # a model's base rows (an experiment may have several models)
        return RemoteEvaluator(self.pool, self._requests, exp_id, spec, self.settings.eval_shards_per_task,
                               base_rows=lambda: self._base_rows.get(key), on_served=on_served)

    def _progress(self, exp_id: str, rid: str, step: int) -> Any:
        def cb(task: str, done: int, total: int) -> None:
            self.event(exp_id, "eval_progress", rid, step, task, {"done": done, "total": total})
        return cb

    def _base_stage(self, exp_id: str) -> None:
        """Stage 0 of every run: the base evaluated (cached by the evaluators) and its drift rows."""
        call_with_retry(lambda: self._base_stage_once(exp_id), what=f"base stage of {exp_id}", is_transient=is_outage,
                        policy=self.retry_policy, logger=log)

    def _base_stage_once(self, exp_id: str) -> None:
        tree = self.tree(exp_id)
        for label in dict.fromkeys(run.model for run in plan_runs(self.spec(exp_id))):  # each model's base once
            spec = self.spec(exp_id).for_model(label)
            if self.state(exp_id) in TERMINAL or not base_runs_missing(tree, spec):
                continue
            m = measure(self._evaluator(exp_id, spec), None, spec.tasks, self._progress(exp_id, "", 0))
            if self.state(exp_id) in TERMINAL:
                return  # cancelled or failed while the base was measured: nothing is committed after the end
            for r in m.results:
                self.event(exp_id, "base_evaluated", task=r.task, data={**r.score, "model": spec.model.name})
            for rid in commit_base(tree, spec, m):
                self._stage_committed(exp_id, rid, 0, "base", m.scores, m.stability)
        self._maybe_finish(exp_id)

    def process_stage(self, fields: dict[str, str]) -> None:
        """One announced stage: measure its checkpoint on the evaluators and commit its record (once)."""
        stage = (fields["experiment_id"], fields["run_id"], int(fields["step"]))
        with self._inflight_lock:
            entry = self._stage_locks.setdefault(stage, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:  # the second handler finds the stage committed, or measures it if the first failed
                self._process_stage(fields)
        finally:
            with self._inflight_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._stage_locks.pop(stage, None)

    def _process_stage(self, fields: dict[str, str]) -> None:
        exp_id, rid, step = fields["experiment_id"], fields["run_id"], int(fields["step"])
        if not self.exists(exp_id) or self.state(exp_id) in TERMINAL:
            return
        spec, tree = self.spec(exp_id), self.tree(exp_id)
        if tree.is_committed(rid, step):
            return  # already committed (a redelivered event)
        spec = spec.for_model(run_plan(spec, rid).model)  # the run's model measures it
        trained = tree.read_trained(rid, step)
        self.redis.hset(keys.experiment_hash(exp_id), f"run:{rid}:state", "training")
        key = f"{exp_id}/{spec.model_label}"
        if self._base_rows.get(key) is None:  # the base's rows, once per experiment and model (deltas need them)
            self._base_rows.put(key, self._evaluator(exp_id, spec).drift_rows(None))
        m = measure(self._evaluator(exp_id, spec), trained.checkpoint, stage_tasks(spec, trained),
                    self._progress(exp_id, rid, step))
        if self.state(exp_id) in TERMINAL:
            return  # cancelled or failed while it was measured: nothing is committed after the end
        rec = commit_stage(tree, spec, trained, m)
        estimate = None if rec.evaluated else live_estimate(tree.records(), rec, self._prior(spec))
        self._stage_committed(exp_id, rid, step, rec.checkpoint_task, m.scores, rec.stability, estimate,
                              trained.action)
        if step == len(trained.order) or trained.action == "stop":
            self.redis.hset(keys.experiment_hash(exp_id), f"run:{rid}:state", "done")
        self._maybe_finish(exp_id)

    def _stage_committed(self, exp_id: str, rid: str, step: int, task: str, scores: dict[str, Any],
                         stab: dict[str, Any], estimate: dict[str, Any] | None = None,
                         action: str | None = None) -> None:
        self.event(exp_id, "stage_done", rid, step, task, {"scores": scores, "stability": stab,
                                                           "estimate": estimate, "action": action})

    def _prior(self, spec: ExperimentSpec) -> list[StageRecord]:
        """The evaluated records of the experiment named by ``evaluation.calibration_prior`` (checked at submit)."""
        prior = spec.evaluation.calibration_prior
        if not prior.startswith(PRIOR_PREFIX):
            return []
        return [r for r in self.tree(prior[len(PRIOR_PREFIX):]).records() if r.evaluated]

    def _maybe_finish(self, exp_id: str) -> None:
        spec, tree = self.spec(exp_id), self.tree(exp_id)
        with self._tables_lock:
            records = tree.write_tables(self._prior(spec))
            complete = len(records) >= expected_records(spec, tree) and self.state(exp_id) == "running"
        tracker = self._tracker(exp_id, spec, tree)  # before "succeeded": who sees it finds the tracker complete
        if complete:
            tracker.finished(records)
        else:
            tracker.sync(records)
        with self._tables_lock:
            if complete and self.state(exp_id) == "running":
                self._set_state(exp_id, "succeeded")
                self.event(exp_id, "experiment_done")

    def _tracker(self, exp_id: str, spec: ExperimentSpec, tree: ResultsTree) -> Tracker:
        """The experiment's tracker (``tracking`` in its spec): it never raises, a failure is a warning event."""
        def warn(message: str) -> None:
            self.event(exp_id, "tracking_warning", data={"message": message})

        with self._trackers_lock:
            if exp_id not in self._trackers:
                try:
                    self._trackers[exp_id] = open_tracker(spec, tree, warn, source=f"experiment:{exp_id}")
                except SpecError as exc:  # mlflow gone from this monitor since the submit: the results are unaffected
                    log.warning("experiment %s: %s", exp_id, exc)
                    warn(str(exc))
                    self._trackers[exp_id] = NullTracker()
            return self._trackers[exp_id]

    def _fail(self, exp_id: str, message: str) -> None:
        if self.state(exp_id) in TERMINAL:
            return
        self._set_state(exp_id, "failed", message)
        self.event(exp_id, "experiment_failed", data={"error": message})
        self._stop_tracker(exp_id, FAILED)

    def _stop_tracker(self, exp_id: str, status: str) -> None:
        """Close the experiment's tracking runs as ``status``, on a thread of its own: a cancel answers at once,
        and a tracking server that is down costs the caller nothing."""
        def stop() -> None:
            try:
                spec, tree = self.spec(exp_id), self.tree(exp_id)
                if spec.tracking.mlflow is not None:
                    self._tracker(exp_id, spec, tree).stopped(tree.records(), status)
            except Exception:  # noqa: BLE001 - logged; the experiment's own state is already recorded
                log.exception("experiment %s: closing its tracking runs as %s failed", exp_id, status)

        threading.Thread(target=stop, name=f"tracker-stop-{exp_id}", daemon=True).start()

    def _guard(self, exp_id: str, fn: Any, *args: Any) -> None:
        """Run background work for an experiment; a failure fails the experiment, never silently."""
        epoch = self._epochs.get(exp_id, 0)
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - recorded on the experiment and logged
            log.exception("experiment %s: %s failed", exp_id, getattr(fn, "__name__", fn))
            if self._epochs.get(exp_id, 0) != epoch:
                log.warning("experiment %s was resumed meanwhile: this earlier failure does not fail it", exp_id)
                return
            self._fail(exp_id, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ background loops
    def start(self) -> None:
        self._create_group()
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
        """Dispatch stage notices: new ones as they come, and now and then our unacknowledged ones again.

        A notice is acknowledged only once its stage is committed (or has no reason to be): one whose handling
        met an outage stays pending and is handled again at the next sweep, and so is every pending one
        after a monitor restart. A Redis restart only pauses the loop (its connection waits it out).
        """
        next_sweep = 0.0  # the first read is the sweep: our entries pending from before a restart
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    self._sweep_pending()
                    next_sweep = time.monotonic() + PENDING_SWEEP_SECONDS
                got = self.redis.xreadgroup(keys.MONITOR_GROUP, self.consumer, {keys.STAGE_EVENTS_STREAM: ">"},
                                            count=16, block=1000)
                for eid, raw in stream_entries(got):
                    self._dispatch(eid, raw)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis came back without our group (its data lost): recreate it
                    self._create_group()
                else:
                    log.exception("reading stage notices failed; retrying")
                    self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - the loop must survive an outage longer than the retry budget
                log.exception("reading stage notices failed; retrying")
                self._stop.wait(1.0)

    def _sweep_pending(self) -> None:
        start = "0"
        while not self._stop.is_set():
            got = self.redis.xreadgroup(keys.MONITOR_GROUP, self.consumer, {keys.STAGE_EVENTS_STREAM: start},
                                        count=100)
            entries = stream_entries(got)
            if not entries:
                return
            for eid, raw in entries:
                self._dispatch(eid, raw)
            start = entries[-1][0]

    def _dispatch(self, eid: str, fields: dict[str, str]) -> None:
        if not fields:  # trimmed from the stream while pending: nothing left to handle
            self.redis.xack(keys.STAGE_EVENTS_STREAM, keys.MONITOR_GROUP, eid)
            return
        with self._inflight_lock:
            if eid in self._inflight:
                return
            self._inflight.add(eid)
        try:
            self._stages.submit(self._handle_stage_entry, eid, fields)
        except RuntimeError:  # the executor is shut down: the monitor is stopping, the entry stays pending
            with self._inflight_lock:
                self._inflight.discard(eid)

    def _handle_stage_entry(self, eid: str, fields: dict[str, str]) -> None:
        exp_id = fields.get("experiment_id", "")
        epoch = self._epochs.get(exp_id, 0)
        try:
            try:
                self.process_stage(fields)
            except Exception as exc:  # noqa: BLE001 - an outage is waited out; anything else fails the experiment
                if self._epochs.get(exp_id, 0) != epoch:  # resumed meanwhile: the resume measures this stage
                    log.warning("stage %s of %s: %s: %s, before its experiment was resumed; the resume measures it",
                                fields.get("step"), fields.get("run_id"), type(exc).__name__, exc)
                elif is_outage(exc) and self._still_waiting(eid):
                    log.warning("stage %s of %s: %s: %s; left pending, measured again when it is back",
                                fields.get("step"), fields.get("run_id"), type(exc).__name__, exc)
                    return
                else:
                    log.exception("stage %s of %s failed", fields.get("step"), fields.get("run_id"))
                    self._fail(exp_id, f"stage {fields.get('step')} of {fields.get('run_id')}: "
                                       f"{type(exc).__name__}: {exc}")
            self.redis.xack(keys.STAGE_EVENTS_STREAM, keys.MONITOR_GROUP, eid)
            with self._inflight_lock:
                self._outage_since.pop(eid, None)
        except Exception:  # noqa: BLE001 - Redis gone past the budget: the entry stays pending for the next sweep
            log.exception("stage %s of %s: could not record its outcome", fields.get("step"), fields.get("run_id"))
        finally:
            with self._inflight_lock:
                self._inflight.discard(eid)

    def _still_waiting(self, eid: str) -> bool:
        """Whether this entry's outage is younger than the retry budget (past it, the stage fails)."""
        with self._inflight_lock:
            since = self._outage_since.setdefault(eid, time.monotonic())
        return time.monotonic() - since < self.retry_policy.budget_seconds

    def _create_group(self) -> None:
        try:
            self.redis.xgroup_create(keys.STAGE_EVENTS_STREAM, keys.MONITOR_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _janitor(self) -> None:
        """Re-queue work of crashed trainers promptly, and fail experiments whose runs failed for good."""
        while not self._stop.wait(5.0):
            try:
                StartedJobRegistry(queue=self.queue).cleanup()
                for exp_id in self.list_ids():
                    if self.state(exp_id) == "running":
                        self._check_jobs(exp_id)
            except (redis.ConnectionError, redis.TimeoutError):  # only past the retry budget: the next pass retries
                log.warning("redis unreachable; janitor retries")
            except Exception:  # noqa: BLE001 - the loop must survive; the error is logged
                log.exception("janitor pass failed")

    def _check_jobs(self, exp_id: str) -> None:
        spec = self.spec(exp_id)
        for run in plan_runs(spec):
            rid = run.run_id
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
