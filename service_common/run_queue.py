"""Enqueueing a run for the trainers: the monitor's side of the queue (Redis and RQ only: no torch, no trainer code).

The job is named by its dotted path, so the monitor never imports the trainer package that runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from service_common import keys
from slmcl.protocol.layout import DEFAULT_STRATEGY, run_id

TRAIN_FUNC = "trainer_service.jobs.train_run"
JOB_TIMEOUT = 24 * 3600
RESULT_TTL = 7 * 24 * 3600
FAILURE_TTL = 7 * 24 * 3600
RETRIES = 3
# A job in one of these states is the run: enqueueing it again returns it instead of adding another.
ACTIVE = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)


def enqueue_run(queue: Queue, exp_id: str, order: Sequence[str], seed: int,
                strategy: str = DEFAULT_STRATEGY, model: str = "") -> Job:
    """Enqueue ``train_run(exp_id, order, seed, strategy, model)`` as job ``keys.train_job_id(exp_id, run_id)``.

    Idempotent while the run is queued or started (the existing job is returned). A finished,
    failed or stopped job of the same id is replaced by a fresh one (3 retries again); the new job
    resumes from the stages already in the store, so nothing is retrained.
    """
    queue = Queue(queue.name, connection=queue.connection, serializer=JSONSerializer)  # workers read JSON
    order = [str(t) for t in order]
    rid = run_id(order, int(seed), strategy, model)
    job_id = keys.train_job_id(exp_id, rid)
    for _ in range(10):
        try:
            return queue.enqueue_call(
                TRAIN_FUNC, args=[exp_id, order, int(seed), strategy, *([model] if model else [])], job_id=job_id,
                unique=True,
                timeout=JOB_TIMEOUT, result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL, retry=Retry(max=RETRIES),
                description=f"train {exp_id} {rid}",
            )
        except DuplicateJobError:
            try:
                existing = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
            except NoSuchJobError:
                continue  # it just expired or was deleted: try again
            if existing.get_status(refresh=False) in ACTIVE:
                return existing
            existing.delete()
    raise RuntimeError(f"could not enqueue {job_id}: it keeps reappearing")
