"""
The real daemon against the Kubernetes API test server:
twistd -n contiv --role=netmaster --kubeconfig FILE reaches initial sync and
follows changes. The API server runs in this process; twistd in a child.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from tests.support.k8s_apiserver import (FakeApiServer, cluster_objects, load_fixture,
                                         write_kubeconfig)
from tests.support.reactor_process import Collector, sleep
from tests.support.processes import TWISTD, contiv_env, free_port

pytestmark = pytest.mark.integration



class NetmasterAgainstApiServer(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="contiv-netmaster-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.api = FakeApiServer(reactor, bookmark_interval=1.0)
        for obj in cluster_objects():
            self.api.create(obj)
        self.api.require_token("token-1")
        self.url = self.api.listen_tcp()
        self.addCleanup(self.api.stop)

    async def readyz(self, port: int) -> dict:
        response = await treq.get(f"http://127.0.0.1:{port}/readyz", timeout=2,
                                  persistent=False)
        return json.loads(await response.content())

    async def netmaster_when(self, port: int, predicate, what: str, timeout: float = 20):
        deadline = reactor.seconds() + timeout
        last = None
        while reactor.seconds() < deadline:
            try:
                last = (await self.readyz(port))["roles"]["netmaster"]
                if predicate(last):
                    return last
            except Exception:
                pass
            await sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last status {last}")

    def test_initial_sync_and_changes(self):
        return Deferred.fromCoroutine(self._initial_sync_and_changes())

    async def _initial_sync_and_changes(self):
        kubeconfig = write_kubeconfig(os.path.join(self.workdir, "kubeconfig"), self.url,
                                      token="token-1")
        port = free_port()
        process = Collector()
        args = [TWISTD, "--nodaemon", "--pidfile=", "contiv", "--role=netmaster",
                "--kubeconfig", kubeconfig, "--http", f"tcp:{port}:interface=127.0.0.1"]
        transport = reactor.spawnProcess(process, TWISTD, args, env=contiv_env(),
                                         path=self.workdir)

        def kill_if_running():
            if process.ended.called:
                return None
            transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(kill_if_running)
        try:
            expected = {kind: len(objs) for kind, objs in self.api.objects.items() if objs}
            status = await self.netmaster_when(port, lambda s: s["state"] != "listing",
                                               "initial sync")
            self.assertEqual(status["objects"], expected)
            self.assertTrue(status["source"]["synced"])

            new_pod = copy.deepcopy(load_fixture("pods.json")[0])
            new_pod["metadata"]["name"] = "late-arrival"
            self.api.create(new_pod)
            await self.netmaster_when(
                port, lambda s: s["objects"]["Pod"] == expected["Pod"] + 1, "the new pod")

            # A dropped watch and a compaction in between: the delete still arrives.
            self.api.drop_watches()
            self.api.delete("Pod", f"{new_pod['metadata']['namespace']}/late-arrival")
            self.api.compact()
            await self.netmaster_when(
                port, lambda s: s["objects"]["Pod"] == expected["Pod"], "the delete")
        finally:
            if not process.ended.called:
                transport.signalProcess("TERM")
            await process.ended.addTimeout(20, reactor)
        output = process.output.decode(errors="replace")
        self.assertIn("contiv started", output)
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)

    def test_bad_kubeconfig_is_a_configuration_error(self):
        path = os.path.join(self.workdir, "kubeconfig")
        with open(path, "w") as f:
            f.write("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n"
                    "current-context: nowhere\n")
        from tests.support.processes import contiv_env as env
        import subprocess

        result = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "contiv",
                                 "--role=netmaster", "--kubeconfig", path],
                                cwd=self.workdir, env=env(), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=60)
        self.assertEqual(result.returncode, 1)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("contiv: configuration error: source.kubeconfig: "),
                        lines[0])
        self.assertIn(path, lines[0])
