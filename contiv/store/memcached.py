"""
The memcached store: the same interface as L{contiv.store.memory.MemoryStore}
over one memcached (pymemcache C{Client}) or several (C{HashClient}, keys
spread by rendezvous hashing).

pymemcache blocks, so every call runs on a private thread pool and comes back
as a Deferred on the reactor. pymemcache clients are not thread-safe: each pool
thread gets a client of its own. Every failure to reach memcached becomes
L{StoreUnavailable}; a value memcached refuses (item too large, out of memory
under C{-M}) becomes L{StoreError} naming the keys, never a silent loss.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar

from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import (MemcacheClientError, MemcacheError,
                                   MemcacheIllegalInputError, MemcacheServerError,
                                   MemcacheUnexpectedCloseError)
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from contiv.store import StoreError, StoreUnavailable, check_items, check_key

T = TypeVar("T")

# Large pipelines are split: memcached answers while it reads, and replies
# that nobody reads until everything is sent can fill both socket buffers.
GET_BATCH_KEYS = 100
SET_BATCH_KEYS = 200
SET_BATCH_BYTES = 4 * 1024 * 1024

# A stale connection (memcached restarted) shows up as one of these; so does
# a server that is down or too slow.
CONNECTION_ERRORS = (OSError, MemcacheUnexpectedCloseError)


class _DaemonThread(threading.Thread):
    """A pool thread that a forgotten close() cannot turn into a hang at interpreter exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


def _list(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


class MemcachedStore:
    log = Logger()

    def __init__(self, reactor: Any, servers: Sequence[tuple[str, int]], *,
                 timeout: float = 1.0, connect_timeout: float = 1.0, retries: int = 2,
                 retry_timeout: float = 1.0, dead_timeout: float = 30.0,
                 max_threads: int = 4) -> None:
        if not servers:
            raise ValueError("MemcachedStore needs at least one server")
        self._reactor = reactor
        self.servers = [(str(host), int(port)) for host, port in servers]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.retry_timeout = retry_timeout
        self.dead_timeout = dead_timeout
        self._max_threads = max(1, min(max_threads, 4))
        self._where = ",".join(f"{host}:{port}" for host, port in self.servers)
        self._pool: Optional[ThreadPool] = None
        self._shutdown_trigger: Any = None
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemcachedStore {self._where}>"

    # -- the store interface

    def get_many(self, keys: Iterable[str]) -> Deferred:
        try:
            keys = list(dict.fromkeys(check_key(key) for key in keys))
        except StoreError:
            return fail()
        if not keys:
            return succeed({})
        return self._call("get", keys, self._get_many, keys)

    def set_many(self, items: Mapping[str, bytes]) -> Deferred:
        try:
            check_items(items)
        except (StoreError, TypeError):
            return fail()
        if not items:
            return succeed(None)
        return self._call("set", list(items), self._set_many, dict(items))

    def add(self, key: str, value: bytes) -> Deferred:
        try:
            check_items({key: value})
        except (StoreError, TypeError):
            return fail()
        return self._call("add", [key], self._add, key, value)

    def delete_many(self, keys: Iterable[str]) -> Deferred:
        try:
            keys = list(dict.fromkeys(check_key(key) for key in keys))
        except StoreError:
            return fail()
        if not keys:
            return succeed(None)
        return self._call("delete", keys, self._delete_many, keys)

    def incr(self, key: str) -> Deferred:
        """
        The new value, or None when the key is missing. A retry after a
        connection lost mid-command may apply the increment twice; a
        generation counter only needs to move forward, so that is accepted.
        """
        try:
            check_key(key)
        except StoreError:
            return fail()
        return self._call("incr", [key], self._incr, key)

    def close(self) -> Deferred:
        """
        Stop the thread pool (waiting for calls in flight, which the timeouts
        bound) and close every connection.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        self._stop_pool()
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:
                self.log.failure("closing a memcached client for {servers}",
                                 servers=self._where)
        return succeed(None)

    # -- plumbing (reactor thread)

    def _call(self, what: str, keys: Sequence[str], operation: Callable[..., T],
              *args: Any) -> Deferred:
        if self._closed:
            return fail(StoreError(f"the memcached store {self._where} is closed", keys))
        if self._pool is None:
            # Started on first use, so that building a store (e.g. to check a
            # configuration) costs no threads.
            self._pool = ThreadPool(minthreads=1, maxthreads=self._max_threads,
                                    name=f"contiv-memcached {self._where}")
            self._pool.threadFactory = _DaemonThread
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._on_shutdown)
        return deferToThreadPool(self._reactor, self._pool, self._run, what, keys,
                                 operation, *args)

    def _on_shutdown(self) -> None:
        # A process that stops without close() must still get its threads back.
        self._shutdown_trigger = None
        self._stop_pool()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    # -- plumbing (pool threads)

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            common = dict(connect_timeout=self.connect_timeout, timeout=self.timeout,
                          no_delay=True, ignore_exc=False,
                          # noreply would turn every refusal into silence.
                          default_noreply=False)
            if len(self.servers) == 1:
                client = Client(self.servers[0], **common)
            else:
                client = HashClient(self.servers, retry_attempts=self.retries,
                                    retry_timeout=self.retry_timeout,
                                    dead_timeout=self.dead_timeout, **common)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _run(self, what: str, keys: Sequence[str], operation: Callable[..., T],
             *args: Any) -> T:
        client = self._client()
        # HashClient keeps its own failure bookkeeping (retry_attempts,
        # retry_timeout, dead_timeout); retrying on top of it would only hit
        # its "server is failing" answer, so only a single Client is retried here.
        attempts = self.retries + 1 if isinstance(client, Client) else 1
        last: Optional[BaseException] = None
        for _ in range(attempts):
            try:
                return operation(client, *args)
            except StoreError:
                raise
            except CONNECTION_ERRORS as e:
                last = e
            except MemcacheIllegalInputError as e:
                raise StoreError(f"memcached {what} refused: {e}", keys) from e
            except (MemcacheServerError, MemcacheClientError) as e:
                raise StoreError(f"memcached {self._where} refused {what} of "
                                 f"{_list(list(keys))}: {e}", keys) from e
            except MemcacheError as e:
                # HashClient's "All servers seem to be down right now".
                raise StoreUnavailable(f"memcached {self._where} unavailable "
                                       f"({what}): {e}", keys) from e
        raise StoreUnavailable(f"memcached {self._where} unavailable ({what}): "
                               f"{type(last).__name__}: {last}", keys) from last

    def _check_served(self, client: Any, what: str, keys: Iterable[str]) -> None:
        """
        HashClient answers for a server it marked as failing, while it waits
        for retry_timeout, with a default (no values, False) instead of an
        error even with ignore_exc=False. Such an answer would read as
        "missing" or "already there": turn it into StoreUnavailable.
        """
        if not isinstance(client, HashClient):
            return
        # pymemcache has no public view of its failure bookkeeping.
        failing = set(getattr(client, "_failed_clients", ()))
        if not failing:
            return
        unserved = []
        for key in keys:
            node = client.hasher.get_node(key)
            if node is None or client.clients[node].server in failing:
                unserved.append(key)
        if unserved:
            servers = sorted(f"{h}:{p}" for h, p in failing)
            raise StoreUnavailable(f"memcached {', '.join(servers)} failing; {what} of "
                                   f"{_list(unserved)} not served", unserved)

    def _get_many(self, client: Any, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), GET_BATCH_KEYS):
            batch = keys[start:start + GET_BATCH_KEYS]
            found.update(client.get_many(batch))
            self._check_served(client, "get", batch)
        return found

    def _set_many(self, client: Any, items: dict[str, bytes]) -> None:
        refused: list[str] = []
        for batch in self._set_batches(items):
            try:
                failed = client.set_many(batch, noreply=False)
            except MemcacheUnexpectedCloseError:
                raise
            except MemcacheServerError:
                # memcached refused one value and pymemcache stopped reading
                # replies there: store one by one to learn which ones.
                failed = [key for key, value in batch.items()
                          if not self._set_one(client, key, value)]
            self._check_served(client, "set", batch)
            refused.extend(failed)
        if refused:
            raise StoreError(f"memcached {self._where} refused {len(refused)} of "
                             f"{len(items)} values: {_list(refused)}", refused)

    def _set_one(self, client: Any, key: str, value: bytes) -> bool:
        try:
            return bool(client.set(key, value, noreply=False))
        except MemcacheUnexpectedCloseError:
            raise
        except MemcacheServerError as e:
            self.log.warn("memcached {servers} refused {key}: {error}",
                          servers=self._where, key=key, error=str(e))
            return False

    @staticmethod
    def _set_batches(items: dict[str, bytes]) -> Iterable[dict[str, bytes]]:
        batch: dict[str, bytes] = {}
        size = 0
        for key, value in items.items():
            if batch and (len(batch) >= SET_BATCH_KEYS
                          or size + len(value) > SET_BATCH_BYTES):
                yield batch
                batch, size = {}, 0
            batch[key] = value
            size += len(value)
        if batch:
            yield batch

    def _add(self, client: Any, key: str, value: bytes) -> bool:
        stored = client.add(key, value, noreply=False)
        self._check_served(client, "add", [key])
        return bool(stored)

    def _delete_many(self, client: Any, keys: list[str]) -> None:
        client.delete_many(keys, noreply=False)
        self._check_served(client, "delete", keys)

    def _incr(self, client: Any, key: str) -> Optional[int]:
        value = client.incr(key, 1, noreply=False)
        self._check_served(client, "incr", [key])
        return None if value is None else int(value)
