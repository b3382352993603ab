"""``slmcl.storage.local.ArtifactStore`` over an S3-compatible server (MinIO in compose, SeaweedFS locally)."""

from __future__ import annotations

import io

from minio import Minio
from minio.error import S3Error

from service_common.settings import Settings
from slmcl.errors import NotFoundError


class S3Store:
    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings, *, create_bucket: bool = True) -> "S3Store":
        settings.require_s3()
        client = Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                       secure=settings.s3_secure, region=settings.s3_region)
        store = cls(client, settings.s3_bucket)
        if create_bucket and not client.bucket_exists(settings.s3_bucket):
            try:
                client.make_bucket(settings.s3_bucket)
            except S3Error as exc:  # another service created it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        return store

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, key, io.BytesIO(data), length=len(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise NotFoundError(f"not in the store: {key}") from None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def list_keys(self, prefix: str) -> list[str]:
        p = prefix.rstrip("/") + "/" if prefix else ""
        keys = [o.object_name for o in self.client.list_objects(self.bucket, prefix=p, recursive=True)]
        if prefix and self.exists(prefix.rstrip("/")):
            keys.append(prefix.rstrip("/"))
        return sorted(k for k in keys if not k.endswith("/"))

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)


class PrefixedStore:
    """A view of a store under a key prefix: an experiment's results directory."""

    def __init__(self, store, prefix: str) -> None:  # type: ignore[no-untyped-def]
        self.store = store
        self.prefix = prefix.rstrip("/")

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def put_bytes(self, key: str, data: bytes) -> None:
        self.store.put_bytes(self._k(key), data)

    def get_bytes(self, key: str) -> bytes:
        return self.store.get_bytes(self._k(key))

    def exists(self, key: str) -> bool:
        return self.store.exists(self._k(key))

    def list_keys(self, prefix: str) -> list[str]:
        n = len(self.prefix) + 1
        return [k[n:] for k in self.store.list_keys(self._k(prefix) if prefix else self.prefix)]

    def delete(self, key: str) -> None:
        self.store.delete(self._k(key))
