"""netplugin: in sync only when the bridge confirmed the newest generation it read."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from contiv.policy.types import LocalPod, NodeIndex
from contiv.roles.netplugin import NetpluginService
from contiv.store.layout import Publisher
from contiv.store.memory import MemoryStore


class FakeDatapath:
    def __init__(self):
        self.protocol = object()
        self.applied_generation = None
        self.last_error = None
        self.states = []
        self.confirm = True

    def update(self, state):
        self.states.append(state)
        if self.confirm:
            self.applied_generation = state.generation
        return succeed(None)

    def status(self):
        return {"applied_generation": self.applied_generation}


class NetpluginTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryStore()
        self.publisher = Publisher(self.store, clock=self.clock)

    def publish(self, pods=()):
        index = NodeIndex("node-1", (), (), tuple(LocalPod(p, ("10.0.0.1",)) for p in pods))
        return self.successResultOf(Deferred.fromCoroutine(self.publisher.publish(
            policies=[], groups=[], nodes=[index], full=True)))

    def test_without_a_bridge_never_in_sync(self):
        netplugin = NetpluginService("node-1", self.store, clock=self.clock)
        netplugin.startService()
        self.publish()
        self.clock.advance(0.2)
        status = netplugin.status()
        self.assertFalse(status["in_sync"])
        self.assertEqual(status["state"], "no-datapath")
        self.assertIsNotNone(status["read_generation"])
        self.successResultOf(netplugin.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_in_sync_follows_the_bridge(self):
        datapath = FakeDatapath()
        netplugin = NetpluginService("node-1", self.store, clock=self.clock, datapath=datapath)
        netplugin.startService()
        self.assertEqual(netplugin.status()["state"], "waiting-for-store")
        first = self.publish(["default/a"])
        self.clock.advance(0.1)
        self.assertTrue(netplugin.status()["in_sync"])
        self.assertEqual(netplugin.status()["generation"], first)

        datapath.confirm = False  # the bridge has not confirmed the next one
        second = self.publish(["default/a", "default/b"])
        self.clock.advance(0.1)
        status = netplugin.status()
        self.assertFalse(status["in_sync"])
        self.assertEqual((status["generation"], status["read_generation"]), (first, second))

        datapath.applied_generation = second
        self.assertTrue(netplugin.status()["in_sync"])
        self.successResultOf(netplugin.stopService())


    def test_a_node_without_pods_is_in_sync_on_an_empty_share(self):
        # netmaster writes no index for a node that runs no pods; the group
        # map says so, and the node enforces its empty share.
        datapath = FakeDatapath()
        netplugin = NetpluginService("node-2", self.store, clock=self.clock, datapath=datapath)
        netplugin.startService()
        self.clock.advance(0.1)
        self.assertEqual(netplugin.status()["state"], "waiting-for-store")
        self.assertFalse(netplugin.in_sync)  # nothing published yet: not "empty"
        generation = self.publish(["default/a"])  # a pod on node-1 only
        self.clock.advance(0.1)
        self.assertTrue(netplugin.in_sync, netplugin.status())
        self.assertEqual(datapath.states[-1].index, NodeIndex("node-2", (), (), ()))
        self.assertEqual(datapath.states[-1].generation, generation)
        self.successResultOf(netplugin.stopService())

    def test_the_dns_name_table_is_handed_on_and_counts_for_readiness(self):
        from contiv.dns.names import SVC, NameEntry

        tables = []
        datapath = FakeDatapath()
        netplugin = NetpluginService("node-1", self.store, clock=self.clock, datapath=datapath,
                                     on_names=tables.append)
        netplugin.startService()
        index = NodeIndex("node-1", (), (), (LocalPod("default/a", ("10.0.0.1",)),))
        web = NameEntry(SVC, "default", "web", ("10.96.0.10",))
        self.successResultOf(Deferred.fromCoroutine(self.publisher.publish(
            policies=[], groups=[], nodes=[index], names=[web], full=True)))
        self.clock.advance(0.1)
        self.assertEqual([len(t) for t in tables], [1])
        self.assertTrue(netplugin.in_sync)
        self.assertEqual(netplugin.status()["dns_names"]["names"], 1)
        # A new bucket of the name table is lost: the old table stays, readiness says so.
        db = NameEntry(SVC, "default", "db", ("10.96.0.11",))
        self.successResultOf(Deferred.fromCoroutine(self.publisher.publish(
            policies=[], groups=[], nodes=[], names=[db])))
        held = netplugin.names_reader._buckets
        self.store.delete_many([k for k in self.store.keys()
                                if "/names/" in k and k.rsplit("/", 1)[1] not in held])
        self.clock.advance(0.1)
        self.assertFalse(netplugin.in_sync)
        self.assertIn("missing", netplugin.status()["dns_names"]["problem"])
        self.assertEqual(len(tables), 1)
        self.successResultOf(netplugin.stopService())
