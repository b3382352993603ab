"""Who may do what, against real processes: a monitor and an evaluator that require a token over TLS
(a self-signed certificate made here), the model policy at both doors, a Redis that wants its password
and an S3 server that answers no anonymous read."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from service_common import auth
from service_common.client import MonitorClient
from service_common.local_servers import Server, free_port, redis_url, start_redis, stop_pid
from slmcl.config.spec import spec_from_dict
from slmcl.storage.factory import open_store
from slmcl_api.v1 import evaluator_pb2, evaluator_pb2_grpc, monitor_pb2, monitor_pb2_grpc
from tests.conftest import REPO, tiny_spec_dict
from tests.services.conftest import ACCESS_KEY, SECRET_KEY, start_process
from tests.unit.test_auth import remote_code_model, self_signed_cert

pytestmark = pytest.mark.integration

TOKEN = "services-test-token-0123456789abcdef"


class Guarded:
    """A monitor and one evaluator, both requiring TOKEN over TLS."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.cert, key = self_signed_cert(tmp / "tls")
        self.models = tmp / "models"
        self.models.mkdir()
        self.env = {**env, auth.TOKENS_ENV: TOKEN, auth.TLS_CERT_ENV: str(self.cert), auth.TLS_KEY_ENV: str(key),
                    auth.TLS_CA_ENV: str(self.cert), auth.MODEL_ALLOWLIST_ENV: str(self.models),
                    "SLMCL_TORCH_THREADS": "1"}
        for var in (auth.TOKEN_ENV, auth.TOKENS_FILE_ENV, auth.TOKEN_FILE_ENV, auth.AUTH_ENV,
                    auth.ALLOW_REMOTE_CODE_ENV):
            self.env.pop(var, None)
        self.logs = tmp / "logs"
        self.evaluator = f"127.0.0.1:{free_port()}"
        self.monitor = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, Any] = {}

    def start(self) -> None:
        host, port = self.evaluator.split(":")
        self.procs["evaluator"] = start_process(["-m", "evaluator_service", "--host", host, "--port", port],
                                                self.env, self.logs / "evaluator.log")
        host, port = self.monitor.split(":")
        self.procs["monitor"] = start_process(["-m", "monitor_service", "--host", host, "--port", port],
                                              {**self.env, "SLMCL_EVALUATORS": self.evaluator},
                                              self.logs / "monitor.log")
        for name, address in (("evaluator", self.evaluator), ("monitor", self.monitor)):
            self.wait_serving(name, address)

    def wait_serving(self, name: str, address: str, timeout: float = 180) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with auth.client_channel(address, token=None, env={auth.TLS_CA_ENV: str(self.cert)}) as ch:  # health: no token
            while time.monotonic() < deadline:
                assert self.procs[name].poll() is None, f"{name} exited\n{self.tail()}"
                try:
                    if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.3)
        raise AssertionError(f"{name} not serving after {timeout} s\n{self.tail()}")

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_pid(proc.pid)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs.glob("*.log"))


@pytest.fixture()
def guarded(service_env: dict[str, str], tmp_path: Path) -> Iterator[Guarded]:
    g = Guarded(service_env, tmp_path)
    try:
        g.start()
        yield g
    finally:
        g.stop()


def _code(fn: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details() or ""


def test_tokens_tls_and_the_model_policy_on_real_services(guarded: Guarded, data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ca = {auth.TLS_CA_ENV: str(guarded.cert)}
    # no token, a wrong token: UNAUTHENTICATED on the monitor and on the evaluator
    with auth.client_channel(guarded.monitor, token=None, env=ca) as ch:
        code, details = _code(lambda: monitor_pb2_grpc.MonitorStub(ch).ListExperiments(
            monitor_pb2.ListExperimentsRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "SLMCL_TOKEN" in details
    with auth.client_channel(guarded.monitor, token="not-the-token-0123456789", env=ca) as ch:
        code, _ = _code(lambda: list(monitor_pb2_grpc.MonitorStub(ch).WatchExperiment(
            monitor_pb2.WatchExperimentRequest(id="x"), timeout=10)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with auth.client_channel(guarded.evaluator, token=None, env=ca) as ch:
        code, _ = _code(lambda: evaluator_pb2_grpc.EvaluatorStub(ch).Info(evaluator_pb2.InfoRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(guarded.monitor) as plain:  # TLS only: a plaintext client gets nowhere
        code, _ = _code(lambda: monitor_pb2_grpc.MonitorStub(plain).ListExperiments(
            monitor_pb2.ListExperimentsRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE

    # the client as a user runs it: token and CA from the environment
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)
    monkeypatch.setenv(auth.TLS_CA_ENV, str(guarded.cert))
    client = MonitorClient(guarded.monitor, timeout=30)
    assert client.list() == []
    from service_common.grpc_server import channel  # what the monitor's evaluator pool uses

    with channel(guarded.evaluator) as ch:
        assert evaluator_pb2_grpc.EvaluatorStub(ch).Info(evaluator_pb2.InfoRequest(), timeout=10).capacity >= 1

    # remote code: refused by the monitor and by the evaluator, and nobody imported the folder's code
    marker = tmp_path / "MARKER"
    folder = remote_code_model(guarded.models / "evil", marker)
    spec = spec_from_dict(tiny_spec_dict(folder, data_dir, tmp_path / "out",
                                         model={"name": str(folder), "trust_remote_code": True}))
    code, details = _code(lambda: client.submit(spec))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "SLMCL_ALLOW_REMOTE_CODE=1" in details, details
    with channel(guarded.evaluator) as ch:
        code, details = _code(lambda: evaluator_pb2_grpc.EvaluatorStub(ch).Drift(
            evaluator_pb2.DriftRequest(experiment_id="e", spec_json=spec.to_json()), timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "trust_remote_code" in details, details
        code, details = _code(lambda: list(evaluator_pb2_grpc.EvaluatorStub(ch).Evaluate(
            evaluator_pb2.EvaluateRequest(experiment_id="e", spec_json=spec.to_json(), task="fomc"), timeout=30)))
        assert code == grpc.StatusCode.PERMISSION_DENIED, details

    # a local folder outside the allowlist, without remote code: refused, naming the setting
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    plain_spec = spec_from_dict(tiny_spec_dict(outside, data_dir, tmp_path / "out2"))
    code, details = _code(lambda: client.submit(plain_spec))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "SLMCL_MODEL_ALLOWLIST" in details, details
    assert client.list() == [], "a refused spec leaves no experiment behind"
    client.close()
    time.sleep(0.5)
    assert not marker.exists(), "a service imported the model folder's code"


def test_redis_wants_its_password(tmp_path: Path) -> None:
    password = "redis-test-password-0123456789"
    server: Server = start_redis(tmp_path / "redis", password=password)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(64).startswith(b"-NOAUTH")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("k", "v")
        r = redis.Redis.from_url(redis_url(server.port, 3, password))
        assert r.set("k", "v") and r.get("k") == b"v"
        conf = tmp_path / "redis" / "redis-auth.conf"
        assert conf.stat().st_mode & 0o077 == 0
        assert password not in " ".join(Path(f"/proc/{server.pid}/cmdline").read_text().split("\0")), \
            "the password must not be visible in ps"
    finally:
        server.stop()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/json"}),
                                    timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_s3_server_answers_no_anonymous_read(s3_server: Server) -> None:
    """The gateway checks its keys, and the filer's own HTTP port (which listed and served every bucket to a
    plain GET) now wants a signed request too."""
    bucket = "t-anonymous"
    store = open_store(f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket}?endpoint=127.0.0.1:{s3_server.port}"
                       "&secure=0&region=us-east-1")
    store.put_bytes("secret/object.json", b'{"private": "payload-7f3a"}')
    assert store.list_keys("secret") == ["secret/object.json"]
    args = " ".join(s3_server.proc.args)
    ports = {name: int(port) for name, port in re.findall(r"-(s3|filer|volume|master)\.port=(\d+)", args)}
    assert set(ports) == {"s3", "filer", "volume", "master"}, args
    for name, port in ports.items():
        for path in (f"/{bucket}", f"/{bucket}?list-type=2", f"/{bucket}/secret/object.json", f"/buckets/{bucket}/",
                     f"/buckets/{bucket}/secret/object.json", "/buckets/", "/"):
            status, body = _get(f"http://127.0.0.1:{port}{path}")
            assert b"payload-7f3a" not in body, (name, path, status, body[:200])
            if "object.json" not in path:  # an error may echo the key asked for; a listing must not reveal it
                assert b"object.json" not in body, (name, path, status, body[:200])
            if name in ("s3", "filer"):
                assert status in (401, 403, 404, 405), (name, path, status, body[:200])


def test_make_stack_requires_its_token_and_redis_password(tmp_path: Path) -> None:
    d, port = tmp_path / "stack", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLMCL_TOKEN", "SLMCL_TLS", "SLMCL_AUTH"))}
    env.update({"SLMCL_DEVICE": "cpu", "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path / "home")})

    def stack(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "stack.py"), *args, "--dir", str(d)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=360)

    try:
        up = stack("up", "--monitor-port", str(port), "--evaluators", "1", "--timeout", "300")
        assert up.returncode == 0, up.stdout + up.stderr
        token_file = d / "token"
        assert f"export SLMCL_TOKEN_FILE={token_file}" in up.stdout
        assert token_file.stat().st_mode & 0o077 == 0 and len(token_file.read_text().strip()) >= 32
        state_text = (d / "pids.json").read_text()
        creds = dict(line.split("=", 1) for line in (d / "credentials.env").read_text().splitlines()
                     if "=" in line and not line.startswith("#"))
        assert creds["SLMCL_REDIS_PASSWORD"] not in state_text and token_file.read_text().strip() not in state_text
        state = json.loads(state_text)

        address = f"127.0.0.1:{port}"
        with auth.client_channel(address, token=None, env={}) as ch:
            code, details = _code(lambda: monitor_pb2_grpc.MonitorStub(ch).ListExperiments(
                monitor_pb2.ListExperimentsRequest(), timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
        with auth.client_channel(address, env={auth.TOKEN_FILE_ENV: str(token_file)}) as ch:
            assert list(monitor_pb2_grpc.MonitorStub(ch).ListExperiments(
                monitor_pb2.ListExperimentsRequest(), timeout=10).experiments) == []
        ev_port = state["ports"]["evaluator-1"]
        with auth.client_channel(f"127.0.0.1:{ev_port}", token=None, env={}) as ch:
            code, _ = _code(lambda: evaluator_pb2_grpc.EvaluatorStub(ch).Info(evaluator_pb2.InfoRequest(), timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=state["ports"]["redis"]).keys()
        assert redis.Redis.from_url(redis_url(state["ports"]["redis"], 0, creds["SLMCL_REDIS_PASSWORD"])).ping()
    finally:
        stop = stack("stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
