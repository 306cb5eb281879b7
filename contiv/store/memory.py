"""
The in-memory store: what C{--role=all} shares between its two roles.

It keeps the memcached semantics that the roles rely on (bytes values,
missing keys absent from C{get_many}, an atomic increment), so code that runs
against it runs against memcached unchanged.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from twisted.internet.defer import Deferred, succeed


class MemoryStore:
    def __init__(self) -> None:
        self._items: dict[str, bytes] = {}

    def get_many(self, keys: Iterable[str]) -> Deferred:
        found = {key: self._items[key] for key in keys if key in self._items}
        return succeed(found)

    def set_many(self, items: Mapping[str, bytes]) -> Deferred:
        for key, value in items.items():
            if not isinstance(value, bytes):
                raise TypeError(f"store values are bytes, got {type(value).__name__} for {key}")
        self._items.update(items)
        return succeed(None)

    def delete_many(self, keys: Iterable[str]) -> Deferred:
        for key in keys:
            self._items.pop(key, None)
        return succeed(None)

    def incr(self, key: str, initial: int = 0) -> Deferred:
        value = int(self._items.get(key, str(initial).encode())) + 1
        self._items[key] = str(value).encode()
        return succeed(value)

    def keys(self) -> list[str]:
        return sorted(self._items)

    def close(self) -> Deferred:
        return succeed(None)
