"""A view of a store under a key prefix: one experiment's results directory inside a shared bucket.

Pure (no client library): the monitor, the CLI and ``s3://bucket/prefix`` URLs all use it.
"""

from __future__ import annotations

from slmcl.storage.base import ArtifactStore, check_key, check_prefix


class PrefixedStore:
    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self.store = store
        self.prefix = check_key(prefix.rstrip("/"))

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        self.store.put_bytes(self._k(key), data)

    def get_bytes(self, key: str) -> bytes:
        return self.store.get_bytes(self._k(key))

    def exists(self, key: str) -> bool:
        return self.store.exists(self._k(key))

    def list_keys(self, prefix: str) -> list[str]:
        prefix = check_prefix(prefix)
        n = len(self.prefix) + 1
        # Listing everything asks for "<prefix>/": a key equal to the prefix itself is outside the view.
        keys = self.store.list_keys(self._k(prefix) if prefix else self.prefix + "/")
        return [k[n:] for k in keys if k.startswith(self.prefix + "/")]

    def delete(self, key: str) -> None:
        self.store.delete(self._k(key))

    def __repr__(self) -> str:
        return f"PrefixedStore({self.store!r}, {self.prefix!r})"
