"""LocalStore: a folder behind the artifact-store protocol the services implement over MinIO."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmcl.errors import NotFoundError
from slmcl.storage.local import LocalStore, get_dir, put_dir


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "root")


def test_put_get_exists(store: LocalStore) -> None:
    assert not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"hello")
    assert store.exists("a/b.txt")
    assert store.get_bytes("a/b.txt") == b"hello"
    assert (store.root / "a" / "b.txt").read_bytes() == b"hello"
    store.put_bytes("a/b.txt", b"again")  # overwrite
    assert store.get_bytes("a/b.txt") == b"again"


def test_put_leaves_no_temp_files(store: LocalStore) -> None:
    store.put_bytes("x/y", b"1" * 1000)
    assert sorted(p.name for p in (store.root / "x").iterdir()) == ["y"]


def test_get_missing_raises_not_found(store: LocalStore) -> None:
    with pytest.raises(NotFoundError, match="not in the store: nope/x"):
        store.get_bytes("nope/x")
    assert isinstance(NotFoundError("x"), LookupError)


def test_a_folder_is_not_a_key(store: LocalStore) -> None:
    store.put_bytes("d/f", b"1")
    assert not store.exists("d")


def test_list_keys_is_recursive_and_sorted(store: LocalStore) -> None:
    for key in ("runs/r2/b", "runs/r1/z/deep", "runs/r1/a", "other/x"):
        store.put_bytes(key, key.encode())
    assert store.list_keys("runs") == ["runs/r1/a", "runs/r1/z/deep", "runs/r2/b"]
    assert store.list_keys("runs/r1") == ["runs/r1/a", "runs/r1/z/deep"]
    assert store.list_keys("") == ["other/x", "runs/r1/a", "runs/r1/z/deep", "runs/r2/b"]
    assert store.list_keys("runs/r2/b") == ["runs/r2/b"]
    assert store.list_keys("missing") == []


def test_list_keys_hides_dot_files(store: LocalStore) -> None:
    store.put_bytes("p/visible", b"1")
    (store.root / "p" / ".partial-upload").write_bytes(b"0")
    assert store.list_keys("p") == ["p/visible"]


def test_delete(store: LocalStore) -> None:
    store.put_bytes("k/v", b"1")
    store.delete("k/v")
    assert not store.exists("k/v")
    with pytest.raises(NotFoundError):
        store.get_bytes("k/v")
    store.delete("k/v")  # deleting what is gone is fine


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a/..", "a//b", "./a", "a/./b", "a/"])
def test_bad_keys_are_rejected(store: LocalStore, key: str) -> None:
    for op in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key),
               lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(ValueError, match="bad store key"):
            op()
    assert not (store.root.parent / "x").exists()


def test_put_dir_get_dir_round_trip(store: LocalStore, tmp_path: Path) -> None:
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


def test_get_dir_of_nothing_raises(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nothing in the store under nope/"):
        get_dir(store, "nope", tmp_path / "out")
