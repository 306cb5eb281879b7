"""The DNS server service on real loopback sockets in the test reactor."""

from __future__ import annotations

import socket
import struct

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from contiv.dns.answer import Answerer
from contiv.dns.forward import Forwarder
from contiv.dns.names import NameEntry, NameTable
from contiv.dns.server import DnsServerService, _escape
from contiv.metrics import REGISTRY
from tests.unit.test_dns_forward import FakeUpstream, decode, reply_to, wait_until


def names(address="10.96.0.10"):
    return NameTable.of([
        NameEntry("svc", "default", "web", (address,)),
        NameEntry("svc", "prod", "web", ("10.96.1.10",)),
        NameEntry("pod", "prod", "client", ("127.0.0.1",)),
        NameEntry("svc", "default", "big", tuple(f"10.200.0.{i}" for i in range(1, 201))),
    ], generation=1)


def query(name, qtype=dns.A, ident=0x4242):
    message = dns.Message(id=ident, recDes=1)
    message.queries = [dns.Query(name, qtype)]
    return message.toStr()


def sample(transport, result):
    return REGISTRY.get_sample_value("contiv_dns_queries_total",
                                     {"transport": transport, "result": result}) or 0.0


class UdpClient(protocol.DatagramProtocol):
    def __init__(self):
        self.replies: list[bytes] = []

    def datagramReceived(self, data, addr):
        self.replies.append(data)


class TcpClient(Int16StringReceiver):
    def __init__(self):
        self.replies: list[bytes] = []
        self.lost: Deferred = Deferred()

    def stringReceived(self, data):
        self.replies.append(data)

    def connectionLost(self, reason=None):
        self.lost.callback(None)


class ServerTests(unittest.TestCase):
    timeout = 20

    async def start(self, host="127.0.0.1", namespace_of=None, upstream=None, **kw):
        self.upstream = upstream or FakeUpstream(lambda r: [reply_to(r, "192.0.2.7")])
        up = reactor.listenUDP(0, self.upstream, interface="127.0.0.1")
        self.addCleanup(up.stopListening)
        self.forwarder = Forwarder([("127.0.0.1", up.getHost().port)], reactor=reactor,
                                   timeout=0.5, cache_size=0)
        self.answerer = Answerer(names())
        table = self.answerer.table
        self.server = DnsServerService(
            (host, 0), self.answerer, self.forwarder,
            namespace_of or table.namespace_of, reactor=reactor, **kw)
        await self.server.startService()
        self.addCleanup(self.stop)
        self.client = UdpClient()
        port = reactor.listenUDP(0, self.client, interface=host)
        self.addCleanup(port.stopListening)
        return self.server.address

    async def stop(self):
        if self.server.running:
            await self.server.stopService()

    async def udp(self, data):
        before = len(self.client.replies)
        self.client.transport.write(data, self.server.address)
        await wait_until(lambda: len(self.client.replies) > before)
        return decode(self.client.replies[-1])

    async def tcp_connect(self):
        host, port = self.server.address
        endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(
            reactor, host, port)
        client = TcpClient()
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.loseConnection() or client.lost)
        return client

    async def test_udp_hit_uses_the_askers_namespace(self):
        await self.start()
        hits = sample("udp", "hit")
        # 127.0.0.1 is pod prod/client: the bare name is prod's service.
        reply = await self.udp(query(b"web"))
        self.assertEqual(reply.answers[0].payload.dottedQuad(), "10.96.1.10")
        reply = await self.udp(query(b"WEB.default.svc.cluster.local"))
        self.assertEqual(reply.answers[0].payload.dottedQuad(), "10.96.0.10")
        self.assertEqual(reply.queries[0].name.name, b"WEB.default.svc.cluster.local")
        self.assertEqual(sample("udp", "hit") - hits, 2)

    async def test_udp_miss_is_forwarded(self):
        await self.start()
        forwarded = sample("udp", "forwarded")
        reply = await self.udp(query(b"www.example.test", ident=99))
        self.assertEqual((reply.id, reply.answers[0].payload.dottedQuad()), (99, "192.0.2.7"))
        self.assertEqual(len(self.upstream.received), 1)
        self.assertEqual(sample("udp", "forwarded") - forwarded, 1)
        latency = REGISTRY.get_sample_value("contiv_dns_forward_latency_seconds_count")
        self.assertGreaterEqual(latency, 1)

    async def test_servfail_when_the_upstream_is_silent(self):
        await self.start(upstream=FakeUpstream(lambda r: None))
        servfail = sample("udp", "servfail")
        reply = await self.udp(query(b"www.example.test"))
        self.assertEqual(reply.rCode, dns.ESERVER)
        self.assertEqual(sample("udp", "servfail") - servfail, 1)

    async def test_nxdomain_and_formerr_are_counted(self):
        await self.start()
        nx, formerr, dropped = (sample("udp", r) for r in ("nxdomain", "formerr", "dropped"))
        reply = await self.udp(query(b"nope.default.svc.cluster.local"))
        self.assertEqual(reply.rCode, dns.ENAME)
        reply = await self.udp(struct.pack("!HHHHHH", 5, 0x100, 1, 0, 0, 0) + b"\x03ab")
        self.assertEqual((reply.id, reply.rCode), (5, dns.EFORMAT))
        self.client.transport.write(b"xx", self.server.address)
        await wait_until(lambda: sample("udp", "dropped") > dropped)
        self.assertEqual(sample("udp", "nxdomain") - nx, 1)
        self.assertEqual(sample("udp", "formerr") - formerr, 1)

    async def test_udp_truncates_and_tcp_does_not(self):
        await self.start()
        reply = await self.udp(query(b"big.default.svc.cluster.local"))
        self.assertEqual(reply.trunc, 1)
        self.assertLess(len(reply.answers), 200)
        client = await self.tcp_connect()
        client.sendString(query(b"big.default.svc.cluster.local"))
        await wait_until(lambda: client.replies)
        reply = decode(client.replies[0])
        self.assertEqual((reply.trunc, len(reply.answers)), (0, 200))

    async def test_tcp_several_queries_per_connection_hits_and_misses(self):
        await self.start()
        client = await self.tcp_connect()
        client.sendString(query(b"web.default.svc.cluster.local", ident=1))
        client.sendString(query(b"www.example.test", ident=2))
        client.sendString(query(b"web", ident=3))
        await wait_until(lambda: len(client.replies) == 3)
        replies = {m.id: m for m in map(decode, client.replies)}
        self.assertEqual(replies[1].answers[0].payload.dottedQuad(), "10.96.0.10")
        self.assertEqual(replies[2].answers[0].payload.dottedQuad(), "192.0.2.7")
        self.assertEqual(replies[3].answers[0].payload.dottedQuad(), "10.96.1.10")

    async def test_tcp_idle_connections_are_closed(self):
        await self.start(tcp_idle_timeout=0.2)
        client = await self.tcp_connect()
        await wait_until(lambda: client.lost.called, timeout=5)

    async def test_tcp_connections_are_bounded(self):
        await self.start(max_tcp_connections=1)
        first = await self.tcp_connect()
        second = await self.tcp_connect()
        await wait_until(lambda: second.lost.called, timeout=5)
        first.sendString(query(b"web.default.svc.cluster.local"))
        await wait_until(lambda: first.replies)

    async def test_set_table_takes_effect_at_once(self):
        await self.start()
        await self.udp(query(b"web.default.svc.cluster.local"))
        self.server.set_table(names("10.96.0.99"))
        reply = await self.udp(query(b"web.default.svc.cluster.local"))
        self.assertEqual(reply.answers[0].payload.dottedQuad(), "10.96.0.99")

    async def test_stop_closes_both_sockets_and_tcp_connections(self):
        host, port = await self.start()
        client = await self.tcp_connect()
        await self.server.stopService()
        await wait_until(lambda: client.lost.called)
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind((host, port))  # free again
        self.assertEqual(self.forwarder._protocols, [])

    async def test_ipv6(self):
        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6")
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("::1", 0))
        except OSError:
            raise unittest.SkipTest("no ::1")
        await self.start(host="::1", namespace_of=lambda ip: None)
        reply = await self.udp(query(b"web"))
        self.assertEqual(reply.answers[0].payload.dottedQuad(), "10.96.0.10")
        client = await self.tcp_connect()
        client.sendString(query(b"web"))
        await wait_until(lambda: client.replies)

    def test_listen_strings(self):
        forwarder = Forwarder([("127.0.0.1", 53)], reactor=reactor)
        server = DnsServerService("[::1]:5353", Answerer(names()), forwarder, lambda ip: None,
                                  reactor=reactor)
        self.assertEqual((server.host, server.port), ("::1", 5353))

    async def test_a_taken_port_fails_the_start_cleanly(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            forwarder = Forwarder([("127.0.0.1", 53)], reactor=reactor)
            server = DnsServerService(f"127.0.0.1:{port}", Answerer(names()), forwarder,
                                      lambda ip: None, reactor=reactor)
            with self.assertRaises(Exception) as caught:
                await server.startService()
            self.assertIn(str(port), str(caught.exception))
            self.assertIsNone(server.udp_port)
            self.assertEqual(forwarder._protocols, [])


    async def test_any_port_taken_for_tcp_only_is_tried_again(self):
        """Port 0: UDP's pick may be some TCP socket's local port; another pair is found."""
        from contiv.dns import server as server_module

        real = server_module.serverFromString
        refused = []

        def first_refused(reactor_, description):
            endpoint = real(reactor_, description)
            if refused:
                return endpoint

            class Taken:
                def listen(self, factory):
                    refused.append(description)
                    raise CannotListenError("127.0.0.1", 0, OSError(98, "in use"))
            return Taken()

        self.patch(server_module, "serverFromString", first_refused)
        await self.start()
        self.assertEqual(len(refused), 1)
        host, port = self.server.address
        self.assertEqual(self.server.tcp_port.getHost().port, port)
        reply = await self.udp(query(b"web"))
        self.assertTrue(reply.answers)


def test_endpoint_escaping():
    assert _escape("::1") == "\\:\\:1"
    assert _escape("127.0.0.1") == "127.0.0.1"


