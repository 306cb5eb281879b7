"""
The real daemon publishing to a real memcached: twistd -n contiv
--role=netmaster --manifests examples/manifests --store memcached://...,
read back by a netplugin-side Reader on its own client; memcached restarted
under it; a policy edited in the manifests directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from contiv.store.layout import Reader
from contiv.store.memcached import MemcachedStore
from tests.support.reactor_process import Collector, converge
from tests.support.processes import REPO, TWISTD, MemcachedServer, contiv_env

pytestmark = pytest.mark.integration

EXAMPLES = os.path.join(REPO, "examples", "manifests")


class NetmasterPublishesToMemcached(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="contiv-memcached-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.manifests = os.path.join(self.workdir, "manifests")
        shutil.copytree(EXAMPLES, self.manifests)
        self.memcached = MemcachedServer()
        self.memcached.start()
        self.addCleanup(self.memcached.stop)
        self.client = MemcachedStore(reactor, [self.memcached.address])
        self.addCleanup(self.client.close)

    def start_netmaster(self) -> Collector:
        process = Collector()
        url = "memcached://127.0.0.1:%d" % self.memcached.port
        args = [TWISTD, "--nodaemon", "--pidfile=", "contiv", "--role=netmaster",
                "--manifests", self.manifests, "--store", url]
        transport = reactor.spawnProcess(process, TWISTD, args, env=contiv_env(),
                                         path=self.workdir)

        async def stop():
            if not process.ended.called:
                transport.signalProcess("TERM")
            await process.ended.addTimeout(20, reactor)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return process

    async def converge(self, reader: Reader, predicate, what: str, timeout: float = 20):
        return await converge(reader, predicate, what, timeout, 0.1)

    def test_publish_restart_and_edit(self):
        return Deferred.fromCoroutine(self._publish_restart_and_edit())

    async def _publish_restart_and_edit(self):
        process = self.start_netmaster()
        reader = Reader(self.client, "node-1")
        state = await self.converge(reader, lambda s: len(s.policies) == 3, "the example policies")
        names = sorted(p.name for p in state.policies.values())
        self.assertEqual(names, ["allow-client-to-web", "allow-web-to-db",
                                 "default-deny-ingress"])
        self.assertEqual(sorted(p.key for p in state.index.pods),
                         ["default/client-1", "default/db-1", "default/web-1", "default/web-2"])
        web_ips = sorted(m.ip for g in state.groups.values() for m in g.members
                         if m.pod.startswith("default/web-"))
        self.assertIn("10.244.1.11", web_ips)
        generation = state.generation

        # memcached restarts empty: the reader keeps its state, netmaster republishes.
        self.memcached.restart()
        await reader.poll()
        self.assertEqual(reader.state, state)
        state = await self.converge(reader, lambda s: s.generation > generation,
                                    "the republish after the restart")
        self.assertEqual(sorted(p.name for p in state.policies.values()), names)

        # An edit in the manifests directory reaches the store.
        path = os.path.join(self.manifests, "policies.yaml")
        with open(path) as f:
            text = f.read()
        with open(path + ".tmp", "w") as f:
            f.write(text.replace("name: allow-web-to-db", "name: allow-web-to-postgres"))
        os.rename(path + ".tmp", path)
        state = await self.converge(
            reader, lambda s: "allow-web-to-postgres" in {p.name for p in s.policies.values()},
            "the renamed policy")
        self.assertNotIn("allow-web-to-db", {p.name for p in state.policies.values()})
        self.assertFalse(process.ended.called, process.output.decode(errors="replace"))
