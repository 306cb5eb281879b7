"""
The upstream Kubernetes e2e NetworkPolicy scenarios (test/e2e/network/netpol),
run against the independent oracle (L{tests.support.k8s_semantics}) and the
compiled policies (L{contiv.policy.evaluate.Evaluator}).

The cluster is the upstream one: namespaces x, y and z (labels ns=<name> and
kubernetes.io/metadata.name=<name>), pods a, b and c in each (label
pod=<name>), each serving 80 and 81 over TCP, UDP and SCTP with the named
ports serve-80-tcp, serve-81-udp, ... Every pod is dual-stack.

Each scenario is a script of cluster changes and expectations:
  - C{test_oracle[...]} checks the oracle against the reachability matrix
    the upstream test describes (loopback ignored, as upstream does) and a
    few explicitly written probes;
  - C{test_compiler[...]} replays the script through L{PolicyEngine} and
    checks that the evaluator agrees with the oracle on every probe: every
    pair of same-family addresses (the 18 pod addresses and two outside
    ones) on TCP, UDP and SCTP, ports 53, 80 and 81.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest

from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event, object_key
from tests.support.k8s_semantics import NAME_LABEL, Oracle

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES)
PROTOCOLS = ("TCP", "UDP", "SCTP")
MATRIX_PORTS = (80, 81)
PROBE_PORTS = (53, 80, 81)
EXTERNAL_V4 = "192.0.2.10"
EXTERNAL_V6 = "2001:db8::10"



# -- the cluster ---------------------------------------------------------------

def pod_ip(pod: str, family: int = 4) -> str:
    ns, name = pod.split("/")
    n, p = NAMESPACES.index(ns) + 1, POD_NAMES.index(name) + 1
    return f"10.0.{n}.{p}" if family == 4 else f"fd00::{n}:{p}"


def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name,
                         "labels": {"ns": name, NAME_LABEL: name, **labels}},
            "status": {"phase": "Active"}}


def pod(key: str, labels: Optional[dict] = None, ips: Optional[tuple] = None,
        node: Optional[str] = None, host_network: bool = False, phase: str = "Running") -> dict:
    ns, name = key.split("/")
    if ips is None:
        ips = (pod_ip(key, 4), pod_ip(key, 6))
    if node is None:
        node = f"node-{POD_NAMES.index(name) % 2 + 1}" if name in POD_NAMES else "node-1"
    containers = [
        {"name": f"cont-{port}-{proto.lower()}", "image": "agnhost",
         "ports": [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port,
                    "protocol": proto}]}
        for port in (80, 81) for proto in PROTOCOLS]
    obj = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": ns, "name": name,
                        "labels": {"pod": name} if labels is None else dict(labels)},
           "spec": {"nodeName": node, "containers": containers},
           "status": {"phase": phase}}
    if host_network:
        obj["spec"]["hostNetwork"] = True
    if ips:
        obj["status"]["podIP"] = ips[0]
        obj["status"]["podIPs"] = [{"ip": ip} for ip in ips]
    return obj


# -- policies ------------------------------------------------------------------

_ABSENT = object()


def policy(name: str, ns: str = "x", select: Optional[dict] = None, *, ingress: Any = _ABSENT,
           egress: Any = _ABSENT, types: Any = _ABSENT) -> dict:
    """A NetworkPolicy; C{select} is a matchLabels dict ({} or None: every pod)."""
    spec: dict = {"podSelector": {"matchLabels": dict(select)} if select else {}}
    if ingress is not _ABSENT:
        spec["ingress"] = ingress
    if egress is not _ABSENT:
        spec["egress"] = egress
    if types is not _ABSENT:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def labels_sel(**labels: str) -> dict:
    return {"matchLabels": labels}


def expr(key: str, op: str, *values: str) -> dict:
    e = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return e


def exprs_sel(*expressions: dict) -> dict:
    return {"matchExpressions": list(expressions)}


def peer(pods: Optional[dict] = None, nss: Optional[dict] = None) -> dict:
    p = {}
    if pods is not None:
        p["podSelector"] = pods
    if nss is not None:
        p["namespaceSelector"] = nss
    return p


def block(cidr: str, *excepts: str) -> dict:
    b: dict = {"cidr": cidr}
    if excepts:
        b["except"] = list(excepts)
    return {"ipBlock": b}


def port(number: Any = None, protocol: Optional[str] = None, end: Optional[int] = None) -> dict:
    p: dict = {}
    if protocol is not None:
        p["protocol"] = protocol
    if number is not None:
        p["port"] = number
    if end is not None:
        p["endPort"] = end
    return p


def ns_name(name: str) -> dict:
    return labels_sel(**{NAME_LABEL: name})


# -- reachability ----------------------------------------------------------------

class Reach:
    """An expected matrix over the 9 pods; patterns like 'x/a', 'x/*', '*/b', '*'."""

    def __init__(self, default: bool = True):
        self.m = {(s, d): default for s in PODS for d in PODS}

    def peer(self, src: str, dst: str, value: bool) -> "Reach":
        src = "*/*" if src == "*" else src
        dst = "*/*" if dst == "*" else dst
        for s, d in self.m:
            if fnmatch.fnmatchcase(s, src) and fnmatch.fnmatchcase(d, dst):
                self.m[(s, d)] = value
        return self

    def ingress(self, dst: str, value: bool) -> "Reach":
        return self.peer("*", dst, value)

    def egress(self, src: str, value: bool) -> "Reach":
        return self.peer(src, "*", value)


def _show(m: dict) -> str:
    lines = ["     " + " ".join(d[0] + d[2] for d in PODS)]
    for s in PODS:
        lines.append(f"{s}  " + " ".join(" ." if s == d else (" 1" if m[(s, d)] else " 0")
                                          for d in PODS))
    return "\n".join(lines)


# -- the script runner -------------------------------------------------------------

@dataclass
class Script:
    compiled: bool
    objects: dict = field(default_factory=dict)  # (kind, key) -> object
    engine: Any = None
    dirty: bool = True
    compared: int = 0

    def __post_init__(self):
        if self.compiled:
            from contiv.policy.engine import PolicyEngine
            self.engine = PolicyEngine()
        for name in NAMESPACES:
            self.add(namespace(name))
        for key in PODS:
            self.add(pod(key))

    # changes
    def _event(self, type_: str, obj: dict) -> None:
        kind = obj["kind"]
        key = object_key(obj)
        if type_ == DELETED:
            obj = self.objects.pop((kind, key))
        else:
            self.objects[(kind, key)] = obj
        if self.engine is not None:
            self.engine.apply(Event(type_, kind, key, obj))
        self.dirty = True

    def add(self, *objs: dict) -> None:
        for obj in objs:
            kind, key = obj["kind"], object_key(obj)
            self._event(MODIFIED if (kind, key) in self.objects else ADDED, obj)

    def delete(self, kind: str, key: str) -> None:
        self._event(DELETED, self.objects[(kind, key)])

    def oracle(self) -> Oracle:
        return Oracle(self.objects.values())

    # expectations
    def expect(self, reach: Reach, *on: tuple) -> None:
        """The matrix on each (protocol, port) of C{on} (default: TCP 80)."""
        self._compare()
        if self.compiled:
            return
        oracle = self.oracle()
        for proto, number in on or (("TCP", 80),):
            got = {(s, d): oracle.allowed(pod_ip(s), pod_ip(d), proto, number)
                   for s in PODS for d in PODS}
            wrong = [(s, d) for (s, d) in got if s != d and got[(s, d)] != reach.m[(s, d)]]
            assert not wrong, (
                f"oracle disagrees with the upstream matrix on {proto}/{number} at "
                f"{wrong[:8]}\noracle:\n{_show(got)}\nexpected:\n{_show(reach.m)}")

    def probe(self, src: str, dst: str, proto: str, number: int, expected: bool) -> None:
        """One explicit probe; pods by name ('x/a', 'x/a@6') or addresses."""
        self._compare()
        if self.compiled:
            return
        got = self.oracle().allowed(_addr(src), _addr(dst), proto, number)
        assert got == expected, f"oracle: {src} -> {dst} {proto}/{number} = {got}"

    def _compare(self) -> None:
        if not self.compiled or not self.dirty:
            return
        from contiv.policy.evaluate import Evaluator
        assert self.engine.errors == {}, self.engine.errors
        evaluator = Evaluator.from_engine(self.engine)
        oracle = self.oracle()
        addresses = set()
        for (kind, _), obj in self.objects.items():
            if kind == "Pod":
                for entry in obj["status"].get("podIPs") or ():
                    addresses.add(entry["ip"])
                if obj["status"].get("podIP"):
                    addresses.add(obj["status"]["podIP"])
        v4 = sorted(a for a in addresses if ":" not in a) + [EXTERNAL_V4]
        v6 = sorted(a for a in addresses if ":" in a) + [EXTERNAL_V6]
        wrong = []
        for family in (v4, v6):
            for src in family:
                for dst in family:
                    for proto in PROTOCOLS:
                        for number in PROBE_PORTS:
                            want = oracle.allowed(src, dst, proto, number)
                            got = evaluator.allowed(src, dst, proto, number)
                            self.compared += 1
                            if got != want:
                                wrong.append((src, dst, proto, number, want, got,
                                              evaluator.verdict(src, dst, proto, number),
                                              oracle.verdict(src, dst, proto, number)))
        self.dirty = False
        assert not wrong, (
            f"{len(wrong)} probes where the evaluator disagrees with the oracle; first ones "
            "(src, dst, proto, port, oracle, evaluator, evaluator verdict, "
            "oracle (egress, ingress)):\n" + "\n".join(map(repr, wrong[:12])))


def _addr(name: str) -> str:
    if "/" in name:
        key, _, fam = name.partition("@")
        return pod_ip(key, int(fam or 4))
    return name


SCENARIOS: dict[str, Callable[[Script], None]] = {}


def scenario(name: str):
    def register(fn):
        assert name not in SCENARIOS, name
        SCENARIOS[name] = fn
        return fn
    return register


ALL_COMBOS = tuple((proto, number) for proto in PROTOCOLS for number in MATRIX_PORTS)
TCP80, TCP81 = ("TCP", 80), ("TCP", 81)
UDP80, UDP81 = ("UDP", 80), ("UDP", 81)
SCTP80, SCTP81 = ("SCTP", 80), ("SCTP", 81)


# -- the upstream scenarios (TCP) ----------------------------------------------------

@scenario("should support a 'default-deny-ingress' policy")
def _(t: Script):
    t.add(policy("deny-ingress", "x", {}, ingress=[], types=["Ingress"]))
    t.expect(Reach().ingress("x/*", False), *ALL_COMBOS)
    t.probe("y/a", "y/b", "TCP", 80, True)
    t.probe("x/a", "y/b", "TCP", 80, True)
    t.probe("y/a", "x/b", "TCP", 80, False)
    t.probe(EXTERNAL_V4, "x/b", "UDP", 53, False)
    t.probe("x/a", EXTERNAL_V4, "UDP", 53, True)


@scenario("should support a 'default-deny-all' policy")
def _(t: Script):
    t.add(policy("deny-all", "x", {}, ingress=[], egress=[], types=["Ingress", "Egress"]))
    t.expect(Reach().ingress("x/*", False).egress("x/*", False), *ALL_COMBOS)
    t.probe("x/a", EXTERNAL_V4, "TCP", 80, False)
    t.probe("y/a", "z/a", "TCP", 80, True)


@scenario("should enforce policy to allow traffic from pods within server namespace "
          "based on PodSelector")
def _(t: Script):
    t.add(policy("x-a-allows-x-b", "x", {"pod": "a"},
                 ingress=[{"from": [peer(pods=labels_sel(pod="b"))]}]))
    t.expect(Reach().ingress("x/a", False).peer("x/b", "x/a", True), *ALL_COMBOS)
    t.probe("y/b", "x/a", "TCP", 80, False)
    t.probe("x/b", "x/a", "SCTP", 81, True)


@scenario("should enforce policy to allow ingress traffic for a target")
def _(t: Script):
    t.add(policy("deny-all", "x", {}, ingress=[]))
    t.add(policy("allow-all-to-a", "x", {"pod": "a"},
                 ingress=[{"from": [peer(pods={}, nss={})]}]))
    t.expect(Reach().ingress("x/a", True).ingress("x/b", False).ingress("x/c", False),
             *ALL_COMBOS)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 80, False)  # a pod selector matches pods only


@scenario("should enforce policy to allow ingress traffic from pods in all namespaces")
def _(t: Script):
    t.add(policy("allow-from-another-ns", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss={"matchLabels": {}})]}]))
    t.expect(Reach(), *ALL_COMBOS)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 80, False)
    t.probe(EXTERNAL_V4, "x/b", "TCP", 80, True)


@scenario("should enforce policy to allow traffic only from a different namespace, "
          "based on NamespaceSelector")
def _(t: Script):
    t.add(policy("allow-client-a-via-ns-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"))]}]))
    t.expect(Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False), *ALL_COMBOS)
    t.probe("y/c", "x/a", "UDP", 81, True)


@scenario("should enforce policy based on PodSelector with MatchExpressions")
def _(t: Script):
    t.add(policy("x-a-allows-x-b", "x", {"pod": "a"},
                 ingress=[{"from": [peer(pods=exprs_sel(expr("pod", "In", "b")))]}]))
    t.expect(Reach().ingress("x/a", False).peer("x/b", "x/a", True), *ALL_COMBOS)


@scenario("should enforce policy based on NamespaceSelector with MatchExpressions")
def _(t: Script):
    t.add(policy("allow-ns-y-match-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=exprs_sel(expr(NAME_LABEL, "In", "y")))]}]))
    t.expect(Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False), *ALL_COMBOS)


@scenario("should enforce policy based on PodSelector or NamespaceSelector")
def _(t: Script):
    t.add(policy("allow-ns-y-match-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=exprs_sel(expr(NAME_LABEL, "NotIn", "x"))),
                                    peer(pods=labels_sel(pod="b"))]}]))
    t.expect(Reach().peer("x/a", "x/a", False).peer("x/c", "x/a", False), *ALL_COMBOS)
    t.probe("x/b", "x/a", "TCP", 80, True)
    t.probe("y/b", "x/a", "TCP", 80, True)


@scenario("should enforce policy based on PodSelector and NamespaceSelector")
def _(t: Script):
    t.add(policy("allow-ns-y-podselector-and-nsselector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=exprs_sel(expr(NAME_LABEL, "NotIn", "x")),
                                         pods=labels_sel(pod="b"))]}]))
    t.expect(Reach().ingress("x/a", False).peer("y/b", "x/a", True).peer("z/b", "x/a", True),
             *ALL_COMBOS)
    t.probe("x/b", "x/a", "TCP", 80, False)
    t.probe("y/a", "x/a", "TCP", 80, False)


@scenario("should enforce policy based on Multiple PodSelectors and NamespaceSelectors")
def _(t: Script):
    t.add(policy("allow-ns-y-z-pod-b-c", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=exprs_sel(expr(NAME_LABEL, "NotIn", "x")),
                                         pods=exprs_sel(expr("pod", "In", "b", "c")))]}]))
    t.expect(Reach().peer("x/*", "x/a", False).peer("y/a", "x/a", False)
             .peer("z/a", "x/a", False), *ALL_COMBOS)


@scenario("should enforce policy based on any PodSelectors")
def _(t: Script):
    t.add(policy("allow-ns-x-pod-b-c", "x", {"pod": "a"},
                 ingress=[{"from": [peer(pods=labels_sel(pod="b")),
                                    peer(pods=labels_sel(pod="c"))]}]))
    t.expect(Reach().ingress("x/a", False).peer("x/b", "x/a", True).peer("x/c", "x/a", True),
             *ALL_COMBOS)


@scenario("should enforce policy to allow traffic only from a pod in a different namespace "
          "based on PodSelector and NamespaceSelector")
def _(t: Script):
    t.add(policy("allow-ns-y-pod-a-via-namespace-pod-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"), pods=labels_sel(pod="a"))]}]))
    t.expect(Reach().ingress("x/a", False).peer("y/a", "x/a", True), *ALL_COMBOS)


@scenario("should enforce policy based on Ports")
def _(t: Script):
    t.add(policy("allow-client-a-via-ns-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"))], "ports": [port(81, "TCP")]}]))
    t.expect(Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False), TCP81)
    t.expect(Reach().ingress("x/a", False), TCP80, UDP81, SCTP81)


@scenario("should enforce multiple, stacked policies with overlapping podSelectors")
def _(t: Script):
    allow = Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False)
    t.add(policy("allow-client-a-via-ns-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"))], "ports": [port(81, "TCP")]}]))
    t.expect(allow, TCP81)
    t.expect(Reach().ingress("x/a", False), TCP80)
    t.add(policy("allow-client-a-via-ns-selector-80", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"))], "ports": [port(80, "TCP")]}]))
    t.expect(allow, TCP80, TCP81)
    t.expect(Reach().ingress("x/a", False), UDP80, SCTP81)


@scenario("should support allow-all policy")
def _(t: Script):
    t.add(policy("allow-all", "x", {}, ingress=[{}]))
    t.expect(Reach(), *ALL_COMBOS)
    t.probe(EXTERNAL_V4, "x/a", "UDP", 53, True)
    t.probe(EXTERNAL_V6, "x/a@6", "TCP", 80, True)


@scenario("should allow ingress access on one named port")
def _(t: Script):
    t.add(policy("allow-all", "x", {}, ingress=[{"ports": [port("serve-81-tcp")]}]))
    t.expect(Reach(), TCP81)
    t.expect(Reach().ingress("x/*", False), TCP80, UDP81, SCTP81)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 81, True)
    t.probe(EXTERNAL_V6, "x/a@6", "TCP", 81, True)


@scenario("should allow ingress access from namespace on one named port")
def _(t: Script):
    t.add(policy("allow-client-a-via-ns-selector-80", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"))],
                           "ports": [port("serve-80-tcp", "TCP")]}]))
    t.expect(Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False), TCP80)
    t.expect(Reach().ingress("x/a", False), TCP81, UDP80)


@scenario("should allow egress access on one named port")
def _(t: Script):
    t.add(policy("allow-egress", "x", {}, egress=[{"ports": [port("serve-80-tcp")]}],
                 types=["Egress"]))
    t.expect(Reach(), TCP80)
    t.expect(Reach().egress("x/*", False), TCP81, UDP80)
    # a named port resolves against the destination pod: an outside address has none
    t.probe("x/a", EXTERNAL_V4, "TCP", 80, False)
    t.probe("y/a", "x/a", "TCP", 81, True)


@scenario("should enforce updated policy")
def _(t: Script):
    t.add(policy("allow-all-mutate-to-deny-all", "x", {}, ingress=[{}]))
    t.expect(Reach(), TCP81)
    t.add(policy("allow-all-mutate-to-deny-all", "x", {}, ingress=[]))
    t.expect(Reach().ingress("x/*", False), TCP81)


@scenario("should allow ingress access from updated namespace")
def _(t: Script):
    t.add(policy("allow-client-a-via-ns-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=labels_sel(ns2="updated"))]}]))
    t.expect(Reach().ingress("x/a", False))
    t.add(namespace("y", ns2="updated"))
    t.expect(Reach().ingress("x/a", False).peer("y/*", "*", True), *ALL_COMBOS)
    t.add(namespace("y"))
    t.expect(Reach().ingress("x/a", False))


@scenario("should allow ingress access from updated pod")
def _(t: Script):
    t.add(policy("allow-client-a-via-pod-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(pods=labels_sel(pod="b", pod2="updated"))]}]))
    t.expect(Reach().ingress("x/a", False))
    t.add(pod("x/b", labels={"pod": "b", "pod2": "updated"}))
    t.expect(Reach().ingress("x/a", False).peer("x/b", "x/a", True), *ALL_COMBOS)
    t.add(pod("x/b"))
    t.expect(Reach().ingress("x/a", False))


@scenario("should deny ingress from pods on other namespaces")
def _(t: Script):
    t.add(policy("deny-empty-policy", "x", {},
                 ingress=[{"from": [peer(pods={"matchLabels": {}})]}]))
    t.expect(Reach().peer("y/*", "x/*", False).peer("z/*", "x/*", False), *ALL_COMBOS)


@scenario("should deny ingress access to updated pod")
def _(t: Script):
    t.add(policy("deny-ingress-via-label-selector", "x", {"target": "isolated"}, ingress=[]))
    t.expect(Reach(), *ALL_COMBOS)
    t.add(pod("x/a", labels={"pod": "a", "target": "isolated"}))
    t.expect(Reach().ingress("x/a", False), *ALL_COMBOS)


@scenario("should deny egress from pods based on PodSelector")
def _(t: Script):
    t.add(policy("deny-egress-pod-a", "x", {"pod": "a"}, egress=[], types=["Egress"]))
    t.expect(Reach().egress("x/a", False), *ALL_COMBOS)
    t.probe("y/a", "x/a", "TCP", 80, True)


@scenario("should deny egress from all pods in a namespace")
def _(t: Script):
    t.add(policy("deny-egress-ns-x", "x", {}, egress=[], types=["Egress"]))
    t.expect(Reach().egress("x/*", False), *ALL_COMBOS)


@scenario("should work with Ingress, Egress specified together")
def _(t: Script):
    t.add(policy("allow-client-a-via-pod-selector", "x", {"pod": "a"},
                 ingress=[{"from": [peer(pods=labels_sel(pod="b"))]}],
                 egress=[{"ports": [port(80)]}], types=["Egress", "Ingress"]))
    t.expect(Reach().ingress("x/a", False).peer("x/b", "x/a", True), TCP80)
    t.expect(Reach().ingress("x/a", False).egress("x/a", False).peer("x/b", "x/a", True),
             TCP81, UDP80)
    t.probe("x/a", EXTERNAL_V4, "TCP", 80, True)


@scenario("should support denying of egress traffic on the client side "
          "(even if the server explicitly allows this traffic)")
def _(t: Script):
    t.add(policy("allow-to-ns-y-pod-a", "x", {"pod": "a"},
                 egress=[{"to": [peer(nss=ns_name("y"), pods=labels_sel(pod="a"))]}],
                 types=["Egress"]))
    from_xa = [{"from": [peer(nss=ns_name("x"), pods=labels_sel(pod="a"))]}]
    t.add(policy("allow-from-xa-on-ya-match-selector", "y", {"pod": "a"}, ingress=from_xa))
    t.add(policy("allow-from-xa-on-yb-match-selector", "y", {"pod": "b"}, ingress=from_xa))
    t.expect(Reach().egress("x/a", False).ingress("y/a", False).peer("x/a", "y/a", True)
             .ingress("y/b", False), *ALL_COMBOS)


@scenario("should enforce egress policy allowing traffic to a server in a different namespace "
          "based on PodSelector and NamespaceSelector")
def _(t: Script):
    t.add(policy("allow-to-ns-y-pod-a", "x", {"pod": "a"},
                 egress=[{"to": [peer(nss=ns_name("y"), pods=labels_sel(pod="a"))]}],
                 types=["Egress"]))
    t.expect(Reach().egress("x/a", False).peer("x/a", "y/a", True), *ALL_COMBOS)


@scenario("should enforce ingress policy allowing any port traffic to a server on a "
          "specific protocol")
def _(t: Script):
    t.add(policy("allow-ingress-by-proto", "x", {"pod": "a"},
                 ingress=[{"ports": [port(protocol="TCP")]}]))
    t.expect(Reach(), TCP80, TCP81)
    t.expect(Reach().ingress("x/a", False), UDP80, SCTP81)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 53, True)
    t.probe(EXTERNAL_V4, "x/a", "UDP", 53, False)


@scenario("should enforce multiple ingress policies with ingress allow-all policy taking "
          "precedence")
def _(t: Script):
    t.add(policy("allow-ingress-port-80", "x", {}, ingress=[{"ports": [port(80)]}]))
    t.expect(Reach().ingress("x/*", False), TCP81)
    t.expect(Reach(), TCP80)
    t.add(policy("allow-ingress", "x", {}, ingress=[{}]))
    t.expect(Reach(), *ALL_COMBOS)


@scenario("should enforce multiple egress policies with egress allow-all policy taking "
          "precedence")
def _(t: Script):
    t.add(policy("allow-egress-port-80", "x", {}, egress=[{"ports": [port(80)]}],
                 types=["Egress"]))
    t.expect(Reach().egress("x/*", False), TCP81)
    t.expect(Reach(), TCP80)
    t.add(policy("allow-egress", "x", {}, egress=[{}], types=["Egress"]))
    t.expect(Reach(), *ALL_COMBOS)


@scenario("should stop enforcing policies after they are deleted")
def _(t: Script):
    t.add(policy("deny-all", "x", {}, ingress=[], egress=[], types=["Ingress", "Egress"]))
    t.expect(Reach().ingress("x/*", False).egress("x/*", False), *ALL_COMBOS)
    t.delete("NetworkPolicy", "x/deny-all")
    t.expect(Reach(), *ALL_COMBOS)


@scenario("should allow egress access to server in CIDR block")
def _(t: Script):
    t.add(policy("allow-client-a-via-cidr-egress-rule", "x", {"pod": "a"},
                 egress=[{"to": [block(pod_ip("y/b") + "/32")]}], types=["Egress"]))
    t.expect(Reach().egress("x/a", False).peer("x/a", "y/b", True), *ALL_COMBOS)
    # the block is IPv4: the same pod over IPv6 is not in it
    t.probe("x/a@6", "y/b@6", "TCP", 80, False)


@scenario("should enforce except clause while egress access to server in CIDR block")
def _(t: Script):
    t.add(policy("allow-client-a-via-cidr-egress-rule", "x", {"pod": "a"},
                 egress=[{"to": [block("0.0.0.0/4", pod_ip("x/b") + "/32")]}],
                 types=["Egress"]))
    t.expect(Reach().peer("x/a", "x/b", False), *ALL_COMBOS)
    t.probe("x/a", EXTERNAL_V4, "TCP", 80, False)  # 192.0.2.10 is outside 0.0.0.0/4


@scenario("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed")
def _(t: Script):
    t.add(policy("allow-client-a-via-cidr-egress-rule", "x", {"pod": "a"},
                 egress=[{"to": [block("0.0.0.0/4", pod_ip("x/b") + "/32")]}],
                 types=["Egress"]))
    t.expect(Reach().peer("x/a", "x/b", False), *ALL_COMBOS)
    t.add(policy("allow-client-a-via-cidr-egress-rule", "x", {"pod": "a"},
                 egress=[{"to": [block(pod_ip("x/b") + "/32")]}], types=["Egress"]))
    t.expect(Reach().egress("x/a", False).peer("x/a", "x/b", True), *ALL_COMBOS)
    t.add(policy("allow-large-cidr-except-b", "x", {"pod": "a"},
                 egress=[{"to": [block("0.0.0.0/4", pod_ip("x/b") + "/32")]}],
                 types=["Egress"]))
    t.expect(Reach(), *ALL_COMBOS)


@scenario("should enforce policies to check ingress and egress policies can be controlled "
          "independently based on PodSelector")
def _(t: Script):
    t.add(policy("allow-egress-for-target", "x", {"pod": "a"}, egress=[{}], types=["Egress"]))
    t.expect(Reach(), *ALL_COMBOS)
    t.add(policy("deny-ingress-via-label-selector", "x", {"pod": "a"}, ingress=[]))
    t.expect(Reach().ingress("x/a", False), *ALL_COMBOS)


@scenario("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP'")
def _(t: Script):
    t.add(policy("deny-ingress", "x", {}, ingress=[]))
    t.add(policy("allow-only-sctp-ingress-on-port-81", "x", {"pod": "a"},
                 ingress=[{"ports": [port(81, "SCTP")]}]))
    t.expect(Reach().ingress("x/*", False), TCP81, TCP80, UDP81, SCTP80)
    t.expect(Reach().ingress("x/*", False).ingress("x/a", True), SCTP81)


@scenario("should properly isolate pods that are selected by a policy allowing SCTP")
def _(t: Script):
    t.add(policy("allow-only-sctp-ingress-on-port-80", "x", {"pod": "a"},
                 ingress=[{"ports": [port(80, "SCTP")]}]))
    t.expect(Reach().ingress("x/a", False), TCP81, TCP80, UDP80, SCTP81)
    t.expect(Reach(), SCTP80)


@scenario("should not allow access by TCP when a policy specifies only UDP")
def _(t: Script):
    t.add(policy("allow-only-udp-ingress-on-port-81", "x", {"pod": "a"},
                 ingress=[{"ports": [port(81, "UDP")]}]))
    t.expect(Reach().ingress("x/a", False), TCP81, TCP80, UDP80, SCTP81)
    t.expect(Reach(), UDP81)


@scenario("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels "
          "using default ns label")
def _(t: Script):
    t.add(policy("allow-client-a-via-ns-selector-for-immutable-ns-label", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"))]}]))
    t.expect(Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False), *ALL_COMBOS)


@scenario("should enforce policy based on NamespaceSelector with MatchExpressions using "
          "default ns label")
def _(t: Script):
    t.add(policy("allow-ns-y-match-selector-for-immutable-ns-label", "x", {"pod": "a"},
                 egress=[{"to": [peer(nss=exprs_sel(expr(NAME_LABEL, "NotIn", "y")))]}],
                 types=["Egress"]))
    t.expect(Reach().peer("x/a", "y/*", False), *ALL_COMBOS)
    t.probe("x/a", EXTERNAL_V4, "TCP", 80, False)


# -- upstream, UDP and SCTP ----------------------------------------------------------

for _proto in ("UDP", "SCTP"):
    def _register(proto: str) -> None:
        @scenario(f"[{proto}] should support a 'default-deny-ingress' policy")
        def _(t: Script):
            t.add(policy("deny-all", "x", {}, ingress=[]))
            t.expect(Reach().ingress("x/*", False), (proto, 80), (proto, 81))

        @scenario(f"[{proto}] should enforce policy based on Ports")
        def _(t: Script):
            t.add(policy("allow-ingress-on-port-81-ns-x", "x", {"pod": "a"},
                         ingress=[{"from": [peer(nss=ns_name("y"))],
                                   "ports": [port(81, proto)]}]))
            t.expect(Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False), (proto, 81))
            t.expect(Reach().ingress("x/a", False), (proto, 80), TCP81)

        @scenario(f"[{proto}] should enforce policy to allow traffic only from a pod in a "
                  "different namespace based on PodSelector and NamespaceSelector")
        def _(t: Script):
            t.add(policy("allow-ns-y-pod-a-via-namespace-pod-selector", "x", {"pod": "a"},
                         ingress=[{"from": [peer(nss=ns_name("y"),
                                                 pods=labels_sel(pod="a"))]}]))
            t.expect(Reach().ingress("x/a", False).peer("y/a", "x/a", True),
                     (proto, 80), (proto, 81))
    _register(_proto)


# -- more cases the documentation describes ---------------------------------------------

@scenario("endPort: allow ingress on the range 80-81")
def _(t: Script):
    t.add(policy("allow-80-81", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=labels_sel(ns="y"))],
                           "ports": [port(80, "TCP", end=81)]}]))
    t.expect(Reach().peer("x/*", "x/a", False).peer("z/*", "x/a", False), TCP80, TCP81)
    t.expect(Reach().ingress("x/a", False), UDP80, SCTP81)
    t.probe("y/a", "x/a", "TCP", 53, False)


@scenario("endPort: a range 81-90 holds 81, not 80")
def _(t: Script):
    t.add(policy("allow-81-90", "x", {}, ingress=[{"ports": [port(81, end=90)]}]))
    t.expect(Reach(), TCP81)
    t.expect(Reach().ingress("x/*", False), TCP80, UDP81)


@scenario("endPort: egress range on UDP")
def _(t: Script):
    t.add(policy("egress-udp-53-80", "x", {"pod": "b"},
                 egress=[{"ports": [port(53, "UDP", end=80)]}], types=["Egress"]))
    t.expect(Reach(), UDP80)
    t.expect(Reach().egress("x/b", False), UDP81, TCP80, SCTP80)
    t.probe("x/b", EXTERNAL_V4, "UDP", 53, True)


@scenario("egress to a namespace")
def _(t: Script):
    t.add(policy("egress-to-y", "x", {"pod": "a"},
                 egress=[{"to": [peer(nss=labels_sel(ns="y"))]}], types=["Egress"]))
    t.expect(Reach().egress("x/a", False).peer("x/a", "y/*", True), *ALL_COMBOS)
    t.probe("x/a", EXTERNAL_V4, "TCP", 80, False)


@scenario("egress deny all but DNS (UDP 53) to anywhere")
def _(t: Script):
    t.add(policy("deny-egress-but-dns", "x", {},
                 egress=[{"ports": [port(53, "UDP")]}], types=["Egress"]))
    t.expect(Reach().egress("x/*", False), *ALL_COMBOS)
    t.probe("x/a", "y/a", "UDP", 53, True)
    t.probe("x/a", EXTERNAL_V4, "UDP", 53, True)
    t.probe("x/a@6", EXTERNAL_V6, "UDP", 53, True)
    t.probe("x/a", EXTERNAL_V4, "TCP", 53, False)


@scenario("policyTypes Egress only does not isolate ingress, even with ingress rules")
def _(t: Script):
    t.add(policy("egress-only", "x", {},
                 ingress=[{"from": [peer(pods=labels_sel(pod="nobody"))]}],
                 egress=[{}], types=["Egress"]))
    t.expect(Reach(), *ALL_COMBOS)


@scenario("policyTypes Ingress only ignores egress rules")
def _(t: Script):
    t.add(policy("ingress-only", "x", {"pod": "a"}, ingress=[{}],
                 egress=[{"to": [peer(pods=labels_sel(pod="nobody"))]}], types=["Ingress"]))
    t.expect(Reach(), *ALL_COMBOS)


@scenario("absent policyTypes with egress rules: Ingress and Egress")
def _(t: Script):
    t.add(policy("defaulted", "x", {"pod": "a"},
                 egress=[{"to": [peer(nss=labels_sel(ns="y"))]}]))
    t.expect(Reach().ingress("x/a", False).egress("x/a", False).peer("x/a", "y/*", True),
             *ALL_COMBOS)


@scenario("absent policyTypes with an empty egress list: Ingress only")
def _(t: Script):
    t.add(policy("defaulted", "x", {"pod": "a"}, ingress=[{"ports": [port(80)]}], egress=[]))
    t.expect(Reach(), TCP80)
    t.expect(Reach().ingress("x/a", False), TCP81, UDP80)


@scenario("empty policyTypes list defaults like an absent one")
def _(t: Script):
    t.add(policy("defaulted", "x", {"pod": "b"}, egress=[{"ports": [port(81)]}], types=[]))
    t.expect(Reach().ingress("x/b", False), TCP81)
    t.expect(Reach().ingress("x/b", False).egress("x/b", False), TCP80, UDP81)


@scenario("ipBlock with except on ingress")
def _(t: Script):
    t.add(policy("from-block", "x", {"pod": "a"},
                 ingress=[{"from": [block("10.0.0.0/16", "10.0.3.0/24")]}]))
    t.expect(Reach().peer("z/*", "x/a", False), *ALL_COMBOS)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 80, False)
    t.probe("y/a@6", "x/a@6", "TCP", 80, False)


@scenario("ipBlock everything, both families")
def _(t: Script):
    t.add(policy("from-anywhere", "x", {}, ingress=[{"from": [block("0.0.0.0/0"),
                                                              block("::/0")]}]))
    t.expect(Reach(), *ALL_COMBOS)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 80, True)
    t.probe(EXTERNAL_V6, "x/a@6", "TCP", 80, True)


@scenario("IPv6 ipBlock with except")
def _(t: Script):
    t.add(policy("v6-block", "y", {"pod": "c"},
                 ingress=[{"from": [block("fd00::/64", "fd00::1:0/112")]}]))
    t.expect(Reach().ingress("y/c", False))
    t.probe("y/a@6", "y/c@6", "TCP", 80, True)
    t.probe("x/a@6", "y/c@6", "TCP", 80, False)
    t.probe(EXTERNAL_V6, "y/c@6", "TCP", 80, False)


@scenario("rule with ports and no from admits any source, outside ones too")
def _(t: Script):
    t.add(policy("port-80-from-anywhere", "x", {"pod": "a"}, ingress=[{"ports": [port(80)]}]))
    t.expect(Reach(), TCP80)
    t.expect(Reach().ingress("x/a", False), TCP81)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 80, True)
    t.probe(EXTERNAL_V4, "x/a", "TCP", 81, False)


@scenario("matchExpressions NotIn, Exists and DoesNotExist")
def _(t: Script):
    t.add(namespace("z", team="blue"))
    t.add(pod("y/c", labels={"pod": "c", "extra": "1"}))
    t.add(policy("exprs", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=exprs_sel(expr("team", "DoesNotExist")),
                                         pods=exprs_sel(expr("pod", "NotIn", "a", "b"),
                                                        expr("extra", "Exists")))]}]))
    t.expect(Reach().ingress("x/a", False).peer("y/c", "x/a", True), *ALL_COMBOS)
    t.add(pod("z/c", labels={"pod": "c", "extra": "2"}))
    t.expect(Reach().ingress("x/a", False).peer("y/c", "x/a", True))
    t.add(namespace("z"))
    t.expect(Reach().ingress("x/a", False).peer("y/c", "x/a", True).peer("z/c", "x/a", True))


@scenario("NotIn matches pods without the key")
def _(t: Script):
    t.add(pod("y/b", labels={}))
    t.add(policy("notin", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss={}, pods=exprs_sel(expr("pod", "NotIn", "a")))]}]))
    t.expect(Reach().peer("*/a", "x/a", False))


@scenario("named port on UDP; a named port of another protocol never matches")
def _(t: Script):
    t.add(policy("udp-named", "x", {"pod": "a"},
                 ingress=[{"ports": [port("serve-80-udp", "UDP")]}]))
    t.add(policy("mismatched", "x", {"pod": "b"},
                 ingress=[{"ports": [port("serve-80-udp", "TCP")]}]))
    t.expect(Reach().ingress("x/b", False), UDP80)
    t.expect(Reach().ingress("x/a", False).ingress("x/b", False), TCP80, UDP81, SCTP80)


@scenario("egress named port to an ipBlock resolves against the destination pod")
def _(t: Script):
    t.add(policy("egress-named", "x", {"pod": "a"},
                 egress=[{"to": [block("10.0.0.0/8")], "ports": [port("serve-81-tcp")]}],
                 types=["Egress"]))
    t.expect(Reach(), TCP81)
    t.expect(Reach().egress("x/a", False), TCP80, UDP81)
    t.probe("x/a", EXTERNAL_V4, "TCP", 81, False)


@scenario("a pod whose named port differs maps the name to its own number")
def _(t: Script):
    odd = pod("y/b")
    for c in odd["spec"]["containers"]:
        for p in c["ports"]:
            if p["name"] == "serve-80-tcp":
                p["containerPort"] = 81
            elif p["name"] == "serve-81-tcp":
                p["name"] = "serve-81-tcp-renamed"
    t.add(odd)
    t.add(policy("to-serve-80", "y", {}, ingress=[{"ports": [port("serve-80-tcp")]}]))
    t.expect(Reach().ingress("y/*", False).ingress("y/a", True).ingress("y/c", True), TCP80)
    t.expect(Reach().ingress("y/*", False).ingress("y/b", True), TCP81)


@scenario("hostNetwork, completed and address-less pods are not selected nor matched")
def _(t: Script):
    t.add(pod("x/host", labels={"pod": "a"}, ips=("172.18.0.1",), host_network=True),
          pod("x/done", labels={"pod": "a"}, ips=("10.0.1.50",), phase="Succeeded"),
          pod("x/failed", labels={"pod": "a"}, ips=("10.0.1.51",), phase="Failed"),
          pod("x/pending", labels={"pod": "a"}, ips=(), phase="Pending"))
    t.add(policy("deny-a", "x", {"pod": "a"}, ingress=[], egress=[],
                 types=["Ingress", "Egress"]))
    t.add(policy("b-from-a", "x", {"pod": "b"},
                 ingress=[{"from": [peer(pods=labels_sel(pod="a"))]}]))
    t.expect(Reach().ingress("x/a", False).egress("x/a", False).ingress("x/b", False),
             *ALL_COMBOS)
    t.probe("172.18.0.1", "x/c", "TCP", 80, True)   # the host pod is not isolated
    t.probe("x/c", "172.18.0.1", "TCP", 80, True)
    t.probe("172.18.0.1", "x/b", "TCP", 80, False)  # nor matched as pod=a
    t.probe("10.0.1.50", "x/b", "TCP", 80, False)
    t.probe("y/a", "10.0.1.50", "TCP", 80, True)
    t.add(policy("b-from-host", "x", {"pod": "b"}, ingress=[{"from": [block("172.18.0.0/16")]}]))
    t.probe("172.18.0.1", "x/b", "TCP", 80, True)


@scenario("an address a completed pod left behind belongs to the running pod that took it")
def _(t: Script):
    t.add(pod("y/old", labels={"pod": "a"}, ips=(pod_ip("x/c"),), phase="Succeeded"))
    t.add(policy("from-a", "x", {"pod": "b"},
                 ingress=[{"from": [peer(nss={}, pods=labels_sel(pod="a"))]}]))
    t.expect(Reach().ingress("x/b", False).peer("*/a", "x/b", True))
    t.add(policy("c-denied", "x", {"pod": "c"}, ingress=[]))
    t.expect(Reach().ingress("x/b", False).peer("*/a", "x/b", True).ingress("x/c", False))


@scenario("pods leaving and arriving change groups")
def _(t: Script):
    t.add(policy("from-y-b", "x", {}, ingress=[{"from": [peer(nss=labels_sel(ns="y"),
                                                             pods=labels_sel(pod="b"))]}]))
    t.expect(Reach().ingress("x/*", False).peer("y/b", "x/*", True))
    t.delete("Pod", "y/b")
    t.probe(pod_ip("y/b"), "x/a", "TCP", 80, False)
    t.add(pod("y/b", ips=("10.0.2.99", "fd00::2:99")))
    t.probe("10.0.2.99", "x/a", "TCP", 80, True)
    t.probe(pod_ip("y/b"), "x/a", "TCP", 80, False)
    t.delete("Namespace", "y")
    t.probe("10.0.2.99", "x/a", "TCP", 80, False)
    t.add(namespace("y"))
    t.probe("10.0.2.99", "x/a", "TCP", 80, True)


@scenario("a namespace object without kubernetes.io/metadata.name still has the name label")
def _(t: Script):
    t.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y"}})
    t.add(policy("from-y-by-name", "x", {"pod": "a"},
                 ingress=[{"from": [peer(nss=ns_name("y"))]}]))
    t.expect(Reach().ingress("x/a", False).peer("y/*", "x/a", True), *ALL_COMBOS)


@scenario("a Pending pod that has an address is selected and matched")
def _(t: Script):
    t.add(pod("y/a", phase="Pending"))
    t.add(policy("deny-y", "y", {}, ingress=[]))
    t.add(policy("x-from-pod-a", "x", {}, ingress=[{"from": [peer(nss={},
                                                                 pods=labels_sel(pod="a"))]}]))
    t.expect(Reach().ingress("y/*", False).ingress("x/*", False).peer("*/a", "x/*", True))


@scenario("pods with only podIP, or only podIPs")
def _(t: Script):
    only_ip, only_ips = pod("y/a"), pod("y/b")
    del only_ip["status"]["podIPs"]
    del only_ips["status"]["podIP"]
    t.add(only_ip, only_ips)
    t.add(policy("from-y-a-b", "x", {}, ingress=[{"from": [peer(nss=labels_sel(ns="y"),
                                                               pods=exprs_sel(expr("pod", "In",
                                                                                   "a", "b")))]}]))
    t.expect(Reach().ingress("x/*", False).peer("y/a", "x/*", True).peer("y/b", "x/*", True))
    t.probe("y/b@6", "x/a@6", "TCP", 80, True)


@scenario("ipBlock cidr with host bits set means its network")
def _(t: Script):
    t.add(policy("host-bits", "x", {"pod": "a"},
                 ingress=[{"from": [block("10.0.2.77/24", "10.0.2.1/31")]}]))
    # 10.0.2.0/24 minus 10.0.2.0/31: y/b and y/c, not y/a
    t.expect(Reach().ingress("x/a", False).peer("y/b", "x/a", True).peer("y/c", "x/a", True),
             *ALL_COMBOS)


@scenario("a container port without protocol is TCP for named ports")
def _(t: Script):
    web = pod("x/a")
    web["spec"]["containers"].append({"name": "web", "ports": [{"name": "web",
                                                                "containerPort": 81}]})
    t.add(web)
    t.add(policy("to-web", "x", {}, ingress=[{"ports": [port("web")]}]))
    t.expect(Reach().ingress("x/*", False).ingress("x/a", True), TCP81)
    t.expect(Reach().ingress("x/*", False), TCP80, UDP81)


@scenario("endPort equal to port")
def _(t: Script):
    t.add(policy("just-80", "x", {}, ingress=[{"ports": [port(80, end=80)]}]))
    t.expect(Reach(), TCP80)
    t.expect(Reach().ingress("x/*", False), TCP81, UDP80)


@scenario("a policy in another namespace does not select this namespace's pods")
def _(t: Script):
    t.add(policy("deny-in-z", "z", {"pod": "a"}, ingress=[]))
    t.expect(Reach().ingress("z/a", False), *ALL_COMBOS)


# -- the tests -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCENARIOS))
def test_oracle(name: str) -> None:
    SCENARIOS[name](Script(compiled=False))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_compiler(name: str) -> None:
    script = Script(compiled=True)
    SCENARIOS[name](script)
    script._compare()
    assert script.compared > 0


# -- the oracle's building blocks, against the documentation's wording ---------------------

@pytest.mark.parametrize("selector, labels, expected", [
    (None, {}, True),
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    (exprs_sel(expr("a", "In", "1", "2")), {"a": "2"}, True),
    (exprs_sel(expr("a", "In", "1")), {}, False),
    (exprs_sel(expr("a", "NotIn", "1")), {}, True),
    (exprs_sel(expr("a", "NotIn", "1")), {"a": "1"}, False),
    (exprs_sel(expr("a", "Exists")), {"a": ""}, True),
    (exprs_sel(expr("a", "Exists")), {}, False),
    (exprs_sel(expr("a", "DoesNotExist")), {}, True),
    (exprs_sel(expr("a", "DoesNotExist")), {"a": "1"}, False),
    ({"matchLabels": {"a": "1"}, **exprs_sel(expr("b", "Exists"))}, {"a": "1"}, False),
])
def test_oracle_selectors(selector, labels, expected) -> None:
    from tests.support.k8s_semantics import selector_matches
    assert selector_matches(selector, labels) is expected


@pytest.mark.parametrize("spec, expected", [
    ({}, ("Ingress",)),
    ({"egress": []}, ("Ingress",)),
    ({"egress": [{}]}, ("Ingress", "Egress")),
    ({"policyTypes": [], "egress": [{}]}, ("Ingress", "Egress")),
    ({"policyTypes": ["Egress"], "ingress": [{}]}, ("Egress",)),
])
def test_oracle_policy_types(spec, expected) -> None:
    from tests.support.k8s_semantics import policy_types
    assert policy_types(spec) == expected


def test_connection_allowed_function() -> None:
    from tests.support.k8s_semantics import connection_allowed
    objects = [namespace("x"), pod("x/a"), pod("x/b"),
               policy("a-from-b-81", "x", {"pod": "a"},
                      ingress=[{"from": [peer(pods=labels_sel(pod="b"))],
                                "ports": [port("serve-81-udp", "UDP")]}])]
    assert connection_allowed(objects, pod_ip("x/b"), pod_ip("x/a"), "UDP", 81)
    assert not connection_allowed(objects, pod_ip("x/b"), pod_ip("x/a"), "TCP", 81)
    assert not connection_allowed(objects, EXTERNAL_V4, pod_ip("x/a"), "UDP", 81)
    assert connection_allowed(objects, pod_ip("x/a"), pod_ip("x/b"), "TCP", 80)
    assert connection_allowed(objects, pod_ip("x/b", 6), pod_ip("x/a", 6), "UDP", 81)
