"""Name -> implementation registries with aliases and helpful errors (style rule 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised when a registry is asked for a name it does not hold; lists the valid names."""


class Registry(Generic[T]):
    """A registry of named plug-ins of one kind (criteria, allocation policies, data sources).

    Args:
        kind: What the registry holds, used in error messages ("criterion", "allocation", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` and optional ``aliases``."""

        def decorate(obj: T) -> T:
            self.add(name, obj, *aliases)
            return obj

        return decorate

    def add(self, name: str, obj: T, *aliases: str) -> None:
        """Register ``obj`` under ``name`` (and aliases); a duplicate name is an error."""
        for key in (name, *aliases):
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")
        self._items[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases."""
        key = self._aliases.get(name, name)
        if key not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            )
        return key

    def get(self, name: str) -> T:
        """The implementation registered under ``name`` (or an alias)."""
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered names, sorted (aliases excluded)."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name in self._aliases)
