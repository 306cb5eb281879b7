"""
A fake OpenFlow 1.3 switch that evaluates a list of L{Flow}s for one packet,
so that tests can ask "is this packet allowed?" instead of reading flow text
(faucet's clib/fakeoftable.py does the same for faucet).

Lookup follows Open vSwitch's classifier (lib/classifier.c,
classifier_lookup__) rather than a simplification of it:

  - flows are grouped by mask, as OVS's subtables are; within one match the
    highest priority is seen first;
  - the highest-priority ordinary ("hard") match is a candidate; conjunction
    clause flows ("soft" matches) count only above it. The highest soft
    priority is tried first: a conjunction whose clauses 1..n all have a
    matching flow at that priority fires, and the switch looks the packet up
    again with C{conj_id} set, among ordinary flows only, so the conj_id flow
    wins at its own priority (and a higher ordinary flow still beats it). If
    nothing completes, the next lower flows with the same matches are tried.
  - OVS's documentation calls conjunctions that overlap at one priority
    unpredictable; here they raise L{Ambiguous} when the choice would change
    what happens to the packet.

C{ct(table=N)} recirculates a copy into table N with the caller's ct_state
(new unless said otherwise) plus +trk; C{ct(commit)} is recorded. Registers
(C{reg0}) start at zero unless the packet says otherwise (a packet-out that
set one) and survive recirculation; a meter passes every packet. A flow
without actions, or a table miss without a miss flow, drops.

Flows that OVS would refuse are refused when the table is built (L{Refused}):
unknown fields, missing prerequisites, masks on exact-only fields, value bits
outside the mask, bad conjunction actions, conjunction mixed with other
actions, goto to the same or an earlier table, and the same flow twice.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from contiv.datapath.flows import (
    CT_NEW,
    CT_TRK,
    Conjunction,
    Ct,
    Flow,
    Goto,
    Meter,
    Output,
)

ETH_IPV4, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
IP_PROTO = {"TCP": 6, "UDP": 17, "SCTP": 132}


@functools.lru_cache(maxsize=4096)
def _parse_address(text: str) -> tuple[int, int]:
    """(version, number) of an address; tests probe the same few addresses a great many times."""
    address = ipaddress.ip_address(text)
    return address.version, int(address)


class Refused(ValueError):
    """A flow that OVS would not accept, or that makes no sense to install."""


class Ambiguous(AssertionError):
    """Overlapping conjunctions at one priority that would treat the packet differently."""


def _is_ip(match: Mapping[str, Any]) -> bool:
    return match.get("eth_type") in (ETH_IPV4, ETH_IPV6)


def _l4(number: int):
    return lambda match: _is_ip(match) and match.get("ip_proto") == number


@dataclass(frozen=True)
class _Field:
    kind: str  # "int", "ipv4" or "ipv6"
    bits: int
    maskable: bool
    prerequisite: Any = None  # a predicate over the flow's match, or None

    @property
    def full(self) -> int:
        return (1 << self.bits) - 1

    def number(self, value: Any) -> int:
        if self.kind == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise Refused(f"not an integer: {value!r}")
            number = value
        else:
            try:
                address = ipaddress.ip_address(value)
            except ValueError as error:
                raise Refused(str(error)) from None
            if f"ipv{address.version}" != self.kind:
                raise Refused(f"{value!r} is not an {self.kind} address")
            number = int(address)
        if not 0 <= number <= self.full:
            raise Refused(f"{value!r} does not fit in {self.bits} bits")
        return number


FIELDS: Mapping[str, _Field] = {
    "in_port": _Field("int", 32, False),
    "eth_type": _Field("int", 16, False),
    "arp_op": _Field("int", 16, False, lambda m: m.get("eth_type") == ETH_ARP),
    "ip_proto": _Field("int", 8, False, _is_ip),
    "ipv4_src": _Field("ipv4", 32, True, lambda m: m.get("eth_type") == ETH_IPV4),
    "ipv4_dst": _Field("ipv4", 32, True, lambda m: m.get("eth_type") == ETH_IPV4),
    "ipv6_src": _Field("ipv6", 128, True, lambda m: m.get("eth_type") == ETH_IPV6),
    "ipv6_dst": _Field("ipv6", 128, True, lambda m: m.get("eth_type") == ETH_IPV6),
    "tcp_src": _Field("int", 16, True, _l4(6)),
    "tcp_dst": _Field("int", 16, True, _l4(6)),
    "udp_src": _Field("int", 16, True, _l4(17)),
    "udp_dst": _Field("int", 16, True, _l4(17)),
    "sctp_src": _Field("int", 16, True, _l4(132)),
    "sctp_dst": _Field("int", 16, True, _l4(132)),
    "icmpv6_type": _Field("int", 8, False, lambda m: (m.get("eth_type") == ETH_IPV6
                                                      and m.get("ip_proto") == 58)),
    "ct_state": _Field("int", 32, True),
    "conj_id": _Field("int", 32, False),
    "reg0": _Field("int", 32, True),
}


def _normal_match(candidate: Flow) -> tuple[tuple[str, int, int], ...]:
    """The match as OVS keeps it: (field, value, mask), without wildcarded fields."""
    match = dict(candidate.match)
    if len(match) != len(candidate.match):
        raise Refused(f"a field matched twice: {candidate}")
    normal = []
    for name, value in candidate.match:
        spec = FIELDS.get(name)
        if spec is None:
            raise Refused(f"unknown match field {name!r}: {candidate}")
        if spec.prerequisite is not None and not spec.prerequisite(match):
            raise Refused(f"{name} without its prerequisites: {candidate}")
        if isinstance(value, tuple):
            if not spec.maskable:
                raise Refused(f"{name} takes no mask: {candidate}")
            number, mask = spec.number(value[0]), spec.number(value[1])
            if number & ~mask:
                raise Refused(f"{name} value has bits outside its mask: {candidate}")
        else:
            if name == "ct_state":
                raise Refused(f"ct_state is a (value, mask) pair: {candidate}")
            number, mask = spec.number(value), spec.full
        if mask:
            normal.append((name, number, mask))
    return tuple(sorted(normal))


def _check_actions(candidate: Flow) -> None:
    actions = candidate.actions
    conjunctions = [a for a in actions if isinstance(a, Conjunction)]
    if conjunctions and len(conjunctions) != len(actions):
        raise Refused(f"conjunction actions may not be mixed with others: {candidate}")
    for action in conjunctions:
        if not 2 <= action.n_clauses <= 64:
            raise Refused(f"a conjunction needs 2 to 64 clauses: {candidate}")
        if not 1 <= action.clause <= action.n_clauses:
            raise Refused(f"clause {action.clause} of {action.n_clauses}: {candidate}")
        if not 0 <= action.id <= 0xFFFFFFFF:
            raise Refused(f"conjunction id out of range: {candidate}")
    for position, action in enumerate(actions):
        if isinstance(action, Goto):
            if position != len(actions) - 1:
                raise Refused(f"goto must come last: {candidate}")
            if not candidate.table < action.table <= 254:
                raise Refused(f"goto must go to a later table: {candidate}")
        elif isinstance(action, Ct):
            if not 0 <= action.zone <= 0xFFFF:
                raise Refused(f"ct zone out of range: {candidate}")
            if action.table is not None and not 0 <= action.table <= 254:
                raise Refused(f"ct table out of range: {candidate}")
        elif isinstance(action, Meter):
            if position != 0:
                raise Refused(f"a meter runs before the actions, so it comes first: "
                              f"{candidate}")
            if not 1 <= action.id <= 0xFFFF0000:
                raise Refused(f"meter id out of range: {candidate}")
        elif not isinstance(action, (Output, Conjunction)):
            raise Refused(f"unknown action {action!r}: {candidate}")


@dataclass
class _Rule:
    flow: Flow
    priority: int
    conjunctions: tuple[Conjunction, ...]  # empty: an ordinary ("hard") flow


@dataclass
class _Subtable:
    """The flows that share one mask, by their masked values (highest priority first)."""

    fields: tuple[str, ...]
    masks: tuple[int, ...]
    by_values: dict[tuple[int, ...], list[_Rule]] = field(default_factory=dict)

    def key(self, packet: Mapping[str, int]) -> Optional[tuple[int, ...]]:
        values = []
        for name, mask in zip(self.fields, self.masks):
            value = packet.get(name)
            if value is None:
                return None
            values.append(value & mask)
        return tuple(values)


class _Table:
    def __init__(self, table_id: int):
        self.id = table_id
        self._subtables: dict[tuple, _Subtable] = {}
        self._identities: set[tuple] = set()
        self._conjunctions: dict[int, tuple[int, int]] = {}  # id -> (priority, n_clauses)

    def add(self, candidate: Flow) -> None:
        if not 0 <= candidate.priority <= 0xFFFF:
            raise Refused(f"priority out of range: {candidate}")
        match = _normal_match(candidate)
        _check_actions(candidate)
        identity = (candidate.priority, match)
        if identity in self._identities:
            raise Refused(f"the same flow (table, priority, match) twice: {candidate}")
        self._identities.add(identity)
        conjunctions = tuple(a for a in candidate.actions if isinstance(a, Conjunction))
        for action in conjunctions:
            # OVS accepts these but calls the outcome undefined; a generator
            # producing them has a bug.
            seen = self._conjunctions.setdefault(action.id, (candidate.priority,
                                                             action.n_clauses))
            if seen != (candidate.priority, action.n_clauses):
                raise Refused(f"conjunction {action.id} used at priority/n_clauses {seen} "
                              f"and {(candidate.priority, action.n_clauses)}: {candidate}")
        fields = tuple(name for name, _, _ in match)
        masks = tuple(mask for _, _, mask in match)
        subtable = self._subtables.setdefault((fields, masks), _Subtable(fields, masks))
        rules = subtable.by_values.setdefault(tuple(v for _, v, _ in match), [])
        rules.append(_Rule(candidate, candidate.priority, conjunctions))
        rules.sort(key=lambda r: -r.priority)

    def lookup(self, packet: Mapping[str, int], conjunctive: bool = True) -> Optional[_Rule]:
        hard: Optional[_Rule] = None
        soft: list[Optional[tuple[list[_Rule], int]]] = []
        for subtable in self._subtables.values():
            key = subtable.key(packet)
            rules = subtable.by_values.get(key) if key is not None else None
            if not rules:
                continue
            top = rules[0]
            if hard is not None and top.priority <= hard.priority:
                continue
            if not top.conjunctions:
                hard = top
            elif conjunctive:
                soft.append((rules, 0))
        while True:
            floor = hard.priority if hard is not None else -1
            soft = [s for s in soft if s is not None and s[0][s[1]].priority > floor]
            if not soft:
                return hard
            top_priority = max(rules[at].priority for rules, at in soft)
            level = [i for i, (rules, at) in enumerate(soft)
                     if rules[at].priority == top_priority]
            found = self._complete(packet, [soft[i][0][soft[i][1]] for i in level])
            if found is not None:
                return found
            # Nothing completed here: fall back to the same matches at lower priority.
            for i in level:
                rules, at = soft[i]
                if at + 1 >= len(rules):
                    soft[i] = None
                    continue
                lower = rules[at + 1]
                if lower.conjunctions:
                    soft[i] = (rules, at + 1)
                else:
                    soft[i] = None
                    if lower.priority > floor:
                        hard = lower

    def _complete(self, packet: Mapping[str, int], level: list[_Rule]) -> Optional[_Rule]:
        clauses: dict[int, tuple[int, set[int]]] = {}
        complete: list[int] = []
        for rule in level:
            for action in rule.conjunctions:
                if action.n_clauses > len(level):
                    continue  # as OVS: it cannot complete with this few flows
                n_clauses, seen = clauses.setdefault(action.id, (action.n_clauses, set()))
                seen.add(action.clause)
                if len(seen) == n_clauses and action.id not in complete:
                    complete.append(action.id)
        found = []
        for conj_id in complete:
            rule = self.lookup({**packet, "conj_id": conj_id}, conjunctive=False)
            if rule is not None:
                found.append(rule)
        if len({rule.flow.actions for rule in found}) > 1:
            raise Ambiguous(f"table {self.id}: conjunctions {complete} overlap at priority "
                            f"{level[0].priority} with different actions: "
                            f"{[rule.flow for rule in found]}")
        return found[0] if found else None


@dataclass(frozen=True)
class Outcome:
    """What became of one packet: where it was output, and the flows it went through."""

    outputs: tuple = ()
    committed: bool = False
    path: tuple[Flow, ...] = ()

    @property
    def dropped(self) -> bool:
        return not self.outputs


# Packet fields that hold addresses, by name, and how to read them.
_ADDRESS_FIELDS = {name for name, spec in FIELDS.items() if spec.kind != "int"}


class FakeFlowTable:
    """Every table of a bridge, built from flows; refuses what OVS would."""

    MAX_DEPTH = 64

    def __init__(self, flows: Iterable[Flow]):
        self.flows = tuple(flows)
        self._tables: dict[int, _Table] = {}
        for candidate in self.flows:
            if not 0 <= candidate.table <= 254:
                raise Refused(f"table out of range: {candidate}")
            self._tables.setdefault(candidate.table, _Table(candidate.table)).add(candidate)

    def process(self, packet: Mapping[str, Any]) -> Outcome:
        """
        C{packet} holds match fields by name (addresses as text) and
        C{ct_state}: the conntrack state a ct() recirculation will see
        (default new; +trk is added).
        """
        fields: dict[str, int] = {}
        ct_state = CT_NEW
        for name, value in packet.items():
            if name == "ct_state":
                ct_state = value
                continue
            spec = FIELDS.get(name)
            if spec is None or name == "conj_id":
                raise KeyError(f"not a packet field: {name}")
            fields[name] = _parse_address(value)[1] if name in _ADDRESS_FIELDS else value
        fields["ct_state"] = 0  # untracked until ct()
        fields["conj_id"] = 0
        fields.setdefault("reg0", 0)  # registers start at zero unless a packet-out set them
        result = {"outputs": [], "committed": False, "path": []}
        self._run(fields, 0, ct_state | CT_TRK, result, 0)
        return Outcome(tuple(result["outputs"]), result["committed"], tuple(result["path"]))

    def _run(self, packet: dict, table_id: int, ct_state: int, result: dict, depth: int) -> None:
        if depth > self.MAX_DEPTH:
            raise RecursionError("packet looped through the tables")
        table = self._tables.get(table_id)
        rule = table.lookup(packet) if table is not None else None
        if rule is None:
            return  # OpenFlow 1.3: a table miss without a miss flow drops
        result["path"].append(rule.flow)
        for action in rule.flow.actions:
            if isinstance(action, Output):
                result["outputs"].append(action.port)
            elif isinstance(action, Ct):
                if action.commit:
                    result["committed"] = True
                if action.table is not None:
                    self._run({**packet, "ct_state": ct_state}, action.table, ct_state,
                              result, depth + 1)
            elif isinstance(action, Goto):
                self._run(packet, action.table, ct_state, result, depth + 1)

    @staticmethod
    def packet(src_ip: str, dst_ip: str, protocol: str, port: int, *, src_port: int = 40000,
               ct_state: int = CT_NEW) -> dict:
        """A TCP, UDP or SCTP packet between two addresses of one family."""
        version = _parse_address(src_ip)[0]
        if _parse_address(dst_ip)[0] != version:
            raise ValueError(f"{src_ip} and {dst_ip} are of different families")
        proto = protocol.lower()
        return {"eth_type": ETH_IPV4 if version == 4 else ETH_IPV6,
                f"ipv{version}_src": src_ip, f"ipv{version}_dst": dst_ip,
                "ip_proto": IP_PROTO[protocol.upper()],
                f"{proto}_src": src_port, f"{proto}_dst": port, "ct_state": ct_state}

    def allowed(self, src_ip: str, dst_ip: str, protocol: str, port: int) -> bool:
        """Does a new connection's first packet reach normal forwarding?"""
        outcome = self.process(self.packet(src_ip, dst_ip, protocol, port))
        return "NORMAL" in outcome.outputs
