"""
What the policy engine produces and the store carries: compiled policies over
address groups, the groups' members, and each node's index.

These are the contract between netmaster (which computes them), the store
(which serialises them with L{to_json}/L{from_json} of each class) and
netplugin (which turns them into flows). They are plain frozen data: no
method here looks at the cluster.

Identifiers:
  - a group's C{id} names its selector (C{"g." + 16 hex digits} of the
    selector's canonical JSON); its C{key} names one version of its members
    (C{id + "." + 16 hex digits} of the members' canonical JSON). The store keeps
    C{group/<key>}: content-addressed and immutable.
  - a policy's C{id} is C{"<namespace>.<name>." + 16 hex digits} of the compiled
    policy's canonical JSON (namespace and name cut so that the id stays under
    200 characters); the store keeps C{policy/<id>}, immutable. Pods coming and
    going change groups, not policy ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Optional

INGRESS = "Ingress"
EGRESS = "Egress"
PROTOCOLS = ("TCP", "UDP", "SCTP")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(value: Any) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of value."""
    return hashlib.sha256(canonical_json(value)).hexdigest()[:16]


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry: operator is In, NotIn, Exists or DoesNotExist."""

    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """A parsed, normalised label selector. Empty (no labels, no expressions) matches all."""

    match_labels: tuple[tuple[str, str], ...] = ()  # sorted by key
    match_expressions: tuple[Requirement, ...] = ()  # sorted

    def to_json(self) -> dict:
        return {"matchLabels": dict(self.match_labels),
                "matchExpressions": [{"key": r.key, "operator": r.operator,
                                      "values": list(r.values)}
                                     for r in self.match_expressions]}


@dataclass(frozen=True)
class GroupSelector:
    """
    Which pods a group holds. C{namespace} set: pods of that namespace only
    (a podSelector without namespaceSelector, or a policy's applied-to);
    C{namespace} None: pods of the namespaces that C{namespace_selector}
    matches. C{pod_selector} None means every pod of those namespaces.
    """

    namespace: Optional[str]
    namespace_selector: Optional[LabelSelector]
    pod_selector: Optional[LabelSelector]

    def to_json(self) -> dict:
        return {
            "namespace": self.namespace,
            "namespaceSelector": (self.namespace_selector.to_json()
                                  if self.namespace_selector is not None else None),
            "podSelector": (self.pod_selector.to_json()
                            if self.pod_selector is not None else None),
        }

    @property
    def id(self) -> str:
        return "g." + digest(self.to_json())


@dataclass(frozen=True)
class NamedPort:
    """A container port a pod declares by name (for named ports in rules)."""

    name: str
    protocol: str
    port: int


@dataclass(frozen=True)
class Member:
    """One address in a group: the pod it belongs to and the pod's named ports."""

    ip: str
    pod: str  # "namespace/name"
    named_ports: tuple[NamedPort, ...] = ()  # sorted by (name, protocol)

    def to_json(self) -> list:
        return [self.ip, self.pod, [[p.name, p.protocol, p.port] for p in self.named_ports]]

    @classmethod
    def from_json(cls, value: list) -> "Member":
        ip, pod, ports = value
        return cls(ip, pod, tuple(NamedPort(n, proto, port) for n, proto, port in ports))


@dataclass(frozen=True)
class Group:
    """An address group: the members (sorted by ip, then pod) a selector matches now."""

    id: str
    members: tuple[Member, ...]

    @cached_property
    def key(self) -> str:
        # Cached: the members never change, and hashing thousands of them is
        # the most expensive thing a publish would otherwise repeat.
        return self.id + "." + digest([m.to_json() for m in self.members])

    def to_json(self) -> dict:
        return {"id": self.id, "members": [m.to_json() for m in self.members]}

    @cached_property
    def canonical(self) -> bytes:
        """canonical_json(self.to_json()): what the store holds (the engine pre-fills it)."""
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, value: Mapping) -> "Group":
        return cls(value["id"], tuple(Member.from_json(m) for m in value["members"]))


@dataclass(frozen=True)
class PortRule:
    """
    One entry of a rule's ports. C{port} None: every port of the protocol.
    C{name} set (and port None): a named port, resolved per destination pod.
    C{end_port} set: the range port..end_port.
    """

    protocol: str = "TCP"
    port: Optional[int] = None
    end_port: Optional[int] = None
    name: Optional[str] = None

    def to_json(self) -> list:
        return [self.protocol, self.port, self.end_port, self.name]

    @classmethod
    def from_json(cls, value: list) -> "PortRule":
        return cls(*value)


@dataclass(frozen=True)
class Rule:
    """
    One ingress or egress rule. The peer matches when it is a member of one of
    C{peer_groups}, or its address is in one of C{cidrs}, or C{any_peer} (the
    rule had no from/to). C{ports} empty: every port and protocol.
    C{cidrs} are non-overlapping networks (ipBlock minus its except, merged).
    """

    direction: str  # INGRESS or EGRESS
    peer_groups: tuple[str, ...]  # group ids, sorted
    cidrs: tuple[str, ...]  # sorted, non-overlapping
    any_peer: bool
    ports: tuple[PortRule, ...]
    # Groups that only tell where named ports are: an egress rule with a named
    # port and no peer groups to resolve it on (any peer, or ipBlocks) needs
    # the container ports of every pod, wherever it runs. Never peers.
    port_groups: tuple[str, ...] = ()

    def to_json(self) -> dict:
        value = {"direction": self.direction, "peerGroups": list(self.peer_groups),
                 "cidrs": list(self.cidrs), "anyPeer": self.any_peer,
                 "ports": [p.to_json() for p in self.ports]}
        if self.port_groups:
            value["portGroups"] = list(self.port_groups)
        return value

    @classmethod
    def from_json(cls, value: Mapping) -> "Rule":
        return cls(value["direction"], tuple(value["peerGroups"]), tuple(value["cidrs"]),
                   value["anyPeer"], tuple(PortRule.from_json(p) for p in value["ports"]),
                   tuple(value.get("portGroups", ())))


@dataclass(frozen=True)
class CompiledPolicy:
    """
    One NetworkPolicy, compiled. C{types} says which directions it isolates
    (after defaulting); C{rules} holds only rules of those directions.
    """

    namespace: str
    name: str
    applied_to: str  # group id
    types: tuple[str, ...]  # sorted subset of (EGRESS, INGRESS)
    rules: tuple[Rule, ...]

    def to_json(self) -> dict:
        return {"namespace": self.namespace, "name": self.name,
                "appliedTo": self.applied_to, "types": list(self.types),
                "rules": [r.to_json() for r in self.rules]}

    @classmethod
    def from_json(cls, value: Mapping) -> "CompiledPolicy":
        return cls(value["namespace"], value["name"], value["appliedTo"],
                   tuple(value["types"]), tuple(Rule.from_json(r) for r in value["rules"]))

    @cached_property
    def id(self) -> str:
        readable = f"{self.namespace}.{self.name}"[:180]
        return f"{readable}.{digest(self.to_json())}"

    def group_ids(self) -> tuple[str, ...]:
        ids = {self.applied_to}
        for rule in self.rules:
            ids.update(rule.peer_groups)
            ids.update(rule.port_groups)
        return tuple(sorted(ids))


@dataclass(frozen=True)
class LocalPod:
    """A pod scheduled on the node, as netplugin needs it."""

    key: str  # "namespace/name"
    ips: tuple[str, ...]
    named_ports: tuple[NamedPort, ...] = ()

    def to_json(self) -> list:
        return [self.key, list(self.ips), [[p.name, p.protocol, p.port]
                                           for p in self.named_ports]]

    @classmethod
    def from_json(cls, value: list) -> "LocalPod":
        key, ips, ports = value
        return cls(key, tuple(ips), tuple(NamedPort(n, proto, port) for n, proto, port in ports))


@dataclass(frozen=True)
class NodeIndex:
    """
    What one node needs: the ids of the policies whose applied-to group has a
    pod on it, the keys (versions) of every group those policies reference,
    and its local pods.
    """

    node: str
    policies: tuple[str, ...]  # policy ids, sorted
    groups: tuple[str, ...]  # group keys (id.contenthash), sorted
    pods: tuple[LocalPod, ...]  # sorted by key

    def to_json(self) -> dict:
        return {"node": self.node, "policies": list(self.policies),
                "groups": list(self.groups), "pods": [p.to_json() for p in self.pods]}

    @classmethod
    def from_json(cls, value: Mapping) -> "NodeIndex":
        return cls(value["node"], tuple(value["policies"]), tuple(value["groups"]),
                   tuple(LocalPod.from_json(p) for p in value["pods"]))
