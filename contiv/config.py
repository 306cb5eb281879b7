"""
The daemon's configuration: one table of keys, a YAML file, and the command line.

Every config key is also a command-line option (the table below is the single
source of both), the command line wins over the file, and the file wins over the
defaults. Validation is pure: it needs no reactor, opens no socket, and turns
every problem into a L{ConfigError} that names the key and what was wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

ROLES = ("netmaster", "netplugin", "all")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A configuration value is missing, unknown or invalid."""

    def __init__(self, key: str, problem: str, origin: str = ""):
        self.key = key
        self.problem = problem
        self.origin = origin
        where = f" (in {origin})" if origin else ""
        super().__init__(f"{key}: {problem}{where}")


# -- value parsers: each takes the raw value and returns the normalised one, or
# raises ValueError with a sentence saying what was wrong.


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(
                f"expected one of {', '.join(choices)}, got {value!r}"
            )
        return value

    return parse


def _directory(value: Any) -> str:
    path = _string(value)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory")
    return os.path.abspath(path)


def _readable_file(value: Any) -> str:
    path = _string(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{path!r} is not a readable file")
    return os.path.abspath(path)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_host_port(value: Any, default_port: Optional[int] = None, *,
                    names: bool = False) -> tuple[str, int]:
    """
    Parse C{host:port}, C{[v6]:port}, or (with a default port) a bare IPv4 or
    IPv6 literal. The host must be an IP address (a DNS server or upstream
    named by a name would need a resolver to start the resolver), unless
    C{names}: then a DNS name is accepted too, resolved when connecting.
    """
    text = _string(value)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r} has '[' without a closing ']'")
        if rest.startswith(":"):
            port = _port(rest[1:])
        elif rest == "" and default_port is not None:
            port = default_port
        else:
            raise ValueError(f"{text!r} is not [address]:port")
    elif text.count(":") > 1 and default_port is not None:
        host, port = text, default_port
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError(f"{text!r} is not host:port")
            host, port = text, default_port
        else:
            port = _port(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # An all-numeric last label is a mistyped address, not a name.
        if names and not text.startswith("[") and _dns_name(host) \
                and not host.rstrip(".").rsplit(".", 1)[-1].isdigit():
            return host, port
        what = "an IP address or a DNS name" if names else "an IP address"
        raise ValueError(f"{host!r} in {text!r} is not {what}") from None
    return host, port


def _whole_range(low: int, high: int, what: str, low_text: str = "") -> Callable[[Any], int]:
    """A parser of whole numbers from C{low} to C{high} (C{low_text}: how to say C{low})."""
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"expected {what} from {low_text or low} to {high}, "
                             f"got {value!r}")
        return value
    return parse


_ttl = _whole_range(0, 86400, "whole seconds")
_cache_entries = _whole_range(0, 10_000_000, "a number of entries", "0 (off)")
_whole_seconds = _whole_range(1, 3600, "whole seconds")


def _listen_address(value: Any) -> tuple[str, int]:
    return parse_host_port(value)


def _upstreams(value: Any) -> tuple[tuple[str, int], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected a list of host[:port], got {value!r}")
    return tuple(parse_host_port(item, default_port=53) for item in items)


def _store(value: Any) -> str:
    text = _string(value)
    if text == "memory":
        return text
    scheme, sep, servers = text.partition("://")
    if scheme != "memcached" or not sep or not servers:
        raise ValueError(
            f"expected 'memory' or 'memcached://host:port[,host:port...]', got {text!r}"
        )
    for server in servers.split(","):
        # A name (the memcached Service's, in a cluster) is resolved at each
        # connection, on the store's threads: it may move.
        parse_host_port(server, names=True)
    return text


def _endpoint_checker(kind: str) -> Callable[[Any], str]:
    """
    Check a Twisted endpoint description by building the endpoint against a
    memory reactor: the parser that will be used for real, without listening
    or connecting.
    """

    def parse(value: Any) -> str:
        from twisted.internet import endpoints
        from twisted.internet.testing import MemoryReactor

        text = _string(value)
        build = endpoints.serverFromString if kind == "server" else endpoints.clientFromString
        try:
            build(MemoryReactor(), text)
        except Exception as e:
            raise ValueError(
                f"{text!r} is not a Twisted {kind} endpoint description: {e}"
            ) from None
        return text

    return parse


def _hostname() -> str:
    return socket.gethostname()


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _election_namespace(path: str = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """In a pod: the pod's own namespace; elsewhere kube-system."""
    try:
        with open(path, encoding="utf-8") as f:
            namespace = f.read().strip()
    except OSError:
        return "kube-system"
    return namespace or "kube-system"


def _election_identity() -> str:
    """POD_NAME when set; else hostname_<random>, unique per process as client-go's."""
    pod = os.environ.get("POD_NAME", "").strip()
    if pod:
        return pod
    return f"{socket.gethostname()}_{secrets.token_hex(4)}"


def _optional_boolean(value: Any) -> Optional[bool]:
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return None
    return _boolean(value)


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _namespace(value: Any) -> str:
    text = _string(value)
    if len(text) > 63 or not _DNS_LABEL.fullmatch(text):
        raise ValueError(f"{text!r} is not a namespace name (a DNS label: lowercase letters, "
                         "digits and '-', at most 63)")
    return text


def _object_name(value: Any) -> str:
    text = _string(value)
    if len(text) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in text.split(".")):
        raise ValueError(f"{text!r} is not an object name (a DNS subdomain: lowercase "
                         "letters, digits, '-' and '.', at most 253)")
    return text


def _identity(value: Any) -> str:
    text = _string(value)
    if len(text) > 253 or not text.isprintable():
        raise ValueError(f"expected at most 253 printable characters, got {text!r}")
    return text


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not 0 < value <= 3600:
        raise ValueError(f"expected seconds above 0 and at most 3600, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives in the file, and its option."""

    name: str
    option: str
    parse: Callable[[Any], Any]
    help: str
    default: Any = None
    flag: bool = False
    repeatable: bool = False
    metavar: str = ""


KEYS: tuple[Key, ...] = (
    Key("role", "role", _choice(ROLES), "which roles run: netmaster, netplugin or all", "all",
        metavar="ROLE"),
    Key("node", "node", _string, "this node's name; pods whose spec.nodeName equals it are "
        "local (default: the hostname)", _hostname, metavar="NAME"),
    Key("source.manifests", "manifests", _directory, "embedded source: a directory of "
        "Kubernetes manifests (*.yaml, *.yml, *.json), watched for changes", metavar="DIR"),
    Key("source.kubeconfig", "kubeconfig", _readable_file, "a kubeconfig file for a real "
        "cluster", metavar="PATH"),
    Key("source.context", "kube-context", _string, "the kubeconfig context to use (default: "
        "its current-context)", metavar="NAME"),
    Key("source.in_cluster", "in-cluster", _boolean, "use the pod's service account to reach "
        "the API server", False, flag=True),
    Key("election.enabled", "election-enabled", _optional_boolean, "leader election among "
        "netmasters through a coordination.k8s.io/v1 Lease: true or false (default: on with "
        "an API source, off with source.manifests)", metavar="BOOL"),
    Key("election.namespace", "election-namespace", _namespace, "the Lease's namespace "
        "(default: the pod's own namespace in a cluster, else kube-system)",
        _election_namespace, metavar="NS"),
    Key("election.lease", "election-lease", _object_name, "the Lease's name",
        "contiv-netmaster", metavar="NAME"),
    Key("election.identity", "election-identity", _identity, "this netmaster's name in "
        "the Lease (default: $POD_NAME, else the hostname and a random suffix)",
        _election_identity, metavar="ID"),
    Key("election.lease_duration", "election-lease-duration", _whole_seconds, "how long, "
        "in whole seconds, standbys wait for a Lease that is not renewed before taking it",
        15, metavar="SECONDS"),
    Key("election.renew_deadline", "election-renew-deadline", _seconds, "how long the "
        "leader keeps trying to renew before it stops publishing; below "
        "election.lease_duration", 10.0, metavar="SECONDS"),
    Key("election.retry_period", "election-retry-period", _seconds, "how often candidates "
        "try to take the Lease and the leader renews it", 2.0, metavar="SECONDS"),
    Key("store", "store", _store, "'memory' or memcached://host:port[,host:port...]",
        "memory", metavar="URL"),
    Key("store_prefix", "store-prefix", _string, "prefix of every store key, so that "
        "several clusters can share a memcached", "contiv/", metavar="PREFIX"),
    Key("openflow.connect", "openflow", _endpoint_checker("client"), "Twisted client "
        "endpoint of the OVS bridge, e.g. unix:/var/run/openvswitch/br0.mgmt", metavar="EP"),
    Key("openflow.bridge", "bridge", _string, "the OVS bridge's name (default: from "
        "openflow.connect's management socket, br0.mgmt -> br0; for another endpoint, the "
        "bridge OVSDB lists with the datapath id the switch reports)", metavar="NAME"),
    Key("openflow.ovsdb", "ovsdb", _string, "OVSDB server for the bridge's settings, as "
        "ovs-vsctl --db takes it (default: ovs-vsctl's own)", metavar="DB"),
    Key("dns.listen", "dns-listen", _listen_address, "host:port for the DNS server "
        "([::1]:53 for IPv6): UDP and TCP", metavar="ADDR"),
    Key("dns.upstreams", "dns-upstream", _upstreams, "upstream resolver host[:port]; repeat "
        "for several (default: the nameservers in /etc/resolv.conf)", repeatable=True,
        metavar="ADDR"),
    Key("dns.domain", "dns-domain", _string, "the cluster DNS domain", "cluster.local",
        metavar="DOMAIN"),
    Key("dns.ttl", "dns-ttl", _ttl, "TTL of the answers from the name table, and of "
        "NXDOMAIN (the SOA minimum), in seconds", 30, metavar="SECONDS"),
    Key("dns.forward_cache", "dns-forward-cache", _cache_entries, "how many forwarded "
        "answers to keep for their TTL (at most 300 s); 0 turns the cache off", 10_000,
        metavar="ENTRIES"),
    Key("dns.datapath_rate", "dns-datapath-rate", _whole_range(1, 1_000_000, "packets a "
        "second"), "DNS queries a second the bridge hands netplugin, for the whole node (an "
        "OpenFlow meter); queries above it are dropped by the bridge", 2000,
        metavar="PPS"),
    Key("dns.datapath_burst", "dns-datapath-burst", _whole_range(1, 1_000_000, "packets"),
        "queries above dns.datapath_rate the meter lets through at once", 200,
        metavar="PACKETS"),
    Key("dns.datapath", "dns-datapath", _boolean, "answer local pods' DNS queries to any "
        "resolver from the name table in the datapath (needs openflow.connect)", False,
        flag=True),
    Key("http.listen", "http", _endpoint_checker("server"), "Twisted server endpoint for "
        "/healthz, /readyz and /metrics, e.g. tcp:9100:interface=127.0.0.1", metavar="EP"),
    Key("manhole.listen", "manhole", _endpoint_checker("server"), "Twisted server endpoint "
        "for the SSH manhole, e.g. unix:/run/contiv/manhole.sock:mode=600 (off unless set)",
        metavar="EP"),
    Key("manhole.authorized_keys", "manhole-authorized-keys", _readable_file, "the "
        "authorized_keys file whose keys may log in to the manhole", metavar="PATH"),
    Key("manhole.host_key", "manhole-host-key", _string, "the manhole's SSH host key (a "
        "private key file, created if missing; default: a new key at every start)",
        metavar="PATH"),
    Key("manhole.allow_remote", "manhole-allow-remote", _boolean, "let the manhole listen "
        "on a TCP address that is not loopback", False, flag=True),
    Key("log.format", "log-format", _choice(LOG_FORMATS), "log as human-readable text or "
        "as JSON lines", "text", metavar="FORMAT"),
)

KEYS_BY_NAME = {key.name: key for key in KEYS}
KEYS_BY_OPTION = {key.option: key for key in KEYS}


@dataclass(frozen=True)
class Config:
    """The validated configuration: dotted key -> value, defaults filled in."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    @property
    def roles(self) -> tuple[str, ...]:
        role = self.values["role"]
        return ("netmaster", "netplugin") if role == "all" else (role,)


def flatten(document: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """
    Turn a nested YAML mapping into dotted keys, refusing keys that the table
    does not know. A mapping is only descended into where the table has keys
    below it, so C{store: {..}} is reported as a bad value, not as unknown keys.
    """
    prefixes = {name.rsplit(".", 1)[0] for name in KEYS_BY_NAME if "." in name}
    flat: dict[str, Any] = {}

    def walk(mapping: Mapping[Any, Any], prefix: str) -> None:
        for raw_key, value in mapping.items():
            if not isinstance(raw_key, str):
                raise ConfigError(f"{prefix}{raw_key!r}", "keys must be strings", origin)
            name = prefix + raw_key
            if name in KEYS_BY_NAME:
                flat[name] = value
            elif name in prefixes:
                if value is None:
                    # A section whose keys are all commented out.
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(name, f"expected a mapping of keys, got {value!r}",
                                      origin)
                walk(value, name + ".")
            else:
                raise ConfigError(name, "unknown key", origin)

    walk(document, "")
    return flat


def read_file(path: str) -> dict[str, Any]:
    """Read a config file into dotted keys, or raise a ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError("config", f"{path} is not valid YAML{where}: {problem}") from None
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError("config", f"{path} must hold a mapping of keys, "
                          f"not {type(document).__name__}")
    return flatten(document, path)


def build(file_values: Mapping[str, Any], command_line: Mapping[str, Any],
          file_origin: str = "") -> Config:
    """
    Merge defaults, the file and the command line (in that order of
    precedence, lowest first), validate every value, and check the keys
    against each other.
    """
    values: dict[str, Any] = {}
    for key in KEYS:
        if key.name in command_line:
            raw, origin = command_line[key.name], "command line --" + key.option
        elif key.name in file_values:
            raw, origin = file_values[key.name], file_origin
        else:
            default = key.default() if callable(key.default) else key.default
            values[key.name] = default
            continue
        try:
            values[key.name] = key.parse(raw)
        except ValueError as e:
            raise ConfigError(key.name, str(e), origin) from None
    check_consistency(values)
    return Config(values)


def check_consistency(values: Mapping[str, Any]) -> None:
    sources = [name for name in ("source.manifests", "source.kubeconfig")
               if values.get(name)]
    if values.get("source.in_cluster"):
        sources.append("source.in_cluster")
    if len(sources) > 1:
        raise ConfigError(sources[1], f"only one source may be set, but {', '.join(sources)} "
                          "are")
    if not sources and values.get("role") in ("netmaster", "all"):
        raise ConfigError("source.manifests", "netmaster needs a source of cluster objects: "
                          "set source.manifests, source.kubeconfig or source.in_cluster")
    if values.get("source.context") and not values.get("source.kubeconfig"):
        raise ConfigError("source.context", "needs source.kubeconfig")
    check_election(values)
    # The DNS keys belong to netplugin; netmaster ignores them, so that both
    # roles can share one file.
    if values.get("dns.datapath") and not values.get("openflow.connect") \
            and values.get("role") != "netmaster":
        raise ConfigError("dns.datapath", "needs openflow.connect (the bridge whose DNS "
                          "packets it answers)")
    if values.get("dns.domain") is not None and not _dns_name(values["dns.domain"]):
        raise ConfigError("dns.domain", f"{values['dns.domain']!r} is not a DNS name")
    if values.get("manhole.listen"):
        if not values.get("manhole.authorized_keys"):
            raise ConfigError("manhole.authorized_keys", "the manhole needs an "
                              "authorized_keys file: it accepts SSH keys only")
        check_manhole_address(values["manhole.listen"], values.get("manhole.allow_remote"))


def check_election(values: dict[str, Any]) -> None:
    """Resolve election.enabled's default and check the timings against each other."""
    api = bool(values.get("source.kubeconfig") or values.get("source.in_cluster"))
    if values.get("election.enabled") is None:
        values["election.enabled"] = api
    elif values["election.enabled"] and not api and values.get("role") != "netplugin":
        raise ConfigError("election.enabled", "leader election needs an API source "
                          "(source.kubeconfig or source.in_cluster) to hold its Lease in; "
                          "with source.manifests the netmaster is always active")
    duration = values.get("election.lease_duration")
    deadline = values.get("election.renew_deadline")
    retry = values.get("election.retry_period")
    if None in (duration, deadline, retry):
        return
    if not deadline < duration:
        raise ConfigError("election.renew_deadline", f"must be below election.lease_duration "
                          f"({deadline:g} >= {duration}): a leader that cannot renew must "
                          "stop publishing before the others may take over")
    if not retry * 1.2 < deadline:
        raise ConfigError("election.retry_period", f"{retry:g} s leaves no second renewal "
                          f"attempt within election.renew_deadline ({deadline:g} s): it "
                          "must be below renew_deadline / 1.2")


def _dns_name(text: str) -> bool:
    labels = text.strip(".").split(".")
    return bool(text.strip(".")) and all(
        0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
        for label in labels) and len(text) <= 253


def bridge_from_endpoint(description: str) -> str:
    """The bridge a unix:.../<bridge>.mgmt endpoint names."""
    path = description.split(":", 1)[1].split(":", 1)[0] if description.startswith("unix:") \
        else ""
    name = os.path.basename(path)
    if not name.endswith(".mgmt") or len(name) <= len(".mgmt"):
        raise ValueError(f"cannot tell the bridge's name from openflow.connect "
                         f"{description!r}: set openflow.bridge")
    return name[:-len(".mgmt")]


def check_manhole_address(description: str, allow_remote: bool) -> None:
    """A manhole is a Python prompt: it listens on a unix socket or loopback only."""
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactor

    endpoint = endpoints.serverFromString(MemoryReactor(), description)
    if isinstance(endpoint, endpoints.UNIXServerEndpoint) or allow_remote:
        return
    if isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        interface = endpoint._interface
        try:
            if interface and ipaddress.ip_address(interface).is_loopback:
                return
        except ValueError:
            pass
        shown = interface or "every interface"
        raise ConfigError("manhole.listen", f"{description!r} listens on {shown}, which "
                          "is not loopback; set manhole.allow_remote: true to allow it")
    raise ConfigError("manhole.listen", f"{description!r} is neither a unix socket nor "
                      "a loopback TCP address")
