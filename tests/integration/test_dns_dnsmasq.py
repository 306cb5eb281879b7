"""
The DNS server as a resolver sees it: a real dnsmasq upstream, contiv's DNS
server in its own process, and dig.

The server runs from tests/support/dns_child.py (the same DnsServerService,
Answerer and Forwarder under the real reactor) so that the name table can be
given directly; tests/integration/test_dns_daemon.py drives the whole daemon.
"""

from __future__ import annotations

import json

import pytest

from contiv.dns.names import NameEntry
from tests.support.dns import ContivDns, Dnsmasq, dig

pytestmark = pytest.mark.integration

BIG = 300
MANY_UPSTREAM = 100  # addresses of one upstream name: more than a UDP reply holds


@pytest.fixture
def upstream(tmp_path):
    server = Dnsmasq(str(tmp_path), addresses={"example.test": "192.0.2.7"},
                     hosts="198.51.100.9 only-upstream.test\n" + "".join(
                         f"203.0.113.{i + 1} many.test\n" for i in range(MANY_UPSTREAM)),
                     local=("test",))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def contiv(tmp_path, upstream):
    names = tmp_path / "names.json"
    names.write_text(json.dumps([entry.to_json() for entry in [
        NameEntry("svc", "default", "web", ("10.96.0.10", "fd00::10")),
        NameEntry("pod", "prod", "web-1.cache", ("10.1.2.3",)),
        NameEntry("epg", "prod", "frontend", ("10.1.1.1", "10.1.1.2")),
        NameEntry("svc", "default", "big", tuple(f"10.200.{i // 250}.{i % 250 + 1}"
                                               for i in range(BIG))),
    ]]))
    server = ContivDns(str(tmp_path), [upstream.port], names_file=str(names), timeout=1.0)
    server.start()
    yield server
    server.stop()


def addresses(result):
    return sorted(data for _, rtype, data in result.answers if rtype in ("A", "AAAA"))


def test_hits_are_answered_without_the_upstream(contiv, upstream):
    result = dig(contiv.port, "WeB.DeFault.SVC.cluster.LOCAL")
    assert result.status == "NOERROR" and "aa" in result.flags, result.output
    assert result.answers == [("WeB.DeFault.SVC.cluster.LOCAL.", "A", "10.96.0.10")]
    assert addresses(dig(contiv.port, "web.default.svc.cluster.local", "AAAA")) == ["fd00::10"]
    assert addresses(dig(contiv.port, "web-1.cache.prod.pod.cluster.local")) == ["10.1.2.3"]
    assert addresses(dig(contiv.port, "frontend.prod.epg.cluster.local")) == [
        "10.1.1.1", "10.1.1.2"]
    # dig from 127.0.0.1, which is no pod: bare names are default's.
    assert addresses(dig(contiv.port, "web")) == ["10.96.0.10"]
    result = dig(contiv.port, "nope.default.svc.cluster.local")
    assert result.status == "NXDOMAIN" and "cluster.local." in result.output
    assert "cluster.local" not in upstream.log()


def test_misses_are_forwarded_to_dnsmasq(contiv, upstream):
    result = dig(contiv.port, "www.example.test")
    assert result.status == "NOERROR", result.output
    assert addresses(result) == ["192.0.2.7"]
    assert addresses(dig(contiv.port, "only-upstream.test")) == ["198.51.100.9"]
    assert dig(contiv.port, "missing.test").status == "NXDOMAIN"
    log = upstream.log()
    assert "query[A] www.example.test" in log and "query[A] only-upstream.test" in log


def test_tcp(contiv, upstream):
    assert addresses(dig(contiv.port, "web.default.svc.cluster.local", "A", "+tcp")) == [
        "10.96.0.10"]
    assert addresses(dig(contiv.port, "www.example.test", "A", "+tcp")) == ["192.0.2.7"]


def test_truncated_upstream_answer_is_fetched_again_over_tcp(contiv, upstream):
    # Over UDP the client gets what the upstream sent: truncated, TC set.
    udp = dig(contiv.port, "many.test", "A", "+ignore", "+bufsize=1232")
    assert "tc" in udp.flags and len(udp.answers) < MANY_UPSTREAM, udp.output
    # A TCP client must not get a truncated answer: the forwarder's UDP try
    # comes back truncated and it asks the upstream again over TCP.
    tcp = dig(contiv.port, "many.test", "A", "+tcp", "+bufsize=1232")
    assert "tc" not in tcp.flags, tcp.output
    assert len(addresses(tcp)) == MANY_UPSTREAM, tcp.output


def test_large_answers_are_truncated_over_udp_and_whole_over_tcp(contiv):
    for edns in ("+noedns", "+bufsize=1232"):
        result = dig(contiv.port, "big.default.svc.cluster.local", "A", "+ignore", edns)
        assert "tc" in result.flags, result.output
        assert 0 < len(result.answers) < BIG
    # Without +ignore dig does what a resolver does: retries over TCP.
    result = dig(contiv.port, "big.default.svc.cluster.local")
    assert "tc" not in result.flags and len(result.answers) == BIG, result.output


def test_servfail_once_the_upstream_is_gone(contiv, upstream):
    assert dig(contiv.port, "www.example.test").status == "NOERROR"
    upstream.stop()
    result = dig(contiv.port, "other.example.test", timeout=5)
    assert result.status == "SERVFAIL", result.output
    # Our own names do not depend on the upstream.
    assert addresses(dig(contiv.port, "web.default.svc.cluster.local")) == ["10.96.0.10"]
