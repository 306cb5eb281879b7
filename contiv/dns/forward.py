"""
Forwarding the queries the name table does not decide to upstream resolvers.

One long-lived UDP socket per upstream: a fresh 16-bit ID per forwarded
query, replies matched by that ID *and* their question (a reply with a
guessed ID but another question is ignored), the client's ID put back. A
try that times out (or whose upstream answers SERVFAIL or REFUSED) moves on
to the next upstream; when all have failed the client gets SERVFAIL. A UDP
reply with TC set is asked again over TCP when the client came over TCP; a UDP client gets
the truncated reply and retries over TCP itself, as from any server.

Replies may be cached by question for their smallest TTL; a cached reply is
served with its TTLs counted down.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections import Counter
from typing import Any, Optional, Sequence, Union

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver

from contiv.config import parse_host_port
from contiv.dns import wire
from contiv.metrics import REGISTRY

FORWARD_LATENCY = Histogram(
    "contiv_dns_forward_latency_seconds",
    "time from receiving a forwarded query to having the upstream's reply (or giving up)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY)
OUTSTANDING = Gauge("contiv_dns_forward_outstanding",
                    "forwarded queries waiting for an upstream", registry=REGISTRY)
UPSTREAM_FAILURES = PromCounter(
    "contiv_dns_upstream_failures_total",
    "tries that failed at one upstream, by upstream and reason",
    ["upstream", "reason"], registry=REGISTRY)

RESOLV_CONF = "/etc/resolv.conf"


def parse_resolv_conf(text: str) -> tuple[tuple[str, int], ...]:
    """The C{nameserver} addresses of a resolv.conf, in order, each with port 53."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        address = words[1]
        # A link-local IPv6 nameserver may carry a zone (fe80::1%eth0); the
        # socket layer takes the zone separately, and we keep to globals.
        if "%" in address:
            continue
        try:
            host, port = parse_host_port(f"[{address}]" if ":" in address else address,
                                         default_port=53)
        except ValueError:
            continue
        found.append((host, port))
    return tuple(found)


def system_upstreams(path: str = RESOLV_CONF,
                     exclude: Sequence[tuple[str, int]] = ()) -> tuple[tuple[str, int], ...]:
    """
    The nameservers of C{path}, but those in C{exclude} (our own listen
    address: forwarding to ourselves would loop); empty when it cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            found = parse_resolv_conf(f.read())
    except OSError:
        return ()
    own = {(ipaddress.ip_address(h).compressed, p) for h, p in exclude}
    return tuple(u for u in found if (ipaddress.ip_address(u[0]).compressed, u[1]) not in own)


def _servfail(query: bytes) -> bytes:
    return wire.error_response(query, wire.SERVFAIL)


class _Pending:
    __slots__ = ("query", "client_id", "question", "deferred", "tcp", "tries", "index",
                 "wire_id", "timer", "started", "cache_key")

    def __init__(self, query: bytes, question: bytes, tcp: bool, started: float,
                 cache_key: Optional[tuple]) -> None:
        self.query = query
        self.client_id = query[:2]
        self.question = question
        self.deferred: Deferred = Deferred()
        self.tcp = tcp
        self.tries = 0
        self.index = 0
        self.wire_id: Optional[int] = None
        self.timer: Any = None
        self.started = started
        self.cache_key = cache_key


class _UpstreamProtocol(protocol.DatagramProtocol):
    """The socket to one upstream: replies in, ICMP errors in, matched by the forwarder."""

    def __init__(self, forwarder: "Forwarder", index: int, address: tuple[str, int]) -> None:
        self.forwarder = forwarder
        self.index = index
        self.address = address
        self.pending: dict[int, _Pending] = {}

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if tuple(addr[:2]) != self.address:
            self.forwarder.counts["unmatched"] += 1  # not from this upstream
            return
        self.forwarder._reply(self, data)


class _TcpExchange(Int16StringReceiver):
    """One query, one reply, over a TCP connection of its own."""

    MAX_LENGTH = 65535

    def __init__(self, query: bytes) -> None:
        self.query = query
        self.done: Deferred = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        self.sendString(self.query)

    def stringReceived(self, data: bytes) -> None:
        if not self.done.called:
            self.done.callback(data)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(reason)


class Forwarder:
    """
    Forwards queries to C{upstreams} (host, port), in order, starting at the
    one that last answered.

    C{timeout}: seconds per try; C{max_outstanding}: queries waiting for an
    upstream at most (more are answered SERVFAIL at once); C{cache_size}: how
    many replies to cache (0: no cache); C{cache_max_ttl}: the longest a
    reply is kept, whatever its TTLs say.

    C{counts}: what happened, since creation (forwarded, answered, cache_hit,
    timeout, send_error, upstream_error, tcp_error, servfail, overflow, tcp_retry, unmatched,
    mismatched).
    """

    log = Logger()

    def __init__(self, upstreams: Sequence[tuple[str, int]], *, reactor: Any = None,
                 clock: Optional[IReactorTime] = None, timeout: float = 2.0,
                 max_outstanding: int = 2048, cache_size: int = 10_000,
                 cache_max_ttl: int = 300, rng: Optional[random.Random] = None,
                 udp_buffer: int = 4 * 1024 * 1024) -> None:
        if not upstreams:
            raise ValueError("no upstream resolvers: give dns.upstreams or fill "
                             "/etc/resolv.conf")
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.upstreams = tuple(upstreams)
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.timeout = timeout
        self.max_outstanding = max_outstanding
        self.cache_size = cache_size
        self.cache_max_ttl = cache_max_ttl
        self.udp_buffer = udp_buffer
        self.counts: Counter[str] = Counter()
        # IDs must not be guessable by an off-path attacker who wants to
        # slip a forged reply in before the upstream's.
        self._rng = rng if rng is not None else random.SystemRandom()
        self._protocols: list[_UpstreamProtocol] = []
        self._ports: list[Any] = []
        self._preferred = 0
        self._outstanding = 0
        self._cache: dict[tuple, tuple[bytes, tuple[tuple[int, int], ...], float, float]] = {}
        self._labels = [f"{host}:{port}" for host, port in self.upstreams]

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    def start(self) -> Deferred:
        """Open one UDP socket per upstream."""
        for index, (host, port) in enumerate(self.upstreams):
            # Not connect()ed, though that would report ICMP port-unreachable
            # at once: Twisted's epoll reactor takes the EPOLLERR that comes
            # with it for a disconnection and closes the port for good. A dead
            # upstream costs one timeout per query instead.
            # Replies come from the canonical spelling of the address.
            canonical = (ipaddress.ip_address(host).compressed, port)
            upstream = _UpstreamProtocol(self, index, canonical)
            listening = self.reactor.listenUDP(0, upstream,
                                               interface="::" if ":" in host else "0.0.0.0")
            sock = getattr(listening, "socket", None)
            if sock is not None and self.udp_buffer:
                # Up to max_outstanding replies can arrive in one burst.
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.udp_buffer)
                except OSError as error:
                    self.log.warn("cannot size the upstream socket's buffer: {error}",
                                  error=error)
            self._protocols.append(upstream)
            self._ports.append(listening)
        return succeed(None)

    def stop(self) -> Deferred:
        """Close the sockets; the queries still waiting are answered SERVFAIL."""
        for upstream in self._protocols:
            for pending in list(upstream.pending.values()):
                upstream.pending.pop(pending.wire_id, None)
                if pending.timer is not None and pending.timer.active():
                    pending.timer.cancel()
                pending.timer = None
                self._finish(pending, _servfail(pending.query))
        self._protocols = []
        ports, self._ports = self._ports, []
        stopped = [d for d in (p.stopListening() for p in ports) if isinstance(d, Deferred)]
        return DeferredList(stopped).addCallback(lambda _: None)

    # -- asking

    def forward(self, query: bytes, tcp: bool = False) -> Deferred:
        """
        The reply to C{query} (bytes with the client's ID): the upstream's, a
        cached one, or SERVFAIL. C{tcp}: the client came over TCP, so it must
        not be handed a truncated reply.
        """
        result = self.reply_now(query, tcp)
        return result if isinstance(result, Deferred) else succeed(result)

    def reply_now(self, query: bytes, tcp: bool = False) -> Union[bytes, None, Deferred]:
        """
        Like L{forward}, but a reply known at once (cached, FORMERR, SERVFAIL
        on overflow; None: drop) is returned as it is, not in a Deferred: a
        cache hit is the forwarding path's hot path.
        """
        now = self.clock.seconds()
        # The cache first, keyed without decoding the question: most queries
        # are one uncompressed question, and a hit is the hot path.
        quick = _quick_cache_key(query, tcp) if self.cache_size else None
        if quick is not None:
            cached = self._from_cache(quick[0], query, quick[1], now)
            if cached is not None:
                self.counts["cache_hit"] += 1
                return cached
        try:
            wire.read_header(query)
            question = wire.read_question(query)
            question_key = wire.question_key(query, question)
        except wire.WireError:
            return (wire.error_response(query, wire.FORMERR)
                    if len(query) >= wire.HEADER_SIZE else None)
        cache_key = quick[0] if quick is not None else None
        if cache_key is None and self.cache_size:
            # A question the quick key does not read (a compressed name): the
            # decoded one keys the same cache.
            cache_key = _cache_key(question_key, query, question.end, tcp)
            cached = self._from_cache(cache_key, query, question.end, now)
            if cached is not None:
                self.counts["cache_hit"] += 1
                return cached
        if self._outstanding >= self.max_outstanding or not self._protocols:
            self.counts["overflow"] += 1
            return _servfail(query)
        self.counts["forwarded"] += 1
        pending = _Pending(query, question_key, tcp, now, cache_key)
        self._outstanding += 1
        OUTSTANDING.inc()
        self._try(pending, self._preferred)
        return pending.deferred

    def _try(self, pending: _Pending, index: int) -> None:
        pending.index = index
        upstream = self._protocols[index]
        wire_id = self._fresh_id(upstream)
        pending.wire_id = wire_id
        upstream.pending[wire_id] = pending
        pending.timer = self.clock.callLater(self.timeout, self._timed_out, upstream, pending)
        try:
            upstream.transport.write(struct.pack("!H", wire_id) + pending.query[2:],
                                     upstream.address)
        except OSError as error:
            # No route, or the socket buffer is full: this upstream is out for this query.
            self.log.debug("cannot send to {upstream}: {error}",
                           upstream=self._labels[index], error=error)
            self._failed(upstream, pending, "send_error")

    def _fresh_id(self, upstream: _UpstreamProtocol) -> int:
        while True:
            wire_id = self._rng.getrandbits(16)
            if wire_id not in upstream.pending:
                return wire_id

    def _failed(self, upstream: _UpstreamProtocol, pending: _Pending, reason: str) -> None:
        if upstream.pending.get(pending.wire_id) is not pending:
            return  # this try has already ended
        del upstream.pending[pending.wire_id]
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        self.counts[reason] += 1
        UPSTREAM_FAILURES.labels(self._labels[upstream.index], reason).inc()
        self._next(pending)

    def _next(self, pending: _Pending) -> None:
        pending.tries += 1
        if pending.tries >= len(self.upstreams) or not self._protocols:
            self.counts["servfail"] += 1
            self._finish(pending, _servfail(pending.query))
            return
        index = (pending.index + 1) % len(self.upstreams)
        self._preferred = index
        self._try(pending, index)

    def _timed_out(self, upstream: _UpstreamProtocol, pending: _Pending) -> None:
        pending.timer = None
        self._failed(upstream, pending, "timeout")

    def _reply(self, upstream: _UpstreamProtocol, data: bytes) -> None:
        if len(data) < wire.HEADER_SIZE:
            self.counts["unmatched"] += 1
            return
        wire_id = (data[0] << 8) | data[1]
        pending = upstream.pending.get(wire_id)
        if pending is None:
            self.counts["unmatched"] += 1  # late (after a timeout), or forged
            return
        try:
            question = wire.read_question(data)
            matches = wire.question_key(data, question) == pending.question
        except wire.WireError:
            matches = False
        if not matches or not data[2] & 0x80:
            # Keep waiting: the real reply may still come.
            self.counts["mismatched"] += 1
            return
        rcode = data[3] & wire.RCODE_MASK
        if rcode in (wire.SERVFAIL, wire.REFUSED):
            self._failed(upstream, pending, "upstream_error")
            return
        del upstream.pending[wire_id]
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        self._preferred = upstream.index
        if data[2] & 0x02 and pending.tcp:
            self.counts["tcp_retry"] += 1
            Deferred.fromCoroutine(self._over_tcp(upstream, pending))
            return
        self.counts["answered"] += 1
        self._finish(pending, data)

    async def _over_tcp(self, upstream: _UpstreamProtocol, pending: _Pending) -> None:
        host, port = self.upstreams[upstream.index]
        endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        exchange = _TcpExchange(pending.query)
        connecting = connectProtocol(endpoint_type(self.reactor, host, port,
                                                   timeout=self.timeout), exchange)
        waiting = connecting.addCallback(lambda _: exchange.done)
        waiting.addTimeout(self.timeout, self.clock)
        try:
            data = await waiting
            question = wire.read_question(data)
            if data[:2] != pending.query[:2] or \
                    wire.question_key(data, question) != pending.question:
                raise wire.WireError("the TCP reply answers another query")
        except Exception as error:
            self.log.debug("TCP to {upstream} failed: {error}",
                           upstream=self._labels[upstream.index], error=error)
            self.counts["tcp_error"] += 1
            UPSTREAM_FAILURES.labels(self._labels[upstream.index], "tcp_error").inc()
            self._next(pending)
            return
        self.counts["answered"] += 1
        self._finish(pending, data)

    def _finish(self, pending: _Pending, data: bytes) -> None:
        if pending.deferred.called:
            return
        self._outstanding -= 1
        OUTSTANDING.dec()
        now = self.clock.seconds()
        FORWARD_LATENCY.observe(max(0.0, now - pending.started))
        data = pending.client_id + data[2:]
        if pending.cache_key is not None:
            self._store(pending.cache_key, data, now)
        pending.deferred.callback(data)

    # -- the cache

    def _store(self, key: tuple, data: bytes, now: float) -> None:
        found = _cacheable(data)
        if found is None:
            return
        ttl, offsets = found
        ttl = min(ttl, self.cache_max_ttl)
        if ttl <= 0:
            return
        while len(self._cache) >= self.cache_size:
            # Oldest first: dicts keep insertion order.
            del self._cache[next(iter(self._cache))]
        # The last element: the reply with its TTLs counted down, and for how
        # many whole seconds since it was stored, rebuilt once a second at most.
        self._cache[key] = (data, offsets, now, now + ttl, [0, data])

    def _from_cache(self, key: tuple, query: bytes, question_end: int,
                    now: float) -> Optional[bytes]:
        cached = self._cache.get(key)
        if cached is None:
            return None
        data, offsets, stored, expires, aged = cached
        if now >= expires:
            del self._cache[key]
            return None
        elapsed = int(now - stored)
        if aged[0] != elapsed:
            reply = bytearray(data)
            for offset, ttl in offsets:
                struct.pack_into("!I", reply, offset, max(0, ttl - elapsed))
            aged[0], aged[1] = elapsed, bytes(reply)
        body = aged[1]
        # The client's ID and its question's case (same length: the key says so).
        return query[:2] + body[2:wire.HEADER_SIZE] + query[wire.HEADER_SIZE:question_end] \
            + body[question_end:]


def _cache_key(question_key: bytes, query: bytes, question_end: int, tcp: bool) -> tuple:
    # The flags and the OPT shape the reply (DO, sizes): only the same kind of
    # query may share a cached reply.
    return (question_key, query[2:4], query[4:12], query[question_end:], tcp)


def _quick_cache_key(query: bytes, tcp: bool) -> Optional[tuple[tuple, int]]:
    """
    (the cache key, the question's end) of a query with one question whose
    name has no compression pointer, found without decoding it; None for
    anything else (the full parse decides). Equal to L{_cache_key} of the
    decoded question.
    """
    if query[4:6] != b"\x00\x01":
        return None
    position = wire.HEADER_SIZE
    try:
        while True:
            length = query[position]
            if length == 0:
                break
            if length & 0xC0:
                return None
            position += length + 1
    except IndexError:
        return None
    name_end = position + 1
    question_end = name_end + 4
    if question_end > len(query):
        return None
    question_key = query[wire.HEADER_SIZE:name_end].lower() + query[name_end:question_end]
    return _cache_key(question_key, query, question_end, tcp), question_end


def _cacheable(data: bytes) -> Optional[tuple[int, tuple[tuple[int, int], ...]]]:
    """(the TTL to cache C{data} for, (offset, TTL) of each record), or None: do not cache."""
    try:
        _, flags, qdcount, ancount, nscount, arcount = wire.read_header(data)
        if flags & wire.TC or qdcount != 1:
            return None
        rcode = flags & wire.RCODE_MASK
        if rcode not in (wire.NOERROR, wire.NXDOMAIN):
            return None
        question = wire.read_question(data)
        rrs, _ = wire.records(data, question.end, ancount + nscount + arcount)
    except wire.WireError:
        return None
    offsets = []
    smallest: Optional[int] = None
    for rr in rrs:
        if rr.rtype == wire.TYPE_OPT:
            continue  # its "TTL" holds flags
        ttl = rr.ttl
        if rr.rtype == wire.TYPE_SOA and rr.end - rr.rdata_start >= 4:
            # RFC 2308: a negative answer lives for min(SOA TTL, SOA minimum).
            (minimum,) = struct.unpack_from("!I", data, rr.end - 4)
            ttl = min(ttl, minimum)
        offsets.append((rr.ttl_offset, rr.ttl))
        smallest = ttl if smallest is None else min(smallest, ttl)
    if smallest is None:
        return None
    return smallest, tuple(offsets)
