"""An evaluator replica killed in the middle of evaluating a checkpoint: its requests go to the other replica.

Real processes on loopback (Redis, the S3 gateway, the monitor, a trainer, two evaluators). The
experiment must end with the numbers of the embedded run of the same spec and exactly one row
per stage and task, not merely without a crash.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_common.client import MonitorClient
from slmcl.config.spec import spec_from_dict
from slmcl.protocol.embedded import ExperimentRunner
from slmcl_api.v1 import monitor_pb2
from tests.conftest import tiny_spec_dict
from tests.services.conftest import Trio

pytestmark = pytest.mark.integration


@pytest.fixture()
def trio(service_env: dict[str, str], tmp_path: Path) -> Iterator[Trio]:
    t = Trio({**service_env, "SLMCL_TORCH_THREADS": "1", "SLMCL_EVAL_SHARDS_PER_TASK": "2"}, tmp_path / "logs")
    try:
        t.start()
        yield t
    finally:
        t.stop()


def _rows(path: Path) -> list[tuple[str, str, str, str]]:
    with open(path, newline="") as fh:
        return sorted((r["seed"], r["step"], r["eval_task"], r["accuracy"]) for r in csv.DictReader(fh))


def test_evaluator_killed_mid_evaluation_gives_the_undisturbed_numbers(trio: Trio, tiny_model_dir: Path,
                                                                       data_dir: Path, tmp_path: Path) -> None:
    # Enough rows and tokens that a checkpoint's evaluation is still running when the kill lands.
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "embedded",
                                         evaluation={"max_examples": 24, "max_new_tokens": 24, "batch_size": 4}))
    ExperimentRunner(spec).run()

    client = MonitorClient(trio.monitor_address)
    exp = client.submit(spec)
    killed = False
    deadline = time.monotonic() + 600
    for ev in client.watch(exp.id):
        assert time.monotonic() < deadline, "experiment did not finish in time\n" + trio.tail()
        if not killed and ev.kind == "eval_progress" and ev.step == 1:
            trio.kill("evaluator-1")  # a checkpoint's shards are on both replicas now
            killed = True
    assert killed, "no evaluation progress was seen to interrupt"
    got = client.get(exp.id)
    assert got.state == monitor_pb2.SUCCEEDED, got.error + "\n" + trio.tail()

    out = client.results(exp.id, tmp_path / "service", include_checkpoints=False)
    service, embedded = _rows(out / "scores.csv"), _rows(tmp_path / "embedded" / "scores.csv")
    assert service == embedded
    keys = [(s, k, t) for s, k, t, _ in service]
    assert len(keys) == len(set(keys)) == (len(spec.tasks) + 1) * len(spec.tasks)
