"""Parsing Namespaces, Pods and NetworkPolicies, and every way they are rejected."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from contiv.policy.model import (
    NAMESPACE_NAME_LABEL,
    IPBlock,
    Peer,
    PolicyRule,
    ValidationError,
    parse_namespace,
    parse_network_policy,
    parse_pod,
)
from contiv.policy.types import EGRESS, INGRESS, LabelSelector, NamedPort, PortRule, Requirement

FIXTURES = Path(__file__).resolve().parents[1] / "support" / "fixtures"


def pod_json(**changes):
    raw = {
        "metadata": {"namespace": "shop", "name": "web-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [
            {"name": "nginx", "ports": [{"name": "http", "containerPort": 80},
                                        {"containerPort": 9090},
                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            {"name": "sidecar", "ports": [{"name": "admin", "containerPort": 8081,
                                           "protocol": "TCP"}]},
        ]},
        "status": {"phase": "Running", "podIP": "10.1.0.5",
                   "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00:0:0::0005"}]},
    }
    for path, value in changes.items():
        target = raw
        *parents, last = path.split("__")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return raw


def policy_json(spec, name="web", namespace="default"):
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


# -- Namespace


def test_namespace_has_its_labels_and_the_name_label_the_api_server_sets():
    namespace = parse_namespace({"metadata": {"name": "shop", "labels": {"team": "x"}}})
    assert namespace.name == "shop"
    assert namespace.labels == {"team": "x", NAMESPACE_NAME_LABEL: "shop"}


def test_namespace_name_label_cannot_be_forged():
    namespace = parse_namespace({"metadata": {"name": "shop",
                                              "labels": {NAMESPACE_NAME_LABEL: "other"}}})
    assert namespace.labels == {NAMESPACE_NAME_LABEL: "shop"}


def test_namespace_label_value_must_be_a_string():
    with pytest.raises(ValidationError) as raised:
        parse_namespace({"metadata": {"name": "shop", "labels": {"team": 5}}})
    assert str(raised.value) == ("Namespace shop: metadata.labels.team: "
                                 "must be a string, got an integer")


# -- Pod


def test_pod_fields():
    pod = parse_pod(pod_json())
    assert (pod.namespace, pod.name, pod.key) == ("shop", "web-1", "shop/web-1")
    assert pod.labels == {"app": "web"}
    assert pod.node == "node-1"
    assert pod.phase == "Running"
    assert not pod.host_network
    assert pod.in_groups


def test_pod_ips_are_every_pod_ip_normalised_in_order():
    assert parse_pod(pod_json()).ips == ("10.1.0.5", "fd00::5")


def test_pod_ip_is_the_fallback_without_pod_ips():
    raw = pod_json(status__podIPs=None)
    assert parse_pod(raw).ips == ("10.1.0.5",)


def test_pod_without_ip_has_none_and_is_in_no_group():
    pod = parse_pod(pod_json(status={"phase": "Pending"}))
    assert pod.ips == ()
    assert not pod.in_groups


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_in_no_group(phase):
    assert not parse_pod(pod_json(status__phase=phase)).in_groups


def test_host_network_pods_are_in_no_group():
    pod = parse_pod(pod_json(spec__hostNetwork=True))
    assert pod.host_network
    assert not pod.in_groups


def test_named_ports_of_all_containers_sorted_unnamed_left_out():
    assert parse_pod(pod_json()).named_ports == (
        NamedPort("admin", "TCP", 8081),
        NamedPort("dns", "UDP", 53),
        NamedPort("http", "TCP", 80),
    )


def test_pod_without_namespace_is_in_default_and_unscheduled_has_no_node():
    raw = pod_json(spec={})
    del raw["metadata"]["namespace"]
    pod = parse_pod(raw)
    assert pod.key == "default/web-1"
    assert pod.node is None
    assert pod.named_ports == ()


POD_ERRORS = [
    ({"metadata__labels": ["app"]}, "metadata.labels", "must be a mapping, got a list"),
    ({"spec__nodeName": 3}, "spec.nodeName", "must be a string, got an integer"),
    ({"spec__hostNetwork": "yes"}, "spec.hostNetwork", "must be a boolean, got a string"),
    ({"spec__containers": {}}, "spec.containers", "must be a list, got a mapping"),
    ({"spec__containers": [{"ports": [{"containerPort": 0}]}]},
     "spec.containers[0].ports[0].containerPort", "0 is out of range (must be 1..65535)"),
    ({"spec__containers": [{"ports": [{"containerPort": "80"}]}]},
     "spec.containers[0].ports[0].containerPort", "must be an integer, got a string"),
    ({"spec__containers": [{"ports": [{"containerPort": 80, "protocol": "ICMP"}]}]},
     "spec.containers[0].ports[0].protocol",
     "unsupported protocol 'ICMP' (must be TCP, UDP or SCTP)"),
    ({"status__podIPs": [{"ip": "10.1.0.300"}]}, "status.podIPs[0].ip",
     "'10.1.0.300' is not an IP address"),
    ({"status__podIPs": None, "status__podIP": "nope"}, "status.podIP",
     "'nope' is not an IP address"),
    ({"status__phase": 1}, "status.phase", "must be a string, got an integer"),
]


@pytest.mark.parametrize("changes,field,problem", POD_ERRORS)
def test_pod_errors_name_the_field(changes, field, problem):
    with pytest.raises(ValidationError) as raised:
        parse_pod(pod_json(**changes))
    assert (raised.value.kind, raised.value.key) == ("Pod", "shop/web-1")
    assert (raised.value.field, raised.value.problem) == (field, problem)
    assert str(raised.value) == f"Pod shop/web-1: {field}: {problem}"


@pytest.mark.parametrize("raw,field,problem", [
    ([], "(object)", "must be a mapping, got a list"),
    ({}, "metadata", "must be a mapping, got null"),
    ({"metadata": {}}, "metadata.name", "must be a string, got null"),
    ({"metadata": {"name": ""}}, "metadata.name", "must not be empty"),
])
def test_objects_without_a_name(raw, field, problem):
    with pytest.raises(ValidationError) as raised:
        parse_pod(raw)
    assert str(raised.value) == f"Pod <unnamed>: {field}: {problem}"


# -- NetworkPolicy


def test_fixture_policy():
    raw = json.loads((FIXTURES / "networkpolicy.json").read_text())
    policy = parse_network_policy(raw)
    assert policy.key == "shop/db-from-web"
    assert policy.pod_selector == LabelSelector((("app", "db"),))
    assert policy.types == (INGRESS,)
    assert policy.ingress == (
        PolicyRule(peers=(Peer(pod_selector=LabelSelector((("app", "web"),))),),
                   ports=(PortRule("TCP", 5432),)),
    )
    assert policy.egress == ()


@pytest.mark.parametrize("spec,types", [
    ({}, (INGRESS,)),
    ({"ingress": [{}]}, (INGRESS,)),
    ({"egress": [{}]}, (EGRESS, INGRESS)),
    # The API server's defaulting counts egress rules, not the field's presence.
    ({"egress": []}, (INGRESS,)),
    ({"policyTypes": [], "egress": [{}]}, (EGRESS, INGRESS)),
    ({"policyTypes": ["Egress"], "ingress": [{}]}, (EGRESS,)),
    ({"policyTypes": ["Ingress", "Egress"]}, (EGRESS, INGRESS)),
    ({"policyTypes": ["Ingress", "Ingress"]}, (INGRESS,)),
])
def test_policy_types_defaulting(spec, types):
    assert parse_network_policy(policy_json(spec)).types == types


def test_absent_spec_and_selector_select_every_pod():
    policy = parse_network_policy({"metadata": {"name": "deny", "namespace": "x"}})
    assert policy.pod_selector == LabelSelector()
    assert policy.types == (INGRESS,)
    assert policy.ingress == policy.egress == ()


def test_rules_keep_both_directions_and_their_order():
    policy = parse_network_policy(policy_json({
        "policyTypes": ["Egress"],
        "ingress": [{"ports": [{"port": 1}]}],
        "egress": [{"ports": [{"port": 2}]}, {"ports": [{"port": 3}]}],
    }))
    assert [r.ports[0].port for r in policy.ingress] == [1]
    assert [r.ports[0].port for r in policy.egress] == [2, 3]


def test_peers():
    policy = parse_network_policy(policy_json({"ingress": [{"from": [
        {"podSelector": {"matchLabels": {"app": "a"}}},
        {"namespaceSelector": {}},
        {"namespaceSelector": {"matchLabels": {"team": "x"}},
         "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}},
        {"ipBlock": {"cidr": "10.0.0.7/8", "except": ["10.1.0.0/16"]}},
    ]}]}))
    assert policy.ingress[0].peers == (
        Peer(pod_selector=LabelSelector((("app", "a"),))),
        Peer(namespace_selector=LabelSelector()),
        Peer(pod_selector=LabelSelector((), (Requirement("tier", "Exists"),)),
             namespace_selector=LabelSelector((("team", "x"),))),
        # Host bits are allowed in a CIDR, as Kubernetes allows them, and cleared.
        Peer(ip_block=IPBlock("10.0.0.0/8", ("10.1.0.0/16",))),
    )


def test_empty_from_and_null_rule_mean_every_peer():
    policy = parse_network_policy(policy_json({"ingress": [{"from": []}, None]}))
    assert policy.ingress == (PolicyRule((), ()), PolicyRule((), ()))


def test_ipv6_block():
    policy = parse_network_policy(policy_json({"egress": [{"to": [
        {"ipBlock": {"cidr": "FD00::/8", "except": ["fd00:0::/16"]}}]}]}))
    assert policy.egress[0].peers[0].ip_block == IPBlock("fd00::/8", ("fd00::/16",))


@pytest.mark.parametrize("port,rule", [
    ({}, PortRule("TCP")),
    ({"protocol": "UDP"}, PortRule("UDP")),
    ({"port": 80}, PortRule("TCP", 80)),
    ({"port": 80, "protocol": "SCTP"}, PortRule("SCTP", 80)),
    ({"port": 8000, "endPort": 9000}, PortRule("TCP", 8000, 9000)),
    ({"port": 8000, "endPort": 8000}, PortRule("TCP", 8000, 8000)),
    ({"port": "http"}, PortRule("TCP", name="http")),
    ({"port": "dns-tcp", "protocol": "UDP"}, PortRule("UDP", name="dns-tcp")),
    ({"port": 65535}, PortRule("TCP", 65535)),
])
def test_ports(port, rule):
    policy = parse_network_policy(policy_json({"ingress": [{"ports": [port]}]}))
    assert policy.ingress[0].ports == (rule,)


def with_path(spec, path, value):
    """A copy of spec with value set at a dotted path with [i] indexes."""
    spec = copy.deepcopy(spec)
    target = spec
    parts = path.replace("]", "").replace("[", ".").split(".")
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return spec


GOOD_SPEC = {
    "podSelector": {"matchLabels": {"app": "web"}},
    "policyTypes": ["Ingress", "Egress"],
    "ingress": [{
        "from": [{"podSelector": {}},
                 {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
        "ports": [{"port": 80}, {"port": "http"}],
    }],
    "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [
        {"key": "team", "operator": "In", "values": ["a"]}]}}]}],
}

POLICY_ERRORS = [
    ("spec", [], "spec", "must be a mapping, got a list"),
    ("spec.podSelector", "app=web", "spec.podSelector", "must be a mapping, got a string"),
    ("spec.podSelector.matchLabels", {"app": 1}, "spec.podSelector.matchLabels.app",
     "must be a string, got an integer"),
    ("spec.policyTypes", ["Ingress", "Sideways"], "spec.policyTypes[1]",
     "unsupported policy type 'Sideways' (must be Ingress or Egress)"),
    ("spec.policyTypes", ["Ingress", "Egress", "Ingress"], "spec.policyTypes",
     "may not specify more than two policyTypes"),
    ("spec.policyTypes", "Ingress", "spec.policyTypes", "must be a list, got a string"),
    ("spec.ingress", {}, "spec.ingress", "must be a list, got a mapping"),
    ("spec.ingress[0]", "all", "spec.ingress[0]", "must be a mapping, got a string"),
    ("spec.ingress[0].from", {}, "spec.ingress[0].from", "must be a list, got a mapping"),
    ("spec.ingress[0].from[1].ipBlock.except[0]", "10.0.0.0/33",
     "spec.ingress[0].from[1].ipBlock.except[0]", "'10.0.0.0/33' is not a CIDR"),
    ("spec.ingress[0].from[1].ipBlock.cidr", "10.0.0.0", "spec.ingress[0].from[1].ipBlock.cidr",
     "'10.0.0.0' is not a CIDR"),
    ("spec.ingress[0].from[1].ipBlock.cidr", "ten/8", "spec.ingress[0].from[1].ipBlock.cidr",
     "'ten/8' is not a CIDR"),
    ("spec.ingress[0].from[1].ipBlock.cidr", "", "spec.ingress[0].from[1].ipBlock.cidr",
     "is required"),
    ("spec.ingress[0].from[1].ipBlock.except[0]", "192.168.0.0/16",
     "spec.ingress[0].from[1].ipBlock.except[0]",
     "'192.168.0.0/16' is not strictly inside cidr '10.0.0.0/8'"),
    ("spec.ingress[0].from[1].ipBlock.except[0]", "10.0.0.0/8",
     "spec.ingress[0].from[1].ipBlock.except[0]",
     "'10.0.0.0/8' is not strictly inside cidr '10.0.0.0/8'"),
    ("spec.ingress[0].from[1].ipBlock.except[0]", "fd00::/16",
     "spec.ingress[0].from[1].ipBlock.except[0]",
     "'fd00::/16' is not strictly inside cidr '10.0.0.0/8'"),
    ("spec.ingress[0].from[1].ipBlock.except", "10.1.0.0/16",
     "spec.ingress[0].from[1].ipBlock.except", "must be a list, got a string"),
    ("spec.ingress[0].from[1].podSelector", {}, "spec.ingress[0].from[1]",
     "may not combine ipBlock with podSelector or namespaceSelector"),
    ("spec.ingress[0].from[1]", {}, "spec.ingress[0].from[1]",
     "must specify podSelector, namespaceSelector or ipBlock"),
    ("spec.ingress[0].ports[0].port", 0, "spec.ingress[0].ports[0].port",
     "0 is out of range (must be 1..65535)"),
    ("spec.ingress[0].ports[0].port", 65536, "spec.ingress[0].ports[0].port",
     "65536 is out of range (must be 1..65535)"),
    ("spec.ingress[0].ports[0].port", True, "spec.ingress[0].ports[0].port",
     "must be an integer or a port name, got a boolean"),
    ("spec.ingress[0].ports[0].port", 80.5, "spec.ingress[0].ports[0].port",
     "must be an integer or a port name, got a number"),
    ("spec.ingress[0].ports[0].protocol", "ICMP", "spec.ingress[0].ports[0].protocol",
     "unsupported protocol 'ICMP' (must be TCP, UDP or SCTP)"),
    ("spec.ingress[0].ports[0].protocol", "tcp", "spec.ingress[0].ports[0].protocol",
     "unsupported protocol 'tcp' (must be TCP, UDP or SCTP)"),
    ("spec.ingress[0].ports[0].endPort", 79, "spec.ingress[0].ports[0].endPort",
     "79 is below port 80"),
    ("spec.ingress[0].ports[0].endPort", 70000, "spec.ingress[0].ports[0].endPort",
     "70000 is out of range (must be 1..65535)"),
    ("spec.ingress[0].ports[0].endPort", "90", "spec.ingress[0].ports[0].endPort",
     "must be an integer, got a string"),
    ("spec.ingress[0].ports[1].endPort", 90, "spec.ingress[0].ports[1].endPort",
     "may not be set with a named port"),
    ("spec.ingress[0].ports[1].port", "80", "spec.ingress[0].ports[1].port",
     "'80' is not a valid port name (1-15 lowercase letters, digits and '-', "
     "with at least one letter)"),
    ("spec.ingress[0].ports[1].port", "HTTP", "spec.ingress[0].ports[1].port",
     "'HTTP' is not a valid port name (1-15 lowercase letters, digits and '-', "
     "with at least one letter)"),
    ("spec.ingress[0].ports[1].port", "a-very-long-port-name", "spec.ingress[0].ports[1].port",
     "'a-very-long-port-name' is not a valid port name (1-15 lowercase letters, digits "
     "and '-', with at least one letter)"),
    ("spec.ingress[0].ports[1]", {"endPort": 90}, "spec.ingress[0].ports[1].endPort",
     "may not be set without a numeric port"),
    ("spec.egress[0].to[0].namespaceSelector.matchExpressions[0].operator", "Has",
     "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].operator",
     "unknown operator 'Has' (must be In, NotIn, Exists or DoesNotExist)"),
    ("spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values", [],
     "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values",
     "must be non-empty when operator is In"),
    ("spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values", [1],
     "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values[0]",
     "must be a string, got an integer"),
    ("spec.egress[0].to", "everyone", "spec.egress[0].to", "must be a list, got a string"),
]


@pytest.mark.parametrize("path,value,field,problem", POLICY_ERRORS,
                         ids=[f"{e[0]}={e[1]!r}" for e in POLICY_ERRORS])
def test_policy_errors_name_the_object_and_field(path, value, field, problem):
    parse_network_policy(policy_json(GOOD_SPEC))  # the unbroken spec is valid
    raw = policy_json(GOOD_SPEC)
    raw = with_path(raw, path, value)
    with pytest.raises(ValidationError) as raised:
        parse_network_policy(raw)
    assert (raised.value.kind, raised.value.key) == ("NetworkPolicy", "default/web")
    assert (raised.value.field, raised.value.problem) == (field, problem)
    assert str(raised.value) == f"NetworkPolicy default/web: {field}: {problem}"


def test_error_message_reads_as_documented():
    raw = policy_json({"ingress": [{"from": [
        {"podSelector": {}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/33"]}}]}]})
    with pytest.raises(ValidationError) as raised:
        parse_network_policy(raw)
    assert str(raised.value) == ("NetworkPolicy default/web: spec.ingress[0].from[1]"
                                 ".ipBlock.except[0]: '10.0.0.0/33' is not a CIDR")


def test_namespace_must_be_a_string():
    with pytest.raises(ValidationError) as raised:
        parse_network_policy({"metadata": {"name": "web", "namespace": 7}})
    assert str(raised.value) == ("NetworkPolicy ?/web: metadata.namespace: "
                                 "must be a string, got an integer")
