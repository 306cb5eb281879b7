"""
Leader election through a C{coordination.k8s.io/v1} Lease, the way client-go
does it.

Every candidate reads the Lease every retry period. A candidate takes it when
nobody holds it, or when the record has not changed for the lease duration
as measured by the candidate's own clock since it last saw the record change
(clocks of different machines are never compared: C{renewTime} is only ever
compared with itself). Writes carry the resourceVersion that was read, so of
two candidates that both saw a free Lease exactly one wins; the other gets
409 Conflict.

The leader renews every retry period. When it could not renew for the renew
deadline (shorter than the lease duration) it stops leading at once, before
any other candidate could consider the Lease expired: with two leaders
publishing, the store would hold a mix of both. On a clean stop the leader
releases the Lease (no holder, a 1 s duration) so that a standby takes over
at its next attempt instead of after the lease duration.
"""

from __future__ import annotations

import datetime
import json
import random as random_module
from typing import Any, Callable, Optional
from urllib.parse import quote

import treq
from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from contiv.metrics import REGISTRY

from .client import ApiClient, ApiError

API_VERSION = "coordination.k8s.io/v1"
# client-go's JitterFactor: standbys retry at a random point within
# [retry, 1.2 * retry] so that they do not all ask at once.
JITTER = 0.2

# What one attempt to acquire or renew found.
HELD = "held"  # the Lease is ours (acquired or renewed)
STANDBY = "standby"  # another candidate holds it, and it has not expired
CONFLICT = "conflict"  # another candidate wrote it between our read and write
TAKEN = "taken"  # we led, but the Lease names another holder
FAILED = "failed"

LEADER = Gauge("contiv_netmaster_leader",
               "1 while this netmaster holds the Lease and publishes, 0 while standby",
               registry=REGISTRY)
TRANSITIONS = Counter("contiv_netmaster_leader_transitions",
                      "times this netmaster became the leader or stopped being it",
                      ["to"], registry=REGISTRY)


def micro_time(seconds: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseApi:
    """
    GET, create (POST) and update (PUT) of one Lease, on an L{ApiClient}'s
    connection pool and credentials. C{get} returns None for 404; the others
    raise L{ApiError} (409: the resourceVersion was stale, or it exists).
    """

    def __init__(self, client: ApiClient, namespace: str, name: str, *,
                 timeout: float = 10.0):
        self.client = client
        self.namespace = namespace
        self.name = name
        self.timeout = timeout
        self.collection = (f"/apis/{API_VERSION}/namespaces/{quote(namespace, safe='')}"
                           "/leases")
        self.path = f"{self.collection}/{quote(name, safe='')}"

    @property
    def description(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def _request(self, method: str, path: str, body: Optional[dict]) -> Any:
        return await self.client.request(method, path, body=body, timeout=self.timeout)

    async def _object(self, response: Any, path: str) -> dict:
        body = await treq.content(response)
        try:
            lease = json.loads(body)
        except ValueError as e:
            raise ApiError(response.code, "BadBody", f"Lease body is not JSON: {e}", path)
        if not isinstance(lease, dict) or not isinstance(lease.get("metadata"), dict):
            raise ApiError(response.code, "BadBody", "Lease body is not an object with "
                           "metadata", path)
        return lease

    async def get(self) -> Optional[dict]:
        response = await self._request("GET", self.path, None)
        if response.code == 404:
            await treq.content(response)
            return None
        if response.code != 200:
            raise await self.client.error(response, self.path)
        return await self._object(response, self.path)

    async def create(self, lease: dict) -> dict:
        response = await self._request("POST", self.collection, lease)
        if response.code not in (200, 201):
            raise await self.client.error(response, self.collection)
        return await self._object(response, self.collection)

    def close(self) -> Deferred:
        return self.client.close()

    async def update(self, lease: dict) -> dict:
        response = await self._request("PUT", self.path, lease)
        if response.code != 200:
            raise await self.client.error(response, self.path)
        return await self._object(response, self.path)


class LeaderElector:
    """
    Campaigns for the Lease that C{api} reads and writes and, once it holds
    it, renews it. C{on_started_leading()} and C{on_stopped_leading(why)} are
    called synchronously when leadership begins and ends; the second before
    a release is sent, so whatever leading allowed has stopped by then.
    """

    log = Logger()

    def __init__(self, api: Any, identity: str, *, clock: Any,
                 on_started_leading: Callable[[], None] = lambda: None,
                 on_stopped_leading: Callable[[str], None] = lambda why: None,
                 lease_duration: int = 15, renew_deadline: float = 10.0,
                 retry_period: float = 2.0,
                 random: Callable[[], float] = random_module.random):
        if not 0 < retry_period * (1 + JITTER) < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period * 1.2 < renew_deadline < lease_duration")
        self.api = api
        self.identity = identity
        self.clock = clock
        self.lease_duration = int(lease_duration)
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        # Public so that the service the elector drives can connect itself.
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self._random = random
        self.leader = False
        self.running = False
        # The Lease as last read or written, its spec, and when (by this
        # process's clock) the spec was first seen as it is now.
        self.observed: Optional[dict] = None
        self._observed_spec: Optional[dict] = None
        self.observed_time: Optional[float] = None
        self.last_error: Optional[str] = None
        self.last_renew: Optional[float] = None
        self._next: Any = None
        self._deadline: Any = None
        self._attempt: Optional[Deferred] = None
        # When the other holder's Lease runs out by our clock, if it is not renewed.
        self._expires_at: Optional[float] = None

    # -- what others read

    @property
    def holder(self) -> Optional[str]:
        """Who holds the Lease as last seen (None: nobody, or not read yet)."""
        if self._observed_spec is None:
            return None
        return self._observed_spec.get("holderIdentity") or None

    def status(self) -> dict:
        return {"lease": getattr(self.api, "description", None), "identity": self.identity,
                "leader": self.leader, "holder": self.holder, "error": self.last_error}

    # -- lifecycle

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self._schedule(0)

    async def stop(self) -> None:
        """Stop campaigning; a leader stops leading, then releases the Lease."""
        self.running = False
        self._cancel_timers()
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        if self.leader:
            self._stop_leading("this netmaster is stopping")
            await self._release()
        close = getattr(self.api, "close", None)
        if close is not None:
            await close()

    # -- the loop

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._next = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._next = None
        attempt = Deferred.fromCoroutine(self._try_acquire_or_renew())
        if not self.leader:
            # A leader's attempt ends at its renew deadline (see _lose); a
            # standby's must not hang past the time its next one is due.
            attempt.addTimeout(self.renew_deadline, self.clock)
        self._attempt = attempt
        attempt.addCallbacks(self._attempted, self._failed, callbackArgs=(attempt,),
                             errbackArgs=(attempt,))
        # A bug in a callback must not end the campaign silently.
        attempt.addErrback(lambda failure: self.log.failure(
            "leader election step failed", failure))

    def _attempted(self, outcome: str, attempt: Deferred) -> None:
        if attempt is not self._attempt:
            return  # cancelled by stop or by losing, which decided what comes next
        self._attempt = None
        if outcome != FAILED:
            self.last_error = None
        if outcome == TAKEN:
            self._lose(f"the Lease names {self.holder} as its holder")
            return
        if self.leader:
            self._schedule(self.retry_period)
            return
        delay = self.retry_period * (1 + self._random() * JITTER)
        if outcome == STANDBY and self._expires_at is not None:
            # Try again the moment the holder's Lease runs out, not up to a
            # retry period later: a takeover within the lease duration.
            delay = min(delay, max(0.0, self._expires_at - self.clock.seconds()))
        self._schedule(delay)

    def _failed(self, failure: Any, attempt: Deferred) -> None:
        if attempt is not self._attempt:
            return
        error = failure.getErrorMessage() or failure.type.__name__
        if failure.check(defer.TimeoutError, CancelledError):
            error = f"no answer from the API server within {self.renew_deadline} s"
        if error != self.last_error:
            self.log.warn("Lease {lease}: {error}", lease=self.api.description, error=error)
        self.last_error = error
        self._attempted(FAILED, attempt)

    async def _try_acquire_or_renew(self) -> str:
        now = self.clock.seconds()
        try:
            lease = await self.api.get()
            if lease is None:
                return await self._create(now)
            self._observe(lease, now)
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            duration = spec.get("leaseDurationSeconds") or self.lease_duration
            if holder and holder != self.identity:
                if self.leader:
                    return TAKEN
                assert self.observed_time is not None
                self._expires_at = self.observed_time + duration
                if now < self._expires_at:
                    return STANDBY
            same = holder == self.identity
            new_spec = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.lease_duration,
                "acquireTime": spec.get("acquireTime") if same else micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": (spec.get("leaseTransitions") or 0) + (0 if same else 1),
            }
            written = await self.api.update(dict(lease, spec=new_spec))
        except ApiError as e:
            if e.code != 409:
                raise
            # Another candidate wrote in between: it won this round.
            self.log.debug("Lease {lease}: lost a race ({error})",
                           lease=self.api.description, error=e)
            return CONFLICT
        self._observe(written, now)
        self._held(now)
        return HELD

    async def _create(self, now: float) -> str:
        lease = {"apiVersion": API_VERSION, "kind": "Lease",
                 "metadata": {"name": self.api.name, "namespace": self.api.namespace},
                 "spec": {"holderIdentity": self.identity,
                          "leaseDurationSeconds": self.lease_duration,
                          "acquireTime": micro_time(now), "renewTime": micro_time(now),
                          "leaseTransitions": 0}}
        try:
            written = await self.api.create(lease)
        except ApiError as e:
            if e.code != 409:
                raise
            return CONFLICT  # another candidate created it first
        self._observe(written, now)
        self._held(now)
        return HELD

    def _observe(self, lease: dict, now: float) -> None:
        spec = lease.get("spec") or {}
        if spec != self._observed_spec:
            self._observed_spec = spec
            self.observed_time = now
        self.observed = lease

    def _held(self, attempted_at: float) -> None:
        """The Lease was written for us by a request sent at C{attempted_at}."""
        # Measured from when the request was sent: the others start their
        # count no earlier than when the write reached the server.
        self.last_renew = attempted_at
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self.clock.callLater(
            max(0.0, attempted_at + self.renew_deadline - self.clock.seconds()),
            self._lose, f"could not renew the Lease within {self.renew_deadline} s")
        if not self.leader:
            self.leader = True
            LEADER.set(1)
            TRANSITIONS.labels("leader").inc()
            self.log.info("{identity} is the leader (Lease {lease})",
                          identity=self.identity, lease=self.api.description)
            self.on_started_leading()

    def _lose(self, why: str) -> None:
        self._deadline = None
        if not self.leader:
            return
        if self._attempt is not None:
            # Its answer could only say what the deadline already decided.
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        self._stop_leading(why)
        if self._next is not None and self._next.active():
            self._next.cancel()
            self._next = None
        self._schedule(self.retry_period)

    def _stop_leading(self, why: str) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        emit = self.log.warn if self.running else self.log.info
        emit("{identity} stops leading: {why}", identity=self.identity, why=why)
        self.on_stopped_leading(why)
        self.leader = False
        LEADER.set(0)
        TRANSITIONS.labels("standby").inc()

    async def _release(self) -> None:
        """Give the Lease up, so that a standby takes it at its next attempt."""
        lease = self.observed
        for attempt in (1, 2):
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            now = self.clock.seconds()
            released = dict(lease, spec={
                "holderIdentity": "", "leaseDurationSeconds": 1,
                "acquireTime": micro_time(now), "renewTime": micro_time(now),
                "leaseTransitions": spec.get("leaseTransitions") or 0})
            try:
                written = await self._bounded(self.api.update(released))
            except ApiError as e:
                if e.code == 409 and attempt == 1:
                    # A renewal cancelled on our side still reached the server
                    # and moved the resourceVersion: read it again, release that.
                    try:
                        lease = await self._bounded(self.api.get())
                    except Exception as error:
                        e = error  # type: ignore[assignment]
                    else:
                        continue
                self._release_failed(e)
                return
            except Exception as e:
                self._release_failed(e)
                return
            self._observe(written, now)
            self.log.info("released the Lease {lease}", lease=self.api.description)
            return

    def _bounded(self, request: Any) -> Deferred:
        """A release must not hold the shutdown up for long."""
        return defer.ensureDeferred(request).addTimeout(min(self.renew_deadline, 5.0),
                                                       self.clock)

    def _release_failed(self, error: Exception) -> None:
        # Not fatal: the others take over once the lease duration has passed.
        self.log.warn("could not release the Lease {lease}: {error}",
                      lease=self.api.description, error=error)

    def _cancel_timers(self) -> None:
        for call in (self._next, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._next = None
        self._deadline = None
