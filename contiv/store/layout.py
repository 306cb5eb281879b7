"""
The store layout (DESIGN.md, "Store layout"): how netmaster publishes compiled
policies, address groups and node indexes, and how netplugin reads its node's
share back.

Every key is C{prefix + name}:

  - C{gen}: the generation, an ASCII decimal counter, bumped last by every publish
  - C{epoch}: a random token (JSON string) written by every full publish; when it is
    gone or not the one this publisher wrote, the store lost data: publish everything
  - C{node/<node>}: C{{"generation": g, "index": {"node", "policies", "groups",
    "pods"}}}, rewritten in place when the node's policies, the ids of the groups
    they use, or its local pods change; C{g} is the generation that wrote it
  - C{policy/<id>}, C{group/<key>}: one L{CompiledPolicy} / L{Group}, immutable
    (the id or key carries the content hash), so a reader never sees a torn entry
  - C{groupmap}: C{{"generation": g, "buckets": [hash, ...]}}, rewritten in place
    by every publish: the commit point of a generation
  - C{names}: C{{"generation": g, "buckets": [hash, ...]}}, the DNS name
    table's root, rewritten in place when a name changes
  - C{names/<hash>}: one bucket of the name table, immutable, C{{"<kind>/<ns>/<name>":
    NameEntry, ...}} for the names that hash to it
  - C{groupmap/<hash>}: one bucket, immutable, C{{"groups": {group id: group key},
    "nodes": {node: g}}} for the group ids and node names that hash
    (CRC-32 modulo the number of buckets) to it: which version of each group
    is current, and which generation wrote each node's index

Why a map between the indexes and the groups: a node index names group
I{ids}, which stay the same while members come and go, so a pod joining a
group that policies on hundreds of nodes use rewrites that group, one small
bucket and the root, not hundreds of indexes. A node absent from the map has
no share (no pods): its reader is complete with an empty index.

Values are compact JSON with sorted keys. A value larger than the item size is
stored as chunks C{<key>/0 .. <key>/n-1} plus, at C{<key>}, a header
C{{"chunked": {"count": n, "sha256": hex, "size": bytes}}} that lets the reader
check that the chunks it got belong together.

Ordering is what makes a reader's view consistent without transactions:
entries and buckets first, then the indexes that name them, then the root,
then the epoch, then C{gen}. A reader takes the index and the root together
and accepts them only when the root's bucket gives the index's own
generation for the node: then both describe the same publish (an index
rewritten in between, or a root read before its index was, is a torn read,
tried again). Everything they name is there, unless memcached evicted or lost
it, which the reader reports instead of using half a state.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import zlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from twisted.logger import Logger

from contiv.dns.names import NameEntry, NameTable
from contiv.policy.types import CompiledPolicy, Group, NodeIndex, canonical_json
from contiv.store import StoreError, StoreUnavailable, check_key

DEFAULT_PREFIX = "contiv/"
# Below memcached's default 1 MiB item, with room for the item header and key.
DEFAULT_ITEM_SIZE = 1_000_000
GEN = "gen"
EPOCH = "epoch"
GROUP_MAP = "groupmap"
NAMES = "names"
# Enough that a bucket stays a few kilobytes with tens of thousands of groups,
# few enough that the root a reader fetches per generation stays small.
DEFAULT_BUCKETS = 128
# How often a reader re-reads an index and root caught mid-publish before it
# gives up until the next poll.
TORN_RETRIES = 3


def policy_name(policy_id: str) -> str:
    return "policy/" + policy_id


def group_name(group_key: str) -> str:
    return "group/" + group_key


def node_name(node: str) -> str:
    return "node/" + node


def bucket_name(digest_hex: str) -> str:
    return GROUP_MAP + "/" + digest_hex


def names_bucket_name(digest_hex: str) -> str:
    return NAMES + "/" + digest_hex


def bucket_of(name: str, buckets: int) -> int:
    """The bucket of a group id or node name: stable across processes and versions."""
    return zlib.crc32(name.encode()) % buckets


def group_id_of(group_key: str) -> str:
    """The id part of a group key C{<id>.<content hash>}."""
    return group_key.rsplit(".", 1)[0]


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


def _root_hashes(root: Any) -> list[str]:
    """The bucket hashes a root names (none, if it is not a root)."""
    if not isinstance(root, dict) or not isinstance(root.get("buckets"), list):
        return []
    return [h for h in root["buckets"] if isinstance(h, str) and _PLAIN_KEY.fullmatch(h)]


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
                 grace_period: float = 60.0, item_size: int = DEFAULT_ITEM_SIZE,
                 buckets: int = DEFAULT_BUCKETS) -> None:
        if item_size < 1:
            raise ValueError(f"item_size must be positive, got {item_size}")
        if buckets < 1:
            raise ValueError(f"buckets must be positive, got {buckets}")
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
        self._current_chunks: dict[str, int] = {}  # group id -> chunks of group/<id>
        self._unreferenced_since: dict[str, float] = {}
        # node -> (the pods tuple last encoded, its canonical JSON); likewise
        # for the policy ids, which change far less often than group keys
        self._pods_json: dict[str, tuple[tuple, bytes]] = {}
        self._policies_json: dict[str, tuple[tuple, bytes]] = {}
        self.epoch: Optional[str] = None
        self.generation = 0
        self._root_key = check_key(prefix + GROUP_MAP)
        self.bucket_count = buckets
        # The group map as the store holds it: per bucket, group id -> key and
        # node -> the generation that wrote its index; and each bucket's entry name.
        self._bucket_groups: list[dict[str, str]] = [{} for _ in range(buckets)]
        self._bucket_nodes: list[dict[str, int]] = [{} for _ in range(buckets)]
        self._bucket_names: list[Optional[str]] = [None] * buckets
        self._names_root_key = check_key(prefix + NAMES)
        # The name table as the store holds it: per bucket, entry key -> its
        # canonical JSON; and each bucket's entry name.
        self._name_buckets: list[dict[str, bytes]] = [{} for _ in range(buckets)]
        self._name_bucket_names: list[Optional[str]] = [None] * buckets
        # nodes an earlier publisher's map named (see adopt)
        self.adopted_nodes: set[str] = set()

    def key(self, name: str) -> str:
        return check_key(self.prefix + name)

    def written(self) -> list[str]:
        """The entry names (without prefix) this publisher believes are in the store."""
        nodes = {node_name(node) for bucket in self._bucket_nodes for node in bucket}
        roots = ({GROUP_MAP} if self._bucket_names[0] is not None else set()) | \
            ({NAMES} if self._name_bucket_names[0] is not None else set())
        return sorted(self._written | nodes | roots)

    def group_map(self) -> dict[str, str]:
        """Group id -> the key of its current version, as published."""
        return {i: k for bucket in self._bucket_groups for i, k in bucket.items()}

    def node_generations(self) -> dict[str, int]:
        """Node -> the generation that wrote its index, for nodes with a share."""
        return {n: g for bucket in self._bucket_nodes for n, g in bucket.items()}

    def live_buckets(self) -> list[str]:
        return [name for name in self._bucket_names + self._name_bucket_names
                if name is not None]

    def name_keys(self) -> set[str]:
        """The keys of every published name (C{<kind>/<ns>/<name>})."""
        return {key for bucket in self._name_buckets for key in bucket}

    async def observe_generation(self) -> Optional[int]:
        """
        The store's generation, read only and kept as the floor of our own: a
        standby that takes over after the store lost its counter then still
        continues above what readers have seen.
        """
        found = await self.store.get_many([self._gen_key])
        value = self._stored_generation(found.get(self._gen_key))
        if value is not None and value > self.generation:
            self.generation = value
        return value

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
                      nodes: Iterable[NodeIndex], removed_groups: Iterable[str] = (),
                      names: Iterable[NameEntry] = (), removed_names: Iterable[str] = (),
                      full: bool = False) -> int:
        """
        Write the given policies and groups not written before, the group
        map's changed buckets, the given node indexes, the map's root, then
        (full) a new epoch, then bump C{gen}; return the new generation.

        C{groups} are new versions (the map points their ids at them),
        C{removed_groups} ids no index uses any longer. C{full}: the given
        groups are the whole map and every given entry is written, whatever
        is believed written. A node index with neither policies nor pods
        leaves the map (its reader is complete with an empty share) and its
        key is deleted. C{names} are new or changed DNS names, C{removed_names}
        the keys of names gone (C{full}: C{names} are all of them). A refused
        write raises L{StoreError} and bumps nothing, so readers stay on the
        previous generation.
        """
        groups = list(groups)
        nodes = list(nodes)
        if full:
            self._written.clear()
            self._name_buckets = [{} for _ in range(self.bucket_count)]
            self._name_bucket_names = [None] * self.bucket_count
            self._bucket_groups = [{} for _ in range(self.bucket_count)]
            self._bucket_nodes = [{} for _ in range(self.bucket_count)]
            self._bucket_names = [None] * self.bucket_count
        entries: dict[str, bytes] = {}
        occupies: dict[str, tuple[str, ...]] = {}

        def add_entry(name: str, data: bytes) -> None:
            if name in self._written or name in occupies:
                return
            items = self._encode_bytes(name, data)
            entries.update(items)
            occupies[name] = tuple(items)

        for policy in policies:
            add_entry(policy_name(policy.id), canonical_json(policy.to_json()))
        for group in groups:
            add_entry(group_name(group.key), group.canonical)

        # The indexes name the generation they belong to: the one this
        # publish is about to make, and never one this publisher already used.
        found = await self.store.get_many([self._gen_key])
        current = self._stored_generation(found.get(self._gen_key))
        target = max(current or 0, self.generation) + 1

        # The map as it will be once this publish is in; applied to the
        # publisher's own copy only after every write went through.
        bucket_groups = list(self._bucket_groups)
        bucket_nodes = list(self._bucket_nodes)
        # Every bucket is written once, even while empty: the root names them all.
        changed = {n for n, name in enumerate(self._bucket_names) if name is None}
        copied: set[tuple[int, int]] = set()

        def edit(buckets: list[dict], name: str) -> dict:
            """The bucket of C{name} in C{buckets}, copied before its first change."""
            number = bucket_of(name, self.bucket_count)
            if (id(buckets), number) not in copied:
                buckets[number] = dict(buckets[number])
                copied.add((id(buckets), number))
            changed.add(number)
            return buckets[number]

        for group in groups:
            edit(bucket_groups, group.id)[group.id] = group.key
        for group_id in removed_groups:
            edit(bucket_groups, group_id).pop(group_id, None)

        indexes: dict[str, bytes] = {}
        stale_chunks: list[str] = []
        index_chunks: dict[str, int] = {}
        emptied: list[str] = []
        for index in nodes:
            for key in index.groups:
                group_id = group_id_of(key)
                if bucket_groups[bucket_of(group_id, self.bucket_count)].get(group_id) != key:
                    raise ValueError(f"node {index.node}'s index names group {key}, which is "
                                     f"not the published version of {group_id}")
            name = node_name(index.node)
            before = self._index_chunks.get(index.node, 0)
            if not (index.policies or index.pods):
                edit(bucket_nodes, index.node).pop(index.node, None)
                emptied.extend([self.key(name)] + [f"{self.key(name)}/{i}"
                                                   for i in range(before)])
                index_chunks[index.node] = 0
                continue
            edit(bucket_nodes, index.node)[index.node] = target
            items = self._encode_bytes(name, self._index_bytes(index, target))
            indexes.update(items)
            count = len(items) - 1 if len(items) > 1 else 0
            index_chunks[index.node] = count
            stale_chunks.extend(f"{self.key(name)}/{i}" for i in range(count, before))

        # group/<id>: the current version in place, as the documented layout
        # names a group (node indexes name ids). netplugin reads the immutable
        # version the map names instead, which no publish can tear.
        current_chunks: dict[str, int] = {}
        for group in groups:
            items = self._encode_bytes(group_name(group.id), group.canonical)
            indexes.update(items)
            count = len(items) - 1 if len(items) > 1 else 0
            current_chunks[group.id] = count
            key = self.key(group_name(group.id))
            stale_chunks.extend(f"{key}/{i}"
                                for i in range(count, self._current_chunks.get(group.id, 0)))
        gone_ids = set(removed_groups)
        if full:
            # The given groups are the whole map: any other id this publisher
            # wrote (or adopted) is gone.
            gone_ids |= set(self._current_chunks) - {group.id for group in groups}
        for group_id in sorted(gone_ids):
            if group_id in current_chunks:
                continue
            key = self.key(group_name(group_id))
            emptied.extend([key] + [f"{key}/{i}"
                                    for i in range(self._current_chunks.get(group_id, 0))])
            current_chunks[group_id] = 0

        bucket_names = list(self._bucket_names)
        for number in sorted(changed):
            data = canonical_json({"groups": bucket_groups[number],
                                   "nodes": bucket_nodes[number]})
            bucket_names[number] = bucket_name(hashlib.sha256(data).hexdigest()[:20])
            add_entry(bucket_names[number], data)
        root = canonical_json({"generation": target, "buckets": [
            name[len(GROUP_MAP) + 1:] for name in bucket_names]})  # type: ignore[index]

        name_buckets = list(self._name_buckets)
        names_changed = {n for n, name in enumerate(self._name_bucket_names) if name is None}
        for entry, gone in [*((e, False) for e in names), *((k, True) for k in removed_names)]:
            key = entry if gone else entry.key  # type: ignore[union-attr]
            number = bucket_of(key, self.bucket_count)
            if name_buckets[number] is self._name_buckets[number]:  # copy before a change
                name_buckets[number] = dict(name_buckets[number])
            names_changed.add(number)
            if gone:
                name_buckets[number].pop(key, None)
            else:
                name_buckets[number][key] = canonical_json(entry.to_json())  # type: ignore
        name_bucket_names = list(self._name_bucket_names)
        for number in sorted(names_changed):
            bucket = name_buckets[number]
            # The entries are JSON already: join them rather than decode and re-encode.
            data = b"{" + b",".join(canonical_json(k) + b":" + bucket[k]
                                    for k in sorted(bucket)) + b"}"
            name_bucket_names[number] = names_bucket_name(
                hashlib.sha256(data).hexdigest()[:20])
            add_entry(name_bucket_names[number], data)
        names_root = canonical_json({"generation": target, "buckets": [
            name[len(NAMES) + 1:] for name in name_bucket_names]})  # type: ignore[index]

        if entries:
            await self.store.set_many(entries)
        self._written.update(occupies)
        self._stored.update(occupies)
        for name in occupies:
            self._unreferenced_since.pop(name, None)
        if indexes:
            await self.store.set_many(indexes)
        self._index_chunks.update(index_chunks)
        self._current_chunks.update(current_chunks)
        for group_id in gone_ids:
            if not current_chunks.get(group_id):
                self._current_chunks.pop(group_id, None)
        # The commit point: a reader that has this root finds the indexes it dates.
        # Never chunked (its size is bounded by the bucket count), so that a
        # reader gets the whole root or the previous one.
        roots = {self._root_key: root}
        if names_changed:
            roots[self._names_root_key] = names_root
        await self.store.set_many(roots)
        self._bucket_groups, self._bucket_nodes = bucket_groups, bucket_nodes
        self._bucket_names = bucket_names
        self._name_buckets, self._name_bucket_names = name_buckets, name_bucket_names

        if full:
            epoch = secrets.token_hex(16)
            await self.store.set_many({self._epoch_key: canonical_json(epoch)})
            self.epoch = epoch

        generation = await self._bump(target)
        if stale_chunks or emptied:
            # Leftovers of a longer index, and indexes of nodes that lost their
            # share: the map no longer sends readers there.
            await self.store.delete_many(stale_chunks + emptied)
        self.log.info("published generation {generation}: {entries} new entries "
                      "({size} bytes), {nodes} node indexes{full}",
                      generation=generation, entries=len(occupies),
                      size=sum(len(v) for v in entries.values()),
                      nodes=len(nodes),
                      full=" (full)" if full else "")
        return generation

    async def adopt(self) -> int:
        """
        Take over what an earlier publisher left that the store's current
        root names (the entries, buckets and node indexes of a netmaster before
        a restart, or of another replica), so that garbage collection deletes
        them once nothing live names them, and the next full publish takes
        nodes that lost their pods out of the map. Returns how many entries
        were adopted. Entries that only older roots named are out of reach
        (memcached cannot list keys) and stay until evicted.
        """
        docs, _ = await fetch_documents(self.store, [self._root_key, self._names_root_key])
        names = {names_bucket_name(h) for h in _root_hashes(docs.get(self._names_root_key))}
        names.update(bucket_name(h) for h in _root_hashes(docs.get(self._root_key)))
        if not names:
            return 0
        buckets, _ = await fetch_documents(self.store, [self.key(n) for n in sorted(names)])
        nodes: set[str] = set()
        for key, doc in buckets.items():
            if isinstance(doc, dict) and key.startswith(self.key(GROUP_MAP + "/")):
                names.update(group_name(k) for k in dict(doc.get("groups", {})).values())
                for group_id in dict(doc.get("groups", {})):
                    # Its group/<id> too, so that a full publish without it deletes it.
                    self._current_chunks.setdefault(group_id, 0)
                nodes.update(dict(doc.get("nodes", {})))
        await self._adopt_current_chunks()
        indexes, _ = await fetch_documents(
            self.store, [self.key(node_name(n)) for n in sorted(nodes)])
        for doc in indexes.values():
            try:
                names.update(policy_name(i) for i in doc["index"]["policies"])
            except (KeyError, TypeError):
                continue
        adopted = [name for name in names if name not in self._stored]
        for name in adopted:
            # Whether it is chunked is read when it is deleted: few ever are.
            self._stored[name] = ()
        self.adopted_nodes.update(nodes)
        if adopted:
            self.log.info("adopted {count} store entries and {nodes} node indexes an "
                          "earlier publisher left", count=len(adopted), nodes=len(nodes))
        return len(adopted)

    async def _adopt_current_chunks(self) -> None:
        """How many chunks each adopted group/<id> has: their headers say."""
        unknown = [group_id for group_id, count in self._current_chunks.items() if not count]
        if not unknown:
            return
        found = await self.store.get_many([self.key(group_name(i)) for i in unknown])
        for group_id in unknown:
            raw = found.get(self.key(group_name(group_id)))
            if raw is None or not raw.startswith(b'{"chunked"'):
                continue
            try:
                count = int(json.loads(raw)["chunked"]["count"])
            except (ValueError, KeyError, TypeError):
                continue
            self._current_chunks[group_id] = count

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
                | {group_name(k) for k in live_group_keys} | set(self.live_buckets()))
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
        unknown = [name for name in doomed if not self._stored[name]]
        if unknown:
            # Adopted entries: their chunks are named by their headers.
            found = await self.store.get_many([self.key(name) for name in unknown])
            for name in unknown:
                keys = [self.key(name)]
                try:
                    header = _chunk_header(json.loads(found.get(self.key(name)) or b"null"))
                except ValueError:
                    header = None
                if header is not None:
                    keys.extend(header.keys(self.key(name)))
                self._stored[name] = tuple(keys)
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
        # The index names group ids; the map says which version is current.
        group_ids = [group_id_of(key) for key in index.groups]
        if all(_PLAIN_KEY.fullmatch(group_id) for group_id in group_ids):
            # Group ids are "g.<hex>": their JSON is the text in quotes, and
            # joining is several times faster than the encoder for the
            # hundreds of ids a busy node's index holds.
            groups = ('["' + '","'.join(group_ids) + '"]').encode() if group_ids else b"[]"
        else:
            groups = canonical_json(group_ids)
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


async def fetch_documents(store: Any, keys: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """
    The decoded JSON of each key, reassembling chunked values; problems by
    key for those missing or undecodable. One get_many for the keys, one
    more for all the chunks their headers name.
    """
    found = await store.get_many(keys)
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
    chunks = await store.get_many(
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


# A read of the index and the root that caught a publish between them.
_TORN = object()


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
        self._root_key = check_key(prefix + GROUP_MAP)
        # bucket hash -> (group id -> key, node -> generation)
        self._bucket_cache: dict[str, tuple[dict, dict]] = {}
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
        for _ in range(TORN_RETRIES):
            share = await self._read_share()
            if share is not _TORN:
                break
        else:
            return self._fail(f"{self._index_key} and {self._root_key} kept changing while "
                              f"being read (publishes in progress)")
        if isinstance(share, str):
            return self._fail(share)
        index, index_generation = share
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

    async def _read_share(self) -> Any:
        """
        The node's index with its group ids resolved to the current versions,
        and the generation that wrote it; a problem (str); or L{_TORN} when the
        index and the root were not written by the same publish.
        """
        docs, problems = await self._fetch([self._index_key, self._root_key])
        if self._root_key in problems:
            problem = problems[self._root_key]
            if problem.endswith(" missing"):
                problem += ": nothing published yet, or the store lost its data"
            return problem
        try:
            root = docs[self._root_key]
            root_generation = root["generation"]
            hashes = root["buckets"]
            if not (hashes and all(isinstance(h, str) and _PLAIN_KEY.fullmatch(h)
                                   for h in hashes)):
                raise ValueError("buckets must be a non-empty list of hashes")
        except Exception as e:
            return f"{self._root_key} malformed: {e!r}"

        doc = docs.get(self._index_key)
        if doc is None and not problems[self._index_key].endswith(" missing"):
            return problems[self._index_key]
        stored: Optional[tuple[NodeIndex, Any]] = None
        if doc is not None:
            try:
                stored = NodeIndex.from_json(doc["index"]), doc["generation"]
            except Exception as e:
                return f"{self._index_key} malformed: {e!r}"
            if stored[0].node != self.node:
                return f"{self._index_key} names node {stored[0].node!r}"

        count = len(hashes)
        numbers = {bucket_of(self.node, count)}
        if stored is not None:
            numbers.update(bucket_of(group_id, count) for group_id in stored[0].groups)
        buckets = await self._buckets({number: hashes[number] for number in numbers})
        if isinstance(buckets, str):
            return buckets

        written_at = buckets[bucket_of(self.node, count)][1].get(self.node)
        if written_at is None:
            if stored is not None and stored[1] > root_generation:
                return _TORN  # the node's first index is newer than this root
            # No pods, no policies: a share that is empty, and complete.
            return NodeIndex(self.node, (), (), ()), root_generation
        if stored is None:
            return (f"{self._index_key} missing, though {self._root_key} says generation "
                    f"{written_at} wrote it (evicted?)")
        index, index_generation = stored
        if index_generation != written_at:
            return _TORN
        keys = []
        for group_id in index.groups:
            key = buckets[bucket_of(group_id, count)][0].get(group_id)
            if key is None:
                return (f"{self._index_key} names group {group_id}, which "
                        f"{self._root_key} does not hold")
            keys.append(key)
        return NodeIndex(index.node, index.policies, tuple(sorted(keys)),
                         index.pods), index_generation

    async def _buckets(self, wanted: dict[int, str]) -> Any:
        """The buckets by number (fetching those not held), or a problem."""
        missing = {self.prefix + bucket_name(h): h for h in sorted(set(wanted.values()))
                   if h not in self._bucket_cache}
        if missing:
            docs, problems = await self._fetch(list(missing))
            if problems:
                return sorted(problems.values())[0]
            for key, doc in docs.items():
                try:
                    groups, nodes = doc["groups"], doc["nodes"]
                    if not (isinstance(groups, dict) and isinstance(nodes, dict)):
                        raise ValueError("groups and nodes must be objects")
                except Exception as e:
                    return f"{key} malformed: {e!r}"
                self._bucket_cache[missing[key]] = (groups, nodes)
        buckets = {number: self._bucket_cache[h] for number, h in wanted.items()}
        # Keep what this share uses: the root moves on, old buckets are garbage.
        self._bucket_cache = {h: self._bucket_cache[h] for h in set(wanted.values())}
        return buckets

    def _recovered(self, generation: int, index_generation: Any) -> None:
        if self.problem is not None:
            self.log.info("store reader for {node} complete again at generation "
                          "{generation}", node=self.node, generation=generation)
        self.problem, self._seen = None, generation
        self.index_generation = index_generation

    async def _fetch(self, keys: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        return await fetch_documents(self.store, keys)

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


class NameReader:
    """
    netplugin's side of the DNS name table. L{poll} returns a new
    L{NameTable} when the table's root moved and every bucket it names could
    be read, else None; L{table} stays the last complete one (an empty table
    until the first), and L{problem} says why the newest could not be had.
    """

    log = Logger()

    def __init__(self, store: Any, *, prefix: str = DEFAULT_PREFIX,
                 domain: str = "cluster.local") -> None:
        self.store = store
        self.prefix = prefix
        self.domain = domain
        self._gen_key = check_key(prefix + GEN)
        self._root_key = check_key(prefix + NAMES)
        self.table = NameTable(domain)
        self.complete = False  # whether a whole table has been read yet
        self.problem: Optional[str] = None
        self._seen: Optional[int] = None
        self._hashes: Optional[list[str]] = None  # the root the table was built from
        self._buckets: dict[str, dict[str, NameEntry]] = {}  # bucket hash -> entries

    async def poll(self) -> Optional[NameTable]:
        try:
            return await self._poll()
        except StoreUnavailable as e:
            return self._fail(f"store unavailable: {e}")
        except StoreError as e:
            return self._fail(f"store error: {e}")
        except Exception as e:
            self.log.failure("reading the DNS name table")
            return self._fail(f"unexpected error reading the name table: {e!r}")

    async def _poll(self) -> Optional[NameTable]:
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
        docs, problems = await fetch_documents(self.store, [self._root_key])
        if problems:
            return self._fail(problems[self._root_key])
        hashes = _root_hashes(docs[self._root_key])
        if not hashes:
            return self._fail(f"{self._root_key} malformed: no bucket hashes")
        if hashes == self._hashes:
            self._done(generation)
            return None
        wanted = {self.prefix + names_bucket_name(h): h for h in sorted(set(hashes))
                  if h not in self._buckets}
        if wanted:
            docs, problems = await fetch_documents(self.store, list(wanted))
            for key, doc in docs.items():
                try:
                    if not isinstance(doc, dict):
                        raise ValueError("not an object")
                    entries = {}
                    for entry_key_, value in doc.items():
                        entry = NameEntry.from_json(value)
                        if entry.key != entry_key_:
                            raise ValueError(f"{entry_key_} holds {entry.key}")
                        entries[entry_key_] = entry
                    self._buckets[wanted[key]] = entries
                except Exception as e:
                    problems[key] = f"{key} malformed: {e!r}"
            if problems:
                listed = sorted(problems.values())
                more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
                return self._fail(listed[0] + more)
        entries: dict[str, NameEntry] = {}
        for h in hashes:
            entries.update(self._buckets[h])
        self._buckets = {h: self._buckets[h] for h in set(hashes)}
        self._hashes = hashes
        self.table = NameTable(self.domain, entries, generation)
        self.complete = True
        self._done(generation)
        return self.table

    def _done(self, generation: int) -> None:
        if self.problem is not None:
            self.log.info("DNS name table complete again at generation {generation}",
                          generation=generation)
        self.problem, self._seen = None, generation
        self.complete = True

    def _fail(self, problem: str) -> None:
        if problem != self.problem:
            self.log.warn("DNS name table keeps generation {kept}: {problem}",
                          problem=problem, kept=self.table.generation)
        self.problem = problem
        return None
