"""
DNS in the datapath (``dns.datapath: true``): a pod's UDP queries reach us as
packet-ins from the bridge's DNS intercept table; a name we know is answered
at once with a packet-out of a reply frame to the pod's port, and anything
else goes on, unchanged, through the tables to the resolver the pod asked.

Where it sits in the pipeline, and why a miss does not come back: see
L{contiv.datapath.pipeline} and docs/architecture.md, "DNS interception".

The frame work is pure (L{parse_query}, L{build_reply}, L{udp_frame}); the
L{DnsInterceptor} is the thin part that decides and sends. A packet we
cannot read is re-injected as it came (never dropped, never an exception out
of the handler): the pod's resolver is a better judge of it than we are.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from prometheus_client import Counter, Histogram
from twisted.logger import Logger

from contiv.datapath.pipeline import DNS_INTERCEPT, DNS_PORT, DNS_SEEN, DNS_SEEN_FIELD
from contiv.metrics import REGISTRY
from contiv.openflow.packetio import (NO_BUFFER, PacketIn, buffered_reinject_out, packet_in,
                                      reinject_out, reply_out)

__all__ = ["DnsInterceptor", "FrameError", "Query", "parse_query", "build_reply", "udp_frame",
           "checksum", "TokenBucket", "RESULTS"]

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
IPPROTO_UDP = 17
REPLY_HOP_LIMIT = 64
IPV4_DONT_FRAGMENT = 0x4000
# The largest IP packet we send (a 1500-byte MTU, a VLAN tag riding on top as
# 802.1Q allows). A reply that would be longer is not ours to fragment: the
# query goes on to the pod's resolver instead.
MAX_IP_PACKET = 1500

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")

# Results, also the "result" label of the packet-in counter.
HIT = "hit"
MISS = "miss"
UNPARSEABLE = "unparseable"  # re-injected as it came
RATE_LIMITED = "rate_limited"  # dropped by the software limit (only when OVS has no meter)
TOO_LARGE = "too_large"  # the reply would not fit one frame: re-injected
ERROR = "error"  # answer_query raised: re-injected
NOT_SENT = "not_sent"  # no connection to answer or re-inject on
IGNORED = "ignored"  # a packet-in that is not from the DNS intercept table
RESULTS = (HIT, MISS, UNPARSEABLE, RATE_LIMITED, TOO_LARGE, ERROR, NOT_SENT, IGNORED)

PACKET_INS = Counter("contiv_dns_datapath_packet_ins",
                     "DNS packet-ins from the bridge, by what became of them", ["result"],
                     registry=REGISTRY)
HANDLE_SECONDS = Histogram("contiv_dns_datapath_handle_seconds",
                           "time to handle one DNS packet-in (parse, answer, packet-out)",
                           buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
                                    0.001, 0.0025, 0.005, 0.01, 0.1), registry=REGISTRY)
for _result in RESULTS:
    PACKET_INS.labels(_result)  # every result shows from the start, at 0


class FrameError(ValueError):
    """A frame that is not one whole, unfragmented UDP datagram (to port 53)."""


@dataclass(frozen=True)
class Query:
    """A UDP frame taken apart: what a reply needs of the query."""

    eth_dst: bytes
    eth_src: bytes
    vlan: Optional[bytes]  # the whole 4-byte tag (TPID and TCI), kept for the reply
    version: int  # 4 or 6
    ip_src: bytes
    ip_dst: bytes
    src_port: int
    dst_port: int
    payload: bytes

    @property
    def client_ip(self) -> str:
        return str(ipaddress.ip_address(self.ip_src))

    @property
    def server_ip(self) -> str:
        return str(ipaddress.ip_address(self.ip_dst))


def checksum(data: bytes, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of C{data}, C{initial} (a partial sum) added in."""
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF ^ total


def _pseudo_sum(version: int, src: bytes, dst: bytes, length: int) -> int:
    """The (unfolded) sum of the UDP pseudo-header: RFC 768, and RFC 8200 8.1 for IPv6."""
    words = src + dst
    return sum(struct.unpack(f"!{len(words) // 2}H", words)) + IPPROTO_UDP + length


def parse_query(frame: bytes, port: int = DNS_PORT) -> Query:
    """
    An Ethernet frame (one optional 802.1Q/802.1ad tag) holding IPv4 or IPv6
    (no extension headers) and UDP to C{port}. Ethernet padding after the IP
    packet is ignored. Raises L{FrameError} for anything else, fragments
    included: a reply needs the whole query.
    """
    if len(frame) < _ETH.size:
        raise FrameError(f"{len(frame)} bytes: shorter than an Ethernet header")
    eth_dst, eth_src, eth_type = _ETH.unpack_from(frame)
    offset = _ETH.size
    vlan = None
    if eth_type in VLAN_TPIDS:
        if len(frame) < offset + 4:
            raise FrameError("truncated VLAN tag")
        vlan = frame[offset - 2:offset + 2]
        (eth_type,) = struct.unpack_from("!H", frame, offset + 2)
        offset += 4
    if eth_type == ETH_IPV4:
        if len(frame) < offset + _IPV4.size:
            raise FrameError("truncated IPv4 header")
        (version_ihl, _, total, _, fragment, _, proto, _, src,
         dst) = _IPV4.unpack_from(frame, offset)
        header = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or header < _IPV4.size:
            raise FrameError(f"bad IPv4 version/header length 0x{version_ihl:02x}")
        if total < header or offset + total > len(frame):
            raise FrameError(f"IPv4 total length {total} does not fit the frame")
        if fragment & 0x3FFF:  # more fragments, or an offset
            raise FrameError("an IPv4 fragment")
        version, end, offset = 4, offset + total, offset + header
    elif eth_type == ETH_IPV6:
        if len(frame) < offset + _IPV6.size:
            raise FrameError("truncated IPv6 header")
        first, payload_length, proto, _, src, dst = _IPV6.unpack_from(frame, offset)
        if first >> 28 != 6:
            raise FrameError(f"bad IPv6 version {first >> 28}")
        offset += _IPV6.size
        if offset + payload_length > len(frame):
            raise FrameError(f"IPv6 payload length {payload_length} does not fit the frame")
        version, end = 6, offset + payload_length
    else:
        raise FrameError(f"not IP: ethertype 0x{eth_type:04x}")
    if proto != IPPROTO_UDP:
        raise FrameError(f"IP protocol {proto}, not UDP")
    if end - offset < _UDP.size:
        raise FrameError("truncated UDP header")
    src_port, dst_port, length, _ = _UDP.unpack_from(frame, offset)
    if length < _UDP.size or offset + length > end:
        raise FrameError(f"UDP length {length} does not fit the IP packet")
    if dst_port != port:
        raise FrameError(f"UDP to port {dst_port}, not {port}")
    return Query(eth_dst, eth_src, vlan, version, src, dst, src_port, dst_port,
                 frame[offset + _UDP.size:offset + length])


def udp_frame(eth_src: bytes, eth_dst: bytes, ip_src: bytes, ip_dst: bytes, src_port: int,
              dst_port: int, payload: bytes, *, vlan: Optional[bytes] = None,
              hop_limit: int = REPLY_HOP_LIMIT, udp_checksum: bool = True) -> bytes:
    """
    A whole Ethernet frame of one UDP datagram, IPv4 or IPv6 by the address
    length, every checksum filled in (C{udp_checksum=False}: 0, "none", which
    only IPv4 allows). IPv4 goes with DF set and ID 0 (RFC 6864: an atomic
    datagram needs no ID).
    """
    length = _UDP.size + len(payload)
    if len(ip_src) != len(ip_dst) or len(ip_src) not in (4, 16):
        raise ValueError("addresses of one family, 4 or 16 bytes, please")
    version = 4 if len(ip_src) == 4 else 6
    if version == 6 and not udp_checksum:
        raise ValueError("UDP over IPv6 must have a checksum (RFC 8200 8.1)")
    if udp_checksum:
        value = checksum(_UDP.pack(src_port, dst_port, length, 0) + payload,
                         _pseudo_sum(version, ip_src, ip_dst, length))
        value = value or 0xFFFF  # 0 means "no checksum": its other spelling
    else:
        value = 0
    udp = _UDP.pack(src_port, dst_port, length, value) + payload
    if version == 4:
        header = _IPV4.pack(0x45, 0, _IPV4.size + length, 0, IPV4_DONT_FRAGMENT, hop_limit,
                            IPPROTO_UDP, 0, ip_src, ip_dst)
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        eth_type = ETH_IPV4
    else:
        header = _IPV6.pack(6 << 28, length, IPPROTO_UDP, hop_limit, ip_src, ip_dst)
        eth_type = ETH_IPV6
    tag = vlan or b""
    return eth_dst + eth_src + tag + struct.pack("!H", eth_type) + header + udp


def build_reply(query: Query, payload: bytes) -> bytes:
    """The frame that answers C{query} with C{payload}: every address and port swapped."""
    return udp_frame(query.eth_dst, query.eth_src, query.ip_dst, query.ip_src, query.dst_port,
                     query.src_port, payload, vlan=query.vlan)


def reply_fits(query: Query, payload: bytes) -> bool:
    ip_header = _IPV4.size if query.version == 4 else _IPV6.size
    return ip_header + _UDP.size + len(payload) <= MAX_IP_PACKET


class TokenBucket:
    """
    At most C{rate} per second on average, C{burst} at once: the software
    stand-in for the bridge's meter when OVS refuses meters.
    """

    def __init__(self, clock: Any, rate: float, burst: float):
        self.clock = clock
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._at = clock.seconds()

    def take(self) -> bool:
        now = self.clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


AnswerQuery = Callable[[bytes, str], Optional[bytes]]


class DnsInterceptor:
    """
    Handles the bridge's DNS packet-ins (give C{packet_in} to the OpenFlow
    client as C{on_packet_in}).

    C{answer_query(payload, client_ip)}: the DNS reply (bytes) for a query
    from that pod, or None when the name is not ours; called synchronously,
    so it must answer from memory. C{datapath}: what sends packet-outs
    (C{packet_out(message) -> bool}) and says whether the bridge meters DNS
    packet-ins (C{dns_metered}); a L{contiv.datapath.manager.DatapathManager}.
    When it does not, at most C{rate} queries a second (C{burst} at once) are
    handled and the rest dropped, as the meter's drop band would.
    """

    log = Logger()

    def __init__(self, answer_query: AnswerQuery, datapath: Any, *, clock: Any,
                 rate: float = 2000, burst: float = 200,
                 timer: Callable[[], float] = time.perf_counter):
        self.answer_query = answer_query
        self.datapath = datapath
        self.limit = TokenBucket(clock, rate, burst)
        self.timer = timer
        self.results = {result: PACKET_INS.labels(result) for result in RESULTS}

    def packet_in(self, msg: Any) -> None:
        """One packet-in (an os-ken OFPPacketIn). Never raises."""
        started = self.timer()
        try:
            result = self._handle(packet_in(msg))
        except Exception:
            # A bug here must not cost the pod its query: try to send it on.
            self.log.failure("handling a DNS packet-in failed")
            result = ERROR
            try:
                self._reinject(packet_in(msg))
            except Exception:
                pass
        self.results[result].inc()
        HANDLE_SECONDS.observe(self.timer() - started)

    def _handle(self, pin: PacketIn) -> str:
        if pin.table_id != DNS_INTERCEPT:
            # Not ours (another flow sent it to the controller): leave it be.
            return IGNORED
        if not getattr(self.datapath, "dns_metered", True) and not self.limit.take():
            return RATE_LIMITED
        if pin.in_port is None:
            self.log.warn("DNS packet-in without an in_port: dropped")
            return UNPARSEABLE
        if pin.truncated:
            # OVS sent part of it (the intercept flow asks for all of it, so
            # this is not our pipeline's doing): only its buffer can go on.
            return UNPARSEABLE if self._reinject(pin) else NOT_SENT
        try:
            query = parse_query(pin.data)
        except FrameError as e:
            self.log.debug("re-injecting a DNS packet-in we cannot read: {error}", error=e)
            return UNPARSEABLE if self._reinject(pin) else NOT_SENT
        try:
            reply = self.answer_query(query.payload, query.client_ip)
        except Exception:
            self.log.failure("answering a DNS query from {client} failed",
                             client=query.client_ip)
            return ERROR if self._reinject(pin) else NOT_SENT
        if not isinstance(reply, (bytes, bytearray)) or not reply:
            return MISS if self._reinject(pin) else NOT_SENT
        if not reply_fits(query, reply):
            return TOO_LARGE if self._reinject(pin) else NOT_SENT
        sent = self.datapath.packet_out(reply_out(build_reply(query, bytes(reply)),
                                                  pin.in_port))
        return HIT if sent else NOT_SENT

    def _reinject(self, pin: PacketIn) -> bool:
        """Send the packet on through the tables, marked so the intercept lets it pass."""
        if pin.in_port is None:
            return False
        if pin.truncated:
            if pin.buffer_id == NO_BUFFER:
                self.log.warn("a truncated DNS packet-in without a buffer: dropped")
                return False
            message = buffered_reinject_out(pin.buffer_id, pin.in_port, DNS_SEEN_FIELD,
                                            DNS_SEEN)
        else:
            message = reinject_out(pin.data, pin.in_port, DNS_SEEN_FIELD, DNS_SEEN)
        return self.datapath.packet_out(message)
