"""
DNS interception in a real Open vSwitch: a private userspace bridge, a client
pod and an "upstream" pod running dnsmasq as network namespaces on it, and the
datapath manager with DNS interception connected in-process (under trial's
reactor, as test_openflow_ovs does). The client asks the upstream with dig;
a name in our table is answered by the bridge (the upstream never sees it),
any other by the upstream.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Callable, Optional

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from contiv.datapath.manager import DatapathManager
from contiv.datapath.ovsdb import BridgeSettings
from contiv.datapath.pipeline import DNS_METER_ID
from contiv.dns.answer import Answerer
from contiv.dns.datapath import DnsInterceptor
from contiv.dns.names import NameEntry, NameTable
from contiv.metrics import REGISTRY
from contiv.openflow.client import OpenFlowClient
from contiv.policy.types import LocalPod, NodeIndex
from contiv.tap import DnsParts
from contiv.store.layout import NodeState
from tests.support import ovs as ovs_support
from tests.support import reactor_process as waiting
from tests.support.processes import stop_process
from tests.support.reactor_process import sleep

pytestmark = pytest.mark.integration

WAIT = 20.0
CLIENT_IP = "10.244.1.31"
UPSTREAM_IP = "10.244.1.53"
KNOWN = "web.default.svc.cluster.local"
KNOWN_ADDRESS = "10.96.0.20"
UNKNOWN = "nothere.default.svc.cluster.local"
OUTSIDE = "outside.test"
OUTSIDE_ADDRESS = "192.0.2.44"
RATE, BURST = 200, 50  # the meter: low, so that a short flood overflows it for sure


def within(d: Deferred, timeout: float = WAIT) -> Deferred:
    return waiting.within(d, timeout)


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    return await waiting.eventually(predicate, what, timeout)


def count(result: str) -> float:
    return REGISTRY.get_sample_value("contiv_dns_datapath_packet_ins_total",
                                     {"result": result}) or 0


# A flood from one socket, as fast as Python sends: the known name, so that
# whatever passes the meter is answered by the bridge, not the upstream.
FLOOD = """
import socket, struct, sys, time
count, target = int(sys.argv[1]), sys.argv[2]
name = b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[3].split(".")) + b"\\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
deadline = time.monotonic() + 5
for i in range(count):
    s.sendto(struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\\0\\1\\0\\1",
             (target, 53))
    if time.monotonic() > deadline:
        break
print(i + 1)
"""


class DnsDatapathTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        missing = ovs_support.available()
        if missing is None and (shutil.which("dnsmasq") is None or shutil.which("dig") is None):
            missing = "dnsmasq and dig are needed"
        if missing is not None:
            raise unittest.SkipTest(f"private OVS unavailable: {missing}")
        # Short and absolute: unix socket paths are limited to 107 bytes.
        self.workdir = tempfile.mkdtemp(prefix="contiv-dns-")
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.ovs = ovs_support.PrivateOVS(os.path.join(self.workdir, "ovs"))
        self.addCleanup(self.ovs.stop)  # before start(): a failed start leaves daemons too
        self.ovs.start()
        self.client = self.ovs.add_pod("client", CLIENT_IP)
        self.upstream = self.ovs.add_pod("upstream", UPSTREAM_IP)
        self.dnsmasq_log = os.path.join(self.workdir, "dnsmasq.log")
        self.dnsmasq = self.upstream.popen([
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--bind-interfaces", f"--listen-address={UPSTREAM_IP}",
            "--port=53", f"--address=/{OUTSIDE}/{OUTSIDE_ADDRESS}", "--log-queries",
            f"--log-facility={self.dnsmasq_log}", "--user=root", "--pid-file="])
        self.addCleanup(self._stop_dnsmasq)

    def _stop_dnsmasq(self) -> None:
        stop_process(self.dnsmasq)

    def upstream_log(self) -> str:
        try:
            with open(self.dnsmasq_log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def upstream_saw(self, name: str) -> bool:
        return re.search(rf"query\[A\] {re.escape(name)} from {re.escape(CLIENT_IP)}",
                         self.upstream_log()) is not None

    async def start_node(self) -> DatapathManager:
        table = NameTable.of([NameEntry("svc", "default", "web", (KNOWN_ADDRESS,))])
        # The daemon's own wiring (twistd contiv --dns-datapath): what it
        # answers in the datapath and what it lets through.
        dns = DnsParts(Answerer(table), None, True)
        answer_query = dns.answer_datapath

        settings = BridgeSettings(reactor, self.ovs.bridge, db=f"unix:{self.ovs.db_socket}",
                                  env=self.ovs.env)
        manager = DatapathManager(reactor, settings, dns_intercept=True, dns_rate=RATE,
                                  dns_burst=BURST)
        self.interceptor = DnsInterceptor(answer_query, manager, clock=reactor, rate=RATE,
                                          burst=BURST)
        pods = tuple(sorted((LocalPod(f"default/{pod.name}", (pod.ip,))
                             for pod in (self.client, self.upstream)), key=lambda p: p.key))
        manager.update(NodeState(1, NodeIndex("node-1", (), (), pods), {}, {}))
        client = OpenFlowClient(reactor, f"unix:{self.ovs.mgmt_socket}",
                                on_connect=manager.connected,
                                on_packet_in=self.interceptor.packet_in)
        client.startService()
        self.addCleanup(client.stopService)
        await eventually(lambda: manager.applied_generation == 1, "the pipeline installed")
        self.assertIsNone(manager.last_error)
        self.assertTrue(manager.dns_metered, manager.status())
        await eventually(lambda: os.path.exists(self.dnsmasq_log) and "started" in
                         self.upstream_log(), "dnsmasq to start")
        return manager

    async def in_client(self, *args: str, timeout: float = WAIT) -> str:
        out, err, code = await within(getProcessOutputAndValue(
            "ip", ["netns", "exec", self.client.netns, *args], env=dict(os.environ),
            reactor=reactor), timeout)
        self.assertEqual(code, 0, f"{args}: {err.decode(errors='replace')}")
        return out.decode()

    async def dig(self, name: str, port: Optional[int] = None) -> list[str]:
        source = ["-b", f"{CLIENT_IP}#{port}"] if port else []
        out = await self.in_client("dig", "+time=2", "+tries=1", "+short", *source,
                                   f"@{UPSTREAM_IP}", name)
        return out.split()

    def meter_stats(self) -> tuple[int, int]:
        """(packets into the DNS meter, packets its drop band dropped)."""
        out = self.ovs.ofctl("meter-stats", self.ovs.bridge, f"meter={DNS_METER_ID}").stdout
        metered = re.search(r"packet_in_count:(\d+)", out)
        dropped = re.search(r"\d+: packet_count:(\d+)", out)
        self.assertTrue(metered and dropped, out)
        return int(metered.group(1)), int(dropped.group(1))

    async def test_known_names_from_the_bridge_others_from_the_upstream(self) -> None:
        await self.start_node()
        hits, misses = count("hit"), count("miss")
        self.assertEqual(await self.dig(KNOWN), [KNOWN_ADDRESS])
        self.assertEqual(count("hit"), hits + 1)
        self.assertEqual(await self.dig(OUTSIDE), [OUTSIDE_ADDRESS])
        self.assertEqual(count("miss"), misses + 1)
        await eventually(lambda: self.upstream_saw(OUTSIDE), "the upstream to log the query")
        self.assertFalse(self.upstream_saw(KNOWN), self.upstream_log())
        # A cluster name we do not know is the pod's resolver's to answer too.
        await self.dig(UNKNOWN)
        await eventually(lambda: self.upstream_saw(UNKNOWN), "the upstream to see the unknown")

    async def test_a_reused_source_port_is_still_intercepted(self) -> None:
        await self.start_node()
        port = 40053
        # A miss first: policy commits its 5-tuple, so what follows on the
        # same port is conntrack-established.
        self.assertEqual(await self.dig(OUTSIDE, port), [OUTSIDE_ADDRESS])
        await eventually(lambda: self.upstream_saw(OUTSIDE), "the upstream to log the query")
        conntrack = self.ovs.appctl("dpctl/dump-conntrack")
        self.assertIn("dport=53", conntrack)
        hits = count("hit")
        for _ in range(2):
            self.assertEqual(await self.dig(KNOWN, port), [KNOWN_ADDRESS])
        self.assertEqual(count("hit"), hits + 2)
        self.assertFalse(self.upstream_saw(KNOWN), self.upstream_log())
        # and a miss on the established tuple still reaches the upstream
        before = self.upstream_log().count(f"query[A] {OUTSIDE}")
        self.assertEqual(await self.dig(OUTSIDE, port), [OUTSIDE_ADDRESS])
        await eventually(lambda: self.upstream_log().count(f"query[A] {OUTSIDE}") > before,
                         "the second outside query at the upstream")

    async def test_a_flood_is_metered_and_the_daemon_stays_responsive(self) -> None:
        manager = await self.start_node()
        self.assertEqual(self.meter_stats(), (0, 0))
        results = ("hit", "miss", "unparseable", "error", "too_large")
        handled = sum(count(r) for r in results)
        started = reactor.seconds()
        sent = int(await self.in_client("python3", "-c", FLOOD, "3000", UPSTREAM_IP, KNOWN,
                                        timeout=30))
        elapsed = reactor.seconds() - started
        self.assertGreater(sent, 1000)
        await sleep(0.5)  # what passed the meter reaches us
        metered, dropped = self.meter_stats()
        handled = sum(count(r) for r in results) - handled
        passed = metered - dropped
        # Not every packet sent reaches the bridge (the userspace datapath
        # drops at its receive queue under a flood on two cores); of those
        # that do, the meter lets through its burst and rate, no more, and
        # drops the rest; we handle no more than it let through.
        self.assertGreater(dropped, 0)
        self.assertLessEqual(passed, BURST + RATE * elapsed + 10)
        self.assertLessEqual(handled, passed)
        self.assertGreater(handled, 0)
        # Responsive: the next query is answered as before.
        self.assertEqual(await self.dig(KNOWN), [KNOWN_ADDRESS])
        self.assertFalse(self.upstream_saw(KNOWN), self.upstream_log())
        self.assertIsNone(manager.last_error)
