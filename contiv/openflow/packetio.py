"""
Packets to and from the switch, and the meter that bounds them: decoding a
PACKET_IN into plain fields, and building PACKET_OUT and METER_MOD messages
(os-ken message objects, sent with C{OpenFlowProtocol.send}/C{send_quiet}).

A packet-out is about 7 us to build and encode with os-ken, small next to
the DNS work behind each one, so no templates here (compare flowmod.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Optional

from contiv.openflow.ofp import DATAPATH, HEADER, HEADER_SIZE, OFP_VERSION, ofproto, parser

__all__ = ["PacketIn", "packet_in", "packet_in_bytes", "reply_out", "reinject_out",
           "buffered_reinject_out", "meter_mod", "NO_BUFFER", "CONTROLLER", "TABLE"]

NO_BUFFER = ofproto.OFP_NO_BUFFER
CONTROLLER = ofproto.OFPP_CONTROLLER
TABLE = ofproto.OFPP_TABLE
_PACKET_IN_FIXED = struct.Struct("!IHBBQ")  # buffer_id, total_len, reason, table_id, cookie


@dataclass(frozen=True)
class PacketIn:
    """What a packet-in says: where the packet came from, why, and the packet."""

    in_port: Optional[int]
    reason: int
    table_id: int
    cookie: int
    data: bytes
    total_len: int
    buffer_id: int = NO_BUFFER

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.total_len


def packet_in(msg: Any) -> PacketIn:
    """The fields of an os-ken OFPPacketIn (as C{OpenFlowProtocol.on_packet_in} gets it)."""
    # OpenFlow 1.3 carries the ingress port in the match (OXM in_port), not
    # in a field of its own; OVS always includes it.
    try:
        in_port = msg.match["in_port"]
    except KeyError:
        in_port = None
    return PacketIn(in_port, msg.reason, msg.table_id, msg.cookie, bytes(msg.data or b""),
                    msg.total_len, msg.buffer_id)


def packet_in_bytes(xid: int, data: bytes, in_port: int, *, reason: int = ofproto.OFPR_ACTION,
                    table_id: int = 0, cookie: int = 0, total_len: Optional[int] = None,
                    buffer_id: int = NO_BUFFER) -> bytes:
    """
    A PACKET_IN as a switch sends it (os-ken decodes these but cannot encode
    them): for fake switches in tests.
    """
    match = parser.OFPMatch(in_port=in_port)
    body = bytearray()
    match.serialize(body, 0)  # padded to 8 bytes
    body += b"\0\0" + data
    fixed = _PACKET_IN_FIXED.pack(buffer_id, len(data) if total_len is None else total_len,
                                  reason, table_id, cookie)
    length = HEADER_SIZE + len(fixed) + len(body)
    return HEADER.pack(OFP_VERSION, ofproto.OFPT_PACKET_IN, length, xid) + fixed + bytes(body)


def reply_out(data: bytes, port: int) -> Any:
    """A frame the controller made, out of one port (not through the tables)."""
    return parser.OFPPacketOut(DATAPATH, buffer_id=NO_BUFFER, in_port=CONTROLLER,
                               actions=[parser.OFPActionOutput(port, 0)], data=data)


def _reinject_actions(register: str, value: int) -> list:
    # The register is how the tables tell a re-injected packet from a fresh
    # one. OpenFlow 1.3 set-field has no mask: this writes the whole
    # register, which starts at zero for a packet-out anyway.
    return [parser.OFPActionSetField(**{register: value}),
            parser.OFPActionOutput(TABLE, 0)]


def reinject_out(data: bytes, in_port: int, register: str, value: int) -> Any:
    """
    A packet sent back through the tables from table 0, as if it had just
    arrived on C{in_port}, with C{register} set to C{value}.
    """
    return parser.OFPPacketOut(DATAPATH, buffer_id=NO_BUFFER, in_port=in_port,
                               actions=_reinject_actions(register, value), data=data)


def buffered_reinject_out(buffer_id: int, in_port: int, register: str, value: int) -> Any:
    """L{reinject_out} of a packet the switch kept in a buffer (a truncated packet-in)."""
    return parser.OFPPacketOut(DATAPATH, buffer_id=buffer_id, in_port=in_port,
                               actions=_reinject_actions(register, value))


def meter_mod(meter_id: int, packets_per_second: int, burst: int, *,
              command: int = ofproto.OFPMC_ADD) -> Any:
    """A meter that drops packets beyond C{packets_per_second} (after a burst of C{burst})."""
    flags = ofproto.OFPMF_PKTPS | (ofproto.OFPMF_BURST if burst else 0)
    return parser.OFPMeterMod(DATAPATH, command=command, flags=flags, meter_id=meter_id,
                              bands=[parser.OFPMeterBandDrop(rate=packets_per_second,
                                                             burst_size=burst)])
