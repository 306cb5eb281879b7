"""
The SSH manhole: a Python prompt inside the running daemon, for operators.

An operator logs in with C{ssh} and gets a L{twisted.conch.manhole.ColoredManhole}
whose namespace holds the daemon's running role objects. Because that prompt can
do anything the daemon can, the only way in is an SSH public key listed in an
C{authorized_keys} file; there is no password checker at all, so password and
keyboard-interactive logins are never even offered.

The C{authorized_keys} file is read again at every login attempt, so an operator
can grant or revoke access by editing it, without restarting the daemon.

Sessions evaluate in the daemon's namespace dict itself, not in a copy (unlike
the stock L{twisted.conch.manhole.Manhole}): a role the daemon adds or replaces
shows up in sessions that are already open. The price is that names assigned at
the prompt (and C{_}, the last result) land in that dict too, where every
other session sees them.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Set

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.application import service
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, transport
from twisted.cred import portal
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["makeManholeService", "ManholeService", "AuthorizedKeysFile", "loadHostKey",
           "fingerprint"]

# How long a session that was told to disconnect may take to go away before its
# connection is aborted, so a client that stops reading cannot hold up shutdown.
_DISCONNECT_GRACE = 5.0

_log = Logger()


def fingerprint(key: keys.Key) -> str:
    """The key's fingerprint as OpenSSH prints it, to compare with C{ssh-keygen -l}."""
    digest = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + digest.rstrip("=")


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """
    The keys in an C{authorized_keys} file, read from disk at every call.

    Every key is valid for every username: the manhole has no users of its own,
    and the name an operator types only shows up in the log.
    """

    _log = Logger()

    def __init__(self, path: str):
        self.path = path

    def getAuthorizedKeys(self, avatarId: Any) -> List[keys.Key]:
        # A list, not a generator, so that the whole file is read (and every
        # bad line reported) before the checker starts comparing keys.
        return list(self._read())

    def _read(self) -> Iterator[keys.Key]:
        try:
            with open(self.path, "rb") as f:
                lines = f.readlines()
        except OSError as e:
            # Refusing every login is the safe answer; the daemon keeps running
            # so the operator can fix the file without a restart.
            self._log.error("cannot read manhole authorized keys {path}: {error}",
                            path=self.path, error=e)
            return
        for lineno, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                key = keys.Key.fromString(line)
            # Key.fromString reports malformed text with BadKeyError, but also
            # with binascii.Error, IndexError and friends, depending on where
            # the parse breaks. Lines with OpenSSH options (from="...",
            # command="...") end up here too: we cannot honour the options, and
            # accepting the key without them would grant more than was written.
            except Exception as e:
                self._log.warn("skipping unparsable line {lineno} of manhole authorized "
                               "keys {path}: {error}", path=self.path, lineno=lineno,
                               error=e)
                continue
            yield key if key.isPublic() else key.public()


class _LoggingKeyChecker(SSHPublicKeyChecker):
    """
    An L{SSHPublicKeyChecker} that logs who got in and who was refused.

    A manhole login runs arbitrary code in the daemon, so each one belongs in
    the log with the key that was used.
    """

    _log = Logger()

    def requestAvatarId(self, credentials: Any) -> Deferred:
        d = super().requestAvatarId(credentials)
        # Without a signature the client is only asking whether a key would do
        # (RFC 4252 7); only signed attempts are real logins.
        if credentials.signature is None:
            return d
        try:
            shown = fingerprint(keys.Key.fromString(credentials.blob))
        except Exception:
            shown = "(unparsable key)"
        username = credentials.username.decode("utf-8", "replace")

        def accepted(avatarId: Any) -> Any:
            self._log.info("manhole login by {username} with key {fingerprint}",
                           username=username, fingerprint=shown)
            return avatarId

        def refused(failure: Any) -> Any:
            self._log.warn("manhole login refused for {username} with key {fingerprint}: "
                           "{reason}", username=username, fingerprint=shown,
                           reason=failure.getErrorMessage())
            return failure

        d.addCallbacks(accepted, refused)
        return d


class _LiveManhole(manhole.ColoredManhole):
    def __init__(self, namespace: Dict[str, Any]):
        super().__init__(namespace)
        # Manhole works on a copy taken at login; the daemon's dict itself
        # lets a session see roles the daemon adds or replaces later.
        self.namespace = namespace


class _ChainedProtocolFactory:
    def __init__(self, namespace: Dict[str, Any]):
        self.namespace = namespace

    def __call__(self) -> insults.ServerProtocol:
        return insults.ServerProtocol(_LiveManhole, self.namespace)


class _SessionTransport(manhole_ssh.TerminalSessionTransport):
    def __init__(self, proto: Any, chainedProtocol: insults.ServerProtocol, avatar: Any,
                 width: int, height: int):
        super().__init__(proto, chainedProtocol, avatar, width, height)
        # Conch closes the channel without an exit status, which ssh reports
        # as exit code 255, an error; end like a shell that exited with 0.
        chainedProtocol.transport.loseConnection = lambda: proto.processEnded(
            Failure(ProcessDone(0)))


class _TerminalSession(manhole_ssh.TerminalSession):
    """
    Conch's terminal session, made to survive what real clients send.

    The stock session raises on a window resize and on end-of-input, which
    drops the whole connection (and any output not yet written).
    """

    # A client that asks for a shell without a pty (C{ssh host < script})
    # gets a terminal of the classic size instead of an AttributeError.
    width = 80
    height = 24
    _terminal: Optional[insults.ServerProtocol] = None

    def getPty(self, term: bytes, windowSize: Any, attrs: Any) -> None:
        # ssh -tt with a non-terminal stdin asks for a 0x0 pty; keep the
        # default size rather than drawing the prompt in zero columns.
        height, width = windowSize[:2]
        if height and width:
            self.height, self.width = height, width

    def openShell(self, proto: Any) -> None:
        self._terminal = self.chainedProtocolFactory()
        self.transportFactory(proto, self._terminal, IConchUser(self.original),
                              self.width, self.height)

    def windowChanged(self, newWindowSize: Any) -> None:
        self.height, self.width = newWindowSize[:2]
        if self._terminal is not None:
            self._terminal.terminalProtocol.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        # Input is handled as it arrives, so by now every line before the EOF
        # has run; closing lets C{echo expr | ssh -tt ...} end by itself, and
        # the channel sends its buffered output before it closes.
        if self._terminal is not None:
            self._terminal.loseConnection()


class _ServerTransport(transport.SSHServerTransport):
    """Tells the factory when a connection comes and goes, so stop can end it."""

    def connectionMade(self) -> None:
        self.factory.sessions.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.sessionEnded(self)


class _ManholeFactory(manhole_ssh.ConchFactory):
    protocol = _ServerTransport

    def __init__(self, portal: portal.Portal, hostKey: keys.Key):
        super().__init__(portal)
        # ConchFactory keeps these dicts on the class; instance dicts keep two
        # manholes (or a test and the daemon) from sharing host keys.
        self.publicKeys = {hostKey.sshType(): hostKey.public()}
        self.privateKeys = {hostKey.sshType(): hostKey}
        self.sessions: Set[_ServerTransport] = set()
        self._ended: Dict[_ServerTransport, Deferred] = {}

    def sessionEnded(self, session: _ServerTransport) -> None:
        self.sessions.discard(session)
        waiting = self._ended.pop(session, None)
        if waiting is not None:
            waiting.callback(None)

    def endSessions(self, reactor: Any) -> Deferred:
        """Disconnect every open session; fire once they are all gone."""
        waits = []
        for session in list(self.sessions):
            ended = self._ended[session] = Deferred()
            timer = reactor.callLater(_DISCONNECT_GRACE, session.transport.abortConnection)
            ended.addBoth(lambda result, timer=timer: timer.active() and timer.cancel())
            session.sendDisconnect(transport.DISCONNECT_BY_APPLICATION,
                                   b"the manhole is shutting down")
            waits.append(ended)
        return DeferredList(waits)


def _generateHostKey() -> Any:
    if b"ssh-ed25519" in transport.SSHServerTransport.supportedPublicKeys:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def loadHostKey(path: Optional[str]) -> keys.Key:
    """
    The manhole's host key: read from C{path}, or created there if missing.

    With no path the key lives only in memory, so clients see a new host key
    at every start.
    """
    if path is None:
        return keys.Key(_generateHostKey())
    try:
        return keys.Key.fromFile(path)
    except FileNotFoundError:
        pass
    private = _generateHostKey()
    data = private.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption())
    try:
        # O_EXCL so two daemons starting at once cannot write over each other's
        # key; mode 0600 from the start so the key is never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return keys.Key.fromFile(path)
    try:
        with os.fdopen(fd, "wb") as f:
            # The umask can only take bits away; fchmod makes the mode exact.
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
    except BaseException:
        # A truncated key would make every later start fail to parse it.
        os.unlink(path)
        raise
    key = keys.Key(private)
    _log.info("created manhole host key {path} with fingerprint {fingerprint}",
              path=path, fingerprint=fingerprint(key))
    return key


class ManholeService(service.Service):
    """
    Listens on an endpoint with an SSH manhole factory.

    C{startService} returns the Deferred of the endpoint's C{listen}, so that a
    caller that waits for it sees a bind failure. C{stopService} returns the
    Deferred of C{stopListening}, which also waits for open sessions to close.
    """

    _log = Logger()

    def __init__(self, reactor: Any, description: str, factory: _ManholeFactory,
                 hostKey: keys.Key):
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.hostKey = hostKey
        self.hostKeyFingerprint = fingerprint(hostKey)
        self.port: Optional[IListeningPort] = None

    def startService(self) -> Deferred:
        super().startService()
        endpoint = endpoints.serverFromString(self._reactor, self.description)
        d = endpoint.listen(self.factory)

        def listening(port: IListeningPort) -> IListeningPort:
            if not self.running:
                # stopService ran while listen() was pending; nobody else will
                # close this port.
                port.stopListening()
                return port
            self.port = port
            self._log.info("manhole listening on {description}, host key {fingerprint}",
                           description=self.description,
                           fingerprint=self.hostKeyFingerprint)
            return port

        def failed(failure: Any) -> Any:
            self.running = 0
            self._log.error("manhole cannot listen on {description}: {error}",
                            description=self.description, error=failure.getErrorMessage())
            return failure

        d.addCallbacks(listening, failed)
        return d

    def stopService(self) -> Deferred:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        d = maybeDeferred(port.stopListening)
        # A stopped manhole that still runs code for an open session would be
        # a surprise; the daemon's own shutdown would end them anyway.
        d.addCallback(lambda _: self.factory.endSessions(self._reactor))
        d.addCallback(lambda _: self._log.info("manhole on {description} stopped",
                                               description=self.description))
        return d


def makeManholeService(reactor: Any, description: str, authorized_keys_path: str,
                       namespace: dict, host_key_path: Optional[str] = None
                       ) -> service.IService:
    """
    An SSH manhole service on C{description} that evaluates Python in C{namespace}.

    @param reactor: the reactor to listen with.
    @param description: a Twisted server endpoint string, already validated.
    @param authorized_keys_path: the public keys that may log in, re-read at
        every login attempt.
    @param namespace: the dict sessions evaluate in: shared and live, not
        copied.
    @param host_key_path: a private key file, created (mode 0600) if missing;
        L{None} for a new in-memory key.
    """
    realm = manhole_ssh.TerminalRealm()
    realm.sessionFactory = _TerminalSession
    realm.transportFactory = _SessionTransport
    realm.chainedProtocolFactory = _ChainedProtocolFactory(namespace)
    checker = _LoggingKeyChecker(AuthorizedKeysFile(authorized_keys_path))
    hostKey = loadHostKey(host_key_path)
    factory = _ManholeFactory(portal.Portal(realm, [checker]), hostKey)
    return ManholeService(reactor, description, factory, hostKey)
