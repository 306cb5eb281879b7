"""
ApiSource against the test API server over real TCP (and TLS) on 127.0.0.1,
on the real reactor.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any, Callable, List

import pytest
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial import unittest

from contiv.k8s.apiconfig import ApiConfig, load_kubeconfig
from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event, EventStream, Synced
from contiv.k8s.reflector import ApiSource, Reflector
from tests.support.k8s_apiserver import (FakeApiServer, cluster_objects, load_fixture,
                                         make_test_pki, write_kubeconfig)

pytestmark = pytest.mark.integration

WAIT = 10.0


def pod(name: str, ip: str = "10.244.9.9", namespace: str = "shop") -> dict:
    obj = copy.deepcopy(load_fixture("pods.json")[1])
    obj["metadata"] = {"name": name, "namespace": namespace, "labels": {"app": "web"}}
    obj["status"]["podIP"] = ip
    obj["status"]["podIPs"] = [{"ip": ip}]
    return obj


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.01)


async def next_item(stream: EventStream, timeout: float = WAIT) -> Any:
    return await stream.get().addTimeout(timeout, reactor)


async def take(stream: EventStream, count: int) -> List[Any]:
    return [await next_item(stream) for _ in range(count)]


def as_tuples(events: List[Any]) -> List[tuple]:
    return [(e.type, e.kind, e.key) if isinstance(e, Event) else e for e in events]


class ApiSourceTests(unittest.TestCase):
    # trial's own ceiling for each test, well under pytest-timeout's.
    timeout = 30

    def setUp(self) -> None:
        self.server = FakeApiServer(reactor, bookmark_interval=0.1)
        for obj in cluster_objects():
            self.server.create(obj)
        self.addCleanup(self.server.stop)
        self.fixture_keys = {("ADDED", o["kind"], key) for o in cluster_objects()
                             for key in [f"{o['metadata']['namespace']}/{o['metadata']['name']}"
                                         if "namespace" in o["metadata"]
                                         else o["metadata"]["name"]]}
        self.directory = tempfile.mkdtemp(prefix="contiv-k8s-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def start_source(self, config: ApiConfig = None, *, maxsize: int = 1024,
                     **options: Any) -> ApiSource:
        if config is None:
            config = ApiConfig(server=self.server.url or self.server.listen_tcp())
        options.setdefault("backoff_initial", 0.02)
        options.setdefault("backoff_max", 0.2)
        options.setdefault("page_size", 2)
        source = ApiSource(reactor, config, EventStream(maxsize), **options)
        source.start()
        self.addCleanup(source.stop)
        return source

    async def sync(self, source: ApiSource) -> List[Any]:
        events = await take(source.stream, len(self.fixture_keys) + 1)
        self.assertEqual(set(as_tuples(events[:-1])), self.fixture_keys)
        self.assertIsInstance(events[-1], Synced)
        return events

    # -- initial sync

    def test_initial_sync(self) -> Deferred:
        async def run() -> None:
            source = self.start_source()
            events = await self.sync(source)
            self.assertTrue(source.synced)
            status = source.status()
            self.assertTrue(status["synced"])
            self.assertEqual(status["kinds"]["Pod"]["cached"], 3)
            self.assertEqual(status["kinds"]["Pod"]["resourceVersion"], str(self.server.rv))
            # page_size=2 and three pods: the list went on with a continue token.
            pod_lists = [r for r in self.server.requests
                         if r["path"] == "/api/v1/pods" and "watch" not in r["args"]]
            self.assertEqual([r["args"].get("continue") is not None for r in pod_lists],
                             [False, True])
            # Objects come out as kubectl prints them, with kind and apiVersion.
            first_pod = next(e for e in events if isinstance(e, Event) and e.kind == "Pod")
            self.assertEqual(first_pod.object["apiVersion"], "v1")
            self.assertEqual(first_pod.object["kind"], "Pod")
            # Only headless services' slices are asked for.
            slices = [r for r in self.server.requests
                      if r["path"] == "/apis/discovery.k8s.io/v1/endpointslices"]
            self.assertTrue(all(r["args"]["labelSelector"] == "service.kubernetes.io/headless"
                                for r in slices))
            await wait_until(lambda: all(r.connected for r in source.reflectors.values()),
                             "every watch to connect")
            # Exactly one Synced per stream.
            self.server.create(pod("later"))
            self.assertEqual(as_tuples([await next_item(source.stream)]),
                             [(ADDED, "Pod", "shop/later")])
            self.assertEqual(len(source.stream), 0)

        return Deferred.fromCoroutine(run())

    def test_no_synced_before_every_kind_listed(self) -> Deferred:
        async def run() -> None:
            self.server.refuse_lists["/apis/networking.k8s.io/v1/networkpolicies"] = 503
            source = self.start_source()
            others = {t for t in self.fixture_keys if t[1] != "NetworkPolicy"}
            events = await take(source.stream, len(others))
            self.assertEqual(set(as_tuples(events)), others)
            await wait_until(lambda: source.reflectors["NetworkPolicy"].last_error,
                             "the NetworkPolicy list to fail")
            self.assertFalse(source.synced)
            self.assertEqual(len(source.stream), 0)
            self.assertIn("503", source.status()["kinds"]["NetworkPolicy"]["lastError"])
            del self.server.refuse_lists["/apis/networking.k8s.io/v1/networkpolicies"]
            rest = await take(source.stream, 2)
            self.assertEqual(as_tuples(rest), [(ADDED, "NetworkPolicy", "shop/db-from-web"),
                                               Synced()])
            self.assertTrue(source.synced)

        return Deferred.fromCoroutine(run())

    # -- watching

    def test_events_in_order(self) -> Deferred:
        async def run() -> None:
            source = self.start_source()
            await self.sync(source)
            await wait_until(lambda: source.reflectors["Pod"].connected, "the pod watch")
            self.server.split_writes = True
            expected = []
            for i in range(5):
                self.server.create(pod(f"p{i}", f"10.244.3.{i}"))
                expected.append((ADDED, "Pod", f"shop/p{i}"))
            for i in range(5):
                obj = copy.deepcopy(self.server.objects["Pod"][f"shop/p{i}"])
                obj["metadata"]["labels"]["round"] = "2"
                self.server.update(obj)
                expected.append((MODIFIED, "Pod", f"shop/p{i}"))
            self.server.delete("Pod", "shop/p0")
            expected.append((DELETED, "Pod", "shop/p0"))
            namespace = load_fixture("namespace.json")[0]
            namespace["metadata"]["labels"]["team"] = "checkout"
            self.server.update(namespace)
            events = await take(source.stream, len(expected) + 1)
            pod_events = [e for e in events if e.kind == "Pod"]
            self.assertEqual(as_tuples(pod_events), expected)
            self.assertEqual([e.object["metadata"]["labels"].get("round") for e in pod_events],
                             [None] * 5 + ["2"] * 6)
            self.assertEqual(as_tuples([e for e in events if e.kind == "Namespace"]),
                             [(MODIFIED, "Namespace", "shop")])
            self.assertNotIn("shop/p0", source.reflectors["Pod"].cache)

        return Deferred.fromCoroutine(run())

    def test_drop_mid_stream_loses_and_duplicates_nothing(self) -> Deferred:
        async def run() -> None:
            source = self.start_source()
            await self.sync(source)
            reflector = source.reflectors["Pod"]
            await wait_until(lambda: reflector.connected, "the pod watch")
            watches_before = reflector.watches
            # The next pod event is cut in half on the wire, then the connection drops;
            # later changes happen while the reflector is reconnecting.
            self.server.drop_watches_midway()
            names = [f"drop{i}" for i in range(10)]
            for i, name in enumerate(names):
                self.server.create(pod(name, f"10.244.4.{i}"))
                if i == 4:
                    self.server.drop_watches()
            events = await take(source.stream, len(names))
            self.assertEqual(as_tuples(events), [(ADDED, "Pod", f"shop/{n}") for n in names])
            self.assertGreater(reflector.watches, watches_before)
            self.assertEqual(reflector.relists, 1)
            await sleep(0.2)
            self.assertEqual(len(source.stream), 0, "an event came twice")
            self.assertEqual(reflector.resource_version, str(self.server.rv))

        return Deferred.fromCoroutine(run())

    def _gone(self, gone_as: str) -> Deferred:
        async def run() -> None:
            self.server.gone_as = gone_as
            source = self.start_source()
            await self.sync(source)
            reflector = source.reflectors["Pod"]
            await wait_until(lambda: reflector.connected, "the pod watch")
            self.server.refuse_watches = True
            self.server.drop_watches()
            await wait_until(lambda: not reflector.connected, "the watch to drop")
            modified = copy.deepcopy(self.server.objects["Pod"]["shop/db-0"])
            modified["metadata"]["labels"]["tier"] = "data"
            self.server.update(modified)
            self.server.delete("Pod", "shop/web-7d9c8b6f5d-q8wzn")
            self.server.create(pod("new", "10.244.5.5"))
            self.server.compact()
            self.server.refuse_watches = False
            events = await take(source.stream, 3)
            self.assertEqual(sorted(as_tuples(events)), [
                (ADDED, "Pod", "shop/new"),
                (DELETED, "Pod", "shop/web-7d9c8b6f5d-q8wzn"),
                (MODIFIED, "Pod", "shop/db-0"),
            ])
            deleted = next(e for e in events if e.type == DELETED)
            self.assertEqual(deleted.object["status"]["podIP"], "10.244.2.9")
            self.assertEqual(reflector.relists, 2)
            self.assertEqual(set(reflector.cache),
                             {"shop/db-0", "shop/web-7d9c8b6f5d-x2kqp", "shop/new"})
            await sleep(0.2)
            self.assertEqual(len(source.stream), 0)

        return Deferred.fromCoroutine(run())

    def test_gone_event_relists_with_synthesized_deletes(self) -> Deferred:
        return self._gone("event")

    def test_gone_status_relists_with_synthesized_deletes(self) -> Deferred:
        return self._gone("status")

    def test_bookmarks_carry_the_resume_point(self) -> Deferred:
        async def run() -> None:
            self.server.retained = 5
            source = self.start_source(idle_timeout=1.0)
            await self.sync(source)
            reflector = source.reflectors["Pod"]
            await wait_until(lambda: reflector.connected, "the pod watch")
            watches = reflector.watches
            # Namespaces change, pods do not: the pod watch sees only bookmarks.
            for i in range(20):
                self.server.create({"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": f"ns{i}"}})
            await take(source.stream, 20)
            await wait_until(lambda: reflector.resource_version == str(self.server.rv),
                             "a bookmark with the newest resourceVersion")
            # Bookmarks alone keep the connection from being idle.
            await sleep(1.5)
            self.assertEqual(reflector.watches, watches)
            # Without the bookmark's resourceVersion the resume would be 410 (the
            # window holds 5 changes); with it, no relist.
            resume_from = reflector.resource_version
            self.server.drop_watches()
            await wait_until(lambda: reflector.watches > watches and reflector.connected,
                             "the pod watch to come back")
            self.assertEqual(reflector.relists, 1)
            pod_watches = [r for r in self.server.requests
                           if r["path"] == "/api/v1/pods" and r["args"].get("watch")]
            self.assertEqual(pod_watches[-1]["args"]["resourceVersion"], resume_from)
            self.assertEqual(pod_watches[-1]["args"]["allowWatchBookmarks"], "true")
            self.server.create(pod("after-bookmark"))
            self.assertEqual(as_tuples([await next_item(source.stream)]),
                             [(ADDED, "Pod", "shop/after-bookmark")])

        return Deferred.fromCoroutine(run())

    def test_stalled_connection_is_reopened(self) -> Deferred:
        async def run() -> None:
            source = self.start_source(idle_timeout=0.5)
            await self.sync(source)
            reflector = source.reflectors["Pod"]
            await wait_until(lambda: reflector.connected, "the pod watch")
            watches = reflector.watches
            self.server.stall()
            self.server.create(pod("while-stalled"))
            events = await take(source.stream, 1)
            self.assertEqual(as_tuples(events), [(ADDED, "Pod", "shop/while-stalled")])
            self.assertGreater(reflector.watches, watches)
            self.assertEqual(reflector.relists, 1)

        return Deferred.fromCoroutine(run())

    def test_malformed_line_is_logged_and_skipped(self) -> Deferred:
        async def run() -> None:
            logged: List[dict] = []
            self.patch(Reflector, "log", Logger(observer=logged.append))
            source = self.start_source()
            await self.sync(source)
            await wait_until(lambda: all(r.connected for r in source.reflectors.values()),
                             "every watch")
            watches = source.reflectors["Pod"].watches
            self.server.send_garbage(b'{"type":"ADDED","object":{"kind":"Pod"\n')
            self.server.send_garbage(b"not json at all\n")
            self.server.create(pod("after-garbage"))
            events = await take(source.stream, 1)
            self.assertEqual(as_tuples(events), [(ADDED, "Pod", "shop/after-garbage")])
            # Skipped, not fatal: the same connection goes on.
            self.assertEqual(source.reflectors["Pod"].watches, watches)
            self.assertEqual(source.reflectors["Pod"].malformed, 2)
            pod_logs = [e for e in logged if e.get("kind") == "Pod"]
            self.assertEqual(len(pod_logs), 2)
            self.assertTrue(pod_logs[1]["prefix"].startswith(b"not json"))
            self.assertTrue(all(e["reason"] for e in pod_logs))

        return Deferred.fromCoroutine(run())

    def test_slow_consumer_bounds_the_queue(self) -> Deferred:
        async def run() -> None:
            source = self.start_source(maxsize=2)
            await self.sync(source)
            await wait_until(lambda: source.reflectors["Pod"].connected, "the pod watch")
            for i in range(300):
                self.server.create(pod(f"bulk{i}", f"10.245.{i // 250}.{i % 250}"))
            seen = []
            for i in range(300):
                self.assertLessEqual(len(source.stream), 2)
                seen.append((await next_item(source.stream)).key)
                if i % 50 == 0:
                    await sleep(0.05)
            self.assertEqual(seen, [f"shop/bulk{i}" for i in range(300)])

        return Deferred.fromCoroutine(run())

    # -- credentials

    def test_bearer_token_and_rotation(self) -> Deferred:
        async def run() -> None:
            url = self.server.listen_tcp()
            token_file = os.path.join(self.directory, "token")
            with open(token_file, "w") as f:
                f.write("first-token")
            kubeconfig = write_kubeconfig(os.path.join(self.directory, "config"), url,
                                          token_file=token_file)
            self.server.require_token("first-token")
            source = self.start_source(load_kubeconfig(kubeconfig))
            await self.sync(source)
            self.assertTrue(all(r["authorization"] == b"Bearer first-token"
                                for r in self.server.requests))
            await wait_until(lambda: source.reflectors["Pod"].connected, "the pod watch")
            # The token rotates: the file is rewritten and the server stops
            # taking the old one. Reconnecting watches hit 401 and re-read it.
            with open(token_file, "w") as f:
                f.write("second-token")
            self.server.rotate_token("second-token")
            self.server.drop_watches()
            self.server.create(pod("after-rotation"))
            events = await take(source.stream, 1)
            self.assertEqual(as_tuples(events), [(ADDED, "Pod", "shop/after-rotation")])
            await wait_until(lambda: all(r.connected for r in source.reflectors.values()),
                             "every watch to come back")
            # The reflectors reconnect side by side, so old-token requests may
            # interleave with retries; what matters is where each one ended.
            last = {}
            for request in self.server.requests:
                last[request["path"]] = request["authorization"]
            self.assertEqual(set(last.values()), {b"Bearer second-token"})
            self.assertEqual(len(last), 5)

        return Deferred.fromCoroutine(run())

    def test_tls_with_test_ca_and_client_certificate(self) -> Deferred:
        async def run() -> None:
            pki = make_test_pki(self.directory)
            url = self.server.listen_tls(pki)
            kubeconfig = write_kubeconfig(os.path.join(self.directory, "config"), url, pki=pki)
            config = load_kubeconfig(kubeconfig)
            self.assertTrue(config.uses_tls)
            source = self.start_source(config)
            await self.sync(source)
            await wait_until(lambda: source.reflectors["Pod"].connected, "the pod watch")
            self.server.create(pod("over-tls"))
            self.assertEqual(as_tuples([await next_item(source.stream)]),
                             [(ADDED, "Pod", "shop/over-tls")])

            # Without the client certificate the server refuses the handshake.
            anonymous = ApiConfig(server=url, ca_pem=config.ca_pem)
            refused = self.start_source(anonymous)
            await wait_until(lambda: refused.reflectors["Pod"].last_error,
                             "the anonymous client to fail")
            self.assertFalse(refused.synced)
            self.assertEqual(len(refused.stream), 0)

        return Deferred.fromCoroutine(run())
