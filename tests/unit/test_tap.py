"""The service tree that twistd contiv builds from a configuration."""

import pytest
from twisted.internet.task import Clock
from twisted.names import dns

from contiv import config as configuration
from contiv import tap
from contiv.dns.names import NameEntry, NameTable


def build_config(**values):
    base = {"role": "netplugin", "node": "node-1", "store": "memory"}
    base.update(values)
    return configuration.build({}, base, "")


def query(name, qtype=dns.A):
    message = dns.Message(id=7, recDes=1)
    message.queries = [dns.Query(name, qtype)]
    return message.toStr()


def reply(data):
    message = dns.Message()
    message.fromStr(data)
    return message


TABLE = NameTable.of([
    NameEntry("svc", "default", "web", ("10.96.0.10",)),
    NameEntry("pod", "prod", "client", ("10.244.0.5",)),
    NameEntry("svc", "prod", "api", ("10.96.1.1",)),
])


def test_no_dns_keys_no_dns():
    assert tap.build_dns(build_config(), Clock()) is None


def test_datapath_answers_known_names_only():
    parts = tap.build_dns(build_config(**{"dns.datapath": True,
                                          "openflow.connect": "unix:/tmp/br0.mgmt"}),
                          Clock())
    assert parts.server is None and parts.datapath
    parts.set_table(TABLE)
    answered = reply(parts.answer_datapath(query("web.default.svc.cluster.local"),
                                           "10.244.0.9"))
    assert [a.payload.dottedQuad() for a in answered.answers] == ["10.96.0.10"]
    # A bare name is looked up in the asking pod's namespace.
    bare = reply(parts.answer_datapath(query("api"), "10.244.0.5"))
    assert [a.payload.dottedQuad() for a in bare.answers] == ["10.96.1.1"]
    # Everything else is the pod's own resolver's to answer: an unknown
    # cluster name, a name outside the domain, an unreadable packet.
    assert parts.answer_datapath(query("nothere.default.svc.cluster.local"),
                                 "10.244.0.9") is None
    assert parts.answer_datapath(query("example.com"), "10.244.0.9") is None
    assert parts.answer_datapath(b"\x00\x01garbage", "10.244.0.9") is None


def test_server_forwards_to_resolv_conf_without_itself(tmp_path, monkeypatch):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nnameserver 192.0.2.53\n")
    monkeypatch.setattr("contiv.dns.forward.RESOLV_CONF", str(resolv))
    parts = tap.build_dns(build_config(**{"dns.listen": "127.0.0.1:53",
                                          "dns.forward_cache": "0"}), Clock())
    assert parts.server.forwarder.upstreams == (("192.0.2.53", 53),)
    assert parts.server.forwarder.cache_size == 0


def test_server_without_any_upstream_is_a_configuration_error(tmp_path, monkeypatch):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    monkeypatch.setattr("contiv.dns.forward.RESOLV_CONF", str(resolv))
    with pytest.raises(configuration.ConfigError) as caught:
        tap.build_dns(build_config(**{"dns.listen": "127.0.0.1:53"}), Clock())
    assert caught.value.key == "dns.upstreams" and str(resolv) in str(caught.value)


def test_netplugin_gets_the_names_and_the_tree_gets_the_server():
    config = build_config(**{"dns.listen": "127.0.0.1:5353", "dns.upstreams": ["192.0.2.53"]})
    root = tap.build_service(config, Clock())
    assert root.getServiceNamed("dns") is not None
    netplugin = root.roles["netplugin"]
    assert netplugin.names_reader is not None
    server = root.getServiceNamed("dns")
    netplugin.on_names(TABLE)
    assert server.answerer.table is TABLE


def test_datapath_interception_takes_the_configured_rate():
    config = build_config(**{"dns.datapath": True, "openflow.connect": "unix:/tmp/br0.mgmt",
                             "dns.datapath_rate": "500", "dns.datapath_burst": "50"})
    netplugin = tap.build_netplugin(config, Clock(), None, tap.build_dns(config, Clock()))
    manager = netplugin.datapath
    assert manager.dns_intercept and (manager.dns_rate, manager.dns_burst) == (500, 50)
    interceptor = netplugin.openflow_client.on_packet_in.__self__
    assert (interceptor.limit.rate, interceptor.limit.burst) == (500, 50)


def test_datapath_rate_must_be_positive():
    with pytest.raises(configuration.ConfigError) as caught:
        build_config(**{"dns.datapath_rate": "0"})
    assert caught.value.key == "dns.datapath_rate"
