"""A small explicit registry: name -> object, raising on duplicates and listing names on a miss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (builders, loss classes, readers).

    ``add`` refuses a name that is already taken, so two plugins cannot
    silently shadow each other; ``get`` on an unknown name raises a ``KeyError``
    whose message lists every valid name.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} is already registered (to {self._items[name]!r})")
        self._items[name] = obj

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its object (a plugin's tests clean up after themselves)."""
        self.get(name)  # the same error as get() for an unknown name
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
