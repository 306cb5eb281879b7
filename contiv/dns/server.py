"""
The node-local DNS server: UDP and TCP on one address, answers from an
L{Answerer}, everything else through a L{Forwarder}.

Hits are answered synchronously inside C{datagramReceived}: no Deferred, no
object per query beyond the reply's bytes.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Union

from prometheus_client import Counter as PromCounter
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin

from contiv.config import parse_host_port
from contiv.dns import wire
from contiv.dns.answer import (DROPPED, FORWARDED, OUTCOMES, Answerer)
from contiv.dns.forward import Forwarder
from contiv.metrics import REGISTRY
from contiv.service import StartError

SERVFAIL = "servfail"
UDP, TCP = "udp", "tcp"

QUERIES = PromCounter("contiv_dns_queries_total",
                      "DNS queries by transport and result (hit, nxdomain, nodata, forwarded, "
                      "servfail, formerr, notimp, refused, dropped, truncated)",
                      ["transport", "result"], registry=REGISTRY)

NamespaceOf = Callable[[str], Optional[str]]


def _escape(host: str) -> str:
    # Server endpoint strings use ':' as their separator: IPv6 colons are escaped.
    return host.replace(":", "\\:")


class _UdpServer(protocol.DatagramProtocol):
    def __init__(self, server: "DnsServerService") -> None:
        self.server = server

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        server = self.server
        outcome, reply = server.answerer.respond(data, server.namespace_of(addr[0]),
                                                 server.max_udp)
        if reply is not None:
            server.count[UDP, outcome].inc()
            self.transport.write(reply, addr)
        elif outcome == FORWARDED:
            forwarded = server.forwarder.reply_now(data, tcp=False)
            if isinstance(forwarded, Deferred):
                forwarded.addCallback(self._forwarded, addr)
                forwarded.addErrback(server._forward_failed, UDP)
            else:
                self._forwarded(forwarded, addr)
        else:
            server.count[UDP, outcome].inc()

    def _forwarded(self, reply: Optional[bytes], addr: Any) -> None:
        server = self.server
        if reply is None:
            server.count[UDP, DROPPED].inc()
            return
        server.count[UDP, SERVFAIL if wire.rcode_of(reply) == wire.SERVFAIL
                     else FORWARDED].inc()
        if self.transport is not None:
            self.transport.write(reply, addr)


class _TcpServer(Int16StringReceiver, TimeoutMixin):
    """Length-prefixed queries (RFC 7766): several per connection, answered in any order."""

    MAX_LENGTH = 65535

    def __init__(self, server: "DnsServerService") -> None:
        self.server = server
        self.callLater = server.clock.callLater  # TimeoutMixin's clock
        self.peer_host = ""
        self.waiting = 0
        self.closed = False

    def connectionMade(self) -> None:
        server = self.server
        if len(server._connections) >= server.max_tcp_connections:
            server.log.warn("too many DNS TCP connections ({limit}): refusing one",
                            limit=server.max_tcp_connections)
            self.transport.abortConnection()
            return
        server._connections.add(self)
        self.peer_host = getattr(self.transport.getPeer(), "host", "")
        self.setTimeout(server.tcp_idle_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        self.setTimeout(None)

    def stringReceived(self, data: bytes) -> None:
        server = self.server
        self.resetTimeout()
        outcome, reply = server.answerer.respond(data, server.namespace_of(self.peer_host),
                                                 None)
        if reply is not None:
            server.count[TCP, outcome].inc()
            self.sendString(reply)
        elif outcome == FORWARDED:
            self.waiting += 1
            forwarded = server.forwarder.forward(data, tcp=True)
            forwarded.addCallback(self._forwarded)
            forwarded.addErrback(server._forward_failed, TCP)
        else:
            # Unreadable framing state: the stream cannot be trusted any more.
            server.count[TCP, outcome].inc()
            self.transport.loseConnection()

    def _forwarded(self, reply: Optional[bytes]) -> None:
        server = self.server
        self.waiting -= 1
        if reply is None:
            server.count[TCP, DROPPED].inc()
            return
        server.count[TCP, SERVFAIL if wire.rcode_of(reply) == wire.SERVFAIL
                     else FORWARDED].inc()
        if not self.closed:
            self.sendString(reply)

    def timeoutConnection(self) -> None:
        if self.waiting:
            # A forwarded query is still out: its reply restarts nothing, so
            # give it one more idle period rather than cut it off.
            self.setTimeout(self.server.tcp_idle_timeout)
            return
        self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self.transport.abortConnection()


class _TcpFactory(protocol.Factory):
    def __init__(self, server: "DnsServerService") -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> _TcpServer:
        return _TcpServer(self.server)


class DnsServerService(Service):
    """
    DNS on C{listen} ("host:port", "[v6]:port", or a (host, port) pair),
    UDP and TCP.

    C{namespace_of(client_ip)}: the namespace of the pod with that address,
    None for anything else (bare names are then looked up in "default").
    C{max_udp}: the largest UDP reply we send, whatever the client advertises.
    """

    name = "dns"
    log = Logger()

    def __init__(self, listen: Union[str, tuple[str, int]], answerer: Answerer,
                 forwarder: Forwarder, namespace_of: NamespaceOf, *, reactor: Any = None,
                 max_udp: int = 4096, tcp_idle_timeout: float = 10.0,
                 max_tcp_connections: int = 512, udp_buffer: int = 4 * 1024 * 1024) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.host, self.port = (parse_host_port(listen) if isinstance(listen, str)
                                else listen)
        self.answerer = answerer
        self.forwarder = forwarder
        self.namespace_of = namespace_of
        self.reactor = reactor
        self.clock = reactor
        self.max_udp = max_udp
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.udp_buffer = udp_buffer
        self.udp_port: Any = None
        self.tcp_port: Any = None
        self._connections: set[_TcpServer] = set()
        # Labelled children looked up once: .labels() on every query costs more
        # than the answer itself.
        self.count = {(transport, result): QUERIES.labels(transport, result)
                      for transport in (UDP, TCP)
                      for result in (*OUTCOMES, SERVFAIL)}

    def set_table(self, table: Any) -> None:
        """Answer from a new name table (what netplugin's on_names should call)."""
        self.answerer.set_table(table)

    def startService(self) -> Deferred:
        Service.startService(self)
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            # Asked for any port (0): the one UDP gets may be taken for TCP (by
            # some connection's local end); then another pair is tried.
            for _ in range(1 if self.port else 20):
                port = await self._listen()
                if port is not None:
                    break
            else:
                port = await self._listen(last=True)
            await self.forwarder.start()
        except Exception as error:
            await self._stop()
            raise StartError(f"DNS server cannot listen on {self.host}:{self.port}: "
                             f"{error}") from error
        self.log.info("DNS server on {host}:{port} (UDP and TCP), forwarding to "
                      "{upstreams}", host=self.host, port=port,
                      upstreams=", ".join(f"{h}:{p}" for h, p in self.forwarder.upstreams))

    async def _listen(self, last: bool = False) -> Optional[int]:
        """UDP and TCP on one port: the port, or None (any port was asked for,
        and the one UDP got is taken for TCP: try again)."""
        # Twisted has no UDP endpoint (endpoints are for streams): listenUDP it is.
        self.udp_port = self.reactor.listenUDP(self.port, _UdpServer(self),
                                               interface=self.host)
        self._grow_buffers(self.udp_port)
        port = self.udp_port.getHost().port  # the one chosen, when asked for 0
        description = f"tcp{'6' if ':' in self.host else ''}:{port}:" \
                      f"interface={_escape(self.host)}"
        try:
            self.tcp_port = await serverFromString(self.reactor, description).listen(
                _TcpFactory(self))
        except CannotListenError:
            if self.port or last:
                raise
            udp, self.udp_port = self.udp_port, None
            await _maybe(udp.stopListening())
            return None
        return port

    def _grow_buffers(self, port: Any) -> None:
        # A burst of queries while the reactor is busy elsewhere (a table
        # swap, a GC pause) overflows the default ~200 KB receive buffer and
        # the kernel drops them. The kernel caps this at net.core.rmem_max.
        sock = getattr(port, "socket", None)
        if sock is None or not self.udp_buffer:
            return
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, self.udp_buffer)
            except OSError as error:
                self.log.warn("cannot size the DNS socket's buffers: {error}", error=error)
                return

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port chosen, if it was asked for 0)."""
        return self.host, self.udp_port.getHost().port

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        udp, self.udp_port = self.udp_port, None
        tcp, self.tcp_port = self.tcp_port, None
        if udp is not None:
            await _maybe(udp.stopListening())
        if tcp is not None:
            await _maybe(tcp.stopListening())
        for connection in list(self._connections):
            connection.transport.abortConnection()
        await self.forwarder.stop()

    def _forward_failed(self, failure: Any, transport: str) -> None:
        self.count[transport, SERVFAIL].inc()
        self.log.failure("forwarding a query failed", failure)


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred):
        await result
