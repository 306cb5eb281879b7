"""
An independent oracle of Kubernetes NetworkPolicy semantics.

L{connection_allowed} decides one connection directly over the raw
Kubernetes objects (Namespaces, Pods, NetworkPolicies as JSON dicts), by the
rules of the Kubernetes documentation
(https://kubernetes.io/docs/concepts/services-networking/network-policies/
and the NetworkPolicy API reference), written without looking at the
compiler in C{contiv.policy}: the tests compare the two.

The rules it implements:

  - A pod is isolated for a direction when at least one policy that selects
    it has that direction in its (defaulted) policyTypes; an isolated pod
    accepts, in that direction, only what at least one rule of that direction
    of those policies allows (the union). A connection needs the source's
    egress AND the destination's ingress to allow it. An address that is not
    a pod has no side: only the pod end decides.
  - policyTypes absent or empty: Ingress, plus Egress iff spec.egress has at
    least one rule. Only rules of listed types count; an absent or empty rule
    list of a listed type allows nothing.
  - A rule with no from/to allows every peer (addresses outside the cluster
    too); with no ports, every port and protocol. Peers OR together; a
    podSelector and a namespaceSelector in the same peer AND together; a
    podSelector alone means the policy's namespace; a namespaceSelector alone
    means every pod of the namespaces it matches.
  - ipBlock: the address is in cidr and in none of except (any address,
    pods included; IPv4 and IPv6, never across families).
  - Ports: protocol defaults to TCP; no port means every port of that
    protocol; port..endPort is a range; a named port matches when the
    DESTINATION pod declares a container port of that name and protocol and
    the connection goes to its number (an address that is not a pod never
    matches a named port).
  - Label selectors: matchLabels and matchExpressions (In, NotIn, Exists,
    DoesNotExist) all AND together; NotIn and DoesNotExist match a missing key;
    an empty selector matches everything.
  - Pods with hostNetwork are never selected by a policy nor matched by a
    pod or namespace selector (their address is the node's; an ipBlock may
    still match it). Pods in phase Succeeded or Failed, or without an
    address, are neither. A namespace always carries the label
    kubernetes.io/metadata.name with its name (the API server sets it).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

NAME_LABEL = "kubernetes.io/metadata.name"


# -- label selectors ----------------------------------------------------------

def selector_matches(selector: Optional[Mapping[str, Any]], labels: Mapping[str, str]) -> bool:
    """Does the LabelSelector (a dict; None or {} = everything) match labels?"""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op = expr["key"], expr["operator"]
        values = expr.get("values") or ()
        if op == "In":
            if key not in labels or labels[key] not in values:
                return False
        elif op == "NotIn":
            if key in labels and labels[key] in values:
                return False
        elif op == "Exists":
            if key not in labels:
                return False
        elif op == "DoesNotExist":
            if key in labels:
                return False
        else:  # pragma: no cover - only valid selectors are given
            raise ValueError(f"unknown operator {op!r}")
    return True


# -- the cluster, read from raw objects ----------------------------------------

@dataclass
class _Pod:
    namespace: str
    name: str
    labels: dict
    ips: tuple
    live: bool  # may be selected / matched by selectors
    ports: tuple  # (name, protocol, number) of named container ports


@dataclass
class _Cluster:
    namespaces: dict = field(default_factory=dict)  # name -> labels
    pods: list = field(default_factory=list)
    policies: list = field(default_factory=list)
    by_ip: dict = field(default_factory=dict)  # ip (normalised) -> live _Pod


def _kind(obj: Mapping[str, Any]) -> str:
    kind = obj.get("kind")
    if kind:
        return kind
    spec = obj.get("spec") or {}
    if "containers" in spec:
        return "Pod"
    if "podSelector" in spec or "policyTypes" in spec or "ingress" in spec or "egress" in spec:
        return "NetworkPolicy"
    return "Namespace"


def _norm_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _pod_ips(obj: Mapping[str, Any]) -> tuple:
    status = obj.get("status") or {}
    ips = []
    for entry in status.get("podIPs") or ():
        if entry.get("ip"):
            ips.append(_norm_ip(entry["ip"]))
    if status.get("podIP"):
        ip = _norm_ip(status["podIP"])
        if ip not in ips:
            ips.insert(0, ip)
    return tuple(ips)


def _read(objects: Iterable[Mapping[str, Any]]) -> _Cluster:
    cluster = _Cluster()
    for obj in objects:
        kind = _kind(obj)
        meta = obj.get("metadata") or {}
        if kind == "Namespace":
            labels = dict(meta.get("labels") or {})
            labels.setdefault(NAME_LABEL, meta["name"])
            cluster.namespaces[meta["name"]] = labels
        elif kind == "Pod":
            spec = obj.get("spec") or {}
            phase = (obj.get("status") or {}).get("phase")
            ips = _pod_ips(obj)
            live = (not spec.get("hostNetwork")) and phase not in ("Succeeded", "Failed") \
                and bool(ips)
            ports = []
            for container in spec.get("containers") or ():
                for p in container.get("ports") or ():
                    if p.get("name"):
                        ports.append((p["name"], p.get("protocol") or "TCP", p["containerPort"]))
            pod = _Pod(meta.get("namespace") or "default", meta["name"],
                       dict(meta.get("labels") or {}), ips, live, tuple(ports))
            cluster.pods.append(pod)
            if live:
                for ip in ips:
                    cluster.by_ip[ip] = pod
        elif kind == "NetworkPolicy":
            cluster.policies.append(obj)
    return cluster


# -- policies ------------------------------------------------------------------

def policy_types(spec: Mapping[str, Any]) -> tuple:
    types = spec.get("policyTypes")
    if types:
        return tuple(types)
    result = ["Ingress"]
    if spec.get("egress"):
        result.append("Egress")
    return tuple(result)


def _selects(policy: Mapping[str, Any], pod: _Pod) -> bool:
    meta = policy.get("metadata") or {}
    spec = policy.get("spec") or {}
    return (pod.live and pod.namespace == (meta.get("namespace") or "default")
            and selector_matches(spec.get("podSelector"), pod.labels))


def _in_block(ip: str, block: Mapping[str, Any]) -> bool:
    address = ipaddress.ip_address(ip)
    net = ipaddress.ip_network(block["cidr"], strict=False)
    if address.version != net.version or address not in net:
        return False
    for exc in block.get("except") or ():
        enet = ipaddress.ip_network(exc, strict=False)
        if enet.version == address.version and address in enet:
            return False
    return True


def _peer_matches(peer: Mapping[str, Any], policy_ns: str, ip: str, cluster: _Cluster) -> bool:
    if peer.get("ipBlock") is not None:
        return _in_block(ip, peer["ipBlock"])
    pod = cluster.by_ip.get(ip)
    if pod is None:
        return False
    pod_sel = peer.get("podSelector")
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is None:
        if pod.namespace != policy_ns:
            return False
    else:
        ns_labels = cluster.namespaces.get(pod.namespace)
        if ns_labels is None or not selector_matches(ns_sel, ns_labels):
            return False
    return selector_matches(pod_sel, pod.labels)


def _port_matches(entry: Mapping[str, Any], dst_ip: str, protocol: str, port: int,
                  cluster: _Cluster) -> bool:
    proto = entry.get("protocol") or "TCP"
    if proto != protocol:
        return False
    want = entry.get("port")
    if want is None:
        return True
    if isinstance(want, str):
        dst = cluster.by_ip.get(dst_ip)
        if dst is None:
            return False
        return any(name == want and p_proto == proto and number == port
                   for name, p_proto, number in dst.ports)
    end = entry.get("endPort")
    if end is not None:
        return want <= port <= end
    return port == want


def _rule_allows(rule: Mapping[str, Any], peers_key: str, policy_ns: str, peer_ip: str,
                 dst_ip: str, protocol: str, port: int, cluster: _Cluster) -> bool:
    peers = rule.get(peers_key) or ()
    if peers and not any(_peer_matches(p, policy_ns, peer_ip, cluster) for p in peers):
        return False
    ports = rule.get("ports") or ()
    if ports and not any(_port_matches(e, dst_ip, protocol, port, cluster) for e in ports):
        return False
    return True


def _side_allows(pod: _Pod, direction: str, peer_ip: str, dst_ip: str, protocol: str,
                 port: int, cluster: _Cluster) -> bool:
    """Does the pod's side (its ingress or egress) let the connection through?"""
    rules_key, peers_key = (("ingress", "from") if direction == "Ingress" else ("egress", "to"))
    isolated = False
    for policy in cluster.policies:
        if not _selects(policy, pod):
            continue
        spec = policy.get("spec") or {}
        if direction not in policy_types(spec):
            continue
        isolated = True
        ns = (policy.get("metadata") or {}).get("namespace") or "default"
        for rule in spec.get(rules_key) or ():
            if _rule_allows(rule, peers_key, ns, peer_ip, dst_ip, protocol, port, cluster):
                return True
    return not isolated


def connection_allowed(objects: Iterable[Mapping[str, Any]], src_ip: str, dst_ip: str,
                       protocol: str, port: int) -> bool:
    """May src_ip open a connection to dst_ip on protocol/port, per Kubernetes?"""
    return Oracle(objects).allowed(src_ip, dst_ip, protocol, port)


class Oracle:
    """L{connection_allowed} with the objects read once, for many probes."""

    def __init__(self, objects: Iterable[Mapping[str, Any]]):
        self.cluster = _read(objects)

    def verdict(self, src_ip: str, dst_ip: str, protocol: str, port: int) -> tuple:
        """(egress allows, ingress allows)."""
        src_ip, dst_ip = _norm_ip(src_ip), _norm_ip(dst_ip)
        cluster = self.cluster
        src = cluster.by_ip.get(src_ip)
        dst = cluster.by_ip.get(dst_ip)
        egress = src is None or _side_allows(src, "Egress", dst_ip, dst_ip, protocol, port,
                                             cluster)
        ingress = dst is None or _side_allows(dst, "Ingress", src_ip, dst_ip, protocol, port,
                                              cluster)
        return egress, ingress

    def allowed(self, src_ip: str, dst_ip: str, protocol: str, port: int) -> bool:
        egress, ingress = self.verdict(src_ip, dst_ip, protocol, port)
        return egress and ingress


def manifest_objects(directory: str) -> list:
    """Every object of the *.yaml/*.yml/*.json files in C{directory} (lists unrolled)."""
    import os

    import yaml

    objects = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".yaml", ".yml", ".json")):
            continue
        with open(os.path.join(directory, name)) as f:
            for document in yaml.safe_load_all(f):
                if isinstance(document, dict):
                    objects.extend(document["items"] if document.get("kind") == "List"
                                   else [document])
    return objects
