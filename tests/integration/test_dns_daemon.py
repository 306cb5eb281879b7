"""
The DNS server in the real daemon: twistd -n contiv on the embedded default
(the example manifests), a private dnsmasq as its upstream, dig as the client.
"""

import os
import re
import signal

import pytest

from tests.support.dns import Dnsmasq, dig, free_udp_tcp_port
from tests.support.processes import REPO, free_port, http_get, start_twistd, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = os.path.join(REPO, "examples", "manifests")


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.fixture
def upstream(tmp_path):
    server = Dnsmasq(str(tmp_path), addresses={"outside.test": "192.0.2.77"})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def daemon(tmp_path, upstream):
    dns_port = free_udp_tcp_port()
    http_port = free_port()
    log = str(tmp_path / "contiv.log")
    process = start_twistd(["--role=all", "--manifests", EXAMPLES,
                            "--http", f"tcp:{http_port}:interface=127.0.0.1",
                            "--dns-listen", f"127.0.0.1:{dns_port}",
                            "--dns-upstream", f"127.0.0.1:{upstream.port}",
                            "--dns-ttl", "17"], str(tmp_path), log)
    try:
        # The names come from the manifests through the store: wait for them,
        # not just for the socket.
        wait_for(lambda: process.poll() is None and
                 dig(dns_port, "web.default.svc.cluster.local", timeout=1).answers,
                 30, "the daemon to answer for the example Service")
        yield dns_port, http_port, log
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == -signal.SIGTERM, read(log)
    assert "Traceback" not in read(log), read(log)


def test_cluster_names_from_the_example_manifests(daemon, upstream):
    dns_port, _, _ = daemon
    web = dig(dns_port, "web.default.svc.cluster.local")
    assert web.status == "NOERROR" and "aa" in web.flags
    assert web.answers == [("web.default.svc.cluster.local.", "A", "10.96.0.10")]
    assert re.search(r"web\.default\.svc\.cluster\.local\.\s+17\s+IN\s+A", web.output)

    # Headless: the ready endpoints' addresses.
    db = dig(dns_port, "db.default.svc.cluster.local")
    assert [a[2] for a in db.answers] == ["10.244.1.21"]
    # Case is echoed as asked.
    mixed = dig(dns_port, "WeB.Default.SVC.cluster.local")
    assert mixed.answers == [("WeB.Default.SVC.cluster.local.", "A", "10.96.0.10")]
    # Pods and endpoint groups.
    pod = dig(dns_port, "web-1.default.pod.cluster.local")
    assert pod.status == "NOERROR" and len(pod.answers) == 1
    group = dig(dns_port, "web.default.epg.cluster.local")
    assert sorted(a[2] for a in group.answers) == sorted(
        a[2] for a in (dig(dns_port, "web-1.default.pod.cluster.local").answers
                       + dig(dns_port, "web-2.default.pod.cluster.local").answers))
    # SRV for a named port.
    srv = dig(dns_port, "_http._tcp.web.default.svc.cluster.local", "SRV")
    assert srv.answers and srv.answers[0][1] == "SRV"
    assert srv.answers[0][2].split()[2:] == ["80", "web.default.svc.cluster.local."]
    # Over TCP too.
    tcp = dig(dns_port, "web.default.svc.cluster.local", "A", "+tcp")
    assert tcp.answers == web.answers

    # The cluster's own names never reach the upstream.
    assert "cluster.local" not in upstream.log()


def test_unknown_cluster_name_is_nxdomain_with_soa(daemon, upstream):
    dns_port, _, _ = daemon
    missing = dig(dns_port, "nothere.default.svc.cluster.local")
    assert missing.status == "NXDOMAIN" and missing.answers == []
    assert re.search(r"AUTHORITY SECTION:\ncluster\.local\.\s+\d+\s+IN\s+SOA", missing.output)
    assert "nothere" not in upstream.log()


def test_other_names_are_forwarded_and_servfail_without_upstream(daemon, upstream):
    dns_port, http_port, _ = daemon
    outside = dig(dns_port, "outside.test")
    assert outside.status == "NOERROR"
    assert outside.answers == [("outside.test.", "A", "192.0.2.77")]
    assert "query[A] outside.test" in upstream.log()

    upstream.stop()
    failed = dig(dns_port, "elsewhere.test", timeout=8)
    assert failed.status == "SERVFAIL"
    # The name table still answers with the upstream gone.
    assert dig(dns_port, "web.default.svc.cluster.local").answers

    code, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
    text = body.decode()
    assert code == 200
    hits = re.search(r'contiv_dns_queries_total\{result="hit",transport="udp"\} (\S+)', text)
    assert hits and float(hits.group(1)) >= 2, text
    assert re.search(r'contiv_dns_queries_total\{result="servfail",transport="udp"\} 1\.0',
                     text), text
