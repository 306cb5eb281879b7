"""
contivctl: look at what contiv enforces.

Reads the store netmaster publishes into (C{--store memcached://host:port},
C{--prefix}), or compiles a manifests directory in process with netmaster's
own engine (C{--manifests DIR}); and the live bridge (C{--bridge}, C{--ovsdb};
OVS_RUNDIR and the other OVS variables are honoured). C{--config FILE} takes
store, prefix, manifests, bridge, OVSDB, node and DNS domain from the
daemon's config file; options on the command line win.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, Optional, Sequence

from contiv.ctl import text
from contiv.ctl.view import (
    ClusterView,
    CtlError,
    compiled_verdict,
    find_pod,
    groups_json,
    parse_port,
    policies_for_pod,
    resolve_endpoint,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DISAGREE = 2

JSON_HELP = """\
-o json prints one JSON object (keys sorted, 2-space indent):
  policies: {pod, node, ips, generation, ingress, egress}; each direction is
            {isolated, policies: [{id, namespace, name, applied_to,
            rules: [{index, any_peer, peers: [{group, selector, members} |
            {cidr}], ports: ["TCP/80", "TCP/http", "UDP/any", ...]}]}]}
  groups:   {generation, groups: [{id, selector, stands_for: [...], count,
            members: [{ip, pod, named_ports}], published}]}
  flows:    {pod, ips, bridge, port, ofport, flows: [{table, table_name,
            priority, cookie, contiv, match, actions, n_packets, n_bytes, text}]}
  explain:  {src, dst: {ip, pod, node}, port, protocol, generation,
            compiled: {allowed, verdict, egress, ingress}, each side being
            {outcome, policy, policy_name, rule, isolating, text},
            datapath: {checked, reason, bridge, in_port, flow, allowed,
            verdict, datapath_actions, passes}, agree (null if not checked)}
  dns:      {name, client_namespace, table: {outcome, kind, namespace, entry,
            addresses, port}, server: {address, rcode, addresses, error} | null}
Exit status: 0 done, 1 an error (named on stderr), 2 explain found the
compiled rules and OVS disagreeing (a bug).
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1: status 2 is reserved for a disagreement with OVS."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("where to look")
    # SUPPRESS: an option given before the command is not overwritten by the
    # subcommand's default.
    sup = argparse.SUPPRESS
    g.add_argument("--config", metavar="FILE", default=sup,
                   help="the daemon's config file (e.g. /etc/contiv/contiv.yaml)")
    g.add_argument("--store", metavar="URL", default=sup,
                   help="memcached://host:port[,host:port...] that netmaster publishes into")
    g.add_argument("--prefix", metavar="PREFIX", default=sup,
                   help="store key prefix (default contiv/)")
    g.add_argument("--manifests", metavar="DIR", default=sup,
                   help="compile this manifests directory here instead of reading a store")
    g.add_argument("--bridge", metavar="NAME", default=sup,
                   help="the OVS bridge to read flows from and trace on")
    g.add_argument("--ovsdb", metavar="DB", default=sup,
                   help="OVSDB for ovs-vsctl --db (default: ovs-vsctl's own)")
    g.add_argument("--node", metavar="NAME", default=sup,
                   help="the node whose bridge this is (default: from --config)")
    g.add_argument("--domain", metavar="DOMAIN", default=sup,
                   help="cluster DNS domain (default cluster.local)")
    g.add_argument("--timeout", type=float, metavar="SECONDS", default=sup,
                   help="timeout of each store and OVS call (default 5)")
    g.add_argument("-o", "--output", choices=("text", "json"), default=sup,
                   help="output format (default text)")

    parser = _Parser(prog="contivctl", description=__doc__.split("\n\n")[0].strip(),
                     parents=[common], epilog=JSON_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    p = commands.add_parser("policies", parents=[common],
                            help="the NetworkPolicies selecting a pod, per direction")
    p.add_argument("pod", metavar="NAMESPACE/POD")
    commands.add_parser("groups", parents=[common],
                        help="the address groups as published: id, meaning, members")
    p = commands.add_parser("flows", parents=[common],
                            help="the installed flows that concern a pod (needs --bridge)")
    p.add_argument("pod", metavar="NAMESPACE/POD")
    p = commands.add_parser(
        "explain", parents=[common],
        help="the verdict on a new connection: compiled rules, and OVS's ofproto/trace")
    p.add_argument("src", metavar="SRC", help="NAMESPACE/POD or an IP address")
    p.add_argument("dst", metavar="DST", help="NAMESPACE/POD or an IP address")
    p.add_argument("port", metavar="PORT/PROTO", help="e.g. 80/tcp, 53/udp, http/tcp")
    p = commands.add_parser("dns", parents=[common],
                            help="what the name table answers for a name")
    p.add_argument("name")
    p.add_argument("--from", dest="client", metavar="NAMESPACE/POD",
                   help="ask as this pod (bare names are looked up in its namespace)")
    p.add_argument("--server", metavar="HOST[:PORT]",
                   help="also ask this DNS server (e.g. the daemon's --dns-listen)")
    p.add_argument("--type", dest="qtype", choices=("A", "AAAA"), default="A",
                   help="record type to ask the server for (default A)")
    return parser


class Settings:
    """The options, with --config filling what the command line left out."""

    def __init__(self, args: argparse.Namespace, environ: Optional[dict] = None) -> None:
        self.env = dict(os.environ if environ is None else environ)
        get = lambda name: getattr(args, name, None)  # noqa: E731
        config: Any = None
        if get("config"):
            from contiv.config import ConfigError, build, read_file

            try:
                config = build(read_file(args.config), {}, args.config)
            except ConfigError as e:
                raise CtlError(f"--config: {e.problem if e.key == 'config' else e}") from None
        cfg = (lambda key: config.get(key)) if config is not None else (lambda key: None)
        self.output = get("output") or "text"
        self.timeout = get("timeout") or 5.0
        self.prefix = get("prefix") or cfg("store_prefix") or "contiv/"
        self.domain = get("domain") or cfg("dns.domain") or "cluster.local"
        self.node = get("node") or cfg("node")
        self.ovsdb = get("ovsdb") or cfg("openflow.ovsdb")
        self.bridge = get("bridge") or cfg("openflow.bridge")
        connect = cfg("openflow.connect")
        if not get("bridge") and connect:
            from contiv.config import bridge_from_endpoint

            try:
                self.bridge = self.bridge or bridge_from_endpoint(connect)
            except ValueError:
                pass  # a tcp: endpoint names no bridge: --bridge then
            # The management socket sits in OVS's run directory: the same
            # directory ovs-ofctl and ovs-appctl must look in.
            if "OVS_RUNDIR" not in self.env and connect.startswith("unix:"):
                self.env["OVS_RUNDIR"] = os.path.dirname(connect[5:].split(":")[0])
        if get("manifests") and get("store"):
            raise CtlError("give --store or --manifests, not both")
        self.manifests: Optional[str] = None
        self.store: Optional[str] = None
        if get("manifests"):
            self.manifests = args.manifests
        elif get("store"):
            self.store = args.store
        elif config is not None and cfg("store") != "memory":
            self.store = cfg("store")
        elif config is not None and cfg("source.manifests"):
            # The embedded default: both roles share an in-process store; the
            # same manifests compiled here give the same result.
            self.manifests = cfg("source.manifests")
        elif config is not None:
            raise CtlError(f"config {args.config}: store is 'memory' and no "
                           f"source.manifests: nothing contivctl can read")
        else:
            raise CtlError("nothing to read: give --store memcached://host:port, "
                           "--manifests DIR, or --config FILE")
        self._view: Optional[ClusterView] = None
        self._store: Any = None
        self._compiled: Any = None

    def view(self) -> ClusterView:
        if self._view is None:
            from contiv.ctl import sources

            if self.manifests is not None:
                self._compiled = sources.CompiledManifests(self.manifests, self.prefix)
                self._view = self._compiled.view()
            else:
                self._view = sources.read_view(self.store_client(), prefix=self.prefix,
                                               where=f"the store at {self.store}")
        return self._view

    def store_client(self) -> Any:
        from contiv.ctl import sources

        if self._store is None:
            if self.manifests is not None:
                if self._compiled is None:
                    self._compiled = sources.CompiledManifests(self.manifests, self.prefix)
                self._store = self._compiled.store
            else:
                assert self.store is not None
                self._store = sources.open_store(self.store, timeout=self.timeout)
        return self._store

    def bridge_client(self) -> Any:
        from contiv.ctl.ovs import Bridge

        if not self.bridge:
            return None
        return Bridge(self.bridge, ovsdb=self.ovsdb, env=self.env, timeout=self.timeout)


# -- the commands ------------------------------------------------------------------------

def cmd_policies(settings: Settings, args: argparse.Namespace) -> tuple[dict, int]:
    view = settings.view()
    return policies_for_pod(view, find_pod(view, args.pod)), EXIT_OK


def cmd_groups(settings: Settings, args: argparse.Namespace) -> tuple[dict, int]:
    return groups_json(settings.view()), EXIT_OK


def cmd_flows(settings: Settings, args: argparse.Namespace) -> tuple[dict, int]:
    from contiv.ctl.ovs import OVSError, flows_concerning
    from contiv.datapath.manager import MARK, MARK_MASK
    from contiv.datapath.pipeline import TABLES

    view = settings.view()
    pod = find_pod(view, args.pod)
    bridge = settings.bridge_client()
    if bridge is None:
        raise CtlError("flows: which bridge? give --bridge NAME (or --config with "
                       "openflow.connect)")
    try:
        port = bridge.pod_port(pod.key, pod.ips)
        installed = bridge.dump_flows()
    except OVSError as e:
        raise CtlError(f"bridge {bridge.name}: {e}") from None
    chosen = flows_concerning(installed, pod.ips, port.ofport if port else None)
    names = {table.id: table.name for table in TABLES.values()}
    return {"pod": pod.key, "ips": list(pod.ips), "bridge": bridge.name,
            "port": port.name if port else None, "ofport": port.ofport if port else None,
            "flows": [f.to_json(names, (MARK, MARK_MASK)) for f in chosen]}, EXIT_OK


def cmd_explain(settings: Settings, args: argparse.Namespace) -> tuple[dict, int]:
    view = settings.view()
    src = resolve_endpoint(view, args.src)
    dst = resolve_endpoint(view, args.dst)
    port, protocol = parse_port(args.port, dst.pod)
    doc: dict[str, Any] = {"src": src.to_json(), "dst": dst.to_json(), "port": port,
                           "protocol": protocol, "generation": view.generation,
                           "compiled": compiled_verdict(view, src, dst, protocol, port)}
    doc["datapath"] = trace(settings, src, dst, protocol, port)
    if doc["datapath"]["checked"]:
        doc["agree"] = doc["datapath"]["allowed"] == doc["compiled"]["allowed"]
    else:
        doc["agree"] = None
    return doc, EXIT_DISAGREE if doc["agree"] is False else EXIT_OK


def trace(settings: Settings, src: Any, dst: Any, protocol: str, port: int) -> dict:
    from contiv.ctl.ovs import OVSError, trace_spec

    result: dict[str, Any] = {"checked": False, "reason": None, "bridge": settings.bridge,
                              "in_port": None, "flow": None}
    bridge = settings.bridge_client()
    if bridge is None:
        result["reason"] = "no --bridge given"
        return result
    if src.pod is not None and settings.node and src.pod.node != settings.node:
        result["reason"] = (f"{src.pod.key} runs on node {src.pod.node}; bridge "
                            f"{bridge.name} is node {settings.node}'s")
        return result
    try:
        bridge.check()
        src_port = bridge.pod_port(src.pod.key if src.pod else None, [src.ip])
        if src_port is None:
            result["reason"] = (f"{src.label} has no port on bridge {bridge.name} (no "
                                f"Interface with external_ids:iface-id or ip for it)")
            return result
        dst_port = bridge.pod_port(dst.pod.key if dst.pod else None, [dst.ip])
        spec = trace_spec(src_port.ofport, protocol, src.ip, dst.ip, port,
                          src_mac=src_port.mac, dst_mac=dst_port.mac if dst_port else None)
        result.update(in_port=src_port.ofport, flow=spec)
        traced = bridge.trace(spec)
    except OVSError as e:
        result["reason"] = f"bridge {bridge.name} not reachable: {e}"
        return result
    result.update(checked=True, **traced.to_json())
    return result


def cmd_dns(settings: Settings, args: argparse.Namespace) -> tuple[dict, int]:
    from contiv.ctl.sources import read_names

    client_namespace = None
    if args.client:
        client_namespace = find_pod(settings.view(), args.client).namespace
    table = read_names(settings.store_client(), prefix=settings.prefix,
                       domain=settings.domain)
    resolution = table.resolve(args.name, client_namespace)
    entry = resolution.entry
    doc: dict[str, Any] = {
        "name": args.name, "client_namespace": client_namespace,
        "table": {"outcome": resolution.outcome,
                  "kind": entry.kind if entry else None,
                  "namespace": entry.namespace if entry else None,
                  "entry": entry.name if entry else None,
                  "addresses": list(entry.addresses) if entry else [],
                  "port": (f"{resolution.port.name} {resolution.port.port}/"
                           f"{resolution.port.protocol}" if resolution.port else None)},
        "server": None}
    if args.server:
        doc["server"] = ask_server(args.server, args.name, args.qtype, settings.timeout)
    return doc, EXIT_OK


def ask_server(address: str, name: str, qtype: str, timeout: float) -> dict:
    """One UDP query, blocking: the rcode and the addresses of the answer."""
    from twisted.names import dns

    from contiv.config import parse_host_port

    try:
        host, port = parse_host_port(address, 53)
    except ValueError as e:
        raise CtlError(f"--server {address!r}: {e}") from None
    result: dict[str, Any] = {"address": f"{host}:{port}", "rcode": None, "addresses": [],
                              "error": None}
    record = dns.A if qtype == "A" else dns.AAAA
    query = dns.Message(id=os.getpid() & 0xFFFF, recDes=True)
    query.queries = [dns.Query(name, record, dns.IN)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(query.toStr(), (host, port))
            while True:
                data, _ = s.recvfrom(65535)
                answer = dns.Message()
                answer.fromStr(data)
                if answer.id == query.id:
                    break
        except (socket.timeout, OSError) as e:
            result["error"] = f"no answer: {e or 'timed out'}"
            return result
    codes = {dns.OK: "NOERROR", dns.EFORMAT: "FORMERR", dns.ESERVER: "SERVFAIL",
             dns.ENAME: "NXDOMAIN", dns.ENOTIMP: "NOTIMP", dns.EREFUSED: "REFUSED"}
    result["rcode"] = codes.get(answer.rCode, str(answer.rCode))
    result["addresses"] = [r.payload.dottedQuad() if r.type == dns.A else
                           socket.inet_ntop(socket.AF_INET6, r.payload.address)
                           for r in answer.answers if r.type == record]
    return result


COMMANDS = {"policies": (cmd_policies, text.policies), "groups": (cmd_groups, text.groups),
            "flows": (cmd_flows, text.flows), "explain": (cmd_explain, text.explain),
            "dns": (cmd_dns, text.dns)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run, render = COMMANDS[args.command]
    try:
        settings = Settings(args)
        doc, status = run(settings, args)
    except CtlError as e:
        sys.stderr.write(f"contivctl {args.command}: {e}\n")
        return EXIT_ERROR
    if settings.output == "json":
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render(doc) + "\n")
    view = settings._view
    if view is not None:
        # What could not be read or compiled: the answer above is without it.
        for problem in (*view.errors, *view.problems):
            sys.stderr.write(f"contivctl: warning: {problem}\n")
    if status == EXIT_DISAGREE:
        sys.stderr.write(
            f"contivctl explain: BUG: the compiled rules say "
            f"{doc['compiled']['verdict'].upper()} but OVS's ofproto/trace on "
            f"{doc['datapath']['bridge']} says {doc['datapath']['verdict'].upper()} for "
            f"{args.src} -> {args.dst} {doc['port']}/{doc['protocol']}; please report it "
            f"with this output and `ovs-ofctl -O OpenFlow13 dump-flows "
            f"{doc['datapath']['bridge']}`\n")
    return status
