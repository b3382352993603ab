"""A small Python client of the Monitor API (what ``slmcl submit/watch/...`` use)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from service_common.datasets import sha256_hex, spec_paths
from service_common.grpc_server import channel
from service_common.retry import RetryPolicy
from slmcl.config.spec import ExperimentSpec
from slmcl_api.v1 import monitor_pb2, monitor_pb2_grpc

SERVER_ENV = "SLMCL_SERVER"
DEFAULT_SERVER = "127.0.0.1:50051"
TERMINAL_STATES = (monitor_pb2.SUCCEEDED, monitor_pb2.FAILED, monitor_pb2.CANCELLED)
# A watch stream broken by one of these (a monitor restart, a server-side outage past its budget) is reopened.
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                   grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED)
# These also mean a bug in the server, which no wait fixes: a stream cut by a dying monitor gives one or two,
# a server that fails every stream the same way gives them forever. Past this many in a row without an
# event in between, the watch raises instead of spending the whole retry budget on reconnect warnings.
SERVER_ERROR_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SERVER_ERROR_RECONNECTS = 3

log = logging.getLogger("slmcl.client")


def server_address(explicit: str | None = None) -> str:
    return explicit or os.environ.get(SERVER_ENV) or DEFAULT_SERVER


class MonitorClient:
    def __init__(self, address: str | None = None, timeout: float = 60.0) -> None:
        self.address = server_address(address)
        self.channel = channel(self.address)
        self.stub = monitor_pb2_grpc.MonitorStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def submit(self, spec: ExperimentSpec, client_request_id: str | None = None) -> monitor_pb2.Experiment:
        """Ship the resolved spec with the bytes of every dataset file it names."""
        files, seen = [], set()
        for _field, path in spec_paths(spec):
            if path in seen:
                continue
            seen.add(path)
            content = Path(path).read_bytes()
            files.append(monitor_pb2.DatasetFile(path=path, content=content, sha256=sha256_hex(content)))
        req = monitor_pb2.SubmitExperimentRequest(spec_json=spec.to_json(), files=files,
                                                  client_request_id=client_request_id or uuid.uuid4().hex)
        return self.stub.SubmitExperiment(req, timeout=self.timeout)

    def get(self, exp_id: str) -> monitor_pb2.Experiment:
        return self.stub.GetExperiment(monitor_pb2.GetExperimentRequest(id=exp_id), timeout=self.timeout)

    def list(self) -> list[monitor_pb2.Experiment]:
        return list(self.stub.ListExperiments(monitor_pb2.ListExperimentsRequest(), timeout=self.timeout).experiments)

    def cancel(self, exp_id: str) -> monitor_pb2.Experiment:
        return self.stub.CancelExperiment(monitor_pb2.CancelExperimentRequest(id=exp_id), timeout=self.timeout)

    def resume(self, exp_id: str) -> monitor_pb2.Experiment:
        return self.stub.ResumeExperiment(monitor_pb2.ResumeExperimentRequest(id=exp_id), timeout=self.timeout)

    def watch(self, exp_id: str, after: str = "", reconnect: bool = True,
              policy: RetryPolicy | None = None) -> Iterator[monitor_pb2.ExperimentEvent]:
        """Every event (after ``after``) until the experiment ends, across monitor restarts.

        A stream that breaks, or ends while the experiment still runs (a monitor shutting down), is
        opened again with ``after_event_id`` of the last event yielded, so nothing is repeated or lost.
        Waits back off with jitter; an outage longer than the retry budget (``SLMCL_RETRY_BUDGET_SECONDS``)
        raises the last error, as do ``SERVER_ERROR_RECONNECTS`` server errors in a row. ``reconnect=False``
        is the bare stream.
        """
        policy = policy or RetryPolicy.from_env()
        last = after
        deadline: float | None = None
        waits: Iterator[float] | None = None
        server_errors = 0
        while True:
            error: grpc.RpcError | None = None
            try:
                terminal = False
                for ev in self.stub.WatchExperiment(monitor_pb2.WatchExperimentRequest(id=exp_id,
                                                                                       after_event_id=last)):
                    # progress: the next outage gets a fresh budget
                    last, deadline, waits, server_errors = ev.event_id, None, None, 0
                    terminal = ev.state in TERMINAL_STATES
                    yield ev
                if not reconnect or terminal or self.get(exp_id).state in TERMINAL_STATES:
                    return
            except grpc.RpcError as exc:
                if not reconnect or exc.code() not in RECONNECT_CODES:
                    raise
                server_errors = server_errors + 1 if exc.code() in SERVER_ERROR_CODES else 0
                if server_errors > SERVER_ERROR_RECONNECTS:
                    raise
                error = exc
            if deadline is None or waits is None:
                deadline, waits = time.monotonic() + policy.budget_seconds, policy.waits()
            left = deadline - time.monotonic()
            if left <= 0:
                if error is not None:
                    raise error
                return
            wait = min(next(waits), left)
            log.warning("watch %s: %s; reconnecting after event %s in %.1f s", exp_id,
                        error.code().name if error is not None else "stream ended early", last or "(start)", wait)
            time.sleep(wait)

    def results(self, exp_id: str, out: str | Path, include_checkpoints: bool = True) -> Path:
        return _write_chunks(self.stub.GetResults(
            monitor_pb2.GetResultsRequest(id=exp_id, include_checkpoints=include_checkpoints)), Path(out))

    def pull(self, exp_id: str, run_id: str, step: int, out: str | Path) -> Path:
        return _write_chunks(self.stub.GetCheckpoint(
            monitor_pb2.GetCheckpointRequest(id=exp_id, run_id=run_id, step=step)), Path(out))


def _write_chunks(chunks: Any, out: Path) -> Path:
    """Assemble streamed files under ``out`` (each written to a temp name, renamed when complete)."""
    out.mkdir(parents=True, exist_ok=True)
    current: Path | None = None
    fh = None
    try:
        for c in chunks:
            if c.path:
                target = (out / c.path).resolve()
                if out.resolve() not in target.parents:
                    raise ValueError(f"refusing to write outside {out}: {c.path}")
                target.parent.mkdir(parents=True, exist_ok=True)
                current = target
                fh = open(target.with_name(target.name + ".part"), "wb")
            if fh is None or current is None:
                raise ValueError("stream sent data before a file name")
            fh.write(c.data)
            if c.last:
                fh.close()
                fh = None
                os.replace(current.with_name(current.name + ".part"), current)
    finally:
        if fh is not None:
            fh.close()
    return out


def event_data(ev: monitor_pb2.ExperimentEvent) -> dict[str, Any]:
    return json.loads(ev.data_json or "{}")


__all__ = ["MonitorClient", "TERMINAL_STATES", "event_data", "grpc", "server_address"]
