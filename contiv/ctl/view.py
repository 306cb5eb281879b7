"""
What contivctl knows about the cluster, and the pure questions it answers
over it: which pod a name or address means, which policies select a pod,
what a group stands for, what the compiled rules decide for one connection.

Nothing here reads the store or talks to OVS (L{contiv.ctl.sources} and
L{contiv.ctl.ovs} do): a L{ClusterView} is plain data, so every answer can
be tested from a view built by hand.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Optional

from contiv.policy.evaluate import ALLOWED, DENIED, Evaluator, Side
from contiv.policy.model import Pod
from contiv.policy.types import (
    EGRESS,
    INGRESS,
    PROTOCOLS,
    CompiledPolicy,
    Group,
    GroupSelector,
    LabelSelector,
    NamedPort,
    PortRule,
    Rule,
)

DIRECTIONS = (INGRESS, EGRESS)


class CtlError(Exception):
    """A problem to report on stderr, naming the object; exit status 1."""


@dataclass(frozen=True)
class PodInfo:
    """A pod as the store knows it: from the index of the node it runs on."""

    key: str  # namespace/name
    node: str
    ips: tuple[str, ...]
    named_ports: tuple[NamedPort, ...] = ()

    @property
    def namespace(self) -> str:
        return self.key.partition("/")[0]

    @property
    def name(self) -> str:
        return self.key.partition("/")[2]


@dataclass(frozen=True)
class ClusterView:
    """
    One generation of the compiled cluster: the policies that select some
    pod, the current version of every group (by group id), every pod a
    node's index lists, and, when known (compiled in process), what selector
    each group id stands for. C{problems}: parts that could not be read
    (named by key); C{errors}: objects the engine rejected.
    """

    where: str  # "the store" or "the manifests in DIR": for messages
    generation: Optional[int]
    policies: Mapping[str, CompiledPolicy]
    groups: Mapping[str, Group]
    pods: Mapping[str, PodInfo]
    nodes: tuple[str, ...] = ()
    selectors: Mapping[str, GroupSelector] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @cached_property
    def pods_by_ip(self) -> dict[str, PodInfo]:
        found: dict[str, PodInfo] = {}
        for key in sorted(self.pods):
            for ip in self.pods[key].ips:
                found.setdefault(_normalise(ip), self.pods[key])
        return found

    @cached_property
    def evaluator(self) -> Evaluator:
        pods = {ip: Pod(info.namespace, info.name, {}, info.node, info.ips, "Running", False,
                        info.named_ports)
                for ip, info in self.pods_by_ip.items()}
        return Evaluator(self.policies.values(), self.groups, pods)

    def group_ips(self, group_id: str) -> frozenset[str]:
        group = self.groups.get(group_id)
        return frozenset(_normalise(m.ip) for m in group.members) if group else frozenset()


# -- naming things ---------------------------------------------------------------

def parse_pod_ref(text: str) -> tuple[str, str]:
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise CtlError(f"pod {text!r}: expected <namespace>/<pod>")
    return namespace, name


def find_pod(view: ClusterView, text: str) -> PodInfo:
    namespace, name = parse_pod_ref(text)
    pod = view.pods.get(f"{namespace}/{name}")
    if pod is not None:
        return pod
    known = sorted(p.name for p in view.pods.values() if p.namespace == namespace)
    if known:
        hint = f"known pods in {namespace}: {', '.join(known[:20])}" + \
            (f" and {len(known) - 20} more" if len(known) > 20 else "")
    else:
        spaces = sorted({p.namespace for p in view.pods.values()})
        hint = f"no pods known in namespace {namespace}; namespaces with pods: " + \
            (", ".join(spaces) if spaces else "none")
    raise CtlError(f"pod {namespace}/{name}: not found in {view.where} ({hint})")


@dataclass(frozen=True)
class Endpoint:
    """One end of a probe: an address, and the pod it belongs to if any."""

    ip: str
    pod: Optional[PodInfo]

    @property
    def label(self) -> str:
        return f"{self.pod.key} ({self.ip})" if self.pod else self.ip

    def to_json(self) -> dict:
        return {"ip": self.ip, "pod": self.pod.key if self.pod else None,
                "node": self.pod.node if self.pod else None}


def resolve_endpoint(view: ClusterView, text: str) -> Endpoint:
    """C{<namespace>/<pod>} (its primary address) or an IP address."""
    try:
        ip = _normalise(text)
    except ValueError:
        pod = find_pod(view, text)
        if not pod.ips:
            raise CtlError(f"pod {pod.key}: has no IP address in {view.where}") from None
        return Endpoint(_normalise(pod.ips[0]), pod)
    return Endpoint(ip, view.pods_by_ip.get(ip))


def parse_port(text: str, destination: Optional[PodInfo] = None) -> tuple[int, str]:
    """C{80/tcp}, C{53/UDP}, C{80} (TCP) or C{http/tcp} (a named port of the destination pod)."""
    value, _, protocol = text.partition("/")
    protocol = (protocol or "TCP").upper()
    if protocol not in PROTOCOLS:
        raise CtlError(f"port {text!r}: protocol must be one of {', '.join(PROTOCOLS)}, "
                       f"got {protocol!r}")
    if value.isdigit():
        port = int(value)
        if not 1 <= port <= 65535:
            raise CtlError(f"port {text!r}: {port} is out of range 1-65535")
        return port, protocol
    if destination is None:
        raise CtlError(f"port {text!r}: not a number, and the destination is not a pod "
                       f"whose named ports could resolve it")
    for named in destination.named_ports:
        if named.name == value and named.protocol == protocol:
            return named.port, protocol
    declared = ", ".join(f"{p.name}={p.port}/{p.protocol}" for p in destination.named_ports)
    raise CtlError(f"port {text!r}: pod {destination.key} declares no {protocol} port named "
                   f"{value!r} (it declares: {declared or 'none'})")


# -- describing --------------------------------------------------------------------

def selector_text(selector: Optional[LabelSelector]) -> str:
    if selector is None or selector == LabelSelector():
        return "(any labels)"
    parts = [f"{k}={v}" for k, v in selector.match_labels]
    for r in selector.match_expressions:
        if r.operator == "In":
            parts.append(f"{r.key} in ({','.join(r.values)})")
        elif r.operator == "NotIn":
            parts.append(f"{r.key} notin ({','.join(r.values)})")
        elif r.operator == "Exists":
            parts.append(r.key)
        else:
            parts.append(f"!{r.key}")
    return ",".join(parts)


def group_selector_text(selector: GroupSelector) -> str:
    if selector.namespace is not None:
        where = f"in namespace {selector.namespace}"
    else:
        where = f"in namespaces with {selector_text(selector.namespace_selector)}"
    if selector.pod_selector is None or selector.pod_selector == LabelSelector():
        return f"every pod {where}"
    return f"pods {where} with {selector_text(selector.pod_selector)}"


def policy_label(policy: CompiledPolicy) -> str:
    return f"{policy.namespace}/{policy.name}"


def group_uses(view: ClusterView) -> dict[str, list[str]]:
    """Group id -> what refers to it: applied-to, peers or named-port lookups of rules."""
    uses: dict[str, list[str]] = {}
    for policy in sorted(view.policies.values(), key=lambda p: (policy_label(p), p.id)):
        uses.setdefault(policy.applied_to, []).append(f"applied-to of {policy_label(policy)}")
        for direction, index, rule in rules_of(policy):
            for group_id in rule.peer_groups:
                uses.setdefault(group_id, []).append(
                    f"{_peer_word(direction)} of {policy_label(policy)} "
                    f"{direction.lower()} rule {index}")
            for group_id in rule.port_groups:
                uses.setdefault(group_id, []).append(
                    f"named-port lookup of {policy_label(policy)} "
                    f"{direction.lower()} rule {index}")
    return uses


def _peer_word(direction: str) -> str:
    return "sources" if direction == INGRESS else "destinations"


def rules_of(policy: CompiledPolicy) -> list[tuple[str, int, Rule]]:
    """(direction, index within that direction, rule), index as in spec.<direction>[i]."""
    counters = {INGRESS: 0, EGRESS: 0}
    result = []
    for rule in policy.rules:
        result.append((rule.direction, counters[rule.direction], rule))
        counters[rule.direction] += 1
    return result


def port_text(port: PortRule) -> str:
    if port.name is not None:
        return f"{port.protocol}/{port.name}"
    if port.port is None:
        return f"{port.protocol}/any"
    if port.end_port is not None and port.end_port != port.port:
        return f"{port.protocol}/{port.port}-{port.end_port}"
    return f"{port.protocol}/{port.port}"


def group_json(view: ClusterView, group_id: str, uses: Optional[list[str]] = None) -> dict:
    group = view.groups.get(group_id)
    selector = view.selectors.get(group_id)
    members = group.members if group is not None else ()
    return {
        "id": group_id,
        "selector": group_selector_text(selector) if selector is not None else None,
        "stands_for": uses or [],
        "count": len(members),
        "members": [{"ip": m.ip, "pod": m.pod,
                     "named_ports": [f"{p.name}={p.port}/{p.protocol}" for p in m.named_ports]}
                    for m in members],
        "published": group is not None,
    }


def rule_json(view: ClusterView, index: int, rule: Rule) -> dict:
    peers: list[dict] = []
    for group_id in rule.peer_groups:
        group = view.groups.get(group_id)
        selector = view.selectors.get(group_id)
        peers.append({"group": group_id,
                      "selector": group_selector_text(selector) if selector else None,
                      "members": sorted(f"{m.pod} {m.ip}" for m in group.members)
                      if group else []})
    for cidr in rule.cidrs:
        peers.append({"cidr": cidr})
    return {"index": index, "any_peer": rule.any_peer, "peers": peers,
            "ports": [port_text(p) for p in rule.ports]}


def policies_for_pod(view: ClusterView, pod: PodInfo) -> dict:
    """
    The policies selecting the pod, per direction, with their rules of that
    direction: the JSON of C{contivctl policies}.
    """
    ips = {_normalise(ip) for ip in pod.ips}
    result: dict[str, Any] = {"pod": pod.key, "node": pod.node, "ips": list(pod.ips),
                              "generation": view.generation}
    for direction in DIRECTIONS:
        selecting = [p for p in sorted(view.policies.values(),
                                       key=lambda p: (policy_label(p), p.id))
                     if direction in p.types and ips & view.group_ips(p.applied_to)]
        result[direction.lower()] = {
            "isolated": bool(selecting),
            "policies": [{
                "id": p.id, "namespace": p.namespace, "name": p.name,
                "applied_to": p.applied_to,
                "rules": [rule_json(view, i, r) for d, i, r in rules_of(p) if d == direction],
            } for p in selecting],
        }
    return result


def groups_json(view: ClusterView) -> dict:
    uses = group_uses(view)
    ids = sorted(set(view.groups) | set(uses))
    return {"generation": view.generation,
            "groups": [group_json(view, group_id, uses.get(group_id)) for group_id in ids]}


# -- explaining one connection ---------------------------------------------------------

def side_json(view: ClusterView, side: Side) -> dict:
    policy = view.policies.get(side.policy) if side.policy else None
    return {
        "outcome": side.outcome,
        "policy": side.policy,
        "policy_name": policy_label(policy) if policy else None,
        "rule": side.rule,
        "isolating": list(side.isolating),
        "text": side_text(view, side),
    }


def side_text(view: ClusterView, side: Side) -> str:
    def name(policy_id: str) -> str:
        policy = view.policies.get(policy_id)
        return policy_label(policy) if policy else policy_id

    if side.outcome == ALLOWED:
        return f"allowed by {name(side.policy)} rule {side.rule}"  # type: ignore[arg-type]
    if side.outcome == DENIED:
        return "denied: isolated by " + ", ".join(name(i) for i in side.isolating) + \
            ", and no rule of theirs allows it"
    return side.outcome


def compiled_verdict(view: ClusterView, src: Endpoint, dst: Endpoint, protocol: str,
                     port: int) -> dict:
    verdict = view.evaluator.verdict(src.ip, dst.ip, protocol, port)
    assert verdict.egress_side is not None and verdict.ingress_side is not None
    return {"allowed": verdict.allowed,
            "verdict": "allowed" if verdict.allowed else "denied",
            "egress": side_json(view, verdict.egress_side),
            "ingress": side_json(view, verdict.ingress_side)}


def _normalise(ip: str) -> str:
    return str(ipaddress.ip_address(ip))
