"""Configuration: the key table, the file, the command line and every error path."""

import os

import pytest

from contiv import config
from contiv.tap import Options


@pytest.fixture
def manifests(tmp_path):
    path = tmp_path / "manifests"
    path.mkdir()
    return str(path)


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_text("")
    return str(path)


def write(tmp_path, text):
    path = tmp_path / "contiv.yaml"
    path.write_text(text)
    return str(path)


def load(argv):
    options = Options()
    options.parseOptions(argv)
    return options.config


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        load(argv)
    assert raised.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_defaults(manifests):
    values = load(["--manifests", manifests])
    assert values["role"] == "all"
    assert values["store"] == "memory"
    assert values["dns.domain"] == "cluster.local"
    assert values["store_prefix"] == "contiv/"
    assert values["node"]  # the hostname
    assert values["log.format"] == "text"
    assert values.roles == ("netmaster", "netplugin")


def test_file_nested_keys(tmp_path, manifests, keys_file):
    path = write(tmp_path, f"""
role: netmaster
node: worker-1
source: {{manifests: {manifests}}}
dns: {{listen: "127.0.0.1:5353", upstreams: ["192.0.2.1", "[2001:db8::1]:5300"],
       domain: example.local}}
http: {{listen: "tcp:9100:interface=127.0.0.1"}}
manhole: {{listen: "unix:/tmp/m.sock", authorized_keys: {keys_file}}}
openflow: {{connect: "unix:/var/run/openvswitch/br0.mgmt"}}
log: {{format: json}}
""")
    values = load(["--config", path])
    assert values["role"] == "netmaster"
    assert values["node"] == "worker-1"
    assert values["source.manifests"] == manifests
    assert values["dns.listen"] == ("127.0.0.1", 5353)
    assert values["dns.upstreams"] == (("192.0.2.1", 53), ("2001:db8::1", 5300))
    assert values["dns.domain"] == "example.local"
    assert values["manhole.listen"] == "unix:/tmp/m.sock"
    assert values["openflow.connect"] == "unix:/var/run/openvswitch/br0.mgmt"
    assert values["log.format"] == "json"
    assert values.roles == ("netmaster",)


def test_command_line_wins(tmp_path, manifests):
    path = write(tmp_path, f"role: netmaster\nsource: {{manifests: {manifests}}}\n"
                           "dns: {upstreams: ['192.0.2.1']}\n")
    values = load(["--config", path, "--role", "all", "--dns-upstream", "192.0.2.2",
                   "--dns-upstream", "[::1]:5353"])
    assert values["role"] == "all"
    assert values["dns.upstreams"] == (("192.0.2.2", 53), ("::1", 5353))


def test_every_key_is_an_option():
    options = Options()
    long_options = {opt[0] for opt in options.optParameters + options.optFlags}
    for key in config.KEYS:
        if key.repeatable:
            assert hasattr(options, "opt_" + key.option.replace("-", "_")), key.name
        else:
            assert key.option in long_options, key.name


@pytest.mark.parametrize("text, key, words", [
    ("colour: blue\n", "colour", "unknown key"),
    ("dns: {listen: '127.0.0.1:53', colour: blue}\n", "dns.colour", "unknown key"),
    ("role: leader\n", "role", "expected one of netmaster, netplugin, all"),
    ("dns: {domain: 5}\n", "dns.domain", "expected a non-empty string"),
    ("dns: 5\n", "dns", "expected a mapping"),
    ("manhole: {allow_remote: perhaps}\n", "manhole.allow_remote", "expected true or false"),
    ("http: {listen: 'tcpx:80'}\n", "http.listen", "not a Twisted server endpoint"),
    ("http: {listen: 'tcp:notaport'}\n", "http.listen", "not a Twisted server endpoint"),
    ("openflow: {connect: 'unix'}\n", "openflow.connect", "not a Twisted client endpoint"),
    ("dns: {listen: 'localhost:53'}\n", "dns.listen", "is not an IP address"),
    ("dns: {listen: '127.0.0.1:99999'}\n", "dns.listen", "not a number from 1 to 65535"),
    ("dns: {listen: '127.0.0.1'}\n", "dns.listen", "is not host:port"),
    ("dns: {upstreams: []}\n", "dns.upstreams", "expected a list"),
    ("dns: {upstreams: ['[::1']}\n", "dns.upstreams", "without a closing"),
    ("store: redis://127.0.0.1:6379\n", "store", "expected 'memory' or 'memcached://"),
    ("store: 'memcached://127.0.0.1:x'\n", "store", "port"),
    ("store: 'memcached://10.0.0.300:11211'\n", "store", "not an IP address or a DNS name"),
    ("store: 'memcached://bad name:11211'\n", "store", "not an IP address or a DNS name"),
    ("log: {format: xml}\n", "log.format", "expected one of text, json"),
    ("source: {kubeconfig: /nonexistent/kubeconfig}\n", "source.kubeconfig",
     "not a readable file"),
])
def test_bad_file_value(tmp_path, manifests, capsys, text, key, words):
    if not text.startswith("source:"):
        text += f"source: {{manifests: {manifests}}}\n"
    path = write(tmp_path, text)
    message = error_of(["--config", path], capsys)
    assert message.startswith(f"contiv: configuration error: {key}: "), message
    assert words in message
    assert path in message


def test_bad_command_line_value_names_the_option(manifests, capsys):
    message = error_of(["--manifests", manifests, "--role", "leader"], capsys)
    assert message.startswith("contiv: configuration error: role: ")
    assert "command line --role" in message


def test_manifests_not_a_directory(tmp_path, capsys):
    message = error_of(["--manifests", str(tmp_path / "missing")], capsys)
    assert "source.manifests: " in message and "is not a directory" in message


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = write(tmp_path, "role: all\ndns: {listen: [\n")
    message = error_of(["--config", path], capsys)
    assert "config: " in message and "not valid YAML at line" in message


def test_file_not_a_mapping(tmp_path, capsys):
    path = write(tmp_path, "- role\n")
    assert "must hold a mapping" in error_of(["--config", path], capsys)


def test_missing_file(tmp_path, capsys):
    message = error_of(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "cannot read" in message and "nope.yaml" in message


def test_netmaster_needs_a_source(capsys):
    message = error_of(["--role", "netmaster"], capsys)
    assert "source.manifests: netmaster needs a source" in message
    # netplugin alone needs none
    assert load(["--role", "netplugin"]).roles == ("netplugin",)


def test_one_source_only(tmp_path, manifests, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    message = error_of(["--manifests", manifests, "--kubeconfig", str(kubeconfig)], capsys)
    assert "only one source may be set" in message


def test_context_needs_kubeconfig(manifests, capsys):
    message = error_of(["--manifests", manifests, "--kube-context", "prod"], capsys)
    assert "source.context: needs source.kubeconfig" in message


def test_memcached_store(manifests):
    url = "memcached://127.0.0.1:11211,[::1]:11212"
    assert load(["--manifests", manifests, "--store", url])["store"] == url
    # In a cluster, the memcached Service's name, resolved at each connection.
    named = "memcached://contiv-memcached.contiv-system.svc:11211"
    assert load(["--manifests", manifests, "--store", named])["store"] == named


def test_manhole_needs_authorized_keys(manifests, capsys):
    message = error_of(["--manifests", manifests, "--manhole", "unix:/tmp/m.sock"], capsys)
    assert "manhole.authorized_keys: " in message


@pytest.mark.parametrize("endpoint, allowed", [
    ("unix:/run/contiv/manhole.sock", True),
    ("tcp:2222:interface=127.0.0.1", True),
    ("tcp6:2222:interface=\\:\\:1", True),
    ("tcp:2222", False),
    ("tcp:2222:interface=0.0.0.0", False),
    ("tcp:2222:interface=192.0.2.10", False),
])
def test_manhole_loopback_only(manifests, keys_file, capsys, endpoint, allowed):
    argv = ["--manifests", manifests, "--manhole", endpoint,
            "--manhole-authorized-keys", keys_file]
    if allowed:
        assert load(argv)["manhole.listen"] == endpoint
    else:
        message = error_of(argv, capsys)
        assert "manhole.listen: " in message and "not loopback" in message
        # ...unless the operator says so.
        assert load(argv + ["--manhole-allow-remote"])["manhole.listen"] == endpoint


def test_json_log_format_sets_twistd_logger(manifests):
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    options.parseOptions(["--nodaemon", "contiv", "--manifests", manifests,
                          "--log-format", "json"])
    from contiv.logs import json_observer

    assert options["logger"] is json_observer


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:53", ("127.0.0.1", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_parse_host_port(value, expected):
    assert config.parse_host_port(value) == expected


def test_parse_host_port_default():
    assert config.parse_host_port("::1", default_port=53) == ("::1", 53)
    assert config.parse_host_port("192.0.2.1", default_port=53) == ("192.0.2.1", 53)
    assert config.parse_host_port("[::1]", default_port=53) == ("::1", 53)


def test_example_config_file_is_valid(tmp_path, monkeypatch):
    """etc/contiv.yaml documents every key and loads as it ships (paths aside)."""
    here = os.path.dirname(__file__)
    text = open(os.path.join(here, "..", "..", "etc", "contiv.yaml")).read()
    for key in config.KEYS:
        leaf = key.name.rsplit(".", 1)[-1]
        assert f"{leaf}:" in text and f"[--{key.option}]" in text, key.name
    text = text.replace("/etc/contiv/manifests", str(tmp_path))
    assert load(["--config", write(tmp_path, text)])["source.manifests"] == str(tmp_path)


def test_readme_documents_every_option():
    here = os.path.dirname(__file__)
    text = open(os.path.join(here, "..", "..", "README.md")).read()
    for key in config.KEYS:
        assert f"`--{key.option}" in text and f"`{key.name}`" in text, key.name


def test_dns_options_and_their_consistency(manifests, capsys):
    config = load(["--manifests", manifests, "--dns-listen", "127.0.0.1:5353",
                   "--dns-ttl", "5", "--dns-domain", "corp.example"])
    assert (config["dns.listen"], config["dns.ttl"], config["dns.domain"]) == \
        (("127.0.0.1", 5353), 5, "corp.example")
    assert load(["--manifests", manifests])["dns.ttl"] == 30
    assert "dns.ttl: expected whole seconds" in error_of(
        ["--manifests", manifests, "--dns-ttl", "-1"], capsys)
    assert "dns.domain: 'bad domain' is not a DNS name" in error_of(
        ["--manifests", manifests, "--dns-domain", "bad domain"], capsys)
    # netmaster ignores the DNS keys: one file can serve both roles.
    assert load(["--role", "netmaster", "--manifests", manifests, "--dns-datapath"]).roles \
        == ("netmaster",)
    assert "dns.datapath: needs openflow.connect" in error_of(
        ["--manifests", manifests, "--dns-datapath"], capsys)


def test_election_defaults_follow_the_source(tmp_path, manifests, monkeypatch):
    monkeypatch.delenv("POD_NAME", raising=False)
    values = load(["--manifests", manifests])
    assert values["election.enabled"] is False  # manifests: always active
    assert (values["election.lease"], values["election.lease_duration"],
            values["election.renew_deadline"], values["election.retry_period"]) == \
        ("contiv-netmaster", 15, 10.0, 2.0)
    host, _, suffix = values["election.identity"].rpartition("_")
    assert host and len(suffix) == 8
    assert load(["--manifests", manifests])["election.identity"] != values["election.identity"]
    monkeypatch.setenv("POD_NAME", "contiv-netmaster-7d9f-abcde")
    assert load(["--manifests", manifests])["election.identity"] == "contiv-netmaster-7d9f-abcde"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("")
    values = config.build({}, {"source.kubeconfig": str(kubeconfig), "role": "netmaster"})
    assert values["election.enabled"] is True
    values = config.build({"election.enabled": False},
                          {"source.kubeconfig": str(kubeconfig), "role": "netmaster"})
    assert values["election.enabled"] is False


def test_election_namespace_defaults_to_the_pods_own(tmp_path, monkeypatch):
    path = tmp_path / "namespace"
    assert config._election_namespace(str(path)) == "kube-system"
    path.write_text("contiv-system\n")
    assert config._election_namespace(str(path)) == "contiv-system"


def test_election_keys_from_file_and_command_line(tmp_path, manifests):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("")
    path = write(tmp_path, f"""
role: netmaster
source: {{kubeconfig: {kubeconfig}}}
election: {{namespace: contiv-system, lease: contiv.netmaster, identity: "pod-a",
           lease_duration: 3, renew_deadline: 2, retry_period: 0.5}}
""")
    values = config.build(config.read_file(path), {"election.retry_period": "0.25"}, path)
    assert (values["election.namespace"], values["election.lease"],
            values["election.identity"], values["election.lease_duration"],
            values["election.renew_deadline"], values["election.retry_period"]) == \
        ("contiv-system", "contiv.netmaster", "pod-a", 3, 2.0, 0.25)
    assert values["election.enabled"] is True


@pytest.mark.parametrize("argv, key, words", [
    (["--election-enabled", "perhaps"], "election.enabled", "expected true or false"),
    (["--election-enabled", "true"], "election.enabled", "needs an API source"),
    (["--election-namespace", "Kube_System"], "election.namespace", "not a namespace"),
    (["--election-lease", "a/b"], "election.lease", "not an object name"),
    (["--election-lease-duration", "1.5"], "election.lease_duration", "whole seconds"),
    (["--election-renew-deadline", "0"], "election.renew_deadline", "above 0"),
    (["--election-retry-period", "x"], "election.retry_period", "a number of seconds"),
    (["--election-renew-deadline", "15"], "election.renew_deadline",
     "below election.lease_duration"),
    (["--election-retry-period", "9"], "election.retry_period", "renew_deadline"),
])
def test_bad_election_values(manifests, capsys, argv, key, words):
    message = error_of(["--manifests", manifests] + argv, capsys)
    assert message.startswith(f"contiv: configuration error: {key}: "), message
    assert words in message
