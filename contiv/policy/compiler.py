"""
Compiling one parsed NetworkPolicy into a L{CompiledPolicy} over address
groups: selectors become L{GroupSelector}s (named by their ids), ipBlocks
become merged CIDRs, ports are normalised. Pure: the cluster's pods play no
part, so a policy's id changes only when the policy does.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Union

from contiv.policy.model import IPBlock, NetworkPolicy, Peer, PolicyRule
from contiv.policy.types import (
    EGRESS,
    INGRESS,
    CompiledPolicy,
    GroupSelector,
    LabelSelector,
    PortRule,
    Rule,
)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def compile_policy(policy: NetworkPolicy) -> tuple[CompiledPolicy, tuple[GroupSelector, ...]]:
    """
    The compiled policy and the selectors of every group it references
    (applied-to and peers), sorted by group id. Rules keep their spec order
    within a direction (ingress first), so the i-th rule of a direction is
    C{spec.<direction>[i]}; rules of a direction not in the policy's types are
    dropped, as Kubernetes ignores them.
    """
    selectors: dict[str, GroupSelector] = {}

    def group(selector: GroupSelector) -> str:
        selectors[selector.id] = selector
        return selector.id

    applied_to = group(GroupSelector(policy.namespace, None, policy.pod_selector))
    rules = []
    for direction, spec_rules in ((INGRESS, policy.ingress), (EGRESS, policy.egress)):
        if direction in policy.types:
            rules.extend(compile_rule(direction, rule, policy.namespace, group)
                         for rule in spec_rules)
    compiled = CompiledPolicy(policy.namespace, policy.name, applied_to, policy.types,
                              tuple(rules))
    return compiled, tuple(selectors[group_id] for group_id in sorted(selectors))


def compile_rule(direction: str, rule: PolicyRule, namespace: str, group) -> Rule:
    """C{group} registers a peer's selector and returns its id."""
    peer_groups = sorted({group(peer_group(peer, namespace))
                          for peer in rule.peers if peer.ip_block is None})
    cidrs = merge_ip_blocks(peer.ip_block for peer in rule.peers if peer.ip_block is not None)
    ports = normalise_ports(rule.ports)
    port_groups: tuple[str, ...] = ()
    if direction == EGRESS and (cidrs or not rule.peers) and \
            any(port.name is not None for port in ports):
        # A named port resolves on the destination pod, which may run on any
        # node: the source node needs every pod's container ports.
        port_groups = (group(GroupSelector(None, LabelSelector(), None)),)
    return Rule(direction, tuple(peer_groups), cidrs, not rule.peers, ports, port_groups)


def peer_group(peer: Peer, namespace: str) -> GroupSelector:
    """
    A podSelector alone selects in the policy's namespace; a namespaceSelector
    (with or without a podSelector) selects across namespaces. An empty pod
    selector next to a namespaceSelector is stored as None (every pod), so
    that the two spellings share one group.
    """
    if peer.namespace_selector is None:
        return GroupSelector(namespace, None, peer.pod_selector or LabelSelector())
    pod_selector = peer.pod_selector
    if pod_selector == LabelSelector():
        pod_selector = None
    return GroupSelector(None, peer.namespace_selector, pod_selector)


def normalise_ports(ports: Iterable[PortRule]) -> tuple[PortRule, ...]:
    """Sorted and without duplicates: the order of ports has no meaning."""
    distinct = {(p.protocol, p.port or 0, p.end_port or 0, p.name or ""): p for p in ports}
    return tuple(distinct[k] for k in sorted(distinct))


def block_networks(block: IPBlock) -> list[Network]:
    """The cidr minus its excepts, as disjoint networks."""
    pieces = [ipaddress.ip_network(block.cidr)]
    for text in block.excepts:
        hole = ipaddress.ip_network(text)
        remaining = []
        for piece in pieces:
            # Two networks are either disjoint or one holds the other.
            if piece.subnet_of(hole):
                continue
            if hole.subnet_of(piece):
                remaining.extend(piece.address_exclude(hole))
            else:
                remaining.append(piece)
        pieces = remaining
    return pieces


def merge_ip_blocks(blocks: Iterable[IPBlock]) -> tuple[str, ...]:
    """The union of the blocks as sorted, non-overlapping networks (IPv4 first)."""
    by_version: dict[int, list[Network]] = {4: [], 6: []}
    for block in blocks:
        for network in block_networks(block):
            by_version[network.version].append(network)
    merged: list[str] = []
    for version in (4, 6):
        merged.extend(str(n) for n in ipaddress.collapse_addresses(by_version[version]))
    return tuple(merged)
