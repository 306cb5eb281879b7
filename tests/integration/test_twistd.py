"""The real daemon: twistd -n contiv, started and stopped as an operator would."""

import json
import os
import signal
import socket
import subprocess

import pytest

from tests.support.processes import (REPO, TWISTD, contiv_env, free_port, http_get,
                                     listening_sockets, start_twistd, wait_for)

pytestmark = pytest.mark.integration

EXAMPLES = os.path.join(REPO, "examples", "manifests")


@pytest.fixture
def manifests(tmp_path):
    path = tmp_path / "manifests"
    path.mkdir()
    (path / "ns.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {name: prod}}\n")
    return str(path)


# After a clean shutdown twistd re-raises the signal that stopped it, so a
# SIGTERM'd daemon ends "killed by SIGTERM": systemd counts that as success.
CLEAN_STOP = -signal.SIGTERM


def stop(process, timeout=20):
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_role_all_with_config_file(tmp_path, manifests):
    port = free_port()
    config = tmp_path / "contiv.yaml"
    config.write_text(f"role: all\nnode: node-1\nsource: {{manifests: {manifests}}}\n"
                      f"http: {{listen: 'tcp:{port}:interface=127.0.0.1'}}\n")
    log = str(tmp_path / "contiv.log")
    process = start_twistd(["--config", str(config)], str(tmp_path), log)
    try:
        status = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz"), 30,
                          "/healthz")
        assert status == (200, b"ok\n")
        assert process.poll() is None

        code, body = http_get(f"http://127.0.0.1:{port}/readyz")
        document = json.loads(body)
        # Without a bridge (no --openflow) nothing is enforced: the daemon must not say ready.
        assert code == 503 and document["ready"] is False
        assert set(document["roles"]) == {"netmaster", "netplugin"}
        assert document["roles"]["netplugin"]["node"] == "node-1"

        code, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert b'contiv_role_in_sync{role="netmaster"}' in body
        assert b"process_resident_memory_bytes" in body
        assert listening_sockets(process.pid), "the daemon holds its HTTP port"
    finally:
        status = stop(process)
    assert status == CLEAN_STOP, read(log)
    assert listening_sockets(process.pid) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    text = read(log)
    assert "contiv started" in text
    assert "Server Shut Down." in text
    assert "Traceback" not in text


def test_json_logs(tmp_path, manifests):
    port = free_port()
    log = str(tmp_path / "contiv.log")
    process = start_twistd(["--manifests", manifests, "--http",
                            f"tcp:{port}:interface=127.0.0.1", "--log-format=json"],
                           str(tmp_path), log)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz"), 30, "/healthz")
    finally:
        assert stop(process) == CLEAN_STOP, read(log)
    records = [json.loads(line) for line in read(log).splitlines() if line.strip()]
    assert any(r["msg"].startswith("contiv started") for r in records)
    assert all({"time", "level", "namespace", "msg"} <= set(r) for r in records)


def test_unix_http_socket_is_removed(tmp_path, manifests):
    sock = str(tmp_path / "http.sock")
    log = str(tmp_path / "contiv.log")
    process = start_twistd(["--manifests", manifests, "--http", f"unix:{sock}"],
                           str(tmp_path), log)
    try:
        wait_for(lambda: os.path.exists(sock), 30, "the HTTP unix socket")
        client = socket.socket(socket.AF_UNIX)
        wait_for(lambda: client.connect_ex(sock) == 0, 10, "a connection")
        client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert b"200 OK" in client.recv(1024)
        client.close()
    finally:
        assert stop(process) == CLEAN_STOP, read(log)
    assert not os.path.exists(sock)


def run_to_exit(args, cwd, timeout=60):
    return subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "contiv", *args], cwd=cwd,
                          env=contiv_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--role", "leader"], "contiv: configuration error: role: expected one of"),
    (["--http", "tcp:http"], "contiv: configuration error: http.listen: "),
    (["--dns-listen", "somewhere:53"], "contiv: configuration error: dns.listen: "),
    (["--manhole", "tcp:2222", "--manhole-authorized-keys", __file__],
     "contiv: configuration error: manhole.listen: "),
])
def test_misconfiguration_exits_1_with_one_message(tmp_path, manifests, args, message):
    result = run_to_exit(["--manifests", manifests, *args], str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_unknown_key_in_file(tmp_path, manifests):
    config = tmp_path / "contiv.yaml"
    config.write_text(f"source: {{manifests: {manifests}}}\nopenflow: {{colour: blue}}\n")
    result = run_to_exit(["--config", str(config)], str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"contiv: configuration error: openflow.colour: "
                                     f"unknown key (in {config})")


def test_port_in_use_fails_start_with_status_1(tmp_path, manifests):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_to_exit(["--manifests", manifests, "--http",
                              f"tcp:{port}:interface=127.0.0.1"], str(tmp_path))
    finally:
        taken.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in result.stdout


def test_help_documents_every_option(tmp_path):
    from contiv.config import KEYS

    result = run_to_exit(["--help"], str(tmp_path))
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for key in KEYS:
        assert f"--{key.option}" in text, key.option
        assert f"config key {key.name}" in text, key.name


def test_embedded_examples_start(tmp_path):
    """The README's run command's configuration: the example manifests on role all."""
    port = free_port()
    log = str(tmp_path / "contiv.log")
    process = start_twistd(["--role=all", "--manifests", EXAMPLES, "--http",
                            f"tcp:{port}:interface=127.0.0.1"], str(tmp_path), log)
    try:
        def synced():
            answer = http_get(f"http://127.0.0.1:{port}/readyz")
            if answer is None:
                return None
            state = json.loads(answer[1])["roles"]["netmaster"]
            return state if state["state"] != "listing" else None

        netmaster = wait_for(synced, 30, "netmaster to list the examples")
        assert netmaster["objects"].get("NetworkPolicy", 0) >= 1
        assert netmaster["objects"].get("Pod", 0) >= 1
    finally:
        assert stop(process) == CLEAN_STOP, read(log)


def test_systemd_units_verify(tmp_path):
    """systemd-analyze verify, with the install prefix pointed at this virtualenv."""
    analyze = "/usr/bin/systemd-analyze"
    if not os.path.exists(analyze):
        pytest.skip("systemd is not installed here, so the units cannot be verified")
    for unit in ("contiv-netmaster.service", "contiv-netplugin.service"):
        text = read(os.path.join(REPO, "etc", "systemd", unit))
        assert "/opt/contiv/bin/twistd --nodaemon --pidfile= contiv --role=" in text
        assert "Restart=on-failure" in text and "KillSignal=SIGTERM" in text
        copy = tmp_path / unit
        copy.write_text(text.replace("/opt/contiv/bin/twistd", TWISTD))
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True,
                                text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if unit in line or "Failed" in line]
        assert result.returncode == 0 and not problems, result.stdout + result.stderr
