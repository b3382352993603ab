"""What a replica does, without gRPC: compute slots with resident engines, bounded caches.

A request (Evaluate or Drift) is prepared on the caller's thread (parse the spec, fetch its
datasets and the adapter into the local cache: I/O only), then computed on one of the
replica's ``capacity`` slots; requests beyond that queue for a free slot. Each slot holds its
own resident engines (a copy of the base model each), cached by ``Engine.resident_key`` in an
LRU; a checkpoint is a LoRA adapter swapped into the slot's model in place. A slot computes
one request at a time, so an Evaluate and a Drift never see each other's adapter.

Everything a replica keeps is bounded: resident models per slot (``SLMCL_EVAL_MAX_RESIDENT``),
base distributions p_0 in memory (``SLMCL_EVAL_P0_CACHE_MB``, shared by the slots; the store's
``cache/base-reference-logp/`` is shared by every replica), downloaded adapter folders
(``SLMCL_EVAL_MAX_ADAPTERS``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service_common.datasets import localize, parse_spec_json
from service_common.settings import Settings
from slmcl.config.spec import ExperimentSpec, TaskSpec
from slmcl.errors import CancelledError, ModelError, NotFoundError, SpecError
from slmcl.inference.evaluation import Prediction, TaskEvaluation
from slmcl.models.lru import LRU
from slmcl.protocol import layout
from slmcl.protocol.drift import DriftRows
from slmcl.protocol.stages import BaseEvalCache, TaskResult
from slmcl.storage.base import ArtifactStore, get_dir


def checkpoint_present(folder: Path) -> bool:
    """A complete checkpoint of either format (LoRA adapter, merged model) is in ``folder``."""
    return folder.is_dir() and layout.checkpoint_complete({p.name for p in folder.iterdir()})


log = logging.getLogger(__name__)

CAPACITY_ENV = "SLMCL_EVALUATOR_CAPACITY"
MAX_RESIDENT_ENV = "SLMCL_EVAL_MAX_RESIDENT"
MAX_ADAPTERS_ENV = "SLMCL_EVAL_MAX_ADAPTERS"
P0_CACHE_MB_ENV = "SLMCL_EVAL_P0_CACHE_MB"
# One slot on every device: a slot is a full copy of the base model, and one request already
# keeps a CPU's cores (or a small model's GPU, through one Python thread) busy. See README.md.
DEFAULT_CAPACITY = 1
DEFAULT_MAX_ADAPTERS = 64
DEFAULT_P0_CACHE_MB = 1024


def check_prefix(prefix: str) -> str:
    """A checkpoint prefix is a relative store key: it also names a folder of the local cache."""
    prefix = prefix.strip().rstrip("/")
    parts = prefix.split("/")
    if prefix.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SpecError(f"checkpoint_prefix: {prefix!r} is not a store key prefix "
                        "(e.g. experiments/<id>/checkpoints/<run>/step-1)")
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
        return ev.score_sum / ev.total if ev.total else 0.0  # an empty shard (more shards than rows) scores 0/0


@dataclass(frozen=True)
class DriftJob:
    """A prepared Drift request: the spec localized, the adapter (if any) on local disk and pinned there."""

    experiment_id: str
    spec: ExperimentSpec
    checkpoint_prefix: str  # "" for the base
    adapter_dir: Path | None


@dataclass(frozen=True)
class DriftJobResult:
    rows: DriftRows
    seconds: float  # from the compute slot to the rows (adapter swap, p_0 if not cached, one forward per row)


def env_int(name: str, default: int, minimum: int) -> int:
    """An integer setting; a bad value stops the replica at start with the variable's name."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SpecError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise SpecError(f"{name}: must be >= {minimum}, got {value}")
    return value


@dataclass
class Slot:
    """One compute slot: its own resident engines (a model copy each, with its own adapter state).

    A slot serves one request at a time, so an Evaluate and a Drift never share an adapter:
    the adapter swapped into a slot's engine stays there until that slot's next request.
    """

    index: int
    engines: LRU[str, Any]  # resident key -> Engine
    loaded_adapter: dict[str, str | None] = field(default_factory=dict)  # resident key -> prefix swapped in
    busy: bool = False


class EvaluatorCore:
    def __init__(self, settings: Settings, store: ArtifactStore, replica_id: str, max_resident: int | None = None,
                 capacity: int | None = None) -> None:
        self.settings = settings
        self.store = store
        self.replica_id = replica_id
        self.work_dir = Path(settings.work_dir)
        self.capacity = capacity if capacity is not None else env_int(CAPACITY_ENV, DEFAULT_CAPACITY, 1)
        self.max_resident = max_resident if max_resident is not None else env_int(MAX_RESIDENT_ENV, 1, 1)
        self.max_adapters = env_int(MAX_ADAPTERS_ENV, DEFAULT_MAX_ADAPTERS, 1)
        p0_mb = env_int(P0_CACHE_MB_ENV, DEFAULT_P0_CACHE_MB, 0)
        self._state = threading.Lock()  # counters, pins and adapter locks
        self._slots_free = threading.Condition()
        # transformers builds a model under a process-wide meta-device context: slots load one at a time.
        self._loading = threading.Lock()
        self._slots = [Slot(i, LRU(max_items=self.max_resident, on_evict=self._evicted(i)))
                       for i in range(self.capacity)]
        # Base distributions, shared by every slot (keyed by the p_0 cache key), bounded in bytes.
        self.p0_cache: LRU[str, Any] = LRU(max_bytes=p0_mb * 2**20, size=lambda t: t.numel() * t.element_size())
        # Adapter folders under <work_dir>/adapters: least recently used removed, never one a request holds.
        self._adapter_pins: dict[str, int] = {}
        self._adapters: LRU[str, Path] = LRU(max_items=self.max_adapters, on_evict=self._remove_adapter,
                                             evictable=lambda prefix, _p: not self._adapter_pins.get(prefix))
        self._adapter_locks: dict[str, threading.Lock] = {}
        self._adopt_cached_adapters()
        self.requests_served = 0

    # -- preparation (caller's thread, I/O only) -----------------------------------------
    def with_replica_device(self, spec: ExperimentSpec) -> ExperimentSpec:
        """The replica's hardware decides the device when ``SLMCL_DEVICE`` names one."""
        if self.settings.device and self.settings.device != "auto" and spec.device != self.settings.device:
            return dataclasses.replace(spec, device=self.settings.device)
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

    def prepare_drift(self, *, experiment_id: str, spec_json: str, checkpoint_prefix: str) -> DriftJob:
        spec = parse_spec_json(spec_json)
        prefix = check_prefix(checkpoint_prefix) if checkpoint_prefix.strip() else ""
        spec = self.with_replica_device(localize(spec, self.store, self.work_dir))
        adapter_dir = self.fetch_adapter(prefix) if prefix else None
        return DriftJob(experiment_id, spec, prefix, adapter_dir)

    def fetch_adapter(self, prefix: str) -> Path:
        """``<work_dir>/adapters/<prefix>``: downloaded once per prefix (checkpoints are immutable).

        The folder is pinned (kept out of the adapter LRU's reach) until ``release_adapter``.
        """
        local = self.work_dir / "adapters" / prefix
        with self._state:
            lock = self._adapter_locks.setdefault(prefix, threading.Lock())
            self._adapter_pins[prefix] = self._adapter_pins.get(prefix, 0) + 1
        try:
            with lock:
                if not checkpoint_present(local):
                    self._download(prefix, local)
            self._adapters.put(prefix, local)
        except BaseException:
            self.release_adapter(prefix)
            raise
        return local

    def _download(self, prefix: str, local: Path) -> None:
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
                if not checkpoint_present(local):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("fetched adapter %s", prefix)

    def release_adapter(self, prefix: str) -> None:
        with self._state:
            left = self._adapter_pins.get(prefix, 0) - 1
            if left > 0:
                self._adapter_pins[prefix] = left
            else:
                self._adapter_pins.pop(prefix, None)
        self._adapters.shrink()  # a folder kept while pinned may be evicted now

    def _remove_adapter(self, prefix: str, local: Path) -> None:
        """Evicted from the adapter LRU: renamed away first, so no reader ever sees half a folder."""
        with self._state:
            if not self._adapter_pins.get(prefix):
                self._adapter_locks.pop(prefix, None)
        gone = local.with_name(f".{local.name}-evicted-{os.getpid()}-{threading.get_ident()}")
        try:
            os.rename(local, gone)
        except OSError:
            return  # already gone (another replica sharing the work dir evicted it)
        shutil.rmtree(gone, ignore_errors=True)
        log.info("evicted adapter %s", prefix)

    def _adopt_cached_adapters(self) -> None:
        """Adapter folders a previous life of this replica left in the work dir count against the bound."""
        root = self.work_dir / "adapters"
        if not root.is_dir():
            return
        weights = [*root.rglob(layout.ADAPTER_FILES[1]), *root.rglob(layout.MERGED_FILES[1])]
        found = sorted((f.stat().st_mtime, f.parent) for f in weights
                       if not any(part.startswith(".") for part in f.relative_to(root).parts))
        for _mtime, folder in found:
            self._adapters.put(folder.relative_to(root).as_posix(), folder)

    @property
    def cached_adapters(self) -> list[str]:
        return list(self._adapters)

    # -- compute (on a slot) -----------------------------------------------------------------
    def _acquire(self, key: str, prefix: str | None, cancelled: threading.Event) -> Slot:
        """A free slot, preferring one that already holds the model (and the adapter ``prefix``)."""
        with self._slots_free:
            while True:
                free = [s for s in self._slots if not s.busy]
                if free:
                    def fit(s: Slot) -> tuple[bool, bool, int]:
                        resident = key in s.engines
                        return resident and s.loaded_adapter.get(key) == prefix, resident, -s.index

                    slot = max(free, key=fit)
                    slot.busy = True
                    return slot
                if cancelled.is_set():
                    raise CancelledError("the client cancelled the request while it waited for the replica")
                self._slots_free.wait(timeout=0.5)

    def _release(self, slot: Slot) -> None:
        with self._slots_free:
            slot.busy = False
            self._slots_free.notify()

    def _evicted(self, index: int) -> Callable[[str, Any], None]:
        def evict(key: str, engine: Any) -> None:
            import gc

            import torch

            self._slots[index].loaded_adapter.pop(key, None)
            log.info("evicting resident model %s from slot %d", engine.spec.model.name, index)
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        return evict

    def engine_for(self, slot: Slot, spec: ExperimentSpec):  # type: ignore[no-untyped-def]  # Engine: torch import
        from slmcl.models.engine import Engine

        key = Engine.resident_key(spec)
        engine = slot.engines.get(key)
        if engine is None:
            slot.engines.shrink(room=1)  # the old model goes before the new one loads
            t0 = time.perf_counter()
            with self._loading:
                engine = Engine(spec)
            log.info("loaded %s on %s in %.1f s", spec.model.name, engine.loaded.device, time.perf_counter() - t0)
            slot.loaded_adapter[key] = None
            slot.engines.put(key, engine)
        engine.use_spec(spec)
        return key, engine

    def _use_adapter(self, slot: Slot, key: str, engine: Any, prefix: str, adapter_dir: Path) -> None:
        """Swap the checkpoint into the slot's engine unless it is already there."""
        if slot.loaded_adapter.get(key) == prefix:
            return
        slot.loaded_adapter[key] = None  # a failed swap leaves unknown weights
        if not checkpoint_present(adapter_dir):
            # Removed by another replica sharing the work dir: fetch it again.
            with self._state:
                lock = self._adapter_locks.setdefault(prefix, threading.Lock())
            with lock:
                if not checkpoint_present(adapter_dir):
                    self._download(prefix, adapter_dir)
        try:
            engine.load_adapter(adapter_dir)
        except RuntimeError as exc:  # a shape mismatch from torch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"checkpoint {prefix}: does not fit the spec's model/LoRA ({first})") from None
        slot.loaded_adapter[key] = prefix

    def preload(self, spec: ExperimentSpec) -> None:
        """Load the spec's base model into every slot before the replica reports SERVING."""
        from slmcl.models.engine import Engine

        spec = self.with_replica_device(spec)
        never = threading.Event()
        slots = [self._acquire(Engine.resident_key(spec), None, never) for _ in range(self.capacity)]
        try:
            for slot in slots:
                self.engine_for(slot, spec)
        finally:
            for slot in slots:
                self._release(slot)

    def run(self, job: Job, on_progress: Callable[[int, int], None] | None = None,
            cancelled: threading.Event | None = None) -> JobResult:
        """Evaluate a prepared job on a free slot (a cancelled waiter gives up)."""
        from slmcl.models.engine import Engine

        cancelled = cancelled or threading.Event()
        try:
            slot = self._acquire(Engine.resident_key(job.spec), job.checkpoint_prefix or None, cancelled)
        except BaseException:
            self._unpin(job.checkpoint_prefix)
            raise
        try:
            if cancelled.is_set():
                raise CancelledError("the client cancelled the request")
            t0 = time.perf_counter()
            key, engine = self.engine_for(slot, job.spec)
            examples = engine.test_examples(job.task)
            rows = [examples[i] for i in shard_rows(len(examples), job.shard_index, job.shard_count)]
            if on_progress is not None:
                on_progress(0, len(rows))
            if job.adapter_dir is not None:
                self._use_adapter(slot, key, engine, job.checkpoint_prefix, job.adapter_dir)

            sent = (0, len(rows))  # the engine opens with (0, total) too: said once

            def progressed(done: int, total: int) -> None:
                nonlocal sent
                if cancelled.is_set():
                    raise CancelledError("the client cancelled the request")
                if on_progress is not None and (done, total) != sent:
                    sent = (done, total)
                    on_progress(done, total)

            if job.adapter_dir is None:  # the base: asked once per (model, data, rendering, decoding, shard)
                ev = self._base_evaluation(engine, job, rows, progressed)
            else:
                ev = engine.evaluate(job.task, examples=rows, on_progress=progressed)
            result = JobResult(ev, time.perf_counter() - t0)
        except CancelledError:
            log.info("%s task=%s shard=%d/%d checkpoint=%s: cancelled by the client", job.experiment_id or "-",
                     job.task.name, job.shard_index, max(job.shard_count, 1), job.checkpoint_prefix or "base")
            raise
        finally:
            self._release(slot)
            self._unpin(job.checkpoint_prefix)
        with self._state:
            self.requests_served += 1
        log.info("%s task=%s shard=%d/%d checkpoint=%s: %d/%d correct, %d new tokens, %.2f s",
                 job.experiment_id or "-", job.task.name, job.shard_index, max(job.shard_count, 1),
                 job.checkpoint_prefix or "base", ev.correct, ev.total, ev.new_tokens, result.seconds)
        return result

    def _base_evaluation(self, engine: Any, job: Job, rows: list[Any],
                         on_progress: Callable[[int, int], None]) -> TaskEvaluation:
        """The base's answer from the store's cache (shared by replicas, experiments and ``slmcl run``),
        else computed."""
        cache = BaseEvalCache(self.store)
        fingerprint = engine.base_eval_key(job.task)
        shard = f"shard-{job.shard_index}-of-{max(job.shard_count, 1)}" if job.shard_count > 1 else ""
        hit = cache.get(fingerprint, shard)
        if hit is not None:
            return TaskEvaluation.of(hit.task, [Prediction(**p) for p in hit.predictions], hit.seconds)
        ev: TaskEvaluation = engine.evaluate(job.task, base=True, examples=rows, on_progress=on_progress)
        cache.put(fingerprint, TaskResult(ev.task, ev.score(), [p.as_dict() for p in ev.predictions], ev.seconds),
                  shard)
        return ev

    def run_drift(self, job: DriftJob, cancelled: threading.Event | None = None) -> DriftJobResult:
        """Per-row drift of a prepared job's checkpoint (or of the base) against the cached p_0."""
        from slmcl.models.engine import Engine

        cancelled = cancelled or threading.Event()
        try:
            slot = self._acquire(Engine.resident_key(job.spec), job.checkpoint_prefix or None, cancelled)
        except BaseException:
            self._unpin(job.checkpoint_prefix)
            raise
        try:
            if cancelled.is_set():
                raise CancelledError("the client cancelled the request")
            t0 = time.perf_counter()
            key, engine = self.engine_for(slot, job.spec)
            if job.adapter_dir is None:
                rows = engine.drift_rows(self.store, base=True, p0_cache=self.p0_cache)
            else:
                self._use_adapter(slot, key, engine, job.checkpoint_prefix, job.adapter_dir)
                rows = engine.drift_rows(self.store, p0_cache=self.p0_cache)
            result = DriftJobResult(rows, time.perf_counter() - t0)
        finally:
            self._release(slot)
            self._unpin(job.checkpoint_prefix)
        with self._state:
            self.requests_served += 1
        log.info("%s drift checkpoint=%s: %d rows, %.2f s", job.experiment_id or "-", job.checkpoint_prefix or "base",
                 rows.num_rows, result.seconds)
        return result

    def _unpin(self, prefix: str) -> None:
        if prefix:
            self.release_adapter(prefix)

    # -- info --------------------------------------------------------------------------------
    def resident_models(self) -> list[str]:
        names = [e.spec.model.name for s in self._slots for e in s.engines.values()]
        return list(dict.fromkeys(names))  # a model resident in several slots is listed once

    def device(self) -> str:
        import torch

        from slmcl.models.loading import resolve_device

        devices = [e.loaded.device for s in self._slots for e in s.engines.values()]
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
