"""What a replica does, without gRPC: resident engines, the adapter cache, one compute lock.

A request is prepared on the caller's thread (parse the spec, fetch its datasets and the
adapter into the local cache: I/O only), then computed under the replica's single compute
lock (requests queue there, one evaluation at a time). The base model of a spec is loaded
once and kept: engines are cached by ``Engine.resident_key``; a checkpoint is a LoRA
adapter swapped into the resident model in place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from service_common.datasets import localize, parse_spec_json
from service_common.settings import Settings
from slmcl.errors import CancelledError, ModelError, NotFoundError, SpecError
from slmcl.inference.evaluation import TaskEvaluation
from slmcl.config.spec import ExperimentSpec, TaskSpec
from slmcl.storage.local import ArtifactStore, get_dir

log = logging.getLogger(__name__)

MAX_RESIDENT_ENV = "SLMCL_EVAL_MAX_RESIDENT"


def check_prefix(prefix: str) -> str:
    """A checkpoint prefix is a relative store key: it also names a folder of the local cache."""
    prefix = prefix.strip().rstrip("/")
    parts = prefix.split("/")
    if prefix.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SpecError(f"checkpoint_prefix: {prefix!r} is not a store key prefix (e.g. experiments/<id>/checkpoints/<run>/step-1)")
    return prefix


def shard_rows(n: int, shard_index: int, shard_count: int) -> list[int]:
    """Positions of the shard's rows among ``n`` test rows: ``i % shard_count == shard_index``."""
    if shard_count < 0:
        raise SpecError(f"shard_count: must be >= 0, got {shard_count}")
    count = max(shard_count, 1)
    if not 0 <= shard_index < count:
        raise SpecError(f"shard_index: must be in [0, {count}), got {shard_index}")
    return [i for i in range(n) if i % count == shard_index]


@dataclass(frozen=True)
class Job:
    """A prepared request: everything local, ready for the compute lock."""

    experiment_id: str
    spec: ExperimentSpec
    task: TaskSpec
    shard_index: int
    shard_count: int
    checkpoint_prefix: str  # "" for the base
    adapter_dir: Path | None


@dataclass(frozen=True)
class JobResult:
    evaluation: TaskEvaluation
    seconds: float  # from the compute lock to the result (adapter swap and generation)

    @property
    def accuracy(self) -> float:
        ev = self.evaluation
        return ev.correct / ev.total if ev.total else 0.0  # an empty shard (more shards than rows) scores 0/0


class EvaluatorCore:
    def __init__(self, settings: Settings, store: ArtifactStore, replica_id: str, max_resident: int | None = None) -> None:
        self.settings = settings
        self.store = store
        self.replica_id = replica_id
        self.work_dir = Path(settings.work_dir)
        self.max_resident = max(1, max_resident if max_resident is not None else int(os.environ.get(MAX_RESIDENT_ENV, "1")))
        self._engines: OrderedDict[str, object] = OrderedDict()  # resident key -> Engine, least recent first
        self._loaded_adapter: dict[str, str | None] = {}  # resident key -> prefix whose weights are swapped in
        self._compute = threading.Lock()  # one evaluation at a time on this replica
        self._state = threading.Lock()  # counters and the engine table, for Info
        self._adapter_locks: dict[str, threading.Lock] = {}
        self.requests_served = 0

    # -- preparation (caller's thread, I/O only) -----------------------------------------
    def with_replica_device(self, spec: ExperimentSpec) -> ExperimentSpec:
        """The replica's hardware decides the device when ``SLMCL_DEVICE`` names one."""
        if self.settings.device and self.settings.device != "auto" and spec.device != self.settings.device:
            return dataclasses.replace(spec, device=self.settings.device)  # type: ignore[arg-type]
        return spec

    def prepare(self, *, experiment_id: str, spec_json: str, task: str, shard_index: int, shard_count: int,
                checkpoint_prefix: str) -> Job:
        spec = parse_spec_json(spec_json)
        names = [t.name for t in spec.tasks]
        if task not in names:
            raise SpecError(f"task: {task!r} is not a task of the spec (tasks: {', '.join(names)})")
        shard_rows(0, shard_index, shard_count)  # validate the shard before any download
        prefix = check_prefix(checkpoint_prefix) if checkpoint_prefix.strip() else ""
        spec = self.with_replica_device(localize(spec, self.store, self.work_dir))
        adapter_dir = self.fetch_adapter(prefix) if prefix else None
        return Job(experiment_id, spec, spec.task(task), shard_index, shard_count, prefix, adapter_dir)

    def fetch_adapter(self, prefix: str) -> Path:
        """``<work_dir>/adapters/<prefix>``: downloaded once per prefix (checkpoints are immutable)."""
        local = self.work_dir / "adapters" / prefix
        with self._state:
            lock = self._adapter_locks.setdefault(prefix, threading.Lock())
        with lock:
            if (local / "adapter_model.safetensors").is_file():
                return local
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}-"))
            try:
                try:
                    get_dir(self.store, prefix, tmp)
                except NotFoundError:
                    raise NotFoundError(f"checkpoint_prefix: no checkpoint in the store under {prefix}/") from None
                # Replicas may share a work dir: the folder appears complete (atomic rename) or not at
                # all, and a folder another process already placed is never removed under its reader.
                try:
                    os.rename(tmp, local)
                except OSError:
                    if not (local / "adapter_model.safetensors").is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("fetched adapter %s", prefix)
            return local

    # -- compute (under the lock) ----------------------------------------------------------
    def engine_for(self, spec: ExperimentSpec):  # type: ignore[no-untyped-def]
        from slmcl.models.engine import Engine

        key = Engine.resident_key(spec)
        with self._state:
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
        if engine is None:
            while len(self._engines) >= self.max_resident:
                self._evict()
            t0 = time.perf_counter()
            engine = Engine(spec)
            log.info("loaded %s on %s in %.1f s", spec.model.name, engine.loaded.device, time.perf_counter() - t0)
            with self._state:
                self._engines[key] = engine
                self._loaded_adapter[key] = None
        engine.use_spec(spec)
        return key, engine

    def _evict(self) -> None:
        import gc

        import torch

        with self._state:
            key, engine = self._engines.popitem(last=False)
            self._loaded_adapter.pop(key, None)
        log.info("evicting resident model %s", engine.spec.model.name)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def preload(self, spec: ExperimentSpec) -> None:
        with self._compute:
            self.engine_for(self.with_replica_device(spec))

    def run(self, job: Job, on_progress: Callable[[int, int], None] | None = None,
            cancelled: threading.Event | None = None) -> JobResult:
        """Evaluate a prepared job; waits for the compute lock (a cancelled waiter gives up)."""
        cancelled = cancelled or threading.Event()
        while not self._compute.acquire(timeout=0.5):
            if cancelled.is_set():
                raise CancelledError("the client cancelled the request while it waited for the replica")
        try:
            if cancelled.is_set():
                raise CancelledError("the client cancelled the request")
            t0 = time.perf_counter()
            key, engine = self.engine_for(job.spec)
            examples = engine.test_examples(job.task)
            rows = [examples[i] for i in shard_rows(len(examples), job.shard_index, job.shard_count)]
            if on_progress is not None:
                on_progress(0, len(rows))
            if job.adapter_dir is not None and self._loaded_adapter.get(key) != job.checkpoint_prefix:
                self._loaded_adapter[key] = None  # a failed swap leaves unknown weights
                try:
                    engine.load_adapter(job.adapter_dir)
                except RuntimeError as exc:  # a shape mismatch from torch
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ModelError(f"checkpoint {job.checkpoint_prefix}: does not fit the spec's model/LoRA ({first})") from None
                self._loaded_adapter[key] = job.checkpoint_prefix

            sent = (0, len(rows))  # the engine opens with (0, total) too: said once

            def progressed(done: int, total: int) -> None:
                nonlocal sent
                if cancelled.is_set():
                    raise CancelledError("the client cancelled the request")
                if on_progress is not None and (done, total) != sent:
                    sent = (done, total)
                    on_progress(done, total)

            ev = engine.evaluate(job.task, base=job.adapter_dir is None, examples=rows, on_progress=progressed)
            result = JobResult(ev, time.perf_counter() - t0)
        except CancelledError:
            log.info("%s task=%s shard=%d/%d checkpoint=%s: cancelled by the client", job.experiment_id or "-",
                     job.task.name, job.shard_index, max(job.shard_count, 1), job.checkpoint_prefix or "base")
            raise
        finally:
            self._compute.release()
        with self._state:
            self.requests_served += 1
        log.info("%s task=%s shard=%d/%d checkpoint=%s: %d/%d correct, %d new tokens, %.2f s",
                 job.experiment_id or "-", job.task.name, job.shard_index, max(job.shard_count, 1),
                 job.checkpoint_prefix or "base", ev.correct, ev.total, ev.new_tokens, result.seconds)
        return result

    # -- info --------------------------------------------------------------------------------
    def resident_models(self) -> list[str]:
        with self._state:
            return [e.spec.model.name for e in self._engines.values()]  # type: ignore[attr-defined]

    def device(self) -> str:
        import torch

        from slmcl.models.loading import resolve_device

        with self._state:
            devices = [e.loaded.device for e in self._engines.values()]  # type: ignore[attr-defined]
        if not devices:
            try:
                devices = [resolve_device(self.settings.device or "auto")]
            except Exception as exc:  # noqa: BLE001 - Info must answer even on a misconfigured replica
                return f"unavailable ({exc})"
        out = []
        for d in dict.fromkeys(devices):
            if d.type == "cuda":
                out.append(f"{d} ({torch.cuda.get_device_name(d)})")
            else:
                out.append(str(d))
        return ", ".join(out)
