"""
The incremental policy engine: it takes cluster events one at a time and
keeps the compiled policies, the members of every address group they
reference, and what each node needs, current; and it says what changed since
it was last asked, so that only that is published.

Cost per event: a pod event checks only the groups that could hold the pod
(those of its namespace, and the namespaceSelector groups whose selector
matches its namespace); a namespace event, only namespaceSelector groups and
that namespace's pods; a policy event compiles that policy and fills only the
groups it newly references. Group member tuples and their content keys are
rebuilt only for groups that changed, and only when read.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from collections.abc import Mapping as MappingABC
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from contiv.k8s.events import DELETED, Event
from contiv.policy.compiler import compile_policy
from contiv.policy.model import (
    DEFAULT_NAMESPACE,
    Namespace,
    NetworkPolicy,
    Pod,
    ValidationError,
    implicit_namespace,
    parse_namespace,
    parse_network_policy,
    parse_pod,
)
from contiv.policy.selectors import (
    IN,
    group_matches,
    namespace_matches,
    pod_selector_matches,
)
from contiv.policy.types import (
    CompiledPolicy,
    Group,
    GroupSelector,
    LabelSelector,
    LocalPod,
    Member,
    NodeIndex,
)

# One address of a pod as a group holds it: sort key (ip, pod), the member,
# and the member's canonical JSON (so a group's content key is one hash over
# cached pieces rather than a re-encoding of every member).
_Entry = tuple[tuple[str, str], Member, bytes]
# types.canonical_json's encoding, without building an encoder per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Changes:
    """
    What changed since the previous L{PolicyEngine.take_changes}:
    C{changed_groups} are current groups that are new or whose members (key)
    differ; C{removed_groups} are no longer referenced; C{dirty_nodes} are the
    nodes whose L{NodeIndex} may differ, C{index_nodes} those among them
    whose policies, group ids or local pods may differ (the rest only see
    new versions of groups they already use).
    """

    changed_groups: frozenset[str] = frozenset()
    removed_groups: frozenset[str] = frozenset()
    added_policies: frozenset[str] = frozenset()
    removed_policies: frozenset[str] = frozenset()
    dirty_nodes: frozenset[str] = frozenset()
    index_nodes: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.changed_groups or self.removed_groups or self.added_policies
                    or self.removed_policies or self.dirty_nodes)


class _GroupState:
    """One group's selector, its members kept sorted, and who references it."""

    __slots__ = ("id", "selector", "pods", "sort_keys", "members", "fragments", "nodes",
                 "referrers", "applied_by", "_group", "_key")

    def __init__(self, selector: GroupSelector):
        self.id = selector.id
        self.selector = selector
        self.pods: set[str] = set()  # member pod keys
        # three parallel lists, sorted by sort_keys
        self.sort_keys: list[tuple[str, str]] = []
        self.members: list[Member] = []
        self.fragments: list[bytes] = []
        self.nodes: Counter[str] = Counter()  # member pods per node
        self.referrers: set[str] = set()  # keys of the policies referencing the group
        self.applied_by: set[str] = set()  # keys of the policies applied to it
        self._group: Optional[Group] = None
        self._key: Optional[str] = None

    def fill(self, pods: Iterable[tuple[str, Optional[str], tuple[_Entry, ...]]]) -> None:
        entries: list[_Entry] = []
        for pod_key, node, pod_entries in pods:
            self.pods.add(pod_key)
            if node is not None:
                self.nodes[node] += 1
            entries.extend(pod_entries)
        entries.sort(key=lambda entry: entry[0])
        self.sort_keys = [e[0] for e in entries]
        self.members = [e[1] for e in entries]
        self.fragments = [e[2] for e in entries]
        self._stale()

    def add(self, pod_key: str, node: Optional[str], entries: tuple[_Entry, ...]) -> None:
        self.pods.add(pod_key)
        if node is not None:
            self.nodes[node] += 1
        for sort_key, member, fragment in entries:
            at = bisect_left(self.sort_keys, sort_key)
            self.sort_keys.insert(at, sort_key)
            self.members.insert(at, member)
            self.fragments.insert(at, fragment)
        self._stale()

    def remove(self, pod_key: str, node: Optional[str], entries: tuple[_Entry, ...]) -> None:
        self.pods.discard(pod_key)
        if node is not None:
            self.nodes[node] -= 1
            if self.nodes[node] <= 0:
                del self.nodes[node]
        for sort_key, _, _ in entries:
            at = bisect_left(self.sort_keys, sort_key)
            if at < len(self.sort_keys) and self.sort_keys[at] == sort_key:
                del self.sort_keys[at]
                del self.members[at]
                del self.fragments[at]
        self._stale()

    def _stale(self) -> None:
        self._group = None
        self._key = None

    @property
    def group(self) -> Group:
        if self._group is None:
            group = Group(self.id, tuple(self.members))
            # Group.key and Group.canonical are cached properties: fill them
            # from the member encodings kept here instead of encoding every
            # member again when the group is published.
            group.__dict__["key"] = self.key
            group.__dict__["canonical"] = (b'{"id":' + _CANONICAL.encode(self.id).encode()
                                           + b',"members":[' + b",".join(self.fragments)
                                           + b"]}")
            self._group = group
        return self._group

    @property
    def key(self) -> str:
        """Equal to C{self.group.key}, from the cached member encodings."""
        if self._key is None:
            members_json = b"[" + b",".join(self.fragments) + b"]"
            self._key = self.id + "." + hashlib.sha256(members_json).hexdigest()[:16]
        return self._key


class _GroupsView(MappingABC):
    """The current groups, by id; each member tuple is built on first read after a change."""

    def __init__(self, states: Mapping[str, _GroupState]):
        self._states = states

    def __getitem__(self, group_id: str) -> Group:
        return self._states[group_id].group

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)


def _member_entries(pod: Pod) -> tuple[_Entry, ...]:
    entries = []
    for ip in pod.ips:
        member = Member(ip, pod.key, pod.named_ports)
        entries.append(((ip, pod.key), member, _CANONICAL.encode(member.to_json()).encode()))
    return tuple(entries)


def _local_pod(pod: Optional[Pod]) -> Optional[LocalPod]:
    if pod is None:
        return None
    return LocalPod(pod.key, pod.ips, pod.named_ports)


def _event_key(event: Event) -> str:
    """
    The object's key as the engine files it: from its metadata, with the API
    server's default namespace, so that it equals the parsed object's key.
    """
    metadata = event.object.get("metadata") if isinstance(event.object, Mapping) else None
    if isinstance(metadata, Mapping) and isinstance(metadata.get("name"), str):
        name = metadata["name"]
        if event.kind == "Namespace":
            return name
        namespace = metadata.get("namespace") or DEFAULT_NAMESPACE
        if isinstance(namespace, str):
            return f"{namespace}/{name}"
    return event.key


class PolicyEngine:
    """
    Cluster events in; compiled policies, group members and node indexes out.

    C{errors} maps C{"<Kind> <key>"} to the message of every object currently
    rejected; a rejected object leaves its previous valid version in force.
    """

    # kind -> (its parser, the method that folds a parsed object, or None, in)
    _HANDLERS: dict[str, tuple[Callable[[Any], Any], str]] = {
        "Namespace": (parse_namespace, "_set_namespace"),
        "Pod": (parse_pod, "_set_pod"),
        "NetworkPolicy": (parse_network_policy, "_set_policy"),
    }

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._pods: dict[str, Pod] = {}
        # Indexes of the pods that can be group members (Pod.in_groups):
        self._grouped_pods_in: dict[str, dict[str, Pod]] = {}  # namespace -> key -> pod
        self._grouped_pods_on: dict[str, dict[str, Pod]] = {}  # node -> key -> pod
        self._grouped_pods_with: dict[tuple[str, str], set[str]] = {}  # label pair -> keys
        self._grouped_pods_at: dict[str, dict[str, Pod]] = {}  # ip -> key -> pod
        self._entries: dict[str, tuple[_Entry, ...]] = {}  # pod key -> its member entries
        self._member_of: dict[str, set[str]] = {}  # pod key -> group ids
        self._pod_count_on: Counter[str] = Counter()  # node -> all its pods, grouped or not

        self._compiled: dict[str, CompiledPolicy] = {}  # policy key -> compiled
        self._policy_ids: dict[str, str] = {}  # policy key -> id (a hash, worth keeping)
        self._policies: dict[str, CompiledPolicy] = {}  # policy id -> compiled
        self._groups: dict[str, _GroupState] = {}
        self._groups_in: dict[str, set[str]] = {}  # namespace -> ids of its fixed groups
        self._selector_groups: set[str] = set()  # ids of namespaceSelector groups
        # namespace -> ids of the namespaceSelector groups matching it (a cache)
        self._selector_groups_matching: dict[str, set[str]] = {}

        self.policies: Mapping[str, CompiledPolicy] = MappingProxyType(self._policies)
        self.groups: Mapping[str, Group] = _GroupsView(self._groups)

        # Since the last take_changes:
        self._touched_groups: set[str] = set()
        self._touched_policies: set[str] = set()
        self._dirty_nodes: set[str] = set()
        # node -> (its policies, the ids of the groups they reference, its
        # local pods): kept until a pod or policy change marks the node, since
        # a group's new members change only the keys, not which groups.
        self._node_contents: dict[str, tuple[tuple[str, ...], tuple[str, ...],
                                             tuple[LocalPod, ...]]] = {}
        # As of the last take_changes:
        self._taken_group_keys: dict[str, str] = {}
        self._taken_policies: set[str] = set()

    # -- events

    def apply(self, event: Event) -> None:
        """Fold one event in. Other kinds are ignored; a bad object is recorded in C{errors}."""
        if event.kind not in self._HANDLERS:
            return
        parse, update_name = self._HANDLERS[event.kind]
        update: Callable[[str, Any], None] = getattr(self, update_name)
        key = _event_key(event)
        error_key = f"{event.kind} {key}"
        if event.type == DELETED:
            self.errors.pop(error_key, None)
            update(key, None)
            return
        try:
            parsed = parse(event.object)
        except ValidationError as error:
            self.errors[error_key] = str(error)
            return
        except Exception as error:
            # The parser is meant to turn every bad input into a
            # ValidationError; if one slips past, the object is still only
            # rejected, never the event stream.
            self.errors[error_key] = f"{event.kind} {key}: cannot be parsed: {error!r}"
            return
        self.errors.pop(error_key, None)
        update(key, parsed)

    def _namespace_labels(self, name: str) -> Mapping[str, str]:
        namespace = self._namespaces.get(name)
        return (namespace or implicit_namespace(name)).labels

    def _set_namespace(self, name: str, namespace: Optional[Namespace]) -> None:
        old_labels = self._namespace_labels(name)
        if namespace is None:
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = namespace
        new_labels = self._namespace_labels(name)
        if old_labels == new_labels:
            return
        pods = self._grouped_pods_in.get(name, {})
        matching = set()
        for group_id in self._selector_groups:
            state = self._groups[group_id]
            now = namespace_matches(state.selector, name, new_labels)
            if now:
                matching.add(group_id)
            if now == namespace_matches(state.selector, name, old_labels):
                continue
            for pod in pods.values():
                if pod_selector_matches(state.selector, pod.labels):
                    if now:
                        self._join(state, pod)
                    else:
                        self._leave(state, pod)
        self._selector_groups_matching[name] = matching

    def _join(self, state: _GroupState, pod: Pod) -> None:
        state.add(pod.key, pod.node, self._entries[pod.key])
        self._member_of.setdefault(pod.key, set()).add(state.id)
        self._touched_groups.add(state.id)
        if state.applied_by and pod.node is not None:
            self._mark_nodes((pod.node,))

    def _leave(self, state: _GroupState, pod: Pod) -> None:
        state.remove(pod.key, pod.node, self._entries[pod.key])
        self._member_of[pod.key].discard(state.id)
        self._touched_groups.add(state.id)
        if state.applied_by and pod.node is not None:
            self._mark_nodes((pod.node,))

    def _selector_groups_for(self, namespace: str) -> set[str]:
        matching = self._selector_groups_matching.get(namespace)
        if matching is None:
            labels = self._namespace_labels(namespace)
            matching = {group_id for group_id in self._selector_groups
                        if namespace_matches(self._groups[group_id].selector, namespace, labels)}
            self._selector_groups_matching[namespace] = matching
        return matching

    def _set_pod(self, key: str, pod: Optional[Pod]) -> None:
        old = self._pods.get(key)
        if old == pod:
            return
        if pod is None:
            del self._pods[key]
        else:
            self._pods[key] = pod
        if (old.node if old else None) != (pod.node if pod else None):
            self._count_on_node(old, -1)
            self._count_on_node(pod, +1)

        before = old if old is not None and old.in_groups else None
        after = pod if pod is not None and pod.in_groups else None
        if before is not None:
            self._unindex(before)
        if after is not None:
            self._index(after)
        old_entries = self._entries.get(key, ())
        new_entries = _member_entries(after) if after is not None else ()
        old_node = before.node if before is not None else None
        new_node = after.node if after is not None else None
        same_member = old_entries == new_entries and old_node == new_node

        was_in = self._member_of.get(key, set())
        candidates = set(was_in)
        labels: Mapping[str, str] = {}
        if after is not None:
            candidates.update(self._groups_in.get(after.namespace, ()))
            candidates.update(self._selector_groups_for(after.namespace))
            labels = self._namespace_labels(after.namespace)
        now_in = set()
        applied_to_changed = False
        for group_id in candidates:
            state = self._groups[group_id]
            is_member = after is not None and group_matches(state.selector, after, labels)
            was_member = group_id in was_in
            if is_member:
                now_in.add(group_id)
            if (was_member == is_member) and (not is_member or same_member):
                continue
            if was_member:
                state.remove(key, old_node, old_entries)
            if is_member:
                state.add(key, new_node, new_entries)
            self._touched_groups.add(group_id)
            if state.applied_by:
                applied_to_changed = True

        if new_entries:
            self._entries[key] = new_entries
        else:
            self._entries.pop(key, None)
        if now_in:
            self._member_of[key] = now_in
        else:
            self._member_of.pop(key, None)
        if applied_to_changed or (old_node, _local_pod(before)) != (new_node, _local_pod(after)):
            self._mark_nodes(n for n in (old_node, new_node) if n is not None)

    def _mark_nodes(self, nodes: Iterable[str]) -> None:
        """These nodes' policies or local pods may have changed."""
        for node in nodes:
            self._dirty_nodes.add(node)
            self._node_contents.pop(node, None)

    def _count_on_node(self, pod: Optional[Pod], change: int) -> None:
        """Count every pod per node; a node appearing or disappearing changes its index."""
        if pod is None or pod.node is None:
            return
        before = self._pod_count_on[pod.node]
        self._pod_count_on[pod.node] += change
        after = self._pod_count_on[pod.node]
        if after <= 0:
            del self._pod_count_on[pod.node]
        if (before > 0) != (after > 0):
            self._mark_nodes((pod.node,))

    def _index(self, pod: Pod) -> None:
        self._grouped_pods_in.setdefault(pod.namespace, {})[pod.key] = pod
        if pod.node is not None:
            self._grouped_pods_on.setdefault(pod.node, {})[pod.key] = pod
        for pair in pod.labels.items():
            self._grouped_pods_with.setdefault(pair, set()).add(pod.key)
        for ip in pod.ips:
            self._grouped_pods_at.setdefault(ip, {})[pod.key] = pod

    def _unindex(self, pod: Pod) -> None:
        _discard(self._grouped_pods_in, pod.namespace, pod.key)
        if pod.node is not None:
            _discard(self._grouped_pods_on, pod.node, pod.key)
        for pair in pod.labels.items():
            _discard(self._grouped_pods_with, pair, pod.key)
        for ip in pod.ips:
            _discard(self._grouped_pods_at, ip, pod.key)

    def _set_policy(self, key: str, policy: Optional[NetworkPolicy]) -> None:
        old = self._compiled.get(key)
        if policy is None:
            if old is not None:
                del self._compiled[key]
                del self._policy_ids[key]
                self._retire(key, old, None)
            return
        compiled, selectors = compile_policy(policy)
        if old is not None and old.id == compiled.id:
            return
        for selector in selectors:
            self._ensure_group(selector)
        for group_id in compiled.group_ids():
            self._groups[group_id].referrers.add(key)
        self._groups[compiled.applied_to].applied_by.add(key)
        self._compiled[key] = compiled
        self._policy_ids[key] = compiled.id
        self._policies[compiled.id] = compiled
        self._touched_policies.add(compiled.id)
        self._mark_nodes(self._groups[compiled.applied_to].nodes)
        if old is not None:
            self._retire(key, old, compiled)

    def _retire(self, key: str, old: CompiledPolicy, new: Optional[CompiledPolicy]) -> None:
        """Take C{old} out of force; drop the groups nothing references any longer."""
        self._mark_nodes(self._groups[old.applied_to].nodes)
        del self._policies[old.id]
        self._touched_policies.add(old.id)
        if new is None or new.applied_to != old.applied_to:
            self._groups[old.applied_to].applied_by.discard(key)
        kept = set(new.group_ids()) if new is not None else set()
        for group_id in old.group_ids():
            if group_id in kept:
                continue
            state = self._groups[group_id]
            state.referrers.discard(key)
            if not state.referrers:
                self._drop_group(state)

    def _ensure_group(self, selector: GroupSelector) -> None:
        group_id = selector.id
        if group_id in self._groups:
            return
        state = _GroupState(selector)
        members = list(self._matching_pods(selector))
        state.fill((pod.key, pod.node, self._entries[pod.key]) for pod in members)
        for pod in members:
            self._member_of.setdefault(pod.key, set()).add(group_id)
        self._groups[group_id] = state
        if selector.namespace is not None:
            self._groups_in.setdefault(selector.namespace, set()).add(group_id)
        else:
            self._selector_groups.add(group_id)
            for namespace, matching in self._selector_groups_matching.items():
                if namespace_matches(selector, namespace, self._namespace_labels(namespace)):
                    matching.add(group_id)
        self._touched_groups.add(group_id)

    def _matching_pods(self, selector: GroupSelector) -> Iterator[Pod]:
        if selector.namespace is not None:
            namespaces = [selector.namespace]
        else:
            namespaces = [name for name in self._grouped_pods_in
                          if namespace_matches(selector, name, self._namespace_labels(name))]
        in_namespaces = sum(len(self._grouped_pods_in.get(n, ())) for n in namespaces)
        narrowest = self._pods_carrying(selector.pod_selector)
        if narrowest is not None and len(narrowest) < in_namespaces:
            wanted = set(namespaces)
            candidates: Iterable[Pod] = (self._pods[k] for k in narrowest
                                         if self._pods[k].namespace in wanted)
        else:
            candidates = (pod for n in namespaces
                          for pod in self._grouped_pods_in.get(n, {}).values())
        labels_of: dict[str, Mapping[str, str]] = {}
        for pod in candidates:
            if pod.namespace not in labels_of:
                labels_of[pod.namespace] = self._namespace_labels(pod.namespace)
            if group_matches(selector, pod, labels_of[pod.namespace]):
                yield pod

    def _pods_carrying(self, selector: Optional[LabelSelector]) -> Optional[set[str]]:
        """
        The smallest set of pods that holds every match of the selector, as
        the label index gives it (a matchLabels pair, or an In's values), or
        None when the selector requires no label value. For a selector across
        namespaces this is usually far fewer pods than the namespaces hold.
        """
        if selector is None:
            return None
        narrowest: Optional[set[str]] = None
        for pair in selector.match_labels:
            carrying = self._grouped_pods_with.get(pair, set())
            if narrowest is None or len(carrying) < len(narrowest):
                narrowest = carrying
        for requirement in selector.match_expressions:
            if requirement.operator == IN:
                carrying = set().union(*(self._grouped_pods_with.get((requirement.key, value), ())
                                         for value in requirement.values))
                if narrowest is None or len(carrying) < len(narrowest):
                    narrowest = carrying
        return narrowest

    def _drop_group(self, state: _GroupState) -> None:
        del self._groups[state.id]
        if state.selector.namespace is not None:
            _discard(self._groups_in, state.selector.namespace, state.id)
        else:
            self._selector_groups.discard(state.id)
            for matching in self._selector_groups_matching.values():
                matching.discard(state.id)
        for pod_key in state.pods:
            groups = self._member_of.get(pod_key)
            if groups is not None:
                groups.discard(state.id)
                if not groups:
                    del self._member_of[pod_key]
        self._touched_groups.add(state.id)

    # -- output

    def pods_by_ip(self) -> Mapping[str, Pod]:
        """Every address of a pod that can be a group member; on a clash, the first pod by key."""
        return {ip: pods[min(pods)] for ip, pods in self._grouped_pods_at.items()}

    def nodes(self) -> set[str]:
        """Nodes with pods (group members or not), and those that lost theirs since take_changes."""
        return set(self._pod_count_on) | self._dirty_nodes

    def node_index(self, node: str) -> NodeIndex:
        contents = self._node_contents.get(node)
        if contents is None:
            contents = self._node_contents[node] = self._contents_of(node)
        policy_ids, group_ids, pods = contents
        return NodeIndex(
            node=node,
            policies=policy_ids,
            # Keys are "<id>.<hash>" with ids of one length: in id order, they
            # are sorted, so no sort per index (a pod event rebuilds many).
            groups=tuple([self._groups[group_id].key for group_id in group_ids]),
            pods=pods,
        )

    def _contents_of(self, node: str) -> tuple[tuple[str, ...], tuple[str, ...],
                                                tuple[LocalPod, ...]]:
        local = self._grouped_pods_on.get(node, {})
        policy_keys: set[str] = set()
        for pod_key in local:
            for group_id in self._member_of.get(pod_key, ()):
                policy_keys.update(self._groups[group_id].applied_by)
        policies = [self._compiled[k] for k in policy_keys]
        group_ids = tuple(sorted({group_id for policy in policies
                                  for group_id in policy.group_ids()}))
        pods = tuple(LocalPod(k, local[k].ips, local[k].named_ports) for k in sorted(local))
        return tuple(sorted(self._policy_ids[k] for k in policy_keys)), group_ids, pods

    def take_changes(self) -> Changes:
        changed_groups, removed_groups = set(), set()
        for group_id in self._touched_groups:
            state = self._groups.get(group_id)
            if state is None:
                if self._taken_group_keys.pop(group_id, None) is not None:
                    removed_groups.add(group_id)
            elif self._taken_group_keys.get(group_id) != state.key:
                self._taken_group_keys[group_id] = state.key
                changed_groups.add(group_id)
        added_policies, removed_policies = set(), set()
        for policy_id in self._touched_policies:
            if policy_id in self._policies and policy_id not in self._taken_policies:
                added_policies.add(policy_id)
                self._taken_policies.add(policy_id)
            elif policy_id not in self._policies and policy_id in self._taken_policies:
                removed_policies.add(policy_id)
                self._taken_policies.discard(policy_id)
        index_nodes = frozenset(self._dirty_nodes)
        dirty_nodes = set(index_nodes)
        # A group's new key reaches every node holding a policy that references it.
        for group_id in changed_groups:
            for policy_key in self._groups[group_id].referrers:
                applied_to = self._compiled[policy_key].applied_to
                dirty_nodes.update(self._groups[applied_to].nodes)
        self._touched_groups.clear()
        self._touched_policies.clear()
        self._dirty_nodes.clear()
        return Changes(frozenset(changed_groups), frozenset(removed_groups),
                       frozenset(added_policies), frozenset(removed_policies),
                       frozenset(dirty_nodes), index_nodes)


def _discard(index: dict, key: Any, item: str) -> None:
    """Remove C{item} from the set or dict at C{index[key]}, and the entry once empty."""
    held = index.get(key)
    if held is None:
        return
    if isinstance(held, dict):
        held.pop(item, None)
    else:
        held.discard(item)
    if not held:
        del index[key]
