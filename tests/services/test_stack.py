"""scripts/stack.py end to end: `up` starts the whole local stack as detached processes and
returns once it is healthy, `status` reports it, a second `up` is refused, `stop` ends exactly
what pids.json lists."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.stack import alive  # the same liveness test the script uses (zombies count as dead)
from service_common.local_servers import free_port

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack.py"
NAMES = {"redis", "s3", "trainer-1", "evaluator-1", "evaluator-2", "monitor"}
UP_TIMEOUT = 420  # the services may load the embedded model at start (about 20 s on 2 cores, once)

pytestmark = pytest.mark.integration


def stack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLMCL_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(STACK), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def health(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def test_stack_up_status_stop(tmp_path: Path) -> None:
    d = tmp_path / "stack"
    port = free_port()
    pids_file = d / "pids.json"
    try:
        up = stack("up", "--dir", str(d), "--monitor-port", str(port), "--evaluators", "2", "--trainers", "1",
                   "--timeout", str(UP_TIMEOUT - 60), timeout=UP_TIMEOUT)
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        assert f"export SLMCL_SERVER=127.0.0.1:{port}" in up.stdout

        state = json.loads(pids_file.read_text())
        pids = state["pids"]
        assert set(pids) == NAMES, pids
        assert all(alive(pid) for pid in pids.values()), {n: alive(p) for n, p in pids.items()}
        assert state["ports"]["monitor"] == port
        ev_ports = [state["ports"]["evaluator-1"], state["ports"]["evaluator-2"]]
        assert len(set(ev_ports)) == 2
        assert state["env"]["SLMCL_EVALUATORS"] == ",".join(f"127.0.0.1:{p}" for p in ev_ports)
        for name in pids:
            assert (d / "logs" / f"{name}.log").exists(), name

        # the processes outlive `up` (their own sessions), and answer health checks
        assert health(f"127.0.0.1:{port}") == "SERVING"
        for p in ev_ports:
            assert health(f"127.0.0.1:{p}") == "SERVING"

        # credentials: generated once, random, private
        creds = (d / "credentials.env").read_text()
        assert "SLMCL_S3_ACCESS_KEY=" in creds and "SLMCL_S3_SECRET_KEY=" in creds
        assert (d / "credentials.env").stat().st_mode & 0o077 == 0
        secret = creds.split("SLMCL_S3_SECRET_KEY=", 1)[1].split()[0]
        assert len(secret) >= 32 and secret not in pids_file.read_text(), "pids.json must not hold the secret"

        status = stack("status", "--dir", str(d))
        assert status.returncode == 0, status.stdout + status.stderr
        assert all(name in status.stdout for name in NAMES) and "DEAD" not in status.stdout

        again = stack("up", "--dir", str(d), "--monitor-port", str(free_port()))
        assert again.returncode == 1 and "already running" in again.stderr, again.stdout + again.stderr
        assert json.loads(pids_file.read_text())["pids"] == pids, "a refused `up` must not touch pids.json"

        stop = stack("stop", "--dir", str(d), timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not pids_file.exists()
        assert not [name for name, pid in pids.items() if alive(pid)], "still running after stop"
        assert (d / "credentials.env").read_text() == creds, "credentials are kept for the next `up`"
    finally:
        leftover = json.loads(pids_file.read_text()) if pids_file.exists() else None
        if leftover:
            stack("stop", "--dir", str(d), timeout=180)
            for pid in leftover["pids"].values():  # last resort: never leave servers behind
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)


def test_stack_up_undoes_everything_when_a_service_dies_at_start(tmp_path: Path) -> None:
    d = tmp_path / "stack"
    env_bad = {"SLMCL_EVAL_SHARDS_PER_TASK": "not-a-number"}  # every service's Settings() raises
    proc = subprocess.run([sys.executable, str(STACK), "up", "--dir", str(d), "--monitor-port", str(free_port())],
                          cwd=REPO, env={**os.environ, "SLMCL_DEVICE": "cpu", **env_bad}, capture_output=True,
                          text=True, timeout=UP_TIMEOUT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # The stack's own settings fail first now (it builds the store URL from them) or a service's log tail is shown:
    # either way the cause is on stderr.
    assert "SLMCL_EVAL_SHARDS_PER_TASK='not-a-number': expected a whole number" in proc.stderr, \
        "the cause of the failure is shown, the setting named"
    assert not (d / "pids.json").exists()
    started = [int(m) for m in re.findall(r"\(pid (\d+)", proc.stdout + proc.stderr)]
    assert started and not [pid for pid in started if alive(pid)], "nothing it started is left running"


def test_stack_up_fails_cleanly_when_the_monitor_port_is_taken(tmp_path: Path) -> None:
    import socket

    d = tmp_path / "stack"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        up = stack("up", "--dir", str(d), "--monitor-port", str(busy))
    assert up.returncode == 1 and f"port {busy}" in up.stderr, up.stdout + up.stderr
    assert not (d / "pids.json").exists()


def test_stop_without_a_stack_is_a_no_op(tmp_path: Path) -> None:
    proc = stack("stop", "--dir", str(tmp_path / "none"))
    assert proc.returncode == 0 and "no stack" in proc.stdout
    proc = stack("status", "--dir", str(tmp_path / "none"))
    assert proc.returncode == 1 and "no stack" in proc.stdout
