"""The shared store between netmaster and netplugin: memcached, or memory in one process."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

# memcached's own limit on a key; longer keys are refused by the server, so
# they are refused here first with a message that names the key.
MAX_KEY_BYTES = 250


class StoreError(Exception):
    """The store refused or failed an operation. C{keys} names the keys concerned, if any."""

    def __init__(self, message: str, keys: Iterable[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused, reset or timed out)."""


class InvalidKey(StoreError, ValueError):
    """A key that memcached would refuse: not ASCII, whitespace or control characters, too long."""


def check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise InvalidKey(f"store keys are str, got {type(key).__name__}: {key!r}", [])
    try:
        raw = key.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidKey(f"store key {key!r} is not ASCII", [key]) from None
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidKey(f"store key {key!r} is {len(raw)} bytes; memcached allows at most "
                         f"{MAX_KEY_BYTES}", [key])
    if not raw or any(b <= 0x20 or b == 0x7F for b in raw):
        raise InvalidKey(f"store key {key!r} is empty or holds whitespace or control "
                         f"characters", [key])
    return key


def check_items(items: Mapping[str, bytes]) -> None:
    for key, value in items.items():
        check_key(key)
        if not isinstance(value, bytes):
            raise TypeError(f"store values are bytes, got {type(value).__name__} for {key}")


def parse_store_url(url: str) -> list[tuple[str, int]] | None:
    """The servers of C{memcached://h:p[,h:p...]}, or None for C{memory}."""
    # Imported here: contiv.config is the one place that parses addresses, and
    # nothing in this package should cost an import of it when unused.
    from contiv.config import parse_host_port

    if url == "memory":
        return None
    scheme, sep, servers = url.partition("://")
    if scheme != "memcached" or not sep or not servers:
        raise ValueError(f"expected 'memory' or 'memcached://host:port[,host:port...]', "
                         f"got {url!r}")
    return [parse_host_port(server, names=True) for server in servers.split(",")]


def open_store(reactor: Any, url: str, **options: Any) -> Any:
    """
    The store that C{url} names: C{memory} or C{memcached://host:port[,...]}.
    C{options} go to L{MemcachedStore} (timeouts, retries).
    """
    servers = parse_store_url(url)
    if servers is None:
        from contiv.store.memory import MemoryStore

        return MemoryStore()
    # pymemcache is imported only by a process that uses memcached.
    from contiv.store.memcached import MemcachedStore

    return MemcachedStore(reactor, servers, **options)
