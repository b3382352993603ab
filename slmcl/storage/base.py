"""The artifact-store protocol and what every store shares: key rules and folder copies.

Keys are ``/``-separated relative paths (``checkpoints/<run>/step-1/adapter_model.safetensors``).
Every store validates keys the same way, so a key that works on a laptop (a folder) works in
the services (an object store) and a ``..`` can never climb out of a results directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from slmcl.errors import NotFoundError


class ArtifactStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...  # raises NotFoundError

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...  # every key under prefix, recursively, sorted

    def delete(self, key: str) -> None: ...  # a missing key is not an error


class StoreBackend(Protocol):
    """What a URL scheme registers: a class (or object) that opens a store from its URL."""

    def from_url(self, url: str) -> ArtifactStore: ...


def check_key(key: str) -> str:
    """A key is relative, has no empty, ``.`` or ``..`` part; anything else is a bug or an attack."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad store key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: ``""`` (everything) or a key, a trailing ``/`` allowed and dropped."""
    stripped = prefix.rstrip("/") if prefix != "/" else prefix
    return check_key(stripped) if stripped else ""


def walk_files(base: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            yield Path(dirpath) / f


def put_dir(store: ArtifactStore, prefix: str, local_dir: str | Path) -> list[str]:
    """Upload every file of a folder under ``prefix``; returns the keys written."""
    keys = []
    for p in sorted(walk_files(Path(local_dir))):
        key = f"{prefix}/{p.relative_to(local_dir).as_posix()}"
        store.put_bytes(key, p.read_bytes())
        keys.append(key)
    return keys


def get_dir(store: ArtifactStore, prefix: str, local_dir: str | Path) -> Path:
    """Download every key under ``prefix`` into a folder (an adapter directory, say)."""
    keys = store.list_keys(prefix)
    if not keys:
        raise NotFoundError(f"nothing in the store under {prefix}/")
    out = Path(local_dir)
    for key in keys:
        target = out / key[len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get_bytes(key))
    return out
