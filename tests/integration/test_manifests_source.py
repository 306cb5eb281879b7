"""
The manifests source on the real reactor and a real directory: files created,
edited, renamed over, deleted and broken while it watches, with inotify and
with polling.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import deferLater
from twisted.trial import unittest

from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event, EventStream, Synced
from contiv.k8s.manifests import ManifestsSource

pytestmark = pytest.mark.integration

# Every wait ends: a missing event fails the test instead of hanging it.
WAIT = 5


def pods(*names: str, **labels: str) -> str:
    documents = []
    for name in names:
        label_text = "".join(f"\n    {k}: {v}" for k, v in labels.items())
        documents.append(
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n"
            f"  namespace: default\n  labels:{label_text or ' {}'}\n"
        )
    return "---\n".join(documents)


class ManifestsSourceTests(unittest.TestCase):
    use_inotify = True

    def setUp(self) -> None:
        # Not trial's mktemp(): under pytest it would write into the checkout.
        self.directory = tempfile.mkdtemp(prefix="contiv-manifests-")
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.stream = EventStream()
        self.source = ManifestsSource(
            reactor,
            self.directory,
            self.stream,
            poll_interval=0.1,
            use_inotify=self.use_inotify,
        )

    def start(self) -> None:
        self.source.start()
        self.addCleanup(self.source.stop)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def write(self, name: str, text: str) -> None:
        with open(self.path(name), "w") as f:
            f.write(text)

    def replace(self, name: str, text: str) -> None:
        """Write the way editors and kubectl-style tools do: a temp file, renamed over."""
        temporary = self.path(f".{name}.tmp")
        with open(temporary, "w") as f:
            f.write(text)
        os.rename(temporary, self.path(name))

    def next_item(self) -> Deferred:
        return self.stream.get().addTimeout(WAIT, reactor)

    async def next_event(self) -> Event:
        item = await self.next_item()
        self.assertIsInstance(item, Event)
        return item

    async def initial_sync(self) -> list:
        self.start()
        events = []
        while True:
            item = await self.next_item()
            if isinstance(item, Synced):
                break
            events.append(item)
        self.assertTrue(self.source.synced)
        return events

    async def quiet(self, seconds: float = 0.5) -> None:
        """Nothing arrives for a while: only ever used to check for absence."""
        try:
            item = await self.stream.get().addTimeout(seconds, reactor)
        except TimeoutError:
            return
        self.fail(f"unexpected {item!r}")

    async def errors_of(self, name: str, contains: str) -> list:
        """The file's errors in status(), once one of them mentions C{contains}."""
        for _ in range(int(WAIT / 0.02)):
            errors = self.source.status()["errors"].get(name, [])
            if any(contains in error for error in errors):
                return errors
            await deferLater(reactor, 0.02)
        self.fail(f"no error about {contains!r} for {name} in {self.source.status()}")

    async def test_initial_sync_emits_every_object_then_synced(self) -> None:
        self.write("a.yaml", pods("a-1", "a-2"))
        self.write(
            "b.json",
            '{"kind": "List", "items": [{"kind": "Namespace", "metadata": {"name": "prod"}}]}',
        )
        self.write("ignored.txt", pods("nope"))
        events = await self.initial_sync()
        self.assertEqual(
            sorted((e.type, e.kind, e.key) for e in events),
            [
                (ADDED, "Namespace", "prod"),
                (ADDED, "Pod", "default/a-1"),
                (ADDED, "Pod", "default/a-2"),
            ],
        )
        status = self.source.status()
        self.assertEqual(status["files"], ["a.yaml", "b.json"])
        self.assertEqual(status["objects"], 3)
        self.assertEqual(status["errors"], {})

    async def test_create_modify_rename_over_delete(self) -> None:
        self.write("keep.yaml", pods("keep"))
        await self.initial_sync()

        self.write("web.yaml", pods("web-1", app="web"))
        event = await self.next_event()
        self.assertEqual((event.type, event.key), (ADDED, "default/web-1"))
        self.assertEqual(event.object["metadata"]["labels"], {"app": "web"})

        self.write("web.yaml", pods("web-1", app="web", tier="front"))
        event = await self.next_event()
        self.assertEqual((event.type, event.key), (MODIFIED, "default/web-1"))
        self.assertEqual(event.object["metadata"]["labels"], {"app": "web", "tier": "front"})

        self.replace("web.yaml", pods("web-1", app="web2"))
        event = await self.next_event()
        self.assertEqual((event.type, event.key), (MODIFIED, "default/web-1"))
        self.assertEqual(event.object["metadata"]["labels"], {"app": "web2"})

        os.remove(self.path("web.yaml"))
        event = await self.next_event()
        self.assertEqual((event.type, event.key), (DELETED, "default/web-1"))
        self.assertEqual(self.source.status()["files"], ["keep.yaml"])
        await self.quiet()

    async def test_broken_file_keeps_its_objects_and_others_still_flow(self) -> None:
        self.write("a.yaml", pods("a-1", "a-2", app="a"))
        self.write("b.yaml", pods("b-1"))
        await self.initial_sync()

        self.write("a.yaml", pods("a-1", app="changed") + "---\nkind: Pod\nmetadata: {labels: {}}\n")
        # The other file's change still arrives, and nothing of a.yaml comes first.
        self.write("b.yaml", pods("b-1", app="b"))
        event = await self.next_event()
        self.assertEqual((event.type, event.key), (MODIFIED, "default/b-1"))
        status = self.source.status()
        self.assertEqual(status["errors"], {"a.yaml": ["a.yaml document 1: metadata.name is missing"]})
        self.assertEqual(status["objects"], 3)

        self.write("a.yaml", "kind: Pod\nmetadata: {name: a-1\n")
        [error] = await self.errors_of("a.yaml", "not valid YAML")
        self.assertTrue(error.startswith("a.yaml document 0: not valid YAML: line "), error)
        await self.quiet()

        # Fixed: the difference from the last good content arrives.
        self.write("a.yaml", pods("a-1", app="a", fixed="yes"))
        first = await self.next_event()
        second = await self.next_event()
        self.assertEqual(
            [(first.type, first.key), (second.type, second.key)],
            [(MODIFIED, "default/a-1"), (DELETED, "default/a-2")],
        )
        self.assertEqual(self.source.status()["errors"], {})

    async def test_removed_broken_file_deletes_its_last_good_objects(self) -> None:
        self.write("a.yaml", pods("a-1"))
        await self.initial_sync()
        self.write("a.yaml", "{{{ not yaml")
        await self.errors_of("a.yaml", "not valid YAML")
        await self.quiet()
        os.remove(self.path("a.yaml"))
        event = await self.next_event()
        self.assertEqual((event.type, event.key), (DELETED, "default/a-1"))
        self.assertEqual(self.source.status()["errors"], {})

    async def test_watch_mode(self) -> None:
        await self.initial_sync()
        expected = "inotify" if self.use_inotify else "polling"
        self.assertEqual(self.source.status()["watch"], expected)


class PollingManifestsSourceTests(ManifestsSourceTests):
    """The same behaviour with inotify turned off."""

    use_inotify = False
