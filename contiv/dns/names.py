"""
The DNS name table (DESIGN.md, "DNS names"): what netmaster derives from
Services, EndpointSlices and pods (L{NameIndex}), what the store carries
(L{NameEntry}), and what netplugin answers from (L{NameTable}).

Names:
  - C{<svc>.<ns>.svc.<domain>}: a Service's ClusterIPs; a headless Service
    (clusterIP None): the addresses of its ready endpoints (every endpoint with
    C{publishNotReadyAddresses}); SRV for its named ports at
    C{_<port>._<proto>.<svc>.<ns>.svc.<domain>}
  - C{<pod>.<ns>.pod.<domain>}: a pod's IPs while it has them and has not finished
  - C{<epg>.<ns>.epg.<domain>}: the IPs of the pods labelled
    C{io.contiv.net-group=<epg>} in that namespace
  - bare C{<name>}: service, then endpoint group, then pod of that name, in
    the namespace of the pod that asks (C{default} when the asker is no pod)

Everything here is plain data and pure functions; nothing talks to a socket.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from contiv.k8s.events import DELETED, Event
from contiv.policy.model import (FINISHED_PHASES, FieldError, ValidationError, _ip, _list,
                                 _mapping, _metadata, _string, parse_pod)

EPG_LABEL = "io.contiv.net-group"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SVC, POD, EPG = "svc", "pod", "epg"
KINDS = (SVC, POD, EPG)
# The order bare names are looked up in, as contiv's netplugin did.
BARE_ORDER = (SVC, EPG, POD)
DEFAULT_NAMESPACE = "default"

FOUND = "found"
NXDOMAIN = "nxdomain"
EMPTY = "empty"  # the name exists (or has names below it), but not this kind of record
FORWARD = "forward"


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: str  # TCP, UDP or SCTP
    port: int


@dataclass(frozen=True)
class NameEntry:
    """One name: its kind, namespace and (lower-case) name, and what it answers."""

    kind: str
    namespace: str
    name: str
    addresses: tuple[str, ...]  # IPv4 then IPv6, each sorted
    ports: tuple[ServicePort, ...] = ()  # Services: the named ports, for SRV

    @property
    def key(self) -> str:
        return entry_key(self.kind, self.namespace, self.name)

    @property
    def ipv4(self) -> tuple[str, ...]:
        return tuple(a for a in self.addresses if ":" not in a)

    @property
    def ipv6(self) -> tuple[str, ...]:
        return tuple(a for a in self.addresses if ":" in a)

    def to_json(self) -> list:
        return [self.kind, self.namespace, self.name, list(self.addresses),
                [[p.name, p.protocol, p.port] for p in self.ports]]

    @classmethod
    def from_json(cls, value: Any) -> "NameEntry":
        kind, namespace, name, addresses, ports = value
        if kind not in KINDS:
            raise ValueError(f"unknown name kind {kind!r}")
        if not all(isinstance(x, str) for x in (namespace, name, *addresses)):
            raise ValueError("namespace, name and addresses must be strings")
        return cls(kind, namespace, name, tuple(addresses),
                   tuple(ServicePort(str(n), str(proto), int(port)) for n, proto, port in ports))


def entry_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name.lower()}"


def sort_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    parsed = {ipaddress.ip_address(a) for a in addresses}
    return tuple(str(a) for a in sorted(parsed, key=lambda a: (a.version, a)))


# -- netmaster's side: from cluster objects to entries


@dataclass(frozen=True)
class _Service:
    cluster_ips: Optional[tuple[str, ...]]  # None: headless
    ports: tuple[ServicePort, ...]
    publish_not_ready: bool


@dataclass(frozen=True)
class _Slice:
    service: str
    ready: tuple[str, ...]
    all: tuple[str, ...]


def parse_service(raw: Any) -> Optional[_Service]:
    """A Service's DNS view; None for a Service that has no addresses (ExternalName)."""
    _, namespace, name = _metadata(raw, "Service", namespaced=True)
    try:
        spec = _mapping(raw.get("spec"), "spec")
        kind = _string(spec.get("type"), "spec.type") or "ClusterIP"
        if kind == "ExternalName":
            return None
        ports = []
        for i, entry in enumerate(_list(spec.get("ports"), "spec.ports")):
            entry = _mapping(entry, f"spec.ports[{i}]")
            port_name = _string(entry.get("name"), f"spec.ports[{i}].name")
            protocol = _string(entry.get("protocol"), f"spec.ports[{i}].protocol") or "TCP"
            if protocol not in ("TCP", "UDP", "SCTP"):
                raise FieldError(f"spec.ports[{i}].protocol",
                                 f"must be TCP, UDP or SCTP, got {protocol!r}")
            number = entry.get("port")
            if not isinstance(number, int) or isinstance(number, bool) \
                    or not 1 <= number <= 65535:
                raise FieldError(f"spec.ports[{i}].port",
                                 f"must be a port number (1-65535), got {number!r}")
            if port_name:
                ports.append(ServicePort(port_name.lower(), protocol, number))
        cluster_ip = _string(spec.get("clusterIP"), "spec.clusterIP")
        listed = [_string(ip, f"spec.clusterIPs[{i}]")
                  for i, ip in enumerate(_list(spec.get("clusterIPs"), "spec.clusterIPs"))]
        publish = spec.get("publishNotReadyAddresses") is True
        if cluster_ip == "None" or "None" in listed:
            return _Service(None, tuple(ports), publish)
        ips = [_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(listed) if ip]
        if not ips and cluster_ip:
            ips = [_ip(cluster_ip, "spec.clusterIP")]
    except FieldError as error:
        raise ValidationError("Service", f"{namespace}/{name}", error.field,
                              error.problem) from None
    return _Service(sort_addresses(ips), tuple(sorted(set(ports), key=lambda p: (
        p.name, p.protocol))), publish)


def parse_endpoint_slice(raw: Any) -> Optional[_Slice]:
    """The service an EndpointSlice belongs to and its addresses; None if it names none."""
    metadata, namespace, name = _metadata(raw, "EndpointSlice", namespaced=True)
    try:
        labels = _mapping(metadata.get("labels"), "metadata.labels")
        service = labels.get(SERVICE_NAME_LABEL)
        if not isinstance(service, str) or not service:
            return None
        ready, every = [], []
        for i, endpoint in enumerate(_list(raw.get("endpoints"), "endpoints")):
            endpoint = _mapping(endpoint, f"endpoints[{i}]")
            conditions = _mapping(endpoint.get("conditions"), f"endpoints[{i}].conditions")
            # discovery.k8s.io/v1: an unknown (absent) ready condition counts as ready.
            is_ready = conditions.get("ready") is not False
            for j, address in enumerate(_list(endpoint.get("addresses"),
                                              f"endpoints[{i}].addresses")):
                ip = _ip(address, f"endpoints[{i}].addresses[{j}]")
                every.append(ip)
                if is_ready:
                    ready.append(ip)
    except FieldError as error:
        raise ValidationError("EndpointSlice", f"{namespace}/{name}", error.field,
                              error.problem) from None
    return _Slice(service, sort_addresses(ready), sort_addresses(every))


class NameIndex:
    """
    Cluster events in, name entries out, incrementally: an event recomputes
    only the names it can change. C{errors} maps C{"<Kind> <ns>/<name>"} to
    the message of each object rejected; its previous version stays in force.
    """

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}
        self.entries: dict[str, NameEntry] = {}
        self._services: dict[tuple[str, str], _Service] = {}
        self._slices: dict[tuple[str, str], _Slice] = {}  # (ns, slice name)
        self._slices_of: dict[tuple[str, str], set[str]] = {}  # (ns, service) -> slice names
        # pod key -> (namespace, name, addresses, endpoint group or None)
        self._pods: dict[str, tuple[str, str, tuple[str, ...], Optional[str]]] = {}
        self._groups: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {}  # (ns, epg)
        self._changed: set[str] = set()

    def apply(self, event: Event) -> None:
        handler = {"Service": self._service, "EndpointSlice": self._slice,
                   "Pod": self._pod}.get(event.kind)
        if handler is None:
            return
        namespace, name = _namespace_and_name(event)
        error_key = f"{event.kind} {namespace}/{name}"
        if event.type == DELETED:
            self.errors.pop(error_key, None)
            handler(namespace, name, None, deleted=True)
            return
        try:
            parsed = {"Service": parse_service, "EndpointSlice": parse_endpoint_slice,
                      "Pod": parse_pod}[event.kind](event.object)
        except ValidationError as error:
            self.errors[error_key] = str(error)
            return
        except Exception as error:
            self.errors[error_key] = f"{event.kind} {namespace}/{name}: cannot be parsed: " \
                                     f"{error!r}"
            return
        self.errors.pop(error_key, None)
        handler(namespace, name, parsed, deleted=False)

    def take_changes(self) -> set[str]:
        """Keys of the entries added, changed or removed since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    # -- folding objects in

    def _service(self, namespace: str, name: str, service: Optional[_Service], *,
                 deleted: bool) -> None:
        if service is None:
            self._services.pop((namespace, name), None)
        else:
            self._services[(namespace, name)] = service
        self._refresh_service(namespace, name)

    def _slice(self, namespace: str, name: str, found: Optional[_Slice], *,
               deleted: bool) -> None:
        before = self._slices.pop((namespace, name), None)
        if before is not None:
            names = self._slices_of.get((namespace, before.service), set())
            names.discard(name)
            if not names:
                self._slices_of.pop((namespace, before.service), None)
            self._refresh_service(namespace, before.service)
        if found is not None:
            self._slices[(namespace, name)] = found
            self._slices_of.setdefault((namespace, found.service), set()).add(name)
            self._refresh_service(namespace, found.service)

    def _pod(self, namespace: str, name: str, pod: Any, *, deleted: bool) -> None:
        key = f"{namespace}/{name}"
        before = self._pods.pop(key, None)
        if before is not None and before[3] is not None:
            members = self._groups.get((namespace, before[3]), {})
            members.pop(key, None)
            if not members:
                self._groups.pop((namespace, before[3]), None)
        if pod is not None and pod.ips and pod.phase not in FINISHED_PHASES:
            group = pod.labels.get(EPG_LABEL) or None
            addresses = sort_addresses(pod.ips)
            self._pods[key] = (namespace, name, addresses, group)
            if group is not None:
                self._groups.setdefault((namespace, group), {})[key] = addresses
            self._set(POD, namespace, name, addresses)
        else:
            self._set(POD, namespace, name, None)
        for group in {g for g in (before and before[3], pod is not None and
                                  pod.labels.get(EPG_LABEL)) if g}:
            members = self._groups.get((namespace, group), {})
            addresses = sort_addresses(a for ips in members.values() for a in ips)
            self._set(EPG, namespace, group, addresses if members else None)

    def _refresh_service(self, namespace: str, name: str) -> None:
        service = self._services.get((namespace, name))
        if service is None:
            self._set(SVC, namespace, name, None)
            return
        if service.cluster_ips is not None:
            addresses = service.cluster_ips
        else:
            slices = [self._slices[(namespace, s)]
                      for s in self._slices_of.get((namespace, name), ())]
            addresses = sort_addresses(a for s in slices
                                       for a in (s.all if service.publish_not_ready
                                                 else s.ready))
        self._set(SVC, namespace, name, addresses, service.ports)

    def _set(self, kind: str, namespace: str, name: str,
             addresses: Optional[tuple[str, ...]], ports: tuple[ServicePort, ...] = ()) -> None:
        key = entry_key(kind, namespace, name)
        entry = None if addresses is None else NameEntry(kind, namespace, name.lower(),
                                                         addresses, ports)
        if self.entries.get(key) == entry:
            return
        if entry is None:
            del self.entries[key]
        else:
            self.entries[key] = entry
        self._changed.add(key)


def _namespace_and_name(event: Event) -> tuple[str, str]:
    metadata = event.object.get("metadata") if isinstance(event.object, Mapping) else None
    if isinstance(metadata, Mapping) and isinstance(metadata.get("name"), str):
        namespace = metadata.get("namespace") or DEFAULT_NAMESPACE
        if isinstance(namespace, str):
            return namespace, metadata["name"]
    namespace, _, name = event.key.rpartition("/")
    return namespace or DEFAULT_NAMESPACE, name


# -- netplugin's side: answering


@dataclass(frozen=True)
class Resolution:
    """
    What a name is: C{FOUND} (C{entry}; C{port} set for an SRV name), C{EMPTY}
    (it exists, or names exist below it, without addresses of its own),
    C{NXDOMAIN} (under the cluster domain, unknown) or C{FORWARD} (not ours).
    """

    outcome: str
    entry: Optional[NameEntry] = None
    port: Optional[ServicePort] = None


@dataclass
class NameTable:
    """An immutable snapshot of every name, for lookups by query name."""

    domain: str = "cluster.local"
    entries: Mapping[str, NameEntry] = field(default_factory=dict)
    generation: Optional[int] = None

    def __post_init__(self) -> None:
        self.domain = self.domain.lower().strip(".")
        self._suffix = "." + self.domain
        self._namespaces_with: set[tuple[str, str]] = {
            (e.namespace, e.kind) for e in self.entries.values()}
        # Which namespace a pod address belongs to: bare names are looked up
        # in the asker's namespace.
        self._namespace_at: dict[str, str] = {
            address: e.namespace for e in self.entries.values() if e.kind == POD
            for address in e.addresses}

    @classmethod
    def of(cls, entries: Iterable[NameEntry], domain: str = "cluster.local",
           generation: Optional[int] = None) -> "NameTable":
        return cls(domain, {e.key: e for e in entries}, generation)

    def __len__(self) -> int:
        return len(self.entries)

    def namespace_of(self, address: str) -> Optional[str]:
        """The namespace of the pod that has this address, or None (not a pod)."""
        return self._namespace_at.get(address)

    def in_domain(self, qname: str) -> bool:
        name = qname.lower().rstrip(".")
        return name == self.domain or name.endswith(self._suffix)

    def resolve(self, qname: str, client_namespace: Optional[str] = None) -> Resolution:
        """
        C{qname} as asked (any case, with or without the final dot);
        C{client_namespace}: the namespace of the asking pod, for bare names.
        """
        name = qname.lower().rstrip(".")
        if not name:
            return Resolution(FORWARD)
        if name == self.domain:
            return Resolution(EMPTY)
        if name.endswith(self._suffix):
            return self._in_domain(name[:-len(self._suffix)].split("."))
        if "." not in name:
            namespace = client_namespace or DEFAULT_NAMESPACE
            for kind in BARE_ORDER:
                entry = self.entries.get(entry_key(kind, namespace, name))
                if entry is not None:
                    return Resolution(FOUND, entry)
        return Resolution(FORWARD)

    def _in_domain(self, labels: list[str]) -> Resolution:
        kind = labels[-1]
        if kind not in KINDS:
            return Resolution(NXDOMAIN)
        if len(labels) == 1:
            return Resolution(EMPTY)
        namespace = labels[-2]
        if len(labels) == 2:
            return Resolution(EMPTY if (namespace, kind) in self._namespaces_with else NXDOMAIN)
        if kind == POD:
            # Pod names are DNS subdomains: they may hold dots.
            entry = self.entries.get(entry_key(POD, namespace, ".".join(labels[:-2])))
            return Resolution(FOUND, entry) if entry else Resolution(NXDOMAIN)
        entry = self.entries.get(entry_key(kind, namespace, labels[-3]))
        if entry is None:
            return Resolution(NXDOMAIN)
        if len(labels) == 3:
            return Resolution(FOUND, entry)
        if kind == SVC and labels[-4].startswith("_"):
            if len(labels) == 4:
                return Resolution(EMPTY)  # _<proto>.<svc>...: names exist below it
            if len(labels) == 5 and labels[0].startswith("_"):
                port_name, protocol = labels[0][1:], labels[1][1:].upper()
                for port in entry.ports:
                    if port.name == port_name and port.protocol == protocol:
                        return Resolution(FOUND, entry, port)
        return Resolution(NXDOMAIN)
