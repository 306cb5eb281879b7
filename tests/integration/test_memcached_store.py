"""
The store layout over real memcached processes that each test starts and
stops: read back through a second client, several servers, a restart, a full
memcached.
"""

from __future__ import annotations

import threading
from typing import Any, Awaitable, Callable, Optional

import pytest
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from contiv.policy.types import canonical_json
from contiv.store import StoreError, StoreUnavailable, open_store
from contiv.store.layout import NodeState, Publisher, Reader
from contiv.store.memcached import MemcachedStore
from tests.support.processes import MemcachedServer
from tests.unit.test_store_layout import (content, expected_state, make_cluster, make_group,
                                         make_index, make_policy)

pytestmark = pytest.mark.integration

WAIT = 15.0


def within(d: Deferred, timeout: float = WAIT) -> Deferred:
    return d.addTimeout(timeout, reactor)


async def run(coroutine: Awaitable, timeout: float = WAIT) -> Any:
    return await within(Deferred.fromCoroutine(coroutine), timeout)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(attempt: Callable[[], Awaitable[Any]], what: str,
                     timeout: float = WAIT) -> Any:
    deadline = reactor.seconds() + timeout
    while True:
        result = await attempt()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.05)


def pool_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "contiv-memcached" in t.name]


class MemcachedLayoutTests(unittest.TestCase):
    timeout = 120

    def server(self, **kwargs: Any) -> MemcachedServer:
        server = MemcachedServer(**kwargs)
        server.start()
        self.addCleanup(server.stop)
        return server

    def store(self, *servers: MemcachedServer, host: str = "127.0.0.1",
              **options: Any) -> MemcachedStore:
        options.setdefault("timeout", 1.0)
        options.setdefault("connect_timeout", 1.0)
        url = "memcached://" + ",".join(f"{host}:{s.port}" for s in servers)
        store = open_store(reactor, url, **options)
        self.assertIsInstance(store, MemcachedStore)
        self.addCleanup(self._close, store)
        return store

    def _close(self, store: MemcachedStore) -> Deferred:
        return store.close()

    def setUp(self) -> None:
        # Cleanups run last-in first-out: this one, added first, runs after every
        # store is closed.
        self.addCleanup(lambda: self.assertEqual(pool_threads(), [],
                                                 "a store left threads behind"))

    async def poll_until(self, reader: Reader, predicate: Callable[[NodeState], bool],
                         what: str, timeout: float = WAIT) -> NodeState:
        async def attempt() -> Optional[NodeState]:
            await run(reader.poll())
            state = reader.state
            return state if state is not None and predicate(state) else None
        return await eventually(attempt, what, timeout)

    async def test_publish_and_read_back_with_a_second_client(self) -> None:
        server = self.server()
        policies, groups, indexes = make_cluster(nodes=("n1", "n2", "n3"), policies=12,
                                                 groups=8, members=40)
        publisher = Publisher(self.store(server), clock=reactor, item_size=2000)
        generation = await run(publisher.publish(policies=policies, groups=groups,
                                                 nodes=indexes, full=True))
        self.assertEqual(generation, 1)
        self.assertTrue(await run(publisher.epoch_intact()))
        self.assertEqual(await run(publisher.verify(publisher.written())), [])

        # A second client that names the server (as a cluster names the
        # memcached Service): the name is resolved when it connects.
        other = self.store(server, host="localhost")
        for index in indexes:
            reader = Reader(other, index.node)
            state = await run(reader.poll())
            self.assertIsNotNone(state, reader.problem)
            self.assertEqual(state.generation, 1)
            self.assertEqual(content(state), expected_state(index, policies, groups))
            self.assertIsNone(await run(reader.poll()))

    async def test_two_servers_through_hash_client(self) -> None:
        first, second = self.server(), self.server()
        policies, groups, indexes = make_cluster(nodes=("n1", "n2"), policies=40, groups=40)
        publisher = Publisher(self.store(first, second), clock=reactor)
        await run(publisher.publish(policies=policies, groups=groups, nodes=indexes,
                                    full=True))
        keys = ["contiv/" + name for name in publisher.written()] + ["contiv/gen",
                                                                     "contiv/epoch"]
        # Each key lives on exactly one of the two, and both hold some.
        on_first = await within(self.store(first).get_many(keys))
        on_second = await within(self.store(second).get_many(keys))
        self.assertTrue(on_first and on_second)
        self.assertEqual(set(on_first) | set(on_second), set(keys))
        self.assertFalse(set(on_first) & set(on_second))

        reader = Reader(self.store(first, second), "n1")
        state = await run(reader.poll())
        self.assertIsNotNone(state, reader.problem)
        self.assertEqual(content(state), expected_state(indexes[0], policies, groups))

    async def test_one_of_two_servers_lost_reader_keeps_state_until_republished(self) -> None:
        first, second = self.server(), self.server()
        policies, groups, indexes = make_cluster(nodes=("n1",), policies=20, groups=20)
        options = dict(retry_timeout=0.1, dead_timeout=300.0, retries=1)
        publisher = Publisher(self.store(first, second, **options), clock=reactor)
        await run(publisher.publish(policies=policies, groups=groups, nodes=indexes,
                                    full=True))
        reader = Reader(self.store(first, second, **options), "n1")
        before = await run(reader.poll())
        self.assertIsNotNone(before, reader.problem)

        second.stop()
        self.assertIsNone(await run(reader.poll()))
        self.assertIs(reader.state, before)

        pending = {"publish": False}

        async def republished() -> bool:
            # What netmaster does: republish everything when the epoch is gone, and
            # again after verify() found entries missing, until a publish goes through.
            try:
                if not await run(publisher.epoch_intact()):
                    await run(publisher.publish(policies=policies, groups=groups,
                                                nodes=indexes, full=True))
                else:
                    if await run(publisher.verify(publisher.written())):
                        pending["publish"] = True
                    if pending["publish"]:
                        await run(publisher.publish(policies=policies, groups=groups,
                                                    nodes=indexes))
                        pending["publish"] = False
            except StoreUnavailable:
                pass
            state = await run(reader.poll())
            if state is None:
                # Still the old state; a problem is reported once the reader touches the
                # lost server (as long as gen is elsewhere and unchanged, it need not).
                self.assertIs(reader.state, before)
            return state is not None and state.generation > before.generation

        await eventually(republished, "the reader to converge on the surviving server")
        self.assertEqual(content(reader.state), content(before))

    async def test_restart_reader_keeps_state_then_converges_on_the_republish(self) -> None:
        server = self.server()
        policies, groups, indexes = make_cluster(nodes=("n1",), policies=6, groups=5,
                                                 members=20)
        publisher = Publisher(self.store(server, retries=1), clock=reactor, item_size=500)
        reader = Reader(self.store(server, retries=1), "n1")
        await run(publisher.publish(policies=policies, groups=groups, nodes=indexes,
                                    full=True))
        await run(publisher.publish(policies=policies, groups=groups, nodes=indexes))
        before = await run(reader.poll())
        self.assertEqual(before.generation, 2)

        server.stop()
        self.assertIsNone(await run(reader.poll()))
        self.assertIs(reader.state, before)
        self.assertIn("unavailable", reader.problem)
        with self.assertRaises(StoreUnavailable):
            await run(publisher.epoch_intact())

        server.start()  # same port, empty
        self.assertIsNone(await run(reader.poll()))
        self.assertIs(reader.state, before)
        self.assertIn("contiv/gen missing", reader.problem)
        self.assertFalse(await run(publisher.epoch_intact()))
        generation = await run(publisher.publish(policies=policies, groups=groups,
                                                 nodes=indexes, full=True))
        self.assertEqual(generation, 3)  # never back to 1
        self.assertTrue(await run(publisher.epoch_intact()))
        after = await run(reader.poll())
        self.assertIsNotNone(after, reader.problem)
        self.assertEqual(after.generation, 3)
        self.assertEqual(content(after), content(before))
        self.assertIsNone(reader.problem)

    def fill(self) -> tuple[list, list, list]:
        """About 12 MB of groups (50 KB each, chunked at 20 KB) for one node: a 2 MB memcached."""
        groups = [make_group(i, members=1100) for i in range(240)]
        policy = make_policy(0, groups[0], groups[1])
        return [policy], groups, [make_index("n1", [policy], groups)]

    async def test_full_memcached_refusing_writes_names_the_keys(self) -> None:
        server = self.server(memory_mb=2, no_evictions=True)
        store = self.store(server)
        policies, groups, indexes = self.fill()
        publisher = Publisher(store, clock=reactor, item_size=20_000)
        with self.assertRaises(StoreError) as raised:
            await run(publisher.publish(policies=policies, groups=groups, nodes=indexes,
                                        full=True), timeout=60)
        refused = set(raised.exception.keys)
        self.assertTrue(refused)
        attempted = {f"contiv/policy/{p.id}" for p in policies}
        for group in groups:
            key = f"contiv/group/{group.key}"
            chunks = -(-len(canonical_json(group.to_json())) // 20_000)
            attempted |= {key, *(f"{key}/{i}" for i in range(chunks))}
        self.assertLessEqual(refused, attempted)
        self.assertTrue(any(key in str(raised.exception) for key in refused))
        # Nothing lost silently: every key not reported as refused is there.
        found = await within(store.get_many(sorted(attempted - refused)), 60)
        self.assertEqual(set(found), attempted - refused)
        # Nothing was published: no index, no generation; a reader has nothing to use.
        self.assertEqual(await within(store.get_many(["contiv/gen", "contiv/node/n1"])), {})
        reader = Reader(self.store(server), "n1")
        self.assertIsNone(await run(reader.poll()))
        self.assertIn("contiv/gen missing", reader.problem)

    async def test_full_memcached_evicting_is_detected_not_silent(self) -> None:
        server = self.server(memory_mb=2)
        store = self.store(server)
        policies, groups, indexes = self.fill()
        publisher = Publisher(store, clock=reactor, item_size=20_000)
        try:
            await run(publisher.publish(policies=policies, groups=groups, nodes=indexes,
                                        full=True), timeout=60)
        except StoreError as e:
            # memcached may refuse instead of evicting (no page left for a slab class):
            # then it says which keys.
            self.assertTrue(e.keys)
            return
        missing = await run(publisher.verify(publisher.written()), timeout=60)
        self.assertTrue(missing, "memcached -m 2 cannot hold 12 MB: something was evicted")
        self.assertTrue(all(m.startswith(("group/", "policy/", "node/")) for m in missing))

        # The index names every group, some of which are gone: no partial state.
        reader = Reader(self.store(server), "n1")
        self.assertIsNone(await run(reader.poll(), timeout=60))
        self.assertIsNone(reader.state)
        self.assertRegex(reader.problem, r"missing|sha256")
