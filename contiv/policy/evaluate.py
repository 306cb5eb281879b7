"""
Judging one new connection from the compiled output alone (policies, group
members, pods by address): what the datapath is meant to enforce, stated
plainly. Tests compare it with an independent model of Kubernetes semantics,
and C{explain} prints its verdicts.

Replies of an allowed connection are not judged here: conntrack lets them
through.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

from contiv.policy.model import Pod
from contiv.policy.types import EGRESS, INGRESS, CompiledPolicy, Group, PortRule, Rule

if TYPE_CHECKING:
    from contiv.policy.engine import PolicyEngine

NOT_A_POD = "not a pod"
NOT_ISOLATED = "not isolated"
ALLOWED = "allowed"
DENIED = "denied"


@dataclass(frozen=True)
class Side:
    """
    One side's decision, structured: C{outcome} is C{"not a pod"},
    C{"not isolated"}, C{"allowed"} or C{"denied"}; C{policy} and C{rule}
    name the deciding rule of an allow (C{rule} indexes that direction's
    rules, i.e. C{spec.egress[i]} or C{spec.ingress[i]}); C{isolating} lists
    the ids of the policies that isolate the pod in that direction.
    """

    outcome: str
    policy: Optional[str] = None
    rule: Optional[int] = None
    isolating: tuple[str, ...] = ()

    @property
    def allows(self) -> bool:
        return self.outcome != DENIED

    def __str__(self) -> str:
        if self.outcome == ALLOWED:
            return f"allowed by {self.policy} rule {self.rule}"
        if self.outcome == DENIED:
            return "denied: isolated by " + ", ".join(self.isolating)
        return self.outcome


@dataclass(frozen=True)
class Verdict:
    """
    C{egress} is the source's side, C{ingress} the destination's; each reads
    C{"not a pod"}, C{"not isolated"}, C{"allowed by <policy id> rule <i>"}
    (the i-th rule of that direction, i.e. C{spec.egress[i]} or
    C{spec.ingress[i]}) or C{"denied: isolated by <policy ids>"}.
    C{egress_side} and C{ingress_side} say the same as L{Side}s.
    """

    allowed: bool
    egress: str
    ingress: str
    egress_side: Optional[Side] = field(default=None, compare=False)
    ingress_side: Optional[Side] = field(default=None, compare=False)


class Evaluator:
    def __init__(self, policies: Iterable[CompiledPolicy], groups: Mapping[str, Group],
                 pods_by_ip: Mapping[str, Pod]):
        self._pods_by_ip = {_normalise(ip): pod for ip, pod in pods_by_ip.items()}
        self._group_ips: dict[str, frozenset[str]] = {
            group_id: frozenset(_normalise(m.ip) for m in group.members)
            for group_id, group in groups.items()}
        # address -> the policies isolating it, per direction, sorted by id
        self._isolating: dict[str, dict[str, list[CompiledPolicy]]] = {INGRESS: {}, EGRESS: {}}
        # (policy id, direction) -> that direction's rules, with parsed networks
        self._rules: dict[tuple[str, str], list[tuple[Rule, list]]] = {}
        for policy in sorted(policies, key=lambda p: p.id):
            for direction in policy.types:
                for ip in self._group_ips.get(policy.applied_to, ()):
                    self._isolating[direction].setdefault(ip, []).append(policy)
                self._rules[(policy.id, direction)] = [
                    (rule, [ipaddress.ip_network(c) for c in rule.cidrs])
                    for rule in policy.rules if rule.direction == direction]

    @classmethod
    def from_engine(cls, engine: "PolicyEngine") -> "Evaluator":
        return cls(engine.policies.values(), engine.groups, engine.pods_by_ip())

    def allowed(self, src_ip: str, dst_ip: str, protocol: str, port: int) -> bool:
        return self.verdict(src_ip, dst_ip, protocol, port).allowed

    def verdict(self, src_ip: str, dst_ip: str, protocol: str, port: int) -> Verdict:
        src = _normalise(src_ip)
        dst = _normalise(dst_ip)
        protocol = protocol.upper()
        # A named port is the destination pod's, whichever side's rule names it.
        dst_pod = self._pods_by_ip.get(dst)
        egress = self._side(EGRESS, src, dst, protocol, port, dst_pod)
        ingress = self._side(INGRESS, dst, src, protocol, port, dst_pod)
        return Verdict(egress.allows and ingress.allows, str(egress), str(ingress),
                       egress, ingress)

    def _side(self, direction: str, own_ip: str, peer_ip: str, protocol: str, port: int,
              dst_pod: Optional[Pod]) -> Side:
        if own_ip not in self._pods_by_ip:
            return Side(NOT_A_POD)
        isolating = self._isolating[direction].get(own_ip)
        if not isolating:
            return Side(NOT_ISOLATED)
        ids = tuple(p.id for p in isolating)
        peer_address = ipaddress.ip_address(peer_ip)
        for policy in isolating:
            for index, (rule, networks) in enumerate(self._rules[(policy.id, direction)]):
                if (self._peer_matches(rule, networks, peer_ip, peer_address)
                        and ports_match(rule.ports, protocol, port, dst_pod)):
                    return Side(ALLOWED, policy.id, index, ids)
        return Side(DENIED, isolating=ids)

    def _peer_matches(self, rule: Rule, networks: list, peer_ip: str, peer_address) -> bool:
        if rule.any_peer:
            return True
        if any(peer_ip in self._group_ips.get(g, ()) for g in rule.peer_groups):
            return True
        return any(peer_address in network for network in networks)


def ports_match(ports: tuple[PortRule, ...], protocol: str, port: int,
                dst_pod: Optional[Pod]) -> bool:
    """No ports: everything. A named port matches only a destination pod that declares it."""
    if not ports:
        return True
    return any(port_matches(rule, protocol, port, dst_pod) for rule in ports)


def port_matches(rule: PortRule, protocol: str, port: int, dst_pod: Optional[Pod]) -> bool:
    if rule.protocol != protocol:
        return False
    if rule.name is not None:
        if dst_pod is None:
            return False
        return any(p.name == rule.name and p.protocol == protocol and p.port == port
                   for p in dst_pod.named_ports)
    if rule.port is None:
        return True
    return rule.port <= port <= (rule.end_port or rule.port)


def _normalise(ip: str) -> str:
    return str(ipaddress.ip_address(ip))
