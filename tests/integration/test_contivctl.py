"""
contivctl against the real thing: a private userspace OVS with the example
pods on veth ports (as the embedded demo builds it), a private memcached, and
the real daemon (twistd contiv --role=all on examples/manifests) publishing
into that memcached and programming that bridge. Every command runs as the
installed C{contivctl} executable, reading the store and the bridge as an
operator would.

The done-when condition: for every ordered pair of example pods, every
container port plus one unopened port, TCP and UDP, C{contivctl explain}'s
compiled verdict equals OVS's ofproto/trace verdict and the independent
Kubernetes semantics of tests/support/k8s_semantics.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from contiv.demo import local_pods
from tests.support import ovs as ovs_support
from tests.support.dns import free_udp_tcp_port
from tests.support.k8s_semantics import Oracle, manifest_objects
from tests.support.processes import (
    REPO,
    MemcachedServer,
    contiv_env,
    free_port,
    http_get,
    start_twistd,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.integration

EXAMPLES = os.path.join(REPO, "examples", "manifests")
NODE = "node-1"
UNOPENED_PORT = 8080
CONTIVCTL = os.path.join(os.path.dirname(sys.executable), "contivctl")


class Cluster:
    """The private OVS with the example pods, memcached, and the daemon."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.memcached = MemcachedServer()
        self.ovs = ovs_support.PrivateOVS(os.path.join(workdir, "ovs"))
        self.daemon = None
        self.pods = {}  # "ns/name" -> sandbox Pod

    def start(self):
        self.memcached.start()
        self.ovs.start()
        for pod in local_pods(EXAMPLES, NODE):
            meta = pod["metadata"]
            namespace = meta.get("namespace", "default")
            self.pods[f"{namespace}/{meta['name']}"] = self.ovs.add_pod(
                meta["name"], pod["status"]["podIP"], 16, namespace=namespace)
        self.store = f"memcached://127.0.0.1:{self.memcached.port}"
        self.http = free_port()
        self.dns_port = free_udp_tcp_port()
        self.log = os.path.join(self.workdir, "contiv.log")
        self.daemon = start_twistd(
            ["--role=all", f"--node={NODE}", "--manifests", EXAMPLES, "--store", self.store,
             "--openflow", f"unix:{self.ovs.mgmt_socket}", "--ovsdb",
             f"unix:{self.ovs.db_socket}", "--http", f"tcp:{self.http}:interface=127.0.0.1",
             "--dns-listen", f"127.0.0.1:{self.dns_port}", "--dns-upstream", "127.0.0.1:9"],
            self.workdir, self.log)
        wait_for(self._ready, 60, "the daemon's /readyz to answer 200")

    def _ready(self):
        if self.daemon.poll() is not None:
            raise AssertionError(f"the daemon exited: {open(self.log).read()[-3000:]}")
        answer = http_get(f"http://127.0.0.1:{self.http}/readyz")
        return answer is not None and answer[0] == 200

    def ctl(self, *args, bridge=True, check=None):
        """Run contivctl; returns the CompletedProcess. check: the exit status expected."""
        env = contiv_env()  # the source tree's contiv, whatever was installed
        env.update(OVS_RUNDIR=self.ovs.rundir, OVS_LOGDIR=self.ovs.logdir,
                   OVS_DBDIR=self.ovs.dbdir)
        command = [CONTIVCTL, "--store", self.store]
        if bridge:
            command += ["--bridge", self.ovs.bridge, "--ovsdb", f"unix:{self.ovs.db_socket}",
                        "--node", NODE]
        result = subprocess.run(command + list(args), env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60)
        if check is not None:
            assert result.returncode == check, (result.returncode, result.stdout,
                                                result.stderr)
        return result

    def ctl_json(self, *args, **kwargs):
        kwargs.setdefault("check", 0)
        return json.loads(self.ctl("-o", "json", *args, **kwargs).stdout)

    def stop(self):
        stop_process(self.daemon, grace=20)
        self.ovs.stop()
        self.memcached.stop()


@pytest.fixture(scope="module")
def cluster():
    missing = ovs_support.available() or (shutil.which("memcached") is None
                                          and "memcached is not installed")
    if missing:
        pytest.fail(f"the test cluster cannot run here: {missing}")
    if not os.access(CONTIVCTL, os.X_OK):
        pytest.fail(f"{CONTIVCTL} is missing: run scripts/bootstrap (it installs the "
                    f"contivctl console script)")
    workdir = tempfile.mkdtemp(prefix="contiv-ctl-")
    cluster = Cluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        log = open(cluster.log).read() if os.path.exists(cluster.log) else ""
        shutil.rmtree(workdir, ignore_errors=True)
        assert "Traceback" not in log, log[-3000:]


def container_ports(objects):
    return sorted({p["containerPort"] for o in objects if o.get("kind") == "Pod"
                   for c in o["spec"].get("containers", []) for p in c.get("ports", [])})


def test_explain_agrees_with_ovs_and_kubernetes_for_every_probe(cluster):
    objects = manifest_objects(EXAMPLES)
    oracle = Oracle(objects)
    ports = container_ports(objects) + [UNOPENED_PORT]
    assert ports == [80, 5432, UNOPENED_PORT]
    pods = sorted(cluster.pods)
    assert len(pods) == 4
    verdicts = {True: 0, False: 0}
    for src in pods:
        for dst in pods:
            if src == dst:
                continue
            for protocol in ("tcp", "udp"):
                for port in ports:
                    doc = cluster.ctl_json("explain", src, dst, f"{port}/{protocol}")
                    probe = (src, dst, port, protocol)
                    assert doc["datapath"]["checked"], (probe, doc["datapath"])
                    assert doc["datapath"]["in_port"] == cluster.pods[src].ofport, probe
                    assert doc["agree"] is True, (probe, doc)
                    expected = oracle.allowed(cluster.pods[src].ip, cluster.pods[dst].ip,
                                              protocol.upper(), port)
                    assert doc["compiled"]["allowed"] == expected, (probe, doc["compiled"])
                    assert doc["datapath"]["allowed"] == expected, (probe, doc["datapath"])
                    verdicts[expected] += 1
    assert sum(verdicts.values()) == 12 * 6
    # client -> both webs on 80/TCP, both webs -> db on 5432/TCP; everything else denied
    assert verdicts[True] == 4


def test_explain_names_the_deciding_policy_and_rule(cluster):
    allowed = cluster.ctl("explain", "default/client-1", "default/web-2", "http/tcp", check=0)
    assert "ALLOWED by the compiled rules" in allowed.stdout
    assert "ingress (destination side): allowed by default/allow-client-to-web rule 0" \
        in allowed.stdout
    assert "egress  (source side):      not isolated" in allowed.stdout
    assert "the compiled rules and OVS agree" in allowed.stdout
    denied = cluster.ctl_json("explain", "default/client-1", "10.244.1.21", "5432/tcp")
    assert denied["dst"] == {"ip": "10.244.1.21", "pod": "default/db-1", "node": NODE}
    assert denied["compiled"]["ingress"]["outcome"] == "denied"
    assert [i.split(".")[1] for i in denied["compiled"]["ingress"]["isolating"]] == \
        ["allow-web-to-db", "default-deny-ingress"]
    assert denied["datapath"]["datapath_actions"] == "drop"


def test_explain_without_a_bridge_says_the_datapath_was_not_checked(cluster):
    result = cluster.ctl("explain", "default/web-1", "default/db-1", "5432/tcp", bridge=False,
                         check=0)
    assert "ALLOWED by the compiled rules" in result.stdout
    assert "datapath: not checked: no --bridge given" in result.stdout
    doc = cluster.ctl_json("explain", "default/web-1", "default/db-1", "5432/tcp",
                           bridge=False)
    assert doc["agree"] is None and doc["datapath"]["checked"] is False
    # A bridge that is not there: the compiled verdict still, and why OVS was not asked.
    gone = cluster.ctl("explain", "default/web-1", "default/db-1", "5432/tcp", "--bridge",
                       "nosuchbr", check=0)
    assert "datapath: not checked: bridge nosuchbr not reachable" in gone.stdout


def test_explain_disagreement_is_reported_as_a_bug(cluster):
    """A flow someone else added opens client -> db in OVS: contivctl must say so, loudly."""
    db, client = cluster.pods["default/db-1"], cluster.pods["default/client-1"]
    cookie = "0xbad0000000000001"
    cluster.ovs.ofctl("add-flow", cluster.ovs.bridge,
                      f"cookie={cookie},table=50,priority=1000,tcp,nw_src={client.ip},"
                      f"nw_dst={db.ip},tp_dst=5432,actions=goto_table:70")
    try:
        result = cluster.ctl("explain", "default/client-1", "default/db-1", "5432/tcp",
                             check=2)
        assert "BUG: the compiled rules say DENIED but OVS's ofproto/trace on br0 says " \
               "ALLOWED" in result.stderr
        assert "DISAGREE" in result.stdout
    finally:
        cluster.ovs.ofctl("del-flows", cluster.ovs.bridge, f"cookie={cookie}/-1")
    cluster.ctl("explain", "default/client-1", "default/db-1", "5432/tcp", check=0)


def test_policies_of_a_pod(cluster):
    result = cluster.ctl("policies", "default/db-1", check=0)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"pod default/db-1 on {NODE} (10.244.1.21), generation ")
    assert "ingress: isolated by 2 policies" in lines
    assert any(line.startswith("  default/allow-web-to-db  [default.allow-web-to-db.")
               for line in lines)
    # From the store there are no selectors, only the members they matched.
    assert ("    rule 0: from group g.61315f0cd2e54f93 [default/web-1 10.244.1.11, "
            "default/web-2 10.244.1.12]; ports TCP/5432") in lines
    assert "    no ingress rules: allows nothing" in lines
    assert "egress: not isolated (no policy selects it for egress): everything allowed" in lines
    doc = cluster.ctl_json("policies", "default/db-1")
    assert set(doc) == {"pod", "node", "ips", "generation", "ingress", "egress"}
    assert [p["name"] for p in doc["ingress"]["policies"]] == \
        ["allow-web-to-db", "default-deny-ingress"]
    assert doc["ingress"]["policies"][0]["rules"] == [{
        "index": 0, "any_peer": False, "ports": ["TCP/5432"],
        "peers": [{"group": "g.61315f0cd2e54f93", "selector": None,
                   "members": ["default/web-1 10.244.1.11", "default/web-2 10.244.1.12"]}]}]
    assert doc["egress"] == {"isolated": False, "policies": []}


def test_groups_as_published(cluster):
    doc = cluster.ctl_json("groups")
    by_id = {g["id"]: g for g in doc["groups"]}
    assert len(by_id) == 4
    web = by_id["g.61315f0cd2e54f93"]
    assert web["count"] == 2 and web["published"]
    assert [m["pod"] for m in web["members"]] == ["default/web-1", "default/web-2"]
    assert web["members"][0]["named_ports"] == ["http=80/TCP"]
    assert web["stands_for"] == ["applied-to of default/allow-client-to-web",
                                 "sources of default/allow-web-to-db ingress rule 0"]
    assert by_id["g.c9714f67ac549405"]["count"] == 4
    text = cluster.ctl("groups", check=0).stdout
    assert "g.61315f0cd2e54f93  2 members" in text
    assert "  used as: applied-to of default/default-deny-ingress" in text
    assert "  - 10.244.1.21  default/db-1  (postgres=5432/TCP)" in text


def test_flows_of_a_pod(cluster):
    doc = cluster.ctl_json("flows", "default/db-1")
    db = cluster.pods["default/db-1"]
    assert doc["ofport"] == db.ofport and doc["port"] == db.port
    flows = doc["flows"]
    assert flows and all(f["contiv"] for f in flows)
    tables = {f["table_name"] for f in flows}
    assert {"ingress-rules", "ingress-default"} <= tables
    # The default deny: new connections to db that no rule took are dropped.
    assert any(f["table_name"] == "ingress-default" and "nw_dst=10.244.1.21" in f["match"]
               and f["actions"] == "drop" for f in flows)
    # The web -> db rule's conjunction: db's clause, the web peers, the port, the hit.
    conj_hits = [f for f in flows if "conj_id=" in f["match"]]
    assert conj_hits, flows
    conj_id = conj_hits[0]["match"].split("conj_id=")[1].split(",")[0]
    clauses = [f for f in flows if f"conjunction({conj_id}," in f["actions"]]
    assert any("nw_src=10.244.1.11" in f["match"] for f in clauses)
    assert any("tp_dst=5432" in f["match"] for f in clauses)
    # Only db's own flows and its conjunctions' clauses: not client -> web's rule.
    for flow in flows:
        assert "10.244.1.21" in flow["match"] or f"conjunction({conj_id}," in flow["actions"] \
            or f"conj_id={conj_id}" in flow["match"], flow
    assert not any(f["match"] == "tcp,tp_dst=80" for f in flows)
    everything = cluster.ovs.ofctl("dump-flows", cluster.ovs.bridge).stdout
    assert "tcp,tp_dst=80 " in everything  # it is installed, and left out
    text = cluster.ctl("flows", "default/db-1", check=0).stdout
    assert text.splitlines()[0].startswith(
        f"pod default/db-1 (10.244.1.21) on bridge br0: port {db.port} (ofport {db.ofport}); ")
    assert "table 60 (ingress-default):" in text


def test_dns_from_the_store_and_the_server(cluster):
    doc = cluster.ctl_json("dns", "web.default.svc.cluster.local", "--server",
                           f"127.0.0.1:{cluster.dns_port}", bridge=False)
    assert doc["table"]["outcome"] == "found"
    assert doc["table"]["addresses"] == ["10.96.0.10"]
    assert doc["server"]["rcode"] == "NOERROR"
    assert doc["server"]["addresses"] == doc["table"]["addresses"]
    bare = cluster.ctl_json("dns", "db", "--from", "default/client-1", bridge=False)
    assert bare["client_namespace"] == "default"
    assert bare["table"]["kind"] == "svc" and bare["table"]["addresses"] == ["10.244.1.21"]
    missing = cluster.ctl("dns", "nope.default.svc.cluster.local", "--server",
                          f"127.0.0.1:{cluster.dns_port}", bridge=False, check=0)
    assert missing.stdout.splitlines()[0] == "nope.default.svc.cluster.local: nxdomain"
    assert f"server 127.0.0.1:{cluster.dns_port}: NXDOMAIN (no addresses)" in missing.stdout


def test_errors_name_the_object(cluster):
    result = cluster.ctl("policies", "default/nope", check=1)
    assert result.stderr.strip() == (
        f"contivctl policies: pod default/nope: not found in the store at {cluster.store} "
        f"(known pods in default: client-1, db-1, web-1, web-2)")
    result = cluster.ctl("flows", "prod/web-1", check=1)
    assert "pod prod/web-1: not found in the store" in result.stderr
    assert "no pods known in namespace prod; namespaces with pods: default" in result.stderr
    unreachable = subprocess.run(
        [CONTIVCTL, "--store", f"memcached://127.0.0.1:{free_port()}", "groups"],
        env=contiv_env(), capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("contivctl groups: store unreachable: memcached "), \
        unreachable.stderr
    empty = cluster.ctl("--prefix", "other/", "groups", check=1)
    assert "nothing published under prefix 'other/'" in empty.stderr


def test_config_file_names_store_bridge_and_node(cluster, tmp_path):
    config = tmp_path / "contiv.yaml"
    config.write_text(yaml.safe_dump({
        "role": "netplugin", "node": NODE, "store": cluster.store,
        "openflow": {"connect": f"unix:{cluster.ovs.mgmt_socket}",
                     "ovsdb": f"unix:{cluster.ovs.db_socket}"}}))
    env = contiv_env()
    env.pop("OVS_RUNDIR", None)  # found from openflow.connect's socket
    result = subprocess.run([CONTIVCTL, "--config", str(config), "-o", "json", "explain",
                             "default/web-1", "default/db-1", "5432/tcp"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["datapath"]["checked"] and doc["datapath"]["bridge"] == "br0"
    assert doc["agree"] is True and doc["compiled"]["allowed"] is True
