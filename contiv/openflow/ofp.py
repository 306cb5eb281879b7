"""
The one place that imports the OpenFlow 1.3 message codec: os-ken, or plain
ryu where that is what the machine has. Everything else in contiv takes
``ofproto`` (the constants) and ``parser`` (the message classes) from here.

os-ken's message classes are written for its own controller: they serialize
through ``datapath.ofproto``/``datapath.ofproto_parser`` and keep the datapath
on every decoded message. ``DATAPATH`` is the stand-in that gives them exactly
that and nothing more, so no os-ken controller machinery is ever started.
"""

from __future__ import annotations

import re
import struct
from typing import Any

try:
    from os_ken.ofproto import ofproto_common
    from os_ken.ofproto import ofproto_parser
    from os_ken.ofproto import ofproto_v1_3 as ofproto
    from os_ken.ofproto import ofproto_v1_3_parser as parser
except ImportError:  # pragma: no cover - only where ryu is installed instead
    from ryu.ofproto import ofproto_common  # type: ignore[no-redef]
    from ryu.ofproto import ofproto_parser  # type: ignore[no-redef]
    from ryu.ofproto import ofproto_v1_3 as ofproto  # type: ignore[no-redef]
    from ryu.ofproto import ofproto_v1_3_parser as parser  # type: ignore[no-redef]

__all__ = ["ofproto", "parser", "ofproto_parser", "ofproto_common", "DATAPATH", "Datapath",
           "encode", "decode", "header", "set_xid", "error_names", "HEADER", "HEADER_SIZE",
           "OFP_VERSION"]

OFP_VERSION = ofproto.OFP_VERSION  # 0x04, OpenFlow 1.3
HEADER = struct.Struct("!BBHI")  # version, type, length, xid
HEADER_SIZE = HEADER.size
_XID = struct.Struct("!I")


class Datapath:
    """What os-ken's message classes need of a datapath to encode and decode."""

    ofproto = ofproto
    ofproto_parser = parser
    id = None

    def __repr__(self) -> str:
        return "<contiv.openflow.ofp.Datapath>"


DATAPATH = Datapath()


def encode(msg: Any, xid: int) -> bytes:
    """
    The wire bytes of an os-ken message with the given xid. The message object
    may be encoded again with another xid (os-ken refuses to re-set an xid).
    """
    msg.xid = None
    msg.set_xid(xid)
    msg.serialize()
    return bytes(msg.buf)


_DECODABLE = getattr(parser, "_MSG_PARSERS", None)


def decode(data: bytes) -> Any:
    """
    One whole message (header included) as an os-ken message object. os-ken
    decodes what a switch sends (and FLOW_MOD), not most controller requests.
    """
    version, msg_type, msg_len, xid = HEADER.unpack_from(data)
    # os-ken logs a traceback and returns None for a type it has no parser for.
    if version == OFP_VERSION and _DECODABLE is not None and msg_type not in _DECODABLE:
        raise ValueError(f"os-ken cannot decode OpenFlow 1.3 message type {msg_type}")
    msg = ofproto_parser.msg(DATAPATH, version, msg_type, msg_len, xid, data[:msg_len])
    if msg is None:
        raise ValueError(f"malformed OpenFlow message type {msg_type} xid {xid}")
    return msg


def header(data: bytes, offset: int = 0) -> tuple[int, int, int, int]:
    """(version, type, length, xid) of the message at offset."""
    return HEADER.unpack_from(data, offset)


def set_xid(data: bytes, xid: int) -> bytes:
    """A copy of one pre-encoded message with its xid replaced."""
    return data[:4] + _XID.pack(xid) + data[8:]


def _names_by_value(prefix: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in vars(ofproto).items():
        if name.startswith(prefix) and isinstance(value, int):
            names.setdefault(value, name)
    return names


def _build_error_tables() -> tuple[dict[int, str], dict[int, dict[int, str]]]:
    # The same rule as os-ken's ofp_error_code_to_str ("OFPET_BAD_MATCH" ->
    # "OFPBMC_"), built once: that function scans the whole module per call,
    # too slow when a pipelined batch of thousands of flow-mods is rejected.
    types = _names_by_value("OFPET_")
    codes: dict[int, dict[int, str]] = {}
    for value, name in types.items():
        if name == "OFPET_EXPERIMENTER":
            continue
        prefix = "OFP" + "".join(m.upper() for m in re.findall("_(.)", name)) + "C_"
        codes[value] = _names_by_value(prefix)
    return types, codes


_ERROR_TYPES, _ERROR_CODES = _build_error_tables()
_ONF_ERRORS = _names_by_value("ONFERR_ET_")


def error_names(type_: int, code: int, experimenter: int | None = None) -> tuple[str, str]:
    """
    (type name, code name) of an OpenFlow error, e.g. ("OFPET_BAD_MATCH",
    "OFPBMC_BAD_PREREQ"). For an experimenter error the code is its exp_type;
    ONF's (bundles, in OpenFlow 1.3) are named, others get a numeric name.
    """
    type_name = _ERROR_TYPES.get(type_, f"OFPET_UNKNOWN_{type_}")
    if type_ == ofproto.OFPET_EXPERIMENTER:
        if experimenter == ofproto_common.ONF_EXPERIMENTER_ID and code in _ONF_ERRORS:
            return type_name, _ONF_ERRORS[code]
        return type_name, f"EXPERIMENTER_0x{(experimenter or 0):08x}_{code}"
    return type_name, _ERROR_CODES.get(type_, {}).get(code, f"UNKNOWN_{code}")
