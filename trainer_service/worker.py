"""The trainer's RQ worker: jobs run in-process, with a job heartbeat that RQ's SimpleWorker lacks.

Why in-process: the base model stays resident across jobs, and nothing forks after CUDA is
initialised. Why a heartbeat thread: in rq 2.12 only the forking ``Worker`` refreshes a running
job's entry in the StartedJobRegistry (``monitor_work_horse`` -> ``maintain_heartbeats`` every
``job_monitoring_interval``); ``SimpleWorker.execute_job`` just calls ``perform_job``, and its
``get_heartbeat_ttl`` is ``job.timeout + 60``. A killed SimpleWorker would so leave its job
"started" for the whole job timeout (24 h here). ``TrainerWorker`` instead registers the job with
a short TTL (``job_heartbeat_ttl``, 60 s) and a daemon thread calls RQ's own
``maintain_heartbeats`` every ``job_heartbeat_interval`` s while the job runs. After a kill -9
the entry expires within the TTL, and the next ``StartedJobRegistry.cleanup()`` (any worker's
maintenance, or the monitor's periodic call) requeues the job, spending one of its retries.

Failure policy: an ``SlmclError`` (bad spec or data, non-finite loss, cancellation) is final:
the job fails without retrying, since a retry would fail the same way. Anything else (S3 or
Redis trouble, out of memory) is retried per the job's ``Retry``. SIGTERM while busy stops the
job at its next optimizer step and requeues it without spending a retry; the worker then exits.

Requeued work goes first: every job this worker starts is marked ``enqueue_at_front_on_retry`` (in
Redis too), so a retry after a failure and the registry's requeue of an abandoned job (a killed
worker) put the run at the FRONT of the queue, ahead of runs that never started.

Names: a worker restarted under its old ``--name`` finds the key of its previous, dead self (RQ
would refuse "There exists an active worker named ... already"). ``register_birth`` clears that key
when it is stale (same host and its process gone, or no heartbeat for longer than the worker TTL);
a live worker of the same name elsewhere makes this one take the name with a unique suffix.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from rq import worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.utils import utcparse
from rq.worker import SimpleWorker, WorkerStatus

from service_common.redis_conn import text_fields
from slmcl.errors import SlmclError
from trainer_service import jobs

log = logging.getLogger("trainer_service.worker")

JOB_HEARTBEAT_TTL = 60  # s: how long a silent (dead) worker's job stays "started"
JOB_HEARTBEAT_INTERVAL = 10  # s between heartbeats


class _JobHeartbeat:
    """A daemon thread calling ``worker.maintain_heartbeats(job)`` until stopped."""

    def __init__(self, worker: TrainerWorker, job: Job, interval: float) -> None:
        self.worker, self.job, self.interval = worker, job, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.worker.maintain_heartbeats(self.job)
            except Exception:  # noqa: BLE001 - a Redis blip must not kill the thread; the next beat retries
                log.warning("job %s: heartbeat failed", self.job.id, exc_info=True)

    def stop(self) -> None:
        """Stop and wait: after this returns no heartbeat can touch the job's execution again."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


class TrainerWorker(SimpleWorker):
    def __init__(self, *args: Any, job_heartbeat_ttl: int = JOB_HEARTBEAT_TTL,
                 job_heartbeat_interval: float = JOB_HEARTBEAT_INTERVAL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0 < job_heartbeat_interval < job_heartbeat_ttl:
            raise ValueError("job heartbeat interval must be positive and shorter than its TTL")
        self.job_heartbeat_ttl = int(job_heartbeat_ttl)
        self.job_heartbeat_interval = float(job_heartbeat_interval)
        self._beat: _JobHeartbeat | None = None
        self._last_exc_type: type[BaseException] | None = None

    # -- heartbeats -----------------------------------------------------------------------
    def get_heartbeat_ttl(self, job: Job) -> int:
        """The TTL of the job's StartedJobRegistry entry (and execution) at each beat: short, refreshed."""
        return self.job_heartbeat_ttl

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._last_exc_type = None
        # A run that already started and comes back (retry, abandoned by a dead worker) goes to the front.
        job.enqueue_at_front_on_retry = True
        self.connection.hset(job.key, "enqueue_at_front_on_retry", 1)
        self.prepare_execution(job)  # registers the execution with get_heartbeat_ttl()
        self._beat = _JobHeartbeat(self, job, self.job_heartbeat_interval)
        self._beat.start()
        try:
            self.perform_job(job, queue)
        finally:
            self._stop_beat()
        self.set_state(WorkerStatus.IDLE)

    def cleanup_execution(self, job: Job, pipeline: Any) -> None:
        # The job's outcome is being recorded: no beat may re-add the execution after this.
        self._stop_beat()
        super().cleanup_execution(job, pipeline)

    def _stop_beat(self) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None

    # -- failure policy -------------------------------------------------------------------
    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        self._last_exc_type = exc_info[0] if exc_info else None
        super().handle_exception(job, *exc_info)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None,
                           exc_string: str = "") -> None:
        exc = self._last_exc_type
        self._last_exc_type = None
        if exc is not None and issubclass(exc, (jobs.WorkerShutdown, SystemExit, KeyboardInterrupt)):
            # Our shutdown (a second SIGTERM, a cold stop, lands as SystemExit): requeued at no cost.
            job.retries_left = (job.retries_left or 0) + 1
        elif exc is not None and issubclass(exc, SlmclError) and job.retries_left:
            log.info("job %s: %s is final, not retrying", job.id, exc.__name__)
            job.retries_left = 0
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string)

    # -- names ----------------------------------------------------------------------------
    def register_birth(self) -> None:
        self._claim_name()
        super().register_birth()

    def _claim_name(self) -> None:
        """Clear the key of a dead worker of our name, or take a fresh name if that worker may be alive."""
        data = text_fields(self.connection.hgetall(self.key))
        if not data or "death" in data:
            return
        if _stale(data, self.worker_ttl):
            log.warning("worker %s: clearing the registration of its previous process (pid %s on %s)", self.name,
                        data.get("pid", "?"), data.get("hostname", "?"))
            with self.connection.pipeline() as p:
                worker_registration.unregister(self, p)
                p.delete(self.key)
                p.execute()
            return
        fresh = f"{self.name}-{uuid.uuid4().hex[:6]}"
        log.warning("worker %s is alive (pid %s on %s): this one is %s", self.name, data.get("pid", "?"),
                    data.get("hostname", "?"), fresh)
        self.name = fresh

    # -- shutdown -------------------------------------------------------------------------
    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        jobs.shutdown_requested.set()  # a running job stops at its next step and is requeued


def _stale(data: dict[str, str], worker_ttl: int) -> bool:
    """A registration whose process is gone: same host and pid dead (or ours: a container restart), or silent."""
    try:
        silent = (datetime.now(timezone.utc) - utcparse(data["last_heartbeat"])).total_seconds()
    except (KeyError, ValueError):
        silent = 0.0
    if silent > worker_ttl + 15:
        return True
    if data.get("hostname") != socket.gethostname():
        return False
    try:
        pid = int(data.get("pid") or 0)
    except ValueError:
        return False
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
