"""
netmaster high availability, with real processes: two (then three)
twistd contiv --role=netmaster children against the Kubernetes API test
server (over TCP, which now serves Leases) and one real memcached.

Exactly one publishes while the other is a ready standby; kill -9 of the
leader hands the Lease to the standby once it has gone unrenewed for the
lease duration, and the new leader publishes (a policy change after the
takeover reaches the store); SIGTERM of a leader releases the Lease, so a
standby takes over at its next attempt, well before the lease duration.
Throughout, the store's generation never goes backwards, no generation is
published by two processes, and a netplugin-side reader stays complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pytest
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from contiv.store.layout import Reader
from contiv.store.memcached import MemcachedStore
from tests.support.k8s_apiserver import FakeApiServer, cluster_objects, write_kubeconfig
from tests.support.processes import TWISTD, MemcachedServer, contiv_env, free_port
from tests.support.reactor_process import Collector, converge, sleep

pytestmark = pytest.mark.integration

LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 3, 2, 0.5
NAMESPACE, LEASE = "contiv-system", "contiv-netmaster"
PUBLISHED = re.compile(rb"published generation (\d+)")


class Child:
    def __init__(self, name: str, port: int, process: Collector, transport):
        self.name = name
        self.port = port
        self.process = process
        self.transport = transport

    @property
    def output(self) -> str:
        return self.process.output.decode(errors="replace")

    def generations(self) -> list[int]:
        return [int(g) for g in PUBLISHED.findall(bytes(self.process.output))]


class NetmasterHighAvailability(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="contiv-ha-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.api = FakeApiServer(reactor, bookmark_interval=1.0)
        for obj in cluster_objects():
            self.api.create(obj)
        self.api.require_token("token-1")
        self.url = self.api.listen_tcp()
        self.addCleanup(self.api.stop)
        self.kubeconfig = write_kubeconfig(os.path.join(self.workdir, "kubeconfig"), self.url,
                                           token="token-1")
        self.memcached = MemcachedServer()
        self.memcached.start()
        self.addCleanup(self.memcached.stop)
        self.store = MemcachedStore(reactor, [self.memcached.address])
        self.addCleanup(self.store.close)
        self.children: list[Child] = []
        # (time, gen, epoch) every 50 ms, for the whole test
        self.samples: list[tuple[float, int | None, bytes | None]] = []
        self.sampler = task.LoopingCall(lambda: Deferred.fromCoroutine(self.sample()))
        self.sampler.clock = reactor
        self.sampler.start(0.05)
        self.addCleanup(lambda: self.sampler.running and self.sampler.stop())

    async def sample(self) -> None:
        try:
            found = await self.store.get_many(["contiv/gen", "contiv/epoch"])
        except Exception:
            return
        gen = found.get("contiv/gen")
        self.samples.append((reactor.seconds(), int(gen) if gen is not None else None,
                             found.get("contiv/epoch")))

    def start(self, name: str) -> Child:
        port = free_port()
        process = Collector()
        args = [TWISTD, "--nodaemon", "--pidfile=", "contiv", "--role=netmaster",
                "--kubeconfig", self.kubeconfig,
                "--store", f"memcached://127.0.0.1:{self.memcached.port}",
                "--http", f"tcp:{port}:interface=127.0.0.1",
                "--election-namespace", NAMESPACE,
                "--election-lease-duration", str(LEASE_DURATION),
                "--election-renew-deadline", str(RENEW_DEADLINE),
                "--election-retry-period", str(RETRY_PERIOD)]
        env = contiv_env()
        env["POD_NAME"] = name
        transport = reactor.spawnProcess(process, TWISTD, args, env=env, path=self.workdir)
        child = Child(name, port, process, transport)
        self.children.append(child)

        async def stop():
            if not process.ended.called:
                transport.signalProcess("KILL")
                await process.ended.addTimeout(20, reactor)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return child

    async def status(self, child: Child) -> dict | None:
        try:
            response = await treq.get(f"http://127.0.0.1:{child.port}/readyz", timeout=2,
                                      persistent=False)
            body = json.loads(await response.content())
            status = body["roles"]["netmaster"]
            status["http_code"] = response.code
            return status
        except Exception:
            return None

    async def when(self, child: Child, predicate, what: str, timeout: float = 30) -> dict:
        deadline = reactor.seconds() + timeout
        last = None
        while reactor.seconds() < deadline:
            if child.process.ended.called:
                raise AssertionError(f"{child.name} ended while waiting for {what}:\n"
                                     f"{child.output[-3000:]}")
            last = await self.status(child)
            if last is not None and predicate(last):
                return last
            await sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status of {child.name}: "
                             f"{last}")

    def lease(self) -> dict:
        return self.api.leases[(NAMESPACE, LEASE)]

    async def two_netmasters(self) -> tuple[Child, Child, dict]:
        """netmaster-a and -b started: (the leader, the other, the leader's published status)."""
        a, b = self.start("netmaster-a"), self.start("netmaster-b")
        await self.when(a, lambda s: s["state"] in ("published", "standby"), "a settled")
        await self.when(b, lambda s: s["state"] in ("published", "standby"), "b settled")
        leader = {c.name: c for c in (a, b)}[await self.holder()]
        status = await self.when(leader, lambda s: s["state"] == "published",
                                 "the leader's publish")
        return leader, (b if leader is a else a), status

    async def holder(self, timeout: float = 30) -> str:
        """Who holds the Lease, once someone does (both may still be on their first try)."""
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            lease = self.api.leases.get((NAMESPACE, LEASE))
            if lease and lease["spec"].get("holderIdentity"):
                return lease["spec"]["holderIdentity"]
            await sleep(0.05)
        raise AssertionError("nobody took the Lease")

    async def converge(self, reader: Reader, predicate, what: str, timeout: float = 20):
        return await converge(reader, predicate, what, timeout, 0.05)

    def db_node_and_namespace(self) -> tuple[str, str]:
        for pod in self.api.objects["Pod"].values():
            if (pod["metadata"].get("labels") or {}).get("app") == "db":
                return pod["spec"]["nodeName"], pod["metadata"]["namespace"]
        raise AssertionError("the fixtures have no app=db pod")

    def new_policy(self, namespace: str, name: str, port: int) -> dict:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                         "policyTypes": ["Ingress"],
                         "ingress": [{"ports": [{"port": port, "protocol": "TCP"}]}]}}

    def test_one_leader_failover_on_kill_and_release_on_term(self):
        return Deferred.fromCoroutine(self._failover())

    async def _failover(self):
        node, namespace = self.db_node_and_namespace()
        # -- exactly one publishes, the other is a ready standby naming it
        leader, standby, leader_status = await self.two_netmasters()
        # Ready once its first read of the Lease is back (before that it says
        # "reading the Lease" and is not ready: it cannot yet take over).
        standby_status = await self.when(
            standby, lambda s: s["state"] == "standby" and s["election"]["holder"],
            "the standby to read the Lease")
        self.assertTrue(standby_status["in_sync"], standby_status)
        self.assertEqual(standby_status["http_code"], 200)
        self.assertIn(f"held by {leader.name}", standby_status["detail"])
        self.assertEqual(standby_status["election"]["holder"], leader.name)
        self.assertIsNone(standby_status["generation"])
        self.assertEqual(standby_status["policies"], leader_status["policies"])
        reader = Reader(self.store, node)
        state = await self.converge(reader, lambda s: len(s.policies) >= 1, "the policies")
        policies = {p.name for p in state.policies.values()}

        # A change while both run: published by the leader only.
        self.api.create(self.new_policy(namespace, "db-8080", 8080))
        state = await self.converge(
            reader, lambda s: "db-8080" in {p.name for p in s.policies.values()},
            "the change before the failover")
        await sleep(1.0)  # time for a standby to (wrongly) publish too
        self.assertEqual(standby.generations(), [], standby.output[-2000:])
        self.assertTrue(leader.generations())
        self.assertEqual(self.samples[-1][1], max(leader.generations()))
        epoch_before = self.samples[-1][2]

        # -- kill -9 the leader: the standby takes over once the Lease ran out
        renewed = self.lease()["spec"]["renewTime"]
        killed_at = reactor.seconds()
        leader.transport.signalProcess("KILL")
        await leader.process.ended.addTimeout(10, reactor)
        status = await self.when(standby, lambda s: s["state"] == "published",
                                 "the takeover after kill -9", timeout=LEASE_DURATION + 10)
        took_over = reactor.seconds() - killed_at
        print(f"\ntakeover after kill -9 of the leader: {took_over:.2f} s "
              f"(lease duration {LEASE_DURATION} s, retry period {RETRY_PERIOD} s)")
        self.assertLess(took_over, LEASE_DURATION + RETRY_PERIOD * 1.2 + 1.5)
        spec = self.lease()["spec"]
        self.assertEqual(spec["holderIdentity"], standby.name)
        self.assertEqual(spec["leaseTransitions"], 1)
        self.assertNotEqual(spec["renewTime"], renewed)
        self.assertGreater(status["generation"], max(leader.generations()))
        state = await self.converge(reader, lambda s: s.generation >= status["generation"],
                                    "the new leader's generation")
        self.assertEqual({p.name for p in state.policies.values()}, policies | {"db-8080"})
        self.assertIn("adopted", standby.output)

        # A policy change after the takeover reaches the store.
        self.api.create(self.new_policy(namespace, "db-9090", 9090))
        state = await self.converge(
            reader, lambda s: "db-9090" in {p.name for p in s.policies.values()},
            "the change after the failover")

        # -- a third netmaster joins as standby; SIGTERM of the leader releases
        leader, standby = standby, self.start("netmaster-c")
        await self.when(standby, lambda s: s["state"] == "standby" and s["in_sync"],
                        "the new standby")
        terminated_at = reactor.seconds()
        leader.transport.signalProcess("TERM")
        status = await self.when(standby, lambda s: s["state"] == "published",
                                 "the takeover after SIGTERM", timeout=LEASE_DURATION + 10)
        handed_over = reactor.seconds() - terminated_at
        print(f"takeover after SIGTERM of the leader: {handed_over:.2f} s")
        # Much less than the lease duration: the leader released the Lease
        # (its log says why if it could not).
        self.assertLess(handed_over, LEASE_DURATION / 2, leader.output[-3000:])
        await leader.process.ended.addTimeout(20, reactor)
        self.assertIn("released the Lease", leader.output)
        self.assertIn("Server Shut Down.", leader.output)
        self.assertEqual(self.lease()["spec"]["holderIdentity"], standby.name)
        self.assertEqual(self.lease()["spec"]["leaseTransitions"], 2)
        state = await self.converge(reader, lambda s: s.generation >= status["generation"],
                                    "the third leader's generation")
        self.assertEqual({p.name for p in state.policies.values()},
                         policies | {"db-8080", "db-9090"})
        self.assertIsNone(reader.problem)

        # -- the whole run: one writer at a time, nothing published twice
        final = status["generation"]
        deadline = reactor.seconds() + 5
        while not (self.samples and (self.samples[-1][1] or 0) >= final):
            self.assertLess(reactor.seconds(), deadline, "the sampler fell behind")
            await sleep(0.05)
        self.sampler.stop()
        generations = [gen for _, gen, _ in self.samples if gen is not None]
        self.assertEqual(generations, sorted(generations), "gen went backwards")
        published = [g for child in self.children for g in child.generations()]
        self.assertEqual(len(published), len(set(published)),
                         f"a generation was published twice: {sorted(published)}")
        for child in self.children:
            self.assertNotIn("another publisher", child.output)
            self.assertNotIn("Traceback", child.output)
        # Each takeover writes a new epoch (its full publish: the fence that
        # makes a deposed leader republish rather than build on a map it no
        # longer owns); netplugins do not read it, and the reader above stayed
        # complete across both takeovers.
        epochs = [epoch for _, _, epoch in self.samples if epoch is not None]
        changes = sum(1 for x, y in zip(epochs, epochs[1:]) if x != y)
        timeline = [(round(t - self.samples[0][0], 2), gen, epoch and epoch[:8])
                    for t, gen, epoch in self.samples]
        self.assertEqual(changes, 2, f"one new epoch per takeover, none otherwise: {timeline}")
        self.assertIn(epoch_before, epochs)

    def test_a_leader_that_cannot_renew_stops_publishing_before_the_lease_expires(self):
        return Deferred.fromCoroutine(self._cannot_renew())

    async def _cannot_renew(self):
        node, namespace = self.db_node_and_namespace()
        leader, standby, _ = await self.two_netmasters()
        reader = Reader(self.store, node)
        await self.converge(reader, lambda s: len(s.policies) >= 1, "the policies")

        # The API server stops answering Lease requests (the watches go on).
        refused_at = reactor.seconds()
        self.api.refuse_leases = 503
        status = await self.when(leader, lambda s: s["state"] == "standby",
                                 "the leader to step down", timeout=LEASE_DURATION + 5)
        stepped_down = reactor.seconds() - refused_at
        print(f"\nleader stepped down {stepped_down:.2f} s after its renewals began to fail "
              f"(renew deadline {RENEW_DEADLINE} s, lease duration {LEASE_DURATION} s)")
        self.assertLess(stepped_down, LEASE_DURATION)
        self.assertIn("503", status["detail"])
        self.assertFalse(status["in_sync"])
        self.assertEqual(status["http_code"], 503)
        self.assertIn("stops publishing", leader.output)

        # Nobody leads: a change is compiled by both but reaches no store.
        generation = self.samples[-1][1]
        self.api.create(self.new_policy(namespace, "db-7070", 7070))
        for child in (leader, standby):
            await self.when(child, lambda s: s["policies"] == 2, f"{child.name} compiling it")
        await sleep(1.0)
        self.assertEqual(self.samples[-1][1], generation)

        # The API server answers again: a leader is chosen and publishes the change.
        self.api.refuse_leases = None
        state = await self.converge(
            reader, lambda s: "db-7070" in {p.name for p in s.policies.values()},
            "the change once a leader is back", timeout=LEASE_DURATION + 10)
        self.assertGreater(state.generation, generation)
        holder = {c.name: c for c in (leader, standby)}[self.lease()["spec"]["holderIdentity"]]
        await self.when(holder, lambda s: s["state"] == "published", "the new leader")
        generations = [gen for _, gen, _ in self.samples if gen is not None]
        self.assertEqual(generations, sorted(generations), "gen went backwards")
        published = [g for child in self.children for g in child.generations()]
        self.assertEqual(len(published), len(set(published)), sorted(published))
