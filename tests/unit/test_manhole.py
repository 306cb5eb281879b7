"""The manhole's parts that need no network: keys, host keys, the service's wiring."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch import manhole_ssh
from twisted.conch.interfaces import ISession
from twisted.conch.ssh import keys
from twisted.cred.credentials import ISSHPrivateKey
from twisted.internet import error
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.logger import capturedLogs
from twisted.trial import unittest

from contiv.manhole import AuthorizedKeysFile, fingerprint, loadHostKey, makeManholeService


def publicLine(comment: bytes = b"op@example") -> tuple:
    key = keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
    return key, key.toString("openssh") + b" " + comment


class TempDirMixin:
    def makeDir(self) -> str:
        path = tempfile.mkdtemp(prefix="manhole-unit-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path


class AuthorizedKeysFileTests(TempDirMixin, unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.makeDir(), "authorized_keys")

    def write(self, *lines: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")

    def test_goodLinesKeptBadLinesLoggedWithLineNumber(self):
        one, oneLine = publicLine()
        two, twoLine = publicLine()
        _, optioned = publicLine()
        self.write(b"# operators", b"", oneLine, b"ssh-ed25519 AAAAjunk", b"garbage",
                   b'from="10.0.0.1" ' + optioned, twoLine)
        with capturedLogs() as events:
            found = AuthorizedKeysFile(self.path).getAuthorizedKeys(b"anyone")
        self.assertEqual(found, [one, two])
        skipped = [e for e in events if "lineno" in e]
        self.assertEqual([e["lineno"] for e in skipped], [4, 5, 6])
        self.assertEqual({e["path"] for e in skipped}, {self.path})

    def test_everyUsernameGetsTheSameKeys(self):
        one, oneLine = publicLine()
        self.write(oneLine)
        db = AuthorizedKeysFile(self.path)
        self.assertEqual(db.getAuthorizedKeys(b"root"), [one])
        self.assertEqual(db.getAuthorizedKeys(b"someone-else"), [one])

    def test_readAgainAtEveryCall(self):
        one, oneLine = publicLine()
        two, twoLine = publicLine()
        db = AuthorizedKeysFile(self.path)
        self.write(oneLine)
        self.assertEqual(db.getAuthorizedKeys(b"admin"), [one])
        self.write(oneLine, twoLine)
        self.assertEqual(db.getAuthorizedKeys(b"admin"), [one, two])
        self.write(twoLine)
        self.assertEqual(db.getAuthorizedKeys(b"admin"), [two])

    def test_missingFileRefusesEveryoneAndLogs(self):
        with capturedLogs() as events:
            found = AuthorizedKeysFile(self.path).getAuthorizedKeys(b"admin")
        self.assertEqual(found, [])
        self.assertEqual([e.get("path") for e in events if "error" in e], [self.path])


class HostKeyTests(TempDirMixin, unittest.SynchronousTestCase):
    def test_noPathGivesANewKeyInMemory(self):
        first, second = loadHostKey(None), loadHostKey(None)
        self.assertFalse(first.isPublic())
        self.assertEqual(first.sshType(), b"ssh-ed25519")
        self.assertNotEqual(fingerprint(first), fingerprint(second))

    def test_missingPathCreatedPrivateAndReused(self):
        path = os.path.join(self.makeDir(), "host_key")
        old = os.umask(0)
        try:
            created = loadHostKey(path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"))
        self.assertEqual(fingerprint(loadHostKey(path)), fingerprint(created))

    def test_existingKeyLoadedNotReplaced(self):
        path = os.path.join(self.makeDir(), "host_key")
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        data = private.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
        with open(path, "wb") as f:
            f.write(data)
        loaded = loadHostKey(path)
        self.assertEqual(loaded.sshType(), b"ssh-rsa")
        self.assertEqual(fingerprint(loaded), fingerprint(keys.Key(private)))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_fingerprintLooksLikeOpenSSH(self):
        shown = fingerprint(loadHostKey(None))
        self.assertTrue(shown.startswith("SHA256:"))
        self.assertFalse(shown.endswith("="))
        self.assertEqual(len(shown), len("SHA256:") + 43)


class FakeSessionProtocol:
    """Stands in for Conch's SSHSessionProcessProtocol on one channel."""

    session = object()

    def __init__(self) -> None:
        self.written = b""
        self.ended = []

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        self.written += data

    def processEnded(self, reason) -> None:
        self.ended.append(reason)


class ServiceTests(TempDirMixin, unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.keysPath = os.path.join(self.makeDir(), "authorized_keys")
        self.namespace = {"answer": 42}

    def test_listensOnTheDescriptionAndReturnsThePort(self):
        reactor = MemoryReactor()
        svc = makeManholeService(reactor, "tcp:0:interface=127.0.0.1", self.keysPath,
                                 self.namespace)
        port = self.successResultOf(svc.startService())
        [(portNumber, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((portNumber, interface), (0, "127.0.0.1"))
        self.assertIs(svc.port, port)
        self.successResultOf(svc.stopService())
        self.assertIsNone(svc.port)

    def test_bindFailureFailsStart(self):
        reactor = RaisingMemoryReactor(listenException=error.CannotListenError(
            "127.0.0.1", 22, OSError("in use")))
        svc = makeManholeService(reactor, "tcp:22:interface=127.0.0.1", self.keysPath,
                                 self.namespace)
        with capturedLogs() as events:
            self.failureResultOf(svc.startService(), error.CannotListenError)
        self.assertFalse(svc.running)
        self.assertTrue(any(e.get("description") == "tcp:22:interface=127.0.0.1"
                            for e in events))
        self.successResultOf(svc.stopService())

    def test_publicKeysOnly(self):
        svc = makeManholeService(MemoryReactor(), "tcp:0", self.keysPath, self.namespace)
        self.assertEqual(svc.factory.portal.listCredentialsInterfaces(), [ISSHPrivateKey])

    def test_hostKeysNotSharedThroughConchFactory(self):
        first = makeManholeService(MemoryReactor(), "tcp:0", self.keysPath, self.namespace)
        second = makeManholeService(MemoryReactor(), "tcp:0", self.keysPath, self.namespace)
        self.assertEqual(manhole_ssh.ConchFactory.privateKeys, {})
        self.assertNotEqual(first.factory.privateKeys, second.factory.privateKeys)
        self.assertEqual(list(first.factory.privateKeys.values()), [first.hostKey])

    def openShell(self, windowSize=(0, 0, 0, 0)):
        svc = makeManholeService(MemoryReactor(), "tcp:0", self.keysPath, self.namespace)
        user = svc.factory.portal.realm._getAvatar(b"admin")
        session = ISession(user.original)
        session.getPty(b"xterm", windowSize, [])
        proto = FakeSessionProtocol()
        session.openShell(proto)
        return session, proto

    def test_shellEvaluatesInTheLiveNamespace(self):
        session, proto = self.openShell()
        # Replaced after the session opened: the session still sees it.
        self.namespace["answer"] = 43
        proto.transport.write(b"answer - 1\r")
        self.assertIn(b"\r\n42\r\n", proto.written)
        proto.transport.write(b"assigned = 7\r")
        self.assertEqual(self.namespace["assigned"], 7)

    def test_zeroSizedPtyGetsDefaultSize(self):
        session, proto = self.openShell()
        self.assertEqual((session.width, session.height), (80, 24))
        session, proto = self.openShell((50, 132, 0, 0))
        self.assertEqual((session.width, session.height), (132, 50))

    def test_windowChangeResizes(self):
        session, proto = self.openShell()
        session.windowChanged((30, 100, 0, 0))
        manhole = session._terminal.terminalProtocol
        self.assertEqual((manhole.width, manhole.height), (100, 30))

    def test_endOfInputEndsSessionWithExitStatusZero(self):
        session, proto = self.openShell()
        session.eofReceived()
        [reason] = proto.ended
        self.assertEqual(reason.value.exitCode, 0)

    def test_ctrlDEndsSessionWithExitStatusZero(self):
        session, proto = self.openShell()
        proto.transport.write(b"\x04")
        [reason] = proto.ended
        self.assertEqual(reason.value.exitCode, 0)
