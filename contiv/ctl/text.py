"""Text output of contivctl's commands, from the same JSON documents that C{-o json} prints."""

from __future__ import annotations

from typing import Any


def policies(doc: dict) -> str:
    lines = [f"pod {doc['pod']} on {doc['node']} ({', '.join(doc['ips']) or 'no address'}), "
             f"generation {doc['generation']}"]
    for direction in ("ingress", "egress"):
        side = doc[direction]
        if not side["isolated"]:
            lines.append(f"{direction}: not isolated (no policy selects it for {direction}): "
                         f"everything allowed")
            continue
        lines.append(f"{direction}: isolated by {len(side['policies'])} "
                     f"polic{'y' if len(side['policies']) == 1 else 'ies'}")
        for policy in side["policies"]:
            lines.append(f"  {policy['namespace']}/{policy['name']}  [{policy['id']}]")
            if not policy["rules"]:
                lines.append(f"    no {direction} rules: allows nothing")
            for rule in policy["rules"]:
                lines.append(f"    rule {rule['index']}: {_rule(rule, direction)}")
    return "\n".join(lines)


def _rule(rule: dict, direction: str) -> str:
    word = "from" if direction == "ingress" else "to"
    if rule["any_peer"]:
        peers = "any peer"
    else:
        parts = []
        for peer in rule["peers"]:
            if "cidr" in peer:
                parts.append(f"cidr {peer['cidr']}")
            else:
                what = peer["selector"] or f"group {peer['group']}"
                members = ", ".join(peer["members"]) or "no members"
                parts.append(f"{what} [{members}]")
        peers = "; ".join(parts) or "nobody"
    ports = ", ".join(rule["ports"]) or "all ports"
    return f"{word} {peers}; ports {ports}"


def groups(doc: dict) -> str:
    lines = [f"{len(doc['groups'])} address groups, generation {doc['generation']}"]
    for group in doc["groups"]:
        lines.append(f"{group['id']}  {group['count']} member"
                     f"{'' if group['count'] == 1 else 's'}"
                     + ("" if group["published"] else "  (not published)"))
        if group["selector"]:
            lines.append(f"  selector: {group['selector']}")
        for use in group["stands_for"]:
            lines.append(f"  used as: {use}")
        for member in group["members"]:
            ports = f"  ({', '.join(member['named_ports'])})" if member["named_ports"] else ""
            lines.append(f"  - {member['ip']}  {member['pod']}{ports}")
    return "\n".join(lines)


def flows(doc: dict) -> str:
    where = f"port {doc['port']} (ofport {doc['ofport']})" if doc["ofport"] is not None \
        else "no port on this bridge"
    lines = [f"pod {doc['pod']} ({', '.join(doc['ips'])}) on bridge {doc['bridge']}: {where}; "
             f"{len(doc['flows'])} flows concern it"]
    table = None
    for flow in doc["flows"]:
        if flow["table"] != table:
            table = flow["table"]
            lines.append(f"table {table} ({flow['table_name'] or 'not contiv'}):")
        mark = "" if flow["contiv"] else "  [not contiv's]"
        lines.append(f"  {flow['text']}{mark}")
    return "\n".join(lines)


def explain(doc: dict) -> str:
    compiled = doc["compiled"]
    lines = [f"{_end(doc['src'])} -> {_end(doc['dst'])} {doc['port']}/{doc['protocol']}: "
             f"{compiled['verdict'].upper()} by the compiled rules (generation "
             f"{doc['generation']})",
             f"  egress  (source side):      {compiled['egress']['text']}",
             f"  ingress (destination side): {compiled['ingress']['text']}"]
    datapath = doc["datapath"]
    if not datapath["checked"]:
        lines.append(f"  datapath: not checked: {datapath['reason']}")
    else:
        lines.append(f"  datapath: {datapath['verdict'].upper()} by ofproto/trace on "
                     f"{datapath['bridge']} (in_port {datapath['in_port']}): datapath actions "
                     f"{datapath['datapath_actions']}")
        if doc["agree"]:
            lines.append("  the compiled rules and OVS agree")
        else:
            lines.append("  BUG: the compiled rules and OVS DISAGREE")
    return "\n".join(lines)


def _end(end: dict) -> str:
    return f"{end['pod']} ({end['ip']})" if end["pod"] else end["ip"]


def dns(doc: dict) -> str:
    table = doc["table"]
    asked = f" from namespace {doc['client_namespace']}" if doc["client_namespace"] else ""
    lines = [f"{doc['name']}{asked}: {table['outcome']}"
             + (f" ({table['kind']} {table['namespace']}/{table['entry']})"
                if table["entry"] else "")]
    for address in table["addresses"]:
        lines.append(f"  {address}")
    if table["port"]:
        lines.append(f"  port {table['port']}")
    server: Any = doc.get("server")
    if server:
        if server["error"]:
            lines.append(f"server {server['address']}: {server['error']}")
        else:
            lines.append(f"server {server['address']}: {server['rcode']} "
                         + (" ".join(server["addresses"]) or "(no addresses)"))
    return "\n".join(lines)
