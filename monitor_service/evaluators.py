"""The evaluator pool as the monitor sees it: every replica, one request in flight on each.

Replicas come from a list of addresses (``host:port,host:port``) or a DNS name
(``dns:///evaluator:50052``) resolved to every address behind it, as compose's
``--scale evaluator=N`` gives. A replica computes one request at a time, so the pool hands
a shard to a free replica; a shard whose replica fails is retried on another one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from service_common.grpc_server import channel
from slmcl_api.v1 import evaluator_pb2, evaluator_pb2_grpc

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class EvaluationFailed(Exception):
    pass


def resolve(target: str) -> list[str]:
    addresses: list[str] = []
    for part in (p.strip() for p in target.split(",") if p.strip()):
        if part.startswith("dns:///"):
            host, _, port = part[len("dns:///"):].rpartition(":")
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            addresses += sorted({f"{info[4][0]}:{port}" for info in infos})
        else:
            addresses.append(part)
    return addresses


@dataclass
class _Replica:
    address: str
    stub: evaluator_pb2_grpc.EvaluatorStub
    busy: bool = False
    failures: int = 0


class EvaluatorPool:
    def __init__(self, target: str, refresh_seconds: float = 30.0) -> None:
        self.target = target
        self.refresh_seconds = refresh_seconds
        self._replicas: dict[str, _Replica] = {}
        self._cond = threading.Condition()
        self._resolved_at = 0.0
        self._refresh()

    def _refresh(self) -> None:
        try:
            addresses = resolve(self.target)
        except OSError as exc:
            log.warning("cannot resolve evaluators %s: %s", self.target, exc)
            return
        with self._cond:
            for a in addresses:
                if a not in self._replicas:
                    self._replicas[a] = _Replica(a, evaluator_pb2_grpc.EvaluatorStub(channel(a)))
            self._resolved_at = time.monotonic()
            self._cond.notify_all()

    @property
    def addresses(self) -> list[str]:
        return list(self._replicas)

    def _acquire(self, avoid: set[str], deadline: float) -> _Replica:
        if time.monotonic() - self._resolved_at > self.refresh_seconds:
            self._refresh()
        with self._cond:
            while True:
                free = [r for r in self._replicas.values() if not r.busy and r.address not in avoid]
                if not free and avoid and all(r.address in avoid for r in self._replicas.values()):
                    free = [r for r in self._replicas.values() if not r.busy]  # every replica failed once: retry any
                if free:
                    replica = min(free, key=lambda r: r.failures)
                    replica.busy = True
                    return replica
                if time.monotonic() > deadline:
                    raise EvaluationFailed(f"no evaluator replica free among {self.addresses or [self.target]}")
                self._cond.wait(timeout=1.0)

    def _release(self, replica: _Replica, ok: bool) -> None:
        with self._cond:
            replica.busy = False
            replica.failures = 0 if ok else replica.failures + 1
            self._cond.notify_all()

    def evaluate(
        self,
        request: evaluator_pb2.EvaluateRequest,
        on_progress: Callable[[int, int], None] | None = None,
        attempts: int = 3,
        wait_seconds: float = 3600.0,
    ) -> evaluator_pb2.EvaluateResult:
        """Run one shard on a free replica; retry on another replica when one fails."""
        tried: set[str] = set()
        last: Exception | None = None
        for _ in range(attempts):
            replica = self._acquire(tried, time.monotonic() + wait_seconds)
            ok = False
            try:
                result = None
                for msg in replica.stub.Evaluate(request, wait_for_ready=True, timeout=wait_seconds):
                    if msg.HasField("progress") and on_progress is not None:
                        on_progress(msg.progress.done, msg.progress.total)
                    elif msg.HasField("result"):
                        result = msg.result
                if result is None:
                    raise EvaluationFailed(f"{replica.address} ended the stream without a result")
                ok = True
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                last = EvaluationFailed(f"{replica.address}: {code.name}: {exc.details()}")
                if code not in RETRYABLE:
                    raise last from None
                log.warning("evaluation of %s on %s failed (%s); retrying elsewhere", request.task, replica.address,
                            code.name)
                tried.add(replica.address)
            except EvaluationFailed as exc:
                last = exc
                tried.add(replica.address)
            finally:
                self._release(replica, ok)
        raise EvaluationFailed(f"task {request.task}: every attempt failed ({last})")
