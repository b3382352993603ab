"""Resume, cancel and a restarted trainer, against real processes on loopback (the harness of
``test_faults_outages``): a failed experiment resumes without retraining anything, a cancel stops the
trainer within seconds and nothing is committed after it, and a trainer killed and restarted under the
same name carries on, its abandoned run first in the queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
import redis
from minio import Minio
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from service_common import keys
from service_common.client import MonitorClient, event_data
from slmcl.config.spec import spec_from_dict
from slmcl.protocol import layout
from slmcl_api.v1 import monitor_pb2
from tests.services.conftest import ACCESS_KEY, SECRET_KEY
from tests.services.test_faults_outages import (  # noqa: F401 - undisturbed is a fixture used by name
    TERMINAL,
    FaultStack,
    assert_same_results,
    outage_spec,
    s3_ready,
    undisturbed,
    wait_state,
)

pytestmark = pytest.mark.integration

ACTIVE = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED)


def _objects(stack: FaultStack, prefix: str) -> dict[str, tuple[bytes, datetime]]:
    """Every object under ``prefix`` of the stack's bucket: its bytes and its last-modified time."""
    m = Minio(f"127.0.0.1:{stack.s3.port}", access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
    out = {}
    for o in m.list_objects(stack.env["SLMCL_S3_BUCKET"], prefix=prefix, recursive=True):
        resp = m.get_object(stack.env["SLMCL_S3_BUCKET"], o.object_name)
        try:
            out[o.object_name] = (resp.read(), o.last_modified)
        finally:
            resp.close()
            resp.release_conn()
    return out


def _wait(what: str, cond: object, stack: FaultStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]  # a zero-argument callable
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s\n" + stack.tail()
        time.sleep(0.5)


def _job_status(r: redis.Redis, job_id: str) -> JobStatus | None:
    try:
        return Job.fetch(job_id, connection=r, serializer=JSONSerializer).get_status()
    except Exception:  # noqa: BLE001 - no such job (yet, or any more)
        return None


@pytest.fixture()
def tiny_budget_stack(tmp_path: Path) -> Iterator[FaultStack]:
    """Every service gives up on an outage after 2 s: a store outage fails the experiment on purpose."""
    s = FaultStack(tmp_path, {"SLMCL_RETRY_BUDGET_SECONDS": "2"})
    s.start()
    yield s
    s.stop()


def test_resume_of_an_experiment_failed_by_an_outage_retrains_nothing(
        tiny_budget_stack: FaultStack, tiny_model_dir: Path, data_dir: Path, undisturbed: Path,  # noqa: F811
        tmp_path: Path) -> None:
    stack = tiny_budget_stack
    spec_dict = outage_spec(tiny_model_dir, data_dir, tmp_path / "x")
    rid = layout.run_id(spec_dict["tasks"], 7)
    client = MonitorClient(stack.monitor)
    exp = client.submit(spec_from_dict(spec_dict))
    for ev in client.watch(exp.id, reconnect=False):
        if ev.kind == "stage_trained" and ev.step == 1:
            break
    stack.s3.stop()  # and it stays down past every service's retry budget
    r = stack.r()
    _wait("experiment failed", lambda: r.hget(keys.experiment_hash(exp.id), "state") == b"failed", stack, 150)
    job_id = keys.train_job_id(exp.id, rid)
    _wait("trainer job gave up", lambda: _job_status(r, job_id) not in ACTIVE, stack, 150)
    stack.s3.start(s3_ready)

    runs_prefix = f"{layout.experiment_prefix(exp.id)}/runs/"
    before = {k: v for k, v in _objects(stack, runs_prefix).items() if "/trained-" in k}
    assert f"{runs_prefix}{rid}/trained-1.json" in before, "stage 1 was not trained before the outage"
    assert client.get(exp.id).state == monitor_pb2.FAILED

    client.resume(exp.id)
    with pytest.raises(grpc.RpcError) as err:  # running now: not resumable
        client.resume(exp.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        client.resume("no-such-experiment")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    got = wait_state(client, exp.id, TERMINAL, stack, timeout=240)
    assert got.state == monitor_pb2.SUCCEEDED, got.error + "\n" + stack.tail()
    after = _objects(stack, runs_prefix)
    for key, (content, modified) in before.items():  # nothing trained before the failure was trained again
        assert after[key] == (content, modified), f"{key} was rewritten by the resume"
    out = client.results(exp.id, tmp_path / "results", include_checkpoints=False)
    assert_same_results(out, undisturbed, spec_dict)


def test_cancel_mid_stage_stops_the_trainer_within_seconds_and_commits_nothing_after(
        tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    stack = FaultStack(tmp_path)
    stack.start()
    try:
        # One trainer, two runs: the first trains a long stage 1, the second waits in the queue.
        spec_dict = outage_spec(tiny_model_dir, data_dir, tmp_path / "x", seeds=[1, 2])
        spec_dict["training"]["max_examples"] = 96
        first, second = (layout.run_id(spec_dict["tasks"], s) for s in (1, 2))
        client = MonitorClient(stack.monitor)
        exp = client.submit(spec_from_dict(spec_dict))
        for ev in client.watch(exp.id, reconnect=False):
            if ev.kind == "train_step" and ev.step == 1 and (event_data(ev).get("step") or 0) >= 2:
                break
        t_cancel = time.time()
        client.cancel(exp.id)
        runs_prefix = f"{layout.experiment_prefix(exp.id)}/runs/"
        at_cancel = set(_objects(stack, runs_prefix))
        r = stack.r()
        stream = keys.events_stream(exp.id)

        def events(kind: str) -> list[dict[str, str]]:
            out = []
            for _eid, f in r.xrange(stream):
                fields = {k.decode(): v.decode() for k, v in f.items()}
                if fields["kind"] == kind:
                    out.append(fields)
            return out

        _wait("the trainer stopped the run", lambda: events("run_cancelled"), stack, 15)
        stopped = events("run_cancelled")[0]
        assert stopped["run_id"] == first
        assert float(stopped["time"]) - t_cancel < 10, "the trainer took more than 10 s to stop"
        assert _job_status(r, keys.train_job_id(exp.id, second)) == JobStatus.CANCELED
        time.sleep(5)  # a late commit would land now
        assert [e["run_id"] for e in events("run_started")] == [first], "the queued run started after the cancel"
        final = set(_objects(stack, runs_prefix))
        assert final == at_cancel, f"records written after the cancel: {sorted(final - at_cancel)}"
        assert not [k for k in final if "/trained-" in k or ("/stage-" in k and not k.endswith("/stage-0.json"))]
        got = client.get(exp.id)
        assert got.state == monitor_pb2.CANCELLED
        assert [r_.state for r_ in got.runs] == ["cancelled", "cancelled"]
        assert stack.procs["trainer"].poll() is None, "the trainer died instead of stopping the job"
    finally:
        stack.stop()


def test_trainer_killed_and_restarted_under_its_name_resumes_with_its_run_first(
        tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    stack = FaultStack(tmp_path, {"SLMCL_JOB_HEARTBEAT_TTL": "8", "SLMCL_JOB_HEARTBEAT_INTERVAL": "2"})
    stack.start(trainer_name="trainer-fixed")
    try:
        spec_dict = outage_spec(tiny_model_dir, data_dir, tmp_path / "x", seeds=[1, 2])
        first, second = (layout.run_id(spec_dict["tasks"], s) for s in (1, 2))
        client = MonitorClient(stack.monitor)
        exp = client.submit(spec_from_dict(spec_dict))
        for ev in client.watch(exp.id, reconnect=False):
            if ev.kind == "train_step" and ev.step == 2 and ev.run_id == first:
                break
        stack.kill("trainer")  # kill -9 mid stage 2: its job is abandoned, its worker key left behind
        r = stack.r()
        first_job = keys.train_job_id(exp.id, first)
        _wait("abandoned run requeued", lambda: _job_status(r, first_job) == JobStatus.QUEUED, stack, 60)
        queue = Queue(stack.env.get("SLMCL_QUEUE", "slmcl-train"), connection=r, serializer=JSONSerializer)
        assert queue.job_ids == [first_job, keys.train_job_id(exp.id, second)], "the requeued run is not first"
        trained_1 = f"{layout.experiment_prefix(exp.id)}/runs/{first}/trained-1.json"
        before = _objects(stack, trained_1)[trained_1]

        proc = stack.start_trainer("trainer-fixed")
        got = wait_state(client, exp.id, TERMINAL, stack, timeout=240)
        assert got.state == monitor_pb2.SUCCEEDED, got.error + "\n" + stack.tail()
        assert proc.poll() is None, "the restarted trainer exited\n" + stack.tail()
        assert "There exists an active worker" not in stack.all_logs()
        assert _objects(stack, trained_1)[trained_1] == before, "stage 1 was trained again"
        out = client.results(exp.id, tmp_path / "results", include_checkpoints=False)
        records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/stage-*.json")]
        assert sorted((x["run_id"], x["step"]) for x in records) == sorted(
            (rid, k) for rid in (first, second) for k in range(3))
        scores = (out / "scores.csv").read_text().splitlines()[1:]
        assert len(scores) == len(set(scores)) == 6 * len(spec_dict["tasks"])
    finally:
        stack.stop()
