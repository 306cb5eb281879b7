"""
Flows to OpenFlow 1.3 flow-mods, at the speed OVS takes them.

Building one os-ken message object per flow costs about 25 us, so 300,000
flows would take the Python side longer than OVS needs to install them.
Instead each flow *shape* (the command, the match fields and whether they are
masked, the kinds of actions) is built once with os-ken; encoding it again
with every leaf value flipped shows where each leaf sits in the bytes; after
that, a flow of that shape is a copy of the template with its values packed
in. A shape whose leaves cannot be located that way (never seen so far) falls
back to os-ken for every flow, so the result is always os-ken's encoding.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, Callable, Iterable, Optional

from contiv.datapath.flows import (CONTROLLER, IN_PORT, NORMAL, Conjunction, Ct, Flow, Goto,
                                   Meter, Output)
from contiv.openflow.ofp import DATAPATH, encode, ofproto, parser

ADD = ofproto.OFPFC_ADD
MODIFY_STRICT = ofproto.OFPFC_MODIFY_STRICT
DELETE_STRICT = ofproto.OFPFC_DELETE_STRICT
DELETE = ofproto.OFPFC_DELETE

_PORTS = {NORMAL: ofproto.OFPP_NORMAL, CONTROLLER: ofproto.OFPP_CONTROLLER,
          IN_PORT: ofproto.OFPP_IN_PORT}
_ADDRESS_FIELDS = {"ipv4_src": 4, "ipv4_dst": 4, "ipv6_src": 16, "ipv6_dst": 16,
                   "arp_spa": 4, "arp_tpa": 4}
# Widths of the integer match fields we use, in bytes on the wire.
_INT_FIELDS = {"in_port": 4, "eth_type": 2, "ip_proto": 1, "tcp_dst": 2, "tcp_src": 2,
               "udp_dst": 2, "udp_src": 2, "sctp_dst": 2, "sctp_src": 2, "icmpv6_type": 1,
               "icmpv4_type": 1, "arp_op": 2, "ct_state": 4, "conj_id": 4, "reg0": 4,
               "reg1": 4, "ip_dscp": 1, "ct_zone": 2, "ct_mark": 4}

# A leaf: (pack format, value). Addresses pack as bytes.
Leaf = tuple[str, Any]


def _address_leaf(field: str, value: str) -> Leaf:
    width = _ADDRESS_FIELDS[field]
    family = socket.AF_INET if width == 4 else socket.AF_INET6
    return (f"{width}s", socket.inet_pton(family, value))


def _int_leaf(field: str, value: int) -> Leaf:
    return ({1: "!B", 2: "!H", 4: "!I", 8: "!Q"}[_INT_FIELDS[field]], value)


def _match_leaves(flow: Flow) -> tuple[tuple, list[Leaf]]:
    shape, leaves = [], []
    for name, value in flow.match:
        masked = isinstance(value, tuple)
        shape.append((name, masked))
        make = _address_leaf if name in _ADDRESS_FIELDS else _int_leaf
        if not masked:
            leaves.append(make(name, value))
            continue
        (fmt, bits), (_, mask) = make(name, value[0]), make(name, value[1])
        # OVS refuses a value with bits outside its mask; os-ken masks it too.
        if isinstance(bits, bytes):
            bits = bytes(b & m for b, m in zip(bits, mask))
        else:
            bits &= mask
        leaves += [(fmt, bits), (fmt, mask)]
    return tuple(shape), leaves


def _mask_positions(match_shape: tuple) -> set[int]:
    """Which leaves (counting the three head leaves) are masks."""
    positions, position = set(), 3
    for _, masked in match_shape:
        if masked:
            positions.add(position + 1)
        position += 2 if masked else 1
    return positions


def _action_leaves(flow: Flow) -> tuple[tuple, list[Leaf]]:
    shape, leaves = [], []
    for action in flow.actions:
        if isinstance(action, Conjunction):
            shape.append("conjunction")
            leaves += [("!B", action.clause - 1), ("!B", action.n_clauses), ("!I", action.id)]
        elif isinstance(action, Ct):
            shape.append(("ct", action.commit, action.table is not None))
            leaves.append(("!H", action.zone))
            if action.table is not None:
                leaves.append(("!B", action.table))
        elif isinstance(action, Output):
            shape.append("output")
            leaves += [("!I", _PORTS.get(action.port, action.port)), ("!H", action.max_len)]
        elif isinstance(action, Goto):
            shape.append("goto")
            leaves.append(("!B", action.table))
        elif isinstance(action, Meter):
            shape.append("meter")
            leaves.append(("!I", action.id))
        else:
            raise TypeError(f"unknown action {action!r}")
    return tuple(shape), leaves


def _unpack_leaf(leaf: Leaf) -> Any:
    fmt, value = leaf
    if fmt.endswith("s"):
        family = socket.AF_INET if fmt == "4s" else socket.AF_INET6
        return socket.inet_ntop(family, value)
    return value


def _flipped(leaf: Leaf) -> Leaf:
    """The leaf with every bit inverted: every byte of it differs in the encoding."""
    fmt, value = leaf
    if fmt.endswith("s"):
        return (fmt, bytes(b ^ 0xFF for b in value))
    return (fmt, value ^ ((1 << (8 * struct.calcsize(fmt))) - 1))


def to_message(flow: Flow, command: int = ADD, *, leaves: Optional[list[Leaf]] = None,
               cookie_mask: Optional[int] = None) -> Any:
    """
    The os-ken OFPFlowMod for a flow (the slow, reference path). C{leaves}
    overrides the flow's own values, in the order the leaf functions list
    them: how templates are located.
    """
    match_shape, match_values = _match_leaves(flow)
    action_shape, action_values = _action_leaves(flow)
    head = [("!Q", flow.cookie), ("!B", flow.table), ("!H", flow.priority)]
    values = leaves if leaves is not None else head + match_values + action_values
    cookie, table, priority = (values[0][1], values[1][1], values[2][1])
    if cookie_mask is None:
        # A modify or delete touches the flow only while it carries our cookie:
        # a flow of the same identity that someone else installed is left alone.
        cookie_mask = 0 if command == ADD else 0xFFFF_FFFF_FFFF_FFFF
    position = 3
    fields: dict[str, Any] = {}
    for name, masked in match_shape:
        count = 2 if masked else 1
        parts = [_unpack_leaf(leaf) for leaf in values[position:position + count]]
        position += count
        fields[name] = tuple(parts) if masked else parts[0]
    match = parser.OFPMatch(**fields)
    actions: list[Any] = []
    goto: Optional[int] = None
    meter: Optional[int] = None
    for kind in action_shape:
        if kind == "conjunction":
            clause, n_clauses, conj_id = (v for _, v in values[position:position + 3])
            position += 3
            actions.append(parser.NXActionConjunction(clause=clause, n_clauses=n_clauses,
                                                      id_=conj_id))
        elif isinstance(kind, tuple) and kind[0] == "ct":
            _, commit, has_table = kind
            zone = values[position][1]
            position += 1
            recirc = ofproto.OFPTT_ALL  # NX_CT_RECIRC_NONE: no recirculation
            if has_table:
                recirc = values[position][1]
                position += 1
            actions.append(parser.NXActionCT(flags=1 if commit else 0, zone_src=None,
                                             zone_ofs_nbits=zone, recirc_table=recirc, alg=0,
                                             actions=[]))
        elif kind == "output":
            port, max_len = values[position][1], values[position + 1][1]
            position += 2
            actions.append(parser.OFPActionOutput(port, max_len))
        elif kind == "goto":
            goto = values[position][1]
            position += 1
        elif kind == "meter":
            meter = values[position][1]
            position += 1
    instructions: list[Any] = []
    if command not in (DELETE, DELETE_STRICT):
        if meter is not None:
            # First on the wire as in execution (OpenFlow 1.3 5.9): a template
            # finds the meter id's bytes in action order when Meter comes first.
            instructions.append(parser.OFPInstructionMeter(meter, ofproto.OFPIT_METER))
        if actions:
            instructions.append(parser.OFPInstructionActions(ofproto.OFPIT_APPLY_ACTIONS,
                                                             actions))
        if goto is not None:
            instructions.append(parser.OFPInstructionGotoTable(goto))
    message = parser.OFPFlowMod(
        DATAPATH, cookie=cookie, cookie_mask=cookie_mask, table_id=table, command=command,
        priority=priority, buffer_id=ofproto.OFP_NO_BUFFER, out_port=ofproto.OFPP_ANY,
        out_group=ofproto.OFPG_ANY, flags=0, match=match, instructions=instructions)
    return message


class _Template:
    __slots__ = ("base", "slots")

    def __init__(self, base: bytes, slots: list[tuple[int, str]]):
        self.base = base
        self.slots = slots  # (offset, format) per leaf; offset -1: not on the wire

    def fill(self, leaves: list[Leaf], xid: int) -> bytes:
        buffer = bytearray(self.base)
        struct.pack_into("!I", buffer, 4, xid)
        pack_into = struct.pack_into
        for (offset, fmt), (_, value) in zip(self.slots, leaves):
            if offset >= 0:
                pack_into(fmt, buffer, offset, value)
        return bytes(buffer)


def _ones(leaf: Leaf) -> Leaf:
    return _flipped(_zero(leaf))


def _zero(leaf: Leaf) -> Leaf:
    fmt = leaf[0]
    return (fmt, bytes(struct.calcsize(fmt)) if fmt.endswith("s") else 0)


def _locate(flow: Flow, command: int, leaves: list[Leaf], masks: set[int],
            actions_from: Optional[int] = None) -> Optional[_Template]:
    """
    Find each leaf's bytes: a probe with every value zero and every mask all
    ones, then each leaf inverted in turn (a value under an all-ones mask, or a
    mask over a zero value) changes exactly that leaf's bytes.

    The leaves from C{actions_from} on (the actions') are first tried all at
    once: os-ken writes actions in their order and each leaf's fields in
    the order we list them, so the bytes that change are theirs in turn. A
    clause flow shared by many rules carries dozens of conjunctions, and an
    event that adds one more is a shape never seen: one encoding instead of
    one per leaf (a 50-conjunction flow: 45 ms) keeps that off the event's
    latency. The result is checked against os-ken with distinct values; if
    it differs, every leaf is located on its own.
    """
    probe = [_ones(leaf) if i in masks else _zero(leaf) for i, leaf in enumerate(leaves)]
    base = encode(to_message(flow, command, leaves=probe), 0)

    def one_by_one(indices) -> Optional[list[tuple[int, str]]]:
        slots = []
        for i in indices:
            variant = list(probe)
            variant[i] = _flipped(probe[i])
            differing = _differing(flow, command, variant, base)
            if differing is None:
                return None
            width = struct.calcsize(probe[i][0])
            if not differing:
                # The leaf is not on the wire for this command (a delete's actions).
                slots.append((-1, probe[i][0]))
                continue
            start = differing[0]
            if differing != list(range(start, start + width)):
                return None
            slots.append((start, probe[i][0]))
        return slots

    split = len(leaves) if actions_from is None else actions_from
    head = one_by_one(range(split))
    if head is None:
        return None
    rest = _in_order(flow, command, probe, base, split)
    if rest is not None:
        template = _Template(base, head + rest)
        check = _distinct(probe, split)
        if template.fill(check, 0) == encode(to_message(flow, command, leaves=check), 0):
            return template
    rest = one_by_one(range(split, len(leaves)))
    return None if rest is None else _Template(base, head + rest)


def _differing(flow: Flow, command: int, leaves: list[Leaf], base: bytes
               ) -> Optional[list[int]]:
    """The byte offsets where these leaves' encoding differs from base; None if not comparable."""
    try:
        other = encode(to_message(flow, command, leaves=leaves), 0)
    except Exception:
        return None
    if len(other) != len(base):
        return None
    return [j for j in range(len(base)) if base[j] != other[j]]


def _in_order(flow: Flow, command: int, probe: list[Leaf], base: bytes,
              start: int) -> Optional[list[tuple[int, str]]]:
    """Slots for probe[start:], all inverted at once, assuming they sit on the wire in order."""
    variant = probe[:start] + [_flipped(leaf) for leaf in probe[start:]]
    differing = _differing(flow, command, variant, base)
    if differing is None:
        return None
    if not differing:
        return [(-1, leaf[0]) for leaf in probe[start:]]
    slots, at = [], 0
    for leaf in probe[start:]:
        width = struct.calcsize(leaf[0])
        taken = differing[at:at + width]
        if len(taken) != width or taken != list(range(taken[0], taken[0] + width)):
            return None
        slots.append((taken[0], leaf[0]))
        at += width
    return slots if at == len(differing) else None


def _distinct(probe: list[Leaf], start: int) -> list[Leaf]:
    """The probe with a different value in each leaf from C{start} on: a misplaced slot shows."""
    check = list(probe)
    for n, (fmt, _) in enumerate(probe[start:]):
        width = struct.calcsize(fmt)
        value = (n % 255) + 1
        check[start + n] = (fmt, bytes([value] * width) if fmt.endswith("s") else value)
    return check


class FlowEncoder:
    """Encodes flows to flow-mod bytes through per-shape templates (see module doc)."""

    def __init__(self) -> None:
        self._templates: dict[tuple, Optional[_Template]] = {}

    def encode(self, flow: Flow, command: int, xid: int) -> bytes:
        match_shape, match_values = _match_leaves(flow)
        action_shape, action_values = _action_leaves(flow)
        leaves = [("!Q", flow.cookie), ("!B", flow.table), ("!H", flow.priority),
                  *match_values, *action_values]
        key = (command, match_shape, action_shape)
        try:
            template = self._templates[key]
        except KeyError:
            template = self._templates[key] = _locate(
                flow, command, leaves, _mask_positions(match_shape),
                actions_from=len(leaves) - len(action_values))
        if template is None:
            return encode(to_message(flow, command), xid)
        return template.fill(leaves, xid)

    def encode_all(self, flows: Iterable[Flow], command: int,
                   next_xid: Callable[[], int]) -> list[bytes]:
        return [self.encode(flow, command, next_xid()) for flow in flows]


def delete_by_cookie(cookie: int, cookie_mask: int, xid: int,
                     table: int = ofproto.OFPTT_ALL) -> bytes:
    """Delete every flow whose cookie matches under the mask, in every table."""
    message = parser.OFPFlowMod(
        DATAPATH, cookie=cookie, cookie_mask=cookie_mask, table_id=table, command=DELETE,
        priority=0, buffer_id=ofproto.OFP_NO_BUFFER, out_port=ofproto.OFPP_ANY,
        out_group=ofproto.OFPG_ANY, flags=0, match=parser.OFPMatch(), instructions=[])
    return encode(message, xid)


def cidr_match(network: str) -> Any:
    """A CIDR as the match value flows use: the address, or (address, netmask)."""
    net = ipaddress.ip_network(network, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return (str(net.network_address), str(net.netmask))
