"""Outages are waited out: the store or Redis goes away mid-run and comes back, and the experiment ends
with the numbers of an undisturbed run (the embedded ``slmcl run`` of the same spec), one record per stage.

Each test runs its own Redis and SeaweedFS (so it can stop and restart them on the same directory and
port without touching other tests), one evaluator, the monitor and a trainer worker, all as processes
on loopback. The harness here is shared with ``test_faults_control.py``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service_common.client import MonitorClient
from service_common.local_servers import Server, free_port, start_redis, start_s3, stop_pid
from slmcl.config.spec import spec_from_dict
from slmcl.protocol import layout
from slmcl.protocol.embedded import ExperimentRunner
from slmcl_api.v1 import monitor_pb2
from tests.conftest import tiny_spec_dict
from tests.services.conftest import ACCESS_KEY, SECRET_KEY, start_process, wait_healthy

pytestmark = pytest.mark.integration

TERMINAL = (monitor_pb2.SUCCEEDED, monitor_pb2.FAILED, monitor_pb2.CANCELLED)


class Backing:
    """A server process we can stop and start again with the very same command line, environment and port."""

    def __init__(self, server: Server, cwd: Path) -> None:
        self.server, self.cwd = server, cwd
        self.args = list(server.proc.args)
        self.env = _proc_environ(server.pid)  # JWT keys and credentials it was started with
        self.proc: subprocess.Popen[bytes] | None = server.proc

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc = None

    def start(self, ready: Any, timeout: float = 60.0) -> None:
        log = open(self.cwd / "restarts.log", "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.cwd)
        log.close()
        deadline = time.monotonic() + timeout
        while not ready(self.port):
            assert self.proc.poll() is None, f"{self.args[0]} exited with {self.proc.returncode} on restart"
            assert time.monotonic() < deadline, f"{self.args[0]} not ready {timeout} s after its restart"
            time.sleep(0.2)


def _proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def redis_ready(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def s3_ready(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5)
        return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: it answers
    except OSError:
        return False


class FaultStack:
    """Private Redis + S3, one evaluator, the monitor and trainer workers; every process's log under ``logs``."""

    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.redis = Backing(start_redis(tmp / "redis"), tmp / "redis")
        self.s3 = Backing(start_s3(tmp / "s3", ACCESS_KEY, SECRET_KEY), tmp / "s3")
        self.env = {
            **os.environ,
            "SLMCL_REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/0",
            "SLMCL_S3_ENDPOINT": f"127.0.0.1:{self.s3.port}",
            "SLMCL_S3_ACCESS_KEY": ACCESS_KEY,
            "SLMCL_S3_SECRET_KEY": SECRET_KEY,
            "SLMCL_S3_BUCKET": "faults",
            "SLMCL_WORK_DIR": str(tmp / "work"),
            "SLMCL_DEVICE": "cpu",
            "SLMCL_TORCH_THREADS": "1",
            "SLMCL_RETRY_MAX_WAIT_SECONDS": "3",  # come back promptly once the outage is over
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.evaluator = f"127.0.0.1:{free_port()}"
        self.monitor = f"127.0.0.1:{free_port()}"
        self.starts = 0

    def start(self, trainer_name: str = "trainer-a") -> None:
        host, port = self.evaluator.split(":")
        self.procs["evaluator"] = start_process(["-m", "evaluator_service", "--host", host, "--port", port],
                                                {**self.env, "SLMCL_REPLICA_ID": "evaluator-1"},
                                                self.logs / "evaluator.log")
        host, port = self.monitor.split(":")
        self.procs["monitor"] = start_process(["-m", "monitor_service", "--host", host, "--port", port],
                                              {**self.env, "SLMCL_EVALUATORS": self.evaluator},
                                              self.logs / "monitor.log")
        self.start_trainer(trainer_name)
        wait_healthy(self.evaluator, self.procs["evaluator"])
        wait_healthy(self.monitor, self.procs["monitor"])

    def start_trainer(self, name: str) -> subprocess.Popen[bytes]:
        self.starts += 1
        proc = start_process(["-m", "trainer_service", "--name", name], self.env,
                             self.logs / f"trainer-{self.starts}.log")
        self.procs["trainer"] = proc
        return proc

    def kill(self, name: str) -> None:
        import signal

        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_pid(proc.pid)
        self.s3.stop()
        self.redis.stop()

    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["SLMCL_REDIS_URL"])

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logs.glob("*.log")))


@pytest.fixture()
def fault_stack(tmp_path: Path) -> Iterator[FaultStack]:
    s = FaultStack(tmp_path)
    s.start()
    yield s
    s.stop()


# A spec whose two stages train long enough (24 optimizer steps each) for a fault to land mid-run.
def outage_spec(tiny_model_dir: Path, data_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    return tiny_spec_dict(tiny_model_dir, data_dir, out, training={"max_examples": 24, "batch_size": 1,
                                                                   "grad_accum": 1}, **overrides)


@pytest.fixture(scope="module")
def undisturbed(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same spec run embedded, with nothing going wrong."""
    out = tmp_path_factory.mktemp("undisturbed")
    ExperimentRunner(spec_from_dict(outage_spec(tiny_model_dir, data_dir, out))).run()
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_results(out: Path, reference: Path, spec_dict: dict[str, Any]) -> None:
    """Exactly one record per stage and task, and the numbers of the undisturbed run."""
    spec = spec_from_dict(spec_dict)
    expected = sorted((layout.run_id(o, s), k) for o in spec.orders for s in spec.seeds for k in range(len(o) + 1))
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/stage-*.json")]
    assert sorted((r["run_id"], r["step"]) for r in records) == expected

    def key(r: dict[str, str]) -> tuple[str, ...]:
        return r["seed"], r["step"], r["eval_task"]

    got = sorted(read_csv(out / "scores.csv"), key=key)
    assert len({key(r) for r in got}) == len(got) == len(expected) * len(spec.tasks)
    assert got == sorted(read_csv(reference / "scores.csv"), key=key)
    stab = sorted(read_csv(out / "stability.csv"), key=lambda r: (r["seed"], r["step"]))
    ref = sorted(read_csv(reference / "stability.csv"), key=lambda r: (r["seed"], r["step"]))
    assert len(stab) == len(ref) == len(expected)
    for a, b in zip(stab, ref):
        for col in a:
            if col.startswith(("kl_", "entropy", "margin")):
                assert float(a[col]) == pytest.approx(float(b[col]), abs=1e-6), col


def wait_state(client: MonitorClient, exp_id: str, states: tuple[int, ...], stack: FaultStack,
               timeout: float) -> monitor_pb2.Experiment:
    deadline = time.monotonic() + timeout
    while True:
        try:
            exp = client.get(exp_id)
            if exp.state in states:
                return exp
        except Exception:  # noqa: BLE001 - the monitor may be waiting out an outage; keep asking
            pass
        assert time.monotonic() < deadline, f"experiment not in {states} after {timeout} s\n" + stack.tail()
        time.sleep(1)


def _store_outage(fault_stack: FaultStack, tiny_model_dir: Path, data_dir: Path, undisturbed: Path,
                  tmp_path: Path, outage_seconds: float) -> None:
    spec_dict = outage_spec(tiny_model_dir, data_dir, tmp_path / "x")
    client = MonitorClient(fault_stack.monitor)
    exp = client.submit(spec_from_dict(spec_dict))
    for ev in client.watch(exp.id):  # stage 1 trained: the monitor measures it while stage 2 trains
        if ev.kind == "stage_trained" and ev.step == 1:
            break
    fault_stack.s3.stop()
    time.sleep(outage_seconds)
    fault_stack.s3.start(s3_ready)
    got = wait_state(client, exp.id, TERMINAL, fault_stack, timeout=240)
    assert got.state == monitor_pb2.SUCCEEDED, got.error + "\n" + fault_stack.tail()
    assert all(r.state == "done" for r in got.runs)
    out = client.results(exp.id, tmp_path / "results", include_checkpoints=False)
    assert_same_results(out, undisturbed, spec_dict)
    assert "s3 " in fault_stack.all_logs() and "retrying in" in fault_stack.all_logs(), \
        "nothing waited for the store: the outage did not land mid-run"


def test_store_down_for_a_minute_mid_run_gives_the_undisturbed_numbers(
        fault_stack: FaultStack, tiny_model_dir: Path, data_dir: Path, undisturbed: Path, tmp_path: Path) -> None:
    _store_outage(fault_stack, tiny_model_dir, data_dir, undisturbed, tmp_path, outage_seconds=60)


@pytest.mark.slow
def test_store_down_for_five_minutes_mid_run_gives_the_undisturbed_numbers(
        fault_stack: FaultStack, tiny_model_dir: Path, data_dir: Path, undisturbed: Path, tmp_path: Path) -> None:
    _store_outage(fault_stack, tiny_model_dir, data_dir, undisturbed, tmp_path, outage_seconds=300)


def test_redis_restart_mid_run_and_a_watch_opened_before_it_reaches_the_end(
        fault_stack: FaultStack, tiny_model_dir: Path, data_dir: Path, undisturbed: Path, tmp_path: Path) -> None:
    spec_dict = outage_spec(tiny_model_dir, data_dir, tmp_path / "x")
    client = MonitorClient(fault_stack.monitor)
    exp = client.submit(spec_from_dict(spec_dict))
    events = []
    restarted = False
    deadline = time.monotonic() + 240
    for ev in client.watch(exp.id):  # one stream, opened before the restart, read to the end
        events.append(ev)
        if not restarted and ev.kind == "stage_trained" and ev.step == 1:
            fault_stack.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
            time.sleep(3)
            fault_stack.redis.start(redis_ready)
            restarted = True
        assert time.monotonic() < deadline, "experiment did not finish in time\n" + fault_stack.tail()
    assert restarted
    assert "redis: " in fault_stack.all_logs() and "retrying in" in fault_stack.all_logs(), \
        "nothing waited for Redis: the restart did not land mid-run"
    assert events[-1].kind == "experiment_done", fault_stack.tail()
    assert events[-1].state == monitor_pb2.SUCCEEDED
    ids = [e.event_id for e in events]
    assert len(ids) == len(set(ids)), "the watch repeated events after reconnecting"
    done = sorted((e.stage.run_id, e.stage.step) for e in events if e.kind == "stage_done")
    assert done == [("fomc.numgluecm-s7", k) for k in range(3)]
    out = client.results(exp.id, tmp_path / "results", include_checkpoints=False)
    assert_same_results(out, undisturbed, spec_dict)


def test_a_watch_survives_a_monitor_restart_without_repeating_or_losing_events(
        fault_stack: FaultStack, tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    spec_dict = outage_spec(tiny_model_dir, data_dir, tmp_path / "x")
    client = MonitorClient(fault_stack.monitor)
    exp = client.submit(spec_from_dict(spec_dict))
    events = []
    restarted = False
    for ev in client.watch(exp.id):  # the same iterator across the restart
        events.append(ev)
        if not restarted and ev.kind == "stage_trained" and ev.step == 1:
            fault_stack.kill("monitor")
            host, port = fault_stack.monitor.split(":")
            fault_stack.procs["monitor"] = start_process(
                ["-m", "monitor_service", "--host", host, "--port", port],
                {**fault_stack.env, "SLMCL_EVALUATORS": fault_stack.evaluator}, fault_stack.logs / "monitor-2.log")
            restarted = True
    assert restarted and events[-1].kind == "experiment_done", fault_stack.tail()
    ids = [e.event_id for e in events]
    assert len(ids) == len(set(ids)) and ids == sorted(ids, key=lambda i: tuple(int(x) for x in i.split("-")))
    r = fault_stack.r()
    stored = [eid.decode() for eid, _ in r.xrange(f"slmcl:events:{exp.id}")]
    assert ids == stored[:len(ids)], "the watch lost or invented events across the restart"
    done = sorted((e.stage.run_id, e.stage.step) for e in events if e.kind == "stage_done")
    assert done == [("fomc.numgluecm-s7", k) for k in range(3)]
