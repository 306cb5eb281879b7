"""
The netmaster role: follows the cluster through a source, compiles it with
the policy engine, and publishes the result into the store.

Nothing is published before the source's initial list is complete: a
half-seen cluster would open or close traffic it should not. After that,
every burst of events becomes one publish (the engine's changes since the
previous one), and a periodic check republishes everything when the store
lost its data (the epoch key is gone, or entries were evicted).

With leader election (L{contiv.k8s.lease}), any number of netmasters run and
one publishes. A standby follows the cluster and compiles exactly as the
leader does, so its cache is warm, but writes nothing: its publisher sits
behind a gate that refuses writes unless this netmaster leads. On becoming
the leader it adopts what the store holds and publishes everything, with a
generation above the store's; on losing the Lease it cancels any publish in
flight and closes the gate before anyone else may take over.
"""

from __future__ import annotations

import gc
from typing import Any, Optional

from prometheus_client import Counter, Gauge, Histogram
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from contiv.dns.names import NameIndex
from contiv.k8s.events import DELETED, Event, EventStream, Synced
from contiv.metrics import REGISTRY
from contiv.policy.engine import PolicyEngine
from contiv.store.layout import Publisher

EVENTS = Counter("contiv_netmaster_events", "cluster events applied, by kind",
                 ["kind"], registry=REGISTRY)
PUBLISHES = Counter("contiv_netmaster_publishes", "publishes to the store, by result",
                    ["result"], registry=REGISTRY)
PUBLISH_SECONDS = Histogram("contiv_netmaster_publish_seconds",
                            "time from the first unpublished event to its generation "
                            "being in the store",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                     0.5, 1, 2.5, 5, 10), registry=REGISTRY)
INVALID = Gauge("contiv_netmaster_invalid_objects",
                "objects that failed validation (their last valid version is in force)",
                registry=REGISTRY)


class NotLeading(Exception):
    """A store write refused because this netmaster does not hold the Lease."""


class _LeaderGate:
    """
    The store as a standby's publisher sees it: reads pass, writes are
    refused while C{is_open()} is false. A publish that was already running
    when leadership ended cannot put another write into the store.
    """

    def __init__(self, store: Any, is_open: Any):
        self._store = store
        self._is_open = is_open

    def _write(self, method: str, *args: Any) -> Deferred:
        if not self._is_open():
            return fail(NotLeading(f"{method} refused: this netmaster is not the leader"))
        return getattr(self._store, method)(*args)

    def get_many(self, keys: Any) -> Deferred:
        return self._store.get_many(keys)

    def set_many(self, items: Any) -> Deferred:
        return self._write("set_many", items)

    def add(self, key: str, value: bytes) -> Deferred:
        return self._write("add", key, value)

    def delete_many(self, keys: Any) -> Deferred:
        return self._write("delete_many", keys)

    def incr(self, key: str) -> Deferred:
        return self._write("incr", key)


class NetmasterService(Service):
    name = "netmaster"
    log = Logger()

    def __init__(self, source: Any, stream: EventStream, store: Any, *, clock: Any,
                 prefix: str = "contiv/", publish_delay: float = 0.005,
                 check_interval: float = 1.0, audit_interval: float = 30.0,
                 grace_period: float = 60.0, retry_delay: float = 1.0,
                 elector: Any = None):
        self.source = source
        self.stream = stream
        self.store = store
        self.clock = clock
        self.engine = PolicyEngine()
        self.names = NameIndex()
        # Without an elector this netmaster is the only one, and always active.
        self.elector = elector
        self.active = elector is None
        if elector is not None:
            elector.on_started_leading = self._start_leading
            elector.on_stopped_leading = self._stop_leading
            store = _LeaderGate(store, lambda: self.active)
        self.publisher = Publisher(store, prefix=prefix, clock=clock,
                                   grace_period=grace_period)
        self.publish_delay = publish_delay
        self.audit_interval = audit_interval
        self.retry_delay = retry_delay
        self.synced = False
        self.events_seen = 0
        self.published_generation: Optional[int] = None
        self.last_error: Optional[str] = None
        # events applied to the engine since the last successful publish took
        # its changes; readiness needs it to be zero.
        self._unpublished = 0
        self._unpublished_since: Optional[float] = None
        self._need_full = True
        self._scheduled: Any = None
        self._publishing: Optional[Deferred] = None
        self._again = False
        self._last_audit = 0.0
        self._consuming: Optional[Deferred] = None
        self._checker = LoopingCall(self._check)
        self._checker.clock = clock
        self._check_interval = check_interval
        self._stopping = False
        # kind -> keys of the objects seen, for status reports
        self._objects: dict[str, set[str]] = {}
        self._heap_frozen = False

    # -- lifecycle

    def startService(self) -> Deferred:
        super().startService()
        self._stopping = False
        self.source.start()
        self._consuming = Deferred.fromCoroutine(self._consume())
        self._consuming.addErrback(
            lambda f: self.log.failure("netmaster stopped consuming cluster events", f))
        self._checker.start(self._check_interval, now=False)
        return succeed(None)

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._checker.running:
            self._checker.stop()
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        if self.elector is not None:
            # The last publish completes, then the Lease is released: a
            # standby that takes it at once finds a consistent store.
            if self._publishing is not None:
                await self._publishing
            await self.elector.stop()
        await self.source.stop()
        self.stream.close()
        if self._consuming is not None:
            await self._consuming
        if self._publishing is not None:
            await self._publishing

    # -- following the cluster

    async def _consume(self) -> None:
        async for item in self.stream:
            if isinstance(item, Synced):
                self.synced = True
                self.log.info("netmaster has the whole cluster: {counts}",
                              counts=self.counts())
                if self.elector is not None and not self._stopping:
                    # Only now: a leader that has not listed everything would
                    # hold the Lease while it cannot publish.
                    self.elector.start()
                self._schedule()
            elif isinstance(item, Event):
                self.apply(item)

    def apply(self, event: Event) -> None:
        self.events_seen += 1
        EVENTS.labels(event.kind).inc()
        self.engine.apply(event)
        self.names.apply(event)
        keys = self._objects.setdefault(event.kind, set())
        if event.type == DELETED:
            keys.discard(event.key)
        else:
            keys.add(event.key)
        if self._unpublished == 0:
            self._unpublished_since = self.clock.seconds()
        self._unpublished += 1
        INVALID.set(len(self.engine.errors) + len(self.names.errors))
        if self.synced:
            self._schedule()

    def counts(self) -> dict[str, int]:
        return {kind: len(keys) for kind, keys in sorted(self._objects.items()) if keys}

    # -- leadership

    def _start_leading(self) -> None:
        """The Lease is ours: adopt the store and publish everything."""
        self.log.info("netmaster is the leader: publishing everything it has compiled")
        self.active = True
        # Whatever this publisher believed it wrote, another leader may have
        # rewritten since: a full publish after adopting the store's root.
        self._need_full = True
        self.published_generation = None
        self.last_error = None
        if self._unpublished:
            self._unpublished_since = self.clock.seconds()
        self._schedule(0)

    def _stop_leading(self, why: str) -> None:
        """The Lease is lost (or released): not one more write."""
        if not self.active:
            return
        self.active = False
        self.log.info("netmaster stops publishing ({why})", why=why)
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        if self._publishing is not None:
            self._publishing.cancel()
        self.published_generation = None
        self.last_error = None

    # -- publishing

    def republish(self) -> bool:
        """
        Publish everything again, at once (an operator who distrusts the
        store, from the manhole). False on a standby: only the leader writes.
        """
        if not self.active or self._stopping:
            return False
        self._need_full = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._schedule(0)
        return True

    def _schedule(self, delay: Optional[float] = None) -> None:
        """One publish per burst: events arriving within the delay share it."""
        if self._stopping or not self.active or \
                (self._scheduled is not None and self._scheduled.active()):
            return
        self._scheduled = self.clock.callLater(
            self.publish_delay if delay is None else delay, self._kick)

    def _kick(self) -> None:
        if not self.active:
            return
        if self._publishing is not None:
            self._again = True
            return
        publishing = Deferred.fromCoroutine(self._publish_loop())
        # Cancelled when leadership ends in the middle of a publish.
        publishing.addErrback(lambda failure: failure.trap(CancelledError))
        # Against an in-memory store the loop can finish before this line.
        self._publishing = None if publishing.called else publishing

    async def _publish_loop(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self._publish_once()
                except Exception as e:
                    if not self.active:
                        self._need_full = True
                        self.log.info("publish abandoned: this netmaster no longer leads "
                                      "({error})", error=repr(e))
                        return
                    self.last_error = f"publishing to the store failed: {e}"
                    PUBLISHES.labels("error").inc()
                    self.log.error("publishing to the store failed, retrying in {delay} s: "
                                   "{error}", delay=self.retry_delay, error=e)
                    # What take_changes handed over is lost with the failed
                    # publish: the next one writes everything.
                    self._need_full = True
                    self._schedule(self.retry_delay)
                    return
                if not self._again:
                    return
        finally:
            self._publishing = None

    async def _publish_once(self) -> None:
        started = self._unpublished_since
        unpublished = self._unpublished
        self._unpublished = 0
        self._unpublished_since = None
        changes = self.engine.take_changes()
        changed_names = self.names.take_changes()
        full = self._need_full or not await self.publisher.epoch_intact()
        engine = self.engine
        if full:
            policies = list(engine.policies.values())
            groups = list(engine.groups.values())
            # Nodes the map still holds that lost their pods get an empty
            # index: it takes them out of the map and deletes their key.
            if self.published_generation is None:
                await self._adopt()
            nodes = sorted(engine.nodes() | set(self.publisher.node_generations())
                           | self.publisher.adopted_nodes)
        else:
            policies = [engine.policies[i] for i in changes.added_policies
                        if i in engine.policies]
            groups = [engine.groups[g] for g in changes.changed_groups if g in engine.groups]
            # Other nodes see new group versions through the group map.
            nodes = sorted(changes.index_nodes)
        removed = () if full else changes.removed_groups
        entries = self.names.entries
        if full:
            names, removed_names = list(entries.values()), []
        else:
            names = [entries[k] for k in changed_names if k in entries]
            removed_names = [k for k in changed_names if k not in entries]
        if not full and not (policies or groups or nodes or removed or changed_names) and \
                self.published_generation is not None:
            return
        try:
            generation = await self.publisher.publish(
                policies=policies, groups=groups, removed_groups=removed,
                nodes=[engine.node_index(node) for node in nodes],
                names=names, removed_names=removed_names, full=full)
        except Exception:
            self._unpublished += unpublished
            raise
        if full:
            self.publisher.adopted_nodes.clear()
        if full and not self._heap_frozen:
            # The compiled cluster is a large, long-lived heap: left in the
            # collector's generations, every full collection scans all of it
            # (tens of milliseconds per 10,000 pods) in the middle of an event.
            gc.collect()
            gc.freeze()
            self._heap_frozen = True
        self._need_full = False
        self.published_generation = generation
        self.last_error = None
        PUBLISHES.labels("full" if full else "incremental").inc()
        if started is not None:
            PUBLISH_SECONDS.observe(self.clock.seconds() - started)

    async def _adopt(self) -> None:
        """What an earlier netmaster left becomes this one's to collect."""
        try:
            await self.publisher.adopt()
        except Exception as e:
            # Only garbage collection depends on it: publish regardless.
            self.log.warn("could not read what an earlier netmaster left in the store: "
                          "{error}", error=e)

    async def _audit(self) -> None:
        """Find entries the store lost (evicted, restarted) and republish."""
        if not await self.publisher.epoch_intact():
            self.log.warn("the store lost netmaster's epoch: republishing everything")
            self._need_full = True
            self._schedule(0)
            return
        now = self.clock.seconds()
        if now - self._last_audit < self.audit_interval:
            return
        self._last_audit = now
        missing = await self.publisher.verify(self.publisher.written())
        if missing:
            self.log.warn("the store lost {count} entries (e.g. {example}): republishing",
                          count=len(missing), example=missing[0])
            self._need_full = True
            self._schedule(0)
            return
        await self.publisher.collect_garbage(
            self.engine.policies.keys(), [g.key for g in self.engine.groups.values()])

    def _check(self) -> Optional[Deferred]:
        if self.standby and self.synced and not self._stopping:
            return Deferred.fromCoroutine(self._follow_generation())
        if not self.synced or self._publishing is not None or self._stopping \
                or self.published_generation is None or not self.active:
            return None
        d = Deferred.fromCoroutine(self._audit())

        def failed(failure: Any) -> None:
            self.last_error = f"checking the store failed: {failure.getErrorMessage()}"
            self.log.warn("checking the store failed: {error}",
                          error=failure.getErrorMessage())

        # A failed check must not stop the LoopingCall.
        return d.addErrback(failed)

    async def _follow_generation(self) -> None:
        """A standby remembers the store's generation, to continue above it if it leads."""
        try:
            await self.publisher.observe_generation()
        except Exception as error:
            # Only a floor for a later takeover: the leader's problem to report.
            self.log.debug("a standby could not read the generation: {error}", error=error)

    # -- reporting

    @property
    def standby(self) -> bool:
        return self.elector is not None and not self.active

    @property
    def in_sync(self) -> bool:
        if self.standby:
            # A warm standby counts as ready: it has listed everything,
            # compiled it, and read the Lease, so it can take over at once
            # (a Deployment's rollout waits for every replica to be Ready).
            return (self.synced and len(self.stream) == 0 and not self._stopping
                    and self.elector.observed is not None
                    and self.elector.last_error is None)
        return (self.synced and self.published_generation is not None
                and self._unpublished == 0 and self._publishing is None
                and self.last_error is None and len(self.stream) == 0)

    def status(self) -> dict[str, Any]:
        if not self.synced:
            state, detail = "listing", "waiting for the source's initial list"
        elif self.standby:
            state, detail = "standby", self._standby_detail()
        elif self.last_error is not None:
            state, detail = "store-error", self.last_error
        elif self.in_sync:
            state, detail = "published", "everything seen is published"
        else:
            state, detail = "publishing", "changes are being compiled and published"
        errors = dict(sorted({**self.engine.errors, **self.names.errors}.items())[:20])
        status = {
            "role": "netmaster",
            "state": state,
            "in_sync": self.in_sync,
            "generation": self.published_generation,
            "detail": detail,
            "objects": self.counts(),
            "events": self.events_seen,
            "policies": len(self.engine.policies),
            "groups": len(self.engine.groups),
            "names": len(self.names.entries),
            "invalid_objects": len(self.engine.errors) + len(self.names.errors),
            "errors": errors,
            "source": self.source.status(),
        }
        if self.elector is not None:
            status["election"] = self.elector.status()
        return status

    def _standby_detail(self) -> str:
        elector = self.elector
        lease = getattr(elector.api, "description", "the Lease")
        if elector.last_error is not None:
            return (f"standby, publishing nothing; cannot read or take the Lease {lease}: "
                    f"{elector.last_error}")
        if elector.observed is None:
            return f"standby, publishing nothing; reading the Lease {lease}"
        holder = elector.holder
        if holder == elector.identity:
            held = ("still in this netmaster's name from a term it ended when it could not "
                    "renew")
        else:
            held = f"held by {holder}" if holder else "free (taking it over)"
        return (f"standby, publishing nothing: the Lease {lease} is {held}; this "
                f"netmaster has listed and compiled everything and counts as ready to "
                f"take over")
