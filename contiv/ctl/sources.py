"""
Where contivctl's L{ClusterView} comes from: the store netmaster publishes
into (memcached), or a manifests directory compiled in this process by the
same engine and publisher netmaster uses.

The store is read with contiv's own readers (L{contiv.store.layout}:
L{Reader} per node, L{NameReader}, L{fetch_documents}), never by parsing keys
by hand. Those readers are coroutines over a store whose calls return
Deferreds. contivctl is a short-lived CLI, so rather than start a reactor
(and the memcached store's thread pool) for a few reads, it gives them
L{BlockingMemcachedStore}: the daemon's L{MemcachedStore}, same clients,
batching and error mapping, with each call made inline and returned as an
already-fired Deferred. Every coroutine then runs to its end inside
L{run_sync}, which says so loudly if one ever waits on something else.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Coroutine, Optional, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from contiv.ctl.view import ClusterView, CtlError, PodInfo
from contiv.dns.names import NameTable
from contiv.policy.types import Group
from contiv.store import StoreError, StoreUnavailable, parse_store_url
from contiv.store.layout import (
    DEFAULT_PREFIX,
    GROUP_MAP,
    NameReader,
    Publisher,
    Reader,
    bucket_name,
    fetch_documents,
    group_name,
)
from contiv.store.memcached import MemcachedStore
from contiv.store.memory import MemoryStore

T = TypeVar("T")

# Reads of the whole view before settling for one that straddles publishes.
READ_ATTEMPTS = 3


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine whose every await is on an already-fired Deferred."""
    d = Deferred.fromCoroutine(coroutine)
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        d.cancel()
        raise RuntimeError("a store read waited on something that is not a blocking store call")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class BlockingMemcachedStore(MemcachedStore):
    """L{MemcachedStore} with every call made inline: no reactor, no thread pool."""

    def __init__(self, servers: Sequence[tuple[str, int]], **options: Any) -> None:
        super().__init__(None, servers, **options)

    def _call(self, what: str, keys: Sequence[str], operation: Any, *args: Any) -> Deferred:
        if self._closed:
            return fail(StoreError(f"the memcached store {self._where} is closed", keys))
        try:
            return succeed(self._run(what, keys, operation, *args))
        except Exception:
            return fail()


def open_store(url: str, *, timeout: float = 2.0) -> BlockingMemcachedStore:
    if url == "memory":
        raise CtlError("store 'memory' lives inside the daemon's process and cannot be read "
                       "from another one: give --store memcached://host:port, or --manifests "
                       "DIR to compile the manifests here")
    try:
        servers = parse_store_url(url)
    except ValueError as e:
        raise CtlError(f"--store: {e}") from None
    assert servers is not None
    return BlockingMemcachedStore(servers, timeout=timeout, connect_timeout=timeout, retries=0)


# -- reading a published cluster -------------------------------------------------------

def read_view(store: Any, *, prefix: str = DEFAULT_PREFIX, where: str = "the store",
              selectors: Optional[dict] = None, errors: tuple[str, ...] = ()) -> ClusterView:
    """
    Every node's share (each read by L{Reader}, consistent per node) and every
    group. The whole read is repeated while a publish moves C{gen} under it,
    so that the view is one generation's (it says which).
    """
    try:
        for _ in range(READ_ATTEMPTS):
            view = run_sync(_read_view(store, prefix, where, selectors or {}, errors))
            if run_sync(_generation(store, prefix)) == view.generation:
                return view
        return replace(view, problems=view.problems + (
            f"{prefix}gen kept moving while reading ({READ_ATTEMPTS} tries): parts of this "
            f"view may be from different generations",))
    except StoreUnavailable as e:
        raise CtlError(f"store unreachable: {e}") from None
    except StoreError as e:
        raise CtlError(f"store error: {e}") from None


async def _generation(store: Any, prefix: str) -> Optional[int]:
    docs, _ = await fetch_documents(store, [prefix + "gen"])
    generation = docs.get(prefix + "gen")
    return generation if isinstance(generation, int) else None


async def _read_view(store: Any, prefix: str, where: str, selectors: dict,
                     errors: tuple[str, ...]) -> ClusterView:
    root_key = prefix + GROUP_MAP
    docs, problems = await fetch_documents(store, [prefix + "gen", root_key])
    if root_key in problems:
        raise CtlError(f"{where}: {problems[root_key]}: nothing published under prefix "
                       f"{prefix!r} (is netmaster running, with this --prefix?)")
    root = docs[root_key]
    hashes = root.get("buckets") if isinstance(root, dict) else None
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        raise CtlError(f"{root_key} malformed: no list of bucket hashes")
    bucket_keys = [prefix + bucket_name(h) for h in dict.fromkeys(hashes)]
    buckets, bucket_problems = await fetch_documents(store, bucket_keys)
    found_problems = sorted(bucket_problems.values())
    group_keys: dict[str, str] = {}
    nodes: set[str] = set()
    for key, doc in buckets.items():
        try:
            group_keys.update({str(i): str(k) for i, k in doc["groups"].items()})
            nodes.update(str(n) for n in doc["nodes"])
        except (KeyError, TypeError, AttributeError):
            found_problems.append(f"{key} malformed")

    policies: dict = {}
    pods: dict[str, PodInfo] = {}
    generation = docs.get(prefix + "gen") if isinstance(docs.get(prefix + "gen"), int) \
        else None
    for node in sorted(nodes):
        reader = Reader(store, node, prefix=prefix)
        state = await reader.poll()
        if state is None:
            found_problems.append(f"node {node}: {reader.problem}")
            continue
        policies.update(state.policies)
        for pod in state.index.pods:
            pods[pod.key] = PodInfo(pod.key, node, pod.ips, pod.named_ports)

    wanted = {prefix + group_name(k): group_id for group_id, k in group_keys.items()}
    group_docs, group_problems = await fetch_documents(store, sorted(wanted))
    found_problems += sorted(group_problems.values())
    groups = {}
    for key, doc in group_docs.items():
        try:
            group = Group.from_json(doc)
        except Exception as e:
            found_problems.append(f"{key} malformed: {e!r}")
            continue
        groups[wanted[key]] = group
    return ClusterView(where, generation, policies, groups, pods, tuple(sorted(nodes)),
                       selectors, tuple(found_problems), errors)


def read_names(store: Any, *, prefix: str = DEFAULT_PREFIX,
               domain: str = "cluster.local") -> NameTable:
    reader = NameReader(store, prefix=prefix, domain=domain)
    try:
        table = run_sync(reader.poll())
    except StoreUnavailable as e:
        raise CtlError(f"store unreachable: {e}") from None
    if table is None:
        raise CtlError(f"name table: {reader.problem}")
    return table


# -- compiling manifests here ----------------------------------------------------------

class CompiledManifests:
    """A manifests directory compiled and published into a private in-memory store."""

    def __init__(self, directory: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.directory = directory
        self.prefix = prefix
        self.store = MemoryStore()
        self.selectors: dict = {}
        self.errors: list[str] = []
        run_sync(self._compile())

    async def _compile(self) -> None:
        from contiv.dns.names import NameIndex
        from contiv.k8s.manifests import SUFFIXES, diff_objects, merge_manifests, \
            parse_manifest_file
        from contiv.policy.compiler import compile_policy
        from contiv.policy.engine import PolicyEngine
        from contiv.policy.model import parse_network_policy

        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(SUFFIXES))
        except OSError as e:
            raise CtlError(f"manifests {self.directory}: cannot list: {e.strerror}") from None
        files = []
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                self.errors.append(f"{name}: cannot read: {e.strerror}")
                continue
            objects, problems = parse_manifest_file(path, text)
            self.errors.extend(str(p) for p in problems)
            if not problems:
                files.append((name, objects))
        merged, problems = merge_manifests(files)
        self.errors.extend(str(p) for p in problems)
        engine, name_index = PolicyEngine(), NameIndex()
        for event in diff_objects({}, merged):
            engine.apply(event)
            name_index.apply(event)
            if event.kind == "NetworkPolicy":
                try:
                    _, selectors = compile_policy(parse_network_policy(event.object))
                except ValueError:
                    continue  # the engine recorded why
                self.selectors.update({s.id: s for s in selectors})
        self.errors.extend(sorted(engine.errors.values()))
        self.errors.extend(sorted(getattr(name_index, "errors", {}).values()))
        engine.take_changes()
        name_index.take_changes()
        # The publish netmaster makes after its initial list, with its own publisher.
        publisher = Publisher(self.store, prefix=self.prefix, clock=Clock())
        await publisher.publish(
            policies=list(engine.policies.values()), groups=list(engine.groups.values()),
            nodes=[engine.node_index(node) for node in sorted(engine.nodes())],
            names=list(name_index.entries.values()), full=True)

    def view(self) -> ClusterView:
        return read_view(self.store, prefix=self.prefix,
                         where=f"the manifests in {self.directory}",
                         selectors=self.selectors, errors=tuple(self.errors))
