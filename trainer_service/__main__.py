"""``python -m trainer_service [--burst] [--name NAME]``: one RQ worker on ``$SLMCL_QUEUE`` (JSON serializer).

Environment: the ``SLMCL_*`` settings (Redis, S3, work dir, queue, device), ``SLMCL_TORCH_THREADS``
(torch CPU threads), ``SLMCL_LOG_LEVEL``, and ``SLMCL_JOB_HEARTBEAT_TTL`` / ``SLMCL_JOB_HEARTBEAT_INTERVAL``
(seconds; 60 / 10 by default: how soon a killed worker's job is handed to another worker).
Outages: every Redis command and store operation retries with jittered exponential backoff for
``SLMCL_RETRY_BUDGET_SECONDS`` (600; see ``service_common.retry``). ``--name`` may be reused after a crash:
the dead worker's registration is cleared (or, if that worker may be alive, this one takes a suffixed name).
SIGTERM: idle, the worker exits at once; busy, the job stops at its next step, is requeued, and it exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from trainer_service.worker import JOB_HEARTBEAT_INTERVAL, JOB_HEARTBEAT_TTL

    parser = argparse.ArgumentParser(prog="python -m trainer_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    parser.add_argument("--name", help="worker name (default: trainer-<host>-<pid>)")
    parser.add_argument("--worker-ttl", type=int, default=30,
                        help="worker key TTL; an idle worker wakes every TTL-15 s for maintenance (default 30)")
    parser.add_argument("--maintenance-interval", type=int, default=10,
                        help="seconds between registry cleanups (requeueing abandoned jobs) when idle (default 10)")
    parser.add_argument("--job-heartbeat-ttl", type=int,
                        default=int(os.environ.get("SLMCL_JOB_HEARTBEAT_TTL", JOB_HEARTBEAT_TTL)))
    parser.add_argument("--job-heartbeat-interval", type=float,
                        default=float(os.environ.get("SLMCL_JOB_HEARTBEAT_INTERVAL", JOB_HEARTBEAT_INTERVAL)))
    args = parser.parse_args(argv)

    level = os.environ.get("SLMCL_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("trainer_service")

    from slmcl.models.runtime import configure_process

    configure_process(threads=os.environ.get("SLMCL_TORCH_THREADS"))

    import socket

    from rq import Queue
    from rq.serializers import JSONSerializer

    import trainer_service.jobs  # noqa: F401 - torch, transformers, peft load now, not inside the first job
    from service_common.redis_conn import redis_from_url
    from service_common.settings import Settings
    from slmcl.errors import SlmclError
    from slmcl.storage.factory import open_store
    from trainer_service.worker import TrainerWorker

    settings = Settings()
    try:
        open_store(settings.store_url)  # a bad URL or missing credentials fail at boot, not in the first job
    except SlmclError as exc:
        log.error("%s", exc)
        return 2
    conn = redis_from_url(settings.redis_url)  # the worker waits out a Redis restart, then carries on
    queue = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    worker = TrainerWorker(
        [queue], connection=conn, serializer=JSONSerializer,
        name=args.name or f"trainer-{socket.gethostname()}-{os.getpid()}",
        worker_ttl=args.worker_ttl, maintenance_interval=args.maintenance_interval,
        job_heartbeat_ttl=args.job_heartbeat_ttl, job_heartbeat_interval=args.job_heartbeat_interval,
    )
    log.info("worker %s on queue %s (job heartbeat every %.0f s, TTL %d s)", worker.name, settings.queue,
             args.job_heartbeat_interval, args.job_heartbeat_ttl)
    worker.work(burst=args.burst, logging_level=level)
    log.info("worker %s stopped", worker.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
