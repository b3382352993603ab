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
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from slmcl.errors import SlmclError
from trainer_service import jobs

log = logging.getLogger("trainer_service.worker")

JOB_HEARTBEAT_TTL = 60  # s: how long a silent (dead) worker's job stays "started"
JOB_HEARTBEAT_INTERVAL = 10  # s between heartbeats


class _JobHeartbeat:
    """A daemon thread calling ``worker.maintain_heartbeats(job)`` until stopped."""

    def __init__(self, worker: "TrainerWorker", job: Job, interval: float) -> None:
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

    # -- shutdown -------------------------------------------------------------------------
    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        jobs.shutdown_requested.set()  # a running job stops at its next step and is requeued
