"""The monitor's limits and its answers to bad requests, against a real monitor process (Redis, the S3 gateway).

A refused submit leaves nothing behind (no Redis key, no object); a malformed request field is INVALID_ARGUMENT
naming the field, never INTERNAL. No trainer runs and the evaluator address accepts connections but never
answers, so an accepted experiment stays in flight for the whole test.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from service_common.client import MonitorClient
from service_common.local_servers import Server, free_port, stop_pid
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.storage.factory import open_store
from slmcl_api.v1 import monitor_pb2
from tests.conftest import tiny_spec_dict
from tests.services.conftest import ACCESS_KEY, SECRET_KEY, start_process, wait_healthy

pytestmark = pytest.mark.integration

LIMITS = {"SLMCL_MAX_RUNS_PER_EXPERIMENT": "2", "SLMCL_MAX_EXPERIMENTS_IN_FLIGHT": "1",
          "SLMCL_MAX_DATASET_BYTES": str(256 * 1024), "SLMCL_MAX_DATASET_ROWS": "1000",
          "SLMCL_MAX_REQUEST_BYTES": str(1024 * 1024)}


class Monitor:
    def __init__(self, address: str, proc: subprocess.Popen[bytes], env: dict[str, str], log: Path) -> None:
        self.address, self.proc, self.env, self.log = address, proc, env, log
        self.client = MonitorClient(address)
        self.own_keys = self.redis_keys()  # the monitor's own (its stage-event consumer group)

    def redis_keys(self) -> list[bytes]:
        return sorted(redis.Redis.from_url(self.env["SLMCL_REDIS_URL"]).keys("slmcl:*"))

    def new_redis_keys(self) -> list[bytes]:
        return [k for k in self.redis_keys() if k not in self.own_keys]

    def objects(self, s3_port: int) -> list[str]:
        store = open_store(f"s3://{ACCESS_KEY}:{SECRET_KEY}@{self.env['SLMCL_S3_BUCKET']}"
                           f"?endpoint=127.0.0.1:{s3_port}&secure=0")
        return store.list_keys("")


@pytest.fixture()
def blackhole() -> Iterator[str]:
    """An evaluator address that accepts TCP connections and never speaks: evaluations wait, nothing fails."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture()
def monitor(service_env: dict[str, str], tmp_path: Path, blackhole: str, tiny_model_dir: Path) -> Iterator[Monitor]:
    address = f"127.0.0.1:{free_port()}"
    env = {**service_env, **LIMITS, "SLMCL_EVALUATORS": blackhole, "SLMCL_MODEL_ALLOWLIST": str(tiny_model_dir)}
    host, port = address.split(":")
    log = tmp_path / "monitor.log"
    proc = start_process(["-m", "monitor_service", "--host", host, "--port", port], env, log)
    try:
        wait_healthy(address, proc)
        m = Monitor(address, proc, env, log)
        yield m
        m.client.close()
    finally:
        stop_pid(proc.pid)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]  # every refusal was a status, not a bug


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def _spec(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, **kw: Any) -> ExperimentSpec:
    return spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "out", **kw))


def _rows(path: Path, n: int, pad: int = 0) -> Path:
    path.write_text(json.dumps([{"prompt": f"question {i} " + "x" * pad, "answer": str(i)} for i in range(n)]))
    return path


def test_malformed_fields_are_invalid_argument(monitor: Monitor) -> None:
    c, stub = monitor.client, monitor.client.stub
    cases: dict[str, tuple[Callable[[], Any], str]] = {
        "get ../": (lambda: c.get("../etc"), "id"),
        "get slash": (lambda: c.get("a/b"), "id"),
        "get empty": (lambda: c.get(""), "id"),
        "get dots": (lambda: c.get(".."), "id"),
        "cancel": (lambda: c.cancel("x/../y"), "id"),
        "resume": (lambda: stub.ResumeExperiment(monitor_pb2.ResumeExperimentRequest(id="../x")), "id"),
        "watch id": (lambda: list(c.watch("a/b")), "id"),
        "watch after": (lambda: list(c.watch("20260101-000000-abcdef", after="$")), "after_event_id"),
        "watch after text": (lambda: list(c.watch("20260101-000000-abcdef", after="1-x")), "after_event_id"),
        "results": (lambda: list(stub.GetResults(monitor_pb2.GetResultsRequest(id="../../secret"))), "id"),
        "pull run ..": (lambda: list(stub.GetCheckpoint(monitor_pb2.GetCheckpointRequest(
            id="20260101-000000-abcdef", run_id="../../x-s1", step=1))), "run_id"),
        "pull run /": (lambda: list(stub.GetCheckpoint(monitor_pb2.GetCheckpointRequest(
            id="20260101-000000-abcdef", run_id="fomc/x-s1", step=1))), "run_id"),
        "pull step": (lambda: list(stub.GetCheckpoint(monitor_pb2.GetCheckpointRequest(
            id="20260101-000000-abcdef", run_id="fomc.numgluecm-s7", step=-1))), "step"),
        "request id": (lambda: stub.SubmitExperiment(monitor_pb2.SubmitExperimentRequest(
            spec_json="{}", client_request_id="a b/../c")), "client_request_id"),
        "spec not json": (lambda: stub.SubmitExperiment(monitor_pb2.SubmitExperimentRequest(spec_json="{")),
                          "spec_json"),
    }
    for name, (call, field) in cases.items():
        code, details = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {code} {details}"
        assert details.startswith(field), f"{name}: {details}"
    # well-formed but unknown: NOT_FOUND, as before
    for call in (lambda: c.get("20260101-000000-abcdef"), lambda: list(c.watch("nope", after="0-0")),
                 lambda: list(stub.GetCheckpoint(monitor_pb2.GetCheckpointRequest(
                     id="nope", run_id="fomc.numgluecm-s7", step=1)))):
        assert _code(call)[0] == grpc.StatusCode.NOT_FOUND
    assert monitor.new_redis_keys() == []


def test_limits_refuse_before_anything_is_written(monitor: Monitor, s3_server: Server, tiny_model_dir: Path,
                                                  data_dir: Path, tmp_path: Path) -> None:
    c = monitor.client
    refused: dict[str, tuple[ExperimentSpec, grpc.StatusCode, str]] = {
        "runs": (_spec(tiny_model_dir, data_dir, tmp_path, seeds=[1, 2, 3]), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "strategies x orders x seeds: 1 x 1 x 3 = 3 runs"),
        "bytes": (_spec(tiny_model_dir, data_dir, tmp_path, reference={
            "file": str(_rows(tmp_path / "big.json", 300, pad=1000))}), grpc.StatusCode.RESOURCE_EXHAUSTED,
                  "SLMCL_MAX_DATASET_BYTES"),
        "rows": (_spec(tiny_model_dir, data_dir, tmp_path, reference={
            "file": str(_rows(tmp_path / "many.json", 1001))}), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "more than 1000 rows"),
        "request": (_spec(tiny_model_dir, data_dir, tmp_path, reference={
            "file": str(_rows(tmp_path / "huge.json", 600, pad=2000))}), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    }
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "answer": "A"}] * 700 + [{"prompt": "y"}]))
    refused["bad row"] = (_spec(tiny_model_dir, data_dir, tmp_path, reference={"file": str(bad)}),
                          grpc.StatusCode.INVALID_ARGUMENT, f"reference.file ({bad}) row 700: missing key(s) 'answer'")
    for name, (spec, want, fragment) in refused.items():
        request_id = "req-" + name.replace(" ", "-")
        code, details = _code(lambda s=spec, r=request_id: c.submit(s, client_request_id=r))
        assert code == want and fragment in details, f"{name}: {code} {details}"
    assert monitor.new_redis_keys() == []  # not even the idempotency key of a refused request
    assert monitor.objects(s3_server.port) == []

    first = c.submit(_spec(tiny_model_dir, data_dir, tmp_path))
    assert c.get(first.id).state in (monitor_pb2.QUEUED, monitor_pb2.RUNNING)
    code, details = _code(lambda: c.submit(_spec(tiny_model_dir, data_dir, tmp_path)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "SLMCL_MAX_EXPERIMENTS_IN_FLIGHT=1" in details, details
    assert [e.id for e in c.list()] == [first.id]
    c.cancel(first.id)  # no longer in flight: the next one is accepted
    assert c.submit(_spec(tiny_model_dir, data_dir, tmp_path)).id != first.id
