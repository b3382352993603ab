"""The gRPC face of the evaluator: decode the request, run it on the core, encode the answer.

Evaluate streams ``progress`` messages while a worker thread generates, then exactly one
``result``. Drift answers a checkpoint's per-row drift in one message. Domain errors become
status codes through ``service_common.grpc_server.rpc``: a bad spec, task or shard is
INVALID_ARGUMENT, a missing checkpoint NOT_FOUND.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Iterator

import grpc

from evaluator_service.core import DriftJobResult, EvaluatorCore, JobResult
from service_common.grpc_server import rpc, rpc_stream
from service_common.settings import Settings
from slmcl.storage.base import ArtifactStore
from slmcl_api.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc

log = logging.getLogger(__name__)

REPLICA_ID_ENV = "SLMCL_REPLICA_ID"


def replica_id(port: int) -> str:
    return os.environ.get(REPLICA_ID_ENV) or f"{socket.gethostname()}:{port}"


def encode_result(result: JobResult, replica: str) -> evaluator_pb2.EvaluateResult:
    ev = result.evaluation
    return evaluator_pb2.EvaluateResult(
        score=common_pb2.TaskScore(task=ev.task, accuracy=result.accuracy, correct=ev.correct, total=ev.total,
                                   score_sum=ev.score_sum),
        predictions=[common_pb2.Prediction(**p.as_dict()) for p in ev.predictions],
        seconds=result.seconds,
        replica_id=replica,
        new_tokens=ev.new_tokens,
    )


def encode_drift(result: DriftJobResult, replica: str) -> evaluator_pb2.DriftResult:
    rows = result.rows
    return evaluator_pb2.DriftResult(kl_to_base=rows.kl_to_base, entropy=rows.entropy, margin=rows.margin,
                                     num_rows=rows.num_rows, seconds=result.seconds, replica_id=replica)


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServicer):
    def __init__(self, core: EvaluatorCore) -> None:
        self.core = core

    @classmethod
    def create(cls, settings: Settings, store: ArtifactStore, replica: str) -> EvaluatorServicer:
        return cls(EvaluatorCore(settings, store, replica))

    @rpc_stream
    def Evaluate(self, request: evaluator_pb2.EvaluateRequest,
                 context: grpc.ServicerContext) -> Iterator[evaluator_pb2.EvaluateResponse]:
        job = self.core.prepare(
            experiment_id=request.experiment_id, spec_json=request.spec_json, task=request.task,
            shard_index=request.shard_index, shard_count=request.shard_count,
            checkpoint_prefix=request.checkpoint_prefix,
        )
        cancelled = threading.Event()
        context.add_callback(cancelled.set)  # called when the RPC ends for any reason
        events: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                res = self.core.run(job, on_progress=lambda done, total: events.put(("progress", done, total)),
                                    cancelled=cancelled)
                events.put(("result", res))
            except BaseException as exc:  # noqa: BLE001 - handed to the RPC thread, which maps it
                events.put(("error", exc))

        threading.Thread(target=work, name=f"evaluate-{request.task}", daemon=True).start()
        while True:
            kind, *payload = events.get()
            if kind == "progress":
                done, total = payload
                yield evaluator_pb2.EvaluateResponse(progress=evaluator_pb2.EvaluateProgress(done=done, total=total))
            elif kind == "result":
                yield evaluator_pb2.EvaluateResponse(result=encode_result(payload[0], self.core.replica_id))
                return
            else:
                raise payload[0]

    @rpc
    def Drift(self, request: evaluator_pb2.DriftRequest, context: grpc.ServicerContext) -> evaluator_pb2.DriftResult:
        job = self.core.prepare_drift(experiment_id=request.experiment_id, spec_json=request.spec_json,
                                      checkpoint_prefix=request.checkpoint_prefix)
        cancelled = threading.Event()
        context.add_callback(cancelled.set)  # a waiter whose client left gives up its place in the queue
        return encode_drift(self.core.run_drift(job, cancelled=cancelled), self.core.replica_id)

    @rpc
    def Info(self, request: evaluator_pb2.InfoRequest, context: grpc.ServicerContext) -> evaluator_pb2.InfoResponse:
        return evaluator_pb2.InfoResponse(
            replica_id=self.core.replica_id,
            device=self.core.device(),
            resident_models=self.core.resident_models(),
            requests_served=self.core.requests_served,
            capacity=self.core.capacity,
        )
