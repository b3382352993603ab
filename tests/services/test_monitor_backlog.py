"""The monitor never waits on itself: many stages at once, and a restart with a backlog.

Real processes on loopback: Redis, the S3 gateway, a trainer worker, four evaluator replicas
and the monitor. The trainer trains every stage while the monitor is down, so the stage
events arrive together when it starts: with a stage pool smaller than the backlog (the
configuration that deadlocked when stages and their evaluation requests shared one pool),
every stage must still be committed exactly once, and the requests must spread over replicas.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from service_common import keys
from service_common.client import MonitorClient
from service_common.local_servers import free_port, stop_pid
from slmcl.config.spec import spec_from_dict
from slmcl.protocol import layout
from slmcl_api.v1 import evaluator_pb2, evaluator_pb2_grpc, monitor_pb2
from tests.conftest import tiny_spec_dict
from tests.services.conftest import start_process, wait_healthy

pytestmark = pytest.mark.integration

REPLICAS = 4


class Stack:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.evaluators = [f"127.0.0.1:{free_port()}" for _ in range(REPLICAS)]
        self.monitor = f"127.0.0.1:{free_port()}"
        self.monitor_starts = 0

    def start_evaluators(self) -> None:
        for i, addr in enumerate(self.evaluators, 1):
            host, port = addr.split(":")
            self.procs[f"evaluator-{i}"] = start_process(
                ["-m", "evaluator_service", "--host", host, "--port", port],
                {**self.env, "SLMCL_REPLICA_ID": f"evaluator-{i}"}, self.logs / f"evaluator-{i}.log")
        for i, addr in enumerate(self.evaluators, 1):
            wait_healthy(addr, self.procs[f"evaluator-{i}"])

    def start_monitor(self, stage_workers: int) -> None:
        self.monitor_starts += 1
        host, port = self.monitor.split(":")
        self.procs["monitor"] = start_process(
            ["-m", "monitor_service", "--host", host, "--port", port],
            {**self.env, "SLMCL_EVALUATORS": ",".join(self.evaluators),
             "SLMCL_MONITOR_STAGE_WORKERS": str(stage_workers)},
            self.logs / f"monitor-{self.monitor_starts}.log")
        wait_healthy(self.monitor, self.procs["monitor"])

    def start_trainer(self) -> None:
        self.procs["trainer"] = start_process(["-m", "trainer_service", "--name", f"trainer-{free_port()}"],
                                              self.env, self.logs / "trainer.log")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        stop_pid(proc.pid)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.logs.glob("*.log")))


@pytest.fixture()
def stack(service_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    s = Stack({**service_env, "SLMCL_TORCH_THREADS": "1"}, tmp_path / "logs")
    s.start_evaluators()
    yield s
    s.stop_all()


def _backlog_run(stack: Stack, spec_dict: dict, stage_workers: int, tmp_path: Path) -> tuple[dict, Path]:
    """Submit, take the monitor down, train every stage, bring the monitor back; returns (counts, results dir)."""
    spec = spec_from_dict(spec_dict)
    stack.start_monitor(stage_workers)
    client = MonitorClient(stack.monitor)
    exp = client.submit(spec)
    client.close()
    stack.stop("monitor")  # nothing measures while the stages pile up

    r = redis.Redis.from_url(stack.env["SLMCL_REDIS_URL"])
    n_stages = sum(len(o) for o in spec.orders) * len(spec.seeds)
    stack.start_trainer()
    deadline = time.monotonic() + 600
    while r.hlen(keys.stage_published_key(exp.id)) < n_stages:
        assert time.monotonic() < deadline, "the trainer did not train every stage\n" + stack.tail()
        time.sleep(1)
    stack.stop("trainer")
    pending = r.xlen(keys.STAGE_EVENTS_STREAM)
    assert pending >= n_stages

    stack.start_monitor(stage_workers)
    client = MonitorClient(stack.monitor)
    deadline = time.monotonic() + 600
    while client.get(exp.id).state not in (monitor_pb2.SUCCEEDED, monitor_pb2.FAILED):
        assert time.monotonic() < deadline, "the backlog was not measured\n" + stack.tail()
        time.sleep(1)
    got = client.get(exp.id)
    assert got.state == monitor_pb2.SUCCEEDED, got.error + "\n" + stack.tail()
    out = client.results(exp.id, tmp_path / "results", include_checkpoints=False)
    served = {}
    for addr in stack.evaluators:
        with grpc.insecure_channel(addr) as ch:
            info = evaluator_pb2_grpc.EvaluatorStub(ch).Info(evaluator_pb2.InfoRequest(), timeout=10)
            served[info.replica_id] = info.requests_served
    return served, out


def _assert_one_record_per_stage(out: Path, spec_dict: dict) -> None:
    spec = spec_from_dict(spec_dict)
    expected = {(layout.run_id(o, s), k) for o in spec.orders for s in spec.seeds for k in range(len(o) + 1)}
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/stage-*.json")]
    assert sorted((r["run_id"], r["step"]) for r in records) == sorted(expected)
    scores = (out / "scores.csv").read_text().splitlines()[1:]
    assert len(scores) == len(set(scores)) == len(expected) * len(spec.tasks)


def test_eight_stages_at_once_spread_over_four_replicas(stack: Stack, tiny_model_dir: Path, data_dir: Path,
                                                        tmp_path: Path) -> None:
    spec = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "x", seeds=[1, 2, 3, 4],
                          training={"max_examples": 4})
    served, out = _backlog_run(stack, spec, stage_workers=8, tmp_path=tmp_path)
    _assert_one_record_per_stage(out, spec)
    busy = [rid for rid, n in served.items() if n > 0]
    assert len(busy) == REPLICAS, f"only {busy} served: evaluation did not follow the replicas ({served})"


def test_restart_with_a_backlog_of_sixteen_stage_events(stack: Stack, tiny_model_dir: Path, data_dir: Path,
                                                        tmp_path: Path) -> None:
    spec = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "x", seeds=[1, 2, 3, 4, 5, 6, 7, 8],
                          training={"max_examples": 4})
    # 4 stage workers: fewer than the 16 waiting stages, as many as the old shared pool had.
    _served, out = _backlog_run(stack, spec, stage_workers=4, tmp_path=tmp_path)
    _assert_one_record_per_stage(out, spec)
