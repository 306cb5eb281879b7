"""
The fault suite: the two-process deployment (twistd --role=netmaster and
twistd --role=netplugin, through a real memcached, into a private OVS with
pods as network namespaces) under restarts, outages, bursts and floods, with
real traffic between the pods throughout.

Every scenario asserts behaviour: what the datapath lets through and what it
does not, what the daemons report, and that the flows they end with are the
flows a fresh start computes.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import tempfile
import time

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from contiv.datapath.pipeline import DNS_METER_ID
from contiv.store.layout import NameReader, Reader
from contiv.store.memcached import MemcachedStore
from tests.support.ovs_node import POLICIES, ip, policy
from tests.support import ovs as ovs_support
from tests.support.dns import Dnsmasq, free_udp_tcp_port, udp_query
from tests.support.faults import (Deployment, FlowSet, SeqPinger, TcpStream, flow_diff,
                                  malformed_flood, meter_stats, normalise_conjunctions,
                                  packet_in_flood, sample)
from tests.support.k8s_apiserver import FakeApiServer, write_kubeconfig
from tests.support.processes import (TWISTD, MemcachedServer, contiv_env, free_port,
                                     wait_for)
from tests.support.reactor_process import Collector, sleep
from tests.support.traffic import connects, pings

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def memcached():
    server = MemcachedServer()
    server.start()
    yield server
    server.stop()


def make_deployment(memcached, **kwargs):
    missing = ovs_support.available()
    if missing:
        pytest.fail(f"a private Open vSwitch cannot run here: {missing}")
    # Short and absolute: unix socket paths are limited to 107 bytes.
    workdir = tempfile.mkdtemp(prefix="contiv-f-")
    try:
        return Deployment(workdir, memcached, **kwargs)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def finish(node):
    """Stop everything; then no daemon may have logged a traceback."""
    try:
        node.stop()
        tracebacks = node.tracebacks()
    finally:
        shutil.rmtree(node.workdir, ignore_errors=True)
    assert not tracebacks, "\n\n".join(tracebacks)


@pytest.fixture
def deployment(memcached):
    node = make_deployment(memcached)
    try:
        yield node
    finally:
        finish(node)


SERVICE = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                    "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
KNOWN = "web.default.svc.cluster.local"


def answered(port, name=KNOWN, timeout=0.5):
    reply = udp_query(port, name, timeout=timeout)
    return reply is not None and [str(a.payload.dottedQuad()) for a in reply.answers]


def dig_from(pod, server, name, timeout=2):
    result = pod.exec(["dig", f"@{server}", "+short", f"+time={timeout}", "+tries=1", name],
                      check=False, timeout=timeout * 3 + 20)
    return result.stdout.split() if result.returncode == 0 else None


def out_of_sync(daemon):
    """The role's status if it says it is not in sync (and why), else None."""
    status = daemon.role()
    return status if status is not None and not status["in_sync"] else None


def stop_all(*streams):
    """After a failure: end the traffic processes without waiting for their summaries."""
    for stream in streams:
        if stream.process.poll() is None:
            stream.process.kill()
            stream.process.communicate(timeout=20)


def end_pings(allowed, denied, at_least):
    """Stop both ping streams: the allowed one lost nothing, the denied one got nothing."""
    allowed.stop()
    denied.stop()
    assert allowed.sent > at_least and allowed.lost() == [], allowed.lost()
    assert denied.sent > at_least and denied.received == 0


def test_flow_comparison_ignores_conjunction_numbers_only():
    """What the scenarios compare flows with: renumbered conjunctions are the same flows."""
    def table(web, db, port=80, web_action="goto_table:6", db_action="drop"):
        return FlowSet(normalise_conjunctions([
            f"table=4, priority=200,ip,nw_dst=10.244.1.11 actions=conjunction({web},1/2)",
            f"table=4, priority=200,tcp,tp_dst={port} actions=conjunction({web},2/2),"
            f"conjunction({db},2/2)",
            f"table=4, priority=200,ip,nw_dst=10.244.1.21 actions=conjunction({db},1/2)",
            f"table=4, priority=190,conj_id={web},ip actions={web_action}",
            f"table=4, priority=190,conj_id={db},ip actions={db_action}"]))
    assert table(7, 9) == table(1234, 55)
    # The same flows but for what each conjunction does: web's rule drops, db's passes.
    assert table(7, 9) != table(7, 9, web_action="drop", db_action="goto_table:6")
    assert table(7, 9) != table(7, 9, port=81)


# -- 1. memcached restarted ------------------------------------------------------------

def test_memcached_restart_keeps_enforcing_and_converges(deployment):
    d = deployment
    d.start_roles()
    before = d.flows()
    full = d.netmaster.metric("contiv_netmaster_publishes_total", result="full")
    p = d.pods
    stream = TcpStream(p["monitor"], ip("web"), 80)  # monitor -> web: everything allowed
    allowed = SeqPinger(p["monitor"], ip("web"))
    denied = SeqPinger(p["client"], ip("web"))  # client -> web: only TCP to http
    try:
        d.memcached.stop()
        # netplugin notices and says why; the bridge keeps the last state.
        status = wait_for(lambda: out_of_sync(d.netplugin), 15,
                          "netplugin to report the store outage")
        assert status["state"] == "store-error", status
        assert "store unavailable" in status["detail"], status
        assert not connects(p["client"], ip("db"), 5432)  # a denied probe, during the outage
        assert connects(p["monitor"], ip("web"), 80)
        assert d.flows() == before

        d.memcached.start()  # empty: the epoch, gen and everything else are gone
        wait_for(lambda: d.netmaster.metric("contiv_netmaster_publishes_total",
                                            result="full") > full,
                 20, "netmaster to republish everything")
        d.converged()
        assert "lost netmaster's epoch" in d.netmaster.full_logs()
        after = d.flows()
        assert after == before, flow_diff(before, after)
        assert not connects(p["client"], ip("db"), 5432)
    except BaseException:
        stop_all(stream, allowed, denied)
        raise
    sent, echoed, error = stream.stop()
    end_pings(allowed, denied, at_least=20)
    assert error == "" and sent > 20 and echoed == sent, (sent, echoed, error)
    d.netmaster.alive()
    d.netplugin.alive()


# -- 2. memcached down for a minute ----------------------------------------------------

OUTAGE = 60.0


@pytest.mark.timeout(240)
def test_memcached_down_for_a_minute(deployment):
    d = deployment
    d.start_roles()
    before = d.flows()
    p = d.pods
    allowed = SeqPinger(p["monitor"], ip("web"), interval=0.05)
    denied = SeqPinger(p["client"], ip("web"), interval=0.05)
    try:
        d.memcached.stop()
        started = time.monotonic()
        # Made during the outage, enforced only after it: monitor loses web,
        # client gains db.
        d.remove("monitor-web.yaml")
        d.write("client-db.yaml", policy("allow-client-to-db", "db", ["client"],
                                         [{"protocol": "TCP", "port": 5432}]))
        checks = 0
        while time.monotonic() - started < OUTAGE:
            for daemon in (d.netmaster, d.netplugin):
                daemon.alive()
                assert daemon.healthy(), f"{daemon.name}: /healthz did not answer"
            master, plugin = d.netmaster.readyz(), d.netplugin.readyz()
            assert d.flows() == before, "the datapath changed during the outage"
            assert connects(p["monitor"], ip("web"), 80)       # still allowed
            assert not connects(p["client"], ip("db"), 5432)   # still denied
            if time.monotonic() - started > 5:  # both have tried the store by now
                assert master[0] == 503 and plugin[0] == 503, (master, plugin)
                master = master[1]["roles"]["netmaster"]
                plugin = plugin[1]["roles"]["netplugin"]
                assert master["state"] == "store-error", master
                assert "store" in master["detail"], master
                assert plugin["state"] == "store-error", plugin
                assert "store unavailable" in plugin["detail"], plugin
                checks += 1
            time.sleep(2)
        assert checks >= 10
        d.memcached.start()
        d.converged(timeout=60)
        # The change made during the outage is enforced now...
        assert connects(p["client"], ip("db"), 5432)
        assert not pings(p["monitor"], ip("web"))
        assert not connects(p["monitor"], ip("web"), 80)
    except BaseException:
        stop_all(allowed, denied)
        raise
    # ...and the ping stream established before it never broke.
    end_pings(allowed, denied, at_least=500)


# -- 4. netplugin and OVS restarted under traffic -------------------------------------

def cookie_rounds(d):
    return {c >> 32 for c in d.contiv_flows()}


def test_netplugin_restart_under_traffic(deployment):
    d = deployment
    # With DNS in the datapath: the new netplugin finds its meter already there.
    d.write("service.yaml", SERVICE)
    d.configure("contiv/", plugin_args=("--dns-datapath",))
    d.start_roles()
    before = d.flows()
    first_round = cookie_rounds(d)
    p = d.pods
    stream = TcpStream(p["monitor"], ip("web"), 80)
    allowed = SeqPinger(p["monitor"], ip("web"))
    denied = SeqPinger(p["client"], ip("web"))
    try:
        d.netplugin.stop(signal.SIGKILL)
        # Fail-secure: the flows outlive the daemon.
        assert d.flows() == before
        assert pings(p["monitor"], ip("web"))
        assert not connects(p["client"], ip("db"), 5432)
        d.netplugin.start()
        _, plugin = d.converged()
        after = d.flows()
        assert after == before, flow_diff(before, after)
        rounds = cookie_rounds(d)
        assert len(rounds) == 1 and rounds != first_round, "only the new round is left"
        assert plugin["datapath"]["round"] in rounds
        assert plugin["datapath"]["dns_intercept"]["limited_by"] == f"ovs meter {DNS_METER_ID}"
        assert dig_from(p["client"], ip("db"), KNOWN) == ["10.96.0.10"]
        time.sleep(0.5)  # traffic under the new round too
    except BaseException:
        stop_all(stream, allowed, denied)
        raise
    sent, echoed, error = stream.stop()
    end_pings(allowed, denied, at_least=20)
    assert error == "" and sent > 20 and echoed == sent, (sent, echoed, error)


def test_netplugin_restarted_while_the_store_is_down_keeps_the_flows(deployment):
    """A netplugin that starts with nothing to read leaves the bridge as it was."""
    d = deployment
    d.start_roles()
    before = d.flows()
    p = d.pods
    allowed = SeqPinger(p["monitor"], ip("web"))
    denied = SeqPinger(p["client"], ip("web"))
    try:
        d.netplugin.stop(signal.SIGKILL)
        d.memcached.stop()
        d.netplugin.start()

        def connected_and_waiting():
            # Its first read of the store has to time out before it can say why.
            status = out_of_sync(d.netplugin)
            return status if status and status["datapath"]["connected"] \
                and "store unavailable" in status["detail"] else None
        status = wait_for(connected_and_waiting, 20,
                          "the new netplugin to connect to the bridge and say why it waits")
        assert status["state"] == "waiting-for-store", status
        assert "store unavailable" in status["detail"], status
        time.sleep(1)  # anything it would wrongly do on connecting is done by now
        assert d.flows() == before
        assert connects(p["monitor"], ip("web"), 80)
        assert not connects(p["client"], ip("db"), 5432)
        d.memcached.start()
        d.converged()
        after = d.flows()
        assert after == before, flow_diff(before, after)
    except BaseException:
        stop_all(allowed, denied)
        raise
    end_pings(allowed, denied, at_least=50)


def test_ovs_restart_under_traffic(deployment):
    d = deployment
    # With DNS in the datapath: its meter is bridge state that a restart loses too.
    d.write("service.yaml", SERVICE)
    d.configure("contiv/", plugin_args=("--dns-datapath",))
    d.start_roles()
    before = d.flows()
    assert any(f"meter:{DNS_METER_ID}" in flow for flow in before), before
    plugin_process = d.netplugin.process
    p = d.pods
    allowed = SeqPinger(p["monitor"], ip("web"))
    denied = SeqPinger(p["client"], ip("web"))
    try:
        wait_for(lambda: pings(p["monitor"], ip("web")), 10, "monitor to reach web")
        d.ovs.restart_vswitchd()  # every flow, meter and conntrack entry gone
        wait_for(lambda: d.flows() == before, 30, "the same flows to be back")
        d.converged()
        assert d.netplugin.process is plugin_process, "netplugin reconnected, not restarted"
        assert connects(p["client"], ip("web"), 80)
        assert not connects(p["client"], ip("db"), 5432)
        assert not connects(p["db"], ip("web"), 80)
        # The meter is back, and the bridge answers DNS through it again.
        assert dig_from(p["client"], ip("db"), KNOWN) == ["10.96.0.10"]
        assert meter_stats(d.ovs, DNS_METER_ID)[0] >= 1
        time.sleep(1)  # the ping stream under the reinstalled flows
    except BaseException:
        stop_all(allowed, denied)
        raise
    allowed.stop()
    denied.stop()
    # Allowed traffic resumed: the last second's pings (but the one in flight) came back.
    assert allowed.sent > 50, allowed.sent
    recent = range(allowed.sent - 40, allowed.sent - 1)
    assert not [seq for seq in recent if seq not in set(allowed.replies)], allowed.lost()
    # Denied traffic never passed, not even while the bridge was empty.
    assert denied.sent > 50 and denied.received == 0


# -- 5. a burst of 1,000 policy changes ------------------------------------------------

APPS = ("web", "db", "client", "monitor")
PORTS = ({"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": "http"},
         {"protocol": "TCP", "port": 5432}, {"protocol": "UDP", "port": 5432},
         {"protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 9000})


def random_policy(rng, name, namespace="default"):
    def peers():
        chosen = rng.sample(APPS, rng.randint(0, 2))
        selected = [{"podSelector": {"matchLabels": {"app": app}}} for app in chosen]
        if namespace != "default" and rng.random() < 0.3:
            selected.append({"namespaceSelector": {"matchLabels": {"team": rng.choice("ab")}},
                             "podSelector": {"matchLabels": {"app": rng.choice(APPS)}}})
        if rng.random() < 0.2:
            selected.append({"ipBlock": {"cidr": f"10.244.{rng.randint(0, 3)}.0/24"}})
        return selected

    def rule(direction):
        rule = {direction: peers()}
        if rng.random() < 0.7:
            rule["ports"] = rng.sample(PORTS, rng.randint(1, 3))
        return rule

    types = rng.choice((["Ingress"], ["Egress"], ["Ingress", "Egress"]))
    spec = {"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}
            if rng.random() < 0.8 else {}, "policyTypes": types}
    if "Ingress" in types:
        spec["ingress"] = [rule("from") for _ in range(rng.randint(0, 2))]
    if "Egress" in types:
        spec["egress"] = [rule("to") for _ in range(rng.randint(0, 2))]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


class PolicyChurn:
    """Writes, rewrites and deletes NetworkPolicy manifests burst-00 .. burst-59 at random."""

    def __init__(self, deployment, seed):
        self.d = deployment
        self.rng = random.Random(seed)
        self.files = {}  # file -> whether it exists now

    def change(self):
        number = self.rng.randrange(60)
        file = f"burst-{number:02d}.yaml"
        if self.files.get(file) and self.rng.random() < 0.2:
            self.d.remove(file)
            self.files[file] = False
        else:
            self.d.write(file, random_policy(self.rng, f"burst-{number:02d}"))
            self.files[file] = True

    @property
    def expected(self):
        """How many policies the manifests hold now."""
        return len(POLICIES) + sum(self.files.values())


def settle(d, policies, timeout=60):
    """
    Both daemons converged, on a netmaster that counts C{policies}, and still
    there a while later: the manifests source may not have read the last writes
    yet when the count first matches.
    """
    def settled():
        both = d.converged_now()
        return both is not None and both[0]["objects"]["NetworkPolicy"] == policies and both
    deadline = time.monotonic() + timeout
    while True:
        master, plugin = wait_for(settled, max(1, deadline - time.monotonic()),
                                  f"both daemons to settle on {policies} policies")
        time.sleep(1.5)
        later = settled()
        if later and later[0]["generation"] == master["generation"]:
            break
        assert time.monotonic() < deadline, f"still publishing:\n{d.netmaster.log()}"
    assert master["invalid_objects"] == 0, master["errors"]
    return master, plugin


def assert_fresh_start_agrees(d, prefix="fresh/"):
    """The flows now are the flows both daemons compute from scratch on the same manifests."""
    flows = d.flows()
    d.stop_roles()
    d.configure(prefix)  # an empty store prefix, and a new netplugin on the same bridge
    d.start_roles()
    fresh = d.flows()
    assert flows == fresh, flow_diff(flows, fresh)
    return flows


def test_burst_of_policy_changes_ends_where_a_fresh_start_does(deployment):
    d = deployment
    first, _ = d.start_roles()
    churn = PolicyChurn(d, 1000)
    started = time.monotonic()
    for change in range(1000):
        churn.change()
        if change % 50 == 49:
            # Over a few seconds, not all at once: the daemons publish and
            # apply generations in the middle of it.
            time.sleep(0.1)
    written = time.monotonic() - started
    master, _ = settle(d, churn.expected)
    converged = time.monotonic() - started
    flows = assert_fresh_start_agrees(d)
    assert sum(flows.values()) > 50
    print(f"1,000 changes written in {written:.2f} s, converged in {converged:.2f} s, "
          f"{master['generation'] - first['generation']} generations, "
          f"{sum(flows.values())} flows")


def test_memcached_restart_in_the_middle_of_policy_changes(deployment):
    """Publishes cut off half-way, an empty store, and more changes: nothing of it sticks."""
    d = deployment
    d.start_roles()
    full = d.netmaster.metric("contiv_netmaster_publishes_total", result="full")
    churn = PolicyChurn(d, 1001)
    for change in range(300):
        churn.change()
        if change == 150:
            d.memcached.stop()
        elif change == 200:
            d.memcached.start()
        time.sleep(0.01)
    settle(d, churn.expected)
    # Publishes failed during the outage, and a whole one followed it.
    assert d.netmaster.metric("contiv_netmaster_publishes_total", result="error") > 0
    assert d.netmaster.metric("contiv_netmaster_publishes_total", result="full") > full
    assert_fresh_start_agrees(d)


# -- 6. DNS floods ---------------------------------------------------------------------

UDP_RESULTS = ("hit", "nodata", "nxdomain", "forwarded", "truncated", "formerr", "notimp",
               "refused", "dropped", "servfail")
MALFORMED_RESULTS = ("formerr", "notimp", "dropped")
PACKET_IN_RESULTS = ("hit", "miss", "unparseable", "rate_limited", "too_large", "error",
                     "not_sent", "ignored")


@pytest.fixture
def dns_deployment(memcached, tmp_path):
    upstream = Dnsmasq(str(tmp_path), addresses={"outside.test": "192.0.2.77"},
                       log_queries=False)
    upstream.start()
    node = None
    try:
        node = make_deployment(memcached)
        node.dns_port = free_udp_tcp_port()
        node.write("service.yaml", SERVICE)
        node.configure("contiv/", plugin_args=(
            "--dns-listen", f"127.0.0.1:{node.dns_port}",
            "--dns-upstream", f"127.0.0.1:{upstream.port}", "--dns-datapath"))
        yield node
    finally:
        try:
            if node is not None:
                finish(node)
        finally:
            upstream.stop()


def udp_counts(daemon, results):
    text = daemon.get("/metrics", timeout=5)[1].decode()
    return {r: sample(text, "contiv_dns_queries_total", result=r, transport="udp")
            for r in results}


def start_dns_node(d):
    _, plugin = d.start_roles()
    wait_for(lambda: answered(d.dns_port) == ["10.96.0.10"], 20, "the name table")
    assert answered(d.dns_port, "outside.test") == ["192.0.2.77"]
    return plugin


def test_malformed_dns_flood_is_counted_and_the_server_keeps_answering(dns_deployment):
    """Short, random, cut and oversized packets at --dns-listen, valid queries mixed in."""
    d = dns_deployment
    plugin = start_dns_node(d)
    p = d.pods
    counted = udp_counts(d.netplugin, UDP_RESULTS)
    flood = malformed_flood(d.dns_port, 8.0, KNOWN)
    try:
        during = [answered(d.dns_port, timeout=1.0) for _ in range(5)]
        assert d.netplugin.healthy()
        generation = plugin["generation"]
        d.write("client-db.yaml", policy("allow-client-to-db", "db", ["client"],
                                         [{"protocol": "TCP", "port": 5432}]))
        _, plugin = d.converged(timeout=30, newer_than=generation)
        applied_during_flood = flood.poll() is None
        sent = json.loads(flood.communicate(timeout=30)[0])
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(timeout=10)
    d.netplugin.alive()
    assert applied_during_flood, "the policy change waited for the flood to end"
    assert ["10.96.0.10"] in during, during
    assert answered(d.dns_port) == ["10.96.0.10"]
    assert answered(d.dns_port, "outside.test") == ["192.0.2.77"]
    assert connects(p["client"], ip("db"), 5432)
    after = udp_counts(d.netplugin, UDP_RESULTS)
    delta = {r: after[r] - counted[r] for r in UDP_RESULTS}
    malformed = sum(delta[r] for r in MALFORMED_RESULTS)
    malformed_sent = sum(n for kind, n in sent.items() if kind != "valid")
    print(f"malformed flood: sent {sent}, counted {delta}")
    # Each packet the daemon read is counted once, by what became of it.
    assert sum(delta.values()) <= sum(sent.values()) + 20
    assert malformed > 0 and malformed <= malformed_sent
    # Short ones dropped, broken ones answered FORMERR: each class seen and counted.
    assert delta["dropped"] > 0 and delta["formerr"] > 0, delta
    assert delta["hit"] > 0


def test_dns_packet_in_flood_is_bounded_by_the_meter(dns_deployment):
    """UDP/53 from a pod as fast as it goes: the meter bounds what reaches the daemon."""
    d = dns_deployment
    plugin = start_dns_node(d)
    p = d.pods
    d.write("client-db.yaml", policy("allow-client-to-db", "db", ["client"],
                                     [{"protocol": "TCP", "port": 5432}]))
    _, plugin = d.converged(newer_than=plugin["generation"])
    intercept = plugin["datapath"]["dns_intercept"]
    assert intercept["limited_by"] == f"ovs meter {DNS_METER_ID}", intercept
    rate, burst = intercept["rate"], intercept["burst"]
    text = d.netplugin.get("/metrics", timeout=5)[1].decode()
    handled = sum(sample(text, "contiv_dns_datapath_packet_ins_total", result=r)
                  for r in PACKET_IN_RESULTS)
    metered, dropped = meter_stats(d.ovs, DNS_METER_ID)
    started = time.monotonic()
    flood = packet_in_flood(p["client"], ip("db"), 6.0, KNOWN)
    try:
        time.sleep(0.5)
        during = [answered(d.dns_port, timeout=1.0) for _ in range(5)]
        assert d.netplugin.healthy()
        generation = plugin["generation"]
        d.remove("client-db.yaml")
        _, plugin = d.converged(timeout=30, newer_than=generation)
        applied_during_flood = flood.poll() is None
        sent = int(flood.communicate(timeout=30)[0])
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(timeout=10)
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # what passed the meter reaches the daemon
    d.netplugin.alive()
    assert applied_during_flood, "the policy change waited for the flood to end"
    assert ["10.96.0.10"] in during, during
    metered_now, dropped_now = meter_stats(d.ovs, DNS_METER_ID)
    metered, dropped = metered_now - metered, dropped_now - dropped
    passed = metered - dropped
    text = d.netplugin.get("/metrics", timeout=5)[1].decode()
    handled = sum(sample(text, "contiv_dns_datapath_packet_ins_total", result=r)
                  for r in PACKET_IN_RESULTS) - handled
    print(f"packet-in flood: sent {sent} in {elapsed:.1f} s, metered {metered}, "
          f"dropped {dropped}, handled {handled}")
    assert sent > rate * elapsed, "the flood did not outrun the meter"
    assert dropped > 0
    assert passed <= burst + rate * elapsed + 50
    assert 0 < handled <= passed
    # Still answering, in the datapath and on the server, and enforcing the change.
    assert dig_from(p["client"], ip("db"), KNOWN) == ["10.96.0.10"]
    assert answered(d.dns_port) == ["10.96.0.10"]
    assert not connects(p["client"], ip("db"), 5432)


# -- 3. API server disconnects and 410s during changes ---------------------------------

NODES = ("node-1", "node-2")
NAMESPACES = ("default", "shop")


def k8s_namespace(name, team):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name,
                                                  "team": team}}}


def k8s_pod(name, namespace, node, address, app):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "ports": [
                {"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]}}


class ApiServerFaults(unittest.TestCase):
    """
    netmaster against the Kubernetes API test server (in this process, on
    trial's reactor) while the test changes the cluster and the server drops
    watches, cuts events in half and forgets its history: what it publishes
    in the end must be what a fresh netmaster publishes for the final objects.
    """

    timeout = 110

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="contiv-fapi-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.memcached = MemcachedServer()
        self.memcached.start()
        self.addCleanup(self.memcached.stop)
        self.store = MemcachedStore(reactor, [self.memcached.address])
        self.addCleanup(self.store.close)
        self.api = FakeApiServer(reactor, bookmark_interval=1.0)
        self.api.require_token("token-1")
        self.url = self.api.listen_tcp()
        self.addCleanup(self.api.stop)
        self.kubeconfig = write_kubeconfig(os.path.join(self.workdir, "kubeconfig"), self.url,
                                           token="token-1")
        self.processes: dict[str, Collector] = {}  # by store prefix

    def start_netmaster(self, prefix: str) -> int:
        """A netmaster on its own store prefix; its /readyz port."""
        port = free_port()
        process = Collector()
        args = [TWISTD, "--nodaemon", "--pidfile=", "contiv", "--role=netmaster",
                "--kubeconfig", self.kubeconfig, "--store",
                f"memcached://127.0.0.1:{self.memcached.port}", "--store-prefix", prefix,
                "--http", f"tcp:{port}:interface=127.0.0.1",
                # Two prefixes are two deployments: each elects its own leader.
                "--election-lease", f"contiv-netmaster-{prefix.strip('/')}"]
        transport = reactor.spawnProcess(process, TWISTD, args, env=contiv_env(),
                                         path=self.workdir)

        async def stop():
            if not process.ended.called:
                transport.signalProcess("TERM")
            try:
                await process.ended.addTimeout(20, reactor)
            except Exception:
                transport.signalProcess("KILL")
                raise
            output = process.output.decode(errors="replace")
            self.assertNotIn("Traceback", output)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        self.processes[prefix] = process
        return port

    async def netmaster_status(self, port: int):
        import treq

        try:
            response = await treq.get(f"http://127.0.0.1:{port}/readyz", timeout=2,
                                      persistent=False)
            return response.code, json.loads(await response.content())["roles"]["netmaster"]
        except Exception:
            return None

    async def in_sync(self, prefix: str, port: int, timeout: float = 30) -> dict:
        deadline = reactor.seconds() + timeout
        last = None
        while reactor.seconds() < deadline:
            process = self.processes[prefix]
            if process.ended.called:
                raise AssertionError(f"netmaster {prefix} exited:\n"
                                     f"{process.output.decode(errors='replace')[-3000:]}")
            last = await self.netmaster_status(port)
            if last is not None and last[0] == 200:
                return last[1]
            await sleep(0.1)
        raise AssertionError(f"netmaster {prefix} not in sync after {timeout} s: {last}")

    async def published(self, prefix: str) -> dict:
        """What each node, and the DNS server, would read from this prefix."""
        view = {}
        for node in NODES:
            reader = Reader(self.store, node, prefix=prefix)
            state = await reader.poll()
            self.assertIsNotNone(state, reader.problem)
            view[node] = (state.index, dict(state.policies), dict(state.groups))
        names = NameReader(self.store, prefix=prefix)
        table = await names.poll()
        self.assertIsNotNone(table, names.problem)
        view["names"] = dict(table.entries)
        return view

    def test_changes_through_drops_and_410s_end_as_a_fresh_start(self):
        return Deferred.fromCoroutine(self._changes_through_drops_and_410s())

    async def _changes_through_drops_and_410s(self):
        rng = random.Random(410)
        api = self.api
        for name, team in zip(NAMESPACES, "ab"):
            api.create(k8s_namespace(name, team))
        addresses = iter(f"10.244.{n // 200}.{n % 200 + 2}" for n in range(10_000))
        pods, policies = [], []

        def new_pod():
            name = f"pod-{len(pods) + rng.randrange(10**6)}"
            namespace = rng.choice(NAMESPACES)
            api.create(k8s_pod(name, namespace, rng.choice(NODES), next(addresses),
                               rng.choice(APPS)))
            pods.append(f"{namespace}/{name}")

        def new_policy():
            name = f"policy-{len(policies) + rng.randrange(10**6)}"
            namespace = rng.choice(NAMESPACES)
            api.create(random_policy(rng, name, namespace))
            policies.append(f"{namespace}/{name}")

        for _ in range(8):
            new_pod()
        for _ in range(4):
            new_policy()
        port_a = self.start_netmaster("a/")
        first = await self.in_sync("a/", port_a)
        self.assertEqual(first["objects"]["Pod"], 8)

        disruptions = {"drop": 0, "midway": 0, "410": 0, "garbage": 0}
        for step in range(150):
            choice = rng.random()
            if choice < 0.2 or not policies:
                new_policy()
            elif choice < 0.4:
                namespace, name = rng.choice(policies).split("/")
                api.update(random_policy(rng, name, namespace))
            elif choice < 0.5:
                key = policies.pop(rng.randrange(len(policies)))
                api.delete("NetworkPolicy", key)
            elif choice < 0.65 or not pods:
                new_pod()
            elif choice < 0.8:
                key = rng.choice(pods)
                pod = copy.deepcopy(api.objects["Pod"][key])
                pod["metadata"]["labels"]["app"] = rng.choice(APPS)
                api.update(pod)
            elif choice < 0.92:
                api.delete("Pod", pods.pop(rng.randrange(len(pods))))
            else:
                name = rng.choice(NAMESPACES)
                namespace = copy.deepcopy(api.objects["Namespace"][name])
                namespace["metadata"]["labels"]["team"] = rng.choice("ab")
                api.update(namespace)
            if step % 10 == 3:
                api.drop_watches()
                disruptions["drop"] += 1
            elif step % 10 == 6:
                api.drop_watches_midway()
                disruptions["midway"] += 1
            elif step % 25 == 9:
                # History gone and the watches with it: every kind must list again.
                api.compact()
                api.drop_watches()
                disruptions["410"] += 1
            elif step % 30 == 15:
                api.send_garbage()
                disruptions["garbage"] += 1
            await sleep(rng.uniform(0, 0.08))

        expected = {kind: len(objects) for kind, objects in api.objects.items() if objects}
        port_b = self.start_netmaster("b/")
        fresh = await self.in_sync("b/", port_b)
        self.assertEqual(fresh["objects"], expected)
        want = await self.published("b/")
        deadline = reactor.seconds() + 30
        while True:
            status = await self.in_sync("a/", port_a)
            got = await self.published("a/")
            if got == want and status["objects"] == expected:
                break
            if reactor.seconds() > deadline:
                differs = [key for key in want if got.get(key) != want[key]]
                self.fail(f"netmaster a/ never published what a fresh one does: {differs} "
                          f"differ; objects {status['objects']} against {expected}")
            await sleep(0.2)
        relists = {kind: k["relists"] for kind, k in status["source"]["kinds"].items()}
        # The faults happened: watches were re-established after 410s.
        self.assertTrue(all(count >= 2 for count in relists.values()), relists)
        print(f"API faults {disruptions}, relists {relists}, final objects {expected}")
