"""
The policy pipeline (DESIGN.md, "Datapath pipeline") as pure data: the tables
it is made of, and the flows that enforce one node's share of the compiled
policies.

Nothing here talks to OVS. L{pipeline_flows} takes a node's state (its
L{NodeIndex}, the compiled policies by id and the groups by key, as
L{contiv.store.layout.NodeState} holds them) and returns every flow the bridge
should hold; the datapath diffs that list against what is installed.

A packet's walk, for a new connection:

  classifier -> conntrack state -> egress rules
    -> (egress default) -> ingress rules -> (ingress default) -> commit

With DNS interception on, the conntrack-state table first steers UDP/53 from
a local pod, whatever its conntrack state (but not invalid), to the DNS
intercept table, which meters it and sends it to the controller: a second
query on a 5-tuple that an earlier miss committed is established, and would
otherwise go straight to normal forwarding. A miss comes back from the
controller as a packet-out through table 0 with C{DNS_SEEN} set in C{reg0},
which the steering flow does not match: it goes through conntrack and policy
as if never intercepted. See docs/architecture.md, "DNS interception".

Every rule becomes one conjunctive match over its dimensions (local pods,
peers, ports), so a rule over N pods, M peers and P ports costs N + M + P + 1
flows. All allows in a rules table lead to the same place, so overlapping
conjunctions (which OVS resolves unpredictably) cannot change a verdict.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Protocol, Union

from contiv.datapath.flows import (
    CONTROLLER,
    CT_EST,
    CT_INV,
    CT_NEW,
    CT_REL,
    CT_TRK,
    NORMAL,
    OFPCML_NO_BUFFER,
    Action,
    Conjunction,
    Ct,
    Flow,
    Goto,
    Meter,
    Output,
)
from contiv.policy.types import (
    EGRESS,
    INGRESS,
    CompiledPolicy,
    Group,
    LocalPod,
    NamedPort,
    NodeIndex,
    PortRule,
    Rule,
)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

ETH_ARP = 0x0806
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
IP_PROTO = {"TCP": 6, "UDP": 17, "SCTP": 132}
IPPROTO_ICMPV6 = 58
ND_TYPES = (133, 134, 135, 136)  # router solicit/advert, neighbour solicit/advert
DNS_PORT = 53

# The register bit a re-injected DNS miss carries (set by the packet-out, so
# never by a flow): "the DNS code has seen this packet, do not intercept it".
# Registers start at zero for every packet from a port and survive ct()
# recirculation, so only a re-injected packet has it.
DNS_SEEN_FIELD = "reg0"
DNS_SEEN = 0x1
# The OpenFlow meter that bounds the packet-ins DNS interception may cause.
DNS_METER_ID = 1

# Priorities. Single-dimension allows sit above the conjunctions so that a
# plain flow never shares an identity with a conjunction clause (a flow with
# conjunction actions can have no other action).
PRIORITY_STATIC_HIGH = 300
# Between the invalid drop and the established fast path (see the module doc).
PRIORITY_DNS_STEER = 250
PRIORITY_STATIC = 200
PRIORITY_IP = 100
PRIORITY_ALLOW = 200
PRIORITY_CONJUNCTION = 100
PRIORITY_ISOLATED = 100
PRIORITY_MISS = 0


class FlowRefused(ValueError):
    """A flow that its table's declaration does not allow."""


# -- the tables -----------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """
    One stage: which fields its flows may match, which tables they may send a
    packet to (by goto or ct recirculation), and what happens on a miss (the
    actions of its priority-0 flow).
    """

    name: str
    id: int
    match_fields: frozenset[str]
    next_tables: frozenset[int]
    miss: tuple[Action, ...] = ()

    def check(self, candidate: Flow) -> None:
        if candidate.table != self.id:
            raise FlowRefused(f"flow for table {candidate.table} checked against "
                              f"{self.name} ({self.id})")
        extra = sorted(name for name, _ in candidate.match if name not in self.match_fields)
        if extra:
            raise FlowRefused(f"{self.name} flows may not match {', '.join(extra)}: "
                              f"{candidate}")
        for action in candidate.actions:
            target = getattr(action, "table", None)  # Goto, or Ct recirculating
            if target is not None and target not in self.next_tables:
                raise FlowRefused(f"{self.name} flows may not send packets to table "
                                  f"{target}: {candidate}")


CLASSIFIER = 0
CONNTRACK = 10
DNS_INTERCEPT = 20
EGRESS_RULES = 30
EGRESS_DEFAULT = 40
INGRESS_RULES = 50
INGRESS_DEFAULT = 60
COMMIT = 70

_L3 = frozenset({"eth_type"})
_ADDRESSES = frozenset({"ipv4_src", "ipv4_dst", "ipv6_src", "ipv6_dst"})
_L4 = frozenset({"ip_proto", "tcp_dst", "udp_dst", "sctp_dst"})


def _tables(zone: int) -> dict[int, Table]:
    """The pipeline, in DESIGN.md's order; ids leave gaps for stages to come."""
    declared = (
        Table("classifier", CLASSIFIER,
              _L3 | {"in_port", "ip_proto", "icmpv6_type", "arp_op"},
              frozenset({CONNTRACK}), (Output(NORMAL),)),
        # The DNS steering flows match a local pod's UDP/53 and the seen bit.
        Table("conntrack-state", CONNTRACK,
              _L3 | {"ct_state", "ip_proto", "udp_dst", "ipv4_src", "ipv6_src",
                     DNS_SEEN_FIELD},
              frozenset({DNS_INTERCEPT, EGRESS_RULES}), ()),
        # Only steered packets get here, all of them DNS queries; the miss
        # (unreachable) carries on as the conntrack table would have.
        Table("dns-intercept", DNS_INTERCEPT, _L3 | {"ip_proto", "udp_dst"},
              frozenset({EGRESS_RULES}), (Goto(EGRESS_RULES),)),
        Table("egress-rules", EGRESS_RULES, _L3 | _ADDRESSES | _L4 | {"conj_id"},
              frozenset({INGRESS_RULES, EGRESS_DEFAULT}), (Goto(EGRESS_DEFAULT),)),
        Table("egress-default", EGRESS_DEFAULT, _L3 | {"ipv4_src", "ipv6_src"},
              frozenset({INGRESS_RULES}), (Goto(INGRESS_RULES),)),
        Table("ingress-rules", INGRESS_RULES, _L3 | _ADDRESSES | _L4 | {"conj_id"},
              frozenset({COMMIT, INGRESS_DEFAULT}), (Goto(INGRESS_DEFAULT),)),
        Table("ingress-default", INGRESS_DEFAULT, _L3 | {"ipv4_dst", "ipv6_dst"},
              frozenset({COMMIT}), (Goto(COMMIT),)),
        # OVS accepts ct() only on flows that match IP: the commit is per family,
        # and the miss (never reached by IP) forwards plainly.
        Table("commit", COMMIT, _L3, frozenset(), (Output(NORMAL),)),
    )
    return {table.id: table for table in declared}


TABLES: Mapping[int, Table] = _tables(zone=1)


def check_flows(flows: Iterable[Flow], tables: Mapping[int, Table] = TABLES) -> None:
    """Refuse any flow its table does not allow, and any table not declared."""
    for candidate in flows:
        table = tables.get(candidate.table)
        if table is None:
            raise FlowRefused(f"no table {candidate.table} in the pipeline: {candidate}")
        table.check(candidate)


# -- ports ------------------------------------------------------------------------

def port_range_masks(first: int, last: int, width: int = 16) -> list[tuple[int, int]]:
    """
    The fewest (value, mask) pairs whose matches together hold exactly
    first..last: the largest aligned power-of-two block at each step.
    """
    top = (1 << width) - 1
    if not 0 <= first <= last <= top:
        raise ValueError(f"bad port range {first}..{last}")
    blocks = []
    while first <= last:
        size = first & -first if first else 1 << width
        while first + size - 1 > last:
            size >>= 1
        blocks.append((first, top & ~(size - 1)))
        first += size
    return blocks


# -- conjunction ids --------------------------------------------------------------

ConjunctionKey = tuple  # (policy id, direction, rule index, variant)


class ConjunctionIds:
    """
    Conjunction ids derived from what a conjunction enforces, kept across
    generations: the datapath diffs flows between generations, so an
    unchanged rule must keep its id. A hash collision moves the newcomer to
    the next free id; the holder keeps its own.
    """

    def __init__(self, space: int = 2**32 - 1):
        self._space = space  # ids are 1..space; 0 is every packet's conj_id
        self._by_key: dict[ConjunctionKey, int] = {}
        self._key_of: dict[int, ConjunctionKey] = {}

    def id_for(self, key: ConjunctionKey) -> int:
        known = self._by_key.get(key)
        if known is not None:
            return known
        if len(self._key_of) >= self._space:
            raise RuntimeError("conjunction ids exhausted")
        digest = hashlib.sha256(repr(key).encode()).digest()
        candidate = int.from_bytes(digest[:8], "big") % self._space + 1
        while candidate in self._key_of:
            candidate = candidate % self._space + 1
        self._by_key[key] = candidate
        self._key_of[candidate] = key
        return candidate

    def release(self, keys: Iterable[ConjunctionKey]) -> None:
        """Forget these keys (those not held are no matter), freeing their ids."""
        for key in keys:
            held = self._by_key.pop(key, None)
            if held is not None:
                del self._key_of[held]

    def retain(self, keys: Iterable[ConjunctionKey]) -> None:
        """Forget every key not in C{keys}, freeing its id."""
        kept = set(keys)
        for key in [k for k in self._by_key if k not in kept]:
            del self._key_of[self._by_key.pop(key)]


# -- the node's view ----------------------------------------------------------------

class NodeStateLike(Protocol):
    index: NodeIndex
    policies: Mapping[str, CompiledPolicy]
    groups: Mapping[str, Group]


@functools.lru_cache(maxsize=1 << 18)
def _normal(address: str) -> str:
    """One spelling per address (IPv6 has many), so that equal addresses match equal."""
    # Cached: every rebuild normalises every member of every group the node uses.
    return str(ipaddress.ip_address(address))


Addressed = tuple[tuple[str, tuple[NamedPort, ...]], ...]  # (address, its pod's named ports)


@dataclass(frozen=True)
class _NodeView:
    """What the generator reads, each group's addresses normalised once."""

    node: str
    policies: tuple[CompiledPolicy, ...]  # sorted by id
    members: Mapping[str, Addressed]  # group id -> every member
    local_members: Mapping[str, Addressed]  # group id -> the members that are pods here
    known: Mapping[str, tuple[NamedPort, ...]]  # every pod address the node knows of
    # (peer groups, cidrs) -> their _Peers: rules that share peers share the work
    _peers: dict = field(default_factory=dict, compare=False)

    def peers(self, rule: Rule) -> "_Peers":
        found = self._peers.get((rule.peer_groups, rule.cidrs))
        if found is None:
            found = _Peers.of([(a for a, _ in self.members[g]) for g in rule.peer_groups],
                               rule.cidrs)
            self._peers[(rule.peer_groups, rule.cidrs)] = found
        return found

    @classmethod
    def of(cls, state: NodeStateLike) -> "_NodeView":
        node = state.index.node
        local_pods = {pod.key for pod in state.index.pods}
        members: dict[str, Addressed] = {}
        local_members: dict[str, Addressed] = {}
        known: dict[str, tuple[NamedPort, ...]] = {}
        for key in state.index.groups:
            group = state.groups.get(key)
            if group is None:
                raise KeyError(f"node {node}: group {key} missing from the state")
            addressed = sorted({(_normal(m.ip), m.named_ports, m.pod in local_pods)
                                for m in group.members}, key=lambda m: (m[0], repr(m[1:])))
            members[group.id] = tuple((a, ports) for a, ports, _ in addressed)
            local_members[group.id] = tuple((a, ports) for a, ports, here in addressed if here)
            known.update(members[group.id])
        for pod in state.index.pods:
            for ip in pod.ips:
                known[_normal(ip)] = pod.named_ports
        policies = []
        for policy_id in state.index.policies:
            policy = state.policies.get(policy_id)
            if policy is None:
                raise KeyError(f"node {node}: policy {policy_id} missing from the state")
            for group_id in policy.group_ids():
                if group_id not in members:
                    raise KeyError(f"node {node}: policy {policy_id} references group "
                                   f"{group_id}, which the node's index does not name")
            policies.append(policy)
        return cls(node, tuple(sorted(policies, key=lambda p: p.id)), members, local_members,
                   known)


# -- rules as conjunctions ------------------------------------------------------------

# A port match: (protocol, value, mask); value None means every port.
PortMatch = tuple[str, Optional[int], int]


class _Peers:
    """
    A conjunction's peers: networks, and the clause flows that match them,
    memoised per table and families. A peer group is typically shared by many
    rules (and a thousand members is common), so the incremental pipeline
    keeps one of these per group version and every rule over it reuses the
    same set of flow identities instead of building its own.
    """

    __slots__ = ("networks", "versions", "_identities")

    def __init__(self, networks: tuple[Network, ...]):
        self.networks = networks
        self.versions = frozenset(n.version for n in networks)
        self._identities: dict[tuple, frozenset] = {}

    @classmethod
    def of(cls, groups: Iterable[Iterable[str]], cidrs: Iterable[str]) -> "_Peers":
        """A rule's peers: its peer groups' (normalised) addresses, then its networks."""
        addresses = sorted(set().union(*groups))
        return cls(tuple(_host(a) for a in addresses)
                   + tuple(ipaddress.ip_network(c) for c in cidrs))

    def identities(self, table: int, side: str, families: frozenset) -> frozenset:
        """The identities of the clause flows matching these peers, in these families."""
        key = (table, side, families)
        found = self._identities.get(key)
        if found is None:
            found = frozenset((table, PRIORITY_CONJUNCTION, _address_match_items(p, side))
                              for p in self.networks if p.version in families)
            self._identities[key] = found
        return found


@dataclass(frozen=True)
class _Conjunctive:
    """
    One conjunction to install: the local addresses it applies to, the peers
    (None: any address) and the ports (None: every port and protocol).
    """

    key: ConjunctionKey
    table: int
    targets: tuple[str, ...]
    peers: Optional[_Peers]
    ports: Optional[tuple[PortMatch, ...]]


@functools.lru_cache(maxsize=65536)
def _host(address: str) -> Network:
    # The same peers recur in rule after rule; parsing dominated large states.
    return ipaddress.ip_network(address)


def _port_matches(ports: Iterable[PortRule]) -> tuple[PortMatch, ...]:
    matches: list[PortMatch] = []
    for rule in ports:
        if rule.port is None:
            matches.append((rule.protocol, None, 0))
        elif rule.end_port is None:
            matches.append((rule.protocol, rule.port, 0xFFFF))
        else:
            matches.extend((rule.protocol, value, mask)
                           for value, mask in port_range_masks(rule.port, rule.end_port))
    return tuple(sorted(set(matches), key=lambda m: (m[0], m[1] or 0, m[2])))


def _resolved(named_ports: Iterable[NamedPort], rule: PortRule) -> Optional[int]:
    for named in named_ports:
        if named.name == rule.name and named.protocol == rule.protocol:
            return named.port
    return None


def _rule_conjunctions(view: _NodeView, policy: CompiledPolicy, direction: str, index: int,
                       rule: Rule) -> list[_Conjunctive]:
    """
    The conjunctions of one rule. A named port is resolved per destination
    pod: for ingress over the local targets, for egress over the peers; each
    distinct (protocol, number) it resolves to gets its own conjunction, over
    only the pods that resolve it so, so that the name never matches a pod
    that does not define it.
    """
    ingress = direction == INGRESS
    table = INGRESS_RULES if ingress else EGRESS_RULES
    targets_with_ports = view.local_members[policy.applied_to]
    targets = tuple(address for address, _ in targets_with_ports)
    if not targets:
        return []
    cidrs = tuple(ipaddress.ip_network(c) for c in rule.cidrs)
    peers = None if rule.any_peer else view.peers(rule)
    key = (policy.id, direction, index)

    numbered = [p for p in rule.ports if p.name is None]
    named = [p for p in rule.ports if p.name is not None]
    conjunctions = []
    if not rule.ports:
        conjunctions.append(_Conjunctive(key + ("all",), table, targets, peers, None))
    if numbered:
        conjunctions.append(_Conjunctive(key + ("ports",), table, targets, peers,
                                         _port_matches(numbered)))
    if not named:
        return conjunctions

    # (protocol, number) -> the addresses (targets for ingress, peers for egress) it is on
    resolved: dict[tuple[str, int], set[str]] = defaultdict(set)
    if ingress:
        candidates = targets_with_ports
    else:
        candidates = _named_port_destinations(view, rule, cidrs)
    for address, named_ports in candidates:
        for port_rule in named:
            number = _resolved(named_ports, port_rule)
            if number is not None:
                resolved[(port_rule.protocol, number)].add(address)
    for (protocol, number), addresses in sorted(resolved.items()):
        ports = ((protocol, number, 0xFFFF),)
        on = tuple(sorted(addresses))
        variant = key + ("named", protocol, number)
        if ingress:
            conjunctions.append(_Conjunctive(variant, table, on, peers, ports))
        else:
            conjunctions.append(_Conjunctive(variant, table, targets,
                                             _Peers(tuple(_host(a) for a in on)), ports))
    return conjunctions


def _named_port_destinations(view: _NodeView, rule: Rule,
                             cidrs: tuple[Network, ...]) -> Addressed:
    """
    The destinations an egress named port can resolve on: the peer groups'
    members, and the pods this node knows of that the rule's CIDRs (or any
    peer) admit. A pod the node knows nothing of cannot be resolved here.
    """
    chosen: dict[str, tuple[NamedPort, ...]] = {}
    for group_id in rule.peer_groups:
        chosen.update(view.members[group_id])
    if rule.any_peer or cidrs:
        for address, named_ports in view.known.items():
            if rule.any_peer or any(ipaddress.ip_address(address) in network
                                    for network in cidrs):
                chosen[address] = named_ports
    return tuple(sorted(chosen.items()))


# -- matches ---------------------------------------------------------------------------

def _family(version: int) -> int:
    return ETH_IPV4 if version == 4 else ETH_IPV6


def _address_match(network: Network, side: str) -> dict[str, Any]:
    return dict(_address_match_items(network, side))


@functools.lru_cache(maxsize=65536)
def _address_match_items(network: Network, side: str) -> tuple[tuple[str, Any], ...]:
    """
    An address or network as OVS keeps it: a host as a plain address, /0 as
    no constraint at all, anything else as (network, netmask).
    """
    match: list[tuple[str, Any]] = [("eth_type", _family(network.version))]
    name = f"ipv{network.version}_{side}"
    if network.prefixlen == network.max_prefixlen:
        match.append((name, str(network.network_address)))
    elif network.prefixlen:
        match.append((name, (str(network.network_address), str(network.netmask))))
    return tuple(match)


def _port_match(port: PortMatch, eth_type: int) -> dict[str, Any]:
    protocol, value, mask = port
    match: dict[str, Any] = {"eth_type": eth_type, "ip_proto": IP_PROTO[protocol]}
    if value is not None and mask:
        match[f"{protocol.lower()}_dst"] = value if mask == 0xFFFF else (value, mask)
    return match


def _dimensions(conjunctive: _Conjunctive) -> list[list[dict[str, Any]]]:
    """
    The matches of each dimension, restricted to the address families both
    ends can have (a port match needs its family, so it exists once per family).
    """
    ingress = conjunctive.table == INGRESS_RULES
    own_side, peer_side = ("dst", "src") if ingress else ("src", "dst")
    targets = [_host(a) for a in conjunctive.targets]
    families = {t.version for t in targets}
    if conjunctive.peers is not None:
        families &= conjunctive.peers.versions
    if not families:
        return []
    dimensions = [[_address_match(t, own_side) for t in targets if t.version in families]]
    if conjunctive.peers is not None:
        dimensions.append([_address_match(p, peer_side) for p in conjunctive.peers.networks
                           if p.version in families])
    if conjunctive.ports is not None:
        dimensions.append([_port_match(port, _family(version))
                           for version in sorted(families) for port in conjunctive.ports])
    if any(not matches for matches in dimensions):
        return []
    return dimensions


# -- assembling ---------------------------------------------------------------------------

@dataclass
class _FlowSet:
    """
    Flows by identity. Two conjunction clauses with the same identity become
    one flow carrying both conjunction actions, as OpenFlow has only one flow
    per (table, priority, match).
    """

    cookie: int
    # identity -> its actions (a dict as an ordered set: a peer shared by
    # many rules collects many conjunction actions)
    _actions: dict[tuple, dict[Action, None]] = field(default_factory=dict)

    def add(self, table: int, priority: int, match: Mapping[str, Any],
            actions: tuple[Action, ...]) -> None:
        identity = (table, priority, tuple(sorted(match.items())))
        held = self._actions.get(identity)
        if held is None:
            self._actions[identity] = dict.fromkeys(actions)
            return
        if _is_clause(actions) and _is_clause(held):
            held.update(dict.fromkeys(actions))
        elif tuple(held) != actions:
            raise FlowRefused(f"two flows at {identity} with different actions: "
                              f"{tuple(held)} and {actions}")

    def flows(self) -> list[Flow]:
        built = []
        for (table, priority, match), held in self._actions.items():
            actions = tuple(held)
            if _is_clause(actions):
                actions = tuple(sorted(actions, key=lambda a: (a.id, a.clause)))
            built.append(Flow(table, priority, match, actions, self.cookie))
        # Insertion order is already deterministic (the generator walks sorted
        # policies and members); sorting by match text would cost more than
        # the rest of a rebuild.
        built.sort(key=lambda f: (f.table, -f.priority))
        return built


def _is_clause(actions: Iterable[Action]) -> bool:
    """
    Whether these are a clause flow's actions. A clause flow carries nothing
    but conjunctions, and the set only ever merges clause with clause, so
    the first action tells.
    """
    return isinstance(next(iter(actions), None), Conjunction)


def _next_table(conjunctive: _Conjunctive) -> int:
    return COMMIT if conjunctive.table == INGRESS_RULES else INGRESS_RULES


def _add_conjunctive(flows: _FlowSet, conjunctive: _Conjunctive,
                     dimensions: list[list[dict[str, Any]]], ids: ConjunctionIds) -> int:
    """Add one rule variant's flows; returns how many flows it contributed."""
    hit = (Goto(_next_table(conjunctive)),)
    if len(dimensions) == 1:
        for match in dimensions[0]:
            flows.add(conjunctive.table, PRIORITY_ALLOW, match, hit)
        return len(dimensions[0])
    conj_id = ids.id_for(conjunctive.key)
    count = len(dimensions)
    for clause, matches in enumerate(dimensions, start=1):
        for match in matches:
            flows.add(conjunctive.table, PRIORITY_CONJUNCTION, match,
                      (Conjunction(conj_id, clause, count),))
    flows.add(conjunctive.table, PRIORITY_CONJUNCTION, {"conj_id": conj_id}, hit)
    return sum(len(m) for m in dimensions) + 1


def _rules(policy: CompiledPolicy):
    """(direction, index within the direction, rule) for the directions the policy isolates."""
    for direction in (EGRESS, INGRESS):
        if direction not in policy.types:
            continue
        index = 0
        for rule in policy.rules:
            if rule.direction == direction:
                yield direction, index, rule
                index += 1


def _static_flows(flows: _FlowSet, zone: int, dns_intercept: bool,
                  dns_meter: Optional[int]) -> None:
    flows.add(CLASSIFIER, PRIORITY_STATIC, {"eth_type": ETH_ARP}, (Output(NORMAL),))
    for nd_type in ND_TYPES:
        flows.add(CLASSIFIER, PRIORITY_STATIC,
                  {"eth_type": ETH_IPV6, "ip_proto": IPPROTO_ICMPV6, "icmpv6_type": nd_type},
                  (Output(NORMAL),))
    for eth_type in (ETH_IPV4, ETH_IPV6):
        flows.add(CLASSIFIER, PRIORITY_IP, {"eth_type": eth_type},
                  (Ct(zone, table=CONNTRACK),))
        flows.add(COMMIT, PRIORITY_IP, {"eth_type": eth_type},
                  (Ct(zone, commit=True), Output(NORMAL)))

    flows.add(CONNTRACK, PRIORITY_STATIC_HIGH, {"ct_state": (CT_TRK | CT_INV, CT_TRK | CT_INV)},
              ())
    flows.add(CONNTRACK, PRIORITY_STATIC, {"ct_state": (CT_TRK | CT_EST, CT_TRK | CT_EST)},
              (Output(NORMAL),))
    # Below established so that the two never overlap at one priority.
    flows.add(CONNTRACK, PRIORITY_STATIC - 10,
              {"ct_state": (CT_TRK | CT_REL, CT_TRK | CT_REL)}, (Output(NORMAL),))
    flows.add(CONNTRACK, PRIORITY_IP, {"ct_state": (CT_TRK | CT_NEW, CT_TRK | CT_NEW)},
              (Goto(EGRESS_RULES),))
    if dns_intercept:
        # The whole packet, not a buffer id: the controller re-injects a miss
        # itself, and OVS's packet buffers are few.
        to_controller = (Output(CONTROLLER, max_len=OFPCML_NO_BUFFER),)
        if dns_meter is not None:
            to_controller = (Meter(dns_meter),) + to_controller
        for eth_type in (ETH_IPV4, ETH_IPV6):
            flows.add(DNS_INTERCEPT, PRIORITY_STATIC,
                      {"eth_type": eth_type, "ip_proto": IP_PROTO["UDP"], "udp_dst": DNS_PORT},
                      to_controller)


def _dns_steering(pods: Iterable[LocalPod]) -> list[dict[str, Any]]:
    """
    The conntrack-state matches that send a local pod's DNS queries to the
    intercept table: tracked and not invalid (new, established or related
    alike), and not already seen by the DNS code.
    """
    matches = []
    for address in _local_addresses(pods):
        match = _address_match(address, "src")
        match.update(ct_state=(CT_TRK, CT_TRK | CT_INV), ip_proto=IP_PROTO["UDP"],
                     udp_dst=DNS_PORT)
        match[DNS_SEEN_FIELD] = (0, DNS_SEEN)
        matches.append(match)
    return matches


def _local_addresses(pods: Iterable[LocalPod]) -> list[Network]:
    return sorted({_host(ip) for pod in pods for ip in pod.ips},
                  key=lambda n: (n.version, n))


def _isolated(view: _NodeView, direction: str) -> list[Network]:
    addresses = {address for policy in view.policies if direction in policy.types
                 for address, _ in view.local_members[policy.applied_to]}
    return sorted((_host(a) for a in addresses), key=lambda n: (n.version, n))


@dataclass(frozen=True)
class RuleFlowCount:
    """
    What one rule cost: C{targets} (N, local addresses), C{peers} (M, peer
    addresses and networks, 0 for any peer), C{ports} (P, masked port matches,
    counted once per address family the rule spans) summed over its
    conjunctions, and the flows it contributed before merging with other rules.
    """

    policy: str
    direction: str
    rule: int
    targets: int
    peers: int
    ports: int
    conjunctions: int
    flows: int

    @property
    def bound(self) -> int:
        """N + M + P + 1 per conjunction (a single-dimension rule needs no conj_id flow)."""
        return self.targets + self.peers + self.ports + self.conjunctions


def _build(state: NodeStateLike, zone: int, dns_intercept: bool, cookie: int,
           conjunction_ids: Optional[ConjunctionIds], dns_meter: Optional[int] = None):
    ids = conjunction_ids if conjunction_ids is not None else ConjunctionIds()
    view = _NodeView.of(state)
    flows = _FlowSet(cookie)
    tables = _tables(zone)
    _static_flows(flows, zone, dns_intercept, dns_meter)

    if dns_intercept:
        for match in _dns_steering(state.index.pods):
            flows.add(CONNTRACK, PRIORITY_DNS_STEER, match, (Goto(DNS_INTERCEPT),))

    counts = []
    keys = []
    for policy in view.policies:
        for direction, index, rule in _rules(policy):
            targets = peers = ports = conjunctions = contributed = 0
            for conjunctive in _rule_conjunctions(view, policy, direction, index, rule):
                dimensions = _dimensions(conjunctive)
                if not dimensions:
                    continue
                keys.append(conjunctive.key)
                contributed += _add_conjunctive(flows, conjunctive, dimensions, ids)
                targets += len(dimensions[0])
                peers += len(dimensions[1]) if conjunctive.peers is not None else 0
                ports += len(dimensions[-1]) if conjunctive.ports is not None else 0
                conjunctions += len(dimensions) > 1
            counts.append(RuleFlowCount(policy.id, direction, index, targets, peers, ports,
                                        conjunctions, contributed))
    ids.retain(keys)

    for direction, table in ((EGRESS, EGRESS_DEFAULT), (INGRESS, INGRESS_DEFAULT)):
        side = "src" if direction == EGRESS else "dst"
        for address in _isolated(view, direction):
            flows.add(table, PRIORITY_ISOLATED, _address_match(address, side), ())

    for table in tables.values():
        if table.id == DNS_INTERCEPT and not dns_intercept:
            continue
        flows.add(table.id, PRIORITY_MISS, {}, table.miss)
    built = flows.flows()
    check_flows(built, tables)
    return built, counts


def pipeline_flows(state: NodeStateLike, *, zone: int = 1, dns_intercept: bool = False,
                   cookie: int = 0, conjunction_ids: Optional[ConjunctionIds] = None,
                   dns_meter: Optional[int] = None) -> list[Flow]:
    """
    Every flow of the pipeline for one node's state, sorted by table, then
    priority (highest first). Pass the same C{conjunction_ids} from one
    generation to the next so that unchanged rules keep their conjunction ids.
    C{dns_meter}: the meter that bounds DNS packet-ins (None: no meter; the
    controller then limits in software).
    """
    return _build(state, zone, dns_intercept, cookie, conjunction_ids, dns_meter)[0]


def flow_count_report(state: NodeStateLike) -> list[RuleFlowCount]:
    """Per rule of every policy on the node: N, M, P and the flows it produced."""
    return _build(state, 1, False, 0, None)[1]


# -- one clause at a time -------------------------------------------------------------

Identity = tuple  # (table, priority, match): what makes two flows the same flow
# What one piece of the pipeline contributes: the flows it wants, all with the same actions.
Part = tuple[frozenset, tuple[Action, ...]]


class _GroupVersion:
    """
    One version of a group, as the incremental pipeline reads it: the same
    version is used by many rules, so whatever they need of it is worked out
    once and kept for as long as the node's index names it.
    """

    __slots__ = ("group", "pods", "_addresses", "_local", "_members", "peers")

    def __init__(self, group: Group):
        self.group = group
        self.pods = frozenset(m.pod for m in group.members)
        self._addresses: Optional[frozenset[str]] = None
        # Both for the latest local pods, keyed by which of the group's pods
        # are here: only a pod landing on or leaving the node changes them.
        self._local: Optional[tuple[tuple[str, ...], Addressed]] = None
        self._members: Optional[tuple[tuple[str, ...], Addressed]] = None
        self.peers: dict[tuple, _Peers] = {}  # (other peer group keys, cidrs) -> _Peers

    @property
    def addresses(self) -> frozenset[str]:
        if self._addresses is None:
            self._addresses = frozenset(_normal(m.ip) for m in self.group.members)
        return self._addresses

    def _addressed(self, here: frozenset, only_here: bool) -> Addressed:
        # As _NodeView.of orders them (its sort key holds whether the pod is here).
        addressed = sorted({(_normal(m.ip), m.named_ports, m.pod in here)
                            for m in self.group.members if m.pod in here or not only_here},
                           key=lambda m: (m[0], repr(m[1:])))
        return tuple((a, ports) for a, ports, _ in addressed)

    def local_members(self, local_pods: frozenset) -> Addressed:
        # Intersecting the smaller set: the node's pods, not the group's thousand.
        local = tuple(sorted(self.pods & local_pods))
        if self._local is None or self._local[0] != local:
            self._local = (local, self._addressed(frozenset(local), True))
        return self._local[1]

    def members(self, local_pods: frozenset) -> Addressed:
        local = tuple(sorted(self.pods & local_pods))
        if self._members is None or self._members[0] != local:
            self._members = (local, self._addressed(frozenset(local), False))
        return self._members[1]


class _LazyView:
    """
    What _rule_conjunctions reads of a _NodeView, computed per group only when
    asked and kept per group version (in C{versions}, which the pipeline
    holds across updates): a change to one group costs that group, not the
    node's whole state.
    """

    def __init__(self, state: NodeStateLike, keys: Mapping[str, str],
                 local_pods: frozenset, versions: dict[str, _GroupVersion]):
        self._state = state
        self._keys = keys  # group id -> key
        self.local_pods = local_pods
        self._versions = versions
        self.members = _Lookup(lambda g: self._version(g).members(local_pods))
        self.local_members = _Lookup(lambda g: self._version(g).local_members(local_pods))
        self._known: Optional[dict] = None

    @property
    def index(self) -> NodeIndex:
        return self._state.index

    def _version(self, group_id: str) -> _GroupVersion:
        key = self._keys.get(group_id)
        if key is None:
            raise KeyError(f"node {self._state.index.node}: group {group_id} is not in its "
                           f"index")
        version = self._versions.get(key)
        if version is None:
            group = self._state.groups.get(key)
            if group is None:
                raise KeyError(f"node {self._state.index.node}: group {key} missing from "
                               f"the state")
            version = self._versions[key] = _GroupVersion(group)
        return version

    def key(self, group_id: str) -> str:
        return self._keys[group_id]

    def peers(self, rule: Rule) -> _Peers:
        versions = [self._version(g) for g in rule.peer_groups]
        if not versions:
            return _Peers.of((), rule.cidrs)
        # Kept on the first peer group's version: it goes when that version does.
        key = (tuple(self._keys[g] for g in rule.peer_groups[1:]), rule.cidrs)
        found = versions[0].peers.get(key)
        if found is None:
            found = versions[0].peers[key] = _Peers.of([v.addresses for v in versions],
                                                       rule.cidrs)
        return found

    @property
    def known(self) -> Mapping[str, tuple[NamedPort, ...]]:
        if self._known is None:
            known: dict[str, tuple[NamedPort, ...]] = {}
            for group_id in sorted(self._keys):
                known.update(self.members[group_id])
            for pod in self._state.index.pods:
                for ip in pod.ips:
                    known[_normal(ip)] = pod.named_ports
            self._known = known
        return self._known


class _Lookup:
    """view.members[group id], as _NodeView spells it, answered by a function."""

    def __init__(self, find):
        self._find = find

    def __getitem__(self, group_id: str) -> Addressed:
        return self._find(group_id)


def _needs_known(rule: Rule) -> bool:
    """Whether a rule's flows depend on every pod the node knows (egress named ports)."""
    return (rule.direction == EGRESS and (rule.any_peer or bool(rule.cidrs))
            and any(p.name is not None for p in rule.ports))


def _conjunctive_parts(conjunctive: _Conjunctive, ids: ConjunctionIds
                       ) -> dict[tuple, Part]:
    """
    What _dimensions and _add_conjunctive make of one conjunction, as one part
    per clause (and one for the conj_id flow), so that a change of peers
    changes only the peer clause. Each part's identities are a set: the
    unchanged part of a clause is found with a set difference.
    """
    table, key = conjunctive.table, conjunctive.key
    own_side, peer_side = ("dst", "src") if table == INGRESS_RULES else ("src", "dst")
    targets = [_host(a) for a in conjunctive.targets]
    families = {t.version for t in targets}
    if conjunctive.peers is not None:
        families &= conjunctive.peers.versions
    if not families:
        return {}
    single = conjunctive.peers is None and conjunctive.ports is None
    priority = PRIORITY_ALLOW if single else PRIORITY_CONJUNCTION
    dimensions = [frozenset((table, priority, _address_match_items(t, own_side))
                            for t in targets if t.version in families)]
    if conjunctive.peers is not None:
        dimensions.append(conjunctive.peers.identities(table, peer_side, frozenset(families)))
    if conjunctive.ports is not None:
        dimensions.append(frozenset(
            (table, priority, tuple(sorted(_port_match(port, _family(version)).items())))
            for version in sorted(families) for port in conjunctive.ports))
    if any(not identities for identities in dimensions):
        return {}
    hit = (Goto(_next_table(conjunctive)),)
    if single:
        return {key + ("hit",): (dimensions[0], hit)}
    conj_id = ids.id_for(key)
    parts = {key + (clause,): (identities, (Conjunction(conj_id, clause, len(dimensions)),))
             for clause, identities in enumerate(dimensions, start=1)}
    parts[key + ("hit",)] = (frozenset({(table, PRIORITY_CONJUNCTION,
                                         (("conj_id", conj_id),))}), hit)
    return parts


def _rule_parts(view: _LazyView, policy: CompiledPolicy, direction: str, index: int,
                rule: Rule, ids: ConjunctionIds) -> dict[tuple, Part]:
    parts: dict[tuple, Part] = {}
    for conjunctive in _rule_conjunctions(view, policy, direction, index, rule):
        parts.update(_conjunctive_parts(conjunctive, ids))
    return parts


def _isolation_parts(policy: CompiledPolicy, local_members: Addressed) -> dict[tuple, Part]:
    """The policy's share of the default tables: its local pods are isolated (dropped)."""
    parts = {}
    for direction, table, side in ((EGRESS, EGRESS_DEFAULT, "src"),
                                   (INGRESS, INGRESS_DEFAULT, "dst")):
        if direction in policy.types and local_members:
            parts[(policy.id, direction, "isolated")] = (frozenset(
                (table, PRIORITY_ISOLATED, _address_match_items(_host(address), side))
                for address, _ in local_members), ())
    return parts


def _dns_parts(pods: tuple[LocalPod, ...]) -> dict[tuple, Part]:
    """Every local pod's DNS queries are steered to the intercept table."""
    identities = frozenset((CONNTRACK, PRIORITY_DNS_STEER, tuple(sorted(match.items())))
                           for match in _dns_steering(pods))
    return {("dns",): (identities, (Goto(DNS_INTERCEPT),))} if identities else {}


def _fixed_parts(zone: int, dns_intercept: bool, dns_meter: Optional[int],
                 tables: Mapping[int, Table]) -> dict[tuple, Part]:
    """The static stages and every table's miss: one part per flow, never changing."""
    flows = _FlowSet(0)
    _static_flows(flows, zone, dns_intercept, dns_meter)
    for table in tables.values():
        if table.id == DNS_INTERCEPT and not dns_intercept:
            continue
        flows.add(table.id, PRIORITY_MISS, {}, table.miss)
    return {("fixed", identity): (frozenset({identity}), tuple(actions))
            for identity, actions in flows._actions.items()}


class IncrementalPipeline:
    """
    L{pipeline_flows}, kept current one piece at a time. The pipeline is cut
    into parts: per conjunction, each clause (the local pods, the peers, the
    ports) and its conj_id flow; per policy, its isolation flows; the DNS
    intercept and the static flows. A part is a set of flow identities with
    the actions they all carry. Every rule (and policy) remembers the inputs
    its parts came from (its signature: the versions of its peer groups, its
    local pods); an update recomputes only those whose inputs changed, and
    for each recomputed part withdraws and contributes only the identities
    that differ -- a peer joining a group used by many rules costs one flow
    per rule, not the group's every member. Flows that several parts share
    are merged from what each contributes. C{update} returns the identities
    whose flow changed, so a datapath sends exactly those. Its result always
    equals C{pipeline_flows} of the same state with the same conjunction ids.
    """

    def __init__(self, *, zone: int = 1, dns_intercept: bool = False, cookie: int = 0,
                 conjunction_ids: Optional[ConjunctionIds] = None,
                 dns_meter: Optional[int] = None):
        self.zone = zone
        self.dns_intercept = dns_intercept
        self.dns_meter = dns_meter
        self.cookie = cookie
        self.ids = conjunction_ids if conjunction_ids is not None else ConjunctionIds()
        self.tables = _tables(zone)
        self.flows: dict[Identity, Flow] = {}
        # entry (a rule: (policy id, direction, index); a policy's isolation;
        # DNS; the static flows) -> (signature, {part key: part})
        self._entries: dict[tuple, tuple[Any, dict[tuple, Part]]] = {}
        self._entries_of: dict[str, list[tuple]] = {}  # policy id -> its entries
        # identity -> {part key: actions}, for every flow some part wants
        self._contributors: dict[Identity, dict[tuple, tuple[Action, ...]]] = {}
        self._versions: dict[str, _GroupVersion] = {}  # group key -> what rules read of it
        self._uses: dict[str, tuple[str, ...]] = {}  # policy id -> the groups it uses
        self._users: dict[str, set[str]] = {}  # group id -> the policies that use it
        self._knowing: set[str] = set()  # policies with a rule that reads every pod known
        self._index: Optional[NodeIndex] = None  # what the last update brought us to
        self._started = False

    def _to_refresh(self, index: NodeIndex, policies: Mapping[str, CompiledPolicy]
                    ) -> Iterable[str]:
        """
        The policies whose flows this index may change: new ones, and those
        using a group whose version changed; every one if the local pods
        changed (they decide which members are targets). Looking only at these
        keeps an event's cost independent of how many policies the node has.
        """
        previous = self._index
        if previous is None or previous.pods != index.pods:
            return policies
        changed = set(previous.groups).symmetric_difference(index.groups)
        if not changed:
            return [p for p in policies if p not in self._entries_of]
        chosen = {p for p in policies if p not in self._entries_of}
        for group_id in {key.rsplit(".", 1)[0] for key in changed}:
            chosen.update(self._users.get(group_id, ()))
        chosen.update(self._knowing)
        return [p for p in chosen if p in policies]

    def update(self, state: NodeStateLike) -> set[Identity]:
        keys = {key.rsplit(".", 1)[0]: key for key in state.index.groups}
        local_pods = frozenset(pod.key for pod in state.index.pods)
        view = _LazyView(state, keys, local_pods, self._versions)
        policies = {}
        for policy_id in state.index.policies:
            policy = state.policies.get(policy_id)
            if policy is None:
                raise KeyError(f"node {state.index.node}: policy {policy_id} missing from "
                               f"the state")
            policies[policy_id] = policy
        refresh = sorted(self._to_refresh(state.index, policies))
        for policy_id in refresh:
            for group_id in policies[policy_id].group_ids():
                if group_id not in keys:
                    raise KeyError(f"node {state.index.node}: policy {policy_id} references "
                                   f"group {group_id}, which the node's index does not name")

        touched: set[Identity] = set()
        released: list[tuple] = []
        if not self._started:
            self._set(("fixed",), None, _fixed_parts(self.zone, self.dns_intercept,
                                                     self.dns_meter, self.tables),
                      touched, released)
        if self.dns_intercept:
            self._refresh(("dns",), state.index.pods, lambda: _dns_parts(state.index.pods),
                          touched, released)
        for policy_id in [p for p in self._entries_of if p not in policies]:
            self._forget(policy_id, touched, released)
        for policy_id in refresh:
            self._refresh_policy(policies[policy_id], view, touched, released)
        if self._started:
            self.ids.release(released)
        else:
            # A fresh pipeline may share its ids with one that failed half way.
            self.ids.retain(part[:-1] for _, parts in self._entries.values()
                            for part in parts if part[-1] == "hit")
            self._started = True
        # Keep only the group versions the node's index names, so that the
        # cache follows the node's share instead of every version ever seen.
        if len(self._versions) > len(keys):
            current = set(state.index.groups)
            for key in [k for k in self._versions if k not in current]:
                del self._versions[key]

        for identity in touched:
            flow = self._merged(identity)
            if flow is None:
                self.flows.pop(identity, None)
            else:
                self.flows[identity] = flow
        self._index = state.index
        return touched

    def _forget(self, policy_id: str, touched: set, released: list) -> None:
        for entry in self._entries_of.pop(policy_id):
            self._set(entry, None, {}, touched, released)
        for group_id in self._uses.pop(policy_id):
            users = self._users[group_id]
            users.discard(policy_id)
            if not users:
                del self._users[group_id]
        self._knowing.discard(policy_id)

    def _refresh_policy(self, policy: CompiledPolicy, view: _LazyView,
                        touched: set, released: list) -> None:
        # Only the applied-to group's local members matter (its other members
        # are not this node's business), so a pod landing elsewhere in it
        # recomputes nothing.
        local_members = view.local_members[policy.applied_to]
        groups = view.index.groups
        entries = self._entries_of.get(policy.id)
        if entries is None:
            entries = self._entries_of[policy.id] = [(policy.id, "isolated")]
            entries.extend((policy.id, direction, index) for direction, index, _ in
                           _rules(policy))
            self._uses[policy.id] = policy.group_ids()
            for group_id in self._uses[policy.id]:
                self._users.setdefault(group_id, set()).add(policy.id)
            if any(_needs_known(rule) for _, _, rule in _rules(policy)):
                self._knowing.add(policy.id)
        self._refresh(entries[0], local_members,
                      lambda: _isolation_parts(policy, local_members), touched, released)
        for entry, (direction, index, rule) in zip(entries[1:], _rules(policy)):
            # A rule reads its local members, its peer groups (their named
            # ports too) and, for an egress named port over any address,
            # every pod the node knows of.
            signature = (local_members, tuple(view.key(g) for g in rule.peer_groups),
                         tuple(view.key(g) for g in rule.port_groups),
                         (groups, view.local_pods) if _needs_known(rule) else None)
            self._refresh(entry, signature,
                          functools.partial(_rule_parts, view, policy, direction, index,
                                            rule, self.ids), touched, released)

    def _refresh(self, entry: tuple, signature: Any, parts, touched: set,
                 released: list) -> None:
        """Recompute an entry's parts, with C{parts()}, if its signature changed."""
        held = self._entries.get(entry)
        if held is None or held[0] != signature:
            self._set(entry, signature, parts(), touched, released)

    def _set(self, entry: tuple, signature: Any, parts: dict[tuple, Part],
             touched: set, released: list) -> None:
        """
        Replace an entry's parts, withdrawing and contributing only the
        identities that differ. Parts are keyed by what they are (a clause of
        a conjunction, say), so a part that is still there is diffed with its
        old self.
        """
        old = self._entries.pop(entry, (None, {}))[1]
        if parts or signature is not None:
            self._entries[entry] = (signature, parts)
        contributors = self._contributors
        for part_key, (identities, actions) in old.items():
            new = parts.get(part_key)
            if new is not None and new[1] == actions:
                if new[0] is identities:
                    continue
                gone = identities - new[0]
            else:
                gone = identities
                if new is None and part_key[-1] == "hit":
                    released.append(part_key[:-1])  # the conjunction is gone
            for identity in gone:
                held = contributors[identity]
                del held[part_key]
                if not held:
                    del contributors[identity]
            touched |= gone
        for part_key, (identities, actions) in parts.items():
            previous = old.get(part_key)
            if previous is not None and previous[1] == actions:
                if previous[0] is identities:
                    continue
                new = identities - previous[0]
            else:
                new = identities
            for identity in new:
                contributors.setdefault(identity, {})[part_key] = actions
            touched |= new

    def _merged(self, identity: Identity) -> Optional[Flow]:
        held = self._contributors.get(identity)
        if not held:
            return None
        table, priority, match = identity
        parts = list(held.values())
        if _is_clause(parts[0]):
            merged: dict[Action, None] = {}
            for actions in parts:
                if not _is_clause(actions):
                    raise FlowRefused(f"two flows at {identity} with different actions")
                merged.update(dict.fromkeys(actions))
            actions = tuple(sorted(merged, key=lambda a: (a.id, a.clause)))
        else:
            actions = parts[0]
            if any(other != actions for other in parts[1:]):
                raise FlowRefused(f"two flows at {identity} with different actions: {parts}")
        flow = Flow(table, priority, match, actions, self.cookie)
        self.tables[table].check(flow)
        return flow
