"""What only a folder store does; the behaviour every store shares is in test_store_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmcl.errors import NotFoundError
from slmcl.storage.local import ArtifactStore, LocalStore, get_dir, put_dir


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "root")


def test_keys_are_files_under_the_root(store: LocalStore) -> None:
    store.put_bytes("a/b.txt", b"hello")
    assert (store.root / "a" / "b.txt").read_bytes() == b"hello"
    assert store.path("a/b.txt") == store.root / "a" / "b.txt"


def test_put_leaves_no_temp_files(store: LocalStore) -> None:
    store.put_bytes("x/y", b"1" * 1000)
    assert sorted(p.name for p in (store.root / "x").iterdir()) == ["y"]


def test_list_keys_hides_dot_files(store: LocalStore) -> None:
    store.put_bytes("p/visible", b"1")
    (store.root / "p" / ".partial-upload").write_bytes(b"0")
    assert store.list_keys("p") == ["p/visible"]


def test_a_key_below_a_file_is_missing_not_an_os_error(store: LocalStore) -> None:
    store.put_bytes("f", b"1")
    assert not store.exists("f/g")
    with pytest.raises(NotFoundError):
        store.get_bytes("f/g")
    store.delete("f/g")
    store.delete("nothing/here")
    assert store.get_bytes("f") == b"1"


def test_bad_keys_never_touch_the_disk(store: LocalStore) -> None:
    with pytest.raises(ValueError, match="bad store key"):
        store.put_bytes("../x", b"x")
    assert not (store.root.parent / "x").exists()


def test_the_old_import_path_still_works(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"1")
    typed: ArtifactStore = store
    assert put_dir(typed, "p", src) == ["p/a"]
    assert (get_dir(typed, "p", tmp_path / "out") / "a").read_bytes() == b"1"
