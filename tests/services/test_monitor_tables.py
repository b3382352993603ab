"""The monitor's results tables: the last stage to commit writes them from every record."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from monitor_service.control import Control
from service_common.settings import Settings
from slmcl.config.spec import spec_from_dict
from slmcl.protocol import stages as protocol
from slmcl.storage.local import LocalStore
from tests.conftest import tiny_spec_dict


def test_a_stale_reader_cannot_overwrite_the_tables_of_a_later_stage(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two stages commit on two threads: "early" read the records before "late" committed.
    # Whatever the timing, the tables left behind must be the ones written from all records.
    ctl = Control(Settings(), LocalStore(tmp_path / "store"), redis.Redis(port=1), pool=None)  # type: ignore[arg-type]
    ctl._specs["exp"] = spec_from_dict(tiny_spec_dict(tmp_path / "model", data_dir, tmp_path / "out"),
                                       check_files=False)
    early_reading = threading.Event()
    written: list[list[str]] = []

    def read_stages(_store: Any, _rid: str | None = None) -> list[str]:
        if threading.current_thread().name == "early":
            early_reading.set()
            time.sleep(0.5)  # "late" commits and writes meanwhile, unless it must wait
            return ["r0"]
        return ["r0", "r1"]

    monkeypatch.setattr(protocol, "read_stages", read_stages)
    monkeypatch.setattr(protocol, "write_tables", lambda _store, records, prior=(): written.append(list(records)))

    early = threading.Thread(target=ctl._maybe_finish, args=("exp",), name="early")
    early.start()
    assert early_reading.wait(5)
    late = threading.Thread(target=ctl._maybe_finish, args=("exp",), name="late")
    late.start()
    early.join(5)
    late.join(5)
    assert written[-1] == ["r0", "r1"]
