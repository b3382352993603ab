"""The Monitor gRPC servicer: decode the request, call ``Control``, encode the answer."""

from __future__ import annotations

import json
from typing import Any, Iterator

import grpc

from monitor_service.control import Control, SubmittedFile
from service_common.grpc_server import rpc, rpc_stream
from slmcl.errors import NotFoundError
from slmcl.protocol import layout
from slmcl.protocol.layout import checkpoint_prefix
from slmcl.storage.prefixed import PrefixedStore
from slmcl_api.v1 import common_pb2, monitor_pb2, monitor_pb2_grpc

CHUNK = 1 << 20
STATES = {"queued": monitor_pb2.QUEUED, "running": monitor_pb2.RUNNING, "succeeded": monitor_pb2.SUCCEEDED,
          "failed": monitor_pb2.FAILED, "cancelled": monitor_pb2.CANCELLED}


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
                values={k: float(v) for k, v in data["stability"].items()
                        if k != "num_reference_examples" and v is not None}),
        ))
    return ev


def file_chunks(store: Any, keys_and_names: list[tuple[str, str]]) -> Iterator[common_pb2.FileChunk]:
    for key, name in keys_and_names:
        data = store.get_bytes(key)
        if not data:
            yield common_pb2.FileChunk(path=name, size=0, data=b"", last=True)
            continue
        for off in range(0, len(data), CHUNK):
            yield common_pb2.FileChunk(path=name if off == 0 else "", size=len(data), data=data[off: off + CHUNK],
                                       last=off + CHUNK >= len(data))


class MonitorServicer(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, control: Control) -> None:
        self.control = control

    @rpc
    def SubmitExperiment(self, request: monitor_pb2.SubmitExperimentRequest, context: grpc.ServicerContext) -> Any:
        files = [SubmittedFile(f.path, f.content, f.sha256) for f in request.files]
        exp_id = self.control.submit(request.spec_json, files, request.client_request_id)
        return experiment_pb(self.control.experiment(exp_id))

    @rpc
    def GetExperiment(self, request: monitor_pb2.GetExperimentRequest, context: grpc.ServicerContext) -> Any:
        return experiment_pb(self.control.experiment(request.id))

    @rpc
    def ListExperiments(self, request: monitor_pb2.ListExperimentsRequest, context: grpc.ServicerContext) -> Any:
        return monitor_pb2.ListExperimentsResponse(
            experiments=[experiment_pb(self.control.experiment(i)) for i in self.control.list_ids()])

    @rpc_stream
    def WatchExperiment(self, request: monitor_pb2.WatchExperimentRequest, context: grpc.ServicerContext) -> Any:
        for eid, fields in self.control.events(request.id, request.after_event_id or "0-0"):
            if not context.is_active():
                return
            yield event_pb(request.id, eid, fields, self.control.state(request.id))

    @rpc
    def CancelExperiment(self, request: monitor_pb2.CancelExperimentRequest, context: grpc.ServicerContext) -> Any:
        self.control.cancel(request.id)
        return experiment_pb(self.control.experiment(request.id))

    @rpc_stream
    def GetResults(self, request: monitor_pb2.GetResultsRequest, context: grpc.ServicerContext) -> Any:
        self.control.experiment(request.id)  # NOT_FOUND for an unknown id
        results = PrefixedStore(self.control.store, layout.experiment_prefix(request.id))
        names = [k for k in results.list_keys("")
                 if request.include_checkpoints or not k.startswith("checkpoints/")]
        yield from file_chunks(results, [(k, k) for k in names])

    @rpc_stream
    def GetCheckpoint(self, request: monitor_pb2.GetCheckpointRequest, context: grpc.ServicerContext) -> Any:
        self.control.experiment(request.id)
        results = PrefixedStore(self.control.store, layout.experiment_prefix(request.id))
        prefix = checkpoint_prefix(request.run_id, request.step)
        names = results.list_keys(prefix)
        if not any(n.endswith("adapter_model.safetensors") for n in names):
            raise NotFoundError(f"experiment {request.id}: no checkpoint for run {request.run_id!r} step {request.step}")
        yield from file_chunks(results, [(k, k[len(prefix) + 1:]) for k in names])
