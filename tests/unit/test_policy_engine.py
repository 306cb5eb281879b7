"""
The incremental engine: what each event touches (take_changes), node indexes,
determinism, and "events one by one" agreeing with "the final state at once".
"""

from __future__ import annotations

import random

import pytest

from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event
from contiv.policy import engine as engine_module
from contiv.policy.engine import Changes, PolicyEngine
from contiv.policy.evaluate import Evaluator
from contiv.policy.model import ValidationError, parse_namespace, parse_network_policy, parse_pod
from contiv.policy.types import GroupSelector, LabelSelector, LocalPod, NamedPort, NodeIndex


def namespace(name, event=ADDED, **labels):
    return Event(event, "Namespace", name, {"metadata": {"name": name, "labels": labels}})


def pod(key, ip, node, event=ADDED, phase="Running", host_network=False, ports=(), **labels):
    ns, name = key.split("/")
    ips = [ip] if isinstance(ip, str) else list(ip)
    return Event(event, "Pod", key, {
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "containers": [{"ports": [{"name": n, "containerPort": p}
                                           for n, p in ports]}]},
        "status": {"phase": phase, "podIPs": [{"ip": i} for i in ips]},
    })


def policy(key, spec, event=ADDED):
    ns, name = key.split("/")
    return Event(event, "NetworkPolicy", key,
                 {"metadata": {"namespace": ns, "name": name}, "spec": spec})


def deleted(event):
    return Event(DELETED, event.kind, event.key, event.object)


def modified(event):
    return Event(MODIFIED, event.kind, event.key, event.object)


def labels(**pairs):
    return LabelSelector(tuple(sorted(pairs.items())))


# Group ids of the scenario below.
A_DB = GroupSelector("a", None, labels(app="db")).id
A_WEB = GroupSelector("a", None, labels(app="web")).id
A_CLIENT = GroupSelector("a", None, labels(app="client")).id
B_DB = GroupSelector("b", None, labels(app="db")).id
TEAM_X = GroupSelector(None, labels(team="x"), None).id

P1 = policy("a/db-in", {"podSelector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})
P2 = policy("b/db-in", {"podSelector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels":
                                                                     {"team": "x"}}}]}]})
SCENARIO = [
    namespace("a", team="x"),
    namespace("b", team="y"),
    namespace("c"),
    pod("a/web", "10.0.1.1", "n1", app="web"),
    pod("a/db", "10.0.1.2", "n2", app="db", ports=[("sql", 5432)]),
    pod("b/db", "10.0.2.2", "n3", app="db"),
    pod("c/x", "10.0.3.1", "n4", app="x"),
    P1,
    P2,
]


@pytest.fixture
def engine():
    engine = PolicyEngine()
    for event in SCENARIO:
        engine.apply(event)
    assert engine.errors == {}
    engine.take_changes()
    return engine


def policy_id(engine, key):
    return next(p.id for p in engine.policies.values() if f"{p.namespace}/{p.name}" == key)


# -- take_changes


def test_first_changes_are_everything_then_nothing():
    engine = PolicyEngine()
    for event in SCENARIO:
        engine.apply(event)
    changes = engine.take_changes()
    assert changes.changed_groups == {A_DB, A_WEB, B_DB, TEAM_X}
    assert changes.added_policies == set(engine.policies)
    assert len(changes.added_policies) == 2
    assert changes.dirty_nodes == {"n1", "n2", "n3", "n4"}
    assert changes.removed_groups == changes.removed_policies == frozenset()
    later = engine.take_changes()
    assert later == Changes()
    assert not later


def test_pod_created_touches_the_groups_it_joins_and_the_nodes_using_them(engine):
    engine.apply(pod("a/web2", "10.0.1.5", "n5", app="web"))
    changes = engine.take_changes()
    assert changes.changed_groups == {A_WEB, TEAM_X}
    # n5 has the new local pod; n2 and n3 hold policies whose peers changed.
    assert changes.dirty_nodes == {"n5", "n2", "n3"}
    assert changes.added_policies == changes.removed_policies == frozenset()


def test_pod_matching_nothing_touches_only_its_node(engine):
    engine.apply(pod("c/y", "10.0.3.2", "n4", app="web"))
    changes = engine.take_changes()
    assert changes.changed_groups == frozenset()
    assert changes.dirty_nodes == {"n4"}


def test_pod_event_checks_only_groups_of_its_namespace(engine, monkeypatch):
    checked = []
    real = engine_module.group_matches

    def spy(selector, the_pod, namespace_labels):
        checked.append(selector.id)
        return real(selector, the_pod, namespace_labels)

    monkeypatch.setattr(engine_module, "group_matches", spy)
    engine.apply(pod("c/y", "10.0.3.2", "n4", app="db"))
    assert checked == []
    engine.apply(pod("a/z", "10.0.1.9", "n4", app="db"))
    assert sorted(checked) == sorted([A_DB, A_WEB, TEAM_X])


def test_relabel_leaves_and_joins_groups(engine):
    engine.apply(modified(pod("a/web", "10.0.1.1", "n1", app="client")))
    changes = engine.take_changes()
    # Still in team=x with the same address: that group did not change.
    assert changes.changed_groups == {A_WEB}
    assert changes.dirty_nodes == {"n2"}


def test_relabel_that_matters_to_no_group_changes_nothing(engine):
    engine.apply(modified(pod("a/web", "10.0.1.1", "n1", app="web", version="2")))
    assert engine.take_changes() == Changes()


def test_target_leaving_its_applied_to_group(engine):
    engine.apply(modified(pod("a/db", "10.0.1.2", "n2", app="none", ports=[("sql", 5432)])))
    changes = engine.take_changes()
    assert changes.changed_groups == {A_DB}
    assert changes.dirty_nodes == {"n2"}
    assert engine.node_index("n2").policies == ()


def test_pod_deleted(engine):
    engine.apply(deleted(pod("a/web", "10.0.1.1", "n1", app="web")))
    changes = engine.take_changes()
    assert changes.changed_groups == {A_WEB, TEAM_X}
    assert changes.dirty_nodes == {"n1", "n2", "n3"}
    assert engine.groups[A_WEB].members == ()


def test_node_losing_its_last_pod_is_reported_once(engine):
    engine.apply(deleted(pod("c/x", "10.0.3.1", "n4", app="x")))
    assert "n4" in engine.nodes()
    assert engine.take_changes().dirty_nodes == {"n4"}
    assert engine.node_index("n4") == NodeIndex("n4", (), (), ())
    assert "n4" not in engine.nodes()


def test_node_with_only_host_network_pods_exists(engine):
    engine.apply(pod("c/agent", "192.168.0.9", "n9", host_network=True, app="web"))
    assert "n9" in engine.nodes()
    changes = engine.take_changes()
    assert changes.dirty_nodes == {"n9"}
    assert changes.changed_groups == frozenset()
    assert engine.node_index("n9") == NodeIndex("n9", (), (), ())


def test_pod_finishing_leaves_groups_and_local_pods(engine):
    engine.apply(modified(pod("a/web", "10.0.1.1", "n1", phase="Succeeded", app="web")))
    changes = engine.take_changes()
    assert changes.changed_groups == {A_WEB, TEAM_X}
    assert changes.dirty_nodes == {"n1", "n2", "n3"}
    assert engine.node_index("n1").pods == ()
    assert "n1" in engine.nodes()
    assert "10.0.1.1" not in engine.pods_by_ip()


def test_pod_address_change_changes_its_groups(engine):
    engine.apply(modified(pod("a/web", "10.0.1.8", "n1", app="web")))
    changes = engine.take_changes()
    assert changes.changed_groups == {A_WEB, TEAM_X}
    assert changes.dirty_nodes == {"n1", "n2", "n3"}
    assert [m.ip for m in engine.groups[A_WEB].members] == ["10.0.1.8"]


def test_namespace_relabel_touches_only_namespace_selector_groups(engine):
    engine.apply(namespace("a", event=MODIFIED, team="z"))
    changes = engine.take_changes()
    assert changes.changed_groups == {TEAM_X}
    assert changes.dirty_nodes == {"n3"}
    assert engine.groups[TEAM_X].members == ()
    engine.apply(namespace("c", event=MODIFIED, team="x"))
    assert engine.take_changes().changed_groups == {TEAM_X}
    assert [m.pod for m in engine.groups[TEAM_X].members] == ["c/x"]


def test_namespace_deleted_falls_back_to_its_name_label(engine):
    engine.apply(deleted(namespace("a", team="x")))
    assert engine.take_changes().changed_groups == {TEAM_X}
    assert engine.groups[TEAM_X].members == ()


def test_pods_before_their_namespace(engine):
    engine.apply(pod("d/p", "10.0.4.1", "n1", app="p"))
    assert engine.take_changes().changed_groups == frozenset()
    engine.apply(namespace("d", team="x"))
    assert engine.take_changes().changed_groups == {TEAM_X}
    assert "d/p" in {m.pod for m in engine.groups[TEAM_X].members}


def test_policy_change_swaps_groups(engine):
    old_id = policy_id(engine, "a/db-in")
    engine.apply(modified(policy("a/db-in", {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]})))
    new_id = policy_id(engine, "a/db-in")
    changes = engine.take_changes()
    assert changes.changed_groups == {A_CLIENT}
    assert changes.removed_groups == {A_WEB}
    assert changes.added_policies == {new_id}
    assert changes.removed_policies == {old_id}
    assert changes.dirty_nodes == {"n2"}
    assert A_WEB not in engine.groups
    assert set(engine.groups) == {A_DB, A_CLIENT, B_DB, TEAM_X}


def test_policy_update_without_change_in_meaning_changes_nothing(engine):
    engine.apply(modified(policy("a/db-in", {
        "policyTypes": ["Ingress"],
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": []}]})))
    assert engine.take_changes() == Changes()


def test_groups_are_dropped_when_no_policy_references_them(engine):
    also = policy("a/web-too", {"podSelector": {"matchLabels": {"app": "db"}},
                                "ingress": [{"from": [{"podSelector": {"matchLabels":
                                                                       {"app": "web"}}}],
                                             "ports": [{"port": 1}]}]})
    engine.apply(also)
    assert engine.take_changes().changed_groups == frozenset()
    engine.apply(deleted(P1))
    changes = engine.take_changes()
    assert changes.removed_groups == frozenset()
    assert len(changes.removed_policies) == 1
    engine.apply(deleted(also))
    changes = engine.take_changes()
    assert changes.removed_groups == {A_DB, A_WEB}
    assert changes.dirty_nodes == {"n2"}
    assert set(engine.groups) == {B_DB, TEAM_X}
    assert engine.node_index("n2").policies == ()


def test_removed_and_recreated_within_one_batch_is_no_change(engine):
    engine.apply(deleted(P1))
    engine.apply(P1)
    changes = engine.take_changes()
    assert changes.changed_groups == changes.removed_groups == frozenset()
    assert changes.added_policies == changes.removed_policies == frozenset()


def test_other_kinds_are_ignored(engine):
    engine.apply(Event(ADDED, "Service", "a/svc", {"metadata": {"name": "svc"}, "spec": 5}))
    assert engine.errors == {}
    assert engine.take_changes() == Changes()


def test_errors_are_reported_per_object_and_cleared(engine):
    engine.apply(Event(ADDED, "Namespace", "d", {"metadata": {"name": "d", "labels": "x"}}))
    engine.apply(Event(MODIFIED, "Pod", "a/web", {"metadata": {"name": "web", "namespace": "a"},
                                                  "spec": {"hostNetwork": 1}}))
    engine.apply(Event(ADDED, "NetworkPolicy", "a/x", "not an object"))
    assert engine.errors == {
        "Namespace d": "Namespace d: metadata.labels: must be a mapping, got a string",
        "Pod a/web": "Pod a/web: spec.hostNetwork: must be a boolean, got an integer",
        "NetworkPolicy a/x": "NetworkPolicy <unnamed>: (object): must be a mapping, got a string",
    }
    assert engine.take_changes() == Changes()
    engine.apply(namespace("d"))
    engine.apply(deleted(pod("a/web", "10.0.1.1", "n1", app="web")))
    engine.apply(deleted(Event(ADDED, "NetworkPolicy", "a/x", "not an object")))
    assert engine.errors == {}


# -- node indexes


def test_node_indexes(engine):
    p1, p2 = policy_id(engine, "a/db-in"), policy_id(engine, "b/db-in")
    groups = engine.groups
    assert engine.node_index("n2") == NodeIndex(
        "n2", (p1,), tuple(sorted([groups[A_DB].key, groups[A_WEB].key])),
        (LocalPod("a/db", ("10.0.1.2",), (NamedPort("sql", "TCP", 5432),)),))
    assert engine.node_index("n3") == NodeIndex(
        "n3", (p2,), tuple(sorted([groups[B_DB].key, groups[TEAM_X].key])),
        (LocalPod("b/db", ("10.0.2.2",)),))
    assert engine.node_index("n1") == NodeIndex("n1", (), (), (LocalPod("a/web", ("10.0.1.1",)),))
    assert engine.node_index("elsewhere") == NodeIndex("elsewhere", (), (), ())
    assert engine.nodes() == {"n1", "n2", "n3", "n4"}


def test_local_pods_leave_out_host_network_and_finished_pods(engine):
    engine.apply(pod("a/agent", "192.168.0.1", "n2", host_network=True, app="db"))
    engine.apply(pod("a/job", "10.0.1.20", "n2", phase="Failed", app="db"))
    engine.apply(pod("a/dual", ["10.0.1.30", "fd00::30"], "n2", app="x"))
    assert [p.key for p in engine.node_index("n2").pods] == ["a/db", "a/dual"]
    assert engine.node_index("n2").pods[1].ips == ("10.0.1.30", "fd00::30")
    assert [m.pod for m in engine.groups[A_DB].members] == ["a/db"]


def test_node_index_follows_group_member_changes(engine):
    before = engine.node_index("n2")
    engine.apply(pod("a/web2", "10.0.1.5", "n5", app="web"))
    after = engine.node_index("n2")
    assert after.policies == before.policies
    assert after.groups != before.groups
    assert engine.groups[A_WEB].key in after.groups


def test_node_indexes_carry_the_contract_group_keys(engine):
    # The engine hashes cached member encodings; the keys must equal Group.key.
    engine.apply(pod("a/web2", ["10.0.1.5", "fd00::5"], "n2", app="web", ports=[("http", 80)]))
    for group_id, group in engine.groups.items():
        assert group.id == group_id
    keys = {group.key for group in engine.groups.values()}
    node_keys = {key for node in engine.nodes() for key in engine.node_index(node).groups}
    assert node_keys == keys


def test_group_members_are_sorted_by_ip_then_pod(engine):
    engine.apply(pod("a/web3", "10.0.1.0", "n1", app="web"))
    engine.apply(pod("a/web0", "10.0.1.1", "n1", app="web"))  # the same address as a/web
    members = engine.groups[A_WEB].members
    assert [(m.ip, m.pod) for m in members] == [
        ("10.0.1.0", "a/web3"), ("10.0.1.1", "a/web"), ("10.0.1.1", "a/web0")]


def test_pods_by_ip(engine):
    by_ip = engine.pods_by_ip()
    assert set(by_ip) == {"10.0.1.1", "10.0.1.2", "10.0.2.2", "10.0.3.1"}
    assert by_ip["10.0.1.2"].key == "a/db"


# -- determinism and agreement with a fresh start


def snapshot(engine, nodes=()):
    nodes = sorted(set(nodes) | engine.nodes())
    return (
        sorted(engine.policies),
        {group_id: group.members for group_id, group in engine.groups.items()},
        [engine.node_index(node) for node in nodes],
        {ip: p.key for ip, p in engine.pods_by_ip().items()},
        dict(engine.errors),
    )


def test_order_of_events_does_not_matter():
    shuffled = list(SCENARIO)
    random.Random(3).shuffle(shuffled)
    one, other = PolicyEngine(), PolicyEngine()
    for event in SCENARIO:
        one.apply(event)
    for event in shuffled:
        other.apply(event)
    assert snapshot(one) == snapshot(other)
    assert one.node_index("n2").to_json() == other.node_index("n2").to_json()


def fresh_from_final_state(events):
    """A new engine fed only the objects in force after events, as the engine keeps them."""
    parsers = {"Namespace": parse_namespace, "Pod": parse_pod,
               "NetworkPolicy": parse_network_policy}
    final = {}
    for event in events:
        if event.kind not in parsers:
            continue
        if event.type == DELETED:
            final.pop((event.kind, event.key), None)
            continue
        try:
            parsers[event.kind](event.object)
        except ValidationError:
            continue  # rejected: the previous version stays
        final[(event.kind, event.key)] = event.object
    engine = PolicyEngine()
    for (kind, key), obj in final.items():
        engine.apply(Event(ADDED, kind, key, obj))
    return engine


HAND_MADE = {
    "relabels and a policy edit": SCENARIO + [
        modified(pod("a/web", "10.0.1.1", "n1", app="db")),
        modified(namespace("b", team="x")),
        modified(policy("a/db-in", {"podSelector": {}, "egress": [{}]})),
        pod("b/web", "10.0.2.9", "n3", app="web"),
        modified(pod("a/web", "10.0.1.1", "n2", app="web")),
    ],
    "deletes and re-adds": SCENARIO + [
        deleted(P1), deleted(namespace("a")), deleted(pod("b/db", "10.0.2.2", "n3")),
        P1, pod("b/db", "10.0.2.2", "n1", app="db"), namespace("a", team="y"),
    ],
    "bad versions in between": SCENARIO + [
        modified(policy("a/db-in", {"ingress": [{"ports": [{"port": 0}]}]})),
        modified(pod("a/web", "not-an-ip", "n1", app="web")),
        policy("c/new", {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
        modified(namespace("c", team=["x"])),
    ],
    "finished pods and address reuse": SCENARIO + [
        modified(pod("a/web", "10.0.1.1", "n1", phase="Succeeded", app="web")),
        pod("c/new", "10.0.1.1", "n4", app="web"),
        policy("c/all", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        modified(pod("c/new", "10.0.1.1", "n4", host_network=True, app="web")),
    ],
}


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_events_one_by_one_equal_the_final_state_at_once(name):
    events = HAND_MADE[name]
    engine = PolicyEngine()
    for event in events:
        engine.apply(event)
    fresh = fresh_from_final_state(events)
    assert snapshot(engine, fresh.nodes())[:4] == snapshot(fresh, engine.nodes())[:4]


# Random sequences over a small world: every event is followed by a publish of
# only what take_changes names, and the published picture must always equal
# the engine's full picture; at the end, the engine equals a fresh start.

NAMESPACES = ["a", "b", "c"]
NODES = ["n1", "n2", "n3"]
SELECTORS = [
    {}, {"matchLabels": {"app": "web"}}, {"matchLabels": {"app": "db"}},
    {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["1", "2"]}]},
    {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["1"]}]},
    {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
]
NS_SELECTORS = [{}, {"matchLabels": {"team": "x"}},
                {"matchExpressions": [{"key": "team", "operator": "Exists"}]}]


def random_event(rng):
    choice = rng.random()
    if choice < 0.15:
        name = rng.choice(NAMESPACES)
        if rng.random() < 0.15:
            return namespace(name, event=DELETED)
        team = rng.choice([None, "x", "y", ["bad"]])
        return namespace(name, event=MODIFIED, **({} if team is None else {"team": team}))
    if choice < 0.7:
        key = f"{rng.choice(NAMESPACES)}/p{rng.randrange(8)}"
        if rng.random() < 0.15:
            return pod(key, "10.0.0.1", "n1", event=DELETED)
        label_pairs = {}
        if rng.random() < 0.7:
            label_pairs["app"] = rng.choice(["web", "db"])
        if rng.random() < 0.5:
            label_pairs["tier"] = rng.choice(["1", "2", "3"])
        ips = rng.choice([[], [f"10.0.0.{rng.randrange(6)}"],
                          [f"10.0.0.{rng.randrange(6)}", f"fd00::{rng.randrange(6)}"],
                          ["bad-ip"]])
        return pod(key, ips, rng.choice(NODES), event=MODIFIED,
                   phase=rng.choice(["Running", "Running", "Pending", "Succeeded", "Failed"]),
                   host_network=rng.random() < 0.1,
                   ports=rng.choice([(), (("http", 80),), (("http", 8080),)]), **label_pairs)
    key = f"{rng.choice(NAMESPACES)}/np{rng.randrange(5)}"
    if rng.random() < 0.15:
        return policy(key, {}, event=DELETED)
    peers = []
    for _ in range(rng.randrange(3)):
        kind = rng.randrange(4)
        if kind == 0:
            peers.append({"podSelector": rng.choice(SELECTORS)})
        elif kind == 1:
            peers.append({"namespaceSelector": rng.choice(NS_SELECTORS)})
        elif kind == 2:
            peers.append({"namespaceSelector": rng.choice(NS_SELECTORS),
                          "podSelector": rng.choice(SELECTORS)})
        else:
            peers.append({"ipBlock": {"cidr": "10.0.0.0/24",
                                      "except": rng.choice([[], ["10.0.0.0/30"], ["x"]])}})
    rule = {"from": peers, "ports": rng.choice([[], [{"port": "http"}], [{"port": 80}]])}
    spec = {"podSelector": rng.choice(SELECTORS), "ingress": [rule] * rng.randrange(2)}
    if rng.random() < 0.5:
        spec["policyTypes"] = rng.choice([["Egress"], ["Ingress", "Egress"]])
        spec["egress"] = [{"to": peers}]
    return policy(key, spec, event=MODIFIED)


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_publish_completely_and_match_a_fresh_start(seed):
    rng = random.Random(seed)
    engine = PolicyEngine()
    published_groups, published_policies, published_nodes = {}, set(), {}
    seen_nodes = set()
    events = []
    for _ in range(150):
        event = random_event(rng)
        events.append(event)
        seen_nodes |= engine.nodes()
        engine.apply(event)
        seen_nodes |= engine.nodes()
        changes = engine.take_changes()
        for group_id in changes.changed_groups:
            published_groups[group_id] = engine.groups[group_id].key
        for group_id in changes.removed_groups:
            del published_groups[group_id]
        published_policies |= changes.added_policies
        published_policies -= changes.removed_policies
        for node in changes.dirty_nodes:
            published_nodes[node] = engine.node_index(node)
        assert published_groups == {g.id: g.key for g in engine.groups.values()}
        assert published_policies == set(engine.policies)
        for node in seen_nodes:
            assert published_nodes.get(node, NodeIndex(node, (), (), ())) == \
                engine.node_index(node), (event, node)
    fresh = fresh_from_final_state(events)
    assert snapshot(engine, seen_nodes)[:4] == snapshot(fresh, seen_nodes)[:4]
    judge, fresh_judge = Evaluator.from_engine(engine), Evaluator.from_engine(fresh)
    addresses = [f"10.0.0.{i}" for i in range(7)] + ["fd00::1", "192.168.1.1"]
    for src in addresses:
        for dst in addresses:
            for port in (80, 8080):
                assert judge.verdict(src, dst, "TCP", port) == \
                    fresh_judge.verdict(src, dst, "TCP", port)


def test_engine_groups_carry_their_canonical_encoding():
    """The engine fills Group.key and Group.canonical; they equal what the group would compute."""
    from contiv.policy.types import Group, canonical_json

    engine = PolicyEngine()
    engine.apply(Event(ADDED, "Namespace", "default",
                       {"kind": "Namespace", "metadata": {"name": "default"}}))
    for i in range(3):
        engine.apply(Event(ADDED, "Pod", f"default/p{i}", {
            "kind": "Pod", "metadata": {"name": f"p{i}", "namespace": "default",
                                        "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": f"10.0.0.{i + 1}"}}))
    engine.apply(Event(ADDED, "NetworkPolicy", "default/p", {
        "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}}))
    (group,) = engine.groups.values()
    fresh = Group(group.id, group.members)
    assert group.canonical == fresh.canonical == canonical_json(fresh.to_json())
    assert group.key == fresh.key
