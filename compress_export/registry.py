"""One small registry type behind passes, formats and kernels, filled by decorators.

The CLI derives its choices from these registries, so adding a pass or a format is one decorated class.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            setattr(obj, "name", name)
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list:
        return sorted(self._items)

    def items(self) -> Iterator:
        return iter(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items
