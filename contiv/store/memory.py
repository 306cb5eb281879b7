"""
The in-memory store: what C{--role=all} shares between its two roles.

It keeps the memcached semantics that the roles rely on (bytes values,
missing keys absent from C{get_many}, C{add} only when absent, an atomic
increment that does not create the key, keys memcached would refuse refused,
values above the item size refused), so code that runs against it runs
against memcached unchanged. The contract tests run one suite against both.

C{memory_limit} (bytes of keys and values) makes it refuse writes once full,
as C{memcached -M} does, so that callers can be tested against a full store
without a server.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from twisted.internet.defer import Deferred, fail, succeed

from contiv.store import StoreError, check_items, check_key

# memcached's default -I (1 MiB) bounds the whole item, not just the value.
DEFAULT_ITEM_SIZE = 1024 * 1024
# memcached's item header (48 bytes), CAS (8), the key's NUL and the value's
# CRLF: what an item costs beyond key and value, so that the in-memory store
# refuses the same values memcached does.
ITEM_OVERHEAD = 48 + 8 + 1 + 2
# memcached stores at most a 64-bit unsigned counter and wraps on overflow.
COUNTER_MODULUS = 2 ** 64


class MemoryStore:
    def __init__(self, *, item_size: int = DEFAULT_ITEM_SIZE,
                 memory_limit: Optional[int] = None) -> None:
        self._items: dict[str, bytes] = {}
        self.item_size = item_size
        self.memory_limit = memory_limit
        self._used = 0

    def get_many(self, keys: Iterable[str]) -> Deferred:
        try:
            keys = [check_key(key) for key in keys]
        except StoreError:
            return fail()
        return succeed({key: self._items[key] for key in keys if key in self._items})

    def set_many(self, items: Mapping[str, bytes]) -> Deferred:
        try:
            check_items(items)
        except (StoreError, TypeError):
            return fail()
        refused = [key for key, value in items.items() if not self._store(key, value)]
        for key in refused:
            # memcached unlinks the old value when a set cannot be stored, so
            # that a failed update never leaves stale data readable.
            self._forget(key)
        if refused:
            return fail(StoreError(f"the store refused {len(refused)} of {len(items)} "
                                   f"values: {', '.join(refused[:5])}", refused))
        return succeed(None)

    def add(self, key: str, value: bytes) -> Deferred:
        try:
            check_items({key: value})
        except (StoreError, TypeError):
            return fail()
        if key in self._items:
            return succeed(False)
        if not self._store(key, value):
            return fail(StoreError(f"the store refused {key}", [key]))
        return succeed(True)

    def delete_many(self, keys: Iterable[str]) -> Deferred:
        try:
            keys = [check_key(key) for key in keys]
        except StoreError:
            return fail()
        for key in keys:
            self._forget(key)
        return succeed(None)

    def incr(self, key: str) -> Deferred:
        try:
            check_key(key)
        except StoreError:
            return fail()
        current = self._items.get(key)
        if current is None:
            return succeed(None)
        if not current.isdigit() or len(current) > 20 or int(current) >= COUNTER_MODULUS:
            return fail(StoreError(f"cannot increment the non-numeric value of {key}", [key]))
        value = (int(current) + 1) % COUNTER_MODULUS
        self._forget(key)
        self._store(key, str(value).encode())
        return succeed(value)

    def keys(self) -> list[str]:
        return sorted(self._items)

    def close(self) -> Deferred:
        return succeed(None)

    def _store(self, key: str, value: bytes) -> bool:
        if ITEM_OVERHEAD + len(key) + len(value) > self.item_size:
            return False
        previous = self._items.get(key)
        freed = len(key) + len(previous) if previous is not None else 0
        needed = len(key) + len(value)
        if self.memory_limit is not None and self._used - freed + needed > self.memory_limit:
            return False
        self._items[key] = value
        self._used += needed - freed
        return True

    def _forget(self, key: str) -> None:
        value = self._items.pop(key, None)
        if value is not None:
            self._used -= len(key) + len(value)
