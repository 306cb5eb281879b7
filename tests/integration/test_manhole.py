"""
The SSH manhole against the real OpenSSH client, on the real reactor.

Each test starts the manhole in this process and drives C{ssh} as a child
process through C{reactor.spawnProcess}, so the reactor keeps serving the
manhole while the client talks to it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

import pytest
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest

from contiv.manhole import makeManholeService

pytestmark = pytest.mark.integration

# ssh -tt sends exactly these bytes; the manhole echoes input with colour codes
# between the characters, so a result line can only come from evaluation.
CTRL_D = b"\x04"

# A unix-socket relay for ssh's ProxyCommand (no nc in the image): stdin to the
# socket, the socket to stdout.
RELAY = """\
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def pump():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=pump, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


def resultLine(output: bytes, value: bytes) -> bool:
    """Whether C{value} appears as a line of its own, as the manhole prints results."""
    return re.search(rb"^" + re.escape(value) + rb"\r?$", output, re.MULTILINE) is not None


class Role:
    """Stands in for a running role object in the daemon's namespace."""

    def __init__(self) -> None:
        self.value = "not yet"


class SSHClient(ProcessProtocol):
    """Runs one C{ssh}, writes C{script} to it, and records what it prints."""

    def __init__(self, script: bytes, closeStdin: bool = False):
        self.script = script
        self.closeStdin = closeStdin
        self.out = b""
        self.err = b""
        self.ended: Deferred = Deferred()
        self._watches: List[Tuple[bytes, Deferred]] = []
        self.running = False

    def connectionMade(self) -> None:
        self.running = True
        # stdin stays open: the session must end because of what we typed
        # (Ctrl-D), a refused login, or the server, not because of an EOF.
        self.transport.write(self.script)
        if self.closeStdin:
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for watch in list(self._watches):
            if resultLine(self.out, watch[0]):
                self._watches.remove(watch)
                watch[1].callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def waitForLine(self, value: bytes) -> Deferred:
        d: Deferred = Deferred()
        if resultLine(self.out, value):
            d.callback(None)
        else:
            self._watches.append((value, d))
        return d

    def processEnded(self, reason) -> None:
        self.running = False
        code = reason.value.exitCode if reason.check(error.ProcessTerminated) else 0
        self.ended.callback(code)


class ManholeTests(unittest.TestCase):
    # Every wait in these tests is bounded by this.
    timeout = 30

    def setUp(self) -> None:
        # Short, private paths: a unix socket path must fit in 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="manhole-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.authorizedKeys = os.path.join(self.dir, "authorized_keys")
        self.clientKey = self.keygen("client")
        self.writeAuthorized([self.clientKey])
        self.role = Role()
        self.namespace = {"roles": {"netmaster": self.role}}

    # -- helpers

    def keygen(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                        "-f", path], check=True, timeout=20)
        return path

    def writeAuthorized(self, keyPaths: List[str], extra: bytes = b"") -> None:
        lines = [b"# the manhole's operators"]
        for path in keyPaths:
            with open(path + ".pub", "rb") as f:
                lines.append(f.read().strip())
        with open(self.authorizedKeys, "wb") as f:
            f.write(extra + b"\n".join(lines) + b"\n")

    async def startManhole(self, description: str, hostKeyPath: Optional[str] = None):
        svc = makeManholeService(reactor, description, self.authorizedKeys,
                                 self.namespace, hostKeyPath)
        port = await svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc, port

    async def tcpManhole(self, hostKeyPath: Optional[str] = None):
        svc, port = await self.startManhole("tcp:0:interface=127.0.0.1", hostKeyPath)
        return svc, ["-p", str(port.getHost().port), "admin@127.0.0.1"]

    def spawnSSH(self, target: List[str], key: str, script: bytes,
                 options: Optional[List[str]] = None, closeStdin: bool = False,
                 tty: str = "-tt") -> SSHClient:
        options = options if options is not None else [
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        argv = ["ssh", "-F", "/dev/null", tty, "-i", key, "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
                "-o", "ConnectTimeout=10", *options, *target]
        client = SSHClient(script, closeStdin)
        # No SSH_AUTH_SOCK: only the key named with -i may be offered.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir}
        process = reactor.spawnProcess(client, shutil.which("ssh"), argv, env=env)

        def reap():
            if client.running:
                process.signalProcess("KILL")
                return client.ended

        self.addCleanup(reap)
        return client

    async def runSSH(self, target, key, script, options=None,
                     **kwargs) -> Tuple[int, SSHClient]:
        client = self.spawnSSH(target, key, script, options, **kwargs)
        code = await client.ended
        return code, client

    def assertEvaluated(self, code: int, client: SSHClient) -> None:
        detail = f"ssh exited {code}; stdout {client.out!r}; stderr {client.err!r}"
        self.assertEqual(code, 0, detail)
        self.assertTrue(resultLine(client.out, b"42"), detail)

    # -- tests

    async def _loginAndEvaluate(self, target: List[str]) -> SSHClient:
        # Set after the service started: the session sees the live object.
        self.role.value = "netmaster-is-live"
        code, client = await self.runSSH(
            target, self.clientKey,
            b"6*7\nroles['netmaster'].value\n" + CTRL_D)
        self.assertEvaluated(code, client)
        self.assertTrue(resultLine(client.out, b"'netmaster-is-live'"), client.out)
        return client

    def test_tcpLoginEvaluatesInNamespace(self):
        async def run():
            svc, target = await self.tcpManhole()
            await self._loginAndEvaluate(target)
        return Deferred.fromCoroutine(run())

    def test_unixSocketLoginAndSocketRemovedOnStop(self):
        async def run():
            socketPath = os.path.join(self.dir, "manhole.sock")
            relay = os.path.join(self.dir, "relay.py")
            with open(relay, "w") as f:
                f.write(RELAY)
            svc, port = await self.startManhole(f"unix:{socketPath}")
            self.assertTrue(stat.S_ISSOCK(os.stat(socketPath).st_mode))
            await self._loginAndEvaluate(
                ["-o", f"ProxyCommand={sys.executable} {relay} {socketPath}",
                 "admin@manhole"])
            await svc.stopService()
            self.assertFalse(os.path.exists(socketPath))
            self.assertFalse(os.path.exists(socketPath + ".lock"))
        return Deferred.fromCoroutine(run())

    def test_endOfInputEndsSession(self):
        """C{ssh manhole < script}, with or without a pty, runs the script and exits 0."""

        async def run():
            svc, target = await self.tcpManhole()
            for tty in ("-tt", "-T"):
                code, client = await self.runSSH(target, self.clientKey, b"6*7\n",
                                                 closeStdin=True, tty=tty)
                self.assertEvaluated(code, client)
        return Deferred.fromCoroutine(run())

    def test_wrongKeyRefused(self):
        async def run():
            stranger = self.keygen("stranger")
            svc, target = await self.tcpManhole()
            code, client = await self.runSSH(target, stranger, b"6*7\n" + CTRL_D)
            self.assertNotEqual(code, 0)
            self.assertIn(b"Permission denied", client.err)
            self.assertFalse(resultLine(client.out, b"42"))
        return Deferred.fromCoroutine(run())

    def test_passwordNotOffered(self):
        async def run():
            svc, target = await self.tcpManhole()
            code, client = await self.runSSH(
                target, self.clientKey, b"6*7\n" + CTRL_D,
                ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "PreferredAuthentications=password,keyboard-interactive"])
            self.assertNotEqual(code, 0)
            # ssh lists the methods the server offered: only publickey.
            self.assertIn(b"Permission denied (publickey)", client.err)
        return Deferred.fromCoroutine(run())

    def test_authorizedKeysReadAtEveryLogin(self):
        async def run():
            late = self.keygen("late")
            svc, target = await self.tcpManhole()
            code, client = await self.runSSH(target, late, b"6*7\n" + CTRL_D)
            self.assertNotEqual(code, 0)
            self.assertIn(b"Permission denied", client.err)

            # A garbage line must not stop the good lines after it from working.
            self.writeAuthorized([self.clientKey, late], extra=b"not a key\n")
            code, client = await self.runSSH(target, late, b"6*7\n" + CTRL_D)
            self.assertEvaluated(code, client)

            self.writeAuthorized([self.clientKey])
            code, client = await self.runSSH(target, late, b"6*7\n" + CTRL_D)
            self.assertNotEqual(code, 0)
            self.assertIn(b"Permission denied", client.err)
        return Deferred.fromCoroutine(run())

    def test_hostKeyCreatedAndReused(self):
        async def run():
            hostKey = os.path.join(self.dir, "host_key")
            svc, target = await self.tcpManhole(hostKey)
            self.assertEqual(stat.S_IMODE(os.stat(hostKey).st_mode), 0o600)
            listed = subprocess.run(["ssh-keygen", "-l", "-f", hostKey], check=True,
                                    capture_output=True, timeout=20).stdout.split()
            self.assertEqual(listed[1].decode(), svc.hostKeyFingerprint)

            # With strict checking against the file's public key, a login
            # proves that the server really presents that key.
            public = subprocess.run(["ssh-keygen", "-y", "-f", hostKey], check=True,
                                    capture_output=True, timeout=20).stdout.strip()
            knownHosts = os.path.join(self.dir, "known_hosts")

            async def strictLogin(target):
                with open(knownHosts, "wb") as f:
                    f.write(b"[127.0.0.1]:" + target[1].encode() + b" " + public + b"\n")
                code, client = await self.runSSH(
                    target, self.clientKey, b"6*7\n" + CTRL_D,
                    ["-o", "StrictHostKeyChecking=yes", "-o",
                     f"UserKnownHostsFile={knownHosts}"])
                self.assertEvaluated(code, client)

            await strictLogin(target)
            first = svc.hostKeyFingerprint
            await svc.stopService()

            again, target = await self.tcpManhole(hostKey)
            self.assertEqual(again.hostKeyFingerprint, first)
            await strictLogin(target)
        return Deferred.fromCoroutine(run())

    def test_bindFailureReachesCaller(self):
        async def run():
            svc, target = await self.tcpManhole()
            taken = target[1]
            second = makeManholeService(reactor, f"tcp:{taken}:interface=127.0.0.1",
                                        self.authorizedKeys, self.namespace)
            with self.assertRaises(error.CannotListenError):
                await second.startService()
            self.assertFalse(second.running)
            # Stopping a service that never listened is harmless.
            await second.stopService()
        return Deferred.fromCoroutine(run())

    def test_stopEndsOpenSessions(self):
        async def run():
            svc, target = await self.tcpManhole()
            client = self.spawnSSH(target, self.clientKey, b"6*7\n")
            await client.waitForLine(b"42")
            await svc.stopService()
            code = await client.ended
            self.assertNotEqual(code, 0, client.err)
            self.assertIn(b"the manhole is shutting down", client.err)
        return Deferred.fromCoroutine(run())
