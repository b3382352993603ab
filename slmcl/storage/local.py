"""A folder as an artifact store: what the embedded mode writes its results directory with.

``ArtifactStore``, ``put_dir`` and ``get_dir`` are re-exported from ``slmcl.storage.base`` so
that ``from slmcl.storage.local import LocalStore, get_dir, put_dir, ArtifactStore`` keeps working.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from slmcl.errors import NotFoundError, SpecError
from slmcl.storage.base import ArtifactStore, check_key, check_prefix, get_dir, put_dir, walk_files
from slmcl.storage.factory import STORES

__all__ = ["ArtifactStore", "LocalStore", "get_dir", "put_dir"]


@STORES.register("file")
class LocalStore:
    """A folder as a store; writes are atomic (temp file then rename), so readers never see halves."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_url(cls, url: str) -> LocalStore:
        """``file:///abs/path`` (a URL names no host and has no query) or a plain path."""
        if "://" not in url:
            return cls(url)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or not parts.path:
            raise SpecError(f"store URL {url!r}: expected file:///absolute/path (no host, no query)")
        return cls(unquote(parts.path))

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

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
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # a folder is not a key
            raise NotFoundError(f"not in the store: {key}") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        prefix = check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in walk_files(base) if not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():  # a folder is not a key: there is nothing to delete
            return
        try:
            path.unlink(missing_ok=True)
        except NotADirectoryError:  # a parent is a file: the key cannot exist
            pass
