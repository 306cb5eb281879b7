"""
contivctl's pure parts (finding pods and the policies that select them,
describing groups, explaining verdicts, reading ovs-ofctl and ofproto/trace
output) and its command line, on the example manifests compiled in process.
The store and bridge paths against real memcached and OVS are in
tests/integration/test_contivctl.py.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from twisted.internet.defer import Deferred

from contiv.ctl import cli, text
from contiv.ctl.ovs import (
    Bridge,
    OVSError,
    flows_concerning,
    parse_flows,
    parse_trace,
    trace_args,
    trace_spec,
)
from contiv.ctl.sources import CompiledManifests, open_store, read_view, run_sync
from contiv.ctl.view import (
    ClusterView,
    CtlError,
    PodInfo,
    compiled_verdict,
    find_pod,
    groups_json,
    parse_pod_ref,
    parse_port,
    policies_for_pod,
    resolve_endpoint,
)
from contiv.policy.evaluate import Evaluator, Side, Verdict
from contiv.policy.types import NamedPort
from tests.support.k8s_semantics import Oracle, manifest_objects
from tests.support.processes import REPO, free_port

EXAMPLES = os.path.join(REPO, "examples", "manifests")


@pytest.fixture(scope="module")
def view():
    return CompiledManifests(EXAMPLES).view()


# -- naming pods, addresses and ports --------------------------------------------------

def test_find_pod(view):
    pod = find_pod(view, "default/db-1")
    assert (pod.key, pod.node, pod.ips) == ("default/db-1", "node-1", ("10.244.1.21",))
    assert pod.named_ports == (NamedPort("postgres", "TCP", 5432),)


def test_unknown_pod_names_the_pod_and_the_known_ones(view):
    with pytest.raises(CtlError) as e:
        find_pod(view, "default/nope")
    assert str(e.value) == (f"pod default/nope: not found in the manifests in {EXAMPLES} "
                            f"(known pods in default: client-1, db-1, web-1, web-2)")
    with pytest.raises(CtlError) as e:
        find_pod(view, "prod/web-1")
    assert str(e.value).endswith("(no pods known in namespace prod; namespaces with pods: "
                                 "default)")


@pytest.mark.parametrize("ref", ["web-1", "/web-1", "default/", "a/b/c", ""])
def test_pod_refs_need_namespace_and_name(ref):
    with pytest.raises(CtlError, match=r"expected <namespace>/<pod>"):
        parse_pod_ref(ref)


def test_endpoints_by_pod_or_address(view):
    by_name = resolve_endpoint(view, "default/web-2")
    assert (by_name.ip, by_name.pod.key) == ("10.244.1.12", "default/web-2")
    by_ip = resolve_endpoint(view, "10.244.1.12")
    assert by_ip.pod.key == "default/web-2"
    outside = resolve_endpoint(view, "192.0.2.1")
    assert outside.pod is None and outside.label == "192.0.2.1"
    no_address = ClusterView("x", 1, {}, {}, {"a/b": PodInfo("a/b", "n", ())})
    with pytest.raises(CtlError, match="pod a/b: has no IP address in x"):
        resolve_endpoint(no_address, "a/b")


def test_ports(view):
    web = find_pod(view, "default/web-1")
    assert parse_port("80/tcp") == (80, "TCP")
    assert parse_port("53/UDP") == (53, "UDP")
    assert parse_port("8080") == (8080, "TCP")
    assert parse_port("http/tcp", web) == (80, "TCP")
    with pytest.raises(CtlError, match=r"port '0/tcp': 0 is out of range 1-65535"):
        parse_port("0/tcp")
    with pytest.raises(CtlError, match=r"port '80/icmp': protocol must be one of TCP, UDP, "
                                       r"SCTP, got 'ICMP'"):
        parse_port("80/icmp")
    with pytest.raises(CtlError, match=r"pod default/web-1 declares no UDP port named 'http' "
                                       r"\(it declares: http=80/TCP\)"):
        parse_port("http/udp", web)
    with pytest.raises(CtlError, match="not a number, and the destination is not a pod"):
        parse_port("http/tcp", None)


# -- policies and groups ----------------------------------------------------------------

def test_policies_selecting_a_pod(view):
    doc = policies_for_pod(view, find_pod(view, "default/web-1"))
    ingress = doc["ingress"]
    assert ingress["isolated"]
    assert [p["name"] for p in ingress["policies"]] == ["allow-client-to-web",
                                                      "default-deny-ingress"]
    assert ingress["policies"][0]["rules"] == [{
        "index": 0, "any_peer": False, "ports": ["TCP/http"],
        "peers": [{"group": ingress["policies"][0]["rules"][0]["peers"][0]["group"],
                   "selector": "pods in namespace default with app=client",
                   "members": ["default/client-1 10.244.1.31"]}]}]
    assert ingress["policies"][1]["rules"] == []
    assert doc["egress"] == {"isolated": False, "policies": []}
    rendered = text.policies(doc)
    assert "ingress: isolated by 2 policies" in rendered
    assert ("    rule 0: from pods in namespace default with app=client "
            "[default/client-1 10.244.1.31]; ports TCP/http") in rendered
    assert "    no ingress rules: allows nothing" in rendered


def test_client_is_selected_only_by_the_default_deny(view):
    doc = policies_for_pod(view, find_pod(view, "default/client-1"))
    assert [p["name"] for p in doc["ingress"]["policies"]] == ["default-deny-ingress"]


def test_groups_say_what_they_stand_for(view):
    doc = groups_json(view)
    by_selector = {g["selector"]: g for g in doc["groups"]}
    assert set(by_selector) == {"pods in namespace default with app=client",
                                "pods in namespace default with app=web",
                                "pods in namespace default with app=db",
                                "every pod in namespace default"}
    web = by_selector["pods in namespace default with app=web"]
    assert web["count"] == 2 and web["published"]
    assert web["stands_for"] == ["applied-to of default/allow-client-to-web",
                                 "sources of default/allow-web-to-db ingress rule 0"]
    assert web["members"] == [
        {"ip": "10.244.1.11", "pod": "default/web-1", "named_ports": ["http=80/TCP"]},
        {"ip": "10.244.1.12", "pod": "default/web-2", "named_ports": ["http=80/TCP"]}]
    rendered = text.groups(doc)
    assert rendered.splitlines()[0] == "4 address groups, generation 1"
    assert "  selector: every pod in namespace default" in rendered


# -- explaining ----------------------------------------------------------------------------

def test_compiled_verdicts_match_kubernetes_semantics(view):
    oracle = Oracle(manifest_objects(EXAMPLES))
    pods = sorted(view.pods.values(), key=lambda p: p.key)
    allowed = 0
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            for protocol in ("TCP", "UDP"):
                for port in (80, 5432, 8080):
                    doc = compiled_verdict(view, resolve_endpoint(view, src.key),
                                           resolve_endpoint(view, dst.key), protocol, port)
                    expected = oracle.allowed(src.ips[0], dst.ips[0], protocol, port)
                    assert doc["allowed"] == expected, (src.key, dst.key, protocol, port)
                    allowed += expected
    assert allowed == 4


def test_the_deciding_rule_is_named(view):
    doc = compiled_verdict(view, resolve_endpoint(view, "default/web-1"),
                           resolve_endpoint(view, "default/db-1"), "TCP", 5432)
    assert doc["verdict"] == "allowed"
    assert doc["egress"]["outcome"] == "not isolated"
    ingress = doc["ingress"]
    assert ingress["outcome"] == "allowed" and ingress["rule"] == 0
    assert ingress["policy_name"] == "default/allow-web-to-db"
    assert ingress["policy"].startswith("default.allow-web-to-db.")
    assert ingress["text"] == "allowed by default/allow-web-to-db rule 0"
    denied = compiled_verdict(view, resolve_endpoint(view, "192.0.2.9"),
                              resolve_endpoint(view, "default/db-1"), "TCP", 5432)
    assert denied["egress"]["outcome"] == "not a pod"
    assert denied["ingress"]["text"] == ("denied: isolated by default/allow-web-to-db, "
                                         "default/default-deny-ingress, and no rule of theirs "
                                         "allows it")


def test_evaluator_strings_are_unchanged():
    side = Side("allowed", "ns.p.0123", 2, ("ns.p.0123",))
    assert str(side) == "allowed by ns.p.0123 rule 2"
    assert str(Side("denied", isolating=("a", "b"))) == "denied: isolated by a, b"
    assert str(Side("not a pod")) == "not a pod"
    assert Verdict(True, "x", "y", side, side) == Verdict(True, "x", "y")
    verdict = Evaluator([], {}, {}).verdict("10.0.0.1", "10.0.0.2", "tcp", 1)
    assert verdict == Verdict(True, "not a pod", "not a pod")


def explain_doc(agree, datapath_allowed):
    return {"src": {"ip": "10.0.0.1", "pod": "a/x", "node": "n"},
            "dst": {"ip": "10.0.0.2", "pod": None, "node": None}, "port": 80,
            "protocol": "TCP", "generation": 3,
            "compiled": {"verdict": "denied", "egress": {"text": "not isolated"},
                         "ingress": {"text": "not a pod"}},
            "datapath": {"checked": True, "verdict": "allowed" if datapath_allowed else "denied",
                         "bridge": "br0", "in_port": 7, "datapath_actions": "1,2"},
            "agree": agree}


def test_explain_text_says_whether_ovs_agrees():
    disagree = text.explain(explain_doc(False, True))
    assert disagree.splitlines()[0] == "a/x (10.0.0.1) -> 10.0.0.2 80/TCP: DENIED by the " \
        "compiled rules (generation 3)"
    assert "  datapath: ALLOWED by ofproto/trace on br0 (in_port 7): datapath actions 1,2" \
        in disagree
    assert "  BUG: the compiled rules and OVS DISAGREE" in disagree
    assert "  the compiled rules and OVS agree" in text.explain(explain_doc(True, False))


# -- OVS output ---------------------------------------------------------------------------

DUMP = """\
OFPST_FLOW reply (OF1.3) (xid=0x2):
 cookie=0x100c07100, duration=0.036s, table=0, n_packets=0, n_bytes=0, priority=100,ip actions=ct(table=10,zone=1)
 cookie=0x100c07100, duration=0.036s, table=0, n_packets=3, n_bytes=90, priority=0 actions=NORMAL
 cookie=0x100c07100, duration=0.036s, table=20, n_packets=0, n_bytes=0, priority=100,udp,in_port=3,tp_dst=53 actions=CONTROLLER:65535
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,ip,nw_dst=10.244.1.11 actions=conjunction(405,1/3)
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,ip,nw_dst=10.244.1.21 actions=conjunction(292,1/3)
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,tcp,tp_dst=80 actions=conjunction(405,3/3)
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,tcp,tp_dst=5432 actions=conjunction(292,3/3)
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,conj_id=405 actions=goto_table:70
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,conj_id=292 actions=goto_table:70
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,ip,nw_src=10.244.1.11 actions=conjunction(292,2/3)
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,ip,nw_src=10.244.1.31 actions=conjunction(405,2/3)
 cookie=0x100c07100, duration=0.036s, table=50, n_packets=0, n_bytes=0, priority=100,ip,nw_src=10.244.0.0/16 actions=conjunction(77,2/2)
 cookie=0x0, duration=0.036s, table=60, n_packets=0, n_bytes=0, priority=100,ip,nw_dst=10.244.1.21 actions=drop
"""


def test_parse_flows():
    flows = parse_flows(DUMP)
    assert len(flows) == 13
    first = flows[0]
    assert (first.table, first.priority, first.cookie, first.match, first.actions) == \
        (0, 100, 0x100c07100, "ip", "ct(table=10,zone=1)")
    assert (flows[1].match, flows[1].n_packets, flows[1].n_bytes) == ("", 3, 90)
    assert flows[3].match == "ip,nw_dst=10.244.1.11"
    doc = flows[-1].to_json({60: "ingress-default"}, (0x00C07100, 0xFFFFFFFF))
    assert doc["contiv"] is False and doc["table_name"] == "ingress-default"
    assert flows[0].to_json({}, (0x00C07100, 0xFFFFFFFF))["contiv"] is True


def test_flows_concerning_a_pod_follow_its_conjunctions():
    flows = parse_flows(DUMP)
    db = [f.match for f in flows_concerning(flows, ["10.244.1.21"])]
    assert db == ["ip,nw_dst=10.244.1.21", "tcp,tp_dst=5432", "conj_id=292",
                  "ip,nw_src=10.244.1.11", "ip,nw_src=10.244.0.0/16", "ip,nw_dst=10.244.1.21"]
    # A network holding the address concerns it too; and its port, by in_port.
    client = [f.match for f in flows_concerning(flows, ["10.244.1.31"], ofport=3)]
    assert "ip,nw_src=10.244.0.0/16" in client
    assert "udp,in_port=3,tp_dst=53" in client
    assert "tcp,tp_dst=80" in client and "conj_id=405" in client
    assert "tcp,tp_dst=5432" not in client
    assert flows_concerning(flows, ["2001:db8::1"]) == []


TRACE_ALLOWED = """\
Flow: tcp,in_port=1,nw_src=10.244.1.11,nw_dst=10.244.1.21,tp_dst=5432
Datapath actions: ct(zone=1),recirc(0x4)

recirc(0x4) - resume conntrack with ct_state=new|trk
50. conj_id=2929014497, priority 100, cookie 0x100c07100
    goto_table:70
Datapath actions: ct(commit,zone=1),1,3,4,5
"""


def test_parse_trace():
    allowed = parse_trace(TRACE_ALLOWED)
    assert allowed.allowed and allowed.actions == "ct(commit,zone=1),1,3,4,5"
    assert allowed.passes == ("ct(zone=1),recirc(0x4)", "ct(commit,zone=1),1,3,4,5")
    denied = parse_trace(TRACE_ALLOWED.replace("ct(commit,zone=1),1,3,4,5", "drop"))
    assert not denied.allowed and denied.to_json()["verdict"] == "denied"
    with pytest.raises(OVSError, match="printed no 'Datapath actions' line"):
        parse_trace("ovs-vswitchd: no bridge named br9\n")


def test_trace_spec():
    assert trace_spec(4, "tcp", "10.0.0.1", "10.0.0.2", 80) == \
        "in_port=4,tcp,nw_src=10.0.0.1,nw_dst=10.0.0.2,tcp_dst=80"
    assert trace_spec(4, "UDP", "fd00::1", "fd00::2", 53, src_mac="02:00:00:00:00:01") == \
        "in_port=4,udp6,dl_src=02:00:00:00:00:01,ipv6_src=fd00::1,ipv6_dst=fd00::2,udp_dst=53"
    assert trace_args("br0", "x") == ["ofproto/trace", "br0", "x", "--ct-next", "trk,new"]


def test_missing_ovs_tools_are_named(tmp_path):
    bridge = Bridge("br0", env={"PATH": str(tmp_path)})
    with pytest.raises(OVSError, match="ovs-ofctl is not installed"):
        bridge.check()


# -- the store -----------------------------------------------------------------------------

def test_run_sync_refuses_a_coroutine_that_waits():
    async def waits():
        await Deferred()

    with pytest.raises(RuntimeError, match="waited on something"):
        run_sync(waits())


def test_unreachable_store_is_a_clear_error():
    store = open_store(f"memcached://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(CtlError, match=r"^store unreachable: memcached 127\.0\.0\.1:\d+ "
                                       r"unavailable \(get\)"):
        read_view(store)


def test_bad_store_urls():
    with pytest.raises(CtlError, match="store 'memory' lives inside the daemon's process"):
        open_store("memory")
    with pytest.raises(CtlError, match="--store: expected 'memory' or 'memcached://"):
        open_store("redis://x:1")


def test_nothing_published_under_the_prefix():
    compiled = CompiledManifests(EXAMPLES)
    with pytest.raises(CtlError, match="nothing published under prefix 'other/'"):
        read_view(compiled.store, prefix="other/")


class Publishing:
    """A store where a publish bumps gen just after the group map root is read, N times."""

    def __init__(self, store, times):
        self.store, self.times = store, times

    def get_many(self, keys):
        keys = list(keys)
        found = self.store.get_many(keys)
        if "contiv/groupmap" in keys and self.times:
            self.times -= 1
            self.store.incr("contiv/gen")
        return found


def test_a_view_is_read_again_when_a_publish_moves_gen():
    compiled = CompiledManifests(EXAMPLES)
    store = Publishing(compiled.store, 1)
    view = read_view(store)
    assert view.problems == () and view.generation == 2 and store.times == 0
    moving = read_view(Publishing(compiled.store, 100))
    assert moving.problems[-1].startswith("contiv/gen kept moving while reading (3 tries)")


# -- the command line ----------------------------------------------------------------------

def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_explain_json_from_manifests(capsys):
    status, out, err = run(capsys, "--manifests", EXAMPLES, "explain", "default/client-1",
                           "default/web-1", "http/tcp", "-o", "json")
    assert status == 0, err
    doc = json.loads(out)
    assert set(doc) == {"src", "dst", "port", "protocol", "generation", "compiled",
                        "datapath", "agree"}
    assert doc["port"] == 80 and doc["protocol"] == "TCP"
    assert doc["compiled"]["ingress"]["policy_name"] == "default/allow-client-to-web"
    assert doc["datapath"] == {"checked": False, "reason": "no --bridge given",
                               "bridge": None, "in_port": None, "flow": None}
    assert doc["agree"] is None


def test_explain_with_a_bridge_whose_tools_are_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    status, out, err = run(capsys, "--manifests", EXAMPLES, "--bridge", "br0", "explain",
                           "default/web-1", "default/db-1", "5432/tcp")
    assert status == 0, err
    assert "datapath: not checked: bridge br0 not reachable: ovs-ofctl is not installed" in out


def test_explain_from_another_node_is_not_traced(capsys):
    status, out, _ = run(capsys, "--manifests", EXAMPLES, "--bridge", "br0", "--node",
                         "node-2", "explain", "default/web-1", "default/db-1", "5432/tcp")
    assert status == 0
    assert "datapath: not checked: default/web-1 runs on node node-1; bridge br0 is node " \
           "node-2's" in out


def test_every_command_has_json(capsys):
    for argv in (["policies", "default/db-1"], ["groups"], ["dns", "web"]):
        status, out, err = run(capsys, "-o", "json", "--manifests", EXAMPLES, *argv)
        assert status == 0, (argv, err)
        assert isinstance(json.loads(out), dict)


def test_dns_from_the_name_table(capsys):
    status, out, _ = run(capsys, "--manifests", EXAMPLES, "-o", "json", "dns", "db",
                         "--from", "default/client-1")
    doc = json.loads(out)
    assert doc["client_namespace"] == "default"
    assert doc["table"] == {"outcome": "found", "kind": "svc", "namespace": "default",
                            "entry": "db", "addresses": ["10.244.1.21"], "port": None}
    status, out, _ = run(capsys, "--manifests", EXAMPLES, "dns", "nope.default.svc.cluster.local")
    assert out == "nope.default.svc.cluster.local: nxdomain\n"
    status, out, _ = run(capsys, "--manifests", EXAMPLES, "dns", "example.org")
    assert out == "example.org: forward\n"


def test_errors_exit_1_and_name_the_object(capsys):
    status, out, err = run(capsys, "--manifests", EXAMPLES, "policies", "default/nope")
    assert (status, out) == (1, "")
    assert err == (f"contivctl policies: pod default/nope: not found in the manifests in "
                   f"{EXAMPLES} (known pods in default: client-1, db-1, web-1, web-2)\n")
    status, _, err = run(capsys, "groups")
    assert status == 1 and "nothing to read: give --store memcached://host:port" in err
    status, _, err = run(capsys, "--store", "memory", "groups")
    assert status == 1 and "store 'memory' lives inside the daemon's process" in err
    status, _, err = run(capsys, "--store", "memcached://h:1", "--manifests", EXAMPLES,
                         "groups")
    assert status == 1 and "give --store or --manifests, not both" in err
    status, _, err = run(capsys, "--manifests", "/nonexistent", "groups")
    assert status == 1 and "manifests /nonexistent: cannot list" in err
    status, _, err = run(capsys, "--manifests", EXAMPLES, "flows", "default/db-1")
    assert status == 1 and "flows: which bridge? give --bridge NAME" in err


def test_usage_errors_exit_1_not_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "default/a"])
    assert e.value.code == 1
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 1


def test_help_documents_the_json_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("policies:", "groups:", "flows:", "explain:", "dns:"):
        assert command in out
    assert "2 explain found the" in out


def settings(tmp_path, config, *argv, environ=None):
    path = tmp_path / "contiv.yaml"
    path.write_text(yaml.safe_dump(config))
    args = cli.build_parser().parse_args(["--config", str(path), *argv, "groups"])
    return cli.Settings(args, environ if environ is not None else {})


def test_config_file(tmp_path):
    found = settings(tmp_path, {"role": "netplugin", "node": "n7",
                                "store": "memcached://127.0.0.1:11211", "store_prefix": "c2/",
                                "openflow": {"connect": "unix:/x/run/br7.mgmt"}})
    assert (found.store, found.prefix, found.node, found.bridge) == \
        ("memcached://127.0.0.1:11211", "c2/", "n7", "br7")
    assert found.env["OVS_RUNDIR"] == "/x/run"
    kept = settings(tmp_path, {"role": "netplugin", "store": "memcached://127.0.0.1:1",
                               "openflow": {"connect": "unix:/x/run/br7.mgmt"}},
                    "--bridge", "br0", "--prefix", "p/", environ={"OVS_RUNDIR": "/mine"})
    assert (kept.bridge, kept.prefix, kept.env["OVS_RUNDIR"]) == ("br0", "p/", "/mine")
    # The embedded default: the memory store, and the manifests compiled here.
    embedded = settings(tmp_path, {"source": {"manifests": EXAMPLES}})
    assert (embedded.store, embedded.manifests) == (None, EXAMPLES)
    assert len(embedded.view().pods) == 4


def test_bad_config_names_the_key(tmp_path):
    with pytest.raises(CtlError, match=r"^--config: store: expected 'memory' or .* \(in .*"
                                       r"contiv.yaml\)$"):
        settings(tmp_path, {"store": "redis://x", "source": {"manifests": EXAMPLES}})
    args = cli.build_parser().parse_args(["--config", str(tmp_path / "none.yaml"), "groups"])
    with pytest.raises(CtlError, match=r"^--config: cannot read .*none.yaml: No such file"):
        cli.Settings(args, {})
    with pytest.raises(CtlError, match="store is 'memory' and no source.manifests"):
        settings(tmp_path, {"role": "netplugin"})
