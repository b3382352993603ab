"""The Monitor gRPC servicer on grpc.aio: decode the request, call ``Control``, encode the answer.

Why asyncio: a ``WatchExperiment`` stream lasts as long as its experiment (hours). On a thread-pool
server each watcher held a thread, so a few dozen ``slmcl watch`` left no thread to answer
``GetExperiment`` or health. Here a watcher is a coroutine parked on ``XREAD BLOCK`` of
``redis.asyncio``; the blocking ``Control`` calls (the object store, the sync Redis client) run on the
loop's executor through ``asyncio.to_thread`` for as long as they take and no longer.

Every request field a client sets is checked before use (ids, run ids, steps, keys, stream ids):
a malformed one is INVALID_ARGUMENT naming the field, an unknown well-formed one NOT_FOUND; only a bug
is INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio
import redis.asyncio as aioredis

from monitor_service.control import TERMINAL, Control, SubmittedFile
from service_common import keys
from service_common.grpc_server import status_for
from service_common.redis_conn import stream_entries, text
from slmcl.errors import NotFoundError, SlmclError
from slmcl.protocol import layout
from slmcl.protocol.layout import checkpoint_prefix
from slmcl.storage.prefixed import PrefixedStore
from slmcl_api.v1 import common_pb2, monitor_pb2, monitor_pb2_grpc

log = logging.getLogger(__name__)

CHUNK = 1 << 20
WATCH_BLOCK_MS = 1000  # a watcher wakes this often to notice the experiment's end (and a client gone)
WATCH_BATCH = 500
STATES = {"queued": monitor_pb2.QUEUED, "running": monitor_pb2.RUNNING, "succeeded": monitor_pb2.SUCCEEDED,
          "failed": monitor_pb2.FAILED, "cancelled": monitor_pb2.CANCELLED}

# What a well-formed request field looks like. Experiment ids are ours ("20260102-030405-a1b2c3"), but any
# name of letters, digits, '-' and '_' is accepted as an id (an unknown one is NOT_FOUND): never '/', '.', '..'.
_EXPERIMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_RUN_ID = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*-s[0-9]+")  # layout.run_id: "<task>.<task>...-s<seed>"
_STREAM_ID = re.compile(r"[0-9]+-[0-9]+")  # a Redis stream entry id
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's idempotency key (it names a Redis key)
MAX_STEP = 10_000

T = TypeVar("T")


class InvalidRequest(SlmclError, ValueError):
    """A request field that cannot be right whatever the server holds: INVALID_ARGUMENT."""


def check_experiment_id(value: str, field: str = "id") -> str:
    if not value:
        raise InvalidRequest(f"{field}: missing (an experiment id, as `slmcl submit` printed it)")
    if not _EXPERIMENT_ID.fullmatch(value):
        raise InvalidRequest(f"{field}: {value[:80]!r} is not an experiment id (letters, digits, '-', '_')")
    return value


def check_run_id(value: str, field: str = "run_id") -> str:
    if not _RUN_ID.fullmatch(value) or len(value) > 512:
        raise InvalidRequest(f"{field}: {value[:80]!r} is not a run id (<task>.<task>...-s<seed>, as `slmcl status` "
                             "lists them)")
    return value


def check_step(value: int, field: str = "step") -> int:
    if not 0 <= value <= MAX_STEP:
        raise InvalidRequest(f"{field}: {value} is not a stage number (0 is the base, 1.. the stages of a run)")
    return value


def check_event_id(value: str, field: str = "after_event_id") -> str:
    if value and not _STREAM_ID.fullmatch(value):
        raise InvalidRequest(f"{field}: {value[:80]!r} is not an event id (<milliseconds>-<sequence>, the "
                             "event_id of an event already seen)")
    return value


def check_request_id(value: str, field: str = "client_request_id") -> str:
    if value and not _REQUEST_ID.fullmatch(value):
        raise InvalidRequest(f"{field}: at most 128 letters, digits or '._:-' (a UUID, for instance)")
    return value


def _code(exc: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, InvalidRequest) else status_for(exc)


async def _abort(name: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    code = _code(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=exc)  # a bug, not the caller's fault: keep the traceback
    await context.abort(code, str(exc) or type(exc).__name__)


def aio_rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``service_common.grpc_server.rpc`` for a unary coroutine: a raised error aborts with its status code."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except (grpc.RpcError, grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await _abort(fn.__name__, exc, context)

    return wrapper


def aio_rpc_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """The same for a server-streaming async generator."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except (grpc.RpcError, grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await _abort(fn.__name__, exc, context)

    return wrapper


def experiment_pb(d: dict[str, Any]) -> monitor_pb2.Experiment:
    return monitor_pb2.Experiment(
        id=d["id"], name=d["name"], state=STATES.get(d["state"], monitor_pb2.EXPERIMENT_STATE_UNSPECIFIED),
        model=d["model"], error=d["error"], created_at=d["created_at"], updated_at=d["updated_at"],
        client_request_id=d["client_request_id"],
        runs=[monitor_pb2.RunStatus(**{k: v for k, v in r.items()}) for r in d["runs"]],
    )


def event_pb(exp_id: str, eid: str, f: dict[str, str], state: str) -> monitor_pb2.ExperimentEvent:
    ev = monitor_pb2.ExperimentEvent(
        event_id=eid, experiment_id=exp_id, kind=f.get("kind", ""), run_id=f.get("run_id", ""),
        step=int(f.get("step") or 0), task=f.get("task", ""), data_json=f.get("data_json", "{}"),
        state=STATES.get(state, monitor_pb2.EXPERIMENT_STATE_UNSPECIFIED), time=float(f.get("time") or 0),
    )
    if ev.kind == "stage_done":
        data = json.loads(ev.data_json)
        ev.stage.CopyFrom(monitor_pb2.StageResult(
            run_id=ev.run_id, step=ev.step, checkpoint_task=ev.task,
            scores=[common_pb2.TaskScore(task=t, accuracy=s["accuracy"], correct=s["correct"], total=s["total"],
                                         score_sum=s.get("score_sum", s["correct"]))
                    for t, s in data["scores"].items()],
            stability=common_pb2.Stability(
                num_reference_examples=int(data["stability"].get("num_reference_examples", 0)),
                values=_stability_values(data["stability"])),
        ))
    return ev


def _stability_values(stability: dict[str, Any]) -> dict[str, float]:
    """The scalar drift columns for the wire's map<string, double>; nested breakdowns (reference accuracy by
    task) travel in the event's data_json and in the stored records, which is where the tables read them."""
    return {k: float(v) for k, v in stability.items()
            if k != "num_reference_examples" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def file_chunks(data: bytes, name: str) -> Iterator[common_pb2.FileChunk]:
    if not data:
        yield common_pb2.FileChunk(path=name, size=0, data=b"", last=True)
        return
    for off in range(0, len(data), CHUNK):
        yield common_pb2.FileChunk(path=name if off == 0 else "", size=len(data), data=data[off: off + CHUNK],
                                   last=off + CHUNK >= len(data))


async def stream_files(store: Any, keys_and_names: list[tuple[str, str]]) -> AsyncIterator[common_pb2.FileChunk]:
    """One file in memory at a time, each read off the loop."""
    for key, name in keys_and_names:
        data = await asyncio.to_thread(store.get_bytes, key)
        for chunk in file_chunks(data, name):
            yield chunk


async def watch_events(r: aioredis.Redis, exp_id: str, after: str) -> AsyncIterator[tuple[str, dict[str, str], str]]:
    """Replay, then follow, the experiment's event stream until it ends and nothing is left.

    Yields (event id, fields, the experiment's state). The same contract as ``Control.events``, with the
    blocking read a coroutine: a watcher holds a Redis connection while it waits, never a thread.
    """
    h, stream = keys.experiment_hash(exp_id), keys.events_stream(exp_id)
    if not await r.exists(h):
        raise NotFoundError(f"no experiment {exp_id!r}")
    last = after or "0-0"
    while True:
        raw_state = await r.hget(h, "state")
        state = text(raw_state) if raw_state else ""
        terminal = state in TERMINAL
        got = await r.xread({stream: last}, count=WATCH_BATCH, block=None if terminal else WATCH_BLOCK_MS)
        entries = stream_entries(got)
        if entries and not terminal:
            raw_state = await r.hget(h, "state")  # the state after these events, as the event says
            state = text(raw_state) if raw_state else state
        for eid, fields in entries:
            last = eid
            yield eid, fields, state
        if terminal and not entries:
            return


class MonitorServicer(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, control: Control, aredis: aioredis.Redis) -> None:
        self.control = control
        self.aredis = aredis

    @aio_rpc
    async def SubmitExperiment(self, request: monitor_pb2.SubmitExperimentRequest,
                               context: grpc.aio.ServicerContext) -> Any:
        check_request_id(request.client_request_id)
        files = [SubmittedFile(f.path, f.content, f.sha256) for f in request.files]
        exp_id = await asyncio.to_thread(self.control.submit, request.spec_json, files, request.client_request_id)
        return experiment_pb(await asyncio.to_thread(self.control.experiment, exp_id))

    @aio_rpc
    async def GetExperiment(self, request: monitor_pb2.GetExperimentRequest, context: grpc.aio.ServicerContext) -> Any:
        return experiment_pb(await asyncio.to_thread(self.control.experiment, check_experiment_id(request.id)))

    @aio_rpc
    async def ListExperiments(self, request: monitor_pb2.ListExperimentsRequest,
                              context: grpc.aio.ServicerContext) -> Any:
        def listing() -> list[dict[str, Any]]:
            return [self.control.experiment(i) for i in self.control.list_ids()]

        return monitor_pb2.ListExperimentsResponse(experiments=[experiment_pb(d) for d in
                                                                await asyncio.to_thread(listing)])

    @aio_rpc_stream
    async def WatchExperiment(self, request: monitor_pb2.WatchExperimentRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[monitor_pb2.ExperimentEvent]:
        exp_id = check_experiment_id(request.id)
        async for eid, fields, state in watch_events(self.aredis, exp_id, check_event_id(request.after_event_id)):
            yield event_pb(exp_id, eid, fields, state)

    @aio_rpc
    async def CancelExperiment(self, request: monitor_pb2.CancelExperimentRequest,
                               context: grpc.aio.ServicerContext) -> Any:
        exp_id = check_experiment_id(request.id)
        await asyncio.to_thread(self.control.cancel, exp_id)
        return experiment_pb(await asyncio.to_thread(self.control.experiment, exp_id))

    @aio_rpc
    async def ResumeExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        exp_id = check_experiment_id(request.id)
        await asyncio.to_thread(self.control.resume, exp_id)
        return experiment_pb(await asyncio.to_thread(self.control.experiment, exp_id))

    @aio_rpc_stream
    async def GetResults(self, request: monitor_pb2.GetResultsRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.FileChunk]:
        exp_id = check_experiment_id(request.id)

        def names() -> tuple[PrefixedStore, list[str]]:
            self.control.experiment(exp_id)  # NOT_FOUND for an unknown id
            results = PrefixedStore(self.control.store, layout.experiment_prefix(exp_id))
            return results, [k for k in results.list_keys("")
                             if request.include_checkpoints or not k.startswith("checkpoints/")]

        results, listed = await asyncio.to_thread(names)
        async for chunk in stream_files(results, [(k, k) for k in listed]):
            yield chunk

    @aio_rpc_stream
    async def GetCheckpoint(self, request: monitor_pb2.GetCheckpointRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.FileChunk]:
        exp_id, rid, step = check_experiment_id(request.id), check_run_id(request.run_id), check_step(request.step)
        prefix = checkpoint_prefix(rid, step)

        def names() -> tuple[PrefixedStore, list[str]]:
            self.control.experiment(exp_id)
            results = PrefixedStore(self.control.store, layout.experiment_prefix(exp_id))
            return results, results.list_keys(prefix)

        results, listed = await asyncio.to_thread(names)
        if not layout.checkpoint_complete({n[len(prefix) + 1:] for n in listed}):
            raise NotFoundError(f"experiment {exp_id}: no checkpoint for run {rid!r} step {step}")
        async for chunk in stream_files(results, [(k, k[len(prefix) + 1:]) for k in listed]):
            yield chunk


__all__ = ["InvalidRequest", "MonitorServicer", "aio_rpc", "aio_rpc_stream", "event_pb", "experiment_pb",
           "watch_events"]
