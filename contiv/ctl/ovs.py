"""
The live bridge, as contivctl sees it: the pods' ports (OVSDB Interface rows),
the installed flows, and what OVS itself decides for one packet.

The flows are read with C{ovs-ofctl -O OpenFlow13 dump-flows}, not with an
OpenFlow flow-stats request through L{contiv.openflow}: the text is what an
operator compares with (the same spelling as in OVS's docs and logs), it
needs no reactor and no decoding of os-ken objects back to text, and
C{ovs-ofctl} opens its own connection to the management socket next to the
daemon's. Verdicts come from C{ovs-appctl ofproto/trace}, which walks the
installed flows (conntrack included, with C{--ct-next}) without sending a
packet.

The parsing is pure (L{parse_flows}, L{flows_concerning}, L{trace_spec},
L{parse_trace}); L{Bridge} runs the commands, with OVS's environment
(C{OVS_RUNDIR} and friends) passed through.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

# Fields whose value is an address or a network: a flow concerns a pod
# when its address is inside.
_ADDRESS_FIELDS = ("nw_src", "nw_dst", "ipv6_src", "ipv6_dst", "ipv4_src", "ipv4_dst",
                   "arp_spa", "arp_tpa")
_CONJUNCTION = re.compile(r"conjunction\((\d+),")
_CONJ_ID = re.compile(r"(?:^|,)conj_id=(\d+)(?:,|$)")


class OVSError(Exception):
    """An OVS command failed or could not run; the message says which and why."""


@dataclass(frozen=True)
class InstalledFlow:
    text: str  # the line as ovs-ofctl printed it, stripped
    table: int
    priority: int
    cookie: int
    match: str
    actions: str
    n_packets: Optional[int]
    n_bytes: Optional[int]

    def to_json(self, table_names: Mapping[int, str], mark: Optional[tuple[int, int]]) -> dict:
        return {"table": self.table, "table_name": table_names.get(self.table),
                "priority": self.priority, "cookie": f"{self.cookie:#x}",
                "contiv": bool(mark and self.cookie & mark[1] == mark[0]),
                "match": self.match, "actions": self.actions,
                "n_packets": self.n_packets, "n_bytes": self.n_bytes, "text": self.text}


def parse_flows(text: str) -> list[InstalledFlow]:
    """The flows of C{ovs-ofctl dump-flows} output (reply headers skipped)."""
    flows = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or " actions=" not in f" {line}" or line.startswith(("OFPST_", "NXST_")):
            continue
        head, _, actions = line.rpartition("actions=")
        fields: dict[str, str] = {}
        match_parts: list[str] = []
        for chunk in head.strip().rstrip(",").split(", "):
            for part in chunk.split(","):
                part = part.strip()
                if not part:
                    continue
                key, eq, value = part.partition("=")
                if eq and key in ("cookie", "duration", "table", "n_packets", "n_bytes",
                                  "idle_age", "hard_age", "idle_timeout", "hard_timeout",
                                  "priority", "reset_counts", "send_flow_rem",
                                  "importance") and key not in fields:
                    fields[key] = value
                else:
                    match_parts.append(part)
        flows.append(InstalledFlow(
            text=line, table=int(fields.get("table", "0")),
            priority=int(fields.get("priority", "32768")),
            cookie=int(fields.get("cookie", "0"), 0), match=",".join(match_parts),
            actions=actions.strip(),
            n_packets=int(fields["n_packets"]) if "n_packets" in fields else None,
            n_bytes=int(fields["n_bytes"]) if "n_bytes" in fields else None))
    return flows


def _matches_address(match: str, addresses: Iterable[ipaddress._BaseAddress]) -> bool:
    for part in match.split(","):
        key, eq, value = part.partition("=")
        if not eq or key not in _ADDRESS_FIELDS:
            continue
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            continue
        if any(a.version == network.version and a in network for a in addresses):
            return True
    return False


def flows_concerning(flows: list[InstalledFlow], ips: Iterable[str],
                     ofport: Optional[int] = None) -> list[InstalledFlow]:
    """
    The flows that match one of the pod's addresses (or a network holding
    it), or its OpenFlow port, and then every flow of the conjunctions those
    flows take part in (the port and peer clauses, and the conj_id flow that
    acts on a hit), in dump order.
    """
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    direct = set()
    for number, flow in enumerate(flows):
        in_port = ofport is not None and f"in_port={ofport}" in flow.match.split(",")
        if in_port or _matches_address(flow.match, addresses):
            direct.add(number)
    conjunctions = {int(c) for n in direct for c in _CONJUNCTION.findall(flows[n].actions)}
    conjunctions |= {int(c) for n in direct for c in _CONJ_ID.findall(flows[n].match)}
    chosen = []
    for number, flow in enumerate(flows):
        related = any(int(c) in conjunctions for c in _CONJUNCTION.findall(flow.actions)) or \
            any(int(c) in conjunctions for c in _CONJ_ID.findall(flow.match))
        if number in direct or related:
            chosen.append(flow)
    return chosen


# -- tracing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """What ofproto/trace said: the datapath actions of each pass, the last one decides."""

    allowed: bool
    actions: str  # the final pass's datapath actions
    passes: tuple[str, ...]
    output: str

    def to_json(self) -> dict:
        return {"allowed": self.allowed, "verdict": "allowed" if self.allowed else "denied",
                "datapath_actions": self.actions, "passes": list(self.passes)}


def trace_spec(in_port: int, protocol: str, src_ip: str, dst_ip: str, port: int, *,
               src_mac: Optional[str] = None, dst_mac: Optional[str] = None) -> str:
    """The flow to trace for a new connection's first packet."""
    proto = protocol.lower()
    v6 = ipaddress.ip_address(src_ip).version == 6
    fields = [f"in_port={in_port}", proto + ("6" if v6 else "")]
    if src_mac:
        fields.append(f"dl_src={src_mac}")
    if dst_mac:
        fields.append(f"dl_dst={dst_mac}")
    if v6:
        fields += [f"ipv6_src={src_ip}", f"ipv6_dst={dst_ip}"]
    else:
        fields += [f"nw_src={src_ip}", f"nw_dst={dst_ip}"]
    fields.append(f"{proto}_dst={port}")
    return ",".join(fields)


# How a new connection looks to the pipeline after the ct() recirculation.
TRACE_CT_STATE = "trk,new"


def trace_args(bridge: str, spec: str) -> list[str]:
    """The ofproto/trace arguments (after C{ovs-appctl}) for a new connection."""
    return ["ofproto/trace", bridge, spec, "--ct-next", TRACE_CT_STATE]


def parse_trace(output: str) -> Trace:
    """
    One "Datapath actions" line per pass (before conntrack, then after the
    recirculation); the packet is dropped when the last one says drop.
    """
    passes = tuple(line.split(":", 1)[1].strip() for line in output.splitlines()
                   if line.startswith("Datapath actions:"))
    if not passes:
        raise OVSError("ofproto/trace printed no 'Datapath actions' line: "
                       f"{output.strip()[-500:]}")
    final = passes[-1]
    return Trace(final != "drop", final, passes, output)


# -- running OVS's tools -----------------------------------------------------------------

@dataclass(frozen=True)
class PodPort:
    name: str
    ofport: int
    mac: Optional[str]  # the pod's MAC when the CNI recorded it (attached-mac)


class Bridge:
    """One bridge through ovs-vsctl / ovs-ofctl / ovs-appctl (blocking)."""

    def __init__(self, name: str, *, ovsdb: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, timeout: float = 20.0) -> None:
        self.name = name
        self.ovsdb = ovsdb
        self.env = dict(os.environ if env is None else env)
        self.timeout = timeout

    def _run(self, args: list[str]) -> str:
        if shutil.which(args[0], path=self.env.get("PATH")) is None:
            raise OVSError(f"{args[0]} is not installed")
        try:
            result = subprocess.run(args, env=self.env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise OVSError(f"{' '.join(args[:4])} did not answer within "
                           f"{self.timeout:g} s") from None
        if result.returncode != 0:
            raise OVSError(f"{' '.join(args[:4])}: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
        return result.stdout

    def vsctl(self, *args: str) -> str:
        db = [f"--db={self.ovsdb}"] if self.ovsdb else []
        return self._run(["ovs-vsctl", *db, f"--timeout={max(1, int(self.timeout))}", *args])

    def ofctl(self, *args: str) -> str:
        return self._run(["ovs-ofctl", "-O", "OpenFlow13", *args])

    def appctl(self, *args: str) -> str:
        return self._run(["ovs-appctl", *args])

    def check(self) -> None:
        """Raise L{OVSError} unless the bridge answers OpenFlow."""
        self.ofctl("show", self.name)

    def dump_flows(self) -> list[InstalledFlow]:
        return parse_flows(self.ofctl("--no-names", "dump-flows", self.name))

    def pod_port(self, pod_key: Optional[str], ips: Iterable[str]) -> Optional[PodPort]:
        """
        The pod's port, by the Interface row's external_ids:iface-id, else by
        external_ids:ip (DESIGN.md: how the CNI plugin names pods).
        """
        wanted = [f"external_ids:iface-id={json.dumps(pod_key)}"] if pod_key else []
        wanted += [f"external_ids:ip={json.dumps(ip)}" for ip in ips]
        for condition in wanted:
            for row in self._find_interfaces(condition):
                # An interface of another bridge on the same switch is not this pod's port here.
                if self.vsctl("iface-to-br", row.name).strip() == self.name:
                    return row
        return None

    def _find_interfaces(self, condition: str) -> list[PodPort]:
        text = self.vsctl("--format=json", "--columns=name,ofport,external_ids", "find",
                          "Interface", condition)
        table = json.loads(text)
        rows = []
        for name, ofport, external_ids in table.get("data", []):
            if not isinstance(ofport, int) or ofport <= 0:
                continue
            ids = dict(external_ids[1]) if isinstance(external_ids, list) else {}
            rows.append(PodPort(name, ofport, ids.get("attached-mac")))
        return rows

    def trace(self, spec: str) -> Trace:
        return parse_trace(self.appctl(*trace_args(self.name, spec)))
