"""Real servers for the service tests: Redis and the S3 gateway on free loopback ports."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_common.local_servers import Server, start_redis, start_s3

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
