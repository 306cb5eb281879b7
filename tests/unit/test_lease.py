"""
Leader election on a Lease: acquire, renew, conflicts, takeover after expiry
(by the candidate's own clock), release on stop, and a leader that cannot
renew stepping down before anyone else may take over. Time is a
L{task.Clock}; the Lease lives in an in-memory API with the server's
resourceVersion semantics, and L{LeaseApi} is checked against the test API
server through StubTreq.
"""

from __future__ import annotations

import copy
import json

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from contiv.k8s.apiconfig import ApiConfig
from contiv.k8s.client import ApiClient, ApiError
from contiv.k8s.lease import LEADER, LeaderElector, LeaseApi, micro_time
from tests.support.k8s_apiserver import FakeApiServer

DURATION, DEADLINE, RETRY = 15, 10.0, 2.0


class MemoryLeases:
    """
    One Lease with the API server's rules: create fails if it exists, update
    fails with 409 unless it carries the current resourceVersion. C{down}
    makes requests fail with 503; C{hang} leaves them unanswered.
    """

    namespace, name, description = "kube-system", "contiv-netmaster", "kube-system/contiv-netmaster"

    def __init__(self):
        self.lease = None
        self.rv = 0
        self.down = False
        self.hang = False
        self.hung = []
        self.writes = []  # (method, spec) of every write that went through
        self.before_write = None  # called before a write is applied (races)
        self.closed = False

    def _answer(self, produce):
        if self.hang:
            d = Deferred()
            self.hung.append(d)
            return d
        if self.down:
            return fail(ApiError(503, "ServiceUnavailable", "down", "/leases"))
        try:
            return succeed(produce())
        except ApiError as e:
            return fail(e)

    def get(self):
        return self._answer(lambda: copy.deepcopy(self.lease))

    def _store(self, method, lease):
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook()
        self.rv += 1
        lease = copy.deepcopy(lease)
        lease["metadata"]["resourceVersion"] = str(self.rv)
        self.lease = lease
        self.writes.append((method, copy.deepcopy(lease["spec"])))
        return copy.deepcopy(lease)

    def create(self, lease):
        def produce():
            if self.before_write is not None:
                hook, self.before_write = self.before_write, None
                hook()
            if self.lease is not None:
                raise ApiError(409, "AlreadyExists", "exists", "/leases")
            return self._store("create", lease)
        return self._answer(produce)

    def update(self, lease):
        def produce():
            if self.before_write is not None:
                hook, self.before_write = self.before_write, None
                hook()
            if self.lease is None:
                raise ApiError(404, "NotFound", "gone", "/leases")
            if lease["metadata"].get("resourceVersion") != self.lease["metadata"][
                    "resourceVersion"]:
                raise ApiError(409, "Conflict", "modified", "/leases")
            return self._store("update", lease)
        return self._answer(produce)

    def close(self):
        self.closed = True
        return succeed(None)

    def renew_as(self, holder, now):
        """Another candidate (not under test) writes the Lease as its holder."""
        spec = {"holderIdentity": holder, "leaseDurationSeconds": DURATION,
                "acquireTime": micro_time(now), "renewTime": micro_time(now),
                "leaseTransitions": 0}
        if self.lease is None:
            self.lease = {"metadata": {"name": self.name, "namespace": self.namespace}}
        self._store("other", dict(self.lease, spec=spec))


class Candidate:
    """An elector and what its callbacks saw."""

    def __init__(self, api, identity, clock, **timings):
        self.events = []
        options = dict(lease_duration=DURATION, renew_deadline=DEADLINE, retry_period=RETRY,
                       random=lambda: 0.5)
        options.update(timings)
        self.clock = clock
        self.elector = LeaderElector(
            api, identity, clock=clock,
            on_started_leading=lambda: self.events.append(("started", clock.seconds())),
            on_stopped_leading=lambda why: self.events.append(("stopped", clock.seconds(),
                                                               why)),
            **options)

    def start(self):
        self.elector.start()
        self.clock.advance(0)

    def stop(self):
        results = []
        Deferred.fromCoroutine(self.elector.stop()).addBoth(results.append)
        assert results == [None], results


def advance(clock, seconds, step=0.125):
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_acquires_a_missing_lease_and_renews_it():
    clock, api = Clock(), MemoryLeases()
    a = Candidate(api, "a", clock)
    a.start()
    assert a.elector.leader and a.events == [("started", 0)]
    assert LEADER._value.get() == 1
    method, spec = api.writes[0]
    assert method == "create"
    assert spec == {"holderIdentity": "a", "leaseDurationSeconds": DURATION,
                    "acquireTime": micro_time(0), "renewTime": micro_time(0),
                    "leaseTransitions": 0}
    advance(clock, 6.05)
    renewals = [s for m, s in api.writes if m == "update"]
    assert [s["renewTime"] for s in renewals] == [micro_time(t) for t in (2, 4, 6)]
    assert all(s["acquireTime"] == micro_time(0) and s["leaseTransitions"] == 0
               for s in renewals)
    assert a.elector.leader and a.events == [("started", 0)]
    a.stop()
    assert clock.getDelayedCalls() == []


def test_a_renewed_lease_is_never_taken():
    clock, api = Clock(), MemoryLeases()
    api.renew_as("other", 0)
    b = Candidate(api, "b", clock)
    b.start()
    for _ in range(30):  # 60 s of the holder renewing every 2 s
        advance(clock, 2)
        api.renew_as("other", clock.seconds())
    assert not b.elector.leader and b.events == []
    assert b.elector.holder == "other"
    assert all(m == "other" for m, _ in api.writes)
    b.stop()
    assert clock.getDelayedCalls() == []


def test_takeover_once_the_lease_was_not_renewed_for_its_duration_by_own_clock():
    clock, api = Clock(), MemoryLeases()
    # renewTime far in the past by the writer's clock: irrelevant, only the
    # standby's own observation counts.
    api.renew_as("dead", -1000)
    clock.advance(100)
    b = Candidate(api, "b", clock)
    b.start()
    first_seen = clock.seconds()
    advance(clock, DURATION - 0.2)
    assert not b.elector.leader, "took over before the lease duration passed"
    advance(clock, RETRY * 1.2 + 0.4)
    assert b.elector.leader
    started = b.events[0][1]
    # At the moment the Lease runs out by its clock, not a retry period later.
    assert first_seen + DURATION <= started <= first_seen + DURATION + 0.05
    spec = api.lease["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == micro_time(started)
    b.stop()


def test_two_candidates_one_leader_and_the_loser_follows():
    clock, api = Clock(), MemoryLeases()
    a, b = Candidate(api, "a", clock), Candidate(api, "b", clock)
    a.start()
    b.start()
    advance(clock, 60)
    assert a.elector.leader and not b.elector.leader
    assert b.elector.holder == "a" and b.events == []
    a.stop()
    b.stop()


def test_conflict_between_read_and_write_loses_the_round():
    clock, api = Clock(), MemoryLeases()
    api.lease = {"metadata": {"name": api.name, "namespace": api.namespace},
                 "spec": {"holderIdentity": "", "leaseDurationSeconds": 1}}
    api.rv = 1
    api.lease["metadata"]["resourceVersion"] = "1"
    # Another candidate writes between this one's GET and PUT.
    api.before_write = lambda: api.renew_as("faster", clock.seconds())
    b = Candidate(api, "b", clock)
    b.start()
    assert not b.elector.leader and b.events == []
    assert b.elector.last_error is None  # a lost race is not an error
    assert api.lease["spec"]["holderIdentity"] == "faster"
    b.stop()


def test_conflict_on_create():
    clock, api = Clock(), MemoryLeases()
    api.before_write = lambda: api.renew_as("faster", clock.seconds())
    b = Candidate(api, "b", clock)
    b.start()
    assert not b.elector.leader and api.lease["spec"]["holderIdentity"] == "faster"
    b.stop()


def test_release_on_stop_lets_a_standby_take_over_at_once():
    clock, api = Clock(), MemoryLeases()
    a, b = Candidate(api, "a", clock), Candidate(api, "b", clock)
    a.start()
    b.start()
    advance(clock, 5)
    a.stop()
    assert a.events[-1][0] == "stopped" and not a.elector.leader
    assert api.closed
    method, spec = api.writes[-1]
    assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
    stopped_at = clock.seconds()
    advance(clock, RETRY * 1.2 + 0.2)
    assert b.elector.leader
    assert b.events[0][1] - stopped_at <= RETRY * 1.2 + 0.1
    b.stop()


def test_release_after_a_renewal_that_reached_the_server_unseen():
    """A renewal cancelled on our side may still have been written: release that one."""
    clock, api = Clock(), MemoryLeases()
    a = Candidate(api, "a", clock)
    a.start()
    advance(clock, 1)
    assert a.elector.leader
    # The server has a newer version of our Lease than the elector last saw.
    api._store("update", copy.deepcopy(api.lease))
    a.stop()
    method, spec = api.writes[-1]
    assert method == "update" and spec["holderIdentity"] == ""
    assert spec["leaseDurationSeconds"] == 1


def test_stopping_a_standby_releases_nothing():
    clock, api = Clock(), MemoryLeases()
    api.renew_as("other", 0)
    b = Candidate(api, "b", clock)
    b.start()
    writes = len(api.writes)
    b.stop()
    assert len(api.writes) == writes and b.events == []


@pytest.mark.parametrize("failure", ["down", "hang"])
def test_a_leader_that_cannot_renew_stops_before_anyone_may_take_over(failure):
    clock, api = Clock(), MemoryLeases()
    a, b = Candidate(api, "a", clock), Candidate(api, "b", clock)
    a.start()
    b.start()
    advance(clock, 5)
    last_renewal = max(float(t) for t in (4,))  # renewals at 0, 2, 4
    assert api.lease["spec"]["renewTime"] == micro_time(last_renewal)
    # The API goes away for a (while b keeps its own view of the Lease).
    setattr(api, failure, True)
    advance(clock, DEADLINE)
    stops = [e for e in a.events if e[0] == "stopped"]
    assert len(stops) == 1 and not a.elector.leader
    assert stops[0][1] <= last_renewal + DEADLINE + 0.05
    assert "renew" in stops[0][2]
    # b saw the last renewal no earlier than when it was written: it cannot
    # take over before last_renewal + DURATION, which is after a stopped.
    assert stops[0][1] < last_renewal + DURATION
    assert LEADER._value.get() == 0
    # The API comes back: b takes over once the Lease is expired by its clock.
    api.down = api.hang = False
    for d in api.hung:
        if not d.called:
            d.errback(ApiError(503, "", "late", ""))
    advance(clock, DURATION)
    # a may take its own Lease back (nobody else wrote it in between: a
    # write would have carried another holder); b never led before the
    # Lease expired by its clock; never both.
    assert a.elector.leader != b.elector.leader
    assert all(e[1] >= last_renewal + DURATION for e in b.events if e[0] == "started")
    a.stop()
    b.stop()
    assert clock.getDelayedCalls() == []


def test_a_leader_that_finds_another_holder_steps_down_at_once():
    clock, api = Clock(), MemoryLeases()
    a = Candidate(api, "a", clock)
    a.start()
    advance(clock, 1)
    api.renew_as("usurper", clock.seconds())
    advance(clock, 1.05)
    assert not a.elector.leader
    assert "usurper" in a.events[-1][2]
    a.stop()


def test_a_restart_with_the_same_identity_continues_the_lease():
    clock, api = Clock(), MemoryLeases()
    api.renew_as("pod-0", 0)
    again = Candidate(api, "pod-0", clock)
    again.start()
    assert again.elector.leader
    assert api.lease["spec"]["leaseTransitions"] == 0
    assert api.lease["spec"]["acquireTime"] == micro_time(0)
    again.stop()


def test_timings_are_checked():
    with pytest.raises(ValueError):
        LeaderElector(MemoryLeases(), "a", clock=Clock(), lease_duration=10,
                      renew_deadline=10, retry_period=2)
    with pytest.raises(ValueError):
        LeaderElector(MemoryLeases(), "a", clock=Clock(), lease_duration=15,
                      renew_deadline=2, retry_period=2)


# -- LeaseApi over HTTP, against the test API server


def lease_api(server):
    client = ApiClient(MemoryReactorClock(), ApiConfig(server="http://api.test"))
    client._http = StubTreq(server)
    return LeaseApi(client, "contiv-system", "contiv-netmaster", timeout=5)


def result_of(coroutine):
    d = Deferred.fromCoroutine(coroutine)
    results = []
    d.addBoth(results.append)
    assert results, "the request did not complete"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def lease_body(holder, rv=None):
    metadata = {"name": "contiv-netmaster", "namespace": "contiv-system"}
    if rv is not None:
        metadata["resourceVersion"] = rv
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": micro_time(0), "acquireTime": micro_time(0),
                     "leaseTransitions": 0}}


def test_lease_api_get_create_update_conflict():
    server = FakeApiServer(Clock(), bookmark_interval=0)
    api = lease_api(server)
    assert result_of(api.get()) is None
    created = result_of(api.create(lease_body("a")))
    assert created["spec"]["holderIdentity"] == "a"
    rv = created["metadata"]["resourceVersion"]
    assert result_of(api.get()) == created
    with pytest.raises(ApiError) as raised:
        result_of(api.create(lease_body("b")))
    assert raised.value.code == 409 and raised.value.reason == "AlreadyExists"
    updated = result_of(api.update(lease_body("b", rv)))
    assert updated["spec"]["holderIdentity"] == "b"
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    assert int(updated["metadata"]["resourceVersion"]) > int(rv)
    with pytest.raises(ApiError) as raised:
        result_of(api.update(lease_body("c", rv)))  # stale
    assert raised.value.code == 409 and raised.value.reason == "Conflict"
    assert server.leases[("contiv-system", "contiv-netmaster")]["spec"]["holderIdentity"] == "b"
    methods = [r["method"] for r in server.requests]
    assert methods == ["GET", "POST", "GET", "POST", "PUT", "PUT"]
    assert server.requests[1]["path"] == "/apis/coordination.k8s.io/v1/namespaces/" \
                                         "contiv-system/leases"


def test_lease_api_update_of_a_missing_lease_and_bad_bodies():
    server = FakeApiServer(Clock(), bookmark_interval=0)
    api = lease_api(server)
    with pytest.raises(ApiError) as raised:
        result_of(api.update(lease_body("a", "5")))
    assert raised.value.code == 404
    bad = lease_body("a")
    bad["spec"]["renewTime"] = "yesterday"
    with pytest.raises(ApiError) as raised:
        result_of(api.create(bad))
    assert raised.value.code == 422 and "spec.renewTime" in str(raised.value)


def test_lease_api_token_and_refusal():
    server = FakeApiServer(Clock(), bookmark_interval=0)
    server.refuse_leases = 503
    api = lease_api(server)
    with pytest.raises(ApiError) as raised:
        result_of(api.get())
    assert raised.value.code == 503
    server.refuse_leases = None
    server.require_token("t")
    with pytest.raises(ApiError) as raised:
        result_of(api.get())
    assert raised.value.code == 401


def test_elector_over_the_test_api_server():
    """The elector's requests are ones the API server accepts, end to end."""
    clock, server = Clock(), FakeApiServer(Clock(), bookmark_interval=0)
    a = Candidate(lease_api(server), "a", clock)
    b = Candidate(lease_api(server), "b", clock)
    a.start()
    b.start()
    advance(clock, 4.1)
    assert a.elector.leader and not b.elector.leader
    lease = server.leases[("contiv-system", "contiv-netmaster")]
    assert lease["spec"]["holderIdentity"] == "a"
    assert json.loads(json.dumps(lease)) == lease
    a.stop()
    assert server.leases[("contiv-system", "contiv-netmaster")]["spec"]["holderIdentity"] == ""
    advance(clock, RETRY * 1.2 + 0.2)
    assert b.elector.leader
    assert server.leases[("contiv-system", "contiv-netmaster")]["spec"]["leaseTransitions"] == 1
    b.stop()


def test_a_standby_error_is_reported_until_the_next_good_read():
    clock, api = Clock(), MemoryLeases()
    api.renew_as("other", 0)
    api.down = True
    b = Candidate(api, "b", clock)
    b.start()
    assert "down" in b.elector.last_error
    api.down = False
    advance(clock, RETRY * 1.2 + 0.2)
    assert b.elector.last_error is None and b.elector.holder == "other"
    b.stop()


def test_a_standby_attempt_that_hangs_times_out_and_is_retried():
    clock, api = Clock(), MemoryLeases()
    api.renew_as("other", 0)
    api.hang = True
    b = Candidate(api, "b", clock)
    b.start()
    advance(clock, DEADLINE + 0.25)
    assert "no answer" in b.elector.last_error
    assert len(api.hung) == 1 and api.hung[0].called  # cancelled, not leaked
    api.hang = False
    advance(clock, RETRY * 1.2 + 0.2)
    assert b.elector.last_error is None
    b.stop()
    assert clock.getDelayedCalls() == []
