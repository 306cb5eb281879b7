"""
Forwarding: fake upstreams on real 127.0.0.1 sockets in the test reactor,
time (per-try timeouts, cache TTLs) on a Clock.
"""

from __future__ import annotations

import random
import socket
from typing import Callable, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import protocol, reactor, task
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.trial import unittest

from contiv.dns import forward, wire
from contiv.dns.forward import Forwarder, parse_resolv_conf, system_upstreams

Handler = Callable[[dns.Message], Optional[list]]


def query(name=b"www.example.test", qtype=dns.A, ident=0x1234, edns=None):
    message = dns.Message(id=ident, recDes=1)
    message.queries = [dns.Query(name, qtype)]
    if edns:
        message.additional.append(dns.RRHeader(b"", dns.OPT, edns, 0, dns.UnknownRecord(b"")))
    return message.toStr()


def reply_to(request: dns.Message, *addresses: str, ttl=60, rcode=dns.OK, trunc=0,
             question: Optional[bytes] = None) -> dns.Message:
    message = dns.Message(id=request.id, answer=1, recDes=request.recDes, recAv=1,
                          rCode=rcode, trunc=trunc, maxSize=0)
    message.queries = [dns.Query(question or request.queries[0].name.name,
                                 request.queries[0].type)]
    message.answers = [dns.RRHeader(message.queries[0].name.name, dns.A, dns.IN, ttl,
                                    dns.Record_A(a, ttl)) for a in addresses]
    return message


def decode(data: bytes) -> dns.Message:
    message = dns.Message()
    message.fromStr(data)
    return message


class FakeUpstream(protocol.DatagramProtocol):
    """Answers what C{handler} returns for each query (None: stays silent)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[dns.Message] = []

    def datagramReceived(self, data, addr):
        request = decode(data)
        self.received.append(request)
        for message in self.handler(request) or ():
            self.transport.write(message if isinstance(message, bytes) else message.toStr(),
                                 addr)


class FakeTcpUpstream(Int16StringReceiver):
    def __init__(self, handler: Handler, received: list) -> None:
        self.handler = handler
        self.received = received

    def stringReceived(self, data):
        request = decode(data)
        self.received.append(request)
        for message in self.handler(request) or ():
            self.sendString(message.toStr())


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForwarderTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.clock = task.Clock()
        self.forwarder: Optional[Forwarder] = None

    def upstream(self, handler: Handler, tcp_handler: Optional[Handler] = None):
        fake = FakeUpstream(handler)
        port = reactor.listenUDP(0, fake, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        fake.port = port.getHost().port
        fake.tcp_received = []
        if tcp_handler is not None:
            factory = protocol.Factory.forProtocol(
                lambda: FakeTcpUpstream(tcp_handler, fake.tcp_received))
            tcp = reactor.listenTCP(fake.port, factory, interface="127.0.0.1")
            self.addCleanup(tcp.stopListening)
        return fake

    def make(self, *ports: int, **kw) -> Forwarder:
        kw.setdefault("cache_size", 0)
        forwarder = Forwarder([("127.0.0.1", p) for p in ports], reactor=reactor,
                              clock=self.clock, rng=random.Random(7), **kw)
        forwarder.start()
        self.addCleanup(self._stop, forwarder)
        self.forwarder = forwarder
        return forwarder

    def _stop(self, forwarder):
        d = forwarder.stop()
        # Every try's timer is gone once every query has its answer.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(forwarder.outstanding, 0)
        return d

    async def test_id_is_rewritten_and_restored(self):
        fake = self.upstream(lambda request: [reply_to(request, "192.0.2.1")])
        forwarder = self.make(fake.port)
        ids = set()
        for client_id in (0x1234, 0x1234, 0):
            reply = decode(await forwarder.forward(query(ident=client_id)))
            self.assertEqual(reply.id, client_id)
            self.assertEqual(reply.answers[0].payload.dottedQuad(), "192.0.2.1")
            ids.add(fake.received[-1].id)
        self.assertEqual(len(fake.received), 3)
        # A fresh ID per query, never the client's.
        self.assertEqual(len(ids), 3)
        self.assertNotIn(0x1234, ids)
        self.assertEqual(forwarder.counts["answered"], 3)

    async def test_replies_are_matched_by_id_and_question(self):
        def handler(request):
            forged = reply_to(request, "203.0.113.66", question=b"evil.example.test")
            wrong_id = reply_to(request, "203.0.113.67")
            wrong_id.id = (request.id + 1) % 65536
            return [forged, wrong_id, reply_to(request, "192.0.2.1")]

        fake = self.upstream(handler)
        forwarder = self.make(fake.port)
        reply = decode(await forwarder.forward(query()))
        self.assertEqual([a.payload.dottedQuad() for a in reply.answers], ["192.0.2.1"])
        self.assertEqual(forwarder.counts["mismatched"], 1)
        # The late one with the wrong ID may or may not have been read yet; it
        # is never taken as the answer.
        self.assertEqual(forwarder.counts["answered"], 1)

    async def test_question_matching_ignores_case(self):
        fake = self.upstream(lambda request: [reply_to(
            request, "192.0.2.1", question=request.queries[0].name.name.upper())])
        forwarder = self.make(fake.port)
        reply = decode(await forwarder.forward(query(b"Www.Example.test")))
        self.assertEqual(reply.rCode, dns.OK)
        self.assertEqual(len(reply.answers), 1)

    async def test_timeout_moves_on_to_the_next_upstream(self):
        silent = self.upstream(lambda request: None)
        good = self.upstream(lambda request: [reply_to(request, "192.0.2.2")])
        forwarder = self.make(silent.port, good.port)
        pending = forwarder.forward(query())
        self.assertEqual(forwarder.outstanding, 1)
        await wait_until(lambda: silent.received)
        self.assertFalse(pending.called)
        self.clock.advance(forwarder.timeout)
        reply = decode(await pending)
        self.assertEqual(reply.answers[0].payload.dottedQuad(), "192.0.2.2")
        self.assertEqual(forwarder.counts["timeout"], 1)
        self.assertEqual(len(good.received), 1)
        # The next query starts at the upstream that answered.
        await forwarder.forward(query())
        self.assertEqual(len(silent.received), 1)

    async def test_closed_upstream_port_costs_a_timeout_and_keeps_the_socket(self):
        good = self.upstream(lambda request: [reply_to(request, "192.0.2.3")])
        forwarder = self.make(closed_udp_port(), good.port)
        for ident in (1, 2):
            forwarder._preferred = 0
            pending = forwarder.forward(query(ident=ident))
            # Let the ICMP port-unreachable come back: it must not close our socket.
            await task.deferLater(reactor, 0.05, lambda: None)
            self.clock.advance(forwarder.timeout)
            reply = decode(await pending)
            self.assertEqual(reply.answers[0].payload.dottedQuad(), "192.0.2.3")
        self.assertEqual(forwarder.counts["timeout"], 2)

    async def test_replies_from_another_address_are_ignored(self):
        silent = self.upstream(lambda request: None)
        spoofer = self.upstream(lambda request: None)
        forwarder = self.make(silent.port)
        pending = forwarder.forward(query())
        await wait_until(lambda: silent.received)
        # A reply right in every way but where it comes from.
        spoofer.transport.write(reply_to(silent.received[0], "203.0.113.1").toStr(),
                                ("127.0.0.1", forwarder._ports[0].getHost().port))
        await wait_until(lambda: forwarder.counts["unmatched"])
        self.assertFalse(pending.called)
        self.clock.advance(forwarder.timeout)
        self.assertEqual(decode(await pending).rCode, dns.ESERVER)

    async def test_upstream_servfail_moves_on(self):
        failing = self.upstream(lambda request: [reply_to(request, rcode=dns.ESERVER)])
        good = self.upstream(lambda request: [reply_to(request, "192.0.2.4")])
        forwarder = self.make(failing.port, good.port)
        reply = decode(await forwarder.forward(query()))
        self.assertEqual(reply.answers[0].payload.dottedQuad(), "192.0.2.4")

    async def test_servfail_when_every_upstream_fails(self):
        first = self.upstream(lambda request: None)
        second = self.upstream(lambda request: None)
        forwarder = self.make(first.port, second.port)
        pending = forwarder.forward(query(ident=77))
        await wait_until(lambda: first.received)
        self.clock.advance(forwarder.timeout)
        await wait_until(lambda: second.received)
        self.assertFalse(pending.called)
        self.clock.advance(forwarder.timeout)
        reply = decode(await pending)
        self.assertEqual((reply.id, reply.rCode, reply.answer), (77, dns.ESERVER, 1))
        self.assertEqual(forwarder.counts["servfail"], 1)

    async def test_nxdomain_is_passed_on_not_retried(self):
        first = self.upstream(lambda request: [reply_to(request, rcode=dns.ENAME)])
        second = self.upstream(lambda request: [reply_to(request, "192.0.2.9")])
        forwarder = self.make(first.port, second.port)
        reply = decode(await forwarder.forward(query()))
        self.assertEqual(reply.rCode, dns.ENAME)
        self.assertEqual(second.received, [])

    async def test_truncated_udp_reply_is_asked_again_over_tcp(self):
        many = [f"192.0.2.{i}" for i in range(1, 101)]
        fake = self.upstream(lambda request: [reply_to(request, *many[:5], trunc=1)],
                             tcp_handler=lambda request: [reply_to(request, *many)])
        forwarder = self.make(fake.port)
        reply = decode(await forwarder.forward(query(ident=5), tcp=True))
        self.assertEqual((reply.id, reply.trunc, len(reply.answers)), (5, 0, 100))
        self.assertEqual(len(fake.tcp_received), 1)
        self.assertEqual(forwarder.counts["tcp_retry"], 1)
        # A UDP client gets the truncated reply: it retries over TCP itself.
        reply = decode(await forwarder.forward(query(ident=6), tcp=False))
        self.assertEqual((reply.id, reply.trunc, len(reply.answers)), (6, 1, 5))
        self.assertEqual(len(fake.tcp_received), 1)

    async def test_tcp_failure_moves_on(self):
        fake = self.upstream(lambda request: [reply_to(request, "192.0.2.1", trunc=1)])
        # No TCP listener on that port: the connection is refused.
        forwarder = self.make(fake.port)
        reply = decode(await forwarder.forward(query(ident=8), tcp=True))
        self.assertEqual((reply.id, reply.rCode), (8, dns.ESERVER))
        self.assertEqual(forwarder.counts["tcp_error"], 1)

    async def test_outstanding_forwards_are_bounded(self):
        silent = self.upstream(lambda request: None)
        forwarder = self.make(silent.port, max_outstanding=2)
        waiting = [forwarder.forward(query(ident=i)) for i in (1, 2)]
        over = decode(await forwarder.forward(query(ident=3)))
        self.assertEqual((over.id, over.rCode), (3, dns.ESERVER))
        self.assertEqual(forwarder.counts["overflow"], 1)
        self.assertEqual(forwarder.outstanding, 2)
        self.clock.advance(forwarder.timeout)
        for d in waiting:
            self.assertEqual(decode(await d).rCode, dns.ESERVER)
        self.assertEqual(forwarder.outstanding, 0)

    async def test_stop_answers_what_is_waiting(self):
        silent = self.upstream(lambda request: None)
        forwarder = self.make(silent.port)
        pending = forwarder.forward(query(ident=9))
        await forwarder.stop()
        self.assertEqual(decode(await pending).rCode, dns.ESERVER)

    async def test_cache_serves_with_ttls_counted_down(self):
        fake = self.upstream(lambda request: [reply_to(request, "192.0.2.5", ttl=60)])
        forwarder = self.make(fake.port, cache_size=100)
        first = decode(await forwarder.forward(query(b"www.example.test", ident=1)))
        self.assertEqual(first.answers[0].ttl, 60)
        self.clock.advance(20)
        data = await forwarder.forward(query(b"WWW.example.test", ident=2))
        second = decode(data)
        self.assertEqual(len(fake.received), 1)
        self.assertEqual((second.id, second.answers[0].ttl), (2, 40))
        self.assertEqual(second.queries[0].name.name, b"WWW.example.test")
        self.assertEqual(forwarder.counts["cache_hit"], 1)
        # Another kind of query (EDNS) is not served a reply made for plain DNS.
        await forwarder.forward(query(b"www.example.test", ident=3, edns=1232))
        self.assertEqual(len(fake.received), 2)
        self.clock.advance(41)
        await forwarder.forward(query(b"www.example.test", ident=4))
        self.assertEqual(len(fake.received), 3)

    async def test_cache_negative_answers_by_soa_minimum(self):
        def handler(request):
            message = reply_to(request, rcode=dns.ENAME)
            message.authority = [dns.RRHeader(b"example.test", dns.SOA, dns.IN, 3600,
                                              dns.Record_SOA(b"ns", b"h", minimum=5))]
            return [message]

        fake = self.upstream(handler)
        forwarder = self.make(fake.port, cache_size=100)
        await forwarder.forward(query(b"nope.example.test"))
        self.clock.advance(4)
        await forwarder.forward(query(b"nope.example.test"))
        self.assertEqual(len(fake.received), 1)
        self.clock.advance(2)
        await forwarder.forward(query(b"nope.example.test"))
        self.assertEqual(len(fake.received), 2)

    async def test_cache_is_bounded_and_skips_servfail(self):
        fake = self.upstream(lambda request: [reply_to(request, "192.0.2.5")])
        forwarder = self.make(fake.port, cache_size=2)
        for i in range(5):
            await forwarder.forward(query(f"n{i}.example.test".encode()))
        self.assertEqual(forwarder.cache_entries, 2)
        silent = self.upstream(lambda request: None)
        other = self.make(silent.port, cache_size=10)
        pending = other.forward(query())
        await wait_until(lambda: silent.received)
        self.clock.advance(other.timeout)
        await pending
        self.assertEqual(other.cache_entries, 0)

    def test_unreadable_query_gets_formerr_or_nothing(self):
        forwarder = Forwarder([("127.0.0.1", 53)], reactor=reactor, clock=self.clock)
        self.assertIsNone(self.successResultOf(forwarder.forward(b"abc")))
        data = struct_header(5) + b"\x05abc"
        self.assertEqual(decode(self.successResultOf(forwarder.forward(data))).rCode,
                         dns.EFORMAT)

    def test_no_upstreams_is_an_error(self):
        self.assertRaises(ValueError, Forwarder, [], reactor=reactor)


def struct_header(ident):
    return wire.HEADER.pack(ident, 0x0100, 1, 0, 0, 0)


async def wait_until(predicate, timeout=5.0):
    """Let the real reactor run (packets travel) until C{predicate} holds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await task.deferLater(reactor, 0.005, lambda: None)


# -- resolv.conf


def test_parse_resolv_conf():
    text = """
# comment
nameserver 10.0.0.2
nameserver   2001:db8::53  # trailing
; other comment
search default.svc.cluster.local
nameserver fe80::1%eth0
nameserver not-an-address:x:y:z
options ndots:5
nameserver
"""
    assert parse_resolv_conf(text) == (("10.0.0.2", 53), ("2001:db8::53", 53))


def test_system_upstreams_reads_a_file(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.53\n")
    assert system_upstreams(str(path)) == (("192.0.2.53", 53),)
    assert system_upstreams(str(tmp_path / "missing")) == ()
    # Our own address is no upstream: forwarding there would loop.
    path.write_text("nameserver 127.0.0.1\nnameserver 0:0::0:1\nnameserver 192.0.2.53\n")
    assert system_upstreams(str(path), exclude=[("127.0.0.1", 53), ("::1", 53)]) == (
        ("192.0.2.53", 53),)




_LABEL = st.text(alphabet="abcXYZ-09", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(labels=st.lists(_LABEL, min_size=1, max_size=5),
       qtype=st.sampled_from([dns.A, dns.AAAA, dns.SRV, dns.MX, 65]),
       edns=st.booleans(), tcp=st.booleans())
def test_the_quick_cache_key_is_the_decoded_questions_key(labels, qtype, edns, tcp):
    """The cache is read with a key found without decoding: it must be the same key."""
    message = dns.Message(id=99, recDes=1)
    message.queries = [dns.Query(".".join(labels), qtype)]
    if edns:
        message.additional = [dns._OPTHeader(udpPayloadSize=1232)]
    query = message.toStr()
    question = wire.read_question(query)
    slow = forward._cache_key(wire.question_key(query, question), query, question.end, tcp)
    assert forward._quick_cache_key(query, tcp) == (slow, question.end)


def test_the_quick_cache_key_leaves_odd_queries_to_the_parser():
    message = dns.Message(id=1)
    message.queries = [dns.Query("a.example", dns.A), dns.Query("b.example", dns.A)]
    assert forward._quick_cache_key(message.toStr(), False) is None  # two questions
    assert forward._quick_cache_key(b"\x00\x01\x00\x00\x00\x01", False) is None  # cut short
    pointer = bytes(12) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert forward._quick_cache_key(b"\x00\x01\x00\x00\x00\x01" + pointer[6:], False) is None
