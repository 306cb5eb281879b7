"""
The Kubernetes objects the policy engine works on, parsed from their API JSON
into frozen values: L{Namespace}, L{Pod} and L{NetworkPolicy}.

This is the only module that reads raw API dicts. Parsing validates what
C{networking.k8s.io/v1} validates (and the types of everything it reads), and
rejects a bad object with a L{ValidationError} naming the object and the field.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from contiv.policy.selectors import FieldError, parse_labels, parse_selector, type_name
from contiv.policy.types import (
    EGRESS,
    INGRESS,
    PROTOCOLS,
    LabelSelector,
    NamedPort,
    PortRule,
)

DEFAULT_NAMESPACE = "default"
# The API server sets this label on every namespace (Kubernetes 1.22+), so that
# a namespaceSelector can pick a namespace by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
FINISHED_PHASES = ("Succeeded", "Failed")
MAX_PORT = 65535
UNNAMED = "<unnamed>"

# IANA_SVC_NAME, as Kubernetes checks a port name.
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class ValidationError(ValueError):
    """
    An object the engine cannot use. Reads as
    C{NetworkPolicy default/web: spec.ingress[0].ports[1].port: 70000 is out of range ...}.
    """

    def __init__(self, kind: str, key: str, field: str, problem: str):
        super().__init__(kind, key, field, problem)
        self.kind = kind
        self.key = key
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.kind} {self.key}: {self.field}: {self.problem}"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str]  # including NAMESPACE_NAME_LABEL


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    node: Optional[str]  # spec.nodeName; None while unscheduled
    ips: tuple[str, ...]  # normalised, in status.podIPs order (primary first)
    phase: str
    host_network: bool
    named_ports: tuple[NamedPort, ...] = ()  # sorted by (name, protocol)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def in_groups(self) -> bool:
        """
        Whether the pod can be a policy target or peer: NetworkPolicy does not
        apply to hostNetwork pods, and a finished pod's IP may already belong
        to a new pod.
        """
        return bool(self.ips) and not self.host_network and self.phase not in FINISHED_PHASES


@dataclass(frozen=True)
class IPBlock:
    cidr: str  # normalised network, host bits cleared
    excepts: tuple[str, ...] = ()  # normalised, each strictly inside cidr


@dataclass(frozen=True)
class Peer:
    """
    One entry of from/to: either an ipBlock, or selectors. Both selectors set
    means pods matching the pod selector in namespaces matching the other.
    """

    pod_selector: Optional[LabelSelector] = None
    namespace_selector: Optional[LabelSelector] = None
    ip_block: Optional[IPBlock] = None


@dataclass(frozen=True)
class PolicyRule:
    peers: tuple[Peer, ...]  # empty: every peer
    ports: tuple[PortRule, ...]  # empty: every port and protocol, in spec order


@dataclass(frozen=True)
class NetworkPolicy:
    """
    A parsed NetworkPolicy. C{types} is policyTypes after defaulting; the rules
    of both directions are kept as written (the compiler drops those of
    directions not in C{types}), so that C{ingress[i]} is C{spec.ingress[i]}.
    """

    namespace: str
    name: str
    pod_selector: LabelSelector
    types: tuple[str, ...]  # sorted subset of (EGRESS, INGRESS)
    ingress: tuple[PolicyRule, ...]
    egress: tuple[PolicyRule, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# -- field readers: each raises FieldError naming the field


def _mapping(raw: Any, field: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise FieldError(field, f"must be a mapping, got {type_name(raw)}")
    return raw


def _list(raw: Any, field: str) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise FieldError(field, f"must be a list, got {type_name(raw)}")
    return raw


def _string(raw: Any, field: str, default: str = "") -> str:
    if raw is None:
        return default
    if not isinstance(raw, str):
        raise FieldError(field, f"must be a string, got {type_name(raw)}")
    return raw


def _boolean(raw: Any, field: str) -> bool:
    if raw is None:
        return False
    if not isinstance(raw, bool):
        raise FieldError(field, f"must be a boolean, got {type_name(raw)}")
    return raw


def _port_number(raw: Any, field: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise FieldError(field, f"must be an integer, got {type_name(raw)}")
    if not 1 <= raw <= MAX_PORT:
        raise FieldError(field, f"{raw} is out of range (must be 1..{MAX_PORT})")
    return raw


def _protocol(raw: Any, field: str) -> str:
    protocol = _string(raw, field, default="TCP")
    if protocol not in PROTOCOLS:
        raise FieldError(field, f"unsupported protocol {protocol!r} (must be TCP, UDP or SCTP)")
    return protocol


def _ip(raw: Any, field: str) -> str:
    text = _string(raw, field)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise FieldError(field, f"{text!r} is not an IP address") from None


def _network(raw: Any, field: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _string(raw, field)
    if not text:
        raise FieldError(field, "is required")
    # Kubernetes parses CIDRs as Go's ParseCIDR does: a prefix length is
    # required, host bits are allowed (and ignored).
    if "/" not in text:
        raise FieldError(field, f"{text!r} is not a CIDR")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise FieldError(field, f"{text!r} is not a CIDR") from None


def _metadata(raw: Any, kind: str, namespaced: bool) -> tuple[Mapping[str, Any], str, str]:
    """The metadata, namespace and name, or a ValidationError naming what is missing."""
    if not isinstance(raw, Mapping):
        raise ValidationError(kind, UNNAMED, "(object)", f"must be a mapping, got {type_name(raw)}")
    metadata = raw.get("metadata")
    if not isinstance(metadata, Mapping):
        raise ValidationError(kind, UNNAMED, "metadata",
                              f"must be a mapping, got {type_name(metadata)}")
    name = metadata.get("name")
    if not isinstance(name, str):
        raise ValidationError(kind, UNNAMED, "metadata.name",
                              f"must be a string, got {type_name(name)}")
    if not name:
        raise ValidationError(kind, UNNAMED, "metadata.name", "must not be empty")
    namespace = ""
    if namespaced:
        namespace = metadata.get("namespace")
        if namespace is None or namespace == "":
            namespace = DEFAULT_NAMESPACE
        if not isinstance(namespace, str):
            raise ValidationError(kind, f"?/{name}", "metadata.namespace",
                                  f"must be a string, got {type_name(namespace)}")
    return metadata, namespace, name


# -- Namespace


def parse_namespace(raw: Any) -> Namespace:
    metadata, _, name = _metadata(raw, "Namespace", namespaced=False)
    try:
        labels = parse_labels(metadata.get("labels"), "metadata.labels")
    except FieldError as error:
        raise ValidationError("Namespace", name, error.field, error.problem) from None
    labels[NAMESPACE_NAME_LABEL] = name
    return Namespace(name, labels)


def implicit_namespace(name: str) -> Namespace:
    """A namespace the engine has not seen (yet): no labels but the one the API server sets."""
    return Namespace(name, {NAMESPACE_NAME_LABEL: name})


# -- Pod


def parse_pod(raw: Any) -> Pod:
    metadata, namespace, name = _metadata(raw, "Pod", namespaced=True)
    try:
        labels = parse_labels(metadata.get("labels"), "metadata.labels")
        spec = _mapping(raw.get("spec"), "spec")
        node = _string(spec.get("nodeName"), "spec.nodeName") or None
        host_network = _boolean(spec.get("hostNetwork"), "spec.hostNetwork")
        named_ports = _named_ports(spec.get("containers"), "spec.containers")
        status = _mapping(raw.get("status"), "status")
        phase = _string(status.get("phase"), "status.phase")
        ips = _pod_ips(status)
    except FieldError as error:
        raise ValidationError("Pod", f"{namespace}/{name}", error.field, error.problem) from None
    return Pod(namespace, name, labels, node, ips, phase, host_network, named_ports)


def _named_ports(raw: Any, field: str) -> tuple[NamedPort, ...]:
    found: dict[tuple[str, str], NamedPort] = {}
    for i, container in enumerate(_list(raw, field)):
        where = f"{field}[{i}]"
        container = _mapping(container, where)
        for j, entry in enumerate(_list(container.get("ports"), f"{where}.ports")):
            at = f"{where}.ports[{j}]"
            entry = _mapping(entry, at)
            number = _port_number(entry.get("containerPort"), f"{at}.containerPort")
            protocol = _protocol(entry.get("protocol"), f"{at}.protocol")
            name = _string(entry.get("name"), f"{at}.name")
            # The API server rejects duplicate names; should one slip through,
            # the first declaration wins, as it does for kube-proxy.
            if name and (name, protocol) not in found:
                found[(name, protocol)] = NamedPort(name, protocol, number)
    return tuple(found[k] for k in sorted(found))


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    ips: list[str] = []
    for i, entry in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        entry = _mapping(entry, f"status.podIPs[{i}]")
        ip = entry.get("ip")
        if ip:
            ips.append(_ip(ip, f"status.podIPs[{i}].ip"))
    if not ips and status.get("podIP"):
        ips.append(_ip(status.get("podIP"), "status.podIP"))
    return tuple(dict.fromkeys(ips))


# -- NetworkPolicy


def parse_network_policy(raw: Any) -> NetworkPolicy:
    metadata, namespace, name = _metadata(raw, "NetworkPolicy", namespaced=True)
    try:
        spec = _mapping(raw.get("spec"), "spec")
        pod_selector = parse_selector(spec.get("podSelector"), "spec.podSelector")
        ingress = _rules(spec.get("ingress"), "spec.ingress", "from")
        egress = _rules(spec.get("egress"), "spec.egress", "to")
        types = _policy_types(spec.get("policyTypes"), "spec.policyTypes", egress)
    except FieldError as error:
        raise ValidationError("NetworkPolicy", f"{namespace}/{name}",
                              error.field, error.problem) from None
    return NetworkPolicy(namespace, name, pod_selector, types, ingress, egress)


def _policy_types(raw: Any, field: str, egress: tuple[PolicyRule, ...]) -> tuple[str, ...]:
    given = _list(raw, field)
    if not given:
        # The API server's defaulting: Ingress always, Egress only when there
        # are egress rules (so `egress: []` alone does not isolate egress).
        return (EGRESS, INGRESS) if egress else (INGRESS,)
    if len(given) > 2:
        raise FieldError(field, "may not specify more than two policyTypes")
    for i, value in enumerate(given):
        if value not in (INGRESS, EGRESS):
            raise FieldError(f"{field}[{i}]",
                             f"unsupported policy type {value!r} (must be Ingress or Egress)")
    return tuple(sorted(set(given)))


def _rules(raw: Any, field: str, peers_key: str) -> tuple[PolicyRule, ...]:
    rules = []
    for i, entry in enumerate(_list(raw, field)):
        where = f"{field}[{i}]"
        entry = _mapping(entry, where)
        peers = tuple(_peer(peer, f"{where}.{peers_key}[{j}]")
                      for j, peer in enumerate(_list(entry.get(peers_key), f"{where}.{peers_key}")))
        ports = tuple(_port(port, f"{where}.ports[{j}]")
                      for j, port in enumerate(_list(entry.get("ports"), f"{where}.ports")))
        rules.append(PolicyRule(peers, ports))
    return tuple(rules)


def _peer(raw: Any, field: str) -> Peer:
    raw = _mapping(raw, field)
    pod_raw = raw.get("podSelector")
    namespace_raw = raw.get("namespaceSelector")
    block_raw = raw.get("ipBlock")
    if block_raw is not None:
        if pod_raw is not None or namespace_raw is not None:
            raise FieldError(field, "may not combine ipBlock with podSelector "
                                    "or namespaceSelector")
        return Peer(ip_block=_ip_block(block_raw, f"{field}.ipBlock"))
    if pod_raw is None and namespace_raw is None:
        raise FieldError(field, "must specify podSelector, namespaceSelector or ipBlock")
    return Peer(
        pod_selector=(parse_selector(pod_raw, f"{field}.podSelector")
                      if pod_raw is not None else None),
        namespace_selector=(parse_selector(namespace_raw, f"{field}.namespaceSelector")
                            if namespace_raw is not None else None),
    )


def _ip_block(raw: Any, field: str) -> IPBlock:
    raw = _mapping(raw, field)
    network = _network(raw.get("cidr"), f"{field}.cidr")
    excepts = []
    for i, text in enumerate(_list(raw.get("except"), f"{field}.except")):
        at = f"{field}.except[{i}]"
        hole = _network(text, at)
        # As Kubernetes: an except must be strictly smaller than, and inside, the cidr.
        if (hole.version != network.version or not hole.subnet_of(network)
                or hole.prefixlen <= network.prefixlen):
            raise FieldError(at, f"{text!r} is not strictly inside cidr "
                                 f"{raw.get('cidr')!r}")
        excepts.append(str(hole))
    return IPBlock(str(network), tuple(excepts))


def _port(raw: Any, field: str) -> PortRule:
    raw = _mapping(raw, field)
    protocol = _protocol(raw.get("protocol"), f"{field}.protocol")
    port = raw.get("port")
    end_port = raw.get("endPort")
    if port is None:
        if end_port is not None:
            raise FieldError(f"{field}.endPort", "may not be set without a numeric port")
        return PortRule(protocol)
    if isinstance(port, str):
        if not _valid_port_name(port):
            raise FieldError(f"{field}.port", f"{port!r} is not a valid port name "
                                              f"(1-15 lowercase letters, digits and '-', "
                                              f"with at least one letter)")
        if end_port is not None:
            raise FieldError(f"{field}.endPort", "may not be set with a named port")
        return PortRule(protocol, name=port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise FieldError(f"{field}.port", f"must be an integer or a port name, "
                                          f"got {type_name(port)}")
    _port_number(port, f"{field}.port")
    if end_port is None:
        return PortRule(protocol, port)
    _port_number(end_port, f"{field}.endPort")
    if end_port < port:
        raise FieldError(f"{field}.endPort", f"{end_port} is below port {port}")
    return PortRule(protocol, port, end_port)


def _valid_port_name(name: str) -> bool:
    return (len(name) <= 15 and bool(_PORT_NAME.match(name)) and "--" not in name
            and any("a" <= c <= "z" for c in name))
