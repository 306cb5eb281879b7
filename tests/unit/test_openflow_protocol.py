"""
The OpenFlow 1.3 connection against a scripted switch: a StringTransport for
the wire and a task.Clock for the keepalive. Messages the switch would send are
packed here by hand (os-ken cannot encode most switch-to-controller messages);
what the protocol writes is read back through os-ken's decoder.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any, Optional

from twisted.internet import task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from contiv.openflow.client import OpenFlowClient
from contiv.openflow.ofp import (DATAPATH, HEADER, decode, encode, error_names, ofproto,
                                 ofproto_common, parser)
from contiv.openflow.packetio import reply_out
from contiv.openflow.protocol import (BUNDLE_ATOMIC, BUNDLE_ORDERED, HandshakeTimeout,
                                      NotConnected, OpenFlowError, OpenFlowProtocol,
                                      PipelineError, VersionMismatch)

DPID = 0x0000AABBCCDDEEFF


# -- what the switch sends ----------------------------------------------------

def message(msg_type: int, xid: int, body: bytes = b"", version: int = 4) -> bytes:
    return HEADER.pack(version, msg_type, 8 + len(body), xid) + body


def hello(versions: Optional[list[int]] = None, version: int = 4, xid: int = 1) -> bytes:
    if versions is None:
        return message(ofproto.OFPT_HELLO, xid, version=version)
    bits = 0
    for v in versions:
        bits |= 1 << v
    element = struct.pack("!HHI", ofproto.OFPHET_VERSIONBITMAP, 8, bits)
    return message(ofproto.OFPT_HELLO, xid, element, version=version)


def features_reply(xid: int, n_tables: int = 254) -> bytes:
    return message(ofproto.OFPT_FEATURES_REPLY, xid,
                   struct.pack(ofproto.OFP_SWITCH_FEATURES_PACK_STR, DPID, 0, n_tables, 0,
                               0x4F, 0))


def error(xid: int, type_: int, code: int, data: bytes = b"") -> bytes:
    return message(ofproto.OFPT_ERROR, xid, struct.pack("!HH", type_, code) + data)


def experimenter_error(xid: int, exp_type: int, data: bytes = b"") -> bytes:
    return message(ofproto.OFPT_ERROR, xid,
                   struct.pack("!HHI", ofproto.OFPET_EXPERIMENTER, exp_type,
                               ofproto_common.ONF_EXPERIMENTER_ID) + data)


def flow_stats_entry(table_id: int, priority: int, cookie: int) -> bytes:
    match = bytearray()
    length = parser.OFPMatch(eth_type=0x0800).serialize(match, 0)
    match = bytes(match[:length]) + b"\0" * (-length % 8)
    fixed = struct.calcsize(ofproto.OFP_FLOW_STATS_0_PACK_STR)
    return struct.pack(ofproto.OFP_FLOW_STATS_0_PACK_STR, fixed + len(match), table_id, 1, 0,
                       priority, 0, 0, 0, cookie, 0, 0) + match


def flow_stats_reply(xid: int, entries: list[bytes], more: bool) -> bytes:
    flags = ofproto.OFPMPF_REPLY_MORE if more else 0
    return message(ofproto.OFPT_MULTIPART_REPLY, xid,
                   struct.pack(ofproto.OFP_MULTIPART_REPLY_PACK_STR, ofproto.OFPMP_FLOW, flags)
                   + b"".join(entries))


def bundle_reply(xid: int, bundle_id: int, type_: int, flags: int) -> bytes:
    return message(ofproto.OFPT_EXPERIMENTER, xid,
                   struct.pack("!IIIHH", ofproto_common.ONF_EXPERIMENTER_ID,
                               ofproto.ONF_ET_BUNDLE_CONTROL, bundle_id, type_, flags))


def packet_in(data: bytes) -> bytes:
    match = bytearray()
    length = parser.OFPMatch(in_port=3).serialize(match, 0)
    match = bytes(match[:length]) + b"\0" * (-length % 8)
    body = struct.pack(ofproto.OFP_PACKET_IN_PACK_STR, ofproto.OFP_NO_BUFFER, len(data),
                       ofproto.OFPR_ACTION, 0, 0) + match + b"\0\0" + data
    return message(ofproto.OFPT_PACKET_IN, 0, body)


def flow_mod(table_id: int = 0, priority: int = 100, ip: str = "10.0.0.1",
             goto: Optional[int] = None) -> Any:
    if goto is None:
        instructions = [parser.OFPInstructionActions(
            ofproto.OFPIT_APPLY_ACTIONS, [parser.OFPActionOutput(ofproto.OFPP_NORMAL)])]
    else:
        instructions = [parser.OFPInstructionGotoTable(goto)]
    return parser.OFPFlowMod(DATAPATH, cookie=0xC0, table_id=table_id, priority=priority,
                             match=parser.OFPMatch(eth_type=0x0800, ipv4_dst=ip),
                             instructions=instructions)


def split(data: bytes) -> list[bytes]:
    messages = []
    while data:
        length = HEADER.unpack_from(data)[2]
        messages.append(data[:length])
        data = data[length:]
    return messages


class Harness(SynchronousTestCase):

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.packet_ins: list = []
        self.disconnects: list = []
        self.proto = OpenFlowProtocol(self.clock, echo_interval=5.0, echo_timeout=15.0,
                                      abort_grace=5.0, on_packet_in=self.packet_ins.append,
                                      on_disconnect=self.disconnects.append)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def sent(self) -> list[bytes]:
        """The raw messages written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return split(data)

    def sent_decoded(self) -> list:
        """
        The messages written since the last call: os-ken objects where os-ken
        decodes the type, else the header fields and the bytes.
        """
        out = []
        for raw in self.sent():
            try:
                out.append(decode(raw))
            except ValueError:
                _, msg_type, _, xid = HEADER.unpack_from(raw)
                out.append(SimpleNamespace(msg_type=msg_type, xid=xid, buf=raw))
        return out

    def feed(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def connect(self) -> None:
        """Complete the handshake."""
        self.sent()
        self.feed(hello([1, 4]))
        (request,) = self.sent_decoded()
        self.assertEqual(request.msg_type, ofproto.OFPT_FEATURES_REQUEST)
        self.feed(features_reply(request.xid))
        self.assertIs(self.successResultOf(self.proto.handshake), self.proto)

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone("closed")))

    def assertNoDelayedCalls(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HandshakeTests(Harness):

    def test_hello_offers_only_1_3(self) -> None:
        (data,) = self.sent()
        version, msg_type, length, _ = HEADER.unpack_from(data)
        self.assertEqual((version, msg_type, length), (4, ofproto.OFPT_HELLO, 16))
        (hello_msg,) = [decode(data)]
        self.assertEqual(hello_msg.elements[0].versions, [4])

    def test_negotiation_and_features(self) -> None:
        self.sent()
        handshake = self.proto.handshake
        self.feed(hello([1, 4, 5], version=5))
        self.assertNoResult(handshake)
        (request,) = self.sent_decoded()
        self.assertEqual(request.msg_type, ofproto.OFPT_FEATURES_REQUEST)
        self.feed(features_reply(request.xid, n_tables=100))
        self.assertIs(self.successResultOf(handshake), self.proto)
        self.assertIs(self.successResultOf(self.proto.handshake), self.proto)
        self.assertEqual(self.proto.version, 4)
        self.assertEqual(self.proto.datapath_id, DPID)
        self.assertEqual(self.proto.features.n_tables, 100)
        self.assertFalse(self.transport.disconnecting)

    def test_hello_without_bitmap_from_a_newer_switch_means_1_3(self) -> None:
        self.sent()
        self.feed(hello(version=6))
        (request,) = self.sent_decoded()
        self.assertEqual(request.msg_type, ofproto.OFPT_FEATURES_REQUEST)

    def test_version_mismatch_sends_hello_failed_and_closes(self) -> None:
        self.sent()
        self.feed(hello([1, 2], version=2))
        (data,) = self.sent()
        version, msg_type, _, _ = HEADER.unpack_from(data)
        # Answered in the switch's own version, so it can read why.
        self.assertEqual((version, msg_type), (2, ofproto.OFPT_ERROR))
        self.assertEqual(struct.unpack_from("!HH", data, 8),
                         (ofproto.OFPET_HELLO_FAILED, ofproto.OFPHFC_INCOMPATIBLE))
        self.assertIn(b"OpenFlow 1.3", data)
        self.assertTrue(self.transport.disconnecting)
        failure = self.failureResultOf(self.proto.handshake, VersionMismatch)
        self.assertEqual(failure.value.offered, [1, 2])
        self.assertIn("OpenFlow 1.0 (0x01), OpenFlow 1.1 (0x02)", str(failure.value))
        self.lose()
        self.assertNoDelayedCalls()

    def test_old_switch_without_bitmap(self) -> None:
        self.feed(hello(version=1))
        failure = self.failureResultOf(self.proto.handshake, VersionMismatch)
        self.assertEqual(failure.value.offered, [1])

    def test_hello_failed_from_the_switch(self) -> None:
        self.feed(error(0, ofproto.OFPET_HELLO_FAILED, ofproto.OFPHFC_INCOMPATIBLE, b"no"))
        # Before any HELLO, an error is a protocol violation too.
        self.failureResultOf(self.proto.handshake, HandshakeTimeout)
        self.assertTrue(self.transport.disconnecting)

    def test_handshake_timeout(self) -> None:
        handshake = self.proto.handshake
        self.clock.advance(14.9)
        self.assertNoResult(handshake)
        self.clock.advance(0.1)
        self.failureResultOf(handshake, HandshakeTimeout)
        self.failureResultOf(self.proto.handshake, HandshakeTimeout)
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(5)
        self.assertTrue(self.transport.disconnected)  # aborted after the grace
        self.lose()
        self.assertNoDelayedCalls()

    def test_features_error_fails_handshake(self) -> None:
        self.sent()
        self.feed(hello([4]))
        (request,) = self.sent_decoded()
        self.feed(error(request.xid, ofproto.OFPET_BAD_REQUEST, ofproto.OFPBRC_EPERM))
        failure = self.failureResultOf(self.proto.handshake, OpenFlowError)
        self.assertEqual(failure.value.code_name, "OFPBRC_EPERM")


class FramingTests(Harness):

    def test_messages_split_and_joined_across_reads(self) -> None:
        self.connect()
        stream = b"".join(message(ofproto.OFPT_ECHO_REQUEST, xid, b"x" * xid)
                          for xid in range(1, 6))
        for i in range(0, len(stream), 3):
            self.feed(stream[i:i + 3])
        replies = self.sent_decoded()
        self.assertEqual([(r.xid, r.data) for r in replies],
                         [(xid, b"x" * xid) for xid in range(1, 6)])

    def test_impossible_length_drops(self) -> None:
        self.connect()
        self.feed(HEADER.pack(4, ofproto.OFPT_ECHO_REQUEST, 4, 1))
        self.assertTrue(self.transport.disconnecting)


class RequestTests(Harness):

    def test_replies_matched_by_xid_out_of_order(self) -> None:
        self.connect()
        first = self.proto.request(parser.OFPGetConfigRequest(DATAPATH))
        second = self.proto.request(parser.OFPGetConfigRequest(DATAPATH))
        xid1, xid2 = [m.xid for m in self.sent_decoded()]
        self.assertNotEqual(xid1, xid2)
        self.feed(message(ofproto.OFPT_GET_CONFIG_REPLY, xid2, struct.pack("!HH", 0, 222)))
        self.assertNoResult(first)
        self.assertEqual(self.successResultOf(second).miss_send_len, 222)
        self.feed(message(ofproto.OFPT_GET_CONFIG_REPLY, xid1, struct.pack("!HH", 0, 111)))
        self.assertEqual(self.successResultOf(first).miss_send_len, 111)

    def test_error_fails_its_request_with_names(self) -> None:
        self.connect()
        d = self.proto.request(flow_mod())
        (sent,) = self.sent()
        xid = HEADER.unpack_from(sent)[3]
        self.feed(error(xid, ofproto.OFPET_BAD_MATCH, ofproto.OFPBMC_BAD_PREREQ, sent[:64]))
        e = self.failureResultOf(d, OpenFlowError).value
        self.assertEqual((e.type, e.code), (4, 9))
        self.assertEqual((e.type_name, e.code_name), ("OFPET_BAD_MATCH", "OFPBMC_BAD_PREREQ"))
        self.assertEqual(e.xid, xid)
        self.assertEqual(e.data, sent[:64])
        self.assertEqual(e.request_type_name, "OFPT_FLOW_MOD")
        self.assertIn("OFPET_BAD_MATCH/OFPBMC_BAD_PREREQ", str(e))

    def test_experimenter_error_names(self) -> None:
        self.connect()
        d = self.proto.request(parser.OFPGetConfigRequest(DATAPATH))
        (request,) = self.sent_decoded()
        self.feed(experimenter_error(request.xid, ofproto.ONFERR_ET_BUNDLE_EXIST))
        e = self.failureResultOf(d, OpenFlowError).value
        self.assertEqual((e.type_name, e.code_name), ("OFPET_EXPERIMENTER",
                                                      "ONFERR_ET_BUNDLE_EXIST"))
        self.assertEqual(e.experimenter, ofproto_common.ONF_EXPERIMENTER_ID)

    def test_error_names_of_unknown_values(self) -> None:
        self.assertEqual(error_names(5, 99), ("OFPET_FLOW_MOD_FAILED", "UNKNOWN_99"))
        self.assertEqual(error_names(77, 1), ("OFPET_UNKNOWN_77", "UNKNOWN_1"))
        self.assertEqual(error_names(0xFFFF, 7, 0x2320), ("OFPET_EXPERIMENTER",
                                                          "EXPERIMENTER_0x00002320_7"))

    def test_multipart_flow_stats_collects_reply_more_parts(self) -> None:
        self.connect()
        d = self.proto.flow_stats(cookie=0xC0, cookie_mask=0xFF)
        (request,) = self.sent_decoded()
        self.assertEqual(request.msg_type, ofproto.OFPT_MULTIPART_REQUEST)
        mp_type, _, table_id, out_port, out_group, cookie, cookie_mask = struct.unpack_from(
            "!HH4xB3xII4xQQ", request.buf, 8)
        self.assertEqual((mp_type, table_id, out_port, out_group, cookie, cookie_mask),
                         (ofproto.OFPMP_FLOW, ofproto.OFPTT_ALL, ofproto.OFPP_ANY,
                          ofproto.OFPG_ANY, 0xC0, 0xFF))
        self.feed(flow_stats_reply(request.xid, [flow_stats_entry(0, 10, 1),
                                                 flow_stats_entry(1, 20, 2)], more=True))
        self.assertNoResult(d)
        self.feed(flow_stats_reply(request.xid, [flow_stats_entry(2, 30, 3)], more=False))
        stats = self.successResultOf(d)
        self.assertEqual([(s.table_id, s.priority, s.cookie) for s in stats],
                         [(0, 10, 1), (1, 20, 2), (2, 30, 3)])
        self.assertEqual(stats[0].match["eth_type"], 0x0800)

    def test_not_connected(self) -> None:
        self.connect()
        self.lose()
        self.assertRaises(NotConnected, self.proto.send, flow_mod())
        self.assertRaises(NotConnected, self.proto.send_raw, b"")
        self.failureResultOf(self.proto.request(flow_mod()), ConnectionLost)
        self.failureResultOf(self.proto.barrier(), ConnectionLost)


class PipelineTests(Harness):

    def test_barrier_reports_errors_of_pipelined_messages(self) -> None:
        self.connect()
        first = self.proto.send_many(flow_mod(ip=f"10.0.0.{i}") for i in range(10))
        sent = self.sent()
        self.assertEqual(len(sent), 10)
        xids = [HEADER.unpack_from(m)[3] for m in sent]
        self.assertEqual(xids, list(range(first, first + 10)))
        d = self.proto.barrier()
        (barrier,) = self.sent_decoded()
        self.assertEqual(barrier.msg_type, ofproto.OFPT_BARRIER_REQUEST)
        self.feed(error(xids[3], ofproto.OFPET_BAD_INSTRUCTION, ofproto.OFPBIC_BAD_TABLE_ID,
                        sent[3][:64]))
        self.feed(error(xids[7], ofproto.OFPET_FLOW_MOD_FAILED, ofproto.OFPFMFC_TABLE_FULL,
                        sent[7][:64]))
        self.assertNoResult(d)
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        e = self.failureResultOf(d, PipelineError).value
        self.assertIsInstance(e, OpenFlowError)
        self.assertEqual([(x.xid, x.code_name) for x in e.errors],
                         [(xids[3], "OFPBIC_BAD_TABLE_ID"), (xids[7], "OFPFMFC_TABLE_FULL")])
        self.assertEqual(e.code_name, "OFPBIC_BAD_TABLE_ID")
        # Reported once: the next barrier is clean.
        d = self.proto.barrier()
        (barrier,) = self.sent_decoded()
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        self.assertEqual(self.successResultOf(d), barrier.xid)

    def test_errors_since_and_barrier_since(self) -> None:
        self.connect()
        other = self.proto.send(flow_mod(ip="10.1.1.1"))
        start = self.proto.next_xid()
        raw = [encode(flow_mod(ip=f"10.0.0.{i}"), start if i == 0 else self.proto.next_xid())
               for i in range(3)]
        self.proto.send_raw(raw)
        self.assertEqual(split(b"".join(raw)), self.sent()[1:])
        self.feed(error(other, ofproto.OFPET_BAD_MATCH, ofproto.OFPBMC_BAD_FIELD))
        self.feed(error(start + 2, ofproto.OFPET_BAD_MATCH, ofproto.OFPBMC_BAD_VALUE))
        d = self.proto.barrier(since=start)
        (barrier,) = self.sent_decoded()
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        e = self.failureResultOf(d, PipelineError).value
        self.assertEqual([x.xid for x in e.errors], [start + 2])
        # The other sender's error is still there for whoever asks.
        self.assertEqual([x.xid for x in self.proto.errors_since(other)], [other])
        self.assertEqual(self.proto.errors_since(other), [])

    def test_request_without_reply_is_acknowledged_by_barrier(self) -> None:
        self.connect()
        d = self.proto.request(flow_mod())
        b = self.proto.barrier()
        _, barrier = self.sent_decoded()
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        self.assertIsNone(self.successResultOf(d))
        self.successResultOf(b)

    def test_xids_wrap(self) -> None:
        self.connect()
        self.proto._xid = 0xFFFFFFFE
        before = self.proto.send(flow_mod())
        after = self.proto.send(flow_mod())
        self.assertEqual((before, after), (0xFFFFFFFF, 0))
        self.feed(error(before, ofproto.OFPET_BAD_MATCH, ofproto.OFPBMC_BAD_FIELD))
        self.feed(error(after, ofproto.OFPET_BAD_MATCH, ofproto.OFPBMC_BAD_VALUE))
        self.assertEqual([e.xid for e in self.proto.errors_since(before)], [before, after])


    def test_quiet_messages_errors_are_counted_not_reported(self) -> None:
        self.connect()
        start = self.proto.send(flow_mod(ip="10.0.0.1"))
        quiet = self.proto.send_quiet(reply_out(b"\0" * 60, 3))
        loud = self.proto.send(flow_mod(ip="10.0.0.2"))
        self.sent()
        self.feed(error(quiet, ofproto.OFPET_BAD_REQUEST, ofproto.OFPBRC_BAD_PORT))
        self.feed(error(loud, ofproto.OFPET_BAD_MATCH, ofproto.OFPBMC_BAD_FIELD))
        d = self.proto.barrier(since=start)
        (barrier,) = self.sent_decoded()
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        e = self.failureResultOf(d, PipelineError).value
        self.assertEqual([x.xid for x in e.errors], [loud])
        self.assertEqual(self.proto.quiet_errors, 1)
        self.assertEqual(self.proto._quiet, {})


class BundleTests(Harness):

    def open(self, flags: int = BUNDLE_ATOMIC | BUNDLE_ORDERED) -> int:
        d = self.proto.open_bundle(flags)
        (ctrl,) = self.sent_decoded()
        self.assertIsInstance(ctrl, parser.ONFBundleCtrlMsg)
        self.assertEqual((ctrl.type, ctrl.flags), (ofproto.ONF_BCT_OPEN_REQUEST, flags))
        self.feed(bundle_reply(ctrl.xid, ctrl.bundle_id, ofproto.ONF_BCT_OPEN_REPLY, flags))
        bundle_id = self.successResultOf(d)
        self.assertEqual(bundle_id, ctrl.bundle_id)
        return bundle_id

    def test_bundle_add_encoding_matches_os_ken_and_round_trips(self) -> None:
        self.connect()
        bundle_id = self.open()
        xid = self.proto.add_to_bundle(bundle_id, flow_mod(table_id=3, ip="10.9.8.7"))
        raw_xid = self.proto.add_to_bundle(bundle_id, encode(flow_mod(ip="10.1.1.1"), 12345))
        ours, ours_raw = self.sent()
        reference = parser.ONFBundleAddMsg(DATAPATH, bundle_id, BUNDLE_ATOMIC | BUNDLE_ORDERED,
                                           flow_mod(table_id=3, ip="10.9.8.7"), [])
        self.assertEqual(ours, encode(reference, xid))

        outer = decode(ours_raw)
        self.assertEqual((outer.xid, outer.experimenter, outer.exp_type),
                         (raw_xid, ofproto_common.ONF_EXPERIMENTER_ID,
                          ofproto.ONF_ET_BUNDLE_ADD_MESSAGE))
        got_id, _, flags = struct.unpack_from("!IHH", outer.data)
        self.assertEqual((got_id, flags), (bundle_id, BUNDLE_ATOMIC | BUNDLE_ORDERED))
        inner = decode(bytes(outer.data[8:]))
        self.assertIsInstance(inner, parser.OFPFlowMod)
        self.assertEqual(inner.xid, raw_xid)  # the caller's xid replaced by the outer one
        self.assertEqual(inner.match["ipv4_dst"], "10.1.1.1")

    def test_add_many_is_the_same_bytes_in_one_write(self) -> None:
        self.connect()
        bundle_id = self.open()
        encoded = [encode(flow_mod(ip=f"10.0.0.{i}"), 0) for i in range(3)]
        first = self.proto.add_many_to_bundle(bundle_id, encoded)
        many = self.transport.value()
        self.transport.clear()
        self.proto._xid = first - 1  # the same xids again, one message at a time
        for data in encoded:
            self.proto.add_to_bundle(bundle_id, data)
        self.assertEqual(self.transport.value(), many)
        self.assertEqual([decode(m).xid for m in split(many)], [first, first + 1, first + 2])

    def test_commit_checks_adds_then_commits(self) -> None:
        self.connect()
        bundle_id = self.open()
        self.proto.add_to_bundle(bundle_id, flow_mod())
        self.sent()
        d = self.proto.commit_bundle(bundle_id)
        (barrier,) = self.sent_decoded()
        self.assertEqual(barrier.msg_type, ofproto.OFPT_BARRIER_REQUEST)
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        (commit,) = self.sent_decoded()
        self.assertEqual((commit.type, commit.bundle_id, commit.flags),
                         (ofproto.ONF_BCT_COMMIT_REQUEST, bundle_id,
                          BUNDLE_ATOMIC | BUNDLE_ORDERED))
        self.assertNoResult(d)
        self.feed(bundle_reply(commit.xid, bundle_id, ofproto.ONF_BCT_COMMIT_REPLY, 3))
        self.assertIsNone(self.successResultOf(d))

    def test_rejected_add_discards_instead_of_committing(self) -> None:
        self.connect()
        bundle_id = self.open()
        good = self.proto.add_to_bundle(bundle_id, flow_mod())
        bad = self.proto.add_to_bundle(bundle_id, flow_mod(table_id=3, goto=1))
        self.sent()
        d = self.proto.commit_bundle(bundle_id)
        (barrier,) = self.sent_decoded()
        self.feed(error(bad, ofproto.OFPET_BAD_INSTRUCTION, ofproto.OFPBIC_BAD_TABLE_ID))
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        (discard,) = self.sent_decoded()
        self.assertEqual(discard.type, ofproto.ONF_BCT_DISCARD_REQUEST)
        self.feed(bundle_reply(discard.xid, bundle_id, ofproto.ONF_BCT_DISCARD_REPLY, 3))
        e = self.failureResultOf(d, PipelineError).value
        self.assertEqual([(x.xid, x.code_name) for x in e.errors],
                         [(bad, "OFPBIC_BAD_TABLE_ID")])
        self.assertNotEqual(good, bad)

    def test_commit_failure_carries_the_failed_message(self) -> None:
        self.connect()
        bundle_id = self.open()
        add = self.proto.add_to_bundle(bundle_id, flow_mod(table_id=5))
        self.sent()
        d = self.proto.commit_bundle(bundle_id)
        (barrier,) = self.sent_decoded()
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        (commit,) = self.sent_decoded()
        self.feed(error(add, ofproto.OFPET_FLOW_MOD_FAILED, ofproto.OFPFMFC_TABLE_FULL))
        self.feed(experimenter_error(commit.xid, ofproto.ONFERR_ET_FAILED))
        e = self.failureResultOf(d, PipelineError).value
        self.assertEqual([x.code_name for x in e.errors],
                         ["OFPFMFC_TABLE_FULL", "ONFERR_ET_FAILED"])

    def test_discard(self) -> None:
        self.connect()
        bundle_id = self.open(BUNDLE_ATOMIC)
        d = self.proto.discard_bundle(bundle_id)
        (discard,) = self.sent_decoded()
        self.assertEqual((discard.type, discard.flags),
                         (ofproto.ONF_BCT_DISCARD_REQUEST, BUNDLE_ATOMIC))
        self.feed(bundle_reply(discard.xid, bundle_id, ofproto.ONF_BCT_DISCARD_REPLY, 1))
        self.assertIsNone(self.successResultOf(d))
        self.assertRaises(KeyError, self.proto.add_to_bundle, bundle_id, flow_mod())


class AsyncAndKeepaliveTests(Harness):

    def test_echo_request_is_answered(self) -> None:
        self.connect()
        self.feed(message(ofproto.OFPT_ECHO_REQUEST, 77, b"ping"))
        (reply,) = self.sent_decoded()
        self.assertIsInstance(reply, parser.OFPEchoReply)
        self.assertEqual((reply.xid, reply.data), (77, b"ping"))

    def test_echo_when_idle_and_timeout_drops(self) -> None:
        self.connect()
        self.clock.advance(4.9)
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.1)
        (echo,) = self.sent_decoded()
        self.assertIsInstance(echo, parser.OFPEchoRequest)
        self.feed(message(ofproto.OFPT_ECHO_REPLY, echo.xid))
        self.clock.advance(5)
        (echo,) = self.sent_decoded()  # idle again: the next echo
        self.clock.advance(14.9)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(5)
        self.assertTrue(self.transport.disconnected)  # aborted: the peer never drained
        self.lose()
        self.assertEqual(len(self.disconnects), 1)
        self.assertNoDelayedCalls()

    def test_traffic_counts_as_life(self) -> None:
        self.connect()
        for _ in range(10):
            self.clock.advance(4)
            self.feed(message(ofproto.OFPT_ECHO_REQUEST, 1))
        self.assertEqual([type(m) for m in self.sent_decoded()], [parser.OFPEchoReply] * 10)

    def test_pending_fail_on_disconnect(self) -> None:
        self.connect()
        request = self.proto.request(parser.OFPGetConfigRequest(DATAPATH))
        stats = self.proto.flow_stats()
        barrier = self.proto.barrier()
        self.lose()
        for d in (request, stats, barrier):
            self.failureResultOf(d, ConnectionLost)
        self.assertEqual(len(self.disconnects), 1)
        self.assertFalse(self.proto.connected)
        self.assertNoDelayedCalls()

    def test_handshake_fails_on_disconnect(self) -> None:
        self.lose()
        self.failureResultOf(self.proto.handshake, ConnectionLost)
        self.assertNoDelayedCalls()

    def test_set_async_and_packet_in(self) -> None:
        self.connect()
        d = self.proto.set_async(packet_in_mask=1 << ofproto.OFPR_ACTION)
        set_async, barrier = self.sent_decoded()
        self.assertEqual(set_async.msg_type, ofproto.OFPT_SET_ASYNC)
        raw = set_async.buf
        self.assertEqual(struct.unpack_from(ofproto.OFP_ASYNC_CONFIG_PACK_STR, raw, 8),
                         (1 << ofproto.OFPR_ACTION, 0, 0, 0, 0, 0))
        self.feed(message(ofproto.OFPT_BARRIER_REPLY, barrier.xid))
        self.successResultOf(d)
        self.feed(packet_in(b"\xff" * 60))
        (msg,) = self.packet_ins
        self.assertIsInstance(msg, parser.OFPPacketIn)
        self.assertEqual((msg.reason, msg.data, msg.match["in_port"]),
                         (ofproto.OFPR_ACTION, b"\xff" * 60, 3))


class EncodingTests(SynchronousTestCase):

    def test_flow_mod_round_trip(self) -> None:
        msg = parser.OFPFlowMod(
            DATAPATH, cookie=0x1234, cookie_mask=0, table_id=4, priority=200,
            match=parser.OFPMatch(eth_type=0x0800, ip_proto=6, ipv4_src=("10.0.0.0",
                                                                          "255.255.0.0"),
                                  tcp_dst=80),
            instructions=[parser.OFPInstructionActions(
                ofproto.OFPIT_APPLY_ACTIONS,
                [parser.NXActionConjunction(clause=1, n_clauses=3, id_=7)]),
                parser.OFPInstructionGotoTable(6)])
        for xid in (1, 0xFFFFFFFF):  # one object, encoded twice
            data = encode(msg, xid)
            back = decode(data)
            self.assertIsInstance(back, parser.OFPFlowMod)
            self.assertEqual(back.xid, xid)
            self.assertEqual((back.cookie, back.table_id, back.priority), (0x1234, 4, 200))
            self.assertEqual(dict(back.match.items()),
                             {"eth_type": 0x0800, "ip_proto": 6,
                              "ipv4_src": ("10.0.0.0", "255.255.0.0"), "tcp_dst": 80})
            conj = back.instructions[0].actions[0]
            self.assertEqual((conj.id, conj.clause, conj.n_clauses), (7, 1, 3))
            self.assertEqual(back.instructions[1].table_id, 6)
            self.assertEqual(encode(back, xid), data)


class ClientTests(SynchronousTestCase):
    """OpenFlowClient over a MemoryReactorClock: the connections are driven by hand."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.connects: list = []
        self.client = OpenFlowClient(self.reactor, "unix:/run/br0.mgmt",
                                     on_connect=self.connects.append)
        self.client.startService()

    def connection(self) -> tuple[Any, StringTransport]:
        """Accept the newest connection attempt (the handshake is the test's)."""
        _, factory, _, _ = self.reactor.unixClients[-1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.reactor.advance(0)
        return protocol, transport

    def handshake(self, protocol: Any, transport: StringTransport) -> None:
        transport.clear()
        protocol.dataReceived(hello([4]))
        (request,) = split(transport.value())
        protocol.dataReceived(features_reply(HEADER.unpack_from(request)[3]))

    def test_on_connect_after_every_connection(self) -> None:
        self.assertEqual(self.reactor.unixClients[0][0], "/run/br0.mgmt")
        d = self.client.whenConnected()
        wire, transport = self.connection()
        self.assertNoResult(d)
        self.handshake(wire, transport)
        self.reactor.advance(0)
        first = self.successResultOf(d)
        self.assertIsInstance(first, OpenFlowProtocol)  # not ClientService's proxy
        self.assertEqual(self.connects, [first])
        self.assertIs(self.client.protocol, first)

        wire.connectionLost(Failure(ConnectionDone("OVS restarted")))
        self.assertIsNone(self.client.protocol)
        self.reactor.advance(0.3)  # backoff: 0.15 s and up to 0.1 s of jitter
        wire, transport = self.connection()
        self.handshake(wire, transport)
        self.reactor.advance(0)
        self.assertEqual(len(self.connects), 2)
        self.assertIsNot(self.connects[1], first)
        d = self.client.whenConnected()
        self.reactor.advance(0)
        self.assertIs(self.successResultOf(d), self.connects[1])
        # ClientService sees its connection closed, then stops; the memory
        # reactor needs the close delivered by hand.
        stopped = self.client.stopService()
        wire.connectionLost(Failure(ConnectionDone("stopped")))
        self.successResultOf(stopped)

    def test_version_mismatch_is_retried(self) -> None:
        wire, transport = self.connection()
        wire.dataReceived(hello([1]))
        self.assertTrue(transport.disconnecting)
        wire.connectionLost(Failure(ConnectionDone("closed")))
        self.assertEqual(self.connects, [])
        self.assertEqual(self.client.handshake_failures, 1)
        attempts = len(self.reactor.unixClients)
        self.reactor.advance(0.2)  # the second delay, 0.225 s and jitter: not yet
        self.assertEqual(len(self.reactor.unixClients), attempts)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.unixClients), attempts + 1)
        stopped = self.client.stopService()
        self.reactor.advance(0)
        self.successResultOf(stopped)
