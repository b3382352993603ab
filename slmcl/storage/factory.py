"""``open_store(url)``: one string names where artifacts live, for the CLI, the services and the tests.

``file:///abs/path`` or a plain path is a folder (``LocalStore``); ``s3://bucket/prefix`` is an
object store. The core registers only what it can build with the standard library; a store that
needs a client library (S3 needs minio) lives outside the core and is found through the
``slmcl.stores`` entry-point group, loaded the first time its scheme is asked for, so importing
the core never imports a client library.
"""

from __future__ import annotations

import difflib
from importlib.metadata import EntryPoint, entry_points

from slmcl.errors import SpecError
from slmcl.registry import Registry
from slmcl.storage.base import ArtifactStore, StoreBackend

ENTRY_POINT_GROUP = "slmcl.stores"

# Built-in schemes: every module of slmcl.storage that registers one (``file`` in local.py).
STORES = Registry[StoreBackend]("store scheme", package="slmcl.storage")


def url_scheme(url: str) -> str:
    """``s3`` for ``s3://...``; a string without ``://`` is a plain path, so ``file``."""
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0].lower()
    if not scheme:
        raise SpecError(f"store URL {url!r}: no scheme before '://'")
    return scheme


def _plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_schemes() -> list[str]:
    return sorted(set(STORES.names()) | set(_plugins()))


def backend(scheme: str) -> StoreBackend:
    """The backend of a scheme: a built-in, else the installed entry point of that name."""
    if scheme in STORES:
        return STORES.get(scheme)
    plugin = _plugins().get(scheme)
    if plugin is None:
        close = difflib.get_close_matches(scheme, known_schemes(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"unknown store scheme {scheme!r}.{hint} Known: {', '.join(known_schemes())}")
    try:
        loaded: StoreBackend = plugin.load()
    except ImportError as exc:
        raise SpecError(f"store scheme {scheme!r} needs {plugin.value} (entry point group {ENTRY_POINT_GROUP}), "
                        f"which cannot be imported: {exc}") from None
    STORES.add(scheme, loaded)
    return loaded


def open_store(url: str) -> ArtifactStore:
    """The store a URL names; a bad URL or an unknown scheme is a one-line ``SpecError``."""
    if not url:
        raise SpecError("store URL is empty: expected a path, file:///abs/path or s3://bucket[/prefix]")
    return backend(url_scheme(url)).from_url(url)
