"""
The store layout (DESIGN.md, "Store layout"): how netmaster publishes compiled
policies, address groups and node indexes, and how netplugin reads its node's
share back.

Every key is C{prefix + name}:

  - C{gen}: the generation, an ASCII decimal counter, bumped last by every publish
  - C{epoch}: a random token (JSON string) written by every full publish; when it is
    gone or not the one this publisher wrote, the store lost data: publish everything
  - C{node/<node>}: C{{"generation": g, "index": NodeIndex}}, rewritten in place
  - C{policy/<id>}, C{group/<key>}: one L{CompiledPolicy} / L{Group}, immutable
    (the id or key carries the content hash), so a reader never sees a torn entry

Values are compact JSON with sorted keys. A value larger than the item size is
stored as chunks C{<key>/0 .. <key>/n-1} plus, at C{<key>}, a header
C{{"chunked": {"count": n, "sha256": hex, "size": bytes}}} that lets the reader
check that the chunks it got belong together.

Ordering is what makes a reader's view consistent without transactions:
entries first, then the indexes that name them, then the epoch, then C{gen}.
A reader that sees a new C{gen} finds everything it names, unless memcached
evicted or lost it, which the reader reports instead of using half a state.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from twisted.logger import Logger

from contiv.policy.types import CompiledPolicy, Group, NodeIndex, canonical_json
from contiv.store import StoreError, StoreUnavailable, check_key

DEFAULT_PREFIX = "contiv/"
# Below memcached's default 1 MiB item, with room for the item header and key.
DEFAULT_ITEM_SIZE = 1_000_000
GEN = "gen"
EPOCH = "epoch"


def policy_name(policy_id: str) -> str:
    return "policy/" + policy_id


def group_name(group_key: str) -> str:
    return "group/" + group_key


def node_name(node: str) -> str:
    return "node/" + node


@dataclass(frozen=True)
class NodeState:
    """One complete, consistent view of a node's share of the store."""

    generation: int
    index: NodeIndex
    policies: Mapping[str, CompiledPolicy]  # by policy id
    groups: Mapping[str, Group]  # by Group.key


@dataclass(frozen=True)
class _ChunkHeader:
    count: int
    sha256: str
    size: int

    def keys(self, key: str) -> list[str]:
        return [f"{key}/{i}" for i in range(self.count)]


def _chunk_header(doc: Any) -> Optional[_ChunkHeader]:
    """The chunk header that C{doc} is, or None if it is an entry itself."""
    # No entry's JSON is an object whose only member is "chunked".
    if not (isinstance(doc, dict) and set(doc) == {"chunked"}):
        return None
    body = doc["chunked"]
    if not isinstance(body, dict):
        raise ValueError("chunk header is not an object")
    count, sha, size = body.get("count"), body.get("sha256"), body.get("size")
    if (not isinstance(count, int) or isinstance(count, bool) or count < 1
            or not isinstance(size, int) or isinstance(size, bool) or size < 0
            or not isinstance(sha, str) or len(sha) != 64):
        raise ValueError(f"chunk header has bad count, size or sha256: {body!r}")
    return _ChunkHeader(count, sha, size)


def _parse_generation(raw: bytes) -> int:
    if not raw.isdigit():
        raise ValueError(f"not a decimal counter: {raw[:40]!r}")
    return int(raw)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9._-]+")


class Publisher:
    """
    netmaster's side. Remembers which immutable entries it has written, so
    that a publish sends only what is new; L{verify} and C{full=True} are how
    that belief is corrected when memcached loses data.
    """

    log = Logger()

    def __init__(self, store: Any, *, prefix: str = DEFAULT_PREFIX, clock: Any,
                 grace_period: float = 60.0, item_size: int = DEFAULT_ITEM_SIZE) -> None:
        if item_size < 1:
            raise ValueError(f"item_size must be positive, got {item_size}")
        self.store = store
        self.prefix = prefix
        self.clock = clock
        self.grace_period = grace_period
        self.item_size = item_size
        self._gen_key = check_key(prefix + GEN)
        self._epoch_key = check_key(prefix + EPOCH)
        # entry name (policy/<id>, group/<key>) -> every store key it occupies
        # (the value, or the header and its chunks); kept across full
        # publishes so that garbage collection still finds them.
        self._stored: dict[str, tuple[str, ...]] = {}
        # what this publisher believes is in the store now: full=True and
        # verify() take entries out so that the next publish rewrites them.
        self._written: set[str] = set()
        self._index_chunks: dict[str, int] = {}  # node -> chunks of its index as written
        self._unreferenced_since: dict[str, float] = {}
        # node -> (the pods tuple last encoded, its canonical JSON); likewise
        # for the policy ids, which change far less often than group keys
        self._pods_json: dict[str, tuple[tuple, bytes]] = {}
        self._policies_json: dict[str, tuple[tuple, bytes]] = {}
        self.epoch: Optional[str] = None
        self.generation = 0

    def key(self, name: str) -> str:
        return check_key(self.prefix + name)

    def written(self) -> list[str]:
        """The entry names (without prefix) this publisher believes are in the store."""
        return sorted(self._written | {node_name(n) for n in self._index_chunks})

    async def epoch_intact(self) -> bool:
        """
        False when the epoch this publisher wrote is not in the store (it never
        wrote one, memcached restarted, or evicted it): publish with full=True.
        Store errors propagate: "cannot tell" is not "lost".
        """
        if self.epoch is None:
            return False
        found = await self.store.get_many([self._epoch_key])
        return found.get(self._epoch_key) == canonical_json(self.epoch)

    async def publish(self, *, policies: Iterable[CompiledPolicy], groups: Iterable[Group],
                      nodes: Iterable[NodeIndex], full: bool = False) -> int:
        """
        Write the given policies and groups not written before, then the given
        node indexes, then (full) a new epoch, then bump C{gen}; return the new
        generation. C{full}: write every given entry, whatever is believed
        written. A refused write raises L{StoreError} and bumps nothing, so
        readers stay on the previous generation.
        """
        if full:
            self._written.clear()
        entries: dict[str, bytes] = {}
        occupies: dict[str, tuple[str, ...]] = {}
        for name, data in [*((policy_name(p.id), p) for p in policies),
                           *((group_name(g.key), g) for g in groups)]:
            if name in self._written or name in occupies:
                continue
            items = self._encode_bytes(name, data.canonical if isinstance(data, Group)
                                       else canonical_json(data.to_json()))
            entries.update(items)
            occupies[name] = tuple(items)

        # The indexes name the generation they belong to: the one this
        # publish is about to make, and never one this publisher already used.
        found = await self.store.get_many([self._gen_key])
        current = self._stored_generation(found.get(self._gen_key))
        target = max(current or 0, self.generation) + 1

        if entries:
            await self.store.set_many(entries)
        self._written.update(occupies)
        self._stored.update(occupies)
        for name in occupies:
            self._unreferenced_since.pop(name, None)

        indexes: dict[str, bytes] = {}
        stale_chunks: list[str] = []
        index_chunks: dict[str, int] = {}
        for index in nodes:
            name = node_name(index.node)
            items = self._encode_bytes(name, self._index_bytes(index, target))
            indexes.update(items)
            count = len(items) - 1 if len(items) > 1 else 0
            index_chunks[index.node] = count
            before = self._index_chunks.get(index.node, 0)
            stale_chunks.extend(f"{self.key(name)}/{i}" for i in range(count, before))
        if indexes:
            await self.store.set_many(indexes)
        self._index_chunks.update(index_chunks)

        if full:
            epoch = secrets.token_hex(16)
            await self.store.set_many({self._epoch_key: canonical_json(epoch)})
            self.epoch = epoch

        generation = await self._bump(target)
        if stale_chunks:
            # Leftovers of a longer index: the one written above needs fewer chunks.
            await self.store.delete_many(stale_chunks)
        self.log.info("published generation {generation}: {entries} new entries "
                      "({size} bytes), {nodes} node indexes{full}",
                      generation=generation, entries=len(occupies),
                      size=sum(len(v) for v in entries.values()), nodes=len(index_chunks),
                      full=" (full)" if full else "")
        return generation

    async def collect_garbage(self, live_policy_ids: Iterable[str],
                              live_group_keys: Iterable[str]) -> int:
        """
        Delete the entries this publisher wrote that have been out of the
        live sets for longer than the grace period (readers still on an older
        index may be fetching them). The clock starts when a call first sees
        an entry unreferenced. Returns how many entries were deleted.
        """
        now = self.clock.seconds()
        live = ({policy_name(i) for i in live_policy_ids}
                | {group_name(k) for k in live_group_keys})
        doomed = []
        for name in self._stored:
            if name in live:
                self._unreferenced_since.pop(name, None)
                continue
            since = self._unreferenced_since.setdefault(name, now)
            if now - since > self.grace_period:
                doomed.append(name)
        if not doomed:
            return 0
        await self.store.delete_many([key for name in doomed for key in self._stored[name]])
        for name in doomed:
            del self._stored[name]
            self._written.discard(name)
            del self._unreferenced_since[name]
        self.log.info("deleted {count} entries unreferenced for over {grace} s",
                      count=len(doomed), grace=self.grace_period)
        return len(doomed)

    async def verify(self, keys: Iterable[str]) -> list[str]:
        """
        Which of these entry names (C{policy/<id>}, C{group/<key>},
        C{node/<node>}; without prefix) are missing now, a chunked entry
        counting as missing when any chunk is. Missing entries are no longer
        believed written, so the next publish rewrites them (node indexes:
        the caller passes them again).
        """
        names = list(dict.fromkeys(keys))
        if not names:
            return []
        found = await self.store.get_many([self.key(name) for name in names])
        missing = set()
        chunk_keys: dict[str, list[str]] = {}
        for name in names:
            raw = found.get(self.key(name))
            if raw is None:
                missing.add(name)
                continue
            try:
                header = _chunk_header(json.loads(raw))
            except ValueError:
                # Undecodable is as bad as missing: rewriting it is the cure.
                missing.add(name)
                continue
            if header is not None:
                chunk_keys[name] = header.keys(self.key(name))
        if chunk_keys:
            chunks = await self.store.get_many([k for ks in chunk_keys.values() for k in ks])
            missing.update(name for name, ks in chunk_keys.items()
                           if any(k not in chunks for k in ks))
        for name in missing:
            self._written.discard(name)
        result = [name for name in names if name in missing]
        if result:
            self.log.warn("{count} store entries are missing (evicted?): {first}",
                          count=len(result), first=", ".join(result[:5]))
        return result

    # -- helpers

    def _index_bytes(self, index: NodeIndex, generation: int) -> bytes:
        """
        The canonical JSON of C{{"generation", "index"}}, reusing the encoding
        of the node's local pods while the engine hands over the same pods
        tuple: a pod event elsewhere changes group keys in many indexes, but
        not their (large) pod lists.
        """
        cached = self._pods_json.get(index.node)
        if cached is not None and cached[0] is index.pods:
            pods = cached[1]
        else:
            pods = canonical_json([pod.to_json() for pod in index.pods])
            self._pods_json[index.node] = (index.pods, pods)
        cached = self._policies_json.get(index.node)
        if cached is not None and cached[0] is index.policies:
            policies = cached[1]
        else:
            policies = canonical_json(list(index.policies))
            self._policies_json[index.node] = (index.policies, policies)
        if all(_PLAIN_KEY.fullmatch(key) for key in index.groups):
            # Group keys are "g.<hex>.<hex>": their JSON is the text in quotes,
            # and joining is several times faster than the encoder for the
            # hundreds of keys a busy node's index holds.
            groups = ('["' + '","'.join(index.groups) + '"]').encode() if index.groups \
                else b"[]"
        else:
            groups = canonical_json(list(index.groups))
        return (b'{"generation":' + str(generation).encode() + b',"index":{"groups":' + groups
                + b',"node":' + canonical_json(index.node) + b',"pods":' + pods
                + b',"policies":' + policies + b"}}")

    def _encode(self, name: str, doc: Any) -> dict[str, bytes]:
        return self._encode_bytes(name, canonical_json(doc))

    def _encode_bytes(self, name: str, data: bytes) -> dict[str, bytes]:
        key = self.key(name)
        if len(data) <= self.item_size:
            return {key: data}
        size = self.item_size
        count = -(-len(data) // size)
        items = {check_key(f"{key}/{i}"): data[i * size:(i + 1) * size] for i in range(count)}
        # The header goes after its chunks, so that it never names chunks not yet sent.
        items[key] = canonical_json({"chunked": {
            "count": count, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}})
        return items

    def _stored_generation(self, raw: Optional[bytes]) -> Optional[int]:
        if raw is None:
            return None
        try:
            return _parse_generation(raw)
        except ValueError:
            raise StoreError(f"{self._gen_key} holds {raw[:40]!r}, not a generation",
                             [self._gen_key]) from None

    async def _bump(self, target: int) -> int:
        value = await self.store.incr(self._gen_key)
        if value is None:
            # memcached lost the counter: continue from our own count, so
            # that readers never see a generation they already had.
            if await self.store.add(self._gen_key, str(target).encode()):
                value = target
            else:
                value = await self.store.incr(self._gen_key)
                if value is None:
                    raise StoreError(f"{self._gen_key} appeared and vanished while "
                                     f"publishing", [self._gen_key])
        if value <= self.generation:
            value = target
            await self.store.set_many({self._gen_key: str(value).encode()})
        if value != target:
            self.log.info("generation is {value}, expected {target}: another publisher, "
                          "or the counter changed under this one",
                          value=value, target=target)
        self.generation = value
        return value


class Reader:
    """
    netplugin's side. L{poll} returns a new complete L{NodeState} when the
    generation moved and everything the node's index names could be read,
    else None; L{state} stays the last complete one, and L{problem} says why
    the newest could not be had (naming the key).
    """

    log = Logger()

    def __init__(self, store: Any, node: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.store = store
        self.node = node
        self.prefix = prefix
        self._gen_key = check_key(prefix + GEN)
        self._index_key = check_key(prefix + node_name(node))
        self.state: Optional[NodeState] = None
        self.problem: Optional[str] = None
        self.index_generation: Optional[int] = None  # what the index says it belongs to
        self._seen: Optional[int] = None  # gen of the last complete poll
        # Entries held: the current state's, plus any fetched for a newer
        # index that could not be completed yet (so they are not fetched twice).
        self._policies: dict[str, CompiledPolicy] = {}
        self._groups: dict[str, Group] = {}

    async def poll(self) -> Optional[NodeState]:
        try:
            return await self._poll()
        except StoreUnavailable as e:
            return self._fail(f"store unavailable: {e}")
        except StoreError as e:
            return self._fail(f"store error: {e}")
        except Exception as e:
            self.log.failure("reading {node}'s share of the store", node=self.node)
            return self._fail(f"unexpected error reading the store: {e!r}")

    async def _poll(self) -> Optional[NodeState]:
        found = await self.store.get_many([self._gen_key])
        raw = found.get(self._gen_key)
        if raw is None:
            return self._fail(f"{self._gen_key} missing: nothing published yet, or the "
                              f"store lost its data")
        try:
            generation = _parse_generation(raw)
        except ValueError as e:
            return self._fail(f"{self._gen_key} malformed: {e}")
        if generation == self._seen and self.problem is None:
            return None

        docs, problems = await self._fetch([self._index_key])
        if problems:
            return self._fail(problems[self._index_key])
        try:
            doc = docs[self._index_key]
            index = NodeIndex.from_json(doc["index"])
            index_generation = doc["generation"]
        except Exception as e:
            return self._fail(f"{self._index_key} malformed: {e!r}")
        if index.node != self.node:
            return self._fail(f"{self._index_key} names node {index.node!r}")
        if (self.state is not None and self.state.generation == generation
                and self.state.index == index):
            # Back after a failed poll to what is already held: nothing new to apply.
            self._recovered(generation, index_generation)
            return None

        wanted_policies = {self.prefix + policy_name(i): i for i in index.policies
                           if i not in self._policies}
        wanted_groups = {self.prefix + group_name(k): k for k in index.groups
                         if k not in self._groups}
        problems = {}
        if wanted_policies or wanted_groups:
            docs, problems = await self._fetch([*wanted_policies, *wanted_groups])
            for key, doc in docs.items():
                try:
                    if key in wanted_policies:
                        self._policies[wanted_policies[key]] = CompiledPolicy.from_json(doc)
                    else:
                        group = Group.from_json(doc)
                        if not wanted_groups[key].startswith(group.id + "."):
                            raise ValueError(f"holds group {group.id}")
                        self._groups[wanted_groups[key]] = group
                except Exception as e:
                    problems[key] = f"{key} malformed: {e!r}"
        if problems:
            self._trim(index)
            listed = sorted(problems.values())
            more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
            return self._fail(listed[0] + more)

        state = NodeState(
            generation=generation, index=index,
            policies=MappingProxyType({i: self._policies[i] for i in index.policies}),
            groups=MappingProxyType({k: self._groups[k] for k in index.groups}))
        # Memory follows the node's share: drop what the newest index does not name.
        self._policies = dict(state.policies)
        self._groups = dict(state.groups)
        self.state = state
        self._recovered(generation, index_generation)
        return state

    def _recovered(self, generation: int, index_generation: Any) -> None:
        if self.problem is not None:
            self.log.info("store reader for {node} complete again at generation "
                          "{generation}", node=self.node, generation=generation)
        self.problem, self._seen = None, generation
        self.index_generation = index_generation

    async def _fetch(self, keys: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """
        The decoded JSON of each key, reassembling chunked values; problems by
        key for those missing or undecodable. One get_many for the keys, one
        more for all the chunks their headers name.
        """
        found = await self.store.get_many(keys)
        docs: dict[str, Any] = {}
        problems: dict[str, str] = {}
        headers: dict[str, _ChunkHeader] = {}
        for key in keys:
            raw = found.get(key)
            if raw is None:
                problems[key] = f"{key} missing"
                continue
            try:
                doc = json.loads(raw)
                header = _chunk_header(doc)
            except ValueError as e:
                problems[key] = f"{key} malformed: {e}"
                continue
            if header is None:
                docs[key] = doc
            else:
                headers[key] = header
        if not headers:
            return docs, problems
        chunks = await self.store.get_many(
            [k for key, header in headers.items() for k in header.keys(key)])
        for key, header in headers.items():
            absent = [k for k in header.keys(key) if k not in chunks]
            if absent:
                problems[key] = (f"{absent[0]} missing (chunk of {key}, {len(absent)} of "
                                 f"{header.count} chunks missing)")
                continue
            data = b"".join(chunks[k] for k in header.keys(key))
            if len(data) != header.size or hashlib.sha256(data).hexdigest() != header.sha256:
                problems[key] = (f"{key}: its {header.count} chunks do not match the "
                                 f"header's size and sha256 (torn or overwritten)")
                continue
            try:
                docs[key] = json.loads(data)
            except ValueError as e:
                problems[key] = f"{key} malformed: {e}"
        return docs, problems

    def _trim(self, index: NodeIndex) -> None:
        keep_policies = set(index.policies)
        keep_groups = set(index.groups)
        if self.state is not None:
            keep_policies.update(self.state.policies)
            keep_groups.update(self.state.groups)
        self._policies = {i: p for i, p in self._policies.items() if i in keep_policies}
        self._groups = {k: g for k, g in self._groups.items() if k in keep_groups}

    def _fail(self, problem: str) -> None:
        if problem != self.problem:
            self.log.warn("store reader for {node} keeps generation {kept}: {problem}",
                          node=self.node, problem=problem,
                          kept=self.state.generation if self.state else None)
        self.problem = problem
        return None
