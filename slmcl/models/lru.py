"""A bounded, thread-safe least-recently-used cache for what a long-lived process keeps resident.

A service replica serves experiments for as long as it lives: loaded base models, base
distributions p_0 and downloaded adapters must be bounded, or the replica grows with every
experiment it ever saw. Bounds are a number of entries and/or a total size (bytes, through
``size``); the least recently used entries go first, never one that ``evictable`` protects
(an adapter a queued request is about to load) and never the entry just put.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(
        self,
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
        on_evict: Callable[[K, V], None] | None = None,
        evictable: Callable[[K, V], bool] | None = None,
    ) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items: must be >= 1, got {max_items}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes: must be >= 0, got {max_bytes}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size or (lambda _v: 0)
        self._on_evict = on_evict
        self._evictable = evictable
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # least recent first
        self._bytes = 0
        self._lock = threading.RLock()
        self.evictions = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._entries))

    def values(self) -> list[V]:
        with self._lock:
            return [v for v, _ in self._entries.values()]

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Insert (or refresh) ``key``; returns what was evicted to make room (already handed to ``on_evict``)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            nbytes = int(self._size(value))
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            evicted = self._shrink(keep=key)
        for k, v in evicted:
            if self._on_evict is not None:
                self._on_evict(k, v)
        return evicted

    def pop(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
            return entry[0]

    def shrink(self, room: int = 0) -> list[tuple[K, V]]:
        """Evict down to the bounds again, with ``room`` entries to spare: a resident model is
        evicted *before* its successor loads, so the two never share the memory."""
        with self._lock:
            evicted = self._shrink(keep=None, room=room)
        for k, v in evicted:
            if self._on_evict is not None:
                self._on_evict(k, v)
        return evicted

    def _over(self, room: int = 0) -> bool:
        if self.max_items is not None and len(self._entries) + room > self.max_items:
            return True
        return self.max_bytes is not None and self._bytes > self.max_bytes

    def _shrink(self, keep: K | None, room: int = 0) -> list[tuple[K, V]]:
        evicted: list[tuple[K, V]] = []
        for k in list(self._entries):
            if not self._over(room):
                break
            if k == keep:
                continue
            value, nbytes = self._entries[k]
            if self._evictable is not None and not self._evictable(k, value):
                continue
            del self._entries[k]
            self._bytes -= nbytes
            evicted.append((k, value))
            self.evictions += 1
        return evicted


__all__ = ["LRU"]
