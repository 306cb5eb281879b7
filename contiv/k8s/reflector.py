"""
Reflectors: keep a local copy of one kind of object in step with the API
server, and tell the event stream about every change.

A reflector LISTs (page by page), then WATCHes from the list's
resourceVersion, and resumes from the last resourceVersion it saw (bookmarks
included) whenever the watch ends or drops. When the server no longer has
that history (410 Gone) it lists again and emits the difference against its
cache, so a delete that happened while it was away is still reported.

L{ApiSource} runs one reflector per kind into one L{EventStream} and sends
L{Synced} once, after every kind has been listed: a consumer that acted on a
half-listed cluster would open or close traffic that it should not.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import Logger

from .apiconfig import ApiConfig
from .client import ApiClient, ApiError
from .events import ADDED, DELETED, MODIFIED, Event, EventStream, Synced, object_key

BOOKMARK = "BOOKMARK"
ERROR = "ERROR"

# How much of a malformed line goes into the log.
LINE_PREFIX = 120


@dataclass(frozen=True)
class Resource:
    """One kind that a reflector follows, and where the API serves it."""

    kind: str
    path: str
    api_version: str
    label_selector: Optional[str] = None


RESOURCES: Sequence[Resource] = (
    Resource("Namespace", "/api/v1/namespaces", "v1"),
    Resource("Pod", "/api/v1/pods", "v1"),
    Resource("NetworkPolicy", "/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1"),
    Resource("Service", "/api/v1/services", "v1"),
    # Only headless services need their endpoints (for DNS); the endpoint
    # slice controller labels their slices, so the server filters the rest.
    Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1",
             label_selector="service.kubernetes.io/headless"),
)


class Backoff:
    """
    Exponential backoff with jitter: each delay is drawn from the upper half
    of an interval that doubles up to C{maximum}, so that reflectors which
    failed together do not all come back together.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, *,
                 factor: float = 2.0, random: Callable[[], float] = random.random):
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._random = random
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** self.failures)
        self.failures += 1
        return ceiling / 2 + self._random() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0


class MalformedEvent(ValueError):
    """A watch line or list item that is not a usable Kubernetes event."""


def _metadata(obj: Any, named: bool = True) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise MalformedEvent("object is not a JSON object")
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        raise MalformedEvent("object has no metadata")
    if named and (not isinstance(metadata.get("name"), str) or not metadata["name"]):
        raise MalformedEvent("object has no metadata.name")
    if not isinstance(metadata.get("resourceVersion"), str) or not metadata["resourceVersion"]:
        raise MalformedEvent("object has no metadata.resourceVersion")
    return metadata


class Reflector:
    """
    The cache of one kind (C{key -> object}) and the loop that keeps it
    current. Events go to C{stream}; C{listed} fires once the first LIST has
    been emitted completely.
    """

    log = Logger()

    def __init__(self, client: ApiClient, resource: Resource, stream: EventStream, clock: Any, *,
                 watch_timeout: int = 300, idle_timeout: Optional[float] = 120.0,
                 backoff: Optional[Backoff] = None, page_size: int = 500):
        self.client = client
        self.resource = resource
        self.kind = resource.kind
        self.stream = stream
        self.clock = clock
        self.watch_timeout = watch_timeout
        self.idle_timeout = idle_timeout
        self.backoff = backoff if backoff is not None else Backoff()
        self.page_size = page_size
        self.cache: Dict[str, Mapping[str, Any]] = {}
        self.resource_version: Optional[str] = None
        self.listed: Deferred = Deferred()
        self.connected = False
        self.last_error: Optional[str] = None
        self.malformed = 0
        self.relists = 0
        self.watches = 0
        self._loop: Optional[Deferred] = None
        self._stopping = False
        self._ended = False
        self._stop_waiters: list = []

    # -- applying changes (pure: no I/O, used by the watch and the benchmark)

    def apply(self, type_: str, obj: Mapping[str, Any]) -> Optional[Event]:
        """
        Put one change into the cache; returns the event to emit, or None
        when nothing changed for the consumer (a repeat, or a delete of an
        object it never saw). Types are normalised against the cache, so the
        consumer sees ADDED, MODIFIED*, DELETED for every object.
        """
        key = object_key(obj)
        old = self.cache.get(key)
        if type_ == DELETED:
            if old is None:
                return None
            del self.cache[key]
            return Event(DELETED, self.kind, key, obj)
        self.cache[key] = obj
        if old is None:
            return Event(ADDED, self.kind, key, obj)
        if old["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]:
            return None
        return Event(MODIFIED, self.kind, key, obj)

    def handle_line(self, line: bytes) -> Optional[Deferred]:
        """
        One watch line: apply it and queue its event. Returns a Deferred only
        when the stream is full, so that the caller pauses its connection.
        Raises L{ApiError} for an ERROR event (410 Gone among them).
        """
        try:
            event = json.loads(line)
            if not isinstance(event, dict):
                raise MalformedEvent("line is not a JSON object")
            type_ = event.get("type")
            obj = event.get("object")
            if type_ == ERROR:
                raise ApiError.from_status(obj, 500, self.resource.path)
            # A bookmark's object carries only a resourceVersion.
            metadata = _metadata(obj, named=type_ != BOOKMARK)
            if type_ not in (ADDED, MODIFIED, DELETED, BOOKMARK):
                raise MalformedEvent(f"unknown event type {type_!r}")
        except (ValueError, UnicodeDecodeError) as error:
            self._malformed(line, str(error))
            return None
        if type_ == BOOKMARK:
            self.resource_version = metadata["resourceVersion"]
            return None
        kind = obj.get("kind")
        if kind is not None and kind != self.kind:
            self._malformed(line, f"object of kind {kind!r} in a watch of {self.kind}")
            return None
        emitted = self.apply(type_, obj)
        self.resource_version = metadata["resourceVersion"]
        if emitted is None:
            return None
        waiting = self.stream.put(emitted)
        return None if waiting.called else waiting

    def _malformed(self, line: bytes, reason: str) -> None:
        self.malformed += 1
        self.log.warn("malformed watch event for {kind} skipped: {reason}; line starts {prefix!r}",
                      kind=self.kind, reason=reason, prefix=line[:LINE_PREFIX])

    # -- the list+watch loop

    def start(self) -> None:
        if self._loop is None:
            self._loop = Deferred.fromCoroutine(self._run())
            # Added after the fact: the loop may already have ended if the
            # consumer stopped us during the first, synchronous, steps.
            self._loop.addErrback(self._loop_failed).addBoth(self._loop_ended)

    def _loop_failed(self, failure: Any) -> None:
        if not failure.check(CancelledError):
            self.log.failure("reflector for {kind} ended", failure, kind=self.kind)

    def _loop_ended(self, _: Any) -> None:
        self._ended = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def stop(self) -> Deferred:
        """Cancel the loop (its request, its wait, its put); fires when it has ended."""
        self._stopping = True
        if self._loop is None or self._ended:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._stop_waiters.append(waiter)
        self._loop.cancel()
        return waiter

    def _check_stopping(self) -> None:
        """
        C{EventStream.put} runs the consumer before it returns, and the
        consumer may stop us then: our coroutine is running, not waiting, so
        the cancel has nothing to cancel. Every step checks before it starts.
        """
        if self._stopping:
            raise CancelledError()

    async def _run(self) -> None:
        gone_in_a_row = 0
        while True:
            try:
                self._check_stopping()
                if self.resource_version is None:
                    await self._relist()
                    self.backoff.reset()
                    if not self.listed.called:
                        self.listed.callback(self)
                    self._check_stopping()
                lines = await self._watch()
                self.last_error = None
                gone_in_a_row = 0
                if lines:
                    self.backoff.reset()
                continue
            except CancelledError:
                raise
            except ApiError as error:
                self.connected = False
                self.last_error = str(error)
                if error.gone:
                    self.log.info("history of {kind} expired at resourceVersion {rv}; listing again",
                                  kind=self.kind, rv=self.resource_version)
                    self.resource_version = None
                    gone_in_a_row += 1
                    # A relist straight after 410 is what the server asks for;
                    # only a server that keeps saying it gets backoff.
                    if gone_in_a_row == 1:
                        continue
                else:
                    self.log.warn("watch of {kind} failed: {error}", kind=self.kind, error=error)
            except Exception as error:
                self.connected = False
                self.last_error = f"{type(error).__name__}: {error}"
                self.log.warn("watch of {kind} failed: {error}", kind=self.kind,
                              error=self.last_error)
            # Cancelling a request can surface as its own error type.
            self._check_stopping()
            delay = self.backoff.next()
            await task.deferLater(self.clock, delay, lambda: None)

    async def _relist(self) -> None:
        """
        LIST every page and emit the difference against the cache: the
        cache may hold objects from before a 410 that are gone by now.
        """
        self.relists += 1
        seen: set = set()
        continue_: Optional[str] = None
        resource_version: Optional[str] = None
        while True:
            self._check_stopping()
            try:
                page = await self.client.list(
                    self.resource.path, limit=self.page_size, continue_=continue_,
                    label_selector=self.resource.label_selector)
            except ApiError as error:
                if error.gone and continue_ is not None:
                    # The continue token outlived the server's snapshot (a
                    # slow consumer); a fresh list is the only way on.
                    self.log.info("list of {kind} expired between pages; starting over",
                                  kind=self.kind)
                    seen = set()
                    continue_ = None
                    continue
                raise
            metadata = page.get("metadata") or {}
            for item in page.get("items") or ():
                try:
                    _metadata(item)
                except MalformedEvent as error:
                    self._malformed(json.dumps(item)[:LINE_PREFIX].encode(), str(error))
                    continue
                # List items omit these; watch objects and kubectl carry them.
                item.setdefault("kind", self.kind)
                item.setdefault("apiVersion", self.resource.api_version)
                seen.add(object_key(item))
                emitted = self.apply(ADDED, item)
                if emitted is not None:
                    await self.stream.put(emitted)
                    self._check_stopping()
            resource_version = metadata.get("resourceVersion") or resource_version
            continue_ = metadata.get("continue") or None
            if continue_ is None:
                break
        for key in [key for key in self.cache if key not in seen]:
            emitted = self.apply(DELETED, self.cache[key])
            if emitted is not None:
                await self.stream.put(emitted)
                self._check_stopping()
        if not resource_version:
            raise ApiError(200, "BadBody", "LIST has no metadata.resourceVersion",
                           self.resource.path)
        self.resource_version = resource_version

    async def _watch(self) -> int:
        self.watches += 1

        def connected() -> None:
            self.connected = True

        try:
            return await self.client.watch(
                self.resource.path,
                resource_version=self.resource_version,
                on_line=self.handle_line,
                timeout_seconds=self.watch_timeout,
                idle_timeout=self.idle_timeout,
                label_selector=self.resource.label_selector,
                on_connected=connected,
            )
        finally:
            self.connected = False

    def status(self) -> dict:
        return {
            "resourceVersion": self.resource_version,
            "cached": len(self.cache),
            "listed": self.listed.called,
            "connected": self.connected,
            "lastError": self.last_error,
            "malformed": self.malformed,
            "relists": self.relists,
        }


class ApiSource:
    """
    The cluster as seen through the API server: one reflector per kind, all
    feeding C{stream}, and one L{Synced} once every kind has been listed.
    """

    log = Logger()

    def __init__(self, reactor: Any, api_config: ApiConfig, stream: EventStream, *,
                 watch_timeout: int = 300, idle_timeout: Optional[float] = 120.0,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, page_size: int = 500,
                 resources: Sequence[Resource] = RESOURCES, client: Any = None,
                 clock: Any = None):
        self.stream = stream
        self.synced = False
        self._clock = clock if clock is not None else reactor
        self._own_client = client is None
        self.client = client if client is not None else ApiClient(reactor, api_config)
        self.reflectors: Dict[str, Reflector] = {
            resource.kind: Reflector(
                self.client, resource, stream, self._clock,
                watch_timeout=watch_timeout, idle_timeout=idle_timeout,
                backoff=Backoff(backoff_initial, backoff_max), page_size=page_size)
            for resource in resources
        }
        self._synced_put: Optional[Deferred] = None
        self._unlisted = len(self.reflectors)
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for reflector in self.reflectors.values():
            reflector.listed.addCallback(self._listed)
            reflector.start()

    def _listed(self, reflector: Reflector) -> Reflector:
        self._unlisted -= 1
        if self._unlisted == 0:
            self.synced = True
            self.log.info("every kind listed: {counts}",
                          counts={kind: len(r.cache) for kind, r in self.reflectors.items()})
            # Queued behind every reflector's initial events, which were all
            # put before their reflector counted as listed.
            self._synced_put = self.stream.put(Synced())
            self._synced_put.addErrback(lambda failure: failure.trap(CancelledError))
        return reflector

    async def _stop(self) -> None:
        if self._synced_put is not None and not self._synced_put.called:
            self._synced_put.cancel()
        await DeferredList([r.stop() for r in self.reflectors.values()])
        if self._own_client:
            await self.client.close()

    def stop(self) -> Deferred:
        """Stop every reflector and close the connections; fires when all are closed."""
        return Deferred.fromCoroutine(self._stop())

    def status(self) -> dict:
        return {
            "synced": self.synced,
            "kinds": {kind: r.status() for kind, r in self.reflectors.items()},
        }
