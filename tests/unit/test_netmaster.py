"""netmaster: follow, compile, publish; never before the initial list; recover the store."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event, EventStream, Synced
from contiv.k8s.client import ApiError
from contiv.roles.netmaster import NetmasterService, NotLeading
from contiv.store import StoreUnavailable
from contiv.store.layout import Reader
from contiv.store.memory import MemoryStore


class FakeSource:
    def __init__(self):
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True
        return succeed(None)

    def status(self):
        return {"fake": True}


def namespace(name, **labels):
    return Event(ADDED, "Namespace", name, {"kind": "Namespace", "metadata": {
        "name": name, "labels": labels}})


def pod(name, ip, node="node-1", ns="default", type=ADDED, **labels):
    return Event(type, "Pod", f"{ns}/{name}", {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})


def policy(name, ns="default", type=ADDED, port=80, **selector):
    return Event(type, "NetworkPolicy", f"{ns}/{name}", {
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": selector},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                              "ports": [{"port": port}]}]}})


class FlakyStore(MemoryStore):
    """A memory store that can be switched off, as memcached going down."""

    down = False

    def _maybe(self, method, *args):
        if self.down:
            return fail(StoreUnavailable("memcached is down"))
        return method(*args)

    def get_many(self, keys):
        return self._maybe(super().get_many, keys)

    def set_many(self, items):
        return self._maybe(super().set_many, items)

    def incr(self, key):
        return self._maybe(super().incr, key)


class NetmasterTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = FlakyStore()
        self.stream = EventStream()
        self.source = FakeSource()
        self.netmaster = NetmasterService(self.source, self.stream, self.store,
                                          clock=self.clock, audit_interval=5.0,
                                          grace_period=10.0)
        self.netmaster.startService()
        self.reader = Reader(self.store, "node-1")

    def tearDown(self):
        self.successResultOf(self.netmaster.stopService())
        self.assertTrue(self.source.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def feed(self, *items):
        for item in items:
            self.successResultOf(self.stream.put(item))

    def settle(self, seconds=0.1):
        for _ in range(int(seconds / 0.005) + 1):
            self.clock.advance(0.005)

    def read(self):
        return self.successResultOf(self.reader.poll())

    def test_nothing_published_before_initial_list(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"),
                  policy("p", app="web"))
        self.settle()
        self.assertEqual(self.store.keys(), [])
        self.assertFalse(self.netmaster.status()["in_sync"])
        self.assertEqual(self.netmaster.status()["state"], "listing")
        self.feed(Synced())
        self.settle()
        status = self.netmaster.status()
        self.assertTrue(status["in_sync"], status)
        self.assertEqual(status["state"], "published")
        state = self.read()
        self.assertEqual(len(state.policies), 1)
        self.assertEqual([p.key for p in state.index.pods], ["default/web"])
        self.assertEqual(status["generation"], state.generation)

    def test_burst_is_one_publish_and_changes_follow(self):
        self.feed(namespace("default"), Synced())
        self.settle()
        first = self.netmaster.published_generation
        self.feed(pod("web", "10.0.0.1", app="web"), pod("client", "10.0.0.2", app="client"),
                  policy("p", app="web"))
        self.assertFalse(self.netmaster.in_sync)
        self.settle()
        self.assertEqual(self.netmaster.published_generation, first + 1)
        state = self.read()
        (group,) = [g for g in state.groups.values()
                    if [m.ip for m in g.members] == ["10.0.0.2"]]
        self.feed(pod("client", "10.0.0.3", type=MODIFIED, app="client"))
        self.settle()
        state = self.read()
        self.assertIn(["10.0.0.3"], [[m.ip for m in g.members] for g in state.groups.values()])
        self.assertNotIn(group.key, state.groups)

    def test_republish_writes_everything_again(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"),
                  policy("p", app="web"), Synced())
        self.settle()
        first = self.netmaster.published_generation
        state = self.read()
        # Entries gone from the store behind netmaster's back come back.
        for key in self.store.keys():
            if "/policy/" in key:
                self.successResultOf(self.store.delete_many([key]))
        self.assertTrue(self.netmaster.republish())
        self.settle()
        self.assertEqual(self.netmaster.published_generation, first + 1)
        self.assertTrue(any("/policy/" in key for key in self.store.keys()))
        again = self.read()
        self.assertEqual(again.policies, state.policies)

    def test_invalid_policy_keeps_previous_version(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"),
                  policy("p", app="web"), Synced())
        self.settle()
        before = self.read().policies
        broken = policy("p", type=MODIFIED, port=99999, app="web")
        self.feed(broken)
        self.settle()
        status = self.netmaster.status()
        self.assertEqual(status["invalid_objects"], 1)
        (message,) = status["errors"].values()
        self.assertIn("default/p", message)
        self.assertIn("spec.ingress[0].ports[0]", message)
        self.assertIsNone(self.read())  # nothing new to read...
        self.assertEqual(self.reader.state.policies, before)  # ...the old policy stands

    def test_store_down_then_back(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"), Synced())
        self.settle()
        self.store.down = True
        self.feed(policy("p", app="web"))
        self.settle()
        status = self.netmaster.status()
        self.assertFalse(status["in_sync"])
        self.assertEqual(status["state"], "store-error")
        self.assertIn("memcached is down", status["detail"])
        self.store.down = False
        self.settle(1.5)
        self.assertTrue(self.netmaster.in_sync, self.netmaster.status())
        self.assertEqual(len(self.read().policies), 1)

    def test_store_lost_everything_republishes(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"),
                  policy("p", app="web"), Synced())
        self.settle()
        generation = self.netmaster.published_generation
        self.successResultOf(self.store.delete_many(self.store.keys()))  # a restart
        self.settle(1.2)  # the periodic check
        state = self.read()
        self.assertEqual(len(state.policies), 1)
        self.assertGreater(state.generation, generation)

    def test_evicted_entry_is_rewritten_by_the_audit(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"),
                  policy("p", app="web"), Synced())
        self.settle()
        evicted = [k for k in self.store.keys() if "/policy/" in k]
        self.successResultOf(self.store.delete_many(evicted))
        self.settle(6.0)
        self.assertEqual(sorted(k for k in self.store.keys() if "/policy/" in k), evicted)

    def test_deleted_policy_is_garbage_collected_after_grace(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"),
                  policy("p", app="web"), Synced())
        self.settle()
        (key,) = [k for k in self.store.keys() if "/policy/" in k]
        self.feed(policy("p", type=DELETED, app="web"))
        self.settle(6.0)
        self.assertIn(key, self.store.keys())  # readers may still hold the old index
        self.settle(12.0)
        self.assertNotIn(key, self.store.keys())
        self.assertEqual(self.read().policies, {})

    def test_a_restarted_netmaster_collects_what_its_predecessor_left(self):
        self.feed(namespace("default"), pod("web", "10.0.0.1", app="web"),
                  pod("db", "10.0.0.5", node="node-2", app="db"),
                  policy("p", app="web"), policy("q", app="db"), Synced())
        self.settle()
        old_policies = sorted(k for k in self.store.keys() if "/policy/" in k)
        self.assertEqual(len(old_policies), 2)
        self.successResultOf(self.netmaster.stopService())

        # The successor starts on the same store; meanwhile q and node-2's pod went.
        stream = EventStream()
        self.netmaster = NetmasterService(self.source, stream, self.store, clock=self.clock,
                                          audit_interval=5.0, grace_period=10.0)
        self.netmaster.startService()
        for item in (namespace("default"), pod("web", "10.0.0.1", app="web"),
                     policy("p", app="web"), Synced()):
            self.successResultOf(stream.put(item))
        self.settle()
        self.assertNotIn("contiv/node/node-2", self.store.keys())
        node2 = Reader(self.store, "node-2")
        self.assertEqual(self.successResultOf(node2.poll()).index.policies, ())
        self.settle(20.0)
        policies = sorted(k for k in self.store.keys() if "/policy/" in k)
        self.assertEqual(len(policies), 1)
        self.assertIn(policies[0], old_policies)
        self.assertEqual(len(self.read().policies), 1)

    def test_dns_names_follow_services_and_pods(self):
        from contiv.store.layout import NameReader

        service = Event(ADDED, "Service", "default/web", {
            "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}})
        self.feed(namespace("default"), pod("web-1", "10.0.0.1", app="web"), service,
                  Synced())
        self.settle()
        names = NameReader(self.store)
        table = self.successResultOf(names.poll())
        self.assertEqual(table.resolve("web.default.svc.cluster.local").entry.addresses,
                         ("10.96.0.10",))
        self.assertEqual(table.resolve("web-1.default.pod.cluster.local").entry.addresses,
                         ("10.0.0.1",))
        self.assertEqual(self.netmaster.status()["names"], 2)
        # A broken Service is reported by name and field; its last version stays.
        broken = Event(MODIFIED, "Service", "default/web", {
            "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.300"}})
        self.feed(broken, pod("web-1", "10.0.0.1", type=DELETED))
        self.settle()
        status = self.netmaster.status()
        self.assertEqual(status["invalid_objects"], 1)
        self.assertIn("spec.clusterIP", status["errors"]["Service default/web"])
        table = self.successResultOf(names.poll())
        self.assertEqual(table.resolve("web.default.svc.cluster.local").entry.addresses,
                         ("10.96.0.10",))
        self.assertEqual(table.resolve("web-1.default.pod.cluster.local").outcome, "nxdomain")


class HangingStore(MemoryStore):
    """set_many can be made to wait forever, as a write stuck in the network."""

    hang = False

    def __init__(self):
        super().__init__()
        self.hung = []

    def set_many(self, items):
        if self.hang:
            d = Deferred()
            self.hung.append(d)
            return d
        return super().set_many(items)


class NetmasterWithElection(unittest.TestCase):
    """Leader election: a standby compiles and publishes nothing; a leader publishes."""

    def setUp(self):
        from tests.unit.test_lease import MemoryLeases

        self.clock = Clock()
        self.store = HangingStore()
        self.leases = MemoryLeases()
        self.netmasters = []

    def start(self, identity):
        from contiv.k8s.lease import LeaderElector

        elector = LeaderElector(self.leases, identity, clock=self.clock, lease_duration=15,
                                renew_deadline=10, retry_period=2, random=lambda: 0.5)
        stream = EventStream()
        netmaster = NetmasterService(FakeSource(), stream, self.store, clock=self.clock,
                                     audit_interval=5.0, grace_period=10.0, elector=elector)
        netmaster.startService()
        self.netmasters.append(netmaster)
        for item in (namespace("default"), pod("web", "10.0.0.1", app="web"),
                     pod("client", "10.0.0.2", app="client"), policy("p", app="web"),
                     Synced()):
            self.successResultOf(stream.put(item))
        return netmaster, stream

    def tearDown(self):
        self.store.hang = False
        for netmaster in self.netmasters:
            if netmaster.running:
                self.successResultOf(netmaster.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def settle(self, seconds=0.1):
        for _ in range(int(seconds / 0.005) + 1):
            self.clock.advance(0.005)

    def generation(self):
        raw = self.successResultOf(self.store.get_many(["contiv/gen"])).get("contiv/gen")
        return None if raw is None else int(raw)

    def test_standby_compiles_publishes_nothing_and_says_so(self):
        self.leases.renew_as("elsewhere", 0)
        standby, _ = self.start("b")
        self.settle(1)
        self.assertEqual(self.store.keys(), [])
        status = standby.status()
        self.assertEqual(status["state"], "standby")
        self.assertIn("held by elsewhere", status["detail"])
        self.assertIn("ready to take over", status["detail"])
        self.assertTrue(status["in_sync"], status)
        self.assertIsNone(status["generation"])
        self.assertEqual(len(standby.engine.policies), 1)
        self.assertEqual(status["election"]["holder"], "elsewhere")

    def test_takeover_adopts_and_continues_the_generation(self):
        leader, leader_stream = self.start("a")
        self.settle(1)
        self.assertTrue(leader.active)
        first = self.generation()
        self.assertEqual(leader.published_generation, first)
        reader = Reader(self.store, "node-1")
        before = self.successResultOf(reader.poll())
        standby, standby_stream = self.start("b")
        self.settle(1)
        self.assertEqual(standby.status()["state"], "standby")
        self.assertEqual(self.generation(), first, "the standby published")
        # The leader stops renewing (as if its API requests stopped), and
        # stops at its renew deadline; for b the Lease runs out later.
        leader.elector._next.cancel()
        leader.elector.running = False
        renewed = leader.elector.last_renew
        for _ in range(200):  # 10 s: the leader's renew deadline passes
            self.clock.advance(0.05)
        self.assertFalse(leader.active)
        self.assertLessEqual(self.clock.seconds(), renewed + 10 + 0.05)
        self.assertFalse(standby.active)
        for _ in range(200):
            self.clock.advance(0.05)
            if standby.active:
                break
        self.assertTrue(standby.active, standby.status())
        # Not before the Lease had gone unrenewed for its duration.
        self.assertGreaterEqual(self.clock.seconds(), renewed + 15)
        self.settle(0.5)
        self.assertEqual(standby.status()["state"], "published")
        self.assertGreater(self.generation(), first)
        after = self.successResultOf(reader.poll())
        self.assertEqual(after.policies.keys(), before.policies.keys())
        self.assertEqual(after.index.pods, before.index.pods)
        # A change followed by the new leader reaches the store.
        self.successResultOf(standby_stream.put(pod("web2", "10.0.0.3", app="web")))
        self.successResultOf(leader_stream.put(pod("web2", "10.0.0.3", app="web")))
        self.settle()
        state = self.successResultOf(reader.poll())
        self.assertIn("default/web2", [p.key for p in state.index.pods])
        self.assertEqual(leader.status()["state"], "standby")

    def test_a_standby_continues_above_what_readers_saw_if_the_store_lost_the_count(self):
        leader, _ = self.start("a")
        self.settle(1)
        standby, _ = self.start("b")
        self.settle(1)
        for _ in range(3):  # the leader publishes a few generations
            leader.republish()
            self.settle()
        seen = self.generation()
        self.clock.advance(1.0)  # the standby's check reads it
        self.assertEqual(standby.publisher.generation, seen)
        # The leader goes, and memcached loses everything at the same time.
        self.successResultOf(leader.stopService())
        self.successResultOf(self.store.delete_many(self.store.keys()))
        for _ in range(100):
            self.clock.advance(0.05)
            if standby.active:
                break
        self.assertTrue(standby.active)
        self.settle(0.5)
        self.assertGreater(self.generation(), seen)

    def test_losing_the_lease_cuts_off_a_publish_in_flight(self):
        leader, stream = self.start("a")
        self.settle(1)
        generation = self.generation()
        self.store.hang = True
        self.successResultOf(stream.put(pod("web2", "10.0.0.3", app="web")))
        self.settle()
        self.assertEqual(len(self.store.hung), 1)
        self.assertIsNotNone(leader._publishing)
        self.leases.hang = True  # renewals go unanswered too
        self.clock.advance(11)
        self.assertFalse(leader.active)
        self.assertIsNone(leader._publishing)
        # The write that was stuck completes late; nothing more follows it.
        self.store.hang = False
        self.store.hung[0].callback(None)
        self.settle()
        self.assertEqual(self.generation(), generation)
        self.assertEqual(self.successResultOf(
            leader.publisher.store.set_many({"contiv/x": b"1"}).addErrback(
                lambda f: f.trap(NotLeading) and "refused")), "refused")
        self.assertNotIn("contiv/x", self.store.keys())
        self.leases.hang = False
        for d in self.leases.hung:
            d.errback(ApiError(503, "", "late", ""))

    def test_stop_finishes_the_publish_then_releases(self):
        leader, stream = self.start("a")
        self.settle(1)
        self.store.hang = True
        self.successResultOf(stream.put(pod("web2", "10.0.0.3", app="web")))
        self.settle()
        stopped = leader.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(self.leases.lease["spec"]["holderIdentity"], "a")
        self.store.hang = False
        for d in self.store.hung:
            d.callback(None)
        self.settle()
        self.successResultOf(stopped)
        self.assertEqual(self.leases.lease["spec"]["holderIdentity"], "")
        self.assertTrue(self.leases.closed)
