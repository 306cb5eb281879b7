"""
How fast contiv gets policy flows into Open vSwitch, and how many it needs.

Three measurements against private userspace OVS instances
(L{contiv.sandbox.PrivateOVS}: ovsdb-server and ovs-vswitchd with their own
run/db directories, the switch in a network namespace of its own), under the
real Twisted reactor:

1. Install throughput for 10,000 / 100,000 / 300,000 policy flows: conjunctive
   rules as the pipeline builds them (per rule 10 local addresses, 20 peer
   addresses, 3 TCP ports and the conj_id flow, alternating between the
   ingress-rules table 50 and the egress-rules table 30), every flow unique.
     - contiv, bundle: open an ONF bundle, encode every Flow with FlowEncoder,
       add them with one add_many_to_bundle write, commit; timed from the
       start (open + encoding) to the commit reply (which comes after the
       barrier that checks every add).
     - baseline: the same flows in ovs-ofctl syntax in a file, timed
       ``ovs-ofctl -O OpenFlow13 --bundle add-flows br0 FILE`` (the file is
       written beforehand, untimed; ovs-ofctl's parsing is timed, as contiv's
       encoding is).
     - contiv, pipelined without a bundle: encode, send_raw, one barrier: the
       "what OVS accepts over one connection" reference.
   After every run the bridge must hold exactly N flows (ovs-ofctl
   dump-aggregate), and at 10,000 flows the contiv-installed table must equal
   the ovs-ofctl-installed one line for line (dump-flows --no-stats). Each
   method runs REPEATS times per size on the same bridge, emptied in between
   (del-flows, checked empty), in rotating order; the median run is reported.

2. Event to enforced: a synthetic cluster of 10,000 pods on 50 nodes (200 per
   node; node-1 holds 200 local pods across all 50 namespaces), 500
   policies of mixed shapes. A PolicyEngine is fed the cluster, node-1's
   NodeState is built (as netplugin builds it: index from the engine, only
   entries it does not hold yet fetched) and installed by DatapathManager
   (BridgeSettings against the private OVS's ovsdb). Then 100 single events,
   each one that changes node-1's flows (a new pod joining a peer group, a
   pod relabelled into another peer group, a new local pod on node-1, a
   policy's port changed), are timed from ``engine.apply`` through
   take_changes, node_index, the NodeState rebuild and ``manager.update`` to
   its bundle commit confirmed. The store hop (memcached publish + poll)
   is not in this number: benchmarks/policy_compile.py measures it.

3. Flows per rule for a few shapes (N local pods x M peers x P ports), from
   the real engine and ``flow_count_report``, against N + M + P + 1.

    cd /work/main && .venv/bin/python benchmarks/openflow_install.py

Needs root (network namespaces) and Open vSwitch; prints one table.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from contiv.datapath.flows import Conjunction, Flow, Goto, flow  # noqa: E402
from contiv.datapath.manager import DatapathManager, add_in_chunks, cookie_for  # noqa: E402
from contiv.datapath.ovsdb import BridgeSettings  # noqa: E402
from contiv.datapath.pipeline import (COMMIT, EGRESS_RULES, INGRESS_RULES,  # noqa: E402
                                      flow_count_report)
from contiv.k8s.events import ADDED, MODIFIED, Event  # noqa: E402
from contiv.openflow.client import OpenFlowClient  # noqa: E402
from contiv.openflow.flowmod import ADD, FlowEncoder  # noqa: E402
from contiv.policy.engine import PolicyEngine  # noqa: E402
from contiv.sandbox import PrivateOVS, available  # noqa: E402
from contiv.store.layout import NodeState  # noqa: E402

SEED = 20240517
SIZES = (10_000, 100_000, 300_000)
REPEATS = 3
COOKIE = cookie_for(1)

# The targets.
TARGET_RATIO = 1.0  # contiv bundle vs ovs-ofctl --bundle
OVS_PIPELINED_RATIO = 1.3  # what OVS takes over one pipelined connection, vs ofctl --bundle
TARGET_P99_MS = 50.0

# Part 2: the cluster.
PODS = 10_000
NODES = 50
NAMESPACES = 50
POLICIES = 500
EVENTS = 100
NODE = "node-1"

# Part 3: (N local pods, M peers, P ports) shapes.
SHAPES = [(10, 20, 3), (100, 100, 5), (1, 1000, 1), (200, 2000, 2)]


def percentile(samples: list[float], q: float) -> float:
    """Nearest rank: with 100 samples, p99 is the second largest."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def ip_of(n: int, base: int = 10 << 24) -> str:
    n += base
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


STARTED: list[PrivateOVS] = []  # every OVS this run made, to check its namespaces are gone


def private_ovs(workdir: str) -> PrivateOVS:
    ovs = PrivateOVS(workdir)
    STARTED.append(ovs)
    return ovs


def processes_under(path: str) -> list[str]:
    """Processes whose command line names a path under ``path`` (our OVS daemons)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline and int(pid) != os.getpid():
            found.append(f"{pid} {cmdline[:80]}")
    return found


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# -- part 1: throughput ------------------------------------------------------------------


def synthetic_flows(count: int) -> list[Flow]:
    """
    ``count`` unique flows: conjunctive rules of 10 local addresses, 20 peers
    and 3 TCP ports (+ the conj_id flow), alternately ingress (table 50,
    local = destination) and egress (table 30, local = source). The last rule
    is cut short to make the count exact (OVS takes incomplete conjunctions).
    """
    flows: list[Flow] = []
    address = 0
    port = {INGRESS_RULES: 1024, EGRESS_RULES: 1024}
    rule = 0
    while len(flows) < count:
        ingress = rule % 2 == 0
        table = INGRESS_RULES if ingress else EGRESS_RULES
        own, peer = ("ipv4_dst", "ipv4_src") if ingress else ("ipv4_src", "ipv4_dst")
        conj_id = 1000 + rule
        for _ in range(10):
            flows.append(flow(table, 100, (Conjunction(conj_id, 1, 3),), COOKIE,
                              eth_type=0x0800, **{own: ip_of(address)}))
            address += 1
        for _ in range(20):
            flows.append(flow(table, 100, (Conjunction(conj_id, 2, 3),), COOKIE,
                              eth_type=0x0800, **{peer: ip_of(address)}))
            address += 1
        for _ in range(3):
            flows.append(flow(table, 100, (Conjunction(conj_id, 3, 3),), COOKIE,
                              eth_type=0x0800, ip_proto=6, tcp_dst=port[table]))
            port[table] += 1
        flows.append(flow(table, 100, (Goto(COMMIT if ingress else INGRESS_RULES),), COOKIE,
                          conj_id=conj_id))
        rule += 1
    return flows[:count]


_OFCTL_FIELDS = {"ipv4_src": "nw_src", "ipv4_dst": "nw_dst", "tcp_dst": "tp_dst",
                 "conj_id": "conj_id"}


def ofctl_line(f: Flow) -> str:
    """One of synthetic_flows' flows in ovs-ofctl add-flows syntax."""
    match = dict(f.match)
    parts = [f"table={f.table}", f"priority={f.priority}", f"cookie={f.cookie:#x}"]
    if match.get("ip_proto") == 6:
        parts.append("tcp")
    elif match.get("eth_type") == 0x0800:
        parts.append("ip")
    for name, value in f.match:
        if name in _OFCTL_FIELDS:
            parts.append(f"{_OFCTL_FIELDS[name]}={value}")
    actions = []
    for action in f.actions:
        if isinstance(action, Conjunction):
            actions.append(f"conjunction({action.id},{action.clause}/{action.n_clauses})")
        elif isinstance(action, Goto):
            actions.append(f"goto_table:{action.table}")
        else:
            raise TypeError(action)
    return ",".join(parts) + ",actions=" + ",".join(actions)


def bridge_flow_count(ovs: PrivateOVS) -> int:
    text = ovs.ofctl("dump-aggregate", ovs.bridge, timeout=120).stdout
    found = re.search(r"flow_count=(\d+)", text)
    if found is None:
        raise RuntimeError(f"no flow_count in dump-aggregate: {text!r}")
    return int(found.group(1))


def dump_table(ovs: PrivateOVS) -> list[str]:
    text = ovs.ofctl("dump-flows", "--no-stats", ovs.bridge, timeout=120).stdout
    return sorted(line.strip() for line in text.splitlines()
                  if line.strip() and "reply" not in line)


async def empty_bridge(ovs: PrivateOVS) -> None:
    await deferToThread(ovs.ofctl, "del-flows", ovs.bridge, timeout=120)
    left = await deferToThread(bridge_flow_count, ovs)
    if left:
        raise RuntimeError(f"del-flows left {left} flows")


PYTHON_SECONDS: dict[int, list[float]] = {}  # size -> the bundle runs' Python-only part


async def contiv_bundle(protocol: Any, flows: list[Flow]) -> float:
    gc.collect()
    started = time.perf_counter()
    encoder = FlowEncoder()  # cold: template discovery is part of the cost
    bundle = await protocol.open_bundle()
    # The datapath manager's own path: encoded and written in chunks, so that
    # OVS installs one chunk while Python encodes the next.
    from twisted.internet import reactor

    await add_in_chunks(protocol, bundle, encoder, [(ADD, f) for f in flows], reactor)
    PYTHON_SECONDS.setdefault(len(flows), []).append(time.perf_counter() - started)
    await protocol.commit_bundle(bundle)
    return time.perf_counter() - started


async def contiv_pipelined(protocol: Any, flows: list[Flow]) -> float:
    gc.collect()
    started = time.perf_counter()
    encoder = FlowEncoder()
    encode, next_xid = encoder.encode, protocol.next_xid
    first = protocol.next_xid()
    protocol.send_raw([encode(f, ADD, next_xid()) for f in flows])
    await protocol.barrier(since=first)
    return time.perf_counter() - started


def ofctl_bundle(ovs: PrivateOVS, path: str) -> float:
    started = time.perf_counter()
    ovs.ofctl("--bundle", "add-flows", ovs.bridge, path, timeout=600)
    return time.perf_counter() - started


async def throughput(reactor: Any, workdir: str, sizes: tuple[int, ...],
                     repeats: int) -> list[dict]:
    results = []
    for size in sizes:
        flows = synthetic_flows(size)
        path = os.path.join(workdir, f"flows-{size}.txt")
        with open(path, "w") as f:
            f.write("\n".join(ofctl_line(one) for one in flows) + "\n")
        ovs = private_ovs(os.path.join(workdir, f"ovs-{size}"))
        client = None
        try:
            ovs.start()
            client = OpenFlowClient(reactor, f"unix:{ovs.mgmt_socket}")
            client.startService()
            protocol = await client.whenConnected(failAfterFailures=5)
            await empty_bridge(ovs)
            methods = ["bundle", "ofctl", "pipelined"]
            times: dict[str, list[float]] = {m: [] for m in methods}
            tables: dict[str, list[str]] = {}
            for repeat in range(repeats):
                order = methods[repeat % 3:] + methods[:repeat % 3]
                for method in order:
                    if method == "bundle":
                        elapsed = await contiv_bundle(protocol, flows)
                    elif method == "pipelined":
                        elapsed = await contiv_pipelined(protocol, flows)
                    else:
                        elapsed = await deferToThread(ofctl_bundle, ovs, path)
                    count = await deferToThread(bridge_flow_count, ovs)
                    if count != size:
                        raise RuntimeError(f"{method} at {size}: the bridge holds {count} "
                                           f"flows, not {size}")
                    if repeat == 0 and size <= 10_000 and method != "pipelined":
                        tables[method] = await deferToThread(dump_table, ovs)
                    times[method].append(elapsed)
                    await empty_bridge(ovs)
            same = None
            if tables:
                same = tables["bundle"] == tables["ofctl"]
                if not same:
                    diff = sorted(set(tables["bundle"]) ^ set(tables["ofctl"]))[:4]
                    raise RuntimeError(f"contiv and ovs-ofctl installed different tables: "
                                       f"{diff}")
            results.append({"size": size, "same_table": same,
                            **{m: statistics.median(t) for m, t in times.items()},
                            "all": times})
        finally:
            if client is not None:
                await client.stopService()
            ovs.stop()
        del flows
    return results


# -- part 2: event to enforced --------------------------------------------------------------

APPS = ["web", "api", "auth", "cart", "checkout", "search", "catalog", "payments", "orders",
        "users", "inventory", "shipping", "reviews", "gateway", "frontend", "admin",
        "reports", "worker", "redis", "postgres"]
TIER_OF = {app: ("frontend" if i % 5 in (0, 1) else "backend" if i % 5 in (2, 3) else "data")
           for i, app in enumerate(APPS)}
TEAMS = [f"team-{i}" for i in range(10)]
NAME_LABEL = "kubernetes.io/metadata.name"


class Cluster:
    """
    Raw API objects of a synthetic cluster: NAMESPACES namespaces (team and
    env labels; namespace i belongs to team i % 10), kube-system with two
    kube-dns pods, PODS pods with app/tier/version labels and named ports
    http and metrics, pod i in namespace i % NAMESPACES on node
    (i // NAMESPACES) % NODES + 1, so every node holds PODS / NODES pods,
    spread over every namespace. Ten policies per namespace: a default-deny
    ingress, five same-namespace app-to-app allows (numeric or named port),
    two allows from a team's namespaces, one from a team's frontend pods, one
    egress policy to kube-dns and to one app.
    """

    def __init__(self, seed: int = SEED):
        self.rng = random.Random(seed)
        self.nodes = [f"node-{i + 1}" for i in range(NODES)]
        self.namespaces: dict[str, dict] = {}
        self.apps_in: dict[str, list[str]] = {}
        self.pods: dict[str, dict] = {}
        self.policies: dict[str, dict] = {}
        self.allows: list[tuple[str, str, str]] = []  # (policy key, ns, peer app): same-ns-app
        self._ip = 0
        self._serial = 0
        self._namespace("kube-system", {})
        for i in range(2):
            self.add_pod("kube-system", {"k8s-app": "kube-dns", "tier": "system"},
                         self.nodes[1 + i], name=f"coredns-{i}")
        self.user_namespaces = [f"ns-{i:02d}" for i in range(NAMESPACES)]
        for i, ns in enumerate(self.user_namespaces):
            self._namespace(ns, {"team": TEAMS[i % len(TEAMS)],
                                 "env": ("prod", "staging", "dev")[i % 3]})
            self.apps_in[ns] = self.rng.sample(APPS, 6)
        for i in range(PODS):
            ns = self.user_namespaces[i % NAMESPACES]
            self.add_pod(ns, self.labels(ns), self.nodes[(i // NAMESPACES) % NODES])
        for ns in self.user_namespaces:
            for shape in ("deny", "app", "app", "app", "app", "app", "team", "team",
                          "team-frontend", "dns-egress"):
                self.add_policy(ns, shape)

    def _namespace(self, name: str, labels: dict) -> None:
        self.namespaces[name] = {"apiVersion": "v1", "kind": "Namespace",
                                 "metadata": {"name": name,
                                              "labels": {**labels, NAME_LABEL: name}}}

    def labels(self, ns: str, app: Optional[str] = None) -> dict:
        app = app or self.rng.choice(self.apps_in[ns])
        return {"app": app, "tier": TIER_OF[app], "version": self.rng.choice(["v1", "v2"])}

    def pod_object(self, ns: str, name: str, labels: dict, node: str, ip: str) -> dict:
        http = 80 if labels.get("tier") == "frontend" else 8080
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
                "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x", "ports": [
                    {"name": "http", "containerPort": http, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}

    def add_pod(self, ns: str, labels: dict, node: str, name: Optional[str] = None) -> Event:
        self._serial += 1
        name = name or f"{labels['app']}-{self._serial:06d}"
        ip = ip_of(self._ip, base=(10 << 24) + (128 << 16) + 1)
        self._ip += 1
        pod = self.pod_object(ns, name, labels, node, ip)
        self.pods[f"{ns}/{name}"] = pod
        return Event(ADDED, "Pod", f"{ns}/{name}", pod)

    def relabel(self, key: str, app: str) -> Event:
        old = self.pods[key]
        meta = old["metadata"]
        pod = self.pod_object(meta["namespace"], meta["name"], self.labels(meta["namespace"], app),
                              old["spec"]["nodeName"], old["status"]["podIP"])
        self.pods[key] = pod
        return Event(MODIFIED, "Pod", key, pod)

    def add_policy(self, ns: str, shape: str) -> None:
        rng = self.rng
        self._serial += 1
        name = f"{shape}-{self._serial:06d}"
        target, peer = rng.sample(self.apps_in[ns], 2)
        selector = {"matchLabels": {"app": target}}
        if shape == "deny":
            spec = {"podSelector": {}, "policyTypes": ["Ingress"]}
        elif shape == "app":
            port = rng.choice([{"port": 8080}, {"port": "http"}, {"port": "metrics"},
                               {"port": 5432}])
            spec = {"podSelector": selector, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": peer}}}],
                                 "ports": [port]}]}
            self.allows.append((f"{ns}/{name}", ns, peer))
        elif shape == "team":
            spec = {"podSelector": selector, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": {
                        "matchLabels": {"team": rng.choice(TEAMS)}}}],
                        "ports": [{"port": 8080}, {"port": 9090}]}]}
        elif shape == "team-frontend":
            spec = {"podSelector": selector, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{
                        "namespaceSelector": {"matchLabels": {"team": rng.choice(TEAMS)}},
                        "podSelector": {"matchLabels": {"tier": "frontend"}}}],
                        "ports": [{"port": "http"}]}]}
        else:  # dns-egress
            spec = {"podSelector": selector, "policyTypes": ["Egress"],
                    "egress": [
                        {"to": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: "kube-system"}},
                                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                         "ports": [{"protocol": "UDP", "port": 53},
                                   {"protocol": "TCP", "port": 53}]},
                        {"to": [{"podSelector": {"matchLabels": {"app": peer}}}],
                         "ports": [{"port": "http"}]}]}
        self.policies[f"{ns}/{name}"] = {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}

    def change_port(self, key: str) -> Event:
        policy = self.policies[key]
        new = {**policy, "spec": {**policy["spec"]}}
        rule = dict(new["spec"]["ingress"][0])
        rule["ports"] = [{"port": self.rng.randrange(1024, 30000)}]
        new["spec"]["ingress"] = [rule]
        self.policies[key] = new
        return Event(MODIFIED, "NetworkPolicy", key, new)

    def initial_events(self) -> list[Event]:
        return [Event(ADDED, kind, key, obj)
                for kind, objects in (("Namespace", self.namespaces), ("Pod", self.pods),
                                      ("NetworkPolicy", self.policies))
                for key, obj in objects.items()]


class NodeView:
    """netplugin's side: node-1's NodeState, holding entries across generations."""

    def __init__(self, engine: PolicyEngine, node: str):
        self.engine = engine
        self.node = node
        self.generation = 0
        self.policies: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}

    def state(self) -> NodeState:
        self.generation += 1
        index = self.engine.node_index(self.node)
        for policy_id in index.policies:
            if policy_id not in self.policies:
                self.policies[policy_id] = self.engine.policies[policy_id]
        for key in index.groups:
            if key not in self.groups:
                self.groups[key] = self.engine.groups[key.rsplit(".", 1)[0]]
        self.policies = {i: self.policies[i] for i in index.policies}
        self.groups = {k: self.groups[k] for k in index.groups}
        return NodeState(self.generation, index, dict(self.policies), dict(self.groups))


class EventSource:
    """Chooses the next event from the current state, so that it touches node-1."""

    KINDS = ("new peer pod", "peer relabel", "new local pod", "policy port")

    def __init__(self, cluster: Cluster, engine: PolicyEngine):
        self.cluster = cluster
        self.engine = engine
        self.rng = random.Random(SEED + 1)

    def _local_allows(self) -> list[tuple[str, str, str]]:
        """The same-namespace allows in force on node-1."""
        applied = {tuple(pid.split(".")[:2]) for pid in self.engine.node_index(NODE).policies}
        return [(key, ns, peer) for key, ns, peer in self.cluster.allows
                if tuple(key.split("/")) in applied]

    def event(self, i: int) -> tuple[str, Event]:
        kind = self.KINDS[i % len(self.KINDS)]
        cluster, rng = self.cluster, self.rng
        remote = cluster.nodes[1 + rng.randrange(NODES - 1)]
        if kind == "new peer pod":
            _, ns, peer = rng.choice(self._local_allows())
            return kind, cluster.add_pod(ns, cluster.labels(ns, peer), remote)
        if kind == "peer relabel":
            _, ns, peer = rng.choice(self._local_allows())
            candidates = [key for key, pod in cluster.pods.items()
                          if pod["metadata"]["namespace"] == ns
                          and pod["spec"]["nodeName"] != NODE
                          and pod["metadata"]["labels"]["app"] != peer]
            return kind, cluster.relabel(rng.choice(candidates), peer)
        if kind == "new local pod":
            ns = rng.choice(cluster.user_namespaces)
            return kind, cluster.add_pod(ns, cluster.labels(ns), NODE)
        key, _, _ = rng.choice(self._local_allows())
        return kind, cluster.change_port(key)


async def wait_until(reactor: Any, predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


def flow_changes(before: dict, after: dict) -> int:
    return (sum(1 for k in before if k not in after)
            + sum(1 for k, f in after.items() if before.get(k) != f))


async def event_to_enforced(reactor: Any, workdir: str, events: int) -> dict:
    started = time.perf_counter()
    cluster = Cluster()
    engine = PolicyEngine()
    for event in cluster.initial_events():
        engine.apply(event)
    engine.take_changes()
    if engine.errors:
        raise RuntimeError(f"engine rejected objects: {list(engine.errors.items())[:3]}")
    view = NodeView(engine, NODE)
    state = view.state()
    compile_s = time.perf_counter() - started

    ovs = private_ovs(os.path.join(workdir, "ovs-events"))
    client = None
    try:
        ovs.start()
        settings = BridgeSettings(reactor, ovs.bridge, f"unix:{ovs.db_socket}",
                                  vsctl=shutil.which("ovs-vsctl"), env=ovs.env)
        manager = DatapathManager(reactor, settings)
        # Time the pieces of update() on this instance: the pipeline rebuild
        # (_wanted) and the bundle (encode, send, commit confirmed).
        phases: dict[str, float] = {}

        def timed_wanted(state, _wanted=manager._wanted):
            t = time.perf_counter()
            try:
                return _wanted(state)
            finally:
                phases["pipeline"] = time.perf_counter() - t

        async def timed_bundle(protocol, changes, *args, _bundle=manager._bundle):
            t = time.perf_counter()
            try:
                return await _bundle(protocol, changes, *args)
            finally:
                phases["bundle"] = time.perf_counter() - t

        manager._wanted = timed_wanted
        manager._bundle = timed_bundle
        await manager.update(state)  # not connected yet: only remembered
        install_started = time.perf_counter()
        client = OpenFlowClient(reactor, f"unix:{ovs.mgmt_socket}", on_connect=manager.connected)
        client.startService()
        await client.whenConnected(failAfterFailures=5)
        await wait_until(reactor, lambda: manager.applied_generation == state.generation
                         or manager.last_error, 120, "the first install")
        if manager.last_error:
            raise RuntimeError(f"first install failed: {manager.last_error}")
        install_s = time.perf_counter() - install_started
        initial_flows = len(manager.installed)
        initial = {"pods": len(cluster.pods), "local_pods": len(state.index.pods),
                   "node_policies": len(state.index.policies),
                   "node_groups": len(state.index.groups)}

        source = EventSource(cluster, engine)
        totals, engine_ms, pipeline_ms, bundle_ms, mods = [], [], [], [], []
        by_kind: dict[str, list[float]] = {}
        gc.collect()
        for i in range(events):
            kind, event = source.event(i)
            before = dict(manager.installed)  # the manager updates its own in place
            phases.clear()
            t0 = time.perf_counter()
            engine.apply(event)
            engine.take_changes()
            state = view.state()
            t1 = time.perf_counter()
            await manager.update(state)
            t2 = time.perf_counter()
            if manager.last_error or manager.applied_generation != state.generation:
                raise RuntimeError(f"event {i} ({kind}) not applied: {manager.last_error}")
            if engine.errors:
                raise RuntimeError(f"engine rejected: {list(engine.errors.items())[:3]}")
            changed = flow_changes(before, manager.installed)
            if not changed:
                raise RuntimeError(f"event {i} ({kind}) changed no flow on {NODE}")
            totals.append((t2 - t0) * 1000)
            engine_ms.append((t1 - t0) * 1000)
            pipeline_ms.append(phases.get("pipeline", 0) * 1000)
            bundle_ms.append(phases.get("bundle", 0) * 1000)
            mods.append(changed)
            by_kind.setdefault(kind, []).append((t2 - t0) * 1000)
        bridge_count = await deferToThread(bridge_flow_count, ovs)
        if bridge_count != len(manager.installed):
            raise RuntimeError(f"the bridge holds {bridge_count} flows, the manager "
                               f"installed {len(manager.installed)}")
        return {
            **initial, "policies": len(cluster.policies), "compile_s": compile_s,
            "install_s": install_s, "initial_flows": initial_flows,
            "final_flows": bridge_count, "events": len(totals),
            "p50": statistics.median(totals), "p99": percentile(totals, 0.99),
            "max": max(totals),
            "engine_p50": statistics.median(engine_ms),
            "pipeline_p50": statistics.median(pipeline_ms),
            "bundle_p50": statistics.median(bundle_ms),
            "other_p50": statistics.median(t - a - b - c for t, a, b, c in
                                           zip(totals, engine_ms, pipeline_ms, bundle_ms)),
            "mods_p50": statistics.median(mods), "mods_max": max(mods),
            "by_kind": {k: statistics.median(v) for k, v in by_kind.items()},
        }
    finally:
        if client is not None:
            await client.stopService()
        ovs.stop()


# -- part 3: flows per rule -----------------------------------------------------------------


def shape_report(name: str, targets: int, peers: int, ports: list[dict],
                 target_ports=None, egress_block: Optional[dict] = None) -> dict:
    """
    One policy over ``targets`` local pods (app=target on node-1) and
    ``peers`` peer pods (app=peer on node-2), with the given port entries,
    through the real engine and pipeline; the flows its rule produced.
    """
    engine = PolicyEngine()
    engine.apply(Event(ADDED, "Namespace", "shapes", {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shapes", "labels": {NAME_LABEL: "shapes"}}}))
    cluster = Cluster.__new__(Cluster)  # only for pod_object
    serial = 0
    for role, count, node in (("target", targets, NODE), ("peer", peers, "node-2")):
        for i in range(count):
            http = (target_ports or (lambda i: 8080))(i) if role == "target" else 8080
            pod = cluster.pod_object("shapes", f"{role}-{i}", {"app": role}, node,
                                     ip_of(serial, base=(10 << 24) + (64 << 16) + 1))
            pod["spec"]["containers"][0]["ports"][0]["containerPort"] = http
            serial += 1
            engine.apply(Event(ADDED, "Pod", f"shapes/{role}-{i}", pod))
    if egress_block is not None:
        spec = {"podSelector": {"matchLabels": {"app": "target"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": egress_block}], "ports": ports}]}
    else:
        spec = {"podSelector": {"matchLabels": {"app": "target"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "peer"}}}],
                             "ports": ports}]}
    engine.apply(Event(ADDED, "NetworkPolicy", "shapes/p", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "shapes"}, "spec": spec}))
    if engine.errors:
        raise RuntimeError(f"{name}: {engine.errors}")
    engine.take_changes()
    (rule,) = flow_count_report(NodeView(engine, NODE).state())
    return {"name": name, "n": rule.targets, "m": rule.peers, "p": rule.ports,
            "conjunctions": rule.conjunctions, "flows": rule.flows, "bound": rule.bound,
            "naive": rule.targets * max(rule.peers, 1) * max(rule.ports, 1)}


def flows_per_rule() -> list[dict]:
    rows = [shape_report(f"{n}x{m}x{p}", n, m, [{"port": 8000 + i} for i in range(p)])
            for n, m, p in SHAPES]
    rows.append(shape_report("10x20, named port (2 numbers)", 10, 20, [{"port": "http"}],
                             target_ports=lambda i: 80 if i % 2 else 8080))
    rows.append(shape_report("10x20, port range 30000-30100", 10, 20,
                             [{"port": 30000, "endPort": 30100}]))
    rows.append(shape_report("10 -> 0.0.0.0/0 except RFC1918, 443", 10, 0, [{"port": 443}],
                             egress_block={"cidr": "0.0.0.0/0", "except": [
                                 "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}))
    return rows


# -- the report -----------------------------------------------------------------------------


def rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 1000:,.0f}k flows/s ({seconds:.2f} s)"


def print_table(through: list[dict], events: Optional[dict], shapes: list[dict],
                wall: float, load: tuple) -> None:
    rows = [("measurement", "contiv", "reference", "ratio / target", "ok")]
    for r in through:
        size, bundle, ofctl, pipelined = r["size"], r["bundle"], r["ofctl"], r["pipelined"]
        rows.append((f"install {size:,} flows, one bundle",
                     rate(size, bundle), f"ofctl --bundle {rate(size, ofctl)}",
                     f"{ofctl / bundle:.2f}x (>= {TARGET_RATIO:.1f}x)",
                     "yes" if ofctl / bundle >= TARGET_RATIO else "NO"))
        rows.append((f"install {size:,} flows, pipelined + barrier",
                     rate(size, pipelined), "(what OVS accepts)",
                     f"{ofctl / pipelined:.2f}x of ofctl (OVS ~{OVS_PIPELINED_RATIO}x)", "-"))
    if events is not None:
        e = events
        rows.append((f"event -> enforced p50 ({e['events']} events)", f"{e['p50']:.1f} ms",
                     f"engine {e['engine_p50']:.1f} + pipeline {e['pipeline_p50']:.1f} + "
                     f"diff {e['other_p50']:.1f} + bundle {e['bundle_p50']:.1f} ms", "", "-"))
        rows.append(("event -> enforced p99 (store hop excluded)", f"{e['p99']:.1f} ms",
                     f"max {e['max']:.1f} ms", f"< {TARGET_P99_MS:.0f} ms",
                     "yes" if e["p99"] < TARGET_P99_MS else "NO"))
    for s in shapes:
        rows.append((f"flows for rule {s['name']}",
                     f"{s['flows']:,} flows",
                     f"N={s['n']} M={s['m']} P={s['p']} conj={s['conjunctions']}; "
                     f"NxMxP={s['naive']:,}",
                     f"N+M+P+1 = {s['bound']:,}", "yes" if s["flows"] <= s["bound"] else "NO"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    print()
    for n, row in enumerate(rows):
        print(" " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print(line)
    print()
    notes = ["Notes:"]
    if through:
        notes += [
            "- Throughput: median of the runs per size (all runs, seconds: "
            + "; ".join(f"{r['size']:,}: " + ", ".join(
                f"{m} " + "/".join(f"{t:.2f}" for t in r["all"][m]) for m in r["all"])
                for r in through) + ").",
            "  contiv times include encoding every Flow (cold FlowEncoder); ovs-ofctl's include "
            "parsing the file; every run ended with exactly N flows in the bridge"
            + (", and at 10,000 contiv's table equalled ovs-ofctl's line for line"
               if any(r["same_table"] for r in through) else "") + ".",
            "  Until the last chunk was encoded and handed to the transport in the contiv "
            "bundle runs (OVS installs earlier chunks meanwhile), median: "
            + ", ".join(f"{statistics.median(PYTHON_SECONDS[r['size']]):.2f} s at {r['size']:,}"
                        for r in through if r["size"] in PYTHON_SECONDS) + ".",
        ]
    worse = [row for row in shapes if row["bound"] > row["naive"]]
    if worse:
        notes.append("- N+M+P+1 is more than the cross product N x M x P for "
                     + ", ".join(f"{row['name']} ({row['bound']:,} > {row['naive']:,})"
                                 for row in worse)
                     + ": with N = P = 1 the conjunction costs two extra flows.")
    if events is not None:
        e = events
        notes += [
            f"- Event -> enforced: {e['pods']:,} pods on {NODES} nodes, {e['policies']} "
            f"policies; {NODE} holds {e['local_pods']} local pods, {e['node_policies']} "
            f"policies, {e['node_groups']} groups, {e['initial_flows']:,} flows (at the start; "
            f"first install {e['install_s']:.2f} s, compile of the cluster "
            f"{e['compile_s']:.2f} s). Every event changed {NODE}'s flows "
            f"(median {e['mods_p50']:.0f}, max {e['mods_max']} flow-mods); "
            f"{e['final_flows']:,} flows in the bridge at the end, as the manager holds.",
            "  p50 by kind: " + ", ".join(f"{k} {v:.0f} ms" for k, v in e["by_kind"].items())
            + ". engine = apply + take_changes + node_index + NodeState; pipeline = the "
            "manager's IncrementalPipeline.update (_wanted); diff = the rest of "
            "update() (the changed flows compared with the installed ones); bundle = encode, "
            "send, commit confirmed.",
            "  Not timed: the memcached publish and netplugin's poll of the store "
            "(benchmarks/policy_compile.py measures the store hop; netplugin polls every "
            "100 ms).",
        ]
    notes.append(f"- Wall time {wall:.0f} s; load average before/after: "
                 f"{load[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs.")
    print("\n".join(notes))


async def main(reactor: Any, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    load = os.getloadavg()
    workdir = tempfile.mkdtemp(prefix="contiv-ofbench-")
    try:
        sizes = tuple(args.sizes) if args.sizes else SIZES
        parts = {args.only} if args.only else {"throughput", "event", "shapes"}
        through = (await throughput(reactor, workdir, sizes, args.repeats)
                   if "throughput" in parts else [])
        events = None
        if args.events and "event" in parts:
            events = await event_to_enforced(reactor, workdir, args.events)
        shapes = flows_per_rule() if "shapes" in parts else []
    finally:
        running = processes_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    ours = [name for name in netns_names() if any(ovs.tag in name for ovs in STARTED)]
    print_table(through, events, shapes, time.perf_counter() - started, load)
    print(f"- Network namespaces left behind by this run's {len(STARTED)} OVS instances: "
          f"{sorted(ours) or 'none'}; their processes still running: {running or 'none'}.")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", help="flow counts (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--events", type=int, default=EVENTS,
                        help="events to time (0: skip part 2)")
    parser.add_argument("--only", choices=("throughput", "event", "shapes"),
                        help="run only this part (1, 2 or 3), e.g. while iterating")
    args = parser.parse_args()
    missing = available()
    if missing:
        sys.exit(f"cannot run: {missing}")
    task.react(lambda reactor: ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    cli()
