"""
The OpenFlow 1.3 connection against a real, private Open vSwitch (userspace
datapath, its own network namespace), reached over the bridge's management
socket as the daemon reaches it. Each test starts its own OVS and stops it.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from typing import Any, Callable, Optional

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from contiv.openflow.client import OpenFlowClient
from contiv.openflow.ofp import DATAPATH, ofproto, parser
from contiv.openflow.protocol import OpenFlowError, OpenFlowProtocol, PipelineError
from tests.support import ovs as ovs_support
from tests.support import reactor_process as waiting
from tests.support.reactor_process import sleep

pytestmark = pytest.mark.integration

WAIT = 20.0
COOKIE = 0xC0DE000000000000
COOKIE_MASK = 0xFFFF000000000000


def within(d: Deferred, timeout: float = WAIT) -> Deferred:
    return waiting.within(d, timeout)


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    return await waiting.eventually(predicate, what, timeout)


def ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def flow_mod(table_id: int, priority: int, dst: str, *, goto: Optional[int] = None,
             cookie: int = COOKIE, **match: Any) -> Any:
    if goto is not None:
        instructions = [parser.OFPInstructionGotoTable(goto)]
    else:
        instructions = [parser.OFPInstructionActions(
            ofproto.OFPIT_APPLY_ACTIONS, [parser.OFPActionOutput(ofproto.OFPP_NORMAL)])]
    match.setdefault("eth_type", 0x0800)
    return parser.OFPFlowMod(DATAPATH, cookie=cookie, table_id=table_id, priority=priority,
                             match=parser.OFPMatch(ipv4_dst=dst, **match),
                             instructions=instructions)


def frame() -> bytes:
    """A broadcast Ethernet frame, padded to the minimum size."""
    return (b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x88B5)
            + b"contiv-packet-out".ljust(46, b"\0"))


class OpenFlowOVSTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        missing = ovs_support.available()
        if missing is not None:
            raise unittest.SkipTest(f"private OVS unavailable: {missing}")
        # Short and absolute: unix socket paths are limited to 107 bytes.
        workdir = tempfile.mkdtemp(prefix="contiv-ovs-")
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        self.ovs = ovs_support.PrivateOVS(workdir)
        # Registered before start(): a failed start leaves daemons to stop too.
        self.addCleanup(self.ovs.stop)
        self.ovs.start()
        self.connected: list[OpenFlowProtocol] = []
        self.packet_ins: list[Any] = []

    async def client(self) -> tuple[OpenFlowClient, OpenFlowProtocol]:
        client = OpenFlowClient(reactor, f"unix:{self.ovs.mgmt_socket}",
                                on_connect=self.connected.append,
                                on_packet_in=self.packet_ins.append)
        client.startService()
        self.addCleanup(client.stopService)
        protocol = await within(client.whenConnected())
        return client, protocol

    async def our_flows(self, protocol: OpenFlowProtocol, table_id: int = ofproto.OFPTT_ALL
                        ) -> list:
        return await within(protocol.flow_stats(table_id=table_id, cookie=COOKIE,
                                                cookie_mask=COOKIE_MASK))

    def dumped(self, *filters: str) -> list[str]:
        spec = ",".join((f"cookie=0x{COOKIE:x}/0x{COOKIE_MASK:x}", *filters))
        out = self.ovs.ofctl("dump-flows", self.ovs.bridge, spec).stdout
        return [line for line in out.splitlines() if "cookie=" in line]

    async def test_handshake_over_the_management_socket(self) -> None:
        client, protocol = await self.client()
        self.assertEqual(protocol.version, 4)
        expected = int(self.ovs.vsctl("get", "bridge", self.ovs.bridge,
                                      "datapath_id").strip('"'), 16)
        self.assertEqual(protocol.datapath_id, expected)
        self.assertEqual(self.connected, [protocol])
        self.assertGreater(protocol.features.n_tables, 10)

    async def test_thousand_flow_mods_pipelined_then_one_barrier(self) -> None:
        client, protocol = await self.client()
        protocol.send_many(flow_mod(0, 100, ip(i)) for i in range(1000))
        await within(protocol.barrier())
        stats = await self.our_flows(protocol)
        self.assertEqual(len(stats), 1000)
        self.assertEqual({s.match["ipv4_dst"] for s in stats}, {ip(i) for i in range(1000)})
        self.assertEqual(len(self.dumped()), 1000)

    async def test_rejected_flow_mods_fail_with_decoded_errors(self) -> None:
        client, protocol = await self.client()
        # A goto to an earlier table, as a request: its own Deferred fails.
        with self.assertRaises(OpenFlowError) as caught:
            await within(protocol.request(flow_mod(3, 10, "10.0.0.1", goto=1)))
        e = caught.exception
        self.assertEqual((e.type_name, e.code_name), ("OFPET_BAD_INSTRUCTION",
                                                      "OFPBIC_BAD_TABLE_ID"))
        self.assertEqual(e.request_type_name, "OFPT_FLOW_MOD")

        # Pipelined among good ones: the barrier names the bad one by xid. A
        # TCP port without ip_proto breaks a match prerequisite.
        first = protocol.send_many(flow_mod(0, 10, ip(i)) for i in range(50))
        bad = protocol.send(flow_mod(0, 10, "10.9.9.9", tcp_dst=80))
        protocol.send_many(flow_mod(0, 10, ip(i)) for i in range(50, 100))
        with self.assertRaises(PipelineError) as caught:
            await within(protocol.barrier(since=first))
        self.assertEqual([(x.xid, x.type_name, x.code_name) for x in caught.exception.errors],
                         [(bad, "OFPET_BAD_MATCH", "OFPBMC_BAD_PREREQ")])
        self.assertEqual(len(await self.our_flows(protocol)), 100)
        await within(protocol.barrier())  # reported once

    async def test_atomic_bundle_with_a_bad_flow_applies_nothing(self) -> None:
        client, protocol = await self.client()
        bundle = await within(protocol.open_bundle())
        for i in range(20):
            protocol.add_to_bundle(bundle, flow_mod(1, 10, ip(i)))
        bad = protocol.add_to_bundle(bundle, flow_mod(3, 10, "10.9.9.9", goto=1))
        for i in range(20, 40):
            protocol.add_to_bundle(bundle, flow_mod(1, 10, ip(i)))
        with self.assertRaises(PipelineError) as caught:
            await within(protocol.commit_bundle(bundle))
        self.assertEqual([(x.xid, x.code_name) for x in caught.exception.errors],
                         [(bad, "OFPBIC_BAD_TABLE_ID")])
        self.assertEqual(await self.our_flows(protocol), [])
        self.assertEqual(self.dumped(), [])

    async def test_bundle_failing_at_commit_applies_nothing(self) -> None:
        # A table that refuses a second flow: the add is valid, the commit is not.
        self.ovs.vsctl("--", "--id=@t", "create", "Flow_Table", "flow_limit=1",
                       "overflow_policy=refuse", "--", "set", "bridge", self.ovs.bridge,
                       "flow_tables:5=@t")
        client, protocol = await self.client()
        bundle = await within(protocol.open_bundle())
        protocol.add_to_bundle(bundle, flow_mod(2, 10, "10.0.0.1"))
        protocol.add_to_bundle(bundle, flow_mod(5, 10, "10.0.0.2"))
        full = protocol.add_to_bundle(bundle, flow_mod(5, 10, "10.0.0.3"))
        with self.assertRaises(PipelineError) as caught:
            await within(protocol.commit_bundle(bundle))
        errors = caught.exception.errors
        self.assertEqual([(x.xid, x.code_name) for x in errors],
                         [(full, "OFPFMFC_TABLE_FULL"), (errors[-1].xid, "ONFERR_ET_FAILED")])
        self.assertEqual(await self.our_flows(protocol), [])

    async def test_good_bundle_applies_all(self) -> None:
        client, protocol = await self.client()
        protocol.send(flow_mod(1, 10, "10.200.0.1"))
        bundle = await within(protocol.open_bundle())
        # Deletes and adds in one bundle: no packet sees a half-applied state.
        delete = parser.OFPFlowMod(DATAPATH, cookie=COOKIE, cookie_mask=COOKIE_MASK,
                                   table_id=ofproto.OFPTT_ALL, command=ofproto.OFPFC_DELETE,
                                   out_port=ofproto.OFPP_ANY, out_group=ofproto.OFPG_ANY)
        protocol.add_to_bundle(bundle, delete)
        for i in range(300):
            protocol.add_to_bundle(bundle, flow_mod(1, 10, ip(i)))
        self.assertEqual(len(await self.our_flows(protocol)), 1)  # nothing before the commit
        await within(protocol.commit_bundle(bundle))
        stats = await self.our_flows(protocol, table_id=1)
        self.assertEqual({s.match["ipv4_dst"] for s in stats}, {ip(i) for i in range(300)})
        self.assertEqual(len(self.dumped("table=1")), 300)

    async def packet_out(self, protocol: OpenFlowProtocol) -> None:
        protocol.send(parser.OFPPacketOut(
            DATAPATH, buffer_id=ofproto.OFP_NO_BUFFER, in_port=ofproto.OFPP_CONTROLLER,
            actions=[parser.OFPActionOutput(ofproto.OFPP_CONTROLLER, ofproto.OFPCML_NO_BUFFER)],
            data=frame()))
        await within(protocol.barrier())

    async def test_set_async_then_packet_out_to_controller_comes_back(self) -> None:
        client, protocol = await self.client()
        # A service connection gets no packet-in until it asks.
        await self.packet_out(protocol)
        await sleep(0.3)
        self.assertEqual(self.packet_ins, [])
        await within(protocol.set_async(packet_in_mask=1 << ofproto.OFPR_ACTION))
        await self.packet_out(protocol)
        await eventually(lambda: self.packet_ins, "a packet-in")
        (msg,) = self.packet_ins
        self.assertEqual(msg.data, frame())
        self.assertEqual(msg.reason, ofproto.OFPR_ACTION)

    async def test_restart_of_ovs_reconnects_and_calls_on_connect_again(self) -> None:
        client, first = await self.client()
        first.send(flow_mod(0, 10, "10.0.0.1"))
        await within(first.barrier())
        self.ovs.restart_vswitchd()
        await eventually(lambda: len(self.connected) == 2, "a second on_connect")
        second = self.connected[1]
        self.assertIsNot(second, first)
        self.assertFalse(first.connected)
        self.assertIs(await within(client.whenConnected()), second)
        self.assertIs(client.protocol, second)
        # A restarted OVS has lost its flows; the new connection installs again.
        self.assertEqual(await self.our_flows(second), [])
        second.send(flow_mod(0, 10, "10.0.0.1"))
        await within(second.barrier())
        self.assertEqual(len(self.dumped()), 1)
