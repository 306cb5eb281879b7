"""Label selectors: normalising, matching, their errors, and group membership."""

from __future__ import annotations

import pytest

from contiv.policy.model import Pod
from contiv.policy.selectors import FieldError, group_matches, matches, parse_selector
from contiv.policy.types import GroupSelector, LabelSelector, Requirement


def select(raw):
    return parse_selector(raw, "spec.podSelector")


def test_none_and_empty_select_everything():
    assert select(None) == select({}) == LabelSelector()
    assert matches(LabelSelector(), {})
    assert matches(LabelSelector(), {"any": "thing"})


def test_normalised_however_written():
    one = select({"matchLabels": {"b": "2", "a": "1"},
                  "matchExpressions": [
                      {"key": "z", "operator": "In", "values": ["y", "x", "y"]},
                      {"key": "c", "operator": "Exists"},
                      {"key": "c", "operator": "Exists", "values": None}]})
    other = select({"matchExpressions": [
                        {"key": "c", "operator": "Exists", "values": []},
                        {"key": "z", "operator": "In", "values": ["x", "y"]}],
                    "matchLabels": {"a": "1", "b": "2"}})
    assert one == other
    assert one.match_labels == (("a", "1"), ("b", "2"))
    assert one.match_expressions == (Requirement("c", "Exists"),
                                     Requirement("z", "In", ("x", "y")))
    assert (GroupSelector("ns", None, one).id == GroupSelector("ns", None, other).id)


@pytest.mark.parametrize("raw,labels,expected", [
    ({"matchLabels": {"app": "web"}}, {"app": "web", "x": "y"}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
    ({"matchLabels": {"app": "web"}}, {}, False),
    ({"matchLabels": {"app": "web", "tier": "1"}}, {"app": "web"}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]},
     {"app": "b"}, True),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]},
     {"app": "c"}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]},
     {"app": "b"}, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]},
     {"app": "a"}, False),
    # An absent key is not in any set of values.
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, {"app": ""}, True),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, {"apps": "x"}, False),
    ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {}, True),
    ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {"app": "x"}, False),
    # Everything is ANDed: labels with expressions, expressions with each other.
    ({"matchLabels": {"app": "web"},
      "matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"app": "web"}, False),
    ({"matchLabels": {"app": "web"},
      "matchExpressions": [{"key": "tier", "operator": "Exists"}]},
     {"app": "web", "tier": "1"}, True),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]},
                           {"key": "app", "operator": "NotIn", "values": ["web"]}]},
     {"app": "web"}, False),
])
def test_matches(raw, labels, expected):
    assert matches(select(raw), labels) is expected


@pytest.mark.parametrize("raw,field,problem", [
    ("app=web", "spec.podSelector", "must be a mapping, got a string"),
    ({"matchLabels": ["app"]}, "spec.podSelector.matchLabels", "must be a mapping, got a list"),
    ({"matchLabels": {"app": None}}, "spec.podSelector.matchLabels.app",
     "must be a string, got null"),
    ({"matchExpressions": {}}, "spec.podSelector.matchExpressions",
     "must be a list, got a mapping"),
    ({"matchExpressions": ["app"]}, "spec.podSelector.matchExpressions[0]",
     "must be a mapping, got a string"),
    ({"matchExpressions": [{"operator": "Exists"}]}, "spec.podSelector.matchExpressions[0].key",
     "must be a string, got null"),
    ({"matchExpressions": [{"key": "", "operator": "Exists"}]},
     "spec.podSelector.matchExpressions[0].key", "must not be empty"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"},
                           {"key": "a", "operator": "in", "values": ["x"]}]},
     "spec.podSelector.matchExpressions[1].operator",
     "unknown operator 'in' (must be In, NotIn, Exists or DoesNotExist)"),
    ({"matchExpressions": [{"key": "a"}]}, "spec.podSelector.matchExpressions[0].operator",
     "unknown operator None (must be In, NotIn, Exists or DoesNotExist)"),
    ({"matchExpressions": [{"key": "a", "operator": "In"}]},
     "spec.podSelector.matchExpressions[0].values", "must be non-empty when operator is In"),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]},
     "spec.podSelector.matchExpressions[0].values", "must be non-empty when operator is NotIn"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
     "spec.podSelector.matchExpressions[0].values", "must be empty when operator is Exists"),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]},
     "spec.podSelector.matchExpressions[0].values",
     "must be empty when operator is DoesNotExist"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": "x"}]},
     "spec.podSelector.matchExpressions[0].values", "must be a list, got a string"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x", 2]}]},
     "spec.podSelector.matchExpressions[0].values[1]", "must be a string, got an integer"),
])
def test_errors_name_the_field(raw, field, problem):
    with pytest.raises(FieldError) as raised:
        select(raw)
    assert (raised.value.field, raised.value.problem) == (field, problem)


def pod(namespace="a", labels=None, ips=("10.0.0.1",), phase="Running", host_network=False):
    return Pod(namespace, "p", labels if labels is not None else {"app": "web"}, "n1",
               tuple(ips), phase, host_network)


WEB = LabelSelector((("app", "web"),))
TEAM_X = LabelSelector((("team", "x"),))


@pytest.mark.parametrize("group,the_pod,namespace_labels,expected", [
    (GroupSelector("a", None, WEB), pod(), {}, True),
    (GroupSelector("a", None, WEB), pod(labels={}), {}, False),
    (GroupSelector("b", None, WEB), pod(), {}, False),
    (GroupSelector("a", None, LabelSelector()), pod(labels={}), {}, True),
    # A fixed namespace ignores namespace labels.
    (GroupSelector("a", None, WEB), pod(), {"team": "y"}, True),
    (GroupSelector(None, TEAM_X, None), pod(labels={}), {"team": "x"}, True),
    (GroupSelector(None, TEAM_X, None), pod(), {"team": "y"}, False),
    (GroupSelector(None, TEAM_X, WEB), pod(), {"team": "x"}, True),
    (GroupSelector(None, TEAM_X, WEB), pod(labels={"app": "db"}), {"team": "x"}, False),
    (GroupSelector(None, LabelSelector(), None), pod(namespace="z"), {}, True),
    # Pods outside address groups are never members.
    (GroupSelector("a", None, WEB), pod(host_network=True), {}, False),
    (GroupSelector("a", None, WEB), pod(phase="Succeeded"), {}, False),
    (GroupSelector("a", None, WEB), pod(phase="Failed"), {}, False),
    (GroupSelector("a", None, WEB), pod(ips=()), {}, False),
    (GroupSelector(None, LabelSelector(), None), pod(host_network=True), {}, False),
])
def test_group_matches(group, the_pod, namespace_labels, expected):
    assert group_matches(group, the_pod, namespace_labels) is expected
