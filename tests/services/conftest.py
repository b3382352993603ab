"""Real servers for the service tests: Redis and the S3 gateway on free loopback ports."""

from __future__ import annotations

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


@pytest.fixture()
def service_env(redis_server: Server, s3_server: Server, tmp_path: Path,
                request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment for a service process; each test gets its own bucket and Redis database."""
    bucket = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    db = abs(hash(request.node.nodeid)) % 15 + 1
    import redis

    redis.Redis(port=redis_server.port, db=db).flushdb()
    return {
        **os.environ,
        "SLMCL_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/{db}",
        "SLMCL_S3_ENDPOINT": f"127.0.0.1:{s3_server.port}",
        "SLMCL_S3_ACCESS_KEY": ACCESS_KEY,
        "SLMCL_S3_SECRET_KEY": SECRET_KEY,
        "SLMCL_S3_BUCKET": bucket,
        "SLMCL_WORK_DIR": str(tmp_path / "work"),
        "SLMCL_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }


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
