"""
One contract for every store: the same tests run against MemoryStore and
against MemcachedStore on a private memcached (the latter marked integration).
"""

from __future__ import annotations

import threading

import pytest
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from contiv.store import InvalidKey, StoreError, StoreUnavailable, open_store
from contiv.store.memory import MemoryStore

WAIT = 10.0
# memcached -I 1m refuses an item whose key, value and 59 bytes of header exceed 1 MiB.
ITEM_SIZE = 1024 * 1024


class StoreContract:
    """Mixed into a TestCase that defines make_store() and await_()."""

    def make_store(self):
        raise NotImplementedError

    async def await_(self, d: Deferred):
        return await d

    def setUp(self) -> None:
        self.store = self.make_store()

    async def test_get_many_returns_only_present_keys(self) -> None:
        self.assertEqual(await self.await_(self.store.get_many(["t/absent"])), {})
        await self.await_(self.store.set_many({"t/a": b"1", "t/b": b"two"}))
        found = await self.await_(self.store.get_many(["t/a", "t/b", "t/c"]))
        self.assertEqual(found, {"t/a": b"1", "t/b": b"two"})
        self.assertEqual(await self.await_(self.store.get_many([])), {})

    async def test_values_are_bytes_and_round_trip_exactly(self) -> None:
        values = {"t/empty": b"", "t/binary": bytes(range(256)) * 4,
                  "t/crlf": b"a\r\nEND\r\nb", "t/json": b'{"a":[1,2]}'}
        await self.await_(self.store.set_many(values))
        self.assertEqual(await self.await_(self.store.get_many(list(values))), values)

    async def test_set_overwrites(self) -> None:
        await self.await_(self.store.set_many({"t/k": b"old"}))
        await self.await_(self.store.set_many({"t/k": b"new"}))
        self.assertEqual(await self.await_(self.store.get_many(["t/k"])), {"t/k": b"new"})

    async def test_non_bytes_value_refused(self) -> None:
        with self.assertRaises(TypeError):
            await self.await_(self.store.set_many({"t/k": "text"}))
        with self.assertRaises(TypeError):
            await self.await_(self.store.add("t/k", 1))
        self.assertEqual(await self.await_(self.store.get_many(["t/k"])), {})

    async def test_add_only_when_absent(self) -> None:
        self.assertTrue(await self.await_(self.store.add("t/k", b"first")))
        self.assertFalse(await self.await_(self.store.add("t/k", b"second")))
        self.assertEqual(await self.await_(self.store.get_many(["t/k"])), {"t/k": b"first"})

    async def test_delete_many(self) -> None:
        await self.await_(self.store.set_many({"t/a": b"1", "t/b": b"2", "t/c": b"3"}))
        await self.await_(self.store.delete_many(["t/a", "t/c", "t/never"]))
        self.assertEqual(await self.await_(self.store.get_many(["t/a", "t/b", "t/c"])),
                         {"t/b": b"2"})
        await self.await_(self.store.delete_many([]))

    async def test_incr_counts_and_never_creates(self) -> None:
        self.assertIsNone(await self.await_(self.store.incr("t/n")))
        self.assertEqual(await self.await_(self.store.get_many(["t/n"])), {})
        await self.await_(self.store.set_many({"t/n": b"41"}))
        self.assertEqual(await self.await_(self.store.incr("t/n")), 42)
        self.assertEqual(await self.await_(self.store.incr("t/n")), 43)
        self.assertEqual(await self.await_(self.store.get_many(["t/n"])), {"t/n": b"43"})

    async def test_incr_of_non_number_is_an_error(self) -> None:
        await self.await_(self.store.set_many({"t/n": b"seven"}))
        with self.assertRaises(StoreError):
            await self.await_(self.store.incr("t/n"))

    async def test_longest_key_accepted(self) -> None:
        key = "t/" + "k" * 248
        await self.await_(self.store.set_many({key: b"v"}))
        self.assertEqual(await self.await_(self.store.get_many([key])), {key: b"v"})

    async def test_bad_keys_refused_naming_the_key(self) -> None:
        long_key = "t/" + "k" * 249
        for key in (long_key, "t/with space", "t/new\nline", "t/caf\u00e9", ""):
            with self.assertRaises(InvalidKey) as raised:
                await self.await_(self.store.set_many({key: b"v"}))
            if key:
                self.assertIn(repr(key), str(raised.exception))
            with self.assertRaises(InvalidKey):
                await self.await_(self.store.get_many([key]))
            with self.assertRaises(InvalidKey):
                await self.await_(self.store.incr(key))
        with self.assertRaises(InvalidKey) as raised:
            await self.await_(self.store.add(long_key, b"v"))
        self.assertIn("at most 250", str(raised.exception))

    async def test_value_above_item_size_refused_naming_it_others_stored(self) -> None:
        key = "t/big"
        await self.await_(self.store.set_many({key: b"old"}))
        largest = ITEM_SIZE - 59 - len("t/fits")
        with self.assertRaises(StoreError) as raised:
            await self.await_(self.store.set_many({
                "t/before": b"1", key: b"x" * (ITEM_SIZE + 1), "t/fits": b"y" * largest,
                "t/after": b"2"}))
        self.assertEqual(raised.exception.keys, (key,))
        self.assertIn(key, str(raised.exception))
        found = await self.await_(self.store.get_many(["t/before", key, "t/fits", "t/after"]))
        # memcached drops the old value of a key it could not update: no stale reads.
        self.assertEqual(sorted(found), ["t/after", "t/before", "t/fits"])
        self.assertEqual(len(found["t/fits"]), largest)

    async def test_value_just_above_item_size_refused(self) -> None:
        key = "t/edge"
        with self.assertRaises(StoreError):
            await self.await_(self.store.set_many({key: b"x" * (ITEM_SIZE - 59 - len(key) + 1)}))


class MemoryStoreContractTests(StoreContract, unittest.TestCase):
    def make_store(self):
        return MemoryStore()

    def test_memory_limit_refuses_like_memcached_minus_M(self) -> None:
        store = MemoryStore(memory_limit=100)
        self.successResultOf(store.set_many({"a": b"x" * 40}))
        failure = self.failureResultOf(store.set_many({"b": b"x" * 40, "c": b"x" * 40}),
                                       StoreError)
        self.assertEqual(failure.value.keys, ("c",))
        self.assertEqual(sorted(self.successResultOf(store.get_many(["a", "b", "c"]))),
                         ["a", "b"])
        # Deleting makes room again.
        self.successResultOf(store.delete_many(["a"]))
        self.successResultOf(store.set_many({"c": b"x" * 40}))

    def test_open_store_memory(self) -> None:
        self.assertIsInstance(open_store(None, "memory"), MemoryStore)
        with self.assertRaises(ValueError):
            open_store(None, "redis://127.0.0.1:6379")


@pytest.mark.integration
class MemcachedStoreContractTests(StoreContract, unittest.TestCase):
    def setUp(self) -> None:
        from tests.support.processes import MemcachedServer

        # Cleanups run last-in first-out: this one runs after every store is closed.
        self.addCleanup(lambda: self.assertEqual(pool_threads(), [],
                                                 "a store left threads behind"))
        self.server = MemcachedServer()
        self.server.start()
        self.addCleanup(self.server.stop)
        super().setUp()
        self.addCleanup(self.store.close)

    def make_store(self):
        from twisted.internet import reactor

        return open_store(reactor, f"memcached://127.0.0.1:{self.server.port}")

    async def await_(self, d: Deferred):
        from twisted.internet import reactor

        return await d.addTimeout(WAIT, reactor)

    async def test_closed_store_refuses_and_leaves_no_threads(self) -> None:
        await self.await_(self.store.set_many({"t/k": b"v"}))
        self.assertNotEqual(pool_threads(), [])
        await self.await_(self.store.close())
        self.assertEqual(pool_threads(), [])
        with self.assertRaises(StoreError):
            await self.await_(self.store.get_many(["t/k"]))

    async def test_unreachable_server_is_unavailable(self) -> None:
        from twisted.internet import reactor
        from contiv.store.memcached import MemcachedStore
        from tests.support.processes import free_port

        store = MemcachedStore(reactor, [("127.0.0.1", free_port())], timeout=0.5,
                               connect_timeout=0.5, retries=1)
        self.addCleanup(store.close)
        for call in (lambda: store.get_many(["t/k"]), lambda: store.set_many({"t/k": b"v"}),
                     lambda: store.add("t/k", b"v"), lambda: store.incr("t/k"),
                     lambda: store.delete_many(["t/k"])):
            with self.assertRaises(StoreUnavailable):
                await self.await_(call())


def pool_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "contiv-memcached" in t.name]
