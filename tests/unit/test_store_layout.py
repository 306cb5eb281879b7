"""Publisher and Reader over the in-memory store, with a fake clock."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterable, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from contiv.policy.types import (INGRESS, CompiledPolicy, Group, LocalPod, Member, NodeIndex,
                                 canonical_json,
                                 PortRule, Rule)
from contiv.store import InvalidKey, StoreError, StoreUnavailable
from contiv.dns.names import NXDOMAIN, POD, SVC, NameEntry
from contiv.store.layout import (DEFAULT_BUCKETS, NameReader, NodeState, Publisher, Reader,
                                 bucket_of, fetch_documents)
from contiv.store.memory import MemoryStore


def make_group(number: int, members: int = 3, salt: str = "") -> Group:
    return Group(f"g.{number:016x}", tuple(
        Member(f"10.{number % 250}.{i // 250}.{i % 250}", f"ns{salt}/pod-{number}-{i}")
        for i in range(members)))


@functools.lru_cache(maxsize=None)
def big_group() -> Group:
    """About 3.3 MB of JSON: 84,000 members."""
    return make_group(7, members=84_000)


def make_policy(number: int, applied_to: Group, peer: Group) -> CompiledPolicy:
    return CompiledPolicy("shop", f"policy-{number}", applied_to.id, (INGRESS,), (
        Rule(INGRESS, (peer.id,), ("192.0.2.0/24",), False, (PortRule("TCP", 80 + number),)),))


def make_index(node: str, policies: Iterable[CompiledPolicy], groups: Iterable[Group],
               pods: Sequence[str] = ("shop/web-0",)) -> NodeIndex:
    return NodeIndex(node, tuple(sorted(p.id for p in policies)),
                     tuple(sorted(g.key for g in groups)),
                     tuple(LocalPod(pod, ("10.9.9.9",)) for pod in pods))


def make_cluster(nodes: Sequence[str] = ("n1", "n2"), policies: int = 4, groups: int = 4,
                 members: int = 3) -> tuple[list, list, list]:
    """Policies over groups, each node indexing every other policy and the groups it uses."""
    group_list = [make_group(i, members) for i in range(groups)]
    policy_list = [make_policy(j, group_list[j % groups], group_list[(j + 1) % groups])
                   for j in range(policies)]
    indexes = []
    for k, node in enumerate(nodes):
        mine = [p for j, p in enumerate(policy_list) if j % len(nodes) == k]
        used = {g.key: g for g in group_list for p in mine if g.id in p.group_ids()}
        indexes.append(make_index(node, mine, used.values(), [f"shop/{node}-pod"]))
    return policy_list, group_list, indexes


def expected_state(index: NodeIndex, policies: Iterable[CompiledPolicy],
                   groups: Iterable[Group]) -> tuple:
    by_id = {p.id: p for p in policies}
    by_key = {g.key: g for g in groups}
    return (index, {i: by_id[i] for i in index.policies}, {k: by_key[k] for k in index.groups})


def content(state: Optional[NodeState]) -> Optional[tuple]:
    if state is None:
        return None
    return (state.index, dict(state.policies), dict(state.groups))


class RecordingStore:
    """A store that records every call and can hold chosen operations until released."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Any]] = []
        # hold(name, argument) -> True: that call waits until release()
        self.hold: Optional[Callable[[str, Any], bool]] = None
        self.held: list[Deferred] = []
        self.down = False

    def _do(self, name: str, argument: Any, call) -> Deferred:
        self.calls.append((name, argument))
        if self.down:
            return fail(StoreUnavailable("memcached 127.0.0.1:1 unavailable (test)"))
        if self.hold is not None and self.hold(name, argument):
            gate: Deferred = Deferred()
            self.held.append(gate)
            return gate.addCallback(lambda _: call())
        return call()

    def release(self) -> None:
        held, self.held = self.held, []
        for gate in held:
            gate.callback(None)

    def get_many(self, keys):
        keys = list(keys)
        return self._do("get_many", keys, lambda: self.inner.get_many(keys))

    def set_many(self, items):
        return self._do("set_many", list(items), lambda: self.inner.set_many(items))

    def add(self, key, value):
        return self._do("add", key, lambda: self.inner.add(key, value))

    def delete_many(self, keys):
        keys = list(keys)
        return self._do("delete_many", keys, lambda: self.inner.delete_many(keys))

    def incr(self, key):
        return self._do("incr", key, lambda: self.inner.incr(key))

    def close(self):
        return self.inner.close()

    def gets(self) -> list[list[str]]:
        return [argument for name, argument in self.calls if name == "get_many"]

    def writes(self) -> list[tuple[str, Any]]:
        return [call for call in self.calls if call[0] != "get_many"]


class LayoutTestCase(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = MemoryStore()
        self.store = RecordingStore(self.memory)
        self.publisher = Publisher(self.store, clock=self.clock, grace_period=60.0)
        self.policies, self.groups, self.indexes = make_cluster()

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def run_(self, coroutine) -> Any:
        """The coroutine's result, or its exception raised here (the store answers at once)."""
        results: list = []
        Deferred.fromCoroutine(coroutine).addBoth(results.append)
        self.assertEqual(len(results), 1, "the coroutine did not finish")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def publish(self, publisher: Optional[Publisher] = None, **kwargs) -> int:
        publisher = publisher or self.publisher
        kwargs.setdefault("policies", self.policies)
        kwargs.setdefault("groups", self.groups)
        kwargs.setdefault("nodes", self.indexes)
        return self.run_(publisher.publish(**kwargs))

    def poll(self, reader: Reader) -> Optional[NodeState]:
        return self.run_(reader.poll())


class RoundTripTests(LayoutTestCase):
    def test_publish_then_read_each_node(self) -> None:
        self.assertEqual(self.publish(full=True), 1)
        for index in self.indexes:
            reader = Reader(self.store, index.node)
            state = self.poll(reader)
            self.assertIsNotNone(state, reader.problem)
            self.assertEqual(state.generation, 1)
            self.assertEqual(content(state), expected_state(index, self.policies, self.groups))
            self.assertIs(reader.state, state)
            self.assertIsNone(reader.problem)
            self.assertEqual(reader.index_generation, 1)

    def test_keys_and_encoding_follow_the_layout(self) -> None:
        self.publish(full=True)
        keys = set(self.memory.keys())
        policy, group = self.policies[0], self.groups[0]
        self.assertLessEqual({"contiv/gen", "contiv/epoch", "contiv/node/n1", "contiv/node/n2",
                              f"contiv/policy/{policy.id}", f"contiv/group/{group.key}"}, keys)
        raw = self.successResultOf(self.memory.get_many([f"contiv/policy/{policy.id}"]))
        value = raw[f"contiv/policy/{policy.id}"]
        self.assertEqual(value, json.dumps(policy.to_json(), sort_keys=True,
                                           separators=(",", ":")).encode())
        index = json.loads(self.successResultOf(
            self.memory.get_many(["contiv/node/n1"]))["contiv/node/n1"])
        stored = self.indexes[0].to_json()
        # The index names group ids; the group map names their current versions.
        stored["groups"] = [key.rsplit(".", 1)[0] for key in stored["groups"]]
        self.assertEqual(index, {"generation": 1, "index": stored})
        root = json.loads(self.successResultOf(
            self.memory.get_many(["contiv/groupmap"]))["contiv/groupmap"])
        self.assertEqual(root["generation"], 1)
        self.assertEqual(len(root["buckets"]), DEFAULT_BUCKETS)
        buckets = self.successResultOf(self.memory.get_many(
            [f"contiv/groupmap/{h}" for h in root["buckets"]]))
        self.assertEqual(len(buckets), len(set(root["buckets"])))
        mapped: dict = {}
        nodes: dict = {}
        for raw in buckets.values():
            bucket = json.loads(raw)
            mapped.update(bucket["groups"])
            nodes.update(bucket["nodes"])
        self.assertEqual(mapped, {g.id: g.key for g in self.groups})
        self.assertEqual(nodes, {"n1": 1, "n2": 1})
        self.assertEqual(self.successResultOf(self.memory.get_many(["contiv/gen"])),
                         {"contiv/gen": b"1"})

    def test_prefix_separates_clusters(self) -> None:
        other = Publisher(self.store, prefix="blue/", clock=self.clock)
        self.publish(other, full=True)
        self.assertTrue(all(k.startswith("blue/") for k in self.memory.keys()))
        self.assertIsNone(self.poll(Reader(self.store, "n1")))
        self.assertIsNotNone(self.poll(Reader(self.store, "n1", prefix="blue/")))

    def test_unchanged_generation_polls_only_gen(self) -> None:
        self.publish(full=True)
        reader = Reader(self.store, "n1")
        self.assertIsNotNone(self.poll(reader))
        before = len(self.store.calls)
        self.assertIsNone(self.poll(reader))
        self.assertEqual(self.store.calls[before:], [("get_many", ["contiv/gen"])])
        self.assertIsNone(reader.problem)

    def test_only_missing_entries_are_fetched_in_one_get_many(self) -> None:
        self.publish(full=True)
        reader = Reader(self.store, "n1")
        self.poll(reader)
        index = self.indexes[0]
        entry_keys = ([f"contiv/policy/{i}" for i in index.policies]
                      + [f"contiv/group/{k}" for k in index.groups])
        gets = self.store.gets()
        self.assertEqual(gets[:3], [["contiv/gen"], ["contiv/gen"],
                                    ["contiv/node/n1", "contiv/groupmap"]])
        # then the buckets of the node and of its groups, then the entries
        self.assertEqual(len(gets), 5)
        self.assertTrue(all(k.startswith("contiv/groupmap/") for k in gets[3]))
        self.assertEqual(gets[4], entry_keys)

        # One group of n1 changes members: its new version is the only fetch.
        old = self.groups[0]
        new = make_group(0, members=5)
        self.groups[0] = new
        self.indexes[0] = make_index("n1", [p for p in self.policies
                                            if p.id in index.policies],
                                     [g for g in self.groups if g.key in
                                      {k for k in index.groups if k != old.key} | {new.key}])
        self.assertIn(new.key, self.indexes[0].groups)
        del self.store.calls[:]
        # The indexes name the same group ids: none needs rewriting.
        self.assertEqual(self.publish(nodes=[]), 2)
        # Only the new group was written, not the entries written before.
        entry_writes = [a for n, a in self.store.writes()
                        if n == "set_many" and any("/group/" in k or "/policy/" in k
                                                   for k in a)]
        self.assertEqual([k for k in entry_writes[0] if not k.startswith("contiv/groupmap/")],
                         [f"contiv/group/{new.key}"])
        # The group's bucket is the only one rewritten; no index changed.
        self.assertEqual(len([k for k in entry_writes[0] if k.startswith("contiv/groupmap/")]),
                         1)
        self.assertFalse([a for n, a in self.store.writes()
                          if n == "set_many" and any("/node/" in k for k in a)])
        del self.store.calls[:]
        state = self.poll(reader)
        self.assertEqual(state.generation, 2)
        gets = self.store.gets()
        self.assertEqual(gets[:2], [["contiv/gen"], ["contiv/node/n1", "contiv/groupmap"]])
        self.assertEqual(len(gets[2]), 1)  # the changed bucket
        self.assertEqual(gets[3:], [[f"contiv/group/{new.key}"]])
        self.assertEqual(state.groups[new.key], new)
        self.assertNotIn(old.key, state.groups)

    def test_reader_drops_entries_the_newest_index_does_not_name(self) -> None:
        self.publish(full=True)
        reader = Reader(self.store, "n1")
        first = self.poll(reader)
        self.assertEqual(len(first.policies), 2)
        keep = self.policies[0]
        self.indexes[0] = make_index("n1", [keep], [g for g in self.groups
                                                    if g.id in keep.group_ids()])
        self.publish()
        state = self.poll(reader)
        self.assertEqual(list(state.policies), [keep.id])
        self.assertEqual(set(reader._policies), {keep.id})
        self.assertEqual(set(reader._groups), set(self.indexes[0].groups))
        # What a previous state handed out stays intact.
        self.assertEqual(len(first.policies), 2)

    def test_states_are_read_only(self) -> None:
        self.publish(full=True)
        state = self.poll(Reader(self.store, "n1"))
        with self.assertRaises(TypeError):
            state.policies["x"] = None  # type: ignore[index]


class ChunkingTests(LayoutTestCase):
    ITEM = 64 * 1024

    def setUp(self) -> None:
        super().setUp()
        self.publisher = Publisher(self.store, clock=self.clock, item_size=self.ITEM)
        self.big = big_group()
        self.policy = make_policy(7, self.big, self.big)
        self.index = make_index("n1", [self.policy], [self.big])
        self.size = len(json.dumps(self.big.to_json(), sort_keys=True, separators=(",", ":")))
        self.assertGreater(self.size, 3_000_000)

    def publish_big(self, **kwargs) -> int:
        return self.publish(policies=[self.policy], groups=[self.big], nodes=[self.index],
                            **kwargs)

    def chunk_keys(self, group: Group) -> list[str]:
        prefix = f"contiv/group/{group.key}/"
        return sorted((k for k in self.memory.keys() if k.startswith(prefix)),
                      key=lambda k: int(k.rsplit("/", 1)[1]))

    def test_a_3mb_group_is_chunked_and_read_back(self) -> None:
        self.publish_big(full=True)
        chunks = self.chunk_keys(self.big)
        self.assertEqual(len(chunks), -(-self.size // self.ITEM))
        values = self.successResultOf(self.memory.get_many(chunks))
        self.assertTrue(all(len(v) <= self.ITEM for v in values.values()))
        header = json.loads(self.successResultOf(self.memory.get_many(
            [f"contiv/group/{self.big.key}"]))[f"contiv/group/{self.big.key}"])
        self.assertEqual(set(header), {"chunked"})
        self.assertEqual(header["chunked"]["count"], len(chunks))
        self.assertEqual(header["chunked"]["size"], self.size)

        reader = Reader(self.store, "n1")
        del self.store.calls[:]
        state = self.poll(reader)
        self.assertIsNotNone(state, reader.problem)
        self.assertEqual(state.groups[self.big.key], self.big)
        # gen, the index and root, the buckets, the entries (one header among
        # them), then all chunks at once.
        gets = self.store.gets()
        self.assertEqual(len(gets), 5)
        self.assertEqual(gets[4], chunks)

    def test_missing_chunk_keeps_last_state_and_names_the_chunk(self) -> None:
        small = make_group(1)
        first_index = make_index("n1", [], [small])
        self.publish(policies=[], groups=[small], nodes=[first_index], full=True)
        reader = Reader(self.store, "n1")
        first = self.poll(reader)
        self.assertEqual(first.generation, 1)

        self.publish_big()
        lost = self.chunk_keys(self.big)[5]
        self.successResultOf(self.memory.delete_many([lost]))
        self.assertIsNone(self.poll(reader))
        self.assertIs(reader.state, first)
        self.assertIn(lost, reader.problem)
        self.assertIn("missing", reader.problem)

        # The next poll tries again (same generation, but the last poll was incomplete),
        # and the publisher's verify() finds what to rewrite.
        self.assertIsNone(self.poll(reader))
        missing = self.run_(self.publisher.verify(self.publisher.written()))
        self.assertEqual(missing, [f"group/{self.big.key}"])
        self.publish_big()
        state = self.poll(reader)
        self.assertIsNotNone(state, reader.problem)
        self.assertEqual(state.groups[self.big.key], self.big)
        self.assertIsNone(reader.problem)

    def test_torn_chunks_fail_the_checksum_and_name_the_entry(self) -> None:
        self.publish_big(full=True)
        chunk = self.chunk_keys(self.big)[3]
        value = self.successResultOf(self.memory.get_many([chunk]))[chunk]
        self.successResultOf(self.memory.set_many({chunk: value[::-1]}))
        reader = Reader(self.store, "n1")
        self.assertIsNone(self.poll(reader))
        self.assertIsNone(reader.state)
        self.assertIn(f"contiv/group/{self.big.key}", reader.problem)
        self.assertIn("sha256", reader.problem)

    def test_chunked_node_index(self) -> None:
        groups = [make_group(i, members=1) for i in range(4000)]
        policy = make_policy(1, groups[0], groups[1])
        index = make_index("n1", [policy], groups)
        self.publish(policies=[policy], groups=groups, nodes=[index], full=True)
        self.assertIn("contiv/node/n1/0", self.memory.keys())
        state = self.poll(Reader(self.store, "n1"))
        self.assertEqual(state.index, index)
        # A smaller index later: the chunks of the old one are deleted after gen.
        small = make_index("n1", [policy], groups[:2])
        self.publish(policies=[policy], groups=groups[:2], nodes=[small])
        self.assertFalse([k for k in self.memory.keys() if k.startswith("contiv/node/n1/")])
        self.assertEqual(self.poll(Reader(self.store, "n1")).index, small)


class OrderingTests(LayoutTestCase):
    def test_gen_is_bumped_last(self) -> None:
        self.publish(full=True)
        del self.store.calls[:]
        self.groups.append(make_group(99))
        self.indexes[0] = make_index("n1", self.policies[:1], self.groups)
        self.publish(full=True)
        writes = self.store.writes()
        self.assertEqual(writes[-1], ("incr", "contiv/gen"))
        # The indexes go with each group's current version in place (group/<id>).
        kinds = [("indexes" if any("/node/" in k for k in a) else
                  "entries" if any("/group/" in k or "/policy/" in k for k in a) else a)
                 for n, a in writes if n == "set_many"]
        self.assertEqual(kinds, ["entries", "indexes", ["contiv/groupmap", "contiv/names"],
                                 ["contiv/epoch"]])

    def test_reader_between_writes_and_gen_sees_the_previous_state(self) -> None:
        self.publish(full=True)
        reader = Reader(self.store, "n1")
        previous = self.poll(reader)
        stages = {
            # entries written, the index not yet
            "before index": lambda name, arg: name == "set_many" and "contiv/node/n1" in arg,
            # entries and index written, gen not bumped yet
            "before gen": lambda name, arg: name in ("incr", "add"),
        }
        for number, (stage, hold) in enumerate(stages.items()):
            new_group = make_group(50 + number)
            self.groups.append(new_group)
            self.indexes[0] = make_index("n1", self.policies[:1], [new_group])
            self.store.hold = hold
            published = Deferred.fromCoroutine(self.publisher.publish(
                policies=self.policies, groups=self.groups, nodes=self.indexes))
            self.assertNoResult(published)
            self.assertEqual(len(self.store.held), 1, stage)
            self.store.hold = None
            self.assertIn(f"contiv/group/{new_group.key}", self.memory.keys())
            self.assertIsNone(self.poll(reader), stage)
            self.assertIs(reader.state, previous, stage)
            self.assertIsNone(reader.problem, stage)
            self.store.release()
            generation = self.successResultOf(published)
            state = self.poll(reader)
            self.assertEqual(state.generation, generation)
            self.assertEqual(content(state), expected_state(self.indexes[0], self.policies,
                                                            self.groups))
            previous = state

    def test_generation_never_goes_back(self) -> None:
        for expected in (1, 2, 3):
            self.assertEqual(self.publish(full=True), expected)
        # memcached lost everything (restart): continue from our own count.
        self.successResultOf(self.memory.delete_many(self.memory.keys()))
        self.assertEqual(self.publish(full=True), 4)
        # Someone left a lower counter behind: still forward.
        self.successResultOf(self.memory.set_many({"contiv/gen": b"2"}))
        self.assertEqual(self.publish(), 5)
        self.assertEqual(self.successResultOf(self.memory.get_many(["contiv/gen"])),
                         {"contiv/gen": b"5"})
        # A higher counter (another publisher before this one) is continued.
        self.successResultOf(self.memory.set_many({"contiv/gen": b"40"}))
        self.assertEqual(self.publish(), 41)
        self.assertEqual(self.publisher.generation, 41)

    def test_refused_write_raises_naming_keys_and_bumps_nothing(self) -> None:
        self.publish(full=True)
        reader = Reader(self.store, "n1")
        first = self.poll(reader)
        self.memory.memory_limit = self.memory._used + 100
        big = make_group(77, members=50)
        with self.assertRaises(StoreError) as raised:
            self.publish(groups=[*self.groups, big])
        # The refused write names the new group (and the bucket written with it).
        self.assertIn(f"contiv/group/{big.key}", raised.exception.keys)
        self.assertFalse([k for k in raised.exception.keys
                          if not k.startswith(("contiv/group/", "contiv/groupmap/"))])
        self.assertEqual(self.successResultOf(self.memory.get_many(["contiv/gen"])),
                         {"contiv/gen": b"1"})
        self.assertIsNone(self.poll(reader))
        self.assertIs(reader.state, first)
        # With room again the same publish goes through, the refused entry included.
        self.memory.memory_limit = None
        self.publish(groups=[*self.groups, big])
        self.assertIn(f"contiv/group/{big.key}", self.memory.keys())


class EpochTests(LayoutTestCase):
    def test_no_epoch_before_a_full_publish(self) -> None:
        self.assertFalse(self.run_(self.publisher.epoch_intact()))
        self.publish()
        self.assertFalse(self.run_(self.publisher.epoch_intact()))
        self.publish(full=True)
        self.assertTrue(self.run_(self.publisher.epoch_intact()))

    def test_epoch_loss_leads_to_a_full_republish(self) -> None:
        self.publish(full=True)
        reader = Reader(self.store, "n1")
        first = self.poll(reader)
        self.assertTrue(self.run_(self.publisher.epoch_intact()))

        # memcached restarted: everything is gone.
        self.successResultOf(self.memory.delete_many(self.memory.keys()))
        self.assertFalse(self.run_(self.publisher.epoch_intact()))
        self.assertIsNone(self.poll(reader))
        self.assertIs(reader.state, first)
        self.assertIn("contiv/gen missing", reader.problem)

        # A plain publish would skip what it believes written; a full one does not.
        self.assertEqual(self.publish(full=True), 2)
        self.assertTrue(self.run_(self.publisher.epoch_intact()))
        state = self.poll(reader)
        self.assertEqual(state.generation, 2)
        self.assertEqual(content(state), content(first))

    def test_another_publishers_epoch_is_not_ours(self) -> None:
        self.publish(full=True)
        other = Publisher(self.store, clock=self.clock)
        self.publish(other, full=True)
        self.assertFalse(self.run_(self.publisher.epoch_intact()))
        self.assertTrue(self.run_(other.epoch_intact()))

    def test_verify_reports_evicted_entries_and_publish_rewrites_them(self) -> None:
        self.publish(full=True)
        self.assertEqual(self.run_(self.publisher.verify(self.publisher.written())), [])
        victim = f"policy/{self.policies[1].id}"
        self.successResultOf(self.memory.delete_many(["contiv/" + victim, "contiv/node/n2"]))
        self.assertEqual(self.run_(self.publisher.verify(self.publisher.written())),
                         ["node/n2", victim])
        del self.store.calls[:]
        self.publish()
        self.assertIn("contiv/" + victim, self.memory.keys())
        self.assertEqual(self.run_(self.publisher.verify(self.publisher.written())), [])


class GarbageTests(LayoutTestCase):
    def test_unreferenced_entries_go_after_the_grace_period_only(self) -> None:
        self.publish(full=True)
        old = self.groups[0]
        chunked = Publisher(self.store, clock=self.clock, item_size=50)
        self.publish(chunked, full=True)
        new = make_group(0, members=4)
        live_policies = [p.id for p in self.policies]
        live_groups = [g.key for g in self.groups[1:]] + [new.key]
        self.publish(chunked, groups=[*self.groups[1:], new], nodes=[])
        old_keys = [k for k in self.memory.keys() if k.startswith(f"contiv/group/{old.key}")]
        self.assertGreater(len(old_keys), 1)

        self.assertEqual(self.run_(chunked.collect_garbage(live_policies, live_groups)), 0)
        self.clock.advance(60.0)
        self.assertEqual(self.run_(chunked.collect_garbage(live_policies, live_groups)), 0)
        self.clock.advance(0.5)
        # the old version of the group, and the map bucket that named it
        self.assertEqual(self.run_(chunked.collect_garbage(live_policies, live_groups)), 2)
        self.assertFalse(set(old_keys) & set(self.memory.keys()))
        for key in live_groups:
            self.assertIn(f"contiv/group/{key}", self.memory.keys())
        self.assertEqual(self.run_(chunked.verify(chunked.written())), [])

    def test_a_new_publisher_collects_what_an_earlier_one_left(self) -> None:
        # An earlier netmaster (with a chunked group) published, then went away.
        big = make_group(90, members=40)
        earlier = Publisher(self.store, clock=self.clock, item_size=400)
        policy = make_policy(90, big, self.groups[0])
        self.indexes[1] = make_index("n2", [policy], [big, self.groups[0]])
        self.publish(earlier, policies=[*self.policies, policy], groups=[*self.groups, big],
                     full=True)
        big_keys = [k for k in self.memory.keys() if k.startswith(f"contiv/group/{big.key}")]
        self.assertGreater(len(big_keys), 1)

        # Its successor's cluster no longer has the policy, nor pods on n2.
        successor = Publisher(self.store, clock=self.clock)
        adopted = self.run_(successor.adopt())
        self.assertGreater(adopted, len(self.groups))
        self.assertEqual(successor.adopted_nodes, {"n1", "n2"})
        keep = self.policies[0]
        used = [g for g in self.groups if g.id in keep.group_ids()]
        self.publish(successor, policies=[keep], groups=used, full=True,
                     nodes=[make_index("n1", [keep], used), make_index("n2", [], [], pods=[])])
        self.assertNotIn("contiv/node/n2", self.memory.keys())
        live_policies, live_groups = [keep.id], [g.key for g in used]
        self.assertEqual(self.run_(successor.collect_garbage(live_policies, live_groups)), 0)
        self.clock.advance(61)
        self.assertGreater(self.run_(successor.collect_garbage(live_policies, live_groups)), 0)
        left = set(self.memory.keys())
        self.assertFalse(set(big_keys) & left)
        self.assertNotIn(f"contiv/policy/{policy.id}", left)
        # Every policy the earlier indexes named and the successor does not use;
        # the others no index named were out of reach (and would wait for eviction).
        named = {i for index in self.indexes for i in index.policies} - {keep.id}
        self.assertTrue(named)
        for policy_id in named:
            self.assertNotIn(f"contiv/policy/{policy_id}", left)
        # The versions it uses, and their ids' current copies; the big
        # group's current copy went with the full publish that dropped it.
        self.assertEqual(sorted(k for k in left if k.startswith("contiv/group/")),
                         sorted([f"contiv/group/{g.key}" for g in used]
                                + [f"contiv/group/{g.id}" for g in used]))
        # The earlier buckets went too: only the successor's map is left.
        buckets = {k for k in left if k.startswith("contiv/groupmap/")}
        self.assertEqual(buckets, {f"contiv/{name}" for name in successor.live_buckets()
                                   if name.startswith("groupmap/")})
        state = self.poll(Reader(self.store, "n1"))
        self.assertEqual(list(state.policies), [keep.id])

    def test_adopting_an_empty_store_adopts_nothing(self) -> None:
        self.assertEqual(self.run_(self.publisher.adopt()), 0)
        self.assertEqual(self.publisher.adopted_nodes, set())

    def test_referenced_again_restarts_the_grace_period(self) -> None:
        self.publish(full=True)
        policy = self.policies[0]
        rest = [p.id for p in self.policies[1:]]
        groups = [g.key for g in self.groups]
        self.assertEqual(self.run_(self.publisher.collect_garbage(rest, groups)), 0)
        self.clock.advance(50)
        self.assertEqual(self.run_(self.publisher.collect_garbage(
            [policy.id, *rest], groups)), 0)
        self.clock.advance(50)
        self.assertEqual(self.run_(self.publisher.collect_garbage(rest, groups)), 0)
        self.clock.advance(61)
        self.assertEqual(self.run_(self.publisher.collect_garbage(rest, groups)), 1)
        self.assertNotIn(f"contiv/policy/{policy.id}", self.memory.keys())
        # Published again later, it is written again (no longer believed present).
        self.publish()
        self.assertIn(f"contiv/policy/{policy.id}", self.memory.keys())


class ProblemTests(LayoutTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.publish(full=True)
        self.reader = Reader(self.store, "n1")
        self.first = self.poll(self.reader)
        # The next publish changes n1's index, so the reader has something to fetch.
        self.changed = make_group(60)
        self.indexes[0] = make_index("n1", self.policies[:1], [self.changed, *self.groups])
        self.publish(groups=[*self.groups, self.changed])

    def assert_kept(self, *fragments: str) -> None:
        self.assertIsNone(self.poll(self.reader))
        self.assertIs(self.reader.state, self.first)
        for fragment in fragments:
            self.assertIn(fragment, self.reader.problem)

    def test_malformed_json_entry(self) -> None:
        key = f"contiv/group/{self.changed.key}"
        self.successResultOf(self.memory.set_many({key: b'{"id": "g.'}))
        self.assert_kept(key, "malformed")

    def test_wrong_shape_entry(self) -> None:
        key = f"contiv/policy/{self.policies[0].id}"
        self.successResultOf(self.memory.set_many({key: b'{"namespace":"shop"}'}))
        # Only entries the reader does not hold are fetched: a fresh reader sees it.
        fresh = Reader(self.store, "n1")
        self.assertIsNone(self.poll(fresh))
        self.assertIn(key, fresh.problem)
        self.assertIn("malformed", fresh.problem)

    def test_group_under_a_foreign_key(self) -> None:
        key = f"contiv/group/{self.changed.key}"
        self.successResultOf(self.memory.set_many(
            {key: json.dumps(make_group(61).to_json()).encode()}))
        self.assert_kept(key)

    def test_undecodable_bytes(self) -> None:
        key = f"contiv/group/{self.changed.key}"
        self.successResultOf(self.memory.set_many({key: b"\xff\xfe\x00garbage"}))
        self.assert_kept(key)

    def test_malformed_index_and_gen(self) -> None:
        self.successResultOf(self.memory.set_many({"contiv/node/n1": b'{"generation":2}'}))
        self.assert_kept("contiv/node/n1", "malformed")
        self.successResultOf(self.memory.set_many({"contiv/node/n1": b'{"generation":2,'
                                                   b'"index":{"node":"n2","policies":[],'
                                                   b'"groups":[],"pods":[]}}'}))
        self.assert_kept("contiv/node/n1", "n2")
        self.successResultOf(self.memory.set_many({"contiv/gen": b"two"}))
        self.assert_kept("contiv/gen", "malformed")

    def test_missing_index(self) -> None:
        self.successResultOf(self.memory.delete_many(["contiv/node/n1"]))
        self.assert_kept("contiv/node/n1 missing")

    def test_store_down(self) -> None:
        self.store.down = True
        self.assert_kept("unavailable")
        self.store.down = False
        state = self.poll(self.reader)
        self.assertEqual(state.generation, 2)
        self.assertIsNone(self.reader.problem)

    def test_back_to_what_it_holds_is_no_new_state(self) -> None:
        state = self.first = self.poll(self.reader)
        self.store.down = True
        self.assert_kept("unavailable")
        self.store.down = False
        del self.store.calls[:]
        # Same generation, same index: nothing to apply, nothing fetched, problem gone.
        self.assertIsNone(self.poll(self.reader))
        self.assertIs(self.reader.state, state)
        self.assertIsNone(self.reader.problem)
        self.assertEqual(self.store.gets(), [["contiv/gen"], ["contiv/node/n1", "contiv/groupmap"]])

    def test_unexpected_error_never_escapes(self) -> None:
        self.store.get_many = lambda keys: succeed(None)  # type: ignore[method-assign]
        self.assert_kept("unexpected")
        self.flushLoggedErrors()

    def test_partial_fetch_is_kept_and_not_fetched_again(self) -> None:
        missing = f"contiv/policy/{self.policies[0].id}"
        fresh = Reader(self.store, "n1")
        saved = self.successResultOf(self.memory.get_many([missing]))
        self.successResultOf(self.memory.delete_many([missing]))
        self.assertIsNone(self.poll(fresh))
        self.assertIn(missing, fresh.problem)
        self.successResultOf(self.memory.set_many(saved))
        del self.store.calls[:]
        self.assertIsNotNone(self.poll(fresh))
        self.assertEqual(self.store.gets()[-1], [missing])


class GroupMapTests(LayoutTestCase):
    """The node index names group ids; the group map names their versions."""

    def setUp(self) -> None:
        super().setUp()
        self.publish(full=True)
        self.reader = Reader(self.store, "n1")
        self.first = self.poll(self.reader)

    def design_read(self, node: str) -> dict:
        """What a tool following DESIGN's layout reads: node/<node>, then group/<id>."""
        index, _ = self.run_(fetch_documents(self.store, [f"contiv/node/{node}"]))
        ids = index[f"contiv/node/{node}"]["index"]["groups"]
        groups, missing = self.run_(fetch_documents(self.store,
                                                    [f"contiv/group/{i}" for i in ids]))
        self.assertEqual(missing, {})
        # A member is [ip, pod, named ports].
        return {doc["id"]: sorted(m[0] for m in doc["members"]) for doc in groups.values()}

    def test_group_ids_of_an_index_name_their_current_members(self) -> None:
        ips = lambda group: sorted(m.ip for m in group.members)  # noqa: E731
        used = {g.id: ips(g) for g in self.groups if g.key in self.indexes[0].groups}
        self.assertEqual(self.design_read("n1"), used)
        changed = make_group(1, members=7)
        self.publish(groups=[changed], nodes=[])
        self.assertEqual(self.design_read("n1")[changed.id], ips(changed))
        # A group no index uses any longer is gone, chunks and all.
        self.publish(groups=[], nodes=[], removed_groups=[changed.id])
        self.assertNotIn(f"contiv/group/{changed.id}", self.memory.keys())

    def test_a_group_version_change_rewrites_one_bucket_and_the_root_only(self) -> None:
        changed = make_group(1, members=7)
        groups = [changed if g.id == changed.id else g for g in self.groups]
        del self.store.calls[:]
        self.publish(groups=[changed], nodes=[])
        written = [k for n, a in self.store.writes() if n == "set_many" for k in a]
        # The new version, the group's current copy (group/<id>), its bucket, the root.
        self.assertEqual(sorted(k.split("/")[1] for k in written),
                         ["group", "group", "groupmap", "groupmap"])
        self.assertIn(f"contiv/group/{changed.id}", written)
        # Both nodes use the group and see its new version, though no index changed.
        for index in self.indexes:
            state = self.poll(Reader(self.store, index.node))
            self.assertIn(changed.key, state.index.groups)
            self.assertNotIn(self.groups[1].key, state.index.groups)
            self.assertEqual(content(state), expected_state(
                NodeIndex(index.node, index.policies,
                          tuple(sorted(changed.key if k.startswith(changed.id + ".") else k
                                       for k in index.groups)), index.pods),
                self.policies, groups))

    def test_a_removed_group_leaves_the_map(self) -> None:
        keep = self.policies[0]
        used = [g for g in self.groups if g.id in keep.group_ids()]
        unused = [g.id for g in self.groups if g.id not in keep.group_ids()]
        self.indexes = [make_index("n1", [keep], used), make_index("n2", [], [])]
        self.publish(policies=[keep], groups=[], nodes=self.indexes, removed_groups=unused)
        self.assertEqual(self.publisher.group_map(), {g.id: g.key for g in used})
        state = self.poll(self.reader)
        self.assertEqual(content(state), expected_state(self.indexes[0], self.policies,
                                                        self.groups))

    def test_a_node_without_a_share_is_complete_and_empty(self) -> None:
        # Never had pods: ready at once, with nothing to enforce.
        idle = Reader(self.store, "n9")
        state = self.poll(idle)
        self.assertIsNotNone(state, idle.problem)
        self.assertEqual(state.index, NodeIndex("n9", (), (), ()))
        self.assertEqual(state.generation, 1)
        # n2 loses its pods and policies: it leaves the map and its key goes.
        self.indexes[1] = make_index("n2", [], [], pods=[])
        n2 = Reader(self.store, "n2")
        self.assertTrue(self.poll(n2).index.policies)
        self.publish(nodes=[self.indexes[1]])
        self.assertNotIn("contiv/node/n2", self.memory.keys())
        self.assertNotIn("n2", self.publisher.node_generations())
        self.assertEqual(self.poll(n2).index, NodeIndex("n2", (), (), ()))
        self.assertIsNone(n2.problem)
        # A full republish does not bring it back.
        self.publish(full=True, nodes=self.indexes[:1])
        self.assertEqual(self.poll(n2).index, NodeIndex("n2", (), (), ()))

    def test_torn_read_is_retried_then_reported_and_the_state_kept(self) -> None:
        new_group = make_group(40)
        self.indexes[0] = make_index("n1", self.policies[:1], [new_group])
        # Hold the publish after its indexes went in, before the root: the
        # index is one generation ahead of the root that would date it.
        self.store.hold = lambda name, arg: name == "set_many" and arg == ["contiv/groupmap"]
        published = Deferred.fromCoroutine(self.publisher.publish(
            policies=self.policies, groups=[*self.groups, new_group], nodes=self.indexes))
        self.assertNoResult(published)
        self.store.hold = None
        # A reader that sees some newer gen (another publish) reads mid-publish.
        self.successResultOf(self.memory.set_many({"contiv/gen": b"5"}))
        del self.store.calls[:]
        self.assertIsNone(self.poll(self.reader))
        self.assertIs(self.reader.state, self.first)
        self.assertIn("kept changing", self.reader.problem)
        self.assertEqual(self.store.gets().count(["contiv/node/n1", "contiv/groupmap"]), 3)
        self.store.release()
        self.successResultOf(published)
        state = self.poll(self.reader)
        self.assertIsNone(self.reader.problem)
        self.assertEqual(content(state), expected_state(
            self.indexes[0], self.policies, [*self.groups, new_group]))

    def test_an_evicted_index_the_map_dates_is_a_problem(self) -> None:
        self.successResultOf(self.memory.delete_many(["contiv/node/n1"]))
        fresh = Reader(self.store, "n1")
        self.assertIsNone(self.poll(fresh))
        self.assertIn("contiv/node/n1 missing", fresh.problem)
        self.assertIn("evicted", fresh.problem)
        self.assertEqual(self.run_(self.publisher.verify(self.publisher.written())),
                         ["node/n1"])

    def test_a_lost_root_or_bucket_is_a_problem_and_verify_finds_it(self) -> None:
        root = json.loads(self.successResultOf(
            self.memory.get_many(["contiv/groupmap"]))["contiv/groupmap"])
        bucket = root["buckets"][bucket_of("n1", len(root["buckets"]))]
        self.successResultOf(self.memory.delete_many([f"contiv/groupmap/{bucket}"]))
        fresh = Reader(self.store, "n1")
        self.assertIsNone(self.poll(fresh))
        self.assertIn(f"contiv/groupmap/{bucket} missing", fresh.problem)
        self.successResultOf(self.memory.delete_many(["contiv/groupmap"]))
        self.assertIsNone(self.poll(fresh))
        self.assertIn("contiv/groupmap missing", fresh.problem)
        self.assertEqual(self.run_(self.publisher.verify(self.publisher.written())),
                         sorted(["groupmap", f"groupmap/{bucket}"]))
        self.publish(full=True)
        self.assertIsNotNone(self.poll(fresh), fresh.problem)

    def test_an_index_naming_a_group_the_map_lacks_is_a_problem(self) -> None:
        raw = self.successResultOf(self.memory.get_many(["contiv/node/n1"]))["contiv/node/n1"]
        doc = json.loads(raw)
        doc["index"]["groups"].append("g.00000000000000ff")
        self.successResultOf(self.memory.set_many({"contiv/node/n1": canonical_json(doc)}))
        fresh = Reader(self.store, "n1")
        self.assertIsNone(self.poll(fresh))
        self.assertIn("names group g.00000000000000ff", fresh.problem)

    def test_publisher_refuses_an_index_naming_an_unpublished_version(self) -> None:
        stale = make_index("n1", self.policies[:1], [make_group(0, members=9)])
        failure = self.failureResultOf(Deferred.fromCoroutine(self.publisher.publish(
            policies=[], groups=[], nodes=[stale])), ValueError)
        self.assertIn("not the published version of g.0000000000000000", str(failure.value))


class NameTableTests(LayoutTestCase):
    """The DNS name table: a bucketed root, read whole by every node."""

    def entries(self, count: int, address: str = "10.0.0.1") -> list:
        return [NameEntry(SVC, "default", f"svc-{i}", (address,)) for i in range(count)]

    def test_names_round_trip_and_only_changed_buckets_are_written_and_read(self) -> None:
        names = self.entries(300)
        self.publish(full=True, names=names)
        reader = NameReader(self.store)
        table = self.poll(reader)
        self.assertEqual(dict(table.entries), {e.key: e for e in names})
        self.assertEqual(table.generation, 1)
        self.assertEqual(table.resolve("svc-7.default.svc.cluster.local").entry, names[7])

        changed = NameEntry(SVC, "default", "svc-7", ("10.0.0.99",))
        del self.store.calls[:]
        self.publish(nodes=[], names=[changed], removed_names=[names[8].key])
        written = [k for n, a in self.store.writes() if n == "set_many" for k in a]
        name_buckets = [k for k in written if k.startswith("contiv/names/")]
        self.assertLessEqual(len(name_buckets), 2)
        self.assertIn("contiv/names", written)
        del self.store.calls[:]
        table = self.poll(reader)
        self.assertEqual(self.store.gets()[1:], [["contiv/names"], sorted(name_buckets)])
        self.assertEqual(table.resolve("svc-7.default.svc.cluster.local").entry, changed)
        self.assertEqual(table.resolve("svc-8.default.svc.cluster.local").outcome, NXDOMAIN)
        self.assertEqual(len(table), 299)
        # A publish without name changes leaves the names root alone: nothing new to read.
        del self.store.calls[:]
        self.publish(nodes=[])
        self.assertNotIn("contiv/names", [k for n, a in self.store.writes()
                                          if n == "set_many" for k in a])
        self.assertIsNone(self.poll(reader))
        self.assertIsNone(reader.problem)

    def test_a_lost_bucket_keeps_the_last_table_and_says_which(self) -> None:
        self.publish(full=True, names=self.entries(3))
        reader = NameReader(self.store)
        first = self.poll(reader)
        self.publish(nodes=[], names=[NameEntry(POD, "default", "a", ("10.0.0.2",))])
        lost = [k for k in self.memory.keys() if k.startswith("contiv/names/")
                and k.rsplit("/", 1)[1] not in reader._buckets]
        self.successResultOf(self.memory.delete_many(lost))
        self.assertIsNone(self.poll(reader))
        self.assertIs(reader.table, first)
        self.assertIn("missing", reader.problem)
        self.assertEqual(sorted(self.run_(self.publisher.verify(self.publisher.written()))),
                         sorted(k[len("contiv/"):] for k in lost))
        self.publish(full=True, names=[*self.entries(3),
                                       NameEntry(POD, "default", "a", ("10.0.0.2",))])
        self.assertEqual(len(self.poll(reader)), 4)
        self.assertIsNone(reader.problem)

    def test_a_malformed_bucket_is_reported_not_used(self) -> None:
        self.publish(full=True, names=self.entries(1))
        root = json.loads(self.successResultOf(
            self.memory.get_many(["contiv/names"]))["contiv/names"])
        bucket = root["buckets"][bucket_of("svc/default/svc-0", len(root["buckets"]))]
        self.successResultOf(self.memory.set_many(
            {f"contiv/names/{bucket}": b'{"svc/default/svc-0": ["svc", "default"]}'}))
        reader = NameReader(self.store)
        self.assertIsNone(self.poll(reader))
        self.assertFalse(reader.complete)
        self.assertIn(f"contiv/names/{bucket} malformed", reader.problem)

    def test_before_any_publish_the_table_is_not_complete(self) -> None:
        reader = NameReader(self.store)
        self.assertIsNone(self.poll(reader))
        self.assertFalse(reader.complete)
        self.assertIn("contiv/gen missing", reader.problem)
        self.publish(full=True)
        self.assertEqual(len(self.poll(reader)), 0)
        self.assertTrue(reader.complete)


class KeyTests(unittest.SynchronousTestCase):
    def test_keys_over_250_bytes_are_refused_clearly(self) -> None:
        store = MemoryStore()
        with self.assertRaises(InvalidKey) as raised:
            Publisher(store, prefix="p" * 248, clock=Clock())
        self.assertIn("250", str(raised.exception))
        publisher = Publisher(store, prefix="x" * 40, clock=Clock())
        index = make_index("n" * 210, [], [])
        failure = self.failureResultOf(Deferred.fromCoroutine(publisher.publish(
            policies=[], groups=[], nodes=[index])), InvalidKey)
        self.assertIn("n" * 210, str(failure.value))
        with self.assertRaises(InvalidKey):
            Reader(store, "n" * 250)
        with self.assertRaises(InvalidKey):
            Reader(store, "node with spaces")


def stored_index(index: NodeIndex) -> dict:
    """The index as the store holds it: group ids, not versions."""
    value = index.to_json()
    value["groups"] = [key.rsplit(".", 1)[0] for key in value["groups"]]
    return value


def test_index_encoding_is_the_canonical_json():
    """The pre-encoded node index is byte for byte what canonical_json would write."""
    policies, groups, indexes = make_cluster(nodes=("n1",))
    publisher = Publisher(MemoryStore(), clock=Clock())
    for index in indexes * 2:  # the second time from the cached pods encoding
        assert publisher._index_bytes(index, 7) == canonical_json(
            {"generation": 7, "index": stored_index(index)})


def test_index_encoding_with_unusual_keys_and_empty_lists():
    publisher = Publisher(MemoryStore(), clock=Clock())
    for index in (NodeIndex("n1", (), (), ()),
                  NodeIndex("n\u00e9", ("p.1",), ('g."odd".1',), (LocalPod("a/b", ("::1",)),))):
        assert publisher._index_bytes(index, 3) == canonical_json(
            {"generation": 3, "index": stored_index(index)})
