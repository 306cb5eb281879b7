"""
One node as the datapath tests run it: a private OVS with pods as network
namespaces (web, db, client, monitor), a manifests directory with the policies
between them, and the real daemon on it.
"""

from __future__ import annotations

import json
import os
import re

import yaml

from tests.support import ovs as ovs_support
from tests.support.processes import free_port, http_get, start_twistd, stop_process, wait_for
from tests.support.traffic import serve

MARK = 0x00C07100

PODS = {  # name: (ip, labels, named ports)
    "web": ("10.244.1.11", {"app": "web"}, [("http", 80, "TCP")]),
    "db": ("10.244.1.21", {"app": "db"}, [("postgres", 5432, "TCP")]),
    "client": ("10.244.1.31", {"app": "client"}, []),
    "monitor": ("10.244.1.41", {"app": "monitor"}, []),
}


def pod_object(name):
    ip, labels, ports = PODS[name]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": "node-1", "containers": [{"name": name, "image": "x", "ports": [
                {"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def policy(name, target, peers, ports=None):
    rule = {"from": [{"podSelector": {"matchLabels": {"app": peer}}} for peer in peers]}
    if ports is not None:
        rule["ports"] = ports
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": target}} if target else {},
                     "policyTypes": ["Ingress"], "ingress": [rule] if peers else []}}


POLICIES = {
    "deny.yaml": policy("default-deny-ingress", None, []),
    "client-web.yaml": policy("allow-client-to-web", "web", ["client"],
                              [{"protocol": "TCP", "port": "http"}]),
    "web-db.yaml": policy("allow-web-to-db", "db", ["web"], [{"protocol": "TCP", "port": 5432}]),
    "monitor-web.yaml": policy("allow-monitor-to-web", "web", ["monitor"]),
}


class Node:
    """One node: a private OVS with the pods, and the daemon enforcing the manifests."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.manifests = os.path.join(workdir, "manifests")
        os.makedirs(self.manifests)
        self.write("namespace.yaml", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": "default"}})
        self.write("pods.yaml", {"apiVersion": "v1", "kind": "List",
                                 "items": [pod_object(name) for name in PODS]})
        for file, obj in POLICIES.items():
            self.write(file, obj)
        self.ovs = ovs_support.PrivateOVS(os.path.join(workdir, "ovs"))
        self.ovs.start()
        self.pods = {name: self.ovs.add_pod(name, PODS[name][0]) for name in PODS}
        self.servers = []
        for name in ("web", "db"):
            for proto in ("tcp", "udp"):
                for port in (80, 5432):
                    self.servers.append(serve(self.pods[name], proto, port))
        self.port = free_port()
        self.daemon = None

    def write(self, file, obj):
        path = os.path.join(self.manifests, file)
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(obj, f)
        os.rename(path + ".tmp", path)

    def start_daemon(self, *extra):
        self.log = os.path.join(self.workdir, f"contiv-{free_port()}.log")
        self.daemon = start_twistd(
            ["--role=all", "--node=node-1", "--manifests", self.manifests,
             "--openflow", f"unix:{self.ovs.mgmt_socket}", "--ovsdb",
             f"unix:{self.ovs.db_socket}", "--http", f"tcp:{self.port}:interface=127.0.0.1",
             *extra],
            self.workdir, self.log)
        return self.daemon

    def ready(self, timeout=30):
        def check():
            if self.daemon.poll() is not None:
                raise AssertionError(f"the daemon exited: {open(self.log).read()[-3000:]}")
            answer = http_get(f"http://127.0.0.1:{self.port}/readyz")
            return answer is not None and answer[0] == 200 and json.loads(answer[1])
        return wait_for(check, timeout, "/readyz to answer 200")

    def contiv_flows(self):
        text = self.ovs.ofctl("dump-flows", self.ovs.bridge).stdout
        cookies = [int(c, 16) for c in re.findall(r"cookie=(0x[0-9a-f]+)", text)]
        return [c for c in cookies if c & 0xFFFFFFFF == MARK]

    def stop(self):
        stop_process(self.daemon, grace=20)
        for server in self.servers:
            server.kill()
            server.wait(timeout=10)
        self.ovs.stop()


def ip(name):
    return PODS[name][0]
