"""The monitor's side of the stage protocol: measure each announced checkpoint on the evaluators, commit.

The protocol itself (records, commit order, drift aggregation, the base stage) is the core's
``slmcl.protocol.stages``; this module only supplies its ``CheckpointEvaluator``: a checkpoint's
tasks (and shards) fan out over the evaluator replicas, and its drift rows come from one of
them (the replicas hold the base model and its cached distributions, on the GPU of a GPU host).

Two executors, so the monitor never waits on itself: stage handlers run on ``stages`` and wait
for evaluation requests that run on ``requests``, which nothing else submits to. How many
requests are in flight at once is decided by the pool (one per free replica slot), not by a
thread count here, so adding replicas adds concurrency.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from monitor_service.evaluators import EvaluatorPool
from slmcl.config.spec import ExperimentSpec, TaskSpec
from slmcl.protocol import layout
from slmcl.protocol.drift import DriftRows
from slmcl.protocol.stages import EvalProgress, TaskResult
from slmcl_api.v1 import evaluator_pb2

log = logging.getLogger(__name__)

# Enough threads to keep every replica slot of a large pool busy; they block in the pool, not on CPU.
MAX_REQUESTS_IN_FLIGHT = 256
BASE_ROWS_CACHE = 64  # experiments whose base drift rows are kept in memory


def pred_dict(p: Any) -> dict[str, Any]:
    return {"index": p.index, "prompt": p.prompt, "gold": p.gold, "gold_normalized": p.gold_normalized,
            "prediction": p.prediction, "raw_output": p.raw_output, "hit_max_tokens": p.hit_max_tokens,
            "correct": p.correct, "score": p.score, "new_tokens": p.new_tokens}


def combine_shards(task: str, parts: Sequence[evaluator_pb2.EvaluateResult]) -> TaskResult:
    """One task's result from its shards (the same numbers as one unsharded evaluation)."""
    correct = sum(p.score.correct for p in parts)
    total = sum(p.score.total for p in parts)
    score_sum = sum(p.score.score_sum for p in parts)
    preds = sorted((pred_dict(x) for p in parts for x in p.predictions), key=lambda d: d["index"])
    score = {"accuracy": score_sum / total if total else 0.0, "correct": correct, "total": total,
             "score_sum": score_sum}
    return TaskResult(task, score, preds, sum(p.seconds for p in parts))


class RemoteEvaluator:
    """``CheckpointEvaluator`` over the evaluator replicas, for one experiment."""

    parallel = True  # drift on one replica while the others evaluate

    def __init__(self, pool: EvaluatorPool, requests: ThreadPoolExecutor, exp_id: str, spec: ExperimentSpec,
                 shards: int, base_rows: Callable[[], DriftRows | None],
                 on_served: Callable[[list[str]], None] = lambda replicas: None) -> None:
        self.pool = pool
        self.requests = requests
        self.exp_id = exp_id
        self.spec_json = spec.to_json()
        self.shards = max(1, shards)
        self._base_rows = base_rows
        self._on_served = on_served

    def _prefix(self, checkpoint: str | None) -> str:
        return f"{layout.experiment_prefix(self.exp_id)}/{checkpoint}" if checkpoint else ""

    def evaluate(self, checkpoint: str | None, tasks: Sequence[TaskSpec],
                 on_progress: EvalProgress | None = None) -> list[TaskResult]:
        futures: dict[str, list[Future[evaluator_pb2.EvaluateResult]]] = {}
        for task in tasks:
            futures[task.name] = [self.requests.submit(self._one, checkpoint, task.name, i, on_progress)
                                  for i in range(self.shards)]
        out = []
        for name, futs in futures.items():
            parts = [f.result() for f in futs]
            self._on_served(sorted({p.replica_id for p in parts}))
            out.append(combine_shards(name, parts))
        return out

    def _one(self, checkpoint: str | None, task: str, shard: int,
             on_progress: EvalProgress | None) -> evaluator_pb2.EvaluateResult:
        req = evaluator_pb2.EvaluateRequest(experiment_id=self.exp_id, spec_json=self.spec_json,
                                            checkpoint_prefix=self._prefix(checkpoint), task=task,
                                            shard_index=shard, shard_count=self.shards)

        def progress(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(task, done, total)

        return self.pool.evaluate(req, on_progress=progress)

    def drift_rows(self, checkpoint: str | None) -> DriftRows:
        if checkpoint is None:
            cached = self._base_rows()
            if cached is not None:
                return cached
        req = evaluator_pb2.DriftRequest(experiment_id=self.exp_id, spec_json=self.spec_json,
                                         checkpoint_prefix=self._prefix(checkpoint))
        res = self.pool.drift(req)
        return DriftRows(kl_to_base=list(res.kl_to_base), entropy=list(res.entropy), margin=list(res.margin))


class BaseRowsCache:
    """The base's drift rows per experiment (an LRU: the monitor lives for weeks, experiments come and go)."""

    def __init__(self, size: int = BASE_ROWS_CACHE) -> None:
        self._rows: OrderedDict[str, DriftRows] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, exp_id: str) -> DriftRows | None:
        with self._lock:
            rows = self._rows.get(exp_id)
            if rows is not None:
                self._rows.move_to_end(exp_id)
            return rows

    def put(self, exp_id: str, rows: DriftRows) -> None:
        with self._lock:
            self._rows[exp_id] = rows
            self._rows.move_to_end(exp_id)
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)
