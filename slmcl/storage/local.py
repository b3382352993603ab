"""Where artifacts live: a small key/value interface over a folder now, an object store later.

Keys are ``/``-separated relative paths (``checkpoints/<run>/step-1/adapter_model.safetensors``).
The embedded mode uses ``LocalStore`` on the results directory; the services implement
the same protocol over MinIO/S3, so the core never knows which one it writes to.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

from slmcl.errors import NotFoundError


class ArtifactStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...  # raises NotFoundError

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...  # every key under prefix, recursively, sorted

    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad store key {key!r}")
    return key


class LocalStore:
    """A folder as a store; writes are atomic (temp file then rename), so readers never see halves."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"not in the store: {key}") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in _walk(base) if not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def _walk(base: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            yield Path(dirpath) / f


def put_dir(store: ArtifactStore, prefix: str, local_dir: str | Path) -> list[str]:
    """Upload every file of a folder under ``prefix``; returns the keys written."""
    keys = []
    for p in sorted(_walk(Path(local_dir))):
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
