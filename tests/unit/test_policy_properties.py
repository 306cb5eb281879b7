"""
Property-based tests of the policy compiler against the independent oracle
(L{tests.support.k8s_semantics}).

Random small clusters (2-3 namespaces, 2-8 pods: some hostNetwork, completed
or without an address, some dual-stack, random labels and named ports) with
1-4 random valid NetworkPolicies:

  (a) the compiled evaluator agrees with the oracle on every
      (source, destination, protocol, port) among the cluster's addresses
      plus one outside address per family, ports 53, 80, 81 and 8080;
  (b) the engine reaches the same state (policies, groups, every node's
      index) from the events applied one by one in a random order, with
      intermediate versions, deletions and re-additions, as from the final
      objects applied to a fresh engine.
"""

from __future__ import annotations

import ipaddress
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event, object_key
from tests.support.k8s_semantics import NAME_LABEL, Oracle


NS_NAMES = ("ns1", "ns2", "ns3")
NODES = ("n1", "n2", "n3")
KEYS = ("k1", "k2", "k3")
VALUES = ("v1", "v2")
PORT_NAMES = ("http", "dns", "alt")
PORT_NUMBERS = (53, 80, 81, 8080)
PROTOCOLS = ("TCP", "UDP", "SCTP")
EXTERNAL = ("203.0.113.5", "2001:db8::5")
NODE_IPS = {"n1": "192.168.0.1", "n2": "192.168.0.2", "n3": "192.168.0.3"}
CIDRS = ("10.1.0.0/24", "10.1.0.0/29", "10.1.0.4/30", "10.1.0.0/16", "0.0.0.0/0",
         "192.168.0.0/24", "203.0.113.0/24", "fd00::/64", "fd00::/125", "::/0",
         "2001:db8::/32")

# Sized for about 30 s on two cores; CONTIV_PROPERTY_EXAMPLES=5000 for a longer hunt.
_override = os.environ.get("CONTIV_PROPERTY_EXAMPLES")
AGREEMENT_EXAMPLES = int(_override or 600)
ORDER_EXAMPLES = int(_override or 400)


# -- strategies -----------------------------------------------------------------

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)


@st.composite
def selector_st(draw, keys=KEYS, values=VALUES):
    """A LabelSelector dict, sometimes empty; all four operators."""
    sel = {}
    match_labels = draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(values),
                                        max_size=2))
    if match_labels or draw(st.booleans()):
        sel["matchLabels"] = match_labels
    exprs = []
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
        e = {"key": draw(st.sampled_from(keys)), "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = draw(st.lists(st.sampled_from(values), min_size=1, max_size=2,
                                        unique=True))
        exprs.append(e)
    if exprs or draw(st.booleans()):
        sel["matchExpressions"] = exprs
    return sel


ns_selector_st = st.one_of(
    selector_st(),
    selector_st(keys=(NAME_LABEL,), values=NS_NAMES),
    selector_st(keys=KEYS + (NAME_LABEL,), values=VALUES + NS_NAMES))


def namespace_obj(name: str, labels: dict, name_label: bool = True) -> dict:
    # The API server always sets kubernetes.io/metadata.name; a manifest may not.
    if name_label:
        labels = {**labels, NAME_LABEL: name}
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}


@st.composite
def pod_st(draw, ns: str, name: str, index: int, ips_taken: set):
    node = draw(st.sampled_from(NODES))
    kind = draw(st.sampled_from(("running",) * 6 + ("host", "succeeded", "failed",
                                                      "pending", "pending-ip")))
    ports = []
    for port_name in draw(st.lists(st.sampled_from(PORT_NAMES), max_size=3, unique=True)):
        ports.append({"name": port_name, "containerPort": draw(st.sampled_from(PORT_NUMBERS)),
                      "protocol": draw(st.sampled_from(PROTOCOLS))})
    if draw(st.booleans()):
        ports.append({"containerPort": draw(st.sampled_from(PORT_NUMBERS)), "protocol": "TCP"})
    # spread the ports over one or two containers
    split = draw(st.integers(0, len(ports)))
    containers = [{"name": "c1", "ports": ports[:split]}]
    if split < len(ports) or draw(st.booleans()):
        containers.append({"name": "c2", "ports": ports[split:]})
    obj = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": ns, "name": name, "labels": draw(labels_st)},
           "spec": {"nodeName": node, "containers": containers},
           "status": {"phase": "Running"}}
    if kind == "host":
        obj["spec"]["hostNetwork"] = True
        ips = [NODE_IPS[node]]
    elif kind == "pending":
        obj["status"]["phase"] = "Pending"
        ips = []
        if draw(st.booleans()):
            del obj["spec"]["nodeName"]
    else:
        if kind in ("succeeded", "failed"):
            obj["status"]["phase"] = kind.capitalize()
        elif kind == "pending-ip":
            obj["status"]["phase"] = "Pending"
        v4, v6 = f"10.1.0.{index + 1}", f"fd00::{index + 1:x}"
        if kind in ("succeeded", "failed") and ips_taken and draw(st.booleans()):
            # a finished pod still showing an address that a running pod now has
            v4 = draw(st.sampled_from(sorted(a for a in ips_taken if ":" not in a) or [v4]))
        family = draw(st.sampled_from(("4", "4", "6", "46", "64")))
        ips = [v4 if f == "4" else v6 for f in family]
        if kind in ("running", "pending-ip"):
            ips_taken.update(ips)
    if ips:
        shape = draw(st.sampled_from(("both",) * 6 + ("podIP", "podIPs")))
        if shape != "podIPs":
            obj["status"]["podIP"] = ips[0]
        if shape != "podIP":
            obj["status"]["podIPs"] = [{"ip": ip} for ip in ips]
    return obj


@st.composite
def ip_block_st(draw):
    cidr = draw(st.sampled_from(CIDRS))
    net = ipaddress.ip_network(cidr)
    block = {"cidr": cidr}
    excepts = []
    for _ in range(draw(st.integers(0, 2))):
        if net.prefixlen >= net.max_prefixlen:
            break
        # a strictly smaller network inside cidr; near the cluster's addresses
        plen = draw(st.integers(net.prefixlen + 1, net.max_prefixlen))
        if net.version == 4:
            base = draw(st.sampled_from(("10.1.0.0", "10.1.0.4", "10.1.0.3", "192.168.0.2",
                                         "203.0.113.5", "10.0.0.0")))
        else:
            base = draw(st.sampled_from(("fd00::", "fd00::2", "fd00::5", "2001:db8::5")))
        sub = ipaddress.ip_network(f"{base}/{plen}", strict=False)
        if sub.subnet_of(net) and sub != net:
            excepts.append(str(sub))
    if excepts or draw(st.booleans()):
        block["except"] = excepts
    return {"ipBlock": block}


@st.composite
def peer_st(draw):
    kind = draw(st.sampled_from(("pod", "ns", "both", "ip")))
    if kind == "ip":
        return draw(ip_block_st())
    peer = {}
    if kind in ("pod", "both"):
        peer["podSelector"] = draw(selector_st())
    if kind in ("ns", "both"):
        peer["namespaceSelector"] = draw(ns_selector_st)
    return peer


@st.composite
def port_st(draw):
    entry = {}
    if draw(st.integers(0, 3)):
        entry["protocol"] = draw(st.sampled_from(PROTOCOLS))
    what = draw(st.sampled_from(("none", "number", "number", "name", "range")))
    if what == "number":
        entry["port"] = draw(st.sampled_from(PORT_NUMBERS))
    elif what == "name":
        entry["port"] = draw(st.sampled_from(PORT_NAMES + ("nope",)))
    elif what == "range":
        start = draw(st.sampled_from(PORT_NUMBERS))
        entry["port"] = start
        entry["endPort"] = draw(st.sampled_from([p for p in PORT_NUMBERS + (65535,)
                                                 if p >= start]))
    return entry


@st.composite
def rule_st(draw, peers_key: str):
    rule = {}
    peers = draw(st.sampled_from(("absent", "empty", "list", "list")))
    if peers == "empty":
        rule[peers_key] = []
    elif peers == "list":
        rule[peers_key] = draw(st.lists(peer_st(), min_size=1, max_size=2))
    ports = draw(st.sampled_from(("absent", "empty", "list", "list")))
    if ports == "empty":
        rule["ports"] = []
    elif ports == "list":
        rule["ports"] = draw(st.lists(port_st(), min_size=1, max_size=2))
    return rule


@st.composite
def rules_st(draw, peers_key: str):
    """None (field absent), [] or 1-2 rules."""
    choice = draw(st.sampled_from(("absent", "empty", "rules", "rules")))
    if choice == "absent":
        return None
    if choice == "empty":
        return []
    return draw(st.lists(rule_st(peers_key), min_size=1, max_size=2))


@st.composite
def policy_st(draw, ns: str, name: str):
    spec = {"podSelector": draw(st.one_of(st.just({}), selector_st()))}
    ingress = draw(rules_st("from"))
    egress = draw(rules_st("to"))
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    types = draw(st.sampled_from(("absent", "empty", "I", "E", "IE", "EI")))
    if types == "empty":
        spec["policyTypes"] = []
    elif types != "absent":
        spec["policyTypes"] = [{"I": "Ingress", "E": "Egress"}[c] for c in types]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


@st.composite
def cluster_st(draw):
    """The final objects: namespaces, pods, policies (in that order)."""
    namespaces = NS_NAMES[:draw(st.integers(2, 3))]
    objects = [namespace_obj(ns, draw(labels_st), draw(st.sampled_from((True,) * 4 + (False,))))
               for ns in namespaces]
    taken: set = set()
    for i in range(draw(st.integers(2, 8))):
        objects.append(draw(pod_st(draw(st.sampled_from(namespaces)), f"p{i}", i, taken)))
    for i in range(draw(st.integers(1, 4))):
        objects.append(draw(policy_st(draw(st.sampled_from(namespaces)), f"pol{i}")))
    return objects


def _variant(draw, obj: dict) -> dict:
    """Another random version of the same object (same kind and key)."""
    meta = obj["metadata"]
    if obj["kind"] == "Namespace":
        return namespace_obj(meta["name"], draw(labels_st))
    if obj["kind"] == "Pod":
        index = int(meta["name"][1:]) + draw(st.sampled_from((0, 0, 20)))
        return draw(pod_st(meta["namespace"], meta["name"], index, set()))
    return draw(policy_st(meta["namespace"], meta["name"]))


@st.composite
def history_st(draw):
    """(final objects, the events that lead there, in a random order)."""
    final = draw(cluster_st())
    per_key = []
    for obj in final:
        how = draw(st.sampled_from(("plain", "plain", "modified", "readded", "churn")))
        if how == "plain":
            seq = [(ADDED, obj)]
        elif how == "modified":
            seq = [(ADDED, _variant(draw, obj)), (MODIFIED, obj)]
        elif how == "readded":
            first = _variant(draw, obj) if draw(st.booleans()) else obj
            seq = [(ADDED, first), (DELETED, first), (ADDED, obj)]
        else:
            a, b = _variant(draw, obj), _variant(draw, obj)
            seq = [(ADDED, a), (MODIFIED, b), (DELETED, b), (ADDED, obj), (MODIFIED, obj)]
        per_key.append(seq)
    # objects that come and go
    for i in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("Pod", "NetworkPolicy", "Namespace")))
        if kind == "Namespace":
            obj = namespace_obj("gone", draw(labels_st))
        elif kind == "Pod":
            obj = draw(pod_st(draw(st.sampled_from(NS_NAMES)), f"gone{i}", 30 + i, set()))
        else:
            obj = draw(policy_st(draw(st.sampled_from(NS_NAMES)), f"gone{i}"))
        per_key.append([(ADDED, obj), (DELETED, obj)])
    rnd = draw(st.randoms(use_true_random=False))
    events = []
    cursors = [0] * len(per_key)
    live = [i for i in range(len(per_key))]
    while live:
        i = rnd.choice(live)
        type_, obj = per_key[i][cursors[i]]
        events.append(Event(type_, obj["kind"], object_key(obj), obj))
        cursors[i] += 1
        if cursors[i] == len(per_key[i]):
            live.remove(i)
    return final, events


# -- helpers ---------------------------------------------------------------------------

def _engine(events):
    from contiv.policy.engine import PolicyEngine
    engine = PolicyEngine()
    for event in events:
        engine.apply(event)
    return engine


def _fresh_events(objects):
    return [Event(ADDED, o["kind"], object_key(o), o) for o in objects]


def _addresses(objects):
    found = set(EXTERNAL)
    for obj in objects:
        if obj["kind"] == "Pod":
            for entry in obj["status"].get("podIPs") or ():
                found.add(entry["ip"])
            if obj["status"].get("podIP"):
                found.add(obj["status"]["podIP"])
    return sorted(found)


def _check_agreement(objects):
    from contiv.policy.evaluate import Evaluator
    engine = _engine(_fresh_events(objects))
    assert engine.errors == {}, engine.errors
    evaluator = Evaluator.from_engine(engine)
    oracle = Oracle(objects)
    addresses = _addresses(objects)
    wrong = []
    for src in addresses:
        for dst in addresses:
            if (":" in src) != (":" in dst):
                continue
            for proto in PROTOCOLS:
                for number in PORT_NUMBERS:
                    want = oracle.allowed(src, dst, proto, number)
                    got = evaluator.allowed(src, dst, proto, number)
                    if got != want:
                        wrong.append((src, dst, proto, number, want, got,
                                      evaluator.verdict(src, dst, proto, number),
                                      oracle.verdict(src, dst, proto, number)))
    assert not wrong, (
        f"{len(wrong)} disagreements (src, dst, proto, port, oracle, evaluator, "
        "evaluator verdict, oracle (egress, ingress)):\n"
        + "\n".join(map(repr, wrong[:10])))


def _nodes(events):
    nodes = set(NODES)
    for event in events:
        node = (event.object.get("spec") or {}).get("nodeName")
        if node:
            nodes.add(node)
    return sorted(nodes)


def _state(engine, nodes):
    return (dict(engine.policies), dict(engine.groups),
            {n: engine.node_index(n) for n in nodes})


# -- the properties ----------------------------------------------------------------------

@settings(max_examples=AGREEMENT_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cluster_st())
def test_evaluator_agrees_with_oracle(objects):
    _check_agreement(objects)


@settings(max_examples=ORDER_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(history_st())
def test_event_order_does_not_matter(history):
    final, events = history
    replayed = _engine(events)
    assert replayed.errors == {}, replayed.errors
    fresh = _engine(_fresh_events(final))
    nodes = _nodes(events)
    got, want = _state(replayed, nodes), _state(fresh, nodes)
    assert got[0] == want[0], "policies differ"
    assert got[1] == want[1], "groups differ"
    for node in nodes:
        assert got[2][node] == want[2][node], f"node_index({node!r}) differs"
