"""
NetworkPolicy semantics, end to end through the compiler: small clusters are
fed to the engine and new connections judged by the Evaluator over the
compiled output. Plus the compiled form itself (groups, CIDRs, ports, ids).
"""

from __future__ import annotations

import pytest

from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event
from contiv.policy.compiler import compile_policy, merge_ip_blocks
from contiv.policy.engine import PolicyEngine
from contiv.policy.evaluate import Evaluator
from contiv.policy.model import IPBlock, parse_network_policy
from contiv.policy.types import EGRESS, INGRESS, GroupSelector, LabelSelector, PortRule

EXTERNAL = "192.168.5.5"
EXTERNAL6 = "2001:db8::5"


def namespace(name, **labels):
    return Event(ADDED, "Namespace", name, {"metadata": {"name": name, "labels": labels}})


def pod(key, ips, labels=None, node="n1", ports=(), phase="Running", host_network=False,
        event=ADDED):
    ns, name = key.split("/")
    ips = [ips] if isinstance(ips, str) else list(ips)
    return Event(event, "Pod", key, {
        "metadata": {"namespace": ns, "name": name, "labels": labels or {}},
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "containers": [{"name": "c", "ports": [
                     {"name": n, "containerPort": p, "protocol": proto}
                     for n, p, proto in ports]}]},
        "status": {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]},
    })


def policy(key, spec, event=ADDED):
    ns, name = key.split("/")
    return Event(event, "NetworkPolicy", key,
                 {"metadata": {"namespace": ns, "name": name}, "spec": spec})


# a: team=x, b: team=y, c: no labels
CLUSTER = [
    namespace("a", team="x"),
    namespace("b", team="y"),
    namespace("c"),
    pod("a/web", "10.0.1.1", {"app": "web"}, ports=[("http", 8080, "TCP"), ("dns", 53, "UDP")]),
    pod("a/db", "10.0.1.2", {"app": "db", "tier": "data"}, node="n2",
        ports=[("sql", 5432, "TCP")]),
    pod("a/client", "10.0.1.3", {"app": "client"}),
    pod("b/web", "10.0.2.1", {"app": "web"}, ports=[("http", 80, "TCP")]),
    pod("b/client", "10.0.2.3", {"app": "client", "tier": "front"}),
    pod("c/client", "10.0.3.3", {"app": "client"}),
]
IP = {"a/web": "10.0.1.1", "a/db": "10.0.1.2", "a/client": "10.0.1.3",
      "b/web": "10.0.2.1", "b/client": "10.0.2.3", "c/client": "10.0.3.3"}


def engine_of(*events):
    engine = PolicyEngine()
    for event in events:
        engine.apply(event)
    return engine


def evaluator(*policies, cluster=CLUSTER):
    engine = engine_of(*cluster, *policies)
    assert engine.errors == {}
    return Evaluator.from_engine(engine)


def allowed_sources(judge, dst, protocol="TCP", port=80):
    return {src for src in IP if src != dst and judge.allowed(IP[src], IP[dst], protocol, port)}


def only_ingress_to_db(peers, ports=None):
    rule = {"from": peers}
    if ports is not None:
        rule["ports"] = ports
    return policy("a/db-in", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [rule]})


# -- isolation


def test_without_policies_everything_is_allowed():
    judge = evaluator()
    verdict = judge.verdict(IP["a/web"], IP["b/web"], "TCP", 80)
    assert verdict.allowed
    assert (verdict.egress, verdict.ingress) == ("not isolated", "not isolated")


def test_ingress_policy_isolates_only_ingress_of_selected_pods():
    judge = evaluator(policy("a/deny", {"podSelector": {"matchLabels": {"app": "db"}}}))
    verdict = judge.verdict(IP["a/web"], IP["a/db"], "TCP", 5432)
    assert not verdict.allowed
    assert verdict.egress == "not isolated"
    assert verdict.ingress.startswith("denied: isolated by a.deny.")
    # The db pod itself may still open connections, and other pods still receive.
    assert judge.allowed(IP["a/db"], IP["a/web"], "TCP", 8080)
    assert judge.allowed(IP["a/client"], IP["a/web"], "TCP", 8080)


def test_egress_only_policy_does_not_isolate_ingress():
    judge = evaluator(policy("a/no-egress", {"podSelector": {"matchLabels": {"app": "db"}},
                                             "policyTypes": ["Egress"]}))
    assert not judge.allowed(IP["a/db"], IP["a/web"], "TCP", 8080)
    assert judge.verdict(IP["a/db"], IP["a/web"], "TCP", 8080).egress.startswith(
        "denied: isolated by a.no-egress.")
    assert judge.allowed(IP["a/web"], IP["a/db"], "TCP", 5432)


def test_policy_types_egress_ignores_ingress_rules():
    judge = evaluator(policy("a/p", {"podSelector": {"matchLabels": {"app": "db"}},
                                     "policyTypes": ["Egress"],
                                     "ingress": [{"from": [{"podSelector": {}}]}],
                                     "egress": [{}]}))
    assert judge.allowed(IP["c/client"], IP["a/db"], "TCP", 5432)
    assert judge.verdict(IP["c/client"], IP["a/db"], "TCP", 5432).ingress == "not isolated"


def test_empty_egress_list_does_not_add_egress_type():
    judge = evaluator(policy("a/p", {"podSelector": {}, "egress": []}))
    # Ingress only (the default): pods of a receive nothing but send anywhere.
    assert judge.allowed(IP["a/web"], IP["b/web"], "TCP", 80)
    assert not judge.allowed(IP["b/web"], IP["a/web"], "TCP", 8080)


def test_empty_ingress_list_isolates_with_no_allows():
    judge = evaluator(policy("a/p", {"podSelector": {}, "ingress": []}))
    assert allowed_sources(judge, "a/web") == set()
    assert allowed_sources(judge, "a/db") == set()
    assert allowed_sources(judge, "b/web") == set(IP) - {"b/web"}


def test_connection_needs_source_egress_and_destination_ingress():
    egress = policy("a/web-out", {"podSelector": {"matchLabels": {"app": "web"}},
                                  "policyTypes": ["Egress"],
                                  "egress": [{"to": [{"podSelector": {"matchLabels":
                                                                      {"app": "db"}}}]}]})
    ingress = policy("a/db-in", {"podSelector": {"matchLabels": {"app": "db"}},
                                 "ingress": [{"from": [{"podSelector": {"matchLabels":
                                                                        {"app": "client"}}}]}]})
    judge = evaluator(egress, ingress)
    verdict = judge.verdict(IP["a/web"], IP["a/db"], "TCP", 5432)
    assert not verdict.allowed
    assert verdict.egress.startswith("allowed by a.web-out.") and verdict.egress.endswith(" rule 0")
    assert verdict.ingress.startswith("denied: isolated by a.db-in.")
    # web may only talk to db; client may talk to db.
    assert not judge.allowed(IP["a/web"], IP["a/client"], "TCP", 80)
    assert judge.allowed(IP["a/client"], IP["a/db"], "TCP", 5432)


def test_allowed_is_the_union_over_policies():
    from_web = only_ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}])
    clients = {"podSelector": {"matchLabels": {"app": "client"}}}
    from_client = policy("a/db-in-2", {"podSelector": {"matchLabels": {"tier": "data"}},
                                       "ingress": [{"from": [clients]}]})
    judge = evaluator(from_web, from_client)
    assert allowed_sources(judge, "a/db") == {"a/web", "a/client"}
    denied = judge.verdict(IP["b/web"], IP["a/db"], "TCP", 80).ingress
    assert denied.startswith("denied: isolated by a.db-in-2.")
    assert ", a.db-in." in denied
    assert judge.verdict(IP["a/client"], IP["a/db"], "TCP", 80).ingress.startswith(
        "allowed by a.db-in-2.")


def test_rule_index_counts_within_the_direction():
    judge = evaluator(policy("a/p", {
        "podSelector": {"matchLabels": {"app": "db"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]},
                    {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
        "egress": [{"ports": [{"port": 1}]}, {"to": [{"namespaceSelector": {}}]}],
    }))
    assert judge.verdict(IP["a/client"], IP["a/db"], "TCP", 1).ingress.endswith(" rule 1")
    assert judge.verdict(IP["a/db"], IP["b/web"], "TCP", 2).egress.endswith(" rule 1")
    assert judge.verdict(IP["a/db"], EXTERNAL, "TCP", 1).egress.endswith(" rule 0")


# -- peers


def test_pod_selector_peer_selects_in_the_policy_namespace_only():
    judge = evaluator(only_ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}]))
    assert allowed_sources(judge, "a/db") == {"a/web"}


def test_empty_pod_selector_peer_is_every_pod_of_the_namespace():
    judge = evaluator(only_ingress_to_db([{"podSelector": {}}]))
    assert allowed_sources(judge, "a/db") == {"a/web", "a/client"}


def test_namespace_selector_peer_is_every_pod_of_matching_namespaces():
    judge = evaluator(only_ingress_to_db([{"namespaceSelector": {"matchLabels": {"team": "y"}}}]))
    assert allowed_sources(judge, "a/db") == {"b/web", "b/client"}


def test_empty_namespace_selector_is_every_namespace():
    judge = evaluator(only_ingress_to_db([{"namespaceSelector": {}}]))
    assert allowed_sources(judge, "a/db") == set(IP) - {"a/db"}


def test_namespace_selector_by_name_label():
    judge = evaluator(only_ingress_to_db([{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "c"}}}]))
    assert allowed_sources(judge, "a/db") == {"c/client"}


def test_both_selectors_in_one_peer_are_anded():
    judge = evaluator(only_ingress_to_db([{
        "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
        "podSelector": {"matchLabels": {"app": "client"}}}]))
    assert allowed_sources(judge, "a/db") == {"a/client", "b/client"}


def test_several_peers_are_ored():
    judge = evaluator(only_ingress_to_db([
        {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}},
        {"podSelector": {"matchLabels": {"app": "client"}}}]))
    # namespaces a and b, or clients of a (the policy's namespace): c/client is neither.
    assert allowed_sources(judge, "a/db") == {"a/web", "a/client", "b/web", "b/client"}


@pytest.mark.parametrize("expression,sources", [
    ({"key": "app", "operator": "In", "values": ["web", "client"]},
     {"a/web", "a/client", "b/web", "b/client", "c/client"}),
    ({"key": "app", "operator": "NotIn", "values": ["web"]}, {"a/client", "b/client", "c/client"}),
    # NotIn matches pods without the key.
    ({"key": "tier", "operator": "NotIn", "values": ["front"]},
     {"a/web", "a/client", "b/web", "c/client"}),
    ({"key": "tier", "operator": "Exists"}, {"b/client"}),
    ({"key": "tier", "operator": "DoesNotExist"}, {"a/web", "a/client", "b/web", "c/client"}),
])
def test_match_expression_operators(expression, sources):
    judge = evaluator(only_ingress_to_db([
        {"namespaceSelector": {}, "podSelector": {"matchExpressions": [expression]}}]))
    assert allowed_sources(judge, "a/db") == sources


def test_applied_to_uses_match_expressions():
    judge = evaluator(policy("a/p", {"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "NotIn", "values": ["db"]}]}}))
    assert allowed_sources(judge, "a/db") == set(IP) - {"a/db"}
    assert allowed_sources(judge, "a/web") == set()
    assert allowed_sources(judge, "a/client") == set()


# -- ipBlock


def test_ip_block_with_except_ipv4():
    judge = evaluator(only_ingress_to_db([{"ipBlock": {"cidr": "10.0.0.0/16",
                                                       "except": ["10.0.2.0/24"]}}]))
    # ipBlock matches pod addresses too.
    assert allowed_sources(judge, "a/db") == {"a/web", "a/client", "c/client"}
    assert not judge.allowed(EXTERNAL, IP["a/db"], "TCP", 5432)
    assert judge.verdict(EXTERNAL, IP["a/db"], "TCP", 5432).egress == "not a pod"


def test_ip_block_with_except_ipv6_and_external_sources():
    judge = evaluator(only_ingress_to_db([
        {"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8::/64"]}},
        {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.5.0/24", "192.168.6.0/24"]}},
    ]))
    assert judge.allowed("2001:db8:0:1::9", IP["a/db"], "TCP", 5432)
    assert not judge.allowed(EXTERNAL6, IP["a/db"], "TCP", 5432)
    assert judge.allowed("192.168.7.1", IP["a/db"], "TCP", 5432)
    assert not judge.allowed(EXTERNAL, IP["a/db"], "TCP", 5432)
    assert not judge.allowed("192.168.6.200", IP["a/db"], "TCP", 5432)
    assert allowed_sources(judge, "a/db") == set()


def test_egress_to_ip_block():
    outside = {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}
    judge = evaluator(policy("a/out", {"podSelector": {}, "policyTypes": ["Egress"],
                                       "egress": [{"to": [outside]}]}))
    assert judge.allowed(IP["a/web"], EXTERNAL, "TCP", 443)
    assert not judge.allowed(IP["a/web"], IP["b/web"], "TCP", 80)
    assert not judge.allowed(IP["a/web"], EXTERNAL6, "TCP", 443)
    assert judge.verdict(IP["a/web"], EXTERNAL, "TCP", 443).ingress == "not a pod"


def test_ip_blocks_of_a_rule_are_merged():
    assert merge_ip_blocks([
        IPBlock("10.0.0.0/8", ("10.1.0.0/16",)),
        IPBlock("10.1.2.0/24"),
        IPBlock("fd00::/8", ("fd00::/9",)),
        IPBlock("11.0.0.0/8"),
        IPBlock("192.168.0.0/24", ("192.168.0.0/25",)),
        IPBlock("192.168.0.0/24", ("192.168.0.128/25",)),
    ]) == ("10.0.0.0/16", "10.1.2.0/24", "10.2.0.0/15", "10.4.0.0/14", "10.8.0.0/13",
           "10.16.0.0/12", "10.32.0.0/11", "10.64.0.0/10", "10.128.0.0/9", "11.0.0.0/8",
           "192.168.0.0/24", "fd80::/9")


def test_another_block_can_fill_an_except():
    assert merge_ip_blocks([IPBlock("10.0.0.0/8", ("10.1.0.0/16", "10.1.2.0/24")),
                            IPBlock("10.0.0.0/9")]) == ("10.0.0.0/8",)


def test_nested_excepts():
    assert merge_ip_blocks([IPBlock("10.0.0.0/8", ("10.0.0.0/9", "10.0.0.0/10"))]) == (
        "10.128.0.0/9",)


# -- ports


@pytest.mark.parametrize("ports,accepted,refused", [
    ([{"port": 5432}], [("TCP", 5432)], [("TCP", 5433), ("UDP", 5432)]),
    ([{"port": 5000, "endPort": 5500}], [("TCP", 5000), ("TCP", 5432), ("TCP", 5500)],
     [("TCP", 4999), ("TCP", 5501), ("UDP", 5432)]),
    ([{"port": 53, "protocol": "UDP"}], [("UDP", 53)], [("TCP", 53), ("SCTP", 53)]),
    ([{"port": 9, "protocol": "SCTP"}], [("SCTP", 9)], [("TCP", 9)]),
    ([{"protocol": "UDP"}], [("UDP", 1), ("UDP", 65535)], [("TCP", 1)]),
    ([{}], [("TCP", 1), ("TCP", 65535)], [("UDP", 1), ("SCTP", 1)]),
    ([], [("TCP", 1), ("UDP", 2), ("SCTP", 3)], []),
    (None, [("TCP", 1), ("UDP", 2), ("SCTP", 3)], []),
    ([{"port": 1}, {"port": 3, "protocol": "UDP"}], [("TCP", 1), ("UDP", 3)],
     [("TCP", 3), ("UDP", 1)]),
])
def test_ports(ports, accepted, refused):
    judge = evaluator(only_ingress_to_db([{"podSelector": {}}], ports))
    for protocol, port in accepted:
        assert judge.allowed(IP["a/web"], IP["a/db"], protocol, port), (protocol, port)
    for protocol, port in refused:
        assert not judge.allowed(IP["a/web"], IP["a/db"], protocol, port), (protocol, port)


def test_named_port_is_resolved_per_destination_pod():
    judge = evaluator(policy("a/out", {
        "podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "http"}]}]}))
    src = IP["a/client"]
    assert judge.allowed(src, IP["a/web"], "TCP", 8080)
    assert not judge.allowed(src, IP["a/web"], "TCP", 80)
    assert judge.allowed(src, IP["b/web"], "TCP", 80)
    assert not judge.allowed(src, IP["b/web"], "TCP", 8080)
    # A destination without the name, and a non-pod destination, never match.
    assert not judge.allowed(src, IP["a/db"], "TCP", 8080)
    assert not judge.allowed(src, EXTERNAL, "TCP", 80)


def test_named_port_needs_the_protocol_it_was_declared_with():
    judge = evaluator(only_ingress_to_db([{"podSelector": {}}],
                                         [{"port": "sql", "protocol": "UDP"}]))
    assert not judge.allowed(IP["a/web"], IP["a/db"], "UDP", 5432)
    assert not judge.allowed(IP["a/web"], IP["a/db"], "TCP", 5432)
    judge = evaluator(policy("a/web-in", {"podSelector": {"matchLabels": {"app": "web"}},
                                          "ingress": [{"ports": [{"port": "dns",
                                                                  "protocol": "UDP"}]}]}))
    assert judge.allowed(IP["a/client"], IP["a/web"], "UDP", 53)
    assert not judge.allowed(IP["a/client"], IP["a/web"], "TCP", 53)


def test_named_port_on_ingress_with_ip_block_peer():
    judge = evaluator(only_ingress_to_db([{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                                         [{"port": "sql"}]))
    assert judge.allowed(EXTERNAL, IP["a/db"], "TCP", 5432)
    assert not judge.allowed(EXTERNAL, IP["a/db"], "TCP", 5433)


# -- rules without peers


def test_rule_without_peers_allows_every_peer():
    judge = evaluator(policy("a/p", {"podSelector": {}, "ingress": [{}]}))
    assert allowed_sources(judge, "a/db") == set(IP) - {"a/db"}
    assert judge.allowed(EXTERNAL, IP["a/db"], "SCTP", 7)


# -- which pods take part


def test_host_network_pods_are_neither_targets_nor_peers():
    cluster = CLUSTER + [pod("a/agent", "172.16.0.1", {"app": "web"}, host_network=True)]
    judge = evaluator(policy("a/p", {"podSelector": {}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}), cluster=cluster)
    verdict = judge.verdict(IP["a/client"], "172.16.0.1", "TCP", 80)
    assert verdict.allowed
    assert verdict.ingress == "not a pod"
    # Selected by app=web, but its address is the node's: not a peer.
    assert not judge.allowed("172.16.0.1", IP["a/db"], "TCP", 80)
    assert judge.allowed(IP["a/web"], IP["a/db"], "TCP", 80)


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_leave_their_address_to_the_next_pod(phase):
    cluster = CLUSTER + [
        pod("a/old", "10.0.1.9", {"app": "web"}, phase=phase),
        pod("a/new", "10.0.1.9", {"app": "other"}),
    ]
    judge = evaluator(only_ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}]),
                      policy("a/new-in", {"podSelector": {"matchLabels": {"app": "other"}}}),
                      cluster=cluster)
    assert not judge.allowed("10.0.1.9", IP["a/db"], "TCP", 5432)
    # The address is the new pod's, isolated by its own policy.
    assert not judge.allowed(IP["a/web"], "10.0.1.9", "TCP", 80)


def test_finished_pod_alone_is_not_selected():
    cluster = CLUSTER + [pod("a/done", "10.0.1.9", {"app": "web"}, phase="Succeeded")]
    judge = evaluator(only_ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}]),
                      policy("a/all", {"podSelector": {}}), cluster=cluster)
    assert not judge.allowed("10.0.1.9", IP["a/db"], "TCP", 5432)
    assert judge.verdict(IP["a/web"], "10.0.1.9", "TCP", 80).ingress == "not a pod"


def test_pod_without_ip_is_in_no_group():
    engine = engine_of(*CLUSTER, pod("a/pending", [], {"app": "web"}),
                       only_ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}]))
    members = {m.pod for g in engine.groups.values() for m in g.members}
    assert "a/pending" not in members


def test_dual_stack_pods_contribute_every_address():
    cluster = CLUSTER + [pod("a/dual", ["10.0.1.7", "fd00::7"], {"app": "web"})]
    judge = evaluator(only_ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}]),
                      policy("a/dual-in", {"podSelector": {"matchLabels": {"app": "web"}},
                                           "ingress": []}),
                      cluster=cluster)
    assert judge.allowed("10.0.1.7", IP["a/db"], "TCP", 5432)
    assert judge.allowed("fd00::7", IP["a/db"], "TCP", 5432)
    assert judge.allowed("fd00:0::0007", IP["a/db"], "TCP", 5432)
    assert not judge.allowed(IP["a/client"], "fd00::7", "TCP", 80)
    assert not judge.allowed(IP["a/client"], "10.0.1.7", "TCP", 80)


# -- bad objects


def test_bad_update_keeps_the_previous_version_and_others_unaffected():
    good = only_ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}])
    other = policy("a/web-in", {"podSelector": {"matchLabels": {"app": "web"}},
                                "ingress": [{"from": [{"podSelector": {}}]}]})
    engine = engine_of(*CLUSTER, good, other)
    before = dict(engine.policies)
    bad = only_ingress_to_db([{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8",
                                                                  "except": ["10.0.0.0/33"]}}])
    engine.apply(Event(MODIFIED, bad.kind, bad.key, bad.object))
    assert engine.errors == {"NetworkPolicy a/db-in": (
        "NetworkPolicy a/db-in: spec.ingress[0].from[1].ipBlock.except[0]: "
        "'10.0.0.0/33' is not a CIDR")}
    assert dict(engine.policies) == before
    judge = Evaluator.from_engine(engine)
    assert allowed_sources(judge, "a/db") == {"a/web"}
    assert allowed_sources(judge, "a/web") == {"a/db", "a/client"}
    # Fixed: the error goes and the new version applies.
    fixed = only_ingress_to_db([{"podSelector": {}}])
    engine.apply(Event(MODIFIED, fixed.kind, fixed.key, fixed.object))
    assert engine.errors == {}
    assert allowed_sources(Evaluator.from_engine(engine), "a/db") == {"a/web", "a/client"}


def test_bad_new_policy_is_not_in_force_and_its_deletion_clears_the_error():
    bad = policy("a/bad", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})
    engine = engine_of(*CLUSTER, bad)
    assert engine.errors == {"NetworkPolicy a/bad": (
        "NetworkPolicy a/bad: spec.ingress[0].ports[0].port: 0 is out of range (must be 1..65535)")}
    assert dict(engine.policies) == {}
    engine.apply(Event(DELETED, bad.kind, bad.key, bad.object))
    assert engine.errors == {}


def test_bad_pod_update_keeps_the_previous_pod():
    engine = engine_of(*CLUSTER, only_ingress_to_db([{"podSelector": {"matchLabels":
                                                                      {"app": "web"}}}]))
    bad = pod("a/web", "10.0.1.300", {"app": "other"}, event=MODIFIED)
    engine.apply(bad)
    assert engine.errors == {"Pod a/web": "Pod a/web: status.podIPs[0].ip: "
                                          "'10.0.1.300' is not an IP address"}
    assert allowed_sources(Evaluator.from_engine(engine), "a/db") == {"a/web"}


def test_bad_namespace_update_keeps_the_previous_labels():
    engine = engine_of(*CLUSTER, only_ingress_to_db([{"namespaceSelector": {"matchLabels":
                                                                            {"team": "y"}}}]))
    engine.apply(Event(MODIFIED, "Namespace", "b", {"metadata": {"name": "b",
                                                                 "labels": {"team": ["y"]}}}))
    assert list(engine.errors) == ["Namespace b"]
    assert allowed_sources(Evaluator.from_engine(engine), "a/db") == {"b/web", "b/client"}


# -- the compiled form


def compiled(spec, namespace="a", name="p"):
    return compile_policy(parse_network_policy(
        {"metadata": {"namespace": namespace, "name": name}, "spec": spec}))


WEB = LabelSelector((("app", "web"),))
TEAM = LabelSelector((("team", "x"),))


def test_groups_of_applied_to_and_peers():
    result, selectors = compiled({
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                              {"podSelector": {}},
                              {"namespaceSelector": {"matchLabels": {"team": "x"}}},
                              {"namespaceSelector": {"matchLabels": {"team": "x"}},
                               "podSelector": {}},
                              {"namespaceSelector": {"matchLabels": {"team": "x"}},
                               "podSelector": {"matchLabels": {"app": "web"}}}]}]})
    applied = GroupSelector("a", None, WEB)
    expected = {applied, GroupSelector("a", None, LabelSelector()),
                GroupSelector(None, TEAM, None), GroupSelector(None, TEAM, WEB)}
    assert set(selectors) == expected
    assert [s.id for s in selectors] == sorted(s.id for s in expected)
    assert result.applied_to == applied.id
    # The applied-to group doubles as the app=web peer group.
    assert result.rules[0].peer_groups == tuple(sorted(s.id for s in expected))
    assert result.group_ids() == tuple(sorted(s.id for s in expected))
    assert not result.rules[0].any_peer


def test_rules_of_directions_outside_types_are_dropped():
    result, _ = compiled({"policyTypes": ["Egress"], "ingress": [{}], "egress": [{}, {}]})
    assert result.types == (EGRESS,)
    assert [r.direction for r in result.rules] == [EGRESS, EGRESS]
    result, _ = compiled({"ingress": [{}], "egress": [{}]})
    assert result.types == (EGRESS, INGRESS)
    assert [r.direction for r in result.rules] == [INGRESS, EGRESS]


def test_ports_are_sorted_and_distinct():
    result, _ = compiled({"ingress": [{"ports": [
        {"port": "http"}, {"port": 80, "protocol": "UDP"}, {"port": 80},
        {"port": 80}, {"port": 70, "endPort": 90}, {"protocol": "SCTP"}]}]})
    assert result.rules[0].ports == (
        PortRule("SCTP"), PortRule("TCP", name="http"), PortRule("TCP", 70, 90),
        PortRule("TCP", 80), PortRule("UDP", 80))


def test_policy_id_depends_on_meaning_not_spelling():
    one, _ = compiled({"podSelector": {"matchLabels": {"b": "2", "a": "1"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1/8"}},
                                             {"podSelector": {}}],
                                    "ports": [{"port": 2}, {"port": 1, "protocol": "TCP"}]}]})
    other, _ = compiled({"podSelector": {"matchLabels": {"a": "1", "b": "2"}},
                         "policyTypes": ["Ingress"],
                         "ingress": [{"from": [{"podSelector": {}},
                                               {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                      "ports": [{"port": 1}, {"port": 2}]}]})
    assert one.id == other.id
    assert one.id.startswith("a.p.")
    changed, _ = compiled({"podSelector": {"matchLabels": {"a": "1", "b": "2"}},
                           "ingress": [{"ports": [{"port": 1}, {"port": 2}]}]})
    assert changed.id != one.id


def test_rule_without_peers_has_any_peer_and_nothing_else():
    result, selectors = compiled({"ingress": [{"from": []}]})
    rule = result.rules[0]
    assert (rule.any_peer, rule.peer_groups, rule.cidrs, rule.ports) == (True, (), (), ())
    assert [s.id for s in selectors] == [result.applied_to]


def test_compiled_policy_round_trips_through_json():
    result, _ = compiled({"podSelector": {}, "egress": [
        {"to": [{"ipBlock": {"cidr": "fd00::/8", "except": ["fd00::/12"]}}],
         "ports": [{"port": 80, "endPort": 90}, {"port": "dns", "protocol": "UDP"}]}]})
    assert type(result).from_json(result.to_json()) == result
    assert result.rules[0].cidrs == ("fd10::/12", "fd20::/11", "fd40::/10", "fd80::/9")


def _egress_rule(to, ports):
    from contiv.policy.compiler import compile_policy
    from contiv.policy.model import parse_network_policy

    compiled, selectors = compile_policy(parse_network_policy({
        "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                 "egress": [{**({"to": to} if to is not None else {}), "ports": ports}]}}))
    (rule,) = compiled.rules
    return compiled, selectors, rule


def test_egress_named_port_without_peer_groups_gets_every_pods_ports():
    from contiv.policy.types import GroupSelector, LabelSelector

    every_pod = GroupSelector(None, LabelSelector(), None).id
    for to in (None, [{"ipBlock": {"cidr": "10.0.0.0/8"}}]):
        compiled, selectors, rule = _egress_rule(to, [{"port": "http"}])
        assert rule.port_groups == (every_pod,)
        assert every_pod in compiled.group_ids()
        assert every_pod in {s.id for s in selectors}
        assert every_pod not in rule.peer_groups  # ports only, never peers
    # Peer groups carry their members' ports; numbered ports need none.
    assert _egress_rule([{"podSelector": {}}], [{"port": "http"}])[2].port_groups == ()
    assert _egress_rule(None, [{"port": 80}])[2].port_groups == ()
