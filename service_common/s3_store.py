"""``slmcl.storage.base.ArtifactStore`` over an S3-compatible server (MinIO in compose, SeaweedFS locally).

Registered as the ``s3`` scheme of ``slmcl.storage.factory.open_store`` through the
``slmcl.stores`` entry point (pyproject.toml), so the core opens ``s3://bucket/prefix`` without
importing minio. ``PrefixedStore`` moved to ``slmcl.storage.prefixed``; it is re-exported here.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from service_common.retry import call_with_retry
from service_common.settings import Settings
from slmcl.errors import NotFoundError, SpecError
from slmcl.storage.base import ArtifactStore, check_key, check_prefix
from slmcl.storage.prefixed import PrefixedStore

__all__ = ["PrefixedStore", "S3Store"]

_MISSING = ("NoSuchKey", "NoSuchObject", "NotFound")
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
URL_PARAMETERS = ("endpoint", "secure", "region", "create")
# Answers of a store that is (re)starting or overloaded; a missing key or bad credentials are not among them.
_TRANSIENT_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted",
                    "XMinioServerNotInitialized", "NoSuchBucket")

log = logging.getLogger("slmcl.s3")
F = TypeVar("F", bound=Callable[..., Any])


def is_transient(exc: BaseException) -> bool:
    """Whether waiting may help: the server unreachable, restarting or overloaded (never NotFound)."""
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES
    return isinstance(exc, (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, ConnectionError,
                            TimeoutError, OSError))


def _retried(fn: F) -> F:
    """The whole operation again on a transient failure (a request body is rebuilt each time), for the budget."""

    @functools.wraps(fn)
    def wrapper(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        what = f"s3 {fn.__name__}({', '.join(repr(a) for a in args if isinstance(a, str))}) on {self.bucket}"
        return call_with_retry(lambda: fn(self, *args, **kwargs), what=what, is_transient=is_transient, logger=log)

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature F promises


class S3Store:
    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings, *, create_bucket: bool = True) -> S3Store:
        settings.require_s3()
        client = Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                       secure=settings.s3_secure, region=settings.s3_region)
        store = cls(client, settings.s3_bucket)
        if create_bucket:
            store.ensure_bucket()
        return store

    @classmethod
    def from_url(cls, url: str) -> ArtifactStore:
        """``s3://[ACCESS:SECRET@]bucket[/prefix][?endpoint=host:port&secure=0|1&region=R&create=0|1]``.

        What the URL leaves out comes from the environment the services already read
        (``SLMCL_S3_ENDPOINT``, ``SLMCL_S3_ACCESS_KEY``, ...), so ``s3://slmcl`` is enough in a
        service. A prefix gives a ``PrefixedStore``: keys are relative to it. The bucket is
        created unless ``create=0``.
        """
        parts = urlsplit(url)
        bucket = parts.netloc.rpartition("@")[2]
        if parts.scheme != "s3" or not bucket or ":" in bucket or parts.fragment:
            raise SpecError(f"store URL {_redacted(url)!r}: expected s3://bucket[/prefix][?endpoint=host:port]")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - set(URL_PARAMETERS))
        if unknown:
            raise SpecError(f"store URL {_redacted(url)!r}: unknown parameter(s) {', '.join(unknown)}; "
                            f"known: {', '.join(URL_PARAMETERS)}")
        one = {k: v[-1] for k, v in query.items()}
        env = Settings()
        flags: dict[str, bool] = {}
        for name, default in (("secure", env.s3_secure), ("create", True)):
            text = one.get(name)
            if text is not None and text.lower() not in _FLAGS:
                raise SpecError(f"store URL {_redacted(url)!r}: {name}={text!r} must be 0 or 1")
            flags[name] = default if text is None else _FLAGS[text.lower()]
        access = unquote(parts.username) if parts.username else env.s3_access_key
        secret = unquote(parts.password) if parts.password else env.s3_secret_key
        if not access or not secret:
            raise SpecError(f"store URL {_redacted(url)!r}: no S3 credentials; set SLMCL_S3_ACCESS_KEY and "
                            "SLMCL_S3_SECRET_KEY (see .env.example)")
        endpoint = one.get("endpoint") or env.s3_endpoint
        try:
            client = Minio(endpoint, access_key=access, secret_key=secret, secure=flags["secure"],
                           region=one.get("region") or env.s3_region)
        except ValueError as exc:  # minio checks the endpoint's form
            raise SpecError(f"store URL {_redacted(url)!r}: endpoint {endpoint!r}: {exc}") from None
        store = cls(client, bucket)
        if flags["create"]:
            store.ensure_bucket()
        prefix = unquote(parts.path).strip("/")
        return PrefixedStore(store, prefix) if prefix else store

    @_retried
    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # another service created it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    @_retried
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, check_key(key), io.BytesIO(data), length=len(data))

    @_retried
    def get_bytes(self, key: str) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, check_key(key))
        except S3Error as exc:
            if exc.code in _MISSING:
                raise NotFoundError(f"not in the store: {key}") from None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    @_retried
    def exists(self, key: str) -> bool:
        return self._exists(key)

    def _exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, check_key(key))
            return True
        except S3Error as exc:
            if exc.code in _MISSING:
                return False
            raise

    @_retried
    def list_keys(self, prefix: str) -> list[str]:
        prefix = check_prefix(prefix)
        p = prefix + "/" if prefix else ""
        keys = [o.object_name for o in self.client.list_objects(self.bucket, prefix=p, recursive=True)]
        if prefix and self._exists(prefix):  # inside this call's own retry
            keys.append(prefix)
        return sorted(k for k in keys if k and not k.endswith("/"))

    @_retried
    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, check_key(key))

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r})"


def _redacted(url: str) -> str:
    """The URL as an error may show it: a secret in it is replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url
