"""The client's watch against streams that fail: an outage is waited out, a server error is not.

The stub is replaced by a scripted one, so each case is one exact sequence of streams and errors; the watch
against a real monitor (restarts, Redis outages) is covered in tests/services/test_faults_outages.py."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from service_common.client import SERVER_ERROR_RECONNECTS, MonitorClient
from service_common.retry import RetryPolicy
from slmcl_api.v1 import monitor_pb2

FAST = RetryPolicy(budget_seconds=30.0, initial_seconds=0.001, max_wait_seconds=0.001)


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"scripted {self._code.name}"


class ScriptedStub:
    """Each WatchExperiment call plays the next script entry: events to yield, then an error code or None."""

    def __init__(self, script: list[tuple[list[str], grpc.StatusCode | None]]) -> None:
        self.script = list(script)
        self.after: list[str] = []

    def WatchExperiment(self, request: monitor_pb2.WatchExperimentRequest) -> Iterator[monitor_pb2.ExperimentEvent]:  # noqa: N802
        self.after.append(request.after_event_id)
        events, error = self.script.pop(0)
        for event_id in events:
            state = monitor_pb2.SUCCEEDED if event_id == "end" else monitor_pb2.RUNNING
            yield monitor_pb2.ExperimentEvent(event_id=event_id, state=state)
        if error is not None:
            raise Failed(error)


def client(stub: ScriptedStub) -> MonitorClient:
    c = MonitorClient("127.0.0.1:1")
    c.stub = stub  # type: ignore[assignment]
    return c


def test_a_server_error_on_every_stream_raises_after_a_few_reconnects() -> None:
    stub = ScriptedStub([([], grpc.StatusCode.INTERNAL)] * (SERVER_ERROR_RECONNECTS + 5))
    with pytest.raises(grpc.RpcError) as raised:
        list(client(stub).watch("e", policy=FAST))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert len(stub.after) == SERVER_ERROR_RECONNECTS + 1  # the first stream and its reconnects, no more


def test_server_errors_separated_by_events_and_outages_are_reconnected_without_losing_events() -> None:
    script: list[tuple[list[str], grpc.StatusCode | None]] = [([], grpc.StatusCode.INTERNAL)] * SERVER_ERROR_RECONNECTS
    script += [(["1"], grpc.StatusCode.UNKNOWN)] + [([], grpc.StatusCode.INTERNAL)] * (SERVER_ERROR_RECONNECTS - 1)
    script += [([], grpc.StatusCode.UNAVAILABLE)] * 10  # an outage is waited out within the budget
    script += [([], grpc.StatusCode.INTERNAL)] * SERVER_ERROR_RECONNECTS + [(["2", "end"], None)]
    stub = ScriptedStub(script)
    got = [ev.event_id for ev in client(stub).watch("e", policy=FAST)]
    assert got == ["1", "2", "end"]
    assert stub.after[-1] == "1"  # reopened after the last event it yielded
    assert not stub.script
