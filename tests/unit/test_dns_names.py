"""The DNS name table: from Services, EndpointSlices and pods to names, and lookups."""

from __future__ import annotations

import pytest

from contiv.dns.names import (EMPTY, EPG, FORWARD, FOUND, NXDOMAIN, POD, SVC, NameEntry,
                              NameIndex, NameTable, ServicePort)
from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event


def service(name, ns="default", cluster_ip="10.96.0.10", type=ADDED, ports=None, **spec):
    body = {"clusterIP": cluster_ip, "ports": ports if ports is not None else [
        {"name": "http", "port": 80, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"port": 9000}]}
    if cluster_ip not in (None, "None"):
        body["clusterIPs"] = [cluster_ip]
    body.update(spec)
    return Event(type, "Service", f"{ns}/{name}", {
        "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": body})


def endpoint_slice(name, service_name, endpoints, ns="default", type=ADDED):
    return Event(type, "EndpointSlice", f"{ns}/{name}", {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], **({"conditions": {"ready": ready}}
                                            if ready is not None else {})}
                      for ip, ready in endpoints]})


def pod(name, ips, ns="default", type=ADDED, phase="Running", **labels):
    return Event(type, "Pod", f"{ns}/{name}", {
        "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
        "status": {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]}})


def build(*events):
    index = NameIndex()
    for event in events:
        index.apply(event)
    return index


def test_cluster_ip_service_and_its_ports():
    index = build(service("web"))
    entry = index.entries["svc/default/web"]
    assert entry.addresses == ("10.96.0.10",)
    # Only named ports have SRV names.
    assert entry.ports == (ServicePort("dns", "UDP", 53), ServicePort("http", "TCP", 80))


def test_dual_stack_cluster_ips_sorted_v4_first():
    index = build(service("web", cluster_ip="fd00::10", clusterIPs=["fd00::10", "10.96.0.10"]))
    assert index.entries["svc/default/web"].addresses == ("10.96.0.10", "fd00::10")


def test_headless_service_answers_ready_endpoints_only():
    index = build(service("db", cluster_ip="None"),
                  endpoint_slice("db-1", "db", [("10.0.0.2", True), ("10.0.0.3", False),
                                                ("10.0.0.4", None)]),
                  endpoint_slice("db-2", "db", [("10.0.0.1", True)]))
    # ready: unknown counts as ready (discovery.k8s.io/v1)
    assert index.entries["svc/default/db"].addresses == ("10.0.0.1", "10.0.0.2", "10.0.0.4")
    index.apply(endpoint_slice("db-2", "db", [], type=DELETED))
    assert index.entries["svc/default/db"].addresses == ("10.0.0.2", "10.0.0.4")


def test_headless_publish_not_ready_addresses():
    index = build(service("db", cluster_ip="None", publishNotReadyAddresses=True),
                  endpoint_slice("db-1", "db", [("10.0.0.3", False)]))
    assert index.entries["svc/default/db"].addresses == ("10.0.0.3",)


def test_slice_arriving_before_its_service():
    index = build(endpoint_slice("db-1", "db", [("10.0.0.2", True)]))
    assert "svc/default/db" not in index.entries
    index.apply(service("db", cluster_ip="None"))
    assert index.entries["svc/default/db"].addresses == ("10.0.0.2",)


def test_external_name_service_has_no_name():
    event = service("ext", cluster_ip=None, ports=[], externalName="example.org")
    event.object["spec"]["type"] = "ExternalName"
    index = build(event)
    assert index.entries == {}
    assert index.errors == {}


def test_pods_and_endpoint_groups():
    index = build(pod("web-1", ["10.0.0.5"], **{"io.contiv.net-group": "web"}),
                  pod("web-2", ["10.0.0.6", "fd00::6"], **{"io.contiv.net-group": "web"}),
                  pod("done", ["10.0.0.9"], phase="Succeeded", **{"io.contiv.net-group": "web"}),
                  pod("pending", []))
    assert index.entries["pod/default/web-1"].addresses == ("10.0.0.5",)
    assert index.entries["epg/default/web"].addresses == ("10.0.0.5", "10.0.0.6", "fd00::6")
    assert "pod/default/done" not in index.entries
    assert "pod/default/pending" not in index.entries
    index.take_changes()
    # Relabelled out of the group, then deleted: the group follows, then goes.
    index.apply(pod("web-2", ["10.0.0.6"], type=MODIFIED))
    assert index.take_changes() == {"pod/default/web-2", "epg/default/web"}
    assert index.entries["epg/default/web"].addresses == ("10.0.0.5",)
    index.apply(pod("web-1", ["10.0.0.5"], type=DELETED))
    assert "epg/default/web" not in index.entries
    assert index.take_changes() == {"pod/default/web-1", "epg/default/web"}


def test_only_changed_names_are_reported():
    index = build(service("web"), pod("a", ["10.0.0.1"]))
    assert index.take_changes() == {"svc/default/web", "pod/default/a"}
    index.apply(service("web"))  # the same again
    index.apply(pod("a", ["10.0.0.1"], type=MODIFIED, tier="x"))  # a label DNS ignores
    assert index.take_changes() == set()


def test_a_broken_service_keeps_its_previous_version_and_names_the_field():
    index = build(service("web"))
    index.apply(service("web", type=MODIFIED, ports=[{"name": "http", "port": 70000}]))
    (message,) = index.errors.values()
    assert "Service default/web" in message and "spec.ports[0].port" in message
    assert index.entries["svc/default/web"].addresses == ("10.96.0.10",)
    index.apply(service("web", cluster_ip="10.96.0.999", type=MODIFIED))
    assert "spec.clusterIP" in next(iter(index.errors.values()))
    index.apply(service("web", type=MODIFIED))
    assert index.errors == {}


def test_broken_slice_names_the_endpoint():
    index = build(endpoint_slice("db-1", "db", [("not-an-ip", True)]))
    (message,) = index.errors.values()
    assert "EndpointSlice default/db-1" in message and "endpoints[0].addresses[0]" in message


def test_entry_json_round_trip():
    entry = NameEntry(SVC, "default", "web", ("10.0.0.1", "fd00::1"),
                      (ServicePort("http", "TCP", 80),))
    assert NameEntry.from_json(entry.to_json()) == entry
    with pytest.raises(ValueError):
        NameEntry.from_json(["nope", "default", "web", [], []])


# -- lookups

TABLE = NameTable.of([
    NameEntry(SVC, "default", "web", ("10.96.0.10",), (ServicePort("http", "TCP", 80),)),
    NameEntry(EPG, "default", "web", ("10.0.0.5", "10.0.0.6")),
    NameEntry(POD, "default", "web", ("10.0.0.7",)),
    NameEntry(EPG, "default", "db", ("10.0.0.8",)),
    NameEntry(POD, "default", "db", ("10.0.0.9",)),
    NameEntry(POD, "default", "client", ("10.0.0.10",)),
    NameEntry(POD, "shop", "my.dotted.pod", ("10.1.0.1",)),
    NameEntry(SVC, "shop", "cart", ("10.96.1.1",)),
])


@pytest.mark.parametrize("qname,outcome,key", [
    ("web.default.svc.cluster.local", FOUND, "svc/default/web"),
    ("WeB.DeFault.SVC.Cluster.Local.", FOUND, "svc/default/web"),
    ("web.default.epg.cluster.local", FOUND, "epg/default/web"),
    ("web.default.pod.cluster.local", FOUND, "pod/default/web"),
    ("my.dotted.pod.shop.pod.cluster.local", FOUND, "pod/shop/my.dotted.pod"),
    ("_http._tcp.web.default.svc.cluster.local", FOUND, "svc/default/web"),
    ("_http._udp.web.default.svc.cluster.local", NXDOMAIN, None),
    ("_tcp.web.default.svc.cluster.local", EMPTY, None),
    ("nope.default.svc.cluster.local", NXDOMAIN, None),
    ("google.com.default.svc.cluster.local", NXDOMAIN, None),
    ("default.svc.cluster.local", EMPTY, None),
    ("nowhere.svc.cluster.local", NXDOMAIN, None),
    ("svc.cluster.local", EMPTY, None),
    ("cluster.local", EMPTY, None),
    ("x.other.cluster.local", NXDOMAIN, None),
    ("example.org", FORWARD, None),
    ("cluster.local.example.org", FORWARD, None),
    ("nope", FORWARD, None),
    # bare names: service, then endpoint group, then pod
    ("web", FOUND, "svc/default/web"),
    ("db", FOUND, "epg/default/db"),
    ("CLIENT", FOUND, "pod/default/client"),
])
def test_resolve(qname, outcome, key):
    resolution = TABLE.resolve(qname)
    assert resolution.outcome == outcome
    assert (resolution.entry.key if resolution.entry else None) == key


def test_srv_names_carry_the_port():
    resolution = TABLE.resolve("_HTTP._TCP.web.default.svc.cluster.local")
    assert resolution.port == ServicePort("http", "TCP", 80)


def test_bare_names_are_looked_up_in_the_askers_namespace():
    assert TABLE.resolve("cart", client_namespace="shop").entry.key == "svc/shop/cart"
    assert TABLE.resolve("cart").outcome == FORWARD  # the default namespace has none
    assert TABLE.resolve("web", client_namespace="shop").outcome == FORWARD


def test_another_domain():
    table = NameTable.of(TABLE.entries.values(), domain="Corp.Example.")
    assert table.resolve("web.default.svc.corp.example").outcome == FOUND
    assert table.resolve("web.default.svc.cluster.local").outcome == FORWARD
    assert table.in_domain("X.CORP.EXAMPLE.") and not table.in_domain("example")


def test_namespace_of_a_pod_address():
    assert TABLE.namespace_of("10.1.0.1") == "shop"
    assert TABLE.namespace_of("10.96.0.10") is None  # a service address is no pod
    assert TABLE.namespace_of("192.0.2.1") is None
