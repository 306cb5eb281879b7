"""Connection settings from kubeconfig / in-cluster, and token re-reading."""

from __future__ import annotations

import datetime
import os
import sys
import textwrap

import pytest
import yaml
from twisted.internet import task

from contiv.k8s.apiconfig import ApiConfigError, load_in_cluster, load_kubeconfig

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def kubeconfig(tmp_path, user: dict, *, server="https://10.1.2.3:6443", extra_contexts=(),
               current="main", cluster_extra=None) -> str:
    (tmp_path / "ca.crt").write_bytes(PEM)
    cluster = {"server": server, "certificate-authority": "ca.crt"}
    cluster.update(cluster_extra or {})
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c1", "cluster": cluster},
                     {"name": "c2", "cluster": {"server": "http://127.0.0.1:8080"}}],
        "users": [{"name": "u1", "user": user}, {"name": "u2", "user": {"token": "other"}}],
        "contexts": [{"name": "main", "context": {"cluster": "c1", "user": "u1"}},
                     {"name": "second", "context": {"cluster": "c2", "user": "u2"}},
                     *extra_contexts],
        "current-context": current,
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_static_token_and_relative_ca(tmp_path) -> None:
    config = load_kubeconfig(kubeconfig(tmp_path, {"token": "abc"}))
    assert config.server == "https://10.1.2.3:6443"
    assert config.uses_tls
    assert config.ca_pem == PEM
    assert config.ca_path == str(tmp_path / "ca.crt")
    assert config.token_source.authorization() == "Bearer abc"


def test_context_selection(tmp_path) -> None:
    config = load_kubeconfig(kubeconfig(tmp_path, {"token": "abc"}), "second")
    assert config.server == "http://127.0.0.1:8080"
    assert config.token_source.authorization() == "Bearer other"
    assert "second" in config.origin


def test_client_certificate(tmp_path) -> None:
    (tmp_path / "client.crt").write_bytes(PEM)
    (tmp_path / "client.key").write_bytes(b"-----BEGIN EC PRIVATE KEY-----\nAA\n-----END EC PRIVATE KEY-----\n")
    config = load_kubeconfig(kubeconfig(tmp_path, {"client-certificate": "client.crt",
                                                   "client-key": "client.key"}))
    assert config.client_cert_pem == PEM
    assert config.client_key_pem.startswith(b"-----BEGIN EC")
    assert config.token_source is None


def test_token_file_is_re_read_every_minute_and_after_a_401(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("one")
    clock = task.Clock()
    clock.advance(1_000_000)
    source = load_kubeconfig(kubeconfig(tmp_path, {"tokenFile": str(token)}),
                             clock=clock).token_source
    assert source.authorization() == "Bearer one"
    token.write_text("two")
    clock.advance(30)
    assert source.authorization() == "Bearer one"
    clock.advance(31)
    assert source.authorization() == "Bearer two"
    token.write_text("three")
    source.invalidate()
    assert source.authorization() == "Bearer three"


def test_exec_plugin_is_run_again_before_expiry(tmp_path) -> None:
    counter = tmp_path / "count"
    counter.write_text("0")
    expiry = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(textwrap.dedent(f"""
        import json
        n = int(open({str(counter)!r}).read()) + 1
        open({str(counter)!r}, "w").write(str(n))
        print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1",
                          "kind": "ExecCredential",
                          "status": {{"token": "exec-%d" % n,
                                      "expirationTimestamp": "{expiry:%Y-%m-%dT%H:%M:%SZ}"}}}}))
    """))
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": [str(plugin)], "interactiveMode": "Never"}}
    clock = task.Clock()
    clock.advance(expiry.timestamp() - 3600)
    source = load_kubeconfig(kubeconfig(tmp_path, user), clock=clock).token_source
    assert source.authorization() == "Bearer exec-1"
    clock.advance(3600 - 120)
    assert source.authorization() == "Bearer exec-1"
    clock.advance(61)  # inside the skew before expiry
    assert source.authorization() == "Bearer exec-2"


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.update({"current-context": "missing"}), "contexts[name=missing]"),
    (lambda c: c["clusters"][0]["cluster"].pop("server"), "clusters[name=c1].cluster.server"),
    (lambda c: c["contexts"][0]["context"].update({"cluster": "nope"}), "clusters[name=nope]"),
    (lambda c: c["contexts"][0]["context"].update({"user": "nobody"}), "users[name=nobody]"),
    (lambda c: c.pop("current-context"), "current-context"),
])
def test_errors_name_the_file_and_the_field(tmp_path, mutate, field) -> None:
    path = kubeconfig(tmp_path, {"token": "abc"})
    config = yaml.safe_load(open(path))
    mutate(config)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    with pytest.raises(ApiConfigError) as raised:
        load_kubeconfig(path)
    assert raised.value.origin == path
    assert raised.value.field == field
    assert path in str(raised.value) and field in str(raised.value)


def test_missing_or_broken_file(tmp_path) -> None:
    with pytest.raises(ApiConfigError) as raised:
        load_kubeconfig(str(tmp_path / "absent"))
    assert raised.value.field == "file"
    (tmp_path / "bad").write_text("clusters: [")
    with pytest.raises(ApiConfigError, match="not valid YAML"):
        load_kubeconfig(str(tmp_path / "bad"))


def test_missing_ca_file_names_it(tmp_path) -> None:
    path = kubeconfig(tmp_path, {"token": "abc"})
    os.remove(tmp_path / "ca.crt")
    with pytest.raises(ApiConfigError) as raised:
        load_kubeconfig(path)
    assert raised.value.origin == path
    assert "ca.crt" in str(raised.value)


def test_in_cluster(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(PEM)
    clock = task.Clock()
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    config = load_in_cluster(token_path=str(token), ca_path=str(ca), environ=environ, clock=clock)
    assert config.server == "https://10.96.0.1:443"
    assert config.ca_pem == PEM
    assert config.token_source.authorization() == "Bearer sa-token"
    token.write_text("rotated")
    clock.advance(61)
    assert config.token_source.authorization() == "Bearer rotated"


def test_in_cluster_errors_name_what_is_missing(tmp_path) -> None:
    with pytest.raises(ApiConfigError) as raised:
        load_in_cluster(token_path=str(tmp_path / "t"), ca_path=str(tmp_path / "c"), environ={})
    assert "KUBERNETES_SERVICE_HOST" in raised.value.field
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ApiConfigError) as raised:
        load_in_cluster(token_path=str(tmp_path / "t"), ca_path=str(tmp_path / "c"),
                        environ=environ)
    assert raised.value.origin == str(tmp_path / "t")
