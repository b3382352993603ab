"""The registry behind task kinds, strategies and stores: names, misses, and first use from many threads."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from slmcl.errors import SpecError
from slmcl.registry import Registry


def test_names_are_validated_and_duplicates_refused() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("alpha", 1)
    reg.add("alpha", 1)  # the same object again (a module imported twice) is fine
    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", 2)
    for bad in ("Alpha", "1x", "", "a b", "x" * 41):
        with pytest.raises(ValueError, match="must be lowercase"):
            reg.add(bad, 3)


def test_an_unknown_name_suggests_the_closest_and_lists_the_known() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("olora", 1)
    reg.add("replay", 2)
    with pytest.raises(SpecError) as err:
        reg.get("olra")
    assert str(err.value) == "unknown widget 'olra'. Did you mean 'olora'? Known: olora, replay"


def test_builtins_register_once_even_when_many_threads_ask_first(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "slow_widgets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from slmcl.registry import Registry\nREG = Registry('widget', __name__)\n")
    for name in ("one", "two"):  # slow imports: the window in which a second thread once saw an empty registry
        (pkg / f"{name}.py").write_text(f"import time\nfrom slow_widgets import REG\ntime.sleep(0.2)\n"
                                        f"REG.add({name!r}, {name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import slow_widgets

    found: list[str] = []
    errors: list[Exception] = []

    def look() -> None:
        try:
            found.append(slow_widgets.REG.get("two"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=look) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and found == ["two"] * 8
    assert slow_widgets.REG.names() == ["one", "two"]
    sys.modules.pop("slow_widgets", None)
