"""A hundred `slmcl watch` streams hold no server thread: the monitor keeps answering while they follow an
experiment to its end. Real processes on loopback: Redis, the S3 gateway, a trainer, an evaluator, the monitor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service_common.auth import aio_client_channel
from service_common.client import MonitorClient
from slmcl.config.spec import spec_from_dict
from slmcl_api.v1 import monitor_pb2, monitor_pb2_grpc
from tests.conftest import tiny_spec_dict
from tests.services.conftest import Trio

pytestmark = pytest.mark.integration

WATCHERS = 100
CHANNELS = 10  # watchers share channels as clients on a few hosts would
ANSWER_WITHIN_S = 1.0


@pytest.fixture()
def stack(service_env: dict[str, str], tmp_path: Path, tiny_model_dir: Path) -> Iterator[Trio]:
    s = Trio({**service_env, "SLMCL_TORCH_THREADS": "1", "SLMCL_MODEL_ALLOWLIST": str(tiny_model_dir)},
             tmp_path / "logs", evaluators=1)
    try:
        s.start()
        yield s
    finally:
        s.stop()


async def _watch(stub: monitor_pb2_grpc.MonitorStub, exp_id: str) -> list[str]:
    return [ev.kind async for ev in stub.WatchExperiment(monitor_pb2.WatchExperimentRequest(id=exp_id))]


async def _probe(address: str, exp_id: str, watchers: list[asyncio.Task[list[str]]]) -> list[tuple[float, float, int]]:
    """GetExperiment and health, each on its own fresh channel, every 0.25 s while the watchers run."""
    timings = []
    while not all(w.done() for w in watchers):
        async with aio_client_channel(address) as ch:
            t0 = time.monotonic()
            exp = await monitor_pb2_grpc.MonitorStub(ch).GetExperiment(
                monitor_pb2.GetExperimentRequest(id=exp_id), timeout=10)
            t1 = time.monotonic()
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            t2 = time.monotonic()
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        timings.append((t1 - t0, t2 - t1, exp.state))
        await asyncio.sleep(0.25)
    return timings


async def _run(address: str, exp_id: str) -> tuple[list[list[str]], list[tuple[float, float, int]]]:
    channels = [aio_client_channel(address) for _ in range(CHANNELS)]
    try:
        stubs = [monitor_pb2_grpc.MonitorStub(ch) for ch in channels]
        watchers = [asyncio.create_task(_watch(stubs[i % CHANNELS], exp_id)) for i in range(WATCHERS)]
        await asyncio.sleep(1.0)  # every watcher connected and parked on the event stream
        timings = await asyncio.wait_for(_probe(address, exp_id, watchers), timeout=900)
        return await asyncio.gather(*watchers), timings
    finally:
        for ch in channels:
            await ch.close()


def test_a_hundred_watchers_leave_the_monitor_responsive(stack: Trio, tiny_model_dir: Path, data_dir: Path,
                                                         tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "x",
                                         training={"max_examples": 24, "grad_accum": 1, "batch_size": 1}))
    client = MonitorClient(stack.monitor_address)
    exp = client.submit(spec)
    kinds, timings = asyncio.run(_run(stack.monitor_address, exp.id))
    assert len(kinds) == WATCHERS
    for k in kinds:
        assert k and k[-1] == "experiment_done", f"{k[-3:]}\n{stack.tail()}"
        assert k == kinds[0]  # every watcher saw the same events, in order
    running = [t for t in timings if t[2] == monitor_pb2.RUNNING]
    assert running, "no probe while the experiment was running"
    slowest_get, slowest_health = max(t[0] for t in timings), max(t[1] for t in timings)
    assert slowest_get < ANSWER_WITHIN_S and slowest_health < ANSWER_WITHIN_S, \
        f"GetExperiment {slowest_get:.2f} s, health {slowest_health:.2f} s with {WATCHERS} watchers"
    client.close()
