"""
The policy pipeline (L{contiv.datapath.pipeline}), judged by what it does to
packets: the flows go into a fake OVS flow table
(L{tests.support.fake_flow_table}) and the verdicts are compared with the
independent model of Kubernetes semantics (L{tests.support.k8s_semantics})
over the upstream e2e scenarios of L{tests.unit.test_policy_e2e}.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contiv.datapath.flows import (
    CONTROLLER,
    CT_EST,
    CT_INV,
    CT_NEW,
    CT_REL,
    CT_RPL,
    CT_TRK,
    NORMAL,
    Conjunction,
    Ct,
    Flow,
    Goto,
    Meter,
    Output,
    flow,
)
from contiv.datapath.pipeline import (
    CLASSIFIER,
    COMMIT,
    CONNTRACK,
    DNS_INTERCEPT,
    DNS_METER_ID,
    DNS_SEEN,
    EGRESS_DEFAULT,
    EGRESS_RULES,
    INGRESS_RULES,
    TABLES,
    ConjunctionIds,
    FlowRefused,
    check_flows,
    flow_count_report,
    IncrementalPipeline,
    pipeline_flows,
    port_range_masks,
)
from contiv.k8s.events import ADDED, DELETED, Event, object_key
from contiv.policy.engine import PolicyEngine
from contiv.policy.types import (
    EGRESS,
    INGRESS,
    CompiledPolicy,
    Group,
    LocalPod,
    Member,
    NamedPort,
    NodeIndex,
    PortRule,
    Rule,
)
from contiv.store.layout import NodeState
from tests.support.fake_flow_table import Ambiguous, FakeFlowTable, Refused
from tests.unit import test_policy_e2e as e2e
from tests.unit.test_policy_e2e import (
    block,
    labels_sel,
    namespace,
    peer,
    pod,
    pod_ip,
    policy,
    port,
)

NODE = "node-1"


# -- helpers ----------------------------------------------------------------------

def node_state(engine: PolicyEngine, node: str) -> NodeState:
    """What netplugin on C{node} would read from the store."""
    return NodeState(0, engine.node_index(node), engine.policies,
                     {group.key: group for group in engine.groups.values()})


def engine_of(objects) -> PolicyEngine:
    engine = PolicyEngine()
    for obj in objects:
        engine.apply(Event(ADDED, obj["kind"], object_key(obj), obj))
    assert engine.errors == {}
    return engine


def one_node(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        obj = copy.deepcopy(obj)
        obj["spec"]["nodeName"] = NODE
    return obj


def bridge(objects, **options) -> FakeFlowTable:
    """Every pod on one node; that node's bridge."""
    engine = engine_of([one_node(o) for o in objects])
    return FakeFlowTable(pipeline_flows(node_state(engine, NODE), **options))


def cluster(*objects) -> list:
    """Namespaces x, y; pods a, b, c in each; plus C{objects}."""
    base = [namespace("x"), namespace("y")]
    base += [pod(f"{ns}/{name}") for ns in ("x", "y") for name in ("a", "b", "c")]
    return base + list(objects)


def state_by_hand(policies, groups, pods) -> NodeState:
    index = NodeIndex(NODE, tuple(sorted(p.id for p in policies)),
                      tuple(sorted(g.key for g in groups)),
                      tuple(sorted(pods, key=lambda p: p.key)))
    return NodeState(0, index, {p.id: p for p in policies}, {g.key: g for g in groups})


def v4(n: int) -> str:
    return str(ipaddress.ip_address("10.1.0.0") + n)


def shaped_state(n_pods: int, n_peers: int, ports: tuple, any_peer: bool = False,
                 cidrs: tuple = ()) -> NodeState:
    """One ingress rule over n_pods local pods, n_peers peer pods and ports (IPv4 only)."""
    targets = Group("g.targets", tuple(Member(v4(i), f"x/t{i}") for i in range(n_pods)))
    peers = Group("g.peers", tuple(Member(v4(1000 + i), f"y/p{i}") for i in range(n_peers)))
    rule = Rule(INGRESS, () if any_peer else ("g.peers",), cidrs, any_peer, ports)
    compiled = CompiledPolicy("x", "shape", "g.targets", (INGRESS,), (rule,))
    pods = [LocalPod(m.pod, (m.ip,)) for m in targets.members]
    return state_by_hand([compiled], [targets, peers], pods)


def rule_flows(flows) -> list[Flow]:
    return [f for f in flows if f.table in (EGRESS_RULES, INGRESS_RULES) and f.priority > 0]


# -- the tables as data -------------------------------------------------------------

def test_tables_follow_the_design_order():
    names = [TABLES[i].name for i in sorted(TABLES)]
    assert names == ["classifier", "conntrack-state", "dns-intercept", "egress-rules",
                     "egress-default", "ingress-rules", "ingress-default", "commit"]
    for table in TABLES.values():
        for action in table.miss:
            if isinstance(action, Goto):
                assert action.table in table.next_tables


@pytest.mark.parametrize("bad, reason", [
    (flow(EGRESS_DEFAULT, 100, (), eth_type=0x0800, ip_proto=6), "may not match ip_proto"),
    (flow(CONNTRACK, 100, (Output(NORMAL),), eth_type=0x0800, ipv4_dst="10.0.0.1"),
     "may not match ipv4_dst"),
    (flow(EGRESS_RULES, 100, (Goto(COMMIT),), conj_id=7), "may not send packets to table 70"),
    (flow(CLASSIFIER, 100, (Ct(1, table=EGRESS_RULES),), eth_type=0x0800),
     "may not send packets to table 30"),
    (flow(DNS_INTERCEPT, 100, (Goto(INGRESS_RULES),)), "may not send packets to table 50"),
    (flow(33, 100, ()), "no table 33"),
])
def test_table_checker_refuses(bad, reason):
    with pytest.raises(FlowRefused, match=reason):
        check_flows([bad])


def test_table_checker_accepts_the_generated_pipeline():
    flows = pipeline_flows(node_state(engine_of(cluster(
        policy("p", "x", {}, ingress=[{"from": [peer(pods={})], "ports": [port(80)]}],
               egress=[{"to": [block("10.0.0.0/8")]}]))), "node-1"), dns_intercept=True)
    check_flows(flows)
    identities = [f.identity for f in flows]
    assert len(identities) == len(set(identities))


# -- the fake flow table's own semantics --------------------------------------------------

@pytest.mark.parametrize("bad, reason", [
    (flow(1, 10, (Conjunction(1, 3, 2),), eth_type=0x0800), "clause 3 of 2"),
    (flow(1, 10, (Conjunction(1, 1, 1),), eth_type=0x0800), "2 to 64 clauses"),
    (flow(1, 10, (Conjunction(1, 1, 2), Output(NORMAL)), eth_type=0x0800), "mixed"),
    (flow(1, 10, (), ip_proto=6), "prerequisites"),
    (flow(1, 10, (), eth_type=0x0800, ip_proto=17, tcp_dst=80), "prerequisites"),
    (flow(1, 10, (), ipv6_src="fd00::1", eth_type=0x0800), "prerequisites"),
    (flow(1, 10, (), eth_type=0x0800, ipv4_src="fd00::1"), "not an ipv4"),
    (flow(1, 10, (), eth_type=(0x0800, 0xFF00)), "takes no mask"),
    (flow(1, 10, (), eth_type=0x0800, ip_proto=6, tcp_dst=(81, 0xFFFE)), "outside its mask"),
    (flow(1, 10, (), ct_state=CT_TRK), "pair"),
    (flow(1, 10, (Goto(1),)), "later table"),
    (flow(1, 10, (Goto(2), Output(NORMAL))), "last"),
    (flow(1, 10, (), vlan_vid=3), "unknown match field"),
])
def test_fake_table_refuses_what_ovs_refuses(bad, reason):
    with pytest.raises(Refused, match=reason):
        FakeFlowTable([bad])


def test_fake_table_refuses_the_same_flow_twice():
    # (value, full mask) is the same match as the plain value, as in OVS
    with pytest.raises(Refused, match="twice"):
        FakeFlowTable([flow(1, 10, (), eth_type=0x0800, ipv4_src="10.0.0.1"),
                       flow(1, 10, (Output(NORMAL),), eth_type=0x0800,
                            ipv4_src=("10.0.0.1", "255.255.255.255"))])
    with pytest.raises(Refused, match="conjunction 5"):
        FakeFlowTable([flow(1, 10, (Conjunction(5, 1, 2),), eth_type=0x0800),
                       flow(1, 10, (Conjunction(5, 2, 3),), eth_type=0x86DD)])


def _tcp(src="10.0.0.1", dst="10.0.0.2", dport=80):
    return {"eth_type": 0x0800, "ipv4_src": src, "ipv4_dst": dst, "ip_proto": 6,
            "tcp_dst": dport}


CONJ = [
    flow(0, 50, (Conjunction(9, 1, 2),), eth_type=0x0800, ipv4_src="10.0.0.1"),
    flow(0, 50, (Conjunction(9, 2, 2),), eth_type=0x0800, ip_proto=6, tcp_dst=80),
]


def test_conjunction_needs_every_clause():
    table = FakeFlowTable(CONJ + [flow(0, 50, (Output(1),), conj_id=9),
                                  flow(0, 0, (Output(2),))])
    assert table.process(_tcp()).outputs == (1,)
    assert table.process(_tcp(dport=81)).outputs == (2,)
    assert table.process(_tcp(src="10.0.0.9")).outputs == (2,)


def test_conj_id_flow_fires_at_its_own_priority():
    # clauses above an ordinary flow; the conj_id flow below it: the ordinary flow wins
    lower = FakeFlowTable(CONJ + [flow(0, 10, (Output(1),), conj_id=9),
                                  flow(0, 20, (Output(2),), eth_type=0x0800)])
    assert lower.process(_tcp()).outputs == (2,)
    higher = FakeFlowTable(CONJ + [flow(0, 30, (Output(1),), conj_id=9),
                                   flow(0, 20, (Output(2),), eth_type=0x0800)])
    assert higher.process(_tcp()).outputs == (1,)
    # an ordinary flow above the clauses hides the conjunction
    above = FakeFlowTable(CONJ + [flow(0, 30, (Output(1),), conj_id=9),
                                  flow(0, 60, (Output(2),), eth_type=0x0800)])
    assert above.process(_tcp()).outputs == (2,)
    # no conj_id flow: as if the conjunction had not matched
    missing = FakeFlowTable(CONJ + [flow(0, 20, (Output(2),), eth_type=0x0800)])
    assert missing.process(_tcp()).outputs == (2,)


def test_incomplete_conjunction_falls_back_to_the_same_match_lower_down():
    table = FakeFlowTable(CONJ + [flow(0, 50, (Output(1),), conj_id=9),
                                  flow(0, 40, (Output(3),), eth_type=0x0800,
                                       ipv4_src="10.0.0.1")])
    assert table.process(_tcp(dport=81)).outputs == (3,)


def test_overlapping_conjunctions_that_disagree_are_ambiguous():
    table = FakeFlowTable([
        flow(0, 50, (Conjunction(1, 1, 2), Conjunction(2, 1, 2)), eth_type=0x0800,
             ipv4_src="10.0.0.1"),
        flow(0, 50, (Conjunction(1, 2, 2),), eth_type=0x0800, ip_proto=6, tcp_dst=80),
        flow(0, 50, (Conjunction(2, 2, 2),), eth_type=0x0800, ipv4_dst="10.0.0.2"),
        flow(0, 50, (Output(1),), conj_id=1),
        flow(0, 50, (),  conj_id=2),
    ])
    with pytest.raises(Ambiguous):
        table.process(_tcp())
    assert table.process(_tcp(dport=81)).dropped


def test_ct_recirculates_with_the_callers_state():
    table = FakeFlowTable([
        flow(0, 10, (Ct(3, table=1),), eth_type=0x0800),
        flow(1, 10, (Output(1),), ct_state=(CT_TRK | CT_EST, CT_TRK | CT_EST)),
        flow(1, 5, (Ct(3, commit=True), Output(2)), ct_state=(CT_TRK, CT_TRK)),
    ])
    assert table.process({**_tcp(), "ct_state": CT_EST}).outputs == (1,)
    new = table.process(_tcp())
    assert new.outputs == (2,) and new.committed


# -- static flows -------------------------------------------------------------------------

DENY_ALL = policy("deny-all", "x", {}, ingress=[], egress=[], types=["Ingress", "Egress"])


def test_arp_and_neighbour_discovery_pass_where_everything_is_denied():
    table = bridge(cluster(DENY_ALL))
    assert table.process({"eth_type": 0x0806, "arp_op": 1}).outputs == (NORMAL,)
    for nd_type in (133, 134, 135, 136):
        packet = {"eth_type": 0x86DD, "ipv6_src": pod_ip("x/a", 6),
                  "ipv6_dst": pod_ip("x/b", 6), "ip_proto": 58, "icmpv6_type": nd_type}
        assert table.process(packet).outputs == (NORMAL,)
    echo = {"eth_type": 0x86DD, "ipv6_src": pod_ip("x/a", 6), "ipv6_dst": pod_ip("x/b", 6),
            "ip_proto": 58, "icmpv6_type": 128}
    assert table.process(echo).dropped
    assert table.process({"eth_type": 0x88CC}).outputs == (NORMAL,)  # LLDP: not IP


def test_conntrack_invalid_dropped_established_and_related_pass():
    table = bridge(cluster(DENY_ALL))
    xa, xb, ya = pod_ip("x/a"), pod_ip("x/b"), pod_ip("y/a")
    assert not table.allowed(ya, xa, "TCP", 80)
    # a reply of a connection x/a opened before the policy: conntrack lets it through
    for state in (CT_EST | CT_RPL, CT_EST, CT_REL):
        packet = FakeFlowTable.packet(ya, xa, "TCP", 80, ct_state=state)
        assert table.process(packet).outputs == (NORMAL,)
    allow_all = bridge(cluster(policy("allow-all", "x", {}, ingress=[{}])))
    packet = FakeFlowTable.packet(xb, xa, "TCP", 80, ct_state=CT_INV | CT_NEW)
    assert allow_all.process(packet).dropped
    new = allow_all.process(FakeFlowTable.packet(xb, xa, "TCP", 80))
    assert new.outputs == (NORMAL,) and new.committed


# -- flow counts ---------------------------------------------------------------------

@pytest.mark.parametrize("n_pods, n_peers, ports", [
    (1, 1, (PortRule("TCP", 80),)),
    (5, 3, (PortRule("TCP", 80), PortRule("UDP", 53))),
    (10, 20, (PortRule("TCP", 80), PortRule("TCP", 443), PortRule("SCTP", 9000),
              PortRule("UDP"))),
    (50, 100, (PortRule("TCP", 8080),)),
])
def test_a_rule_costs_n_plus_m_plus_p_plus_one(n_pods, n_peers, ports):
    state = shaped_state(n_pods, n_peers, ports)
    flows = pipeline_flows(state)
    assert len(rule_flows(flows)) == n_pods + n_peers + len(ports) + 1
    [count] = flow_count_report(state)
    assert (count.targets, count.peers, count.ports, count.flows) == (
        n_pods, n_peers, len(ports), n_pods + n_peers + len(ports) + 1)
    assert count.flows == count.bound


def test_flow_counts_of_other_shapes():
    # any peer: N + P + 1; every port: N + M + 1; neither: N plain flows
    assert len(rule_flows(pipeline_flows(shaped_state(4, 0, (PortRule("TCP", 80),),
                                                      any_peer=True)))) == 4 + 1 + 1
    assert len(rule_flows(pipeline_flows(shaped_state(4, 3, ())))) == 4 + 3 + 1
    assert len(rule_flows(pipeline_flows(shaped_state(4, 0, (), any_peer=True)))) == 4
    # CIDRs are peers; a range is as many ports as it has masked prefixes
    state = shaped_state(2, 1, (PortRule("TCP", 1000, 1999),), cidrs=("10.9.0.0/16",))
    assert len(rule_flows(pipeline_flows(state))) == 2 + 2 + 7 + 1


def test_rules_sharing_a_match_share_one_flow():
    targets = Group("g.t", (Member("10.1.0.1", "x/a"), Member("10.1.0.2", "x/b")))
    peers = Group("g.p", (Member("10.2.0.1", "y/a"),))
    rules = (Rule(INGRESS, ("g.p",), (), False, (PortRule("TCP", 80),)),
             Rule(INGRESS, ("g.p",), (), False, (PortRule("TCP", 81),)))
    compiled = CompiledPolicy("x", "two", "g.t", (INGRESS,), rules)
    state = state_by_hand([compiled], [targets, peers],
                          [LocalPod("x/a", ("10.1.0.1",)), LocalPod("x/b", ("10.1.0.2",))])
    flows = rule_flows(pipeline_flows(state))
    assert len(flows) == 2 * (2 + 1 + 1 + 1) - 3  # the target and peer flows are shared
    shared = [f for f in flows if dict(f.match).get("ipv4_dst") == "10.1.0.1"]
    assert len(shared) == 1 and len(shared[0].actions) == 2
    table = FakeFlowTable(pipeline_flows(state))
    assert table.allowed("10.2.0.1", "10.1.0.2", "TCP", 81)
    assert not table.allowed("10.2.0.1", "10.1.0.2", "TCP", 82)


# -- endPort ranges ------------------------------------------------------------------------

def _fewest_prefixes(first: int, last: int, low: int = 0, bits: int = 16) -> int:
    """Independently: split the 2**bits block at low until blocks lie inside the range."""
    high = low + (1 << bits) - 1
    if high < first or low > last:
        return 0
    if first <= low and high <= last:
        return 1
    half = 1 << (bits - 1)
    return (_fewest_prefixes(first, last, low, bits - 1)
            + _fewest_prefixes(first, last, low + half, bits - 1))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_range_masks_cover_exactly_the_range(a, b):
    first, last = min(a, b), max(a, b)
    blocks = port_range_masks(first, last)
    covered = 0
    for value, mask in blocks:
        assert value & ~mask & 0xFFFF == 0
        size = (~mask & 0xFFFF) + 1
        assert first <= value and value + size - 1 <= last
        covered += size
    # inside the range and adding up to its length: exactly the range, no overlap
    assert covered == last - first + 1
    assert len(blocks) == _fewest_prefixes(first, last)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 65535), st.integers(0, 300), st.sampled_from(["TCP", "UDP", "SCTP"]))
def test_end_port_range_in_the_datapath(first, length, protocol):
    last = min(first + length, 65535)
    state = shaped_state(1, 1, (PortRule(protocol, first, last),))
    table = FakeFlowTable(pipeline_flows(state))
    for probe in {first - 1, first, (first + last) // 2, last, last + 1} - {-1, 65536}:
        assert table.allowed(v4(1000), v4(0), protocol, probe) == (first <= probe <= last)


# -- named ports ----------------------------------------------------------------------------

def _with_port(obj: dict, name: str, number: int, protocol: str = "TCP") -> dict:
    obj = copy.deepcopy(obj)
    obj["spec"]["containers"] = [{"name": "app", "ports": [
        {"name": name, "containerPort": number, "protocol": protocol}]}]
    return obj


def test_ingress_named_port_resolves_per_destination_pod():
    objects = [namespace("x"), namespace("y"),
               _with_port(pod("x/a"), "web", 8080), _with_port(pod("x/b"), "web", 9090),
               _with_port(pod("x/c"), "admin", 8080), pod("y/a"),
               policy("web", "x", {}, ingress=[{"ports": [port("web")]}])]
    table = bridge(objects)
    ya = pod_ip("y/a")
    verdicts = {(dst, n): table.allowed(ya, pod_ip(dst), "TCP", n)
                for dst in ("x/a", "x/b", "x/c") for n in (8080, 9090)}
    assert verdicts == {("x/a", 8080): True, ("x/a", 9090): False,
                        ("x/b", 8080): False, ("x/b", 9090): True,
                        ("x/c", 8080): False, ("x/c", 9090): False}
    assert not table.allowed(ya, pod_ip("x/a"), "UDP", 8080)


def test_egress_named_port_resolves_per_destination_pod():
    objects = [namespace("x"), namespace("y"),
               _with_port(pod("y/a"), "dns", 5353, "UDP"),
               _with_port(pod("y/b"), "dns", 53, "UDP"),
               pod("y/c"), pod("x/a"),
               policy("to-dns", "x", {}, egress=[{"to": [peer(nss=labels_sel(ns="y"))],
                                                   "ports": [port("dns", "UDP")]}],
                      types=["Egress"])]
    table = bridge(objects)
    xa = pod_ip("x/a", 6)
    assert table.allowed(xa, pod_ip("y/a", 6), "UDP", 5353)
    assert not table.allowed(xa, pod_ip("y/a", 6), "UDP", 53)
    assert table.allowed(xa, pod_ip("y/b", 6), "UDP", 53)
    assert not table.allowed(xa, pod_ip("y/c", 6), "UDP", 53)
    assert not table.allowed(xa, "2001:db8::53", "UDP", 53)


# -- IPv6 -------------------------------------------------------------------------------------

def test_ipv6_cidrs_and_families_stay_apart():
    objects = cluster(policy("v6", "x", {"pod": "a"},
                             ingress=[{"from": [block("fd00::/64", "fd00::2:2/128")],
                                       "ports": [port(80, end=81)]}]))
    table = bridge(objects)
    xa = pod_ip("x/a", 6)
    assert table.allowed(pod_ip("y/a", 6), xa, "TCP", 81)
    assert not table.allowed(pod_ip("y/b", 6), xa, "TCP", 81)  # the except
    assert not table.allowed(pod_ip("y/a", 6), xa, "TCP", 82)
    assert not table.allowed(pod_ip("y/a"), pod_ip("x/a"), "TCP", 80)  # no IPv4 block


def test_a_v6_only_rule_on_v4_only_pods_installs_nothing():
    state = shaped_state(3, 0, (PortRule("TCP", 80),), cidrs=("fd00::/64",))
    assert rule_flows(pipeline_flows(state)) == []


# -- DNS intercept ------------------------------------------------------------------------------

def test_dns_intercept_sends_local_pods_queries_to_the_controller():
    objects = cluster(DENY_ALL)
    table = bridge(objects, dns_intercept=True)
    for family in (4, 6):
        query = FakeFlowTable.packet(pod_ip("x/a", family), e2e.EXTERNAL_V4 if family == 4
                                     else e2e.EXTERNAL_V6, "UDP", 53)
        assert table.process(query).outputs == (CONTROLLER,)
    # not a query from a local pod, or not UDP: the policy decides as before
    inbound = FakeFlowTable.packet(e2e.EXTERNAL_V4, pod_ip("y/a"), "UDP", 53)
    assert table.process(inbound).outputs == (NORMAL,)
    assert not table.allowed(pod_ip("x/a"), e2e.EXTERNAL_V4, "TCP", 53)
    assert table.allowed(pod_ip("y/a"), e2e.EXTERNAL_V4, "TCP", 53)
    without = bridge(objects)
    assert without.process(FakeFlowTable.packet(pod_ip("y/a"), e2e.EXTERNAL_V4, "UDP", 53)
                           ).outputs == (NORMAL,)
    assert not [f for f in pipeline_flows(node_state(engine_of(objects), "node-1"))
                if f.table == DNS_INTERCEPT]


def test_dns_intercept_catches_queries_in_any_conntrack_state_until_seen():
    objects = cluster(DENY_ALL)
    table = bridge(objects, dns_intercept=True, dns_meter=DNS_METER_ID)
    client, server = pod_ip("x/a"), e2e.EXTERNAL_V4
    for state in (CT_NEW, CT_EST, CT_REL, CT_EST | CT_RPL):
        outcome = table.process(FakeFlowTable.packet(client, server, "UDP", 53, ct_state=state))
        assert outcome.outputs == (CONTROLLER,), state  # a reused 5-tuple too
        assert outcome.path[-1].actions == (Meter(DNS_METER_ID), Output(CONTROLLER, 0xFFFF))
        assert not outcome.committed
    # invalid stays dropped
    assert table.process(FakeFlowTable.packet(client, server, "UDP", 53,
                                              ct_state=CT_INV)).dropped
    # a re-injected miss: policy decides (deny-all egress here), never the controller
    seen = {**FakeFlowTable.packet(client, server, "UDP", 53), "reg0": DNS_SEEN}
    assert table.process(seen).dropped
    allowing = bridge(cluster(), dns_intercept=True)
    outcome = allowing.process(seen)
    assert outcome.outputs == (NORMAL,) and outcome.committed
    established = {**seen, "ct_state": CT_EST}
    assert allowing.process(established).outputs == (NORMAL,)  # the fast path, as before
    # other pods' (non-local) established DNS keeps the fast path
    inbound = FakeFlowTable.packet(e2e.EXTERNAL_V4, pod_ip("y/a"), "UDP", 53, ct_state=CT_EST)
    assert [f.table for f in allowing.process(inbound).path] == [CLASSIFIER, CONNTRACK]


def test_dns_intercept_without_a_meter_still_sends_whole_packets():
    state = node_state(engine_of([one_node(o) for o in cluster()]), NODE)
    flows = pipeline_flows(state, dns_intercept=True)
    to_controller = [f for f in flows if f.table == DNS_INTERCEPT and f.priority > 0]
    assert {f.actions for f in to_controller} == {(Output(CONTROLLER, 0xFFFF),)}
    assert len(to_controller) == 2  # IPv4 and IPv6, whatever the pods
    steering = [f for f in flows if f.table == CONNTRACK and
                Goto(DNS_INTERCEPT) in f.actions]
    local = {str(ipaddress.ip_address(ip)) for pod in state.index.pods for ip in pod.ips}
    assert len(local) >= 6
    assert {dict(f.match).get("ipv4_src") or dict(f.match).get("ipv6_src")
            for f in steering} == local
    check_flows(flows)


@pytest.mark.parametrize("dns_meter", [None, DNS_METER_ID])
def test_incremental_pipeline_with_dns_intercept_equals_a_full_rebuild(dns_meter):
    targets = (("10.0.0.1", "x/t1", _http(80)), ("fd00::2", "x/t2", _http(8080)))
    states = [_cluster(PEERS, targets, local=("x/t1",)),
              _cluster(PEERS, targets, local=("x/t1", "x/t2")),
              _cluster(PEERS, targets, local=()),
              _cluster(PEERS, targets, local=("x/t2",))]
    incremental = IncrementalPipeline(dns_intercept=True, dns_meter=dns_meter)
    for state in states:
        before = dict(incremental.flows)
        changed = incremental.update(state)
        full = {f.identity: f for f in pipeline_flows(state, conjunction_ids=incremental.ids,
                                                      dns_intercept=True, dns_meter=dns_meter)}
        assert incremental.flows == full
        assert {i for i in before.keys() | full.keys() if before.get(i) != full.get(i)} \
            <= changed
        FakeFlowTable(full.values())


# -- conjunction ids ---------------------------------------------------------------------------

def _conj_ids(flows) -> set[int]:
    return {dict(f.match)["conj_id"] for f in flows if "conj_id" in dict(f.match)}


def test_conjunction_ids_stay_put_across_generations():
    ids = ConjunctionIds()
    first = [policy("a", "x", {"pod": "a"}, ingress=[{"from": [peer(pods={})],
                                                      "ports": [port(80)]}])]
    before = pipeline_flows(node_state(engine_of(cluster(*first)), "node-1"),
                            conjunction_ids=ids)
    more = first + [policy("b", "x", {"pod": "c"}, ingress=[{"ports": [port(81)]}])]
    after = pipeline_flows(node_state(engine_of(cluster(*more)), "node-1"),
                           conjunction_ids=ids)
    assert _conj_ids(before) < _conj_ids(after)
    assert set(before) <= set(after)  # nothing of the unchanged rule moved
    # a fresh allocator derives the same ids
    assert pipeline_flows(node_state(engine_of(cluster(*more)), "node-1")) == after


def test_conjunction_id_collisions_move_the_newcomer():
    ids = ConjunctionIds(space=3)
    keys = [("p", INGRESS, i, "ports") for i in range(3)]
    assigned = [ids.id_for(k) for k in keys]
    assert sorted(assigned) == [1, 2, 3]
    assert [ids.id_for(k) for k in reversed(keys)] == assigned[::-1]
    with pytest.raises(RuntimeError):
        ids.id_for(("p", INGRESS, 9, "ports"))
    ids.retain(keys[:1])
    assert ids.id_for(keys[0]) == assigned[0]
    assert ids.id_for(("p", EGRESS, 0, "all")) in {1, 2, 3} - {assigned[0]}


# -- the upstream e2e scenarios, through the pipeline ---------------------------------------------

@dataclass
class PipelineScript(e2e.Script):
    """
    The e2e scenario runner with the pipeline as the thing under test: after
    every change, every probe of the scenario's addresses goes through the
    fake bridge of the node(s) holding its ends and is compared with the oracle.
    """

    split: bool = False  # pods as the scenarios schedule them (a, c: node-1; b: node-2)
    ipv6_only: bool = False

    def _event(self, type_: str, obj: dict) -> None:
        if obj["kind"] == "Pod" and type_ != DELETED:
            obj = copy.deepcopy(obj)
            if not self.split:
                obj["spec"]["nodeName"] = NODE
            if self.ipv6_only:
                status = obj["status"]
                ips = [e["ip"] for e in status.get("podIPs") or ()] or [status.get("podIP")]
                ips = [ip for ip in ips if ip and ":" in ip]
                status.pop("podIP", None)
                status.pop("podIPs", None)
                if ips:
                    status["podIP"] = ips[0]
                    status["podIPs"] = [{"ip": ip} for ip in ips]
        super()._event(type_, obj)

    def _compare(self) -> None:
        if not self.dirty:
            return
        assert self.engine.errors == {}, self.engine.errors
        oracle = self.oracle()
        tables, node_of = {}, {}
        for node in sorted(self.engine.nodes()):
            state = node_state(self.engine, node)
            tables[node] = FakeFlowTable(pipeline_flows(state))
            for local in state.index.pods:
                for ip in local.ips:
                    node_of[str(ipaddress.ip_address(ip))] = node
        addresses = set()
        for (kind, _), obj in self.objects.items():
            if kind == "Pod":
                addresses.update(e["ip"] for e in obj["status"].get("podIPs") or ())
                if obj["status"].get("podIP"):
                    addresses.add(obj["status"]["podIP"])
        addresses = {str(ipaddress.ip_address(a)) for a in addresses}
        wrong = []
        for family, external in ((4, e2e.EXTERNAL_V4), (6, e2e.EXTERNAL_V6)):
            group = sorted(a for a in addresses if ipaddress.ip_address(a).version == family)
            group.append(external)
            for src in group:
                for dst in group:
                    # The bridge of each end's node sees the packet; with no pod
                    # at either end, any bridge will do.
                    on = {node_of[a] for a in (src, dst) if a in node_of} or set(tables)
                    for protocol in e2e.PROTOCOLS:
                        for number in e2e.PROBE_PORTS:
                            want = oracle.allowed(src, dst, protocol, number)
                            got = all(tables[n].allowed(src, dst, protocol, number)
                                      for n in on)
                            self.compared += 1
                            if got != want:
                                wrong.append((src, dst, protocol, number, want, got,
                                              oracle.verdict(src, dst, protocol, number)))
        self.dirty = False
        assert not wrong, (
            f"{len(wrong)} probes where the pipeline disagrees with the oracle; first ones "
            "(src, dst, proto, port, oracle, pipeline, oracle (egress, ingress)):\n"
            + "\n".join(map(repr, wrong[:12])))


def _run(name: str, **options) -> None:
    script = PipelineScript(compiled=True, **options)
    e2e.SCENARIOS[name](script)
    script._compare()
    assert script.compared > 0


@pytest.mark.parametrize("name", list(e2e.SCENARIOS))
def test_upstream_scenarios_on_one_bridge(name):
    _run(name)


# Pods split across two nodes: among them the scenarios whose egress named
# ports resolve on pods of the other node that no peer group names (no `to`,
# or an ipBlock), which the compiler's every-pod port group makes known.
@pytest.mark.parametrize("name", list(e2e.SCENARIOS))
def test_upstream_scenarios_across_two_nodes(name):
    _run(name, split=True)


@pytest.mark.parametrize("name", list(e2e.SCENARIOS))
def test_upstream_scenarios_ipv6_only(name):
    _run(name, ipv6_only=True)


class IncrementalScript(PipelineScript):
    """Every step of a scenario: the incremental pipeline equals a full rebuild."""

    dns_intercept = False
    dns_meter = None

    def _compare(self) -> None:
        if self.dirty:
            pipelines = self.__dict__.setdefault("pipelines", {})
            for node in sorted(self.engine.nodes()):
                state = node_state(self.engine, node)
                incremental = pipelines.setdefault(node, IncrementalPipeline(
                    dns_intercept=self.dns_intercept, dns_meter=self.dns_meter))
                before = dict(incremental.flows)
                changed = incremental.update(state)
                full = {flow.identity: flow
                        for flow in pipeline_flows(state, conjunction_ids=incremental.ids,
                                                   dns_intercept=self.dns_intercept,
                                                   dns_meter=self.dns_meter)}
                assert incremental.flows == full
                actually = {i for i in before.keys() | full.keys()
                            if before.get(i) != full.get(i)}
                assert actually <= changed
        super()._compare()


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("name", list(e2e.SCENARIOS))
def test_incremental_pipeline_equals_a_full_rebuild(name, split):
    script = IncrementalScript(compiled=True, split=split)
    e2e.SCENARIOS[name](script)
    script._compare()
    assert script.compared > 0


class DnsIncrementalScript(IncrementalScript):
    dns_intercept = True
    dns_meter = DNS_METER_ID


@pytest.mark.parametrize("name", list(e2e.SCENARIOS))
def test_incremental_pipeline_with_dns_intercept_equals_a_full_rebuild_in_scenarios(name):
    script = DnsIncrementalScript(compiled=True, split=True)
    e2e.SCENARIOS[name](script)
    IncrementalScript._compare(script)


# -- the incremental pipeline's caches, step by step against a full rebuild ------------------

def _steps(*states) -> IncrementalPipeline:
    """Each state in turn through one IncrementalPipeline, each compared with a full rebuild."""
    incremental = IncrementalPipeline()
    for state in states:
        before = dict(incremental.flows)
        changed = incremental.update(state)
        full = {f.identity: f for f in pipeline_flows(state, conjunction_ids=incremental.ids)}
        assert incremental.flows == full
        assert {i for i in before.keys() | full.keys() if before.get(i) != full.get(i)} <= changed
    return incremental


def _http(port: int) -> tuple:
    return (NamedPort("http", "TCP", port),)


def _group(name: str, members) -> Group:
    return Group(f"g.{name}", tuple(Member(ip, pod, ports) for ip, pod, ports in members))


def _policy(name: str, applied_to: str, *rules, types=(INGRESS,)) -> CompiledPolicy:
    return CompiledPolicy("x", name, applied_to, types, tuple(rules))


def _cluster(peers, targets=(("10.0.0.1", "x/t1", _http(80)),), local=("x/t1",),
             policies=None):
    """Three policies over one shared peer group, the third with a named port."""
    shared = _group("shared", peers)
    mine = _group("mine", targets)
    other = _group("other", [(v4(500), "y/o1", ())])
    policies = policies if policies is not None else [
        _policy("a", "g.mine", Rule(INGRESS, ("g.shared",), (), False, (PortRule("TCP", 80),))),
        _policy("b", "g.mine", Rule(INGRESS, ("g.shared", "g.other"), (), False, ()),
                Rule(INGRESS, ("g.other",), (), False, (PortRule("UDP", 53),))),
        _policy("c", "g.mine", Rule(INGRESS, ("g.shared",), (), False,
                                    (PortRule("TCP", name="http"),))),
        _policy("d", "g.mine", Rule(EGRESS, ("g.shared",), ("192.168.0.0/16",), False,
                                    (PortRule("TCP", name="http"),)), types=(EGRESS,)),
    ]
    pods = [LocalPod(pod, (ip,), ports) for ip, pod, ports in targets if pod in local]
    return state_by_hand(policies, [shared, mine, other], pods)


PEERS = [(v4(100 + i), f"y/p{i}", _http(8080)) for i in range(5)]


def test_incremental_group_used_by_several_policies_changes():
    incremental = _steps(_cluster(PEERS), _cluster(PEERS + [(v4(200), "y/new", _http(81))]),
                         _cluster(PEERS[1:]), _cluster([]), _cluster(PEERS))
    assert incremental.flows


def test_incremental_policy_changes_one_rule():
    base = _cluster(PEERS)
    policies = list(base.policies.values())
    changed = [p if p.name != "b" else _policy(
        "b", "g.mine", p.rules[0], Rule(INGRESS, ("g.other",), (), False, (PortRule("UDP", 54),)))
        for p in policies]
    _steps(base, _cluster(PEERS, policies=changed), base)


def test_incremental_local_pod_added_and_removed():
    targets = (("10.0.0.1", "x/t1", _http(80)), ("10.0.0.2", "x/t2", _http(8080)))
    _steps(_cluster(PEERS, targets, local=("x/t1",)),
           _cluster(PEERS, targets, local=("x/t1", "x/t2")),
           _cluster(PEERS, targets, local=("x/t2",)),
           _cluster(PEERS, targets, local=()),
           _cluster(PEERS, targets, local=("x/t1",)))


def test_incremental_named_port_resolves_differently():
    moved = [(ip, pod, _http(9090) if pod == "y/p0" else ports) for ip, pod, ports in PEERS]
    targets = (("10.0.0.1", "x/t1", _http(8081)),)
    _steps(_cluster(PEERS), _cluster(moved), _cluster(moved, targets), _cluster(PEERS))


def test_incremental_policies_come_and_go():
    full = _cluster(PEERS)
    few = _cluster(PEERS, policies=[p for p in full.policies.values() if p.name in "ac"])
    _steps(few, full, few, _cluster(PEERS, policies=[full.policies[min(full.policies)]]), full)


def test_incremental_conjunction_ids_follow_the_conjunctions():
    incremental = _steps(_cluster(PEERS))
    held = set(incremental.ids._by_key)
    _steps(_cluster(PEERS))  # a second pipeline of its own
    assert held == {key for key in incremental.ids._by_key}
    incremental.update(_cluster(PEERS, policies=[]))
    assert incremental.ids._by_key == {}
