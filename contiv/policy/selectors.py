"""
Label selectors: parsing a Kubernetes C{LabelSelector} into the normalised
L{LabelSelector} of the contract, matching it against labels, and deciding
whether a pod belongs to an address group (L{GroupSelector}).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from contiv.policy.types import GroupSelector, LabelSelector, Requirement

IN = "In"
NOT_IN = "NotIn"
EXISTS = "Exists"
DOES_NOT_EXIST = "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)


class FieldError(ValueError):
    """
    A bad value at a field path inside an object. The parser of the whole
    object turns it into a L{contiv.policy.model.ValidationError} that also
    names the object.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


def type_name(value: Any) -> str:
    """How a JSON value's type reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def parse_labels(raw: Any, field: str) -> dict[str, str]:
    """A label map (pod labels, namespace labels, matchLabels): strings to strings."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise FieldError(field, f"must be a mapping, got {type_name(raw)}")
    for key, value in raw.items():
        if not isinstance(key, str):
            raise FieldError(field, f"label key {key!r} must be a string")
        if not isinstance(value, str):
            raise FieldError(f"{field}.{key}", f"must be a string, got {type_name(value)}")
    return dict(raw)


def parse_selector(raw: Any, field: str) -> LabelSelector:
    """
    A Kubernetes LabelSelector (C{None} and C{{}} both mean "everything"),
    normalised: labels sorted by key, expressions with sorted distinct values,
    sorted and without duplicates, so that equal selectors compare (and hash
    into group ids) equal however they were written.
    """
    if raw is None:
        return LabelSelector()
    if not isinstance(raw, Mapping):
        raise FieldError(field, f"must be a mapping, got {type_name(raw)}")
    labels = parse_labels(raw.get("matchLabels"), f"{field}.matchLabels")
    expressions = raw.get("matchExpressions")
    if expressions is None:
        expressions = []
    if not isinstance(expressions, list):
        raise FieldError(f"{field}.matchExpressions",
                         f"must be a list, got {type_name(expressions)}")
    requirements = {_parse_requirement(entry, f"{field}.matchExpressions[{i}]")
                    for i, entry in enumerate(expressions)}
    return LabelSelector(
        match_labels=tuple(sorted(labels.items())),
        match_expressions=tuple(sorted(requirements,
                                       key=lambda r: (r.key, r.operator, r.values))),
    )


def _parse_requirement(raw: Any, field: str) -> Requirement:
    if not isinstance(raw, Mapping):
        raise FieldError(field, f"must be a mapping, got {type_name(raw)}")
    key = raw.get("key")
    if not isinstance(key, str):
        raise FieldError(f"{field}.key", f"must be a string, got {type_name(key)}")
    if not key:
        raise FieldError(f"{field}.key", "must not be empty")
    operator = raw.get("operator")
    if operator not in OPERATORS:
        raise FieldError(f"{field}.operator",
                         f"unknown operator {operator!r} (must be In, NotIn, Exists "
                         f"or DoesNotExist)")
    values = raw.get("values")
    if values is None:
        values = []
    if not isinstance(values, list):
        raise FieldError(f"{field}.values", f"must be a list, got {type_name(values)}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise FieldError(f"{field}.values[{i}]",
                             f"must be a string, got {type_name(value)}")
    if operator in (IN, NOT_IN) and not values:
        raise FieldError(f"{field}.values", f"must be non-empty when operator is {operator}")
    if operator in (EXISTS, DOES_NOT_EXIST) and values:
        raise FieldError(f"{field}.values", f"must be empty when operator is {operator}")
    return Requirement(key, operator, tuple(sorted(set(values))))


def requirement_matches(requirement: Requirement, labels: Mapping[str, str]) -> bool:
    operator = requirement.operator
    if operator == IN:
        return labels.get(requirement.key) in requirement.values
    if operator == NOT_IN:
        # An absent key is "not in" any set of values.
        return (requirement.key not in labels
                or labels[requirement.key] not in requirement.values)
    if operator == EXISTS:
        return requirement.key in labels
    if operator == DOES_NOT_EXIST:
        return requirement.key not in labels
    raise ValueError(f"unknown label selector operator {operator!r}")


def matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """Every matchLabels pair and every expression holds (the empty selector matches all)."""
    for key, value in selector.match_labels:
        if labels.get(key) != value:
            return False
    for requirement in selector.match_expressions:
        if not requirement_matches(requirement, labels):
            return False
    return True


def namespace_matches(group: GroupSelector, namespace: str,
                      namespace_labels: Mapping[str, str]) -> bool:
    """Whether the group can hold pods of this namespace at all."""
    if group.namespace is not None:
        return group.namespace == namespace
    if group.namespace_selector is None:
        return False
    return matches(group.namespace_selector, namespace_labels)


def pod_selector_matches(group: GroupSelector, labels: Mapping[str, str]) -> bool:
    return group.pod_selector is None or matches(group.pod_selector, labels)


def group_matches(group: GroupSelector, pod: Any,
                  namespace_labels: Optional[Mapping[str, str]]) -> bool:
    """
    Whether C{pod} (a L{contiv.policy.model.Pod}) is a member of the group.
    Pods outside address groups (hostNetwork, finished, without an IP) never
    are: NetworkPolicy does not select hostNetwork pods, and a finished pod's
    address may already belong to another pod.
    """
    if not pod.in_groups:
        return False
    return (namespace_matches(group, pod.namespace, namespace_labels or {})
            and pod_selector_matches(group, pod.labels))
