"""One contract for every artifact store: a folder and a real S3 server must behave the same.

Each test runs on a ``LocalStore`` and on SeaweedFS's S3 gateway started on loopback, both
opened through ``open_store(url)``, so what the embedded mode relies on is what the services get.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slmcl.errors import NotFoundError, SpecError
from slmcl.storage.base import ArtifactStore, get_dir, put_dir
from slmcl.storage.factory import known_schemes, open_store
from slmcl.storage.prefixed import PrefixedStore

ACCESS_KEY = "slmcl-contract-access"
SECRET_KEY = "slmcl-contract-secret-key-123"
_buckets = itertools.count()

Opener = Callable[..., ArtifactStore]  # (sub-path="") -> a store of one backend, all under one fresh root


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from service_common.local_servers import start_s3

    server = start_s3(tmp_path_factory.mktemp("s3"), ACCESS_KEY, SECRET_KEY)
    yield f"127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def opener(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Opener:
    """Opens stores of one backend by URL; every store of a test shares one empty root (folder or bucket)."""
    if request.param == "local":
        root = f"file://{tmp_path / 'root'}"

        def open_local(sub: str = "") -> ArtifactStore:
            return open_store(root + (f"/{sub}" if sub else ""))

        return open_local
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("SLMCL_S3_ACCESS_KEY", ACCESS_KEY)  # the credentials come from the service environment
    monkeypatch.setenv("SLMCL_S3_SECRET_KEY", SECRET_KEY)
    bucket = f"contract-{next(_buckets)}"

    def open_s3(sub: str = "") -> ArtifactStore:
        return open_store(f"s3://{bucket}" + (f"/{sub}" if sub else "") + f"?endpoint={endpoint}&secure=0")

    return open_s3


@pytest.fixture()
def store(opener: Opener) -> ArtifactStore:
    return opener("")


def test_put_get_exists(store: ArtifactStore) -> None:
    assert not store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"\x00\x01payload")
    assert store.exists("a/b.bin")
    assert store.get_bytes("a/b.bin") == b"\x00\x01payload"
    store.put_bytes("a/b.bin", b"")  # overwrite, and an empty object is still an object
    assert store.get_bytes("a/b.bin") == b"" and store.exists("a/b.bin")


def test_missing_key_raises_not_found(store: ArtifactStore) -> None:
    with pytest.raises(NotFoundError, match="not in the store: nope/x"):
        store.get_bytes("nope/x")


def test_a_folder_is_not_a_key(store: ArtifactStore) -> None:
    store.put_bytes("d/f", b"1")
    assert not store.exists("d")
    with pytest.raises(NotFoundError):
        store.get_bytes("d")


def test_list_keys_is_recursive_and_sorted(store: ArtifactStore) -> None:
    for key in ("runs/r2/b", "runs/r1/z/deep", "runs/r1/a", "runs-other/x", "other/x"):
        store.put_bytes(key, key.encode())
    assert store.list_keys("runs") == ["runs/r1/a", "runs/r1/z/deep", "runs/r2/b"]
    assert store.list_keys("runs/") == ["runs/r1/a", "runs/r1/z/deep", "runs/r2/b"]
    assert store.list_keys("runs/r1") == ["runs/r1/a", "runs/r1/z/deep"]
    assert store.list_keys("") == ["other/x", "runs-other/x", "runs/r1/a", "runs/r1/z/deep", "runs/r2/b"]
    assert store.list_keys("runs/r2/b") == ["runs/r2/b"]
    assert store.list_keys("missing") == []


def test_delete(store: ArtifactStore) -> None:
    store.put_bytes("k/v", b"1")
    store.put_bytes("k/w", b"2")
    store.delete("k/v")
    assert not store.exists("k/v") and store.list_keys("k") == ["k/w"]
    with pytest.raises(NotFoundError):
        store.get_bytes("k/v")
    store.delete("k/v")  # deleting what is gone is fine
    assert store.get_bytes("k/w") == b"2"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a/..", "a//b", "./a", "a/./b", "a/"])
def test_bad_keys_are_rejected(store: ArtifactStore, key: str) -> None:
    for op in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key),
               lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(ValueError, match="bad store key"):
            op()
    assert store.list_keys("") == []


@pytest.mark.parametrize("prefix", ["/", "../x", "a/../b"])
def test_bad_list_prefixes_are_rejected(store: ArtifactStore, prefix: str) -> None:
    with pytest.raises(ValueError, match="bad store key"):
        store.list_keys(prefix)


def test_put_dir_get_dir_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes(range(256)) * 4,
             "sub/notes.txt": "é\n".encode()}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    keys = put_dir(store, "checkpoints/run-1/step-1", src)
    assert keys == sorted(f"checkpoints/run-1/step-1/{rel}" for rel in files)
    store.put_bytes("checkpoints/run-1/step-10/other", b"not mine")

    out = get_dir(store, "checkpoints/run-1/step-1", tmp_path / "copy")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files


def test_get_dir_of_nothing_raises(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nothing in the store under nope/"):
        get_dir(store, "nope", tmp_path / "out")


def test_prefixed_store_is_a_view(store: ArtifactStore) -> None:
    view = PrefixedStore(store, "experiments/e1/")
    view.put_bytes("runs/r1/stage-1.json", b"{}")
    store.put_bytes("experiments/e10/runs/x", b"a neighbour, not in the view")
    assert store.get_bytes("experiments/e1/runs/r1/stage-1.json") == b"{}"
    assert view.exists("runs/r1/stage-1.json") and not view.exists("runs/x")
    assert view.list_keys("") == ["runs/r1/stage-1.json"]
    assert view.list_keys("runs") == ["runs/r1/stage-1.json"]
    with pytest.raises(ValueError, match="bad store key"):
        view.get_bytes("../e10/runs/x")
    view.delete("runs/r1/stage-1.json")
    assert store.list_keys("experiments") == ["experiments/e10/runs/x"]


def test_a_url_path_opens_a_view_under_it(opener: Opener) -> None:
    """``file:///root/sub`` and ``s3://bucket/sub`` both put keys under ``sub/`` of the root."""
    opener("exp/e2").put_bytes("results.json", b"[1]")
    root = opener("")
    assert root.list_keys("") == ["exp/e2/results.json"]
    assert root.get_bytes("exp/e2/results.json") == b"[1]"
    assert opener("exp/e2").list_keys("") == ["results.json"]


def test_a_plain_path_is_a_local_store(tmp_path: Path) -> None:
    open_store(str(tmp_path / "plain")).put_bytes("a/b", b"1")
    assert open_store(f"file://{tmp_path / 'plain'}").get_bytes("a/b") == b"1"


@pytest.mark.parametrize("url, message", [
    ("gs://bucket", r"unknown store scheme 'gs'\. Known: file, s3"),
    ("file://host/abs", "expected file:///absolute/path"),
    ("s3://bucket?endpont=x", "unknown parameter.*endpont; known: endpoint"),
    ("s3://bucket?secure=maybe", "secure='maybe' must be 0 or 1"),
    ("", "store URL is empty"),
])
def test_bad_urls_are_one_line_spec_errors(url: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        open_store(url)
    assert "\n" not in str(info.value)


def test_s3_without_credentials_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLMCL_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("SLMCL_S3_SECRET_KEY", raising=False)
    with pytest.raises(SpecError, match="SLMCL_S3_ACCESS_KEY and SLMCL_S3_SECRET_KEY"):
        open_store("s3://bucket?endpoint=127.0.0.1:1")


def test_the_s3_scheme_is_an_entry_point_not_a_core_import() -> None:
    assert known_schemes() == ["file", "s3"]


@pytest.mark.integration
def test_s3_credentials_may_come_in_the_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What bench and ``make stack`` do: no environment, the key pair in the URL (percent-encoded)."""
    monkeypatch.delenv("SLMCL_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("SLMCL_S3_SECRET_KEY", raising=False)
    url = f"s3://{ACCESS_KEY}:{SECRET_KEY}@contract-url/exp?endpoint={s3_endpoint}&secure=0&region=us-east-1"
    open_store(url).put_bytes("k", b"v")
    assert open_store(url.replace("/exp?", "?")).list_keys("") == ["exp/k"]
    from minio.error import S3Error

    with pytest.raises(S3Error, match="AccessDenied|SignatureDoesNotMatch|InvalidAccessKeyId") as info:
        open_store(url.replace(SECRET_KEY, "wrong-secret")).get_bytes("k")
    assert "wrong-secret" not in str(info.value)
