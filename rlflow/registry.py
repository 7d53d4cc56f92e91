"""Named registries for the things users plug in: algorithms and model families (rewards have their own in
``rewards/``). A duplicate name raises; an unknown name is a :class:`ConfigError` that lists the known ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rlflow.schema import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> entry``. ``field`` is the config key that selects an entry (named in errors)."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind, self.field = kind, field
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} '{name}' is already registered (by {self._entries[name]!r})")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"{self.field} '{name}': unknown {self.kind}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
