"""Named components: task kinds, strategies and stores register themselves here.

A registry maps a lowercase name to a component; the name, never code, is what a spec names
and what travels between processes. Learned from PEFT's ``register_peft_method`` and
lm-eval's registries: names are validated when they are registered (a duplicate is a bug in
the code, so it raises at import time), and an unknown name gets an error that lists the
known ones and the closest match, so a typo in a spec is one clear line.

Stdlib only: the spec validates names against registries without importing torch.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from slmcl.errors import SpecError

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


class Registry(Generic[T]):
    """A name -> component map with validated names and helpful misses.

    ``package`` names the package whose modules register the built-in components when
    imported: the registry imports every module of it on first lookup, so adding a component
    is adding one file, listing or validating names costs nothing until someone asks, and
    importing the registry itself stays cheap.
    """

    def __init__(self, what: str, package: str | None = None) -> None:
        self.what = what  # "task kind", "strategy", "store": used in messages
        self._package = package
        self._loaded = False
        self._loading = False
        self._items: dict[str, T] = {}
        self._lock = threading.RLock()

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@STRATEGIES.register("olora")`` on the component."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if not _NAME.match(name):
            raise ValueError(f"{self.what} name {name!r} must be lowercase letters, digits, '-' or '_' "
                             "and start with a letter")
        with self._lock:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.what} {name!r} is already registered by {_origin(self._items[name])}; "
                                 "choose another name")
            self._items[name] = obj

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise SpecError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.what} {name!r}.{hint} Known: {', '.join(known) or '(none)'}"

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        with self._lock:  # other threads wait here until every built-in is registered
            if self._loaded or self._loading:
                return  # loaded meanwhile, or a built-in module looking itself up while it registers
            self._loading = True
            try:
                if self._package:
                    pkg = importlib.import_module(self._package)
                    for info in pkgutil.iter_modules(pkg.__path__, f"{self._package}."):
                        if not info.name.rsplit(".", 1)[-1].startswith("_"):
                            importlib.import_module(info.name)
                self._loaded = True
            finally:
                self._loading = False


def _origin(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
