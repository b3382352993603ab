"""The one retry rule: transient failures are retried with growing, jittered waits until the budget is
spent (each wait logged once), anything else is raised at once; the S3 store and Redis clients use it."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
import redis

from service_common.local_servers import free_port, start_redis, stop_pid
from service_common.redis_conn import BudgetRetry, redis_from_url
from service_common.retry import BUDGET_ENV, RetryPolicy, call_with_retry
from service_common.s3_store import S3Store, is_transient
from slmcl.errors import NotFoundError


def test_transient_failures_are_retried_with_backoff_and_each_wait_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("refused")
        return "ok"

    policy = RetryPolicy(budget_seconds=60, initial_seconds=1, max_wait_seconds=3)
    with caplog.at_level(logging.WARNING, logger="slmcl.retry"):
        assert call_with_retry(flaky, what="op", is_transient=lambda e: isinstance(e, ConnectionError),
                               policy=policy, sleep=slept.append) == "ok"
    assert len(calls) == 4 and len(slept) == 3
    assert 0.5 <= slept[0] <= 1 and 1 <= slept[1] <= 2 and 1.5 <= slept[2] <= 3  # doubling, capped, jittered
    waits = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(waits) == 3 and all("op failed (attempt" in r.getMessage() for r in waits)


def test_a_permanent_failure_is_raised_at_once_and_a_spent_budget_reraises() -> None:
    slept: list[float] = []

    def missing() -> None:
        raise NotFoundError("not in the store: k")

    with pytest.raises(NotFoundError):
        call_with_retry(missing, what="get", is_transient=is_transient, sleep=slept.append)
    assert slept == []

    def down() -> None:
        raise ConnectionError("refused")

    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        call_with_retry(down, what="get", is_transient=is_transient,
                        policy=RetryPolicy(budget_seconds=0.3, initial_seconds=0.05, max_wait_seconds=0.1))
    assert 0.3 <= time.monotonic() - t0 < 2


def test_policy_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_ENV, "42")
    assert RetryPolicy.from_env().budget_seconds == 42
    assert RetryPolicy.from_env().attempts_within_budget() >= 42 / RetryPolicy().max_wait_seconds
    monkeypatch.setenv(BUDGET_ENV, "soon")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        RetryPolicy.from_env()


@pytest.mark.integration
def test_s3_store_waits_for_an_unreachable_server_for_the_budget_only(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from minio import Minio

    monkeypatch.setenv(BUDGET_ENV, "1")
    store = S3Store(Minio(f"127.0.0.1:{free_port()}", access_key="a", secret_key="b", secure=False), "bucket")
    store.client._http.connection_pool_kw["retries"] = False  # minio's own urllib3 retries would add ~6 s
    with caplog.at_level(logging.WARNING, logger="slmcl.s3"), pytest.raises(Exception) as err:
        store.get_bytes("k")
    assert is_transient(err.value)
    assert any("s3 get_bytes('k')" in r.getMessage() and "retrying in" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_redis_client_waits_out_a_restart(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        r = redis_from_url(f"redis://127.0.0.1:{server.port}/0", policy=RetryPolicy(30, 0.1, 0.5))
        assert isinstance(r.connection_pool.connection_kwargs["retry"], BudgetRetry)
        r.set("k", "v")
        args = list(server.proc.args)
        stop_pid(server.pid)
        import threading

        procs: list[subprocess.Popen[bytes]] = []

        def restart() -> None:
            time.sleep(2)
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))

        threading.Thread(target=restart).start()
        assert r.get("k") == b"v"  # issued while Redis is down; answered once it is back, from its AOF
        assert procs
        stop_pid(procs[0].pid)
        with pytest.raises(redis.ConnectionError):
            redis_from_url(f"redis://127.0.0.1:{server.port}/0", policy=RetryPolicy(0.5, 0.1, 0.2)).ping()
    finally:
        server.stop()


@pytest.mark.integration
def test_a_worker_takes_the_name_of_its_dead_self_and_never_that_of_a_live_one(tmp_path: Path) -> None:
    import socket

    from rq import Queue
    from rq.serializers import JSONSerializer
    from rq.utils import now, utcformat

    from trainer_service.worker import TrainerWorker

    server = start_redis(tmp_path / "redis")
    try:
        r = redis_from_url(f"redis://127.0.0.1:{server.port}/0")
        queue = Queue("q", connection=r, serializer=JSONSerializer)

        def worker(name: str) -> TrainerWorker:
            return TrainerWorker([queue], connection=r, serializer=JSONSerializer, name=name)

        def leave_key(name: str, hostname: str, pid: int) -> None:  # a registration whose process never said goodbye
            r.hset(f"rq:worker:{name}", mapping={"hostname": hostname, "pid": pid,
                                                 "last_heartbeat": utcformat(now()), "queues": "q"})

        dead = subprocess.Popen(["true"])
        dead.wait()
        leave_key("crashed", socket.gethostname(), dead.pid)
        w = worker("crashed")
        w.register_birth()
        assert w.name == "crashed" and r.hget("rq:worker:crashed", "pid") == str(os.getpid()).encode()

        leave_key("busy", "another-host", 1)
        w = worker("busy")
        w.register_birth()
        assert w.name.startswith("busy-") and r.exists("rq:worker:busy") and r.exists(f"rq:worker:{w.name}")
    finally:
        server.stop()
