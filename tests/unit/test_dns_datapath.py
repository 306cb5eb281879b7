"""
DNS interception in the datapath (L{contiv.dns.datapath}): the frame
functions, checked against os-ken's packet library and a plain RFC 1071
checksum written here, and the interceptor's decisions against a fake
datapath that records packet-outs.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from os_ken.lib.packet import ethernet, ipv4, ipv6, packet, udp, vlan
from twisted.internet.task import Clock

from contiv.datapath.pipeline import DNS_INTERCEPT, DNS_SEEN
from contiv.dns.datapath import (DnsInterceptor, FrameError, TokenBucket, build_reply,
                                 checksum, parse_query, udp_frame)
from contiv.metrics import REGISTRY
from contiv.openflow.ofp import decode, encode, ofproto
from contiv.openflow.packetio import packet_in_bytes

POD_MAC = bytes.fromhex("020000000001")
GW_MAC = bytes.fromhex("020000000002")
V4 = (ipaddress.ip_address("10.244.1.5").packed, ipaddress.ip_address("10.96.0.10").packed)
V6 = (ipaddress.ip_address("fd00::5").packed, ipaddress.ip_address("fd00:96::a").packed)
QUERY = bytes.fromhex("abcd01000001000000000000") + b"\x03web\x07default\x03svc\x07cluster" \
    b"\x05local\x00\x00\x01\x00\x01"


def rfc1071(data: bytes) -> int:
    """The Internet checksum, the long way round, as RFC 1071 4.1 writes it."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) + data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_checksum_ok(version: int, src: bytes, dst: bytes, segment: bytes) -> bool:
    if version == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(segment))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), 17)
    return rfc1071(pseudo + segment) == 0


# -- frames ------------------------------------------------------------------------

@pytest.mark.parametrize("addresses", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("tag", [None, b"\x81\x00\x20\x07"], ids=["untagged", "vlan"])
def test_reply_swaps_everything_and_has_valid_checksums(addresses, tag):
    frame = udp_frame(POD_MAC, GW_MAC, *addresses, 40123, 53, QUERY, vlan=tag)
    query = parse_query(frame)
    assert (query.eth_src, query.eth_dst, query.ip_src, query.ip_dst) == \
        (POD_MAC, GW_MAC, *addresses)
    assert (query.src_port, query.dst_port, query.payload, query.vlan) == \
        (40123, 53, QUERY, tag)
    answer = QUERY[:2] + b"\x81\x80" + QUERY[4:] + b"\xc0\x0c" + bytes(14) + b"odd"
    reply = build_reply(query, answer)

    decoded = packet.Packet(reply)
    eth = decoded.get_protocol(ethernet.ethernet)
    assert (eth.src, eth.dst) == ("02:00:00:00:00:02", "02:00:00:00:00:01")
    if tag:
        assert decoded.get_protocol(vlan.vlan).vid == 7
    segment_start = reply.index(struct.pack("!HH", 53, 40123))
    segment = reply[segment_start:]
    if addresses is V4:
        ip = decoded.get_protocol(ipv4.ipv4)
        assert (ip.src, ip.dst, ip.ttl, ip.proto) == ("10.96.0.10", "10.244.1.5", 64, 17)
        header = reply[segment_start - 20:segment_start]
        assert rfc1071(header) == 0  # a valid header checksum sums to zero
        assert ip.total_length == 20 + len(segment)
    else:
        ip = decoded.get_protocol(ipv6.ipv6)
        assert (ip.src, ip.dst, ip.hop_limit, ip.nxt) == ("fd00:96::a", "fd00::5", 64, 17)
        assert ip.payload_length == len(segment)
    u = decoded.get_protocol(udp.udp)
    assert (u.src_port, u.dst_port, u.total_length) == (53, 40123, 8 + len(answer))
    assert u.csum != 0
    assert udp_checksum_ok(4 if addresses is V4 else 6, addresses[1], addresses[0], segment)
    assert decoded.protocols[-1] == answer
    # and what we build, we read back
    again = parse_query(udp_frame(POD_MAC, GW_MAC, *addresses, 40123, 53, answer))
    assert again.payload == answer


@given(st.binary(max_size=600), st.integers(0, 0xFFFF), st.booleans())
def test_checksums_agree_with_rfc1071_for_any_payload(payload, port, six):
    addresses = V6 if six else V4
    frame = udp_frame(POD_MAC, GW_MAC, *addresses, port, 53, payload)
    query = parse_query(frame)
    assert query.payload == payload and query.src_port == port
    ip_length = 20 if not six else 40
    segment = frame[14 + ip_length:]
    assert udp_checksum_ok(6 if six else 4, *addresses, segment)
    assert checksum(payload) == rfc1071(payload)


def test_ipv4_query_without_udp_checksum_and_with_ethernet_padding():
    frame = udp_frame(POD_MAC, GW_MAC, *V4, 5353, 53, b"q", udp_checksum=False)
    assert frame[14 + 20 + 6:14 + 20 + 8] == b"\0\0"
    padded = frame + bytes(60 - len(frame))  # short frames are padded on the wire
    query = parse_query(padded)
    assert query.payload == b"q"
    reply = build_reply(query, b"r")  # the reply has a checksum all the same
    assert struct.unpack_from("!H", reply, 14 + 20 + 6)[0] != 0
    assert udp_checksum_ok(4, V4[1], V4[0], reply[14 + 20:])


def test_ipv4_options_are_skipped():
    frame = bytearray(udp_frame(POD_MAC, GW_MAC, *V4, 5353, 53, b"query"))
    ip_header = frame[14:34]
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    ip_header[0] = 0x46
    struct.pack_into("!H", ip_header, 2, len(frame) - 14 + 4)
    rebuilt = bytes(frame[:14]) + bytes(ip_header) + options + bytes(frame[34:])
    assert parse_query(rebuilt).payload == b"query"


@pytest.mark.parametrize("mangle, reason", [
    (lambda f: f[:10], "Ethernet"),
    (lambda f: f[:12] + b"\x08\x06" + f[14:], "not IP"),
    (lambda f: f[:23] + b"\x06" + f[24:], "not UDP"),
    (lambda f: f[:20] + b"\x20\x00" + f[22:], "fragment"),  # more fragments
    (lambda f: f[:20] + b"\x00\x10" + f[22:], "fragment"),  # an offset
    (lambda f: f[:16] + b"\x04\x00" + f[18:], "total length"),
    (lambda f: f[:14] + b"\x55" + f[15:], "version"),
    (lambda f: f, "port"),  # a frame from port 53 to 5353 (see below)
    (lambda f: f[:38] + b"\x0f\xff" + f[40:], "UDP length"),
    (lambda f: f[:30], "truncated IPv4"),
    (lambda f: f[:12] + b"\x81\x00", "VLAN"),
])
def test_unreadable_frames_are_refused(mangle, reason):
    frame = udp_frame(POD_MAC, GW_MAC, *V4, 5353, 53, b"some query")
    if reason == "port":
        frame = udp_frame(POD_MAC, GW_MAC, *V4, 53, 5353, b"some query")
    with pytest.raises(FrameError, match=reason):
        parse_query(mangle(frame))


def test_ipv6_extension_headers_are_not_read():
    frame = bytearray(udp_frame(POD_MAC, GW_MAC, *V6, 5353, 53, b"q"))
    frame[14 + 6] = 0  # hop-by-hop options first
    with pytest.raises(FrameError, match="not UDP"):
        parse_query(bytes(frame))


def test_udp_over_ipv6_needs_a_checksum():
    with pytest.raises(ValueError, match="checksum"):
        udp_frame(POD_MAC, GW_MAC, *V6, 1, 53, b"", udp_checksum=False)


def test_token_bucket():
    clock = Clock()
    bucket = TokenBucket(clock, rate=10, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.1)
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.advance(10)
    assert sum(bucket.take() for _ in range(10)) == 3


# -- the interceptor -----------------------------------------------------------------

class FakeDatapath:
    def __init__(self, metered=True, connected=True):
        self.sent = []
        self.dns_metered = metered
        self.connected = connected

    def packet_out(self, message):
        if not self.connected:
            return False
        encode(message, 1)  # it must encode (os-ken cannot decode a packet-out)
        self.sent.append(message)
        return True

    def decoded(self):
        return list(self.sent)


def answer_web(payload, client_ip):
    """Knows one name, for one client."""
    if b"\x03web" in payload and client_ip == "10.244.1.5":
        return payload[:2] + b"\x81\x80" + payload[4:] + b"\xc0\x0c\x00\x01\x00\x01" \
            + struct.pack("!IH", 30, 4) + bytes([10, 96, 0, 20])
    return None


def count(result):
    return REGISTRY.get_sample_value("contiv_dns_datapath_packet_ins_total",
                                     {"result": result}) or 0


def pin(data, in_port=7, table_id=DNS_INTERCEPT, **options):
    return decode(packet_in_bytes(5, data, in_port, table_id=table_id, **options))


@pytest.fixture
def interceptor():
    return DnsInterceptor(answer_web, FakeDatapath(), clock=Clock())


def test_a_hit_is_one_packet_out_to_the_in_port(interceptor):
    before = count("hit")
    frame = udp_frame(POD_MAC, GW_MAC, *V4, 40000, 53, QUERY)
    interceptor.packet_in(pin(frame))
    (out,) = interceptor.datapath.decoded()
    assert out.in_port == ofproto.OFPP_CONTROLLER and out.buffer_id == ofproto.OFP_NO_BUFFER
    assert [(a.port) for a in out.actions] == [7]
    reply = parse_query(udp_frame(*_swap(out.data)), 40000)  # readable, to the pod's port
    assert reply.payload[:2] == QUERY[:2] and reply.payload.endswith(bytes([10, 96, 0, 20]))
    decoded = packet.Packet(out.data)
    assert decoded.get_protocol(ipv4.ipv4).dst == "10.244.1.5"
    assert decoded.get_protocol(ethernet.ethernet).dst == "02:00:00:00:00:01"
    assert count("hit") == before + 1


def _swap(frame):
    """The parts of a reply frame, for udp_frame (to read it with parse_query)."""
    eth = packet.Packet(frame)
    e, ip, u = eth.get_protocol(ethernet.ethernet), eth.get_protocol(ipv4.ipv4), \
        eth.get_protocol(udp.udp)
    return (bytes.fromhex(e.src.replace(":", "")), bytes.fromhex(e.dst.replace(":", "")),
            ipaddress.ip_address(ip.src).packed, ipaddress.ip_address(ip.dst).packed,
            u.src_port, u.dst_port, eth.protocols[-1])


def reinjected(message, data, in_port=7):
    assert message.in_port == in_port
    assert message.buffer_id == ofproto.OFP_NO_BUFFER
    set_field, output = message.actions
    assert (set_field.key, set_field.value) == ("reg0", DNS_SEEN)
    assert output.port == ofproto.OFPP_TABLE
    assert message.data == data
    return True


def test_a_miss_is_sent_on_unchanged_with_the_seen_bit(interceptor):
    before = count("miss")
    frame = udp_frame(POD_MAC, GW_MAC, *V4, 40000, 53, QUERY.replace(b"\x03web", b"\x03www"))
    interceptor.packet_in(pin(frame))
    (out,) = interceptor.datapath.decoded()
    assert reinjected(out, frame)
    assert count("miss") == before + 1


def test_another_client_misses(interceptor):
    frame = udp_frame(POD_MAC, GW_MAC, ipaddress.ip_address("10.244.1.6").packed, V4[1],
                      40000, 53, QUERY)
    interceptor.packet_in(pin(frame))
    (out,) = interceptor.datapath.decoded()
    assert reinjected(out, frame)


@pytest.mark.parametrize("data", [b"", b"\xff" * 13, b"\x00" * 60,
                                  udp_frame(POD_MAC, GW_MAC, *V4, 53, 5353, b"x")])
def test_garbage_is_reinjected_unchanged(interceptor, data):
    before = count("unparseable")
    interceptor.packet_in(pin(data))
    (out,) = interceptor.datapath.decoded()
    assert reinjected(out, data)
    assert count("unparseable") == before + 1


def test_an_answer_function_that_raises_costs_only_the_interception():
    def broken(payload, client_ip):
        raise RuntimeError("bug")
    interceptor = DnsInterceptor(broken, FakeDatapath(), clock=Clock())
    before = count("error")
    frame = udp_frame(POD_MAC, GW_MAC, *V6, 40000, 53, QUERY)
    interceptor.packet_in(pin(frame))
    (out,) = interceptor.datapath.decoded()
    assert reinjected(out, frame)
    assert count("error") == before + 1


def test_a_reply_too_large_for_one_frame_goes_to_the_resolver():
    interceptor = DnsInterceptor(lambda p, c: b"x" * 1473, FakeDatapath(), clock=Clock())
    frame = udp_frame(POD_MAC, GW_MAC, *V4, 40000, 53, QUERY)
    interceptor.packet_in(pin(frame))
    (out,) = interceptor.datapath.decoded()
    assert reinjected(out, frame)
    interceptor = DnsInterceptor(lambda p, c: b"x" * 1472, FakeDatapath(), clock=Clock())
    interceptor.packet_in(pin(frame))
    (out,) = interceptor.datapath.decoded()
    assert out.in_port == ofproto.OFPP_CONTROLLER and len(out.data) == 1514


def test_packet_ins_from_other_tables_are_left_alone(interceptor):
    interceptor.packet_in(pin(udp_frame(POD_MAC, GW_MAC, *V4, 1, 53, QUERY), table_id=0))
    assert interceptor.datapath.sent == []


def test_a_truncated_packet_in_goes_on_by_its_buffer(interceptor):
    frame = udp_frame(POD_MAC, GW_MAC, *V4, 40000, 53, QUERY)
    interceptor.packet_in(pin(frame[:40], total_len=len(frame), buffer_id=12))
    (out,) = interceptor.datapath.decoded()
    assert out.buffer_id == 12 and out.in_port == 7 and not out.data
    assert [a.port for a in out.actions[1:]] == [ofproto.OFPP_TABLE]


def test_software_limit_only_without_a_meter():
    clock = Clock()
    frame = udp_frame(POD_MAC, GW_MAC, *V4, 40000, 53, QUERY)
    metered = DnsInterceptor(answer_web, FakeDatapath(metered=True), clock=clock, rate=5,
                             burst=2)
    for _ in range(10):
        metered.packet_in(pin(frame))
    assert len(metered.datapath.sent) == 10
    before = count("rate_limited")
    software = DnsInterceptor(answer_web, FakeDatapath(metered=False), clock=clock, rate=5,
                              burst=2)
    for _ in range(10):
        software.packet_in(pin(frame))
    assert len(software.datapath.sent) == 2
    assert count("rate_limited") == before + 8
    clock.advance(1)
    software.packet_in(pin(frame))
    assert len(software.datapath.sent) == 3


def test_not_connected_is_counted_not_raised():
    interceptor = DnsInterceptor(answer_web, FakeDatapath(connected=False), clock=Clock())
    before = count("not_sent")
    interceptor.packet_in(pin(udp_frame(POD_MAC, GW_MAC, *V4, 40000, 53, QUERY)))
    interceptor.packet_in(pin(b"junk"))
    assert count("not_sent") == before + 2


def test_handling_time_is_observed(interceptor):
    before = REGISTRY.get_sample_value("contiv_dns_datapath_handle_seconds_count") or 0
    interceptor.packet_in(pin(udp_frame(POD_MAC, GW_MAC, *V4, 40000, 53, QUERY)))
    interceptor.packet_in(object())  # not even a packet-in: logged, counted, not raised
    assert REGISTRY.get_sample_value("contiv_dns_datapath_handle_seconds_count") == before + 2
