"""
The event stream that every cluster source feeds and netmaster consumes.

A source turns what it learns (API watch events, manifest files) into
L{Event}s and puts them into an L{EventStream}. The stream is bounded: a
producer awaits C{put()} and, while the consumer lags, stops reading from its
connection or directory, so the consumer's speed bounds memory and not the
server's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Mapping

from twisted.internet.defer import CancelledError, Deferred, succeed

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"
EVENT_TYPES = (ADDED, MODIFIED, DELETED)

# The kinds netmaster follows; a source ignores every other kind.
KINDS = ("Namespace", "Pod", "NetworkPolicy", "Service", "EndpointSlice")


def object_key(obj: Mapping[str, Any]) -> str:
    """C{namespace/name} for namespaced objects, C{name} for cluster-scoped ones."""
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace")
    name = metadata["name"]
    return f"{namespace}/{name}" if namespace else name


@dataclass(frozen=True)
class Event:
    """One change to one object: C{object} is its Kubernetes JSON as a dict."""

    type: str
    kind: str
    key: str
    object: Mapping[str, Any]


@dataclass(frozen=True)
class Synced:
    """
    Every kind has been listed once: the consumer now holds a complete picture
    of the cluster and may act on it. A source sends this exactly once per
    stream, after the initial events.
    """


class StreamClosed(Exception):
    """The stream was closed; no more events will come."""


class EventStream:
    """
    A bounded first-in first-out queue of events with backpressure.

    C{put()} returns a Deferred that fires once the item is queued (at once
    while there is room); C{get()} returns a Deferred for the next item. It is
    also an async iterator, ending when the stream is closed and drained.
    """

    def __init__(self, maxsize: int = 1024):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._items: Deque[Any] = deque()
        self._getters: Deque[Deferred] = deque()
        self._putters: Deque[tuple[Deferred, Any]] = deque()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> Deferred:
        if self.closed:
            raise StreamClosed("put() on a closed event stream")
        if self._getters:
            self._getters.popleft().callback(item)
            return succeed(None)
        if len(self._items) < self.maxsize:
            self._items.append(item)
            return succeed(None)

        def forget(d: Deferred) -> None:
            self._putters = deque(p for p in self._putters if p[0] is not d)

        waiting: Deferred = Deferred(forget)
        self._putters.append((waiting, item))
        return waiting

    def get(self) -> Deferred:
        if self._items:
            item = self._items.popleft()
            if self._putters:
                waiting, pending = self._putters.popleft()
                self._items.append(pending)
                waiting.callback(None)
            return succeed(item)
        if self.closed:
            return _failed(StreamClosed("the event stream is closed"))

        def forget(d: Deferred) -> None:
            try:
                self._getters.remove(d)
            except ValueError:
                pass

        waiting: Deferred = Deferred(forget)
        self._getters.append(waiting)
        return waiting

    def close(self) -> None:
        """No more puts; readers drain what is queued, then stop."""
        if self.closed:
            return
        self.closed = True
        while self._getters:
            self._getters.popleft().errback(StreamClosed("the event stream is closed"))
        while self._putters:
            self._putters.popleft()[0].errback(CancelledError())

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.get()
        except StreamClosed:
            raise StopAsyncIteration from None


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
