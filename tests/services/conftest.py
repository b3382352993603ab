"""Real servers for the service tests: Redis and the S3 gateway on free loopback ports, and the services
themselves as processes (``Trio``)."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_common.local_servers import Server, free_port, start_redis, start_s3, stop_pid

ACCESS_KEY = "slmcl-test-access"
SECRET_KEY = "slmcl-test-secret-key-123"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_s3(tmp_path_factory.mktemp("s3"), ACCESS_KEY, SECRET_KEY)
    yield server
    server.stop()


_next_db = itertools.cycle(range(1, 16))
_module_dbs: set[int] = set()  # held by module-scoped services still running: never handed to a test


def _free_db() -> int:
    """Redis databases 1..15 in turn (0 stays untouched), skipping those a module's services still use."""
    for _ in range(15):
        db = next(_next_db)
        if db not in _module_dbs:
            return db
    raise RuntimeError("every Redis database 1..15 is held by module-scoped services")


def _service_env(redis_server: Server, s3_server: Server, work: Path, node: pytest.Item | pytest.Collector,
                 db: int) -> dict[str, str]:
    """Environment for service processes: a bucket and a Redis database (flushed) of their own for ``node``."""
    bucket = "t-" + node.name.lower().replace("_", "-").replace("[", "-").replace("]", "").replace(".py", "")
    bucket = bucket[:40].strip("-").replace(".", "-")
    import redis

    redis.Redis(port=redis_server.port, db=db).flushdb()
    return {
        **os.environ,
        "SLMCL_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/{db}",
        "SLMCL_S3_ENDPOINT": f"127.0.0.1:{s3_server.port}",
        "SLMCL_S3_ACCESS_KEY": ACCESS_KEY,
        "SLMCL_S3_SECRET_KEY": SECRET_KEY,
        "SLMCL_S3_BUCKET": bucket,
        "SLMCL_WORK_DIR": str(work / "work"),
        "SLMCL_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture()
def service_env(redis_server: Server, s3_server: Server, tmp_path: Path,
                request: pytest.FixtureRequest) -> dict[str, str]:
    """For a test that starts (and may kill or restart) its own service processes."""
    return _service_env(redis_server, s3_server, tmp_path, request.node, _free_db())


@pytest.fixture(scope="module")
def module_service_env(redis_server: Server, s3_server: Server, tmp_path_factory: pytest.TempPathFactory,
                       request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """For service processes started once and shared by the tests of a module that leave them running."""
    db = _free_db()
    _module_dbs.add(db)
    yield _service_env(redis_server, s3_server, tmp_path_factory.mktemp("module-services"), request.node, db)
    _module_dbs.discard(db)


def wait_healthy(address: str, proc, timeout: float = 120.0, service: str = "") -> None:  # type: ignore[no-untyped-def]
    """Block until a gRPC server answers SERVING (or its process dies)."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{address}: process exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} not healthy after {timeout} s")


def start_process(args: list[str], env: dict[str, str], log_path: Path):  # type: ignore[no-untyped-def]
    """A service as its own process group (so a kill takes its children too), output to a log."""
    import subprocess
    import sys

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[2])


class Trio:
    """The services on loopback, each its own process: ``evaluators`` evaluator replicas, the monitor (with
    ``monitor_env`` added to its environment) and, with ``trainer``, one trainer worker. Stopped by pid."""

    def __init__(self, env: dict[str, str], logs: Path, evaluators: int = 2,
                 monitor_env: dict[str, str] | None = None, trainer: bool = True) -> None:
        self.env, self.logs, self.monitor_env, self.trainer = env, logs, monitor_env or {}, trainer
        self.procs: dict[str, Any] = {}
        self.eval_addresses = [f"127.0.0.1:{free_port()}" for _ in range(evaluators)]
        self.monitor_address = f"127.0.0.1:{free_port()}"
        self.monitor_starts = 0

    def start_trainer(self, name: str = "trainer-1") -> None:
        self.procs[name] = start_process(["-m", "trainer_service", "--name", f"{name}-{os.getpid()}"], self.env,
                                         self.logs / f"{name}.log")

    def start(self) -> None:
        for i, addr in enumerate(self.eval_addresses, 1):
            host, port = addr.split(":")
            env = {**self.env, "SLMCL_REPLICA_ID": f"evaluator-{i}"}
            self.procs[f"evaluator-{i}"] = start_process(["-m", "evaluator_service", "--host", host, "--port", port],
                                                         env, self.logs / f"evaluator-{i}.log")
        self.start_monitor(wait=False)
        if self.trainer:
            self.start_trainer()
        for i, addr in enumerate(self.eval_addresses, 1):
            self.wait_serving(f"evaluator-{i}", addr)
        self.wait_serving("monitor", self.monitor_address)

    def start_monitor(self, wait: bool = True) -> None:
        """The monitor on its address; a restart (after ``kill("monitor")``) logs to monitor-2.log, and so on."""
        self.monitor_starts += 1
        host, port = self.monitor_address.split(":")
        log = "monitor.log" if self.monitor_starts == 1 else f"monitor-{self.monitor_starts}.log"
        self.procs["monitor"] = start_process(
            ["-m", "monitor_service", "--host", host, "--port", port],
            {**self.env, "SLMCL_EVALUATORS": ",".join(self.eval_addresses), **self.monitor_env}, self.logs / log)
        if wait:
            self.wait_serving("monitor", self.monitor_address)

    def wait_serving(self, name: str, address: str) -> None:
        wait_healthy(address, self.procs[name])

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started, as in a container crash
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_pid(proc.pid)

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(self.logs.glob("*.log")))
