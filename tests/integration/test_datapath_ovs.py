"""
Policy enforced in a real Open vSwitch: a private userspace bridge, pods as
network namespaces on veth ports, the real daemon (twistd --role=all) on a
manifests directory, and real TCP, UDP and ICMP between the pods.
"""

from __future__ import annotations

import os
import random
import re
import signal
import tempfile
import shutil

import pytest

from contiv.ctl.ovs import parse_trace, trace_args, trace_spec
from tests.support import ovs as ovs_support
from tests.support.ovs import run
from tests.support.k8s_semantics import connection_allowed, manifest_objects
from tests.support.ovs_node import PODS, Node, ip
from tests.support.processes import free_port, http_get, wait_for
from tests.support.traffic import Pinger, connects, pings

pytestmark = pytest.mark.integration


@pytest.fixture
def node():
    missing = ovs_support.available()
    if missing:
        pytest.fail(f"a private Open vSwitch cannot run here: {missing}")
    workdir = tempfile.mkdtemp(prefix="contiv-ovs-")
    node = Node(workdir)
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_policies_enforced_with_real_traffic(node):
    node.start_daemon()
    status = node.ready()
    assert status["roles"]["netplugin"]["state"] == "applied"
    p = node.pods
    assert connects(p["client"], ip("web"), 80)            # named port http
    assert not connects(p["client"], ip("web"), 5432)      # web only opens http to client
    assert not connects(p["client"], ip("db"), 5432)       # client must go through web
    assert connects(p["web"], ip("db"), 5432)
    assert not connects(p["db"], ip("web"), 80)
    assert not connects(p["web"], ip("db"), 5432, proto="udp")  # the rule says TCP
    assert connects(p["monitor"], ip("web"), 5432, proto="udp")  # no ports: everything
    assert pings(p["monitor"], ip("web"))
    assert not pings(p["client"], ip("web"))
    assert not pings(p["web"], ip("client"))               # the default deny
    assert node.contiv_flows(), "the pipeline is installed with contiv's cookie"


def test_established_connection_survives_policy_removal(node):
    node.start_daemon()
    node.ready()
    p = node.pods
    stream = Pinger(p["monitor"], ip("web"))
    wait_for(lambda: pings(p["monitor"], ip("web")), 10, "monitor to reach web")
    generation = node.ready()["roles"]["netplugin"]["generation"]
    os.unlink(os.path.join(node.manifests, "monitor-web.yaml"))
    wait_for(lambda: node.ready()["roles"]["netplugin"]["generation"] > generation, 20,
             "the policy removal to be applied")
    assert not pings(p["monitor"], ip("web"))  # a new flow is denied now...
    sent, received = stream.stop()
    assert sent > 20 and received == sent  # ...the established one never broke


def test_netplugin_restart_under_traffic(node):
    daemon = node.start_daemon()
    node.ready()
    first_round = {c >> 32 for c in node.contiv_flows()}
    assert len(first_round) == 1
    p = node.pods
    allowed = Pinger(p["monitor"], ip("web"))
    denied = Pinger(p["client"], ip("web"))
    wait_for(lambda: pings(p["monitor"], ip("web")), 10, "monitor to reach web")
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(timeout=10)
    assert pings(p["monitor"], ip("web"))  # flows outlive the daemon (fail-secure)
    assert not pings(p["client"], ip("web"))
    node.start_daemon()
    node.ready()
    assert pings(p["monitor"], ip("web"))
    allowed_sent, allowed_received = allowed.stop()
    denied_sent, denied_received = denied.stop()
    assert allowed_sent > 20 and allowed_received == allowed_sent
    assert denied_sent > 20 and denied_received == 0
    rounds = {c >> 32 for c in node.contiv_flows()}
    assert len(rounds) == 1 and rounds != first_round, "only the new round is left"


def test_ovs_restart_flows_come_back(node):
    node.start_daemon()
    node.ready()
    before = len(node.contiv_flows())
    node.ovs.restart_vswitchd()
    wait_for(lambda: len(node.contiv_flows()) == before, 30, "the flows to be reinstalled")
    node.ready()
    p = node.pods
    assert connects(p["client"], ip("web"), 80)
    assert not connects(p["client"], ip("db"), 5432)


def trace_allows(node, src, dst, proto, port):
    """OVS's verdict, asked the way contivctl explain asks it (contiv.ctl.ovs)."""
    src_pod = node.pods[src]
    flow = trace_spec(src_pod.ofport, proto, ip(src), ip(dst), port, src_mac=src_pod.mac,
                      dst_mac=node.pods[dst].mac)
    traced = parse_trace(node.ovs.appctl(*trace_args(node.ovs.bridge, flow)))
    # One "Datapath actions" per pass: before conntrack, and after the recirculation.
    assert len(traced.passes) == 2, traced.output
    return traced.allowed


def test_trace_agrees_with_kubernetes_semantics(node):
    node.start_daemon()
    node.ready()
    objects = manifest_objects(node.manifests)
    probes = 0
    for src in PODS:
        for dst in PODS:
            if src == dst:
                continue
            for proto in ("tcp", "udp", "sctp"):
                for port in (80, 5432, 8080):
                    expected = connection_allowed(objects, ip(src), ip(dst), proto.upper(), port)
                    assert trace_allows(node, src, dst, proto, port) == expected, \
                        (src, dst, proto, port, expected)
                    probes += 1
    assert probes == 12 * 9


def dig_from(pod, server, name, timeout=2):
    result = pod.exec(["dig", f"@{server}", "+short", f"+time={timeout}", "+tries=1", name],
                      check=False, timeout=timeout * 3 + 20)
    return result.stdout.split() if result.returncode == 0 else None


def test_dns_answered_in_the_datapath_by_the_daemon(node):
    """--dns-datapath: a pod's query to any resolver is answered by the bridge."""
    node.write("service.yaml", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    node.start_daemon("--dns-datapath")
    node.ready()
    p = node.pods
    # The "resolver" is the db pod, which runs none: only the bridge can answer.
    assert wait_for(lambda: dig_from(p["client"], ip("db"), "web.default.svc.cluster.local"),
                    20, "the bridge to answer") == ["10.96.0.10"]
    assert dig_from(p["client"], ip("db"), "web") == ["10.96.0.10"]  # bare, in default
    # A miss goes on to that resolver through the policy, which denies it
    # (default deny ingress on db): no answer, and nothing answered for it.
    assert dig_from(p["client"], ip("db"), "outside.test", timeout=1) is None
    code, body = http_get(f"http://127.0.0.1:{node.port}/metrics")
    assert re.search(r'contiv_dns_datapath_packet_ins_total\{result="hit"\} [1-9]',
                     body.decode()), body.decode()
    assert re.search(r'contiv_dns_datapath_packet_ins_total\{result="miss"\} [1-9]',
                     body.decode()), body.decode()


def test_tcp_openflow_endpoint_finds_its_bridge_by_datapath_id(node):
    """--openflow tcp:HOST:PORT names no bridge: OVSDB's datapath_id does."""
    # ovs-vswitchd runs in the sandbox's own network namespace: a link into it
    # gives the bridge's controller listener an address this host reaches.
    netns, tag = node.ovs.switch_netns, node.ovs.tag
    subnet = f"169.254.{random.randrange(1, 255)}"
    run(["ip", "link", "add", f"h{tag}", "type", "veth", "peer", "name", f"s{tag}",
         "netns", netns])
    run(["ip", "addr", "add", f"{subnet}.1/30", "dev", f"h{tag}"])
    run(["ip", "link", "set", f"h{tag}", "up"])
    run(["ip", "netns", "exec", netns, "ip", "addr", "add", f"{subnet}.2/30", "dev", f"s{tag}"])
    run(["ip", "netns", "exec", netns, "ip", "link", "set", f"s{tag}", "up"])
    port = free_port()
    # The bridge listens for its controller (passive), as DESIGN's example endpoint expects.
    node.ovs.vsctl("set-controller", node.ovs.bridge, f"ptcp:{port}:{subnet}.2")
    node.ovs.vsctl("set", "controller", node.ovs.bridge, "connection-mode=out-of-band")
    node.start_daemon("--openflow", f"tcp:{subnet}.2:{port}")
    status = node.ready()
    assert status["roles"]["netplugin"]["state"] == "applied"
    round_ = node.ovs.vsctl("get", "bridge", node.ovs.bridge, "external_ids:contiv-round")
    assert round_.strip('"') == str(status["roles"]["netplugin"]["datapath"]["round"])
    assert node.ovs.vsctl("get", "bridge", node.ovs.bridge, "fail_mode") == "secure"
    p = node.pods
    assert connects(p["client"], ip("web"), 80)
    assert not connects(p["client"], ip("db"), 5432)
    assert f"to bridge {node.ovs.bridge}" in open(node.log).read()
