"""The evaluator pool as the monitor sees it: every replica, as many requests in flight on each as it computes.

Replicas come from a list of addresses (``host:port,host:port``) or a DNS name
(``dns:///evaluator:50052``) resolved to every address behind it, as compose's
``--scale evaluator=N`` gives. A replica computes ``Info.capacity`` requests at once, so the
pool hands a request (an evaluation shard or a drift) to a replica with a free slot; a request
whose replica fails is retried on another one. ``capacity()`` is the pool's total, for sizing
the caller's executor; the replica list and capacities are refreshed from the target every
``refresh_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from service_common.grpc_server import channel
from slmcl.protocol.drift import DriftRows
from slmcl_api.v1 import evaluator_pb2, evaluator_pb2_grpc

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


T = TypeVar("T")


CONNECT_SECONDS = float(os.environ.get("SLMCL_EVALUATOR_CONNECT_SECONDS", "20"))


class EvaluationFailed(Exception):
    pass


class EvaluationRejected(EvaluationFailed):
    """An evaluator refused the request itself (a spec it cannot run, a model its policy forbids): no replica
    and no amount of waiting will accept it, so the experiment fails now with the evaluator's words instead of
    retrying for the whole outage budget."""


# What an evaluator answers about the request, not about its own health.
REJECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


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
    channel: grpc.Channel
    stub: evaluator_pb2_grpc.EvaluatorStub
    capacity: int = 1  # requests it computes at once (Info.capacity)
    capacity_known: bool = False  # Info answered; until then 1, asked again at the next refresh
    in_flight: int = 0
    failures: int = 0


def drift_rows(result: evaluator_pb2.DriftResult) -> DriftRows:
    """A Drift answer as the rows ``slmcl.protocol.drift.summarize_drift`` aggregates."""
    rows = DriftRows(list(result.kl_to_base), list(result.entropy), list(result.margin))
    if rows.num_rows != result.num_rows:
        raise EvaluationFailed(f"{result.replica_id}: drift result says {result.num_rows} rows but holds "
                               f"{rows.num_rows}")
    return rows


class EvaluatorPool:
    def __init__(self, target: str, refresh_seconds: float = 30.0, info_timeout: float = 5.0) -> None:
        self.target = target
        self.refresh_seconds = refresh_seconds
        self.info_timeout = info_timeout
        self._replicas: dict[str, _Replica] = {}
        self._cond = threading.Condition()
        self._resolved_at = 0.0
        self._refresh()

    def _refresh(self) -> None:
        """Resolve the target again: new replicas are asked their capacity, vanished ones dropped."""
        try:
            addresses = resolve(self.target)
        except OSError as exc:
            log.warning("cannot resolve evaluators %s: %s", self.target, exc)
            return
        with self._cond:
            current = dict.fromkeys(addresses)
            for a in list(self._replicas):
                if a not in current:
                    log.info("evaluator %s left the pool", a)
                    del self._replicas[a]  # a request in flight there still releases its own object
            for a in current:
                if a not in self._replicas:
                    ch = channel(a)
                    self._replicas[a] = _Replica(a, ch, evaluator_pb2_grpc.EvaluatorStub(ch))
            unknown = [r for r in self._replicas.values() if not r.capacity_known]
            self._resolved_at = time.monotonic()
        for replica in unknown:  # outside the lock: Info is a network call
            self._ask_capacity(replica)
        with self._cond:
            self._cond.notify_all()

    def _ask_capacity(self, replica: _Replica) -> None:
        try:
            info = replica.stub.Info(evaluator_pb2.InfoRequest(), timeout=self.info_timeout)
        except grpc.RpcError as exc:
            log.info("evaluator %s: no Info yet (%s); counting capacity 1", replica.address, exc.code().name)
            return
        with self._cond:
            replica.capacity = max(1, info.capacity)  # 0: a replica older than the field computes one at a time
            replica.capacity_known = True

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._resolved_at > self.refresh_seconds:
            self._refresh()

    @property
    def addresses(self) -> list[str]:
        with self._cond:
            return list(self._replicas)

    def capacity(self) -> int:
        """Requests the pool computes at once: the live replicas' declared capacities, summed (at least 1)."""
        self._maybe_refresh()
        with self._cond:
            return max(1, sum(r.capacity for r in self._replicas.values()))

    def _acquire(self, avoid: set[str], deadline: float) -> _Replica:
        self._maybe_refresh()
        with self._cond:
            while True:
                replicas = list(self._replicas.values())
                free = [r for r in replicas if r.in_flight < r.capacity and r.address not in avoid]
                if not free and avoid and all(r.address in avoid for r in replicas):
                    free = [r for r in replicas if r.in_flight < r.capacity]  # every replica failed once: retry any
                if free:
                    replica = min(free, key=lambda r: (r.failures, r.in_flight / r.capacity))
                    replica.in_flight += 1
                    return replica
                if time.monotonic() > deadline:
                    raise EvaluationFailed(f"no evaluator replica free among {self.addresses or [self.target]}")
                self._cond.wait(timeout=1.0)

    def _release(self, replica: _Replica, ok: bool) -> None:
        with self._cond:
            replica.in_flight -= 1
            replica.failures = 0 if ok else replica.failures + 1
            self._cond.notify_all()

    def _with_retries(self, what: str, call: Callable[[_Replica], T], attempts: int, wait_seconds: float) -> T:
        """``call`` on a replica with a free slot; on a retryable failure, again on another replica."""
        tried: set[str] = set()
        last: Exception | None = None
        for _ in range(attempts):
            replica = self._acquire(tried, time.monotonic() + wait_seconds)
            ok = False
            try:
                # A replica that is gone (killed, scaled down) must fail fast, so the call itself does not wait
                # for a ready channel (no ``wait_for_ready``): one that dies between this check and the call
                # answers UNAVAILABLE at once instead of holding the request until the evaluation's deadline.
                try:
                    grpc.channel_ready_future(replica.channel).result(timeout=CONNECT_SECONDS)
                except grpc.FutureTimeoutError:
                    raise EvaluationFailed(f"{replica.address}: not reachable within {CONNECT_SECONDS:.0f} s") from None
                result = call(replica)
                ok = True
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                kind = EvaluationRejected if code in REJECTED else EvaluationFailed
                last = kind(f"{replica.address}: {code.name}: {exc.details()}")
                if code not in RETRYABLE:
                    raise last from None
                log.warning("%s on %s failed (%s); retrying elsewhere", what, replica.address, code.name)
                tried.add(replica.address)
            except EvaluationFailed as exc:
                log.warning("%s: %s; retrying elsewhere", what, exc)
                last = exc
                tried.add(replica.address)
            finally:
                self._release(replica, ok)
        raise EvaluationFailed(f"{what}: every attempt failed ({last})")

    def evaluate(
        self,
        request: evaluator_pb2.EvaluateRequest,
        on_progress: Callable[[int, int], None] | None = None,
        attempts: int = 3,
        wait_seconds: float = 3600.0,
    ) -> evaluator_pb2.EvaluateResult:
        """Run one shard on a replica with a free slot; retry on another replica when one fails."""

        def call(replica: _Replica) -> evaluator_pb2.EvaluateResult:
            result = None
            for msg in replica.stub.Evaluate(request, timeout=wait_seconds):
                if msg.HasField("progress") and on_progress is not None:
                    on_progress(msg.progress.done, msg.progress.total)
                elif msg.HasField("result"):
                    result = msg.result
            if result is None:
                raise EvaluationFailed(f"{replica.address} ended the stream without a result")
            return result

        return self._with_retries(f"task {request.task}", call, attempts, wait_seconds)

    def drift(
        self,
        request: evaluator_pb2.DriftRequest,
        attempts: int = 3,
        wait_seconds: float = 3600.0,
    ) -> evaluator_pb2.DriftResult:
        """Per-row drift of one checkpoint (``drift_rows`` turns it into ``DriftRows``); retried elsewhere
        like ``evaluate``."""

        def call(replica: _Replica) -> evaluator_pb2.DriftResult:
            result = replica.stub.Drift(request, timeout=wait_seconds)
            drift_rows(result)  # a malformed answer is a failed attempt, not a wrong number
            return result

        return self._with_retries(f"drift of {request.checkpoint_prefix or 'the base'}", call, attempts, wait_seconds)
