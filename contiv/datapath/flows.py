"""
Flows as plain data: what the pipeline generator produces, what the encoder
turns into OpenFlow 1.3 flow-mods, what the datapath diffs against what is
installed, and what a fake flow table evaluates in tests.

A flow's identity in OpenFlow is (table, priority, match): two flows with the
same identity are the same flow, and a change of actions or cookie is a modify.

Match fields use os-ken's OXM names (``eth_type``, ``in_port``, ``ip_proto``,
``ipv4_src``, ``ipv4_dst``, ``ipv6_src``, ``ipv6_dst``, ``tcp_dst``,
``udp_dst``, ``sctp_dst``, ``icmpv6_type``, ``ct_state``, ``conj_id``,
``arp_op``, ``reg0``...). A value is an int or an address string, or a ``(value, mask)``
tuple for a masked match (``ct_state`` is always a pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

# Pseudo-ports, named as OpenFlow names them.
NORMAL = "NORMAL"
CONTROLLER = "CONTROLLER"
IN_PORT = "IN_PORT"
# Output max_len: send the whole packet to the controller, with no buffer id.
OFPCML_NO_BUFFER = 0xFFFF

# ct_state bits (OpenFlow/Nicira CT state flags).
CT_NEW = 0x01
CT_EST = 0x02
CT_REL = 0x04
CT_RPL = 0x08
CT_INV = 0x10
CT_TRK = 0x20


@dataclass(frozen=True)
class Goto:
    table: int


@dataclass(frozen=True)
class Output:
    port: Union[int, str]  # an OpenFlow port number, NORMAL, CONTROLLER or IN_PORT
    max_len: int = OFPCML_NO_BUFFER


@dataclass(frozen=True)
class Conjunction:
    id: int
    clause: int  # 1-based here, as ovs-ofctl writes it; 0-based on the wire
    n_clauses: int


@dataclass(frozen=True)
class Ct:
    """Send through conntrack: commit and/or recirculate to a table, in a zone."""

    zone: int
    commit: bool = False
    table: Optional[int] = None


@dataclass(frozen=True)
class Meter:
    """
    Pass the packet through an OpenFlow meter first (an instruction on the
    wire, which runs before the actions); a packet its band drops goes no
    further. Must come first among a flow's actions.
    """

    id: int


Action = Union[Goto, Output, Conjunction, Ct, Meter]


@dataclass(frozen=True)
class Flow:
    """One flow. No actions at all means drop."""

    table: int
    priority: int
    match: tuple[tuple[str, Any], ...]  # sorted by field name
    actions: tuple[Action, ...] = ()
    cookie: int = 0

    @property
    def identity(self) -> tuple[int, int, tuple[tuple[str, Any], ...]]:
        return (self.table, self.priority, self.match)


def flow(table: int, priority: int, actions: tuple = (), cookie: int = 0,
         **match: Any) -> Flow:
    """Build a Flow with its match fields sorted, so equal flows compare equal."""
    return Flow(table, priority, tuple(sorted(match.items())), tuple(actions), cookie)
