"""The service trio end to end: real Redis, the S3 gateway, the monitor, a trainer worker and
two evaluator replicas as separate processes on loopback, driven through the gRPC client.
The numbers must equal those of `slmcl run` on the same spec and seed."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service_common.client import MonitorClient
from slmcl.config.spec import spec_from_dict
from slmcl.protocol.embedded import ExperimentRunner
from slmcl_api.v1 import evaluator_pb2, evaluator_pb2_grpc, monitor_pb2
from tests.conftest import tiny_spec_dict
from tests.services.conftest import Trio

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared_trio(module_service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    """Started once for the tests that leave every process running (stopped by pid at the module's end)."""
    t = Trio({**module_service_env, "SLMCL_TORCH_THREADS": "1"}, tmp_path_factory.mktemp("trio") / "logs")
    try:
        t.start()
        yield t
    finally:
        t.stop()


@pytest.fixture()
def trio(service_env: dict[str, str], tmp_path: Path) -> Iterator[Trio]:
    """A trio of the test's own, for the tests that kill or restart one of its processes."""
    t = Trio({**service_env, "SLMCL_TORCH_THREADS": "1"}, tmp_path / "logs")
    try:
        t.start()
        yield t
    finally:
        t.stop()


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _watch_to_end(client: MonitorClient, exp_id: str, trio: Trio, timeout: float = 600) -> list:
    events = []
    deadline = time.monotonic() + timeout
    for ev in client.watch(exp_id):
        events.append(ev)
        assert time.monotonic() < deadline, "experiment did not finish in time\n" + trio.tail()
    return events


@pytest.mark.slow
def test_submit_watch_results_equal_the_embedded_run(shared_trio: Trio, tiny_model_dir: Path, data_dir: Path,
                                                     tmp_path: Path) -> None:
    trio = shared_trio
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "embedded"))
    ExperimentRunner(spec).run()

    client = MonitorClient(trio.monitor_address)
    exp = client.submit(spec, client_request_id="req-1")
    assert client.submit(spec, client_request_id="req-1").id == exp.id  # idempotent submit
    events = _watch_to_end(client, exp.id, trio)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "experiment_done", trio.tail()
    assert events[-1].state == monitor_pb2.SUCCEEDED
    assert "train_step" in kinds and "stage_trained" in kinds
    stage_rows = [(e.stage.run_id, e.stage.step) for e in events if e.kind == "stage_done"]
    assert sorted(stage_rows) == [("fomc.numgluecm-s7", k) for k in range(3)]

    out = client.results(exp.id, tmp_path / "service")
    emb = tmp_path / "embedded"

    # `slmcl report ID`: the same report as from the pulled results, written where --out says
    from slmcl.cli.main import main as slmcl_main

    assert slmcl_main(["report", exp.id, "--server", trio.monitor_address, "--out", str(tmp_path / "rep")]) == 0
    from slmcl.report import build_report

    build_report(out, tmp_path / "rep-local")
    tables = sorted((tmp_path / "rep-local" / "tables").iterdir())
    assert (tmp_path / "rep" / "index.html").is_file() and tables
    assert [p.read_text() for p in tables] == [(tmp_path / "rep" / "tables" / p.name).read_text() for p in tables]
    assert slmcl_main(["report", "no-such-experiment", "--server", trio.monitor_address]) == 2

    def key(r: dict[str, str]) -> tuple:
        return r["seed"], r["step"], r["eval_task"]

    service_scores = sorted(_csv(out / "scores.csv"), key=key)
    assert service_scores == sorted(_csv(emb / "scores.csv"), key=key)
    for a, b in zip(_csv(out / "stability.csv"), _csv(emb / "stability.csv")):
        for col in a:
            if col.startswith(("kl_", "entropy", "margin")):
                assert float(a[col]) == pytest.approx(float(b[col]), abs=1e-5 if "_delta_" in col else 1e-6), col
    import json

    s_sum, e_sum = json.loads((out / "summary.json").read_text()), json.loads((emb / "summary.json").read_text())
    assert s_sum["orders"][0]["metrics"] == e_sum["orders"][0]["metrics"]
    assert s_sum["orders"][0]["matrix_mean"] == e_sum["orders"][0]["matrix_mean"]

    # every stage's adapter: pulled through the API, a PEFT folder, equal to the embedded one
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for step in (1, 2):
        pulled = client.pull(exp.id, "fomc.numgluecm-s7", step, tmp_path / f"pull-{step}")
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), pulled)
        a = load_file(pulled / "adapter_model.safetensors")
        b = load_file(emb / "checkpoints" / "fomc.numgluecm-s7" / f"step-{step}" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # both evaluator replicas served requests
    for addr in trio.eval_addresses:
        with grpc.insecure_channel(addr) as ch:
            info = evaluator_pb2_grpc.EvaluatorStub(ch).Info(evaluator_pb2.InfoRequest(), timeout=10)
            assert info.requests_served > 0, f"{addr} served nothing"

    listed = [e.id for e in client.list()]
    assert exp.id in listed


def test_errors_map_to_status_codes(shared_trio: Trio, tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    trio = shared_trio
    client = MonitorClient(trio.monitor_address)
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "x"))
    bad = spec.to_dict()
    bad["lora"]["rank"] = 0
    import json

    with pytest.raises(grpc.RpcError) as err:
        client.stub.SubmitExperiment(monitor_pb2.SubmitExperimentRequest(spec_json=json.dumps(bad)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lora.rank" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # dataset files not shipped
        client.stub.SubmitExperiment(monitor_pb2.SubmitExperimentRequest(spec_json=spec.to_json()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "train_file" in err.value.details()
    for call in (lambda: client.get("nope"), lambda: client.cancel("nope"),
                 lambda: list(client.watch("nope")), lambda: client.results("nope", tmp_path / "r")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_trainer_crash_midrun_completes_with_one_row_per_stage(trio: Trio, tiny_model_dir: Path, data_dir: Path,
                                                              tmp_path: Path) -> None:
    # Slow enough stages (more rows, one row per step) that the kill lands mid-run.
    spec = spec_from_dict(tiny_spec_dict(
        tiny_model_dir, data_dir, tmp_path / "x", tasks=["fomc", "scienceqa", "numgluecm"],
        training={"max_examples": 96, "grad_accum": 1, "batch_size": 1}))
    client = MonitorClient(trio.monitor_address)
    exp = client.submit(spec)
    seen_stage_one = False
    for ev in client.watch(exp.id):
        if ev.kind == "stage_trained" and ev.step == 1:
            seen_stage_one = True
        if seen_stage_one and ev.kind == "train_step" and ev.step == 2:
            break
    trio.kill("trainer-1")
    trio.start_trainer("trainer-2")
    events = _watch_to_end(client, exp.id, trio, timeout=400)
    assert events[-1].kind == "experiment_done", trio.tail()
    out = client.results(exp.id, tmp_path / "service", include_checkpoints=False)
    rows = _csv(out / "scores.csv")
    keys = [(r["step"], r["eval_task"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * 3
    stab = _csv(out / "stability.csv")
    assert sorted(r["step"] for r in stab) == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_experiment_survives_a_monitor_restart(trio: Trio, tiny_model_dir: Path, data_dir: Path,
                                               tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "x", tasks=["fomc", "scienceqa"],
                                         training={"max_examples": 48, "grad_accum": 1, "batch_size": 1}))
    client = MonitorClient(trio.monitor_address)
    exp = client.submit(spec)
    for ev in client.watch(exp.id):
        if ev.kind == "train_step" and ev.step == 1:
            break
    client.close()
    trio.kill("monitor")  # stage events published meanwhile wait, unacknowledged, in the consumer group
    trio.start_monitor()
    client = MonitorClient(trio.monitor_address)
    events = _watch_to_end(client, exp.id, trio, timeout=400)
    assert events[-1].kind == "experiment_done", trio.tail()
    out = client.results(exp.id, tmp_path / "r", include_checkpoints=False)
    keys = [(r["step"], r["eval_task"]) for r in _csv(out / "scores.csv")]
    assert len(keys) == len(set(keys)) == 3 * 2


@pytest.mark.slow
def test_two_strategies_equal_the_embedded_run(shared_trio: Trio, tiny_model_dir: Path, data_dir: Path,
                                               tmp_path: Path) -> None:
    """O-LoRA (an adapter of another shape than the spec's) and OSF (merged-model checkpoints) through
    the trainer, the evaluator replicas and the monitor: the same records as `slmcl run`."""
    import json

    trio = shared_trio
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "embedded", strategies=["olora", "osf"]))
    ExperimentRunner(spec).run()

    client = MonitorClient(trio.monitor_address)
    exp = client.submit(spec)
    events = _watch_to_end(client, exp.id, trio)
    assert events[-1].kind == "experiment_done" and events[-1].state == monitor_pb2.SUCCEEDED, trio.tail()
    runs = sorted({e.stage.run_id for e in events if e.kind == "stage_done"})
    assert runs == ["fomc.numgluecm-s7-olora", "fomc.numgluecm-s7-osf"]

    out = client.results(exp.id, tmp_path / "service")
    emb = tmp_path / "embedded"

    def key(r: dict[str, str]) -> tuple:
        return r["strategy"], r["seed"], r["step"], r["eval_task"]

    assert sorted(_csv(out / "scores.csv"), key=key) == sorted(_csv(emb / "scores.csv"), key=key)
    stab = {(r["strategy"], r["step"]): r for r in _csv(emb / "stability.csv")}
    for a in _csv(out / "stability.csv"):
        b = stab[(a["strategy"], a["step"])]
        for col in a:  # fp32 forwards on one thread (services) and two (here): equal to fp32's precision
            if col.startswith(("kl_", "entropy", "margin")):
                tol = 1e-5 if "_delta_" in col else 1e-6  # a delta of two ~10-nat values keeps fp32's noise
                assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-6, abs=tol), (a["strategy"], col)
    s_sum, e_sum = json.loads((out / "summary.json").read_text()), json.loads((emb / "summary.json").read_text())
    assert [(o["strategy"], o["metrics"]) for o in s_sum["orders"]] == [
        (o["strategy"], o["metrics"]) for o in e_sum["orders"]]
    assert [r["strategy"] for r in _csv(out / "comparison.csv")] == ["olora", "osf"]


def _numbers_close(a: Any, b: Any, where: str) -> None:
    """Equal records, numbers to fp32's precision (the services' forwards run on one thread, these on two)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _numbers_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _numbers_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5), where  # deltas of ~10-nat entropies: fp32 noise
    else:
        assert a == b, where


@pytest.mark.slow
def test_stability_policy_and_sparse_evaluation_equal_the_embedded_run(shared_trio: Trio, tiny_model_dir: Path,
                                                                       data_dir: Path, tmp_path: Path) -> None:
    """A revert decided by the trainer, stages measured without task evaluation between full ones, the
    new-task drift and the attribution: the same records and tables as `slmcl run`, and `watch` sees the
    intervention when it happens."""
    import json

    trio = shared_trio
    raw = tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "embedded", tasks=["fomc", "scienceqa", "numgluecm"],
                         training={"lr": 0.05, "max_examples": 8}, evaluation={"every": 2},
                         monitoring={"task_drift_examples": 4},
                         policy=[{"action": "revert", "kl_mean": 0.03}, {"action": "alert", "kl_p95": 0.035}])
    spec = spec_from_dict(raw)
    ExperimentRunner(spec).run()

    client = MonitorClient(trio.monitor_address)
    exp = client.submit(spec)
    events = _watch_to_end(client, exp.id, trio)
    assert events[-1].kind == "experiment_done" and events[-1].state == monitor_pb2.SUCCEEDED, trio.tail()
    acted = [(e.step, json.loads(e.data_json)["action"]) for e in events if e.kind == "intervention"]
    assert acted == [(2, "revert"), (2, "alert")]

    out = client.results(exp.id, tmp_path / "service")
    emb = tmp_path / "embedded"
    rid = "fomc.scienceqa.numgluecm-s7"
    for step in range(4):
        s = json.loads((out / "runs" / rid / f"stage-{step}.json").read_text())
        e = json.loads((emb / "runs" / rid / f"stage-{step}.json").read_text())
        for field in ("scores", "stability", "interventions", "starts_from", "attribution", "checkpoint"):
            _numbers_close(s[field], e[field], f"stage {step} {field}")
    assert json.loads((out / "runs" / rid / "stage-3.json").read_text())["starts_from"] == 1
    assert json.loads((out / "runs" / rid / "stage-1.json").read_text())["scores"] == {}
    assert [r["kind"] for r in _csv(out / "estimates.csv")] == [r["kind"] for r in _csv(emb / "estimates.csv")]
    assert _csv(out / "interventions.csv")[0]["action"] == "revert"


@pytest.mark.slow
def test_two_models_equal_the_embedded_run(shared_trio: Trio, tiny_model_dir: Path, tiny_qwen_dir: Path,
                                           data_dir: Path, tmp_path: Path) -> None:
    """Two base models in one experiment: the trainer switches its resident model per run, the evaluators
    hold both, each model's base is measured once; the same records as `slmcl run`."""
    import json

    trio = shared_trio
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "embedded", model=None, models=[
        {"name": str(tiny_model_dir), "label": "llama"}, {"name": str(tiny_qwen_dir), "label": "qwen"}]))
    ExperimentRunner(spec).run()

    client = MonitorClient(trio.monitor_address)
    exp = client.submit(spec)
    events = _watch_to_end(client, exp.id, trio)
    assert events[-1].kind == "experiment_done" and events[-1].state == monitor_pb2.SUCCEEDED, trio.tail()
    status = client.get(exp.id)
    assert sorted((r.run_id, r.model) for r in status.runs) == [
        ("fomc.numgluecm-s7-mllama", str(tiny_model_dir)), ("fomc.numgluecm-s7-mqwen", str(tiny_qwen_dir))]

    out = client.results(exp.id, tmp_path / "service")
    emb = tmp_path / "embedded"
    for rid in ("fomc.numgluecm-s7-mllama", "fomc.numgluecm-s7-mqwen"):
        for step in range(3):
            s = json.loads((out / "runs" / rid / f"stage-{step}.json").read_text())
            e = json.loads((emb / "runs" / rid / f"stage-{step}.json").read_text())
            for field in ("model", "scores", "stability", "checkpoint"):
                _numbers_close(s[field], e[field], f"{rid} stage {step} {field}")
    assert sorted(p.name for p in (out / "predictions").iterdir() if p.name.startswith("base")) == [
        "base-llama", "base-qwen"]
    assert [r["model"] for r in _csv(out / "comparison.csv")] == [r["model"] for r in _csv(emb / "comparison.csv")]
