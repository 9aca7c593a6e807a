"""One small registry type behind passes, formats and kernels, filled by decorators.

The CLI derives its choices from these registries, so adding a pass or a format is one decorated class. A registry
names the modules that hold its built-in entries and imports them on first lookup: whoever asks for a format gets
every built-in one whatever was imported before, and no package `__init__` has to import its members for their
side effect (formats/ and kernels/ have no `__init__.py`: see ARCHITECTURE.md on why).
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, Iterator, Sequence, TypeVar

from compress_export.core.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: Sequence[str] = ()):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._builtins = tuple(builtins)  # module names whose import registers the built-in entries
        self._loaded = not self._builtins

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first, so that a built-in module that looks itself up does not recurse
            for module in self._builtins:
                importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            setattr(obj, "name", name)  # noqa: B010  (T is any registered class: mypy cannot know it has .name)
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}") from None

    def names(self) -> list:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator:
        self._load()
        return iter(self._items.items())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
