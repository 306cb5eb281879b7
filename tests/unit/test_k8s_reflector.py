"""Reflector and ApiSource against a scripted client, on a task.Clock."""

from __future__ import annotations

import json
from typing import Dict, List

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from contiv.k8s.client import ApiError
from contiv.k8s.events import ADDED, DELETED, MODIFIED, EventStream, Synced
from contiv.k8s.reflector import RESOURCES, ApiSource, Backoff, Reflector, Resource

POD = Resource("Pod", "/api/v1/pods", "v1")


def pod(name: str, rv: str, ip: str = "10.0.0.1") -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
            "status": {"podIP": ip}}


def line(type_: str, obj: dict) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode()


class ScriptedClient:
    """Lists come from C{pages[path]}; watches wait until the test ends them."""

    def __init__(self) -> None:
        self.pages: Dict[str, List[dict]] = {}
        self.list_calls: List[tuple] = []
        self.watch_calls: List[dict] = []
        self.watches: List[Deferred] = []
        self.blocked: Dict[str, Deferred] = {}

    async def list(self, path, *, limit=None, continue_=None, label_selector=None,
                   resource_version=None):
        self.list_calls.append((path, continue_))
        if path in self.blocked:
            await self.blocked[path]
        pages = self.pages[path]
        index = int(continue_ or 0)
        page = dict(pages[index])
        page["metadata"] = dict(page.get("metadata", {}))
        if index + 1 < len(pages):
            page["metadata"]["continue"] = str(index + 1)
        return page

    async def watch(self, path, *, resource_version, on_line, **options):
        self.watch_calls.append({"path": path, "rv": resource_version, "on_line": on_line})
        d = Deferred()
        self.watches.append(d)
        return await d


def items_page(rv: str, *objs: dict) -> dict:
    return {"metadata": {"resourceVersion": rv}, "items": [json.loads(json.dumps(o)) for o in objs]}


def drain(stream: EventStream) -> list:
    out = []
    while len(stream):
        stream.get().addCallback(out.append)
    return out


def test_backoff_grows_with_jitter_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(1.0, 8.0, random=lambda: 1.0)
    assert [backoff.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.next() == 1.0
    low = Backoff(1.0, 8.0, random=lambda: 0.0)
    assert [low.next() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_watch_lines_update_the_cache_and_normalise_types() -> None:
    stream = EventStream()
    reflector = Reflector(ScriptedClient(), POD, stream, task.Clock())
    assert reflector.handle_line(line("ADDED", pod("a", "5"))) is None
    reflector.handle_line(line("ADDED", pod("a", "5")))  # a repeat: nothing new
    reflector.handle_line(line("ADDED", pod("a", "6", "10.0.0.2")))  # seen: a change
    reflector.handle_line(line("MODIFIED", pod("b", "7")))  # unseen: an add
    reflector.handle_line(line("DELETED", pod("c", "8")))  # never seen: nothing
    reflector.handle_line(line("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "9"}}))
    reflector.handle_line(line("DELETED", pod("a", "10")))
    got = [(e.type, e.key) for e in drain(stream)]
    assert got == [(ADDED, "ns/a"), (MODIFIED, "ns/a"), (ADDED, "ns/b"), (DELETED, "ns/a")]
    assert reflector.resource_version == "10"
    assert set(reflector.cache) == {"ns/b"}


def test_an_error_event_with_410_is_gone() -> None:
    reflector = Reflector(ScriptedClient(), POD, EventStream(), task.Clock())
    with pytest.raises(ApiError) as raised:
        reflector.handle_line(line("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"}))
    assert raised.value.gone


def test_malformed_lines_are_logged_with_named_fields_and_skipped() -> None:
    logged = []
    stream = EventStream()
    reflector = Reflector(ScriptedClient(), POD, stream, task.Clock())
    reflector.log = Logger(observer=logged.append)
    for bad in (b"{not json", b"[1,2]", line("ADDED", {"metadata": {}}),
                line("SURPRISE", pod("a", "1")), line("ADDED", dict(pod("a", "1"), kind="Service"))):
        assert reflector.handle_line(bad) is None
    assert len(stream) == 0
    assert reflector.malformed == 5
    assert all(e["kind"] == "Pod" and e["reason"] and isinstance(e["prefix"], bytes)
               for e in logged)


def test_a_full_stream_makes_the_caller_wait() -> None:
    stream = EventStream(maxsize=1)
    reflector = Reflector(ScriptedClient(), POD, stream, task.Clock())
    assert reflector.handle_line(line("ADDED", pod("a", "1"))) is None
    waiting = reflector.handle_line(line("ADDED", pod("b", "2")))
    assert waiting is not None and not waiting.called
    stream.get()
    assert waiting.called


def test_relist_after_gone_emits_the_difference() -> None:
    clock = task.Clock()
    client = ScriptedClient()
    client.pages[POD.path] = [items_page("10", pod("a", "1"), pod("b", "2")),
                              items_page("10", pod("c", "3"))]
    stream = EventStream()
    reflector = Reflector(client, POD, stream, clock, backoff=Backoff(1, 4))
    reflector.start()
    first = drain(stream)
    assert [(e.type, e.key) for e in first] == [(ADDED, "ns/a"), (ADDED, "ns/b"), (ADDED, "ns/c")]
    assert all(e.object["kind"] == "Pod" and e.object["apiVersion"] == "v1" for e in first)
    assert reflector.listed.called and reflector.resource_version == "10"
    assert client.list_calls == [(POD.path, None), (POD.path, "1")]
    assert client.watch_calls[-1]["rv"] == "10"

    # The watch says 410: the reflector lists again straight away.
    client.pages[POD.path] = [items_page("20", pod("a", "1"), pod("c", "15"), pod("d", "16"))]
    client.watches[-1].errback(ApiError(410, "Expired", "too old", POD.path))
    got = [(e.type, e.key) for e in drain(stream)]
    assert got == [(MODIFIED, "ns/c"), (ADDED, "ns/d"), (DELETED, "ns/b")]
    assert reflector.relists == 2
    assert client.watch_calls[-1]["rv"] == "20"
    reflector.stop()
    assert clock.getDelayedCalls() == []


def test_a_dropped_watch_resumes_after_backoff_from_the_last_resource_version() -> None:
    clock = task.Clock()
    client = ScriptedClient()
    client.pages[POD.path] = [items_page("10")]
    reflector = Reflector(client, POD, EventStream(), clock,
                          backoff=Backoff(1, 4, random=lambda: 1.0))
    reflector.start()
    client.watch_calls[-1]["on_line"](line("ADDED", pod("a", "11")))
    client.watches[-1].errback(ConnectionError("reset"))
    assert len(client.watch_calls) == 1
    assert "reset" in reflector.status()["lastError"]
    clock.advance(1)
    assert client.watch_calls[-1]["rv"] == "11"
    client.watches[-1].errback(ConnectionError("reset again"))
    clock.advance(1)
    assert len(client.watch_calls) == 2  # the second delay is longer
    clock.advance(1)
    assert len(client.watch_calls) == 3
    # A watch that ends at its timeout is renewed at once.
    client.watches[-1].callback(5)
    assert len(client.watch_calls) == 4
    assert reflector.relists == 1
    stopped = reflector.stop()
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_api_source_sends_one_synced_after_every_kind_listed() -> None:
    clock = task.Clock()
    client = ScriptedClient()
    for resource in RESOURCES:
        client.pages[resource.path] = [items_page("5")]
    client.pages["/api/v1/namespaces"] = [items_page("5", {"metadata": {
        "name": "shop", "resourceVersion": "3"}})]
    client.blocked["/api/v1/services"] = Deferred()
    stream = EventStream()
    source = ApiSource(None, None, stream, client=client, clock=clock)
    source.start()
    assert [(e.type, e.key) for e in drain(stream)] == [(ADDED, "shop")]
    assert not source.synced
    assert source.status()["kinds"]["Service"]["listed"] is False
    client.blocked.pop("/api/v1/services").callback(None)
    assert drain(stream) == [Synced()]
    assert source.synced
    status = source.status()
    json.dumps(status)
    assert status["kinds"]["Namespace"] == {
        "resourceVersion": "5", "cached": 1, "listed": True, "connected": False,
        "lastError": None, "malformed": 0, "relists": 1}
    # Later relists do not send another.
    client.watches[0].errback(ApiError(410, "Expired", "", "/api/v1/namespaces"))
    assert drain(stream) == []
    stopped = source.stop()
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_stop_from_inside_the_consumer_stops_the_reflector() -> None:
    clock = task.Clock()
    client = ScriptedClient()
    client.pages[POD.path] = [items_page("10", pod("a", "1"), pod("b", "2"))]
    stream = EventStream()
    reflector = Reflector(client, POD, stream, clock)
    stops = []
    stream.get().addCallback(lambda _: stops.append(reflector.stop()))
    reflector.start()
    assert stops and stops[0].called
    assert client.watch_calls == []
