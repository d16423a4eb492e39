"""Append-only name -> factory tables (datasets, methods, ...), in the manner of timm's registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of factories. Registering a name twice is an error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._planned: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def plan(self, name: str, note: str) -> None:
        """List ``name`` as planned but not implemented (it cannot be selected)."""
        self._planned[name] = note

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            if name in self._planned:
                raise ConfigError(f"{self.kind} {name!r} is planned but not implemented yet") from None
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def planned(self) -> dict[str, str]:
        return dict(self._planned)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
