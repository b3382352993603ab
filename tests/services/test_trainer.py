"""The trainer worker against real Redis, the S3 gateway and real worker processes.

The experiment is set up in the store the way the monitor does it (datasets content-addressed,
spec paths rewritten to ``store:`` keys), the run is enqueued with ``enqueue_run``, and a
``python -m trainer_service`` process trains it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from service_common import keys
from service_common.datasets import map_paths, sha256_hex
from service_common.local_servers import stop_pid
from service_common.run_queue import enqueue_run
from service_common.s3_store import S3Store
from service_common.settings import Settings
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.protocol import layout
from slmcl.protocol.embedded import ExperimentRunner
from slmcl.protocol.layout import checkpoint_prefix, run_id
from slmcl.storage.local import get_dir
from tests.conftest import REPO, tiny_spec_dict

pytestmark = pytest.mark.integration


class Ctx:
    """The test's own view of the stack: the store, Redis and the train queue of this test's env."""

    def __init__(self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        for k, v in env.items():
            if k.startswith("SLMCL_"):
                monkeypatch.setenv(k, v)
        self.env, self.tmp = env, tmp
        self.settings = Settings()
        self.store = S3Store.from_settings(self.settings)
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.queue = Queue(self.settings.queue, connection=self.redis, serializer=JSONSerializer)
        self.workers: list[tuple[subprocess.Popen, Path]] = []

    def put_experiment(self, exp_id: str, spec_dict: dict[str, Any]) -> ExperimentSpec:
        """As the monitor does: datasets to datasets/<sha256>.json, paths to store: keys, spec.json."""
        spec = spec_from_dict(spec_dict)

        def upload(path: str) -> str:
            data = Path(path).read_bytes()
            key = layout.dataset_key(sha256_hex(data))
            if not self.store.exists(key):
                self.store.put_bytes(key, data)
            return keys.STORE_PREFIX + key

        remote = map_paths(spec, upload)
        self.store.put_bytes(f"{layout.experiment_prefix(exp_id)}/spec.json", remote.to_json().encode())
        return spec

    def start_worker(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.tmp / f"worker-{len(self.workers) + 1}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "trainer_service", *args], env=env or self.env, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}"
                         for _, log in self.workers if log.exists())

    def stop_all(self) -> None:
        for proc, _ in self.workers:
            if proc.poll() is None:
                stop_pid(proc.pid, grace=10)

    def wait(self, cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def wait_exit(self, proc: subprocess.Popen, timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {proc.pid} still running after {timeout:.0f} s\n{self.logs()}") from None

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)

    def events(self, exp_id: str) -> list[dict[str, Any]]:
        out = []
        for _eid, raw in self.redis.xrange(keys.events_stream(exp_id)):
            f = {k.decode(): v.decode() for k, v in raw.items()}
            assert set(f) == {"kind", "run_id", "step", "task", "data_json", "time"}, f
            out.append({**f, "step": int(f["step"]), "data": json.loads(f["data_json"]), "time": float(f["time"])})
        return out

    def stage_events(self) -> list[dict[str, str]]:
        return [{k.decode(): v.decode() for k, v in raw.items()}
                for _, raw in self.redis.xrange(keys.STAGE_EVENTS_STREAM)]

    def key(self, exp_id: str, rel: str) -> str:
        return f"{layout.experiment_prefix(exp_id)}/{rel}"


@pytest.fixture()
def ctx(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    c = Ctx(service_env, monkeypatch, tmp_path)
    yield c
    c.stop_all()


def _adapter_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_adapter(ctx: Ctx, exp_id: str, rid: str, step: int, embedded_dir: Path) -> Path:
    import torch

    local = get_dir(ctx.store, ctx.key(exp_id, checkpoint_prefix(rid, step)), ctx.tmp / "got" / f"step-{step}")
    got, want = _adapter_tensors(local), _adapter_tensors(embedded_dir / checkpoint_prefix(rid, step))
    assert sorted(got) == sorted(want) and got
    diff = [k for k in want if not torch.equal(got[k], want[k])]
    assert not diff, f"stage {step}: {len(diff)} tensors differ from the embedded run's, e.g. {diff[:2]}"
    return local


def test_run_publishes_each_stage_and_matches_the_embedded_run(ctx: Ctx, tiny_model_dir: Path, data_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exp = "exp-a"
    spec = ctx.put_experiment(exp, tiny_spec_dict(tiny_model_dir, data_dir, ctx.tmp / "embedded"))
    order, seed = spec.orders[0], spec.seeds[0]
    rid = run_id(order, seed)
    job = enqueue_run(ctx.queue, exp, order, seed)
    assert job.id == keys.train_job_id(exp, rid)
    assert enqueue_run(ctx.queue, exp, order, seed).id == job.id
    assert ctx.queue.count == 1  # the second enqueue of a queued run added nothing

    worker = ctx.start_worker("--burst")
    ExperimentRunner(spec).run()  # the embedded run, meanwhile, in this process
    assert ctx.wait_exit(worker, 150) == 0, ctx.logs()

    job = ctx.job(job.id)
    assert job.get_status() == JobStatus.FINISHED, ctx.logs()
    assert job.return_value()["trained"] == [1, 2] and job.return_value()["resumed_from"] == 0

    # Adapters: loadable by PEFT, bit-identical to the embedded run's.
    for step in (1, 2):
        local = assert_same_adapter(ctx, exp, rid, step, ctx.tmp / "embedded")
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in local.iterdir()}
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(local))

    # Training records: the embedded stage records' `train`, same losses to the bit.
    for step, task in enumerate(order, start=1):
        rec = json.loads(ctx.store.get_bytes(ctx.key(exp, layout.trained_key(rid, step))))
        emb = json.loads((ctx.tmp / "embedded" / f"runs/{rid}/stage-{step}.json").read_text())
        assert {k: rec[k] for k in ("run_id", "order", "seed", "step", "task", "checkpoint")} == {
            "run_id": rid, "order": order, "seed": seed, "step": step, "task": task,
            "checkpoint": checkpoint_prefix(rid, step)}
        assert set(rec["train"]) == set(emb["train"])
        assert [s["loss"] for s in rec["train"]["steps"]] == [s["loss"] for s in emb["train"]["steps"]]
        assert (rec["train"]["tokens"], rec["train"]["examples"]) == (emb["train"]["tokens"], emb["train"]["examples"])

    # One stage notice per stage, in order, all string fields.
    assert ctx.stage_events() == [
        {"experiment_id": exp, "run_id": rid, "step": str(k), "task": order[k - 1], "order": json.dumps(order),
         "seed": str(seed), "checkpoint": checkpoint_prefix(rid, k)} for k in (1, 2)]

    events = ctx.events(exp)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_done", kinds
    assert [e["step"] for e in events if e["kind"] == "stage_trained"] == [1, 2]
    steps = [e for e in events if e["kind"] == "train_step"]
    assert steps and set(steps[0]["data"]) == {"step", "total_steps", "loss", "examples_per_s", "tokens_per_s"}
    assert all(e["run_id"] == rid for e in events)

    # A finished run enqueued again is a fresh job (it would resume with nothing to train), not a duplicate.
    again = enqueue_run(ctx.queue, exp, order, seed)
    assert again.id == job.id and again.get_status() == JobStatus.QUEUED and ctx.queue.count == 1


def test_killed_worker_job_resumes_on_another_worker_without_repeating_stages(
        ctx: Ctx, tiny_model_dir: Path, data_dir: Path) -> None:
    """kill -9 of a worker mid-run: after the job heartbeat TTL the next worker resumes it.

    Recovery here relies on the new worker's own registry maintenance (``--maintenance-interval 3``,
    ``--worker-ttl 20``: it wakes every 5 s); in production the monitor also calls
    ``StartedJobRegistry.cleanup()`` periodically. The heartbeat TTL is shortened to 8 s.
    """
    exp = "exp-crash"
    spec_dict = tiny_spec_dict(tiny_model_dir, data_dir, ctx.tmp / "embedded",
                               tasks=["fomc", "numgluecm", "scienceqa"],
                               training={"max_examples": 16, "batch_size": 2, "grad_accum": 1})
    spec = ctx.put_experiment(exp, spec_dict)
    order, seed = spec.orders[0], spec.seeds[0]
    rid = run_id(order, seed)
    env = {**ctx.env, "SLMCL_JOB_HEARTBEAT_TTL": "8", "SLMCL_JOB_HEARTBEAT_INTERVAL": "2"}
    flags = ["--worker-ttl", "20", "--maintenance-interval", "3"]
    first = ctx.start_worker(*flags, "--name", "doomed", env=env)
    job = enqueue_run(ctx.queue, exp, order, seed)

    ctx.wait(lambda: ctx.store.exists(ctx.key(exp, layout.trained_key(rid, 1))), 120, "stage 1's trained record")
    os.killpg(first.pid, signal.SIGKILL)  # the worker and anything it started, like a container dying
    first.wait()
    assert ctx.job(job.id).get_status() == JobStatus.STARTED  # abandoned, as RQ sees it
    before = {k: ctx.store.client.stat_object(ctx.store.bucket, k)
              for k in ctx.store.list_keys(ctx.key(exp, f"runs/{rid}"))}
    assert ctx.key(exp, layout.trained_key(rid, 1)) in before
    contents = {k: ctx.store.get_bytes(k) for k in before}

    second = ctx.start_worker(*flags, "--name", "heir", env=env)
    ExperimentRunner(spec_from_dict(spec_dict)).run()  # the uninterrupted embedded run, while we wait
    # The bound is far below the job timeout (24 h): a job left to its full timeout fails this wait.
    ctx.wait(lambda: ctx.job(job.id).get_status() in (JobStatus.FINISHED, JobStatus.FAILED), 120, "the resumed job")

    job = ctx.job(job.id)
    assert job.get_status() == JobStatus.FINISHED, ctx.logs()
    assert job.retries_left == 2  # one retry spent on the abandoned attempt
    result = job.return_value()
    done_before = result["resumed_from"]
    assert done_before >= 1 and result["trained"] == list(range(done_before + 1, len(order) + 1))

    # Exactly one stage notice per stage, in stage order, whichever worker sent it.
    notices = ctx.stage_events()
    assert Counter((n["run_id"], n["step"]) for n in notices) == {(rid, str(k)): 1 for k in (1, 2, 3)}, notices
    assert [n["step"] for n in notices] == ["1", "2", "3"]

    # The stages trained before the kill were neither retrained nor rewritten.
    for k, st in before.items():
        now = ctx.store.client.stat_object(ctx.store.bucket, k)
        assert (now.etag, now.last_modified) == (st.etag, st.last_modified), k
        assert ctx.store.get_bytes(k) == contents[k]
    started = [e for e in ctx.events(exp) if e["kind"] == "run_started"]
    assert [e["data"]["resumed_from"] for e in started] == [0, done_before]

    # Resuming trains exactly like never stopping.
    for step in (1, 2, 3):
        assert_same_adapter(ctx, exp, rid, step, ctx.tmp / "embedded")

    # An idle worker stops promptly and cleanly on SIGTERM.
    second.send_signal(signal.SIGTERM)
    assert ctx.wait_exit(second, 30) == 0, ctx.logs()


def test_cancel_stops_at_the_next_step_without_publishing_the_stage(
        ctx: Ctx, tiny_model_dir: Path, data_dir: Path) -> None:
    exp = "exp-cancel"
    spec = ctx.put_experiment(exp, tiny_spec_dict(tiny_model_dir, data_dir, ctx.tmp / "unused",
                                                  training={"max_examples": 32, "batch_size": 2, "grad_accum": 1}))
    order, seed = spec.orders[0], spec.seeds[0]
    rid = run_id(order, seed)
    job = enqueue_run(ctx.queue, exp, order, seed)
    # A short job-heartbeat TTL, and registry cleanups as the monitor runs them: a live job must survive them.
    worker = ctx.start_worker("--burst", env={**ctx.env, "SLMCL_JOB_HEARTBEAT_TTL": "5",
                                              "SLMCL_JOB_HEARTBEAT_INTERVAL": "1"})
    registry = StartedJobRegistry(queue=ctx.queue)
    expiries: list[float] = []

    def stage_two_running() -> bool:
        registry.cleanup()
        for member, score in ctx.redis.zrange(registry.key, 0, -1, withscores=True):
            if member.decode().startswith(job.id + ":"):
                assert score - time.time() <= 5 + 1  # the entry lives for the heartbeat TTL, not the job timeout
                expiries.append(score)
        # Cancel as soon as stage 1 is trained: stage 2 (16 optimizer steps) is then under way, whatever the
        # spacing of progress events (at most ~2 per second: a fast stage may show none before its end).
        return any(e["kind"] == "stage_trained" and e["step"] == 1 for e in ctx.events(exp))

    ctx.wait(stage_two_running, 120, "stage 1 trained", poll=0.05)
    ctx.redis.set(keys.cancel_key(exp), "1")
    assert max(expiries) - min(expiries) >= 2  # the heartbeat kept pushing the expiry forward
    assert ctx.job(job.id).retries_left == 3 and len(
        [e for e in ctx.events(exp) if e["kind"] == "run_started"]) == 1  # never taken for abandoned
    assert ctx.wait_exit(worker, 60) == 0, ctx.logs()

    job = ctx.job(job.id)
    assert job.get_status() == JobStatus.FAILED, ctx.logs()
    assert "CancelledError" in (job.latest_result().exc_string or "")
    assert ctx.queue.count == 0  # a cancelled run is not retried

    # Stage 1 stays published; stage 2 left nothing behind.
    assert ctx.store.exists(ctx.key(exp, layout.trained_key(rid, 1)))
    assert not ctx.store.exists(ctx.key(exp, layout.trained_key(rid, 2)))
    assert ctx.store.list_keys(ctx.key(exp, checkpoint_prefix(rid, 2))) == []
    assert [n["step"] for n in ctx.stage_events()] == ["1"]

    events = ctx.events(exp)
    kinds = [e["kind"] for e in events]
    assert kinds[-1] == "run_cancelled" and "run_done" not in kinds, kinds
    assert [e["step"] for e in events if e["kind"] == "stage_trained"] == [1]
    # it stopped inside the stage: no progress event of stage 2 reports its last step
    assert all(e["data"]["step"] < e["data"]["total_steps"] for e in events
               if e["kind"] == "train_step" and e["step"] == 2)


def test_sigterm_mid_stage_requeues_the_run_at_no_retry_cost_and_exits(
        ctx: Ctx, tiny_model_dir: Path, data_dir: Path) -> None:
    exp = "exp-term"
    spec = ctx.put_experiment(exp, tiny_spec_dict(tiny_model_dir, data_dir, ctx.tmp / "unused",
                                                  training={"max_examples": 32, "batch_size": 2, "grad_accum": 1}))
    order, seed = spec.orders[0], spec.seeds[0]
    job = enqueue_run(ctx.queue, exp, order, seed)
    worker = ctx.start_worker()
    ctx.wait(lambda: any(e["kind"] == "train_step" for e in ctx.events(exp)), 120, "a train_step", poll=0.05)
    worker.send_signal(signal.SIGTERM)
    assert ctx.wait_exit(worker, 30) == 0, ctx.logs()

    job = ctx.job(job.id)
    assert job.get_status() == JobStatus.QUEUED and ctx.queue.job_ids == [job.id], ctx.logs()
    assert job.retries_left == 3  # a shutdown is not the run's fault
    kinds = [e["kind"] for e in ctx.events(exp)]
    assert kinds[-1] == "run_interrupted" and "stage_trained" not in kinds, kinds
    assert ctx.stage_events() == [] and ctx.store.list_keys(ctx.key(exp, "checkpoints")) == []


def test_non_finite_loss_fails_the_run_without_publishing_and_the_worker_goes_on(
        ctx: Ctx, tiny_model_dir: Path, data_dir: Path) -> None:
    """A run resumed from a NaN-poisoned stage 1 fails at stage 2 (TrainingError: final, no retry);
    the same worker process then trains another run on its resident model, loaded once."""
    import torch

    from slmcl.models.engine import Engine
    from slmcl.storage.local import put_dir

    exp = "exp-nan"
    spec = ctx.put_experiment(exp, tiny_spec_dict(tiny_model_dir, data_dir, ctx.tmp / "unused"))
    order, seed = spec.orders[0], spec.seeds[0]
    rid = run_id(order, seed)
    engine = Engine(spec)  # fabricate stage 1 of the run: a committed checkpoint whose weights are NaN
    engine.reset_adapter(seed)
    with torch.no_grad():
        next(p for n, p in engine.model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")
    put_dir(ctx.store, ctx.key(exp, checkpoint_prefix(rid, 1)), engine.save_adapter(ctx.tmp / "nan-adapter"))
    ctx.store.put_bytes(ctx.key(exp, layout.trained_key(rid, 1)), json.dumps(
        {"run_id": rid, "order": order, "seed": seed, "step": 1, "task": order[0],
         "checkpoint": checkpoint_prefix(rid, 1), "train": {"strategy_state": {}}}).encode())

    bad = enqueue_run(ctx.queue, exp, order, seed)
    good = enqueue_run(ctx.queue, exp, order[:1], seed)  # a one-stage run, after it
    worker = ctx.start_worker("--burst")
    assert ctx.wait_exit(worker, 120) == 0, ctx.logs()

    bad = ctx.job(bad.id)
    assert bad.get_status() == JobStatus.FAILED, ctx.logs()
    assert "TrainingError" in (bad.latest_result().exc_string or "")
    assert not ctx.store.exists(ctx.key(exp, layout.trained_key(rid, 2)))
    assert ctx.store.list_keys(ctx.key(exp, checkpoint_prefix(rid, 2))) == []
    failed = [e for e in ctx.events(exp) if e["run_id"] == rid and e["kind"] == "run_failed"]
    assert len(failed) == 1 and failed[0]["step"] == 2 and "loss is nan" in failed[0]["data"]["error"]
    assert failed[0]["data"]["will_retry"] is False

    good_rid = run_id(order[:1], seed)
    assert ctx.job(good.id).get_status() == JobStatus.FINISHED, ctx.logs()
    assert ctx.store.exists(ctx.key(exp, layout.trained_key(good_rid, 1)))
    # Stage notices: the fabricated stage 1 (announced once on resume, as a lost notice would be) and the good run's.
    assert [(n["run_id"], n["step"]) for n in ctx.stage_events()] == [(rid, "1"), (good_rid, "1")]
    assert ctx.logs().count(f"loaded {tiny_model_dir}") == 1  # the base model stayed resident across jobs
    assert ctx.queue.count == 0  # the failed run was not retried
