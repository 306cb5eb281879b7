"""Answers from the name table, as wire bytes: both paths, checked by decoding every reply."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.names import dns

from contiv.dns.answer import (DROP, DROPPED, FORMERR, FORWARDED, HIT, NODATA, NOTIMP,
                               NXDOMAIN_, REFUSED, TRUNCATED, Answerer)
from contiv.dns.names import NameEntry, NameTable, ServicePort

TTL = 30


def table(generation=5):
    return NameTable.of([
        NameEntry("svc", "default", "web", ("10.96.0.10", "fd00::10"),
                  (ServicePort("http", "TCP", 80), ServicePort("dns", "UDP", 53))),
        NameEntry("svc", "default", "v4only", ("10.96.0.11",)),
        NameEntry("svc", "default", "headless", ()),
        NameEntry("svc", "prod", "web", ("10.96.1.10",)),
        NameEntry("svc", "prod", "shared", ("10.96.1.20",)),
        NameEntry("epg", "prod", "shared", ("10.1.9.9",)),
        NameEntry("pod", "prod", "shared", ("10.1.9.8",)),
        NameEntry("epg", "prod", "frontend", ("10.1.1.1", "10.1.1.2")),
        NameEntry("pod", "prod", "frontend", ("10.1.1.3",)),
        NameEntry("pod", "prod", "web-1.cache", ("10.1.2.3", "fd00::1:203")),
        NameEntry("pod", "default", "lonely", ("10.1.3.3",)),
        NameEntry("svc", "default", "big", tuple(f"10.200.{i // 250}.{i % 250 + 1}"
                                               for i in range(300))),
    ], generation=generation)


def query(name, qtype=dns.A, *, ident=4321, edns=None, do=False, rd=True, cls=dns.IN,
          extra_opt_data=b""):
    message = dns.Message(id=ident, recDes=1 if rd else 0)
    message.queries = [dns.Query(name, qtype, cls)]
    if edns is not None:
        message.additional.append(dns.RRHeader(
            b"", dns.OPT, edns, 0x8000 if do else 0, dns.UnknownRecord(extra_opt_data)))
    return message.toStr()


def decode(data):
    message = dns.Message()
    message.fromStr(data)
    return message


def addresses(message):
    return [rr.payload.dottedQuad() if rr.type == dns.A else
            __import__("ipaddress").ip_address(rr.payload.address).compressed
            for rr in message.answers]


@pytest.fixture
def answerer():
    return Answerer(table(), ttl=TTL)


def ask(answerer, name, qtype=dns.A, namespace=None, max_udp=4096, **kw):
    data = query(name, qtype, **kw)
    outcome, reply = answerer.respond(data, namespace, max_udp)
    assert reply is not None, outcome
    message = decode(reply)
    assert message.id == kw.get("ident", 4321)
    assert message.answer == 1
    return outcome, message


# -- every name form


def test_service_a_and_aaaa(answerer):
    outcome, message = ask(answerer, b"web.default.svc.cluster.local")
    assert outcome == HIT and message.rCode == dns.OK and message.auth == 1
    assert addresses(message) == ["10.96.0.10"]
    assert message.answers[0].ttl == TTL and message.recDes == 1 and message.recAv == 1
    outcome, message = ask(answerer, b"web.default.svc.cluster.local", dns.AAAA)
    assert outcome == HIT and addresses(message) == ["fd00::10"]


def test_pod_names_with_dots(answerer):
    _, message = ask(answerer, b"web-1.cache.prod.pod.cluster.local")
    assert addresses(message) == ["10.1.2.3"]
    _, message = ask(answerer, b"web-1.cache.prod.pod.cluster.local", dns.AAAA)
    assert addresses(message) == ["fd00::1:203"]


def test_endpoint_group_names(answerer):
    _, message = ask(answerer, b"frontend.prod.epg.cluster.local")
    assert addresses(message) == ["10.1.1.1", "10.1.1.2"]


def test_bare_names_in_the_askers_namespace_then_default(answerer):
    _, message = ask(answerer, b"web", namespace="prod")
    assert addresses(message) == ["10.96.1.10"]
    _, message = ask(answerer, b"web", namespace=None)
    assert addresses(message) == ["10.96.0.10"]
    _, message = ask(answerer, b"lonely", namespace=None)
    assert addresses(message) == ["10.1.3.3"]
    # The hot cache keeps namespaces apart: the same bytes, two answers.
    _, message = ask(answerer, b"web", namespace="prod")
    assert addresses(message) == ["10.96.1.10"]
    # A pod of another namespace does not see default's names.
    outcome, reply = answerer.respond(query(b"lonely"), "prod", 4096)
    assert (outcome, reply) == (FORWARDED, None)


def test_bare_names_prefer_service_then_group_then_pod(answerer):
    _, message = ask(answerer, b"shared", namespace="prod")
    assert addresses(message) == ["10.96.1.20"]
    _, message = ask(answerer, b"frontend", namespace="prod")
    assert addresses(message) == ["10.1.1.1", "10.1.1.2"]


def test_case_is_echoed_and_ignored(answerer):
    for name in (b"WeB.DeFault.SVC.cluster.LOCAL", b"web.default.svc.cluster.local",
                 b"WEB.DEFAULT.SVC.CLUSTER.LOCAL"):
        for _ in range(2):  # the second time from the hot cache
            data = query(name)
            reply = answerer.answer(data, None, 4096)
            # The question comes back byte for byte.
            assert reply[12:12 + len(name) + 6] == data[12:12 + len(name) + 6]
            message = decode(reply)
            assert message.queries[0].name.name == name
            assert message.answers[0].name.name == name
            assert addresses(message) == ["10.96.0.10"]
    assert answerer.counts[HIT] == 6


def test_hot_path_replies_equal_general_path_replies():
    hot = Answerer(table())
    for name, qtype, edns in [(b"web.default.svc.cluster.local", dns.A, None),
                              (b"Web.default.svc.cluster.local", dns.AAAA, 1232),
                              (b"nope.default.svc.cluster.local", dns.A, None),
                              (b"v4only.default.svc.cluster.local", dns.AAAA, 4096)]:
        hot.answer(query(name.lower(), qtype, edns=edns), None, 4096)  # fill the cache
        fresh = Answerer(table())
        for ident in (1, 65535):
            data = query(name, qtype, edns=edns, ident=ident)
            assert hot.answer(data, None, 4096) == fresh.answer(data, None, 4096)
    assert hot.hot_entries == 4


# -- negative answers


def test_nodata_for_a_type_the_name_lacks(answerer):
    outcome, message = ask(answerer, b"v4only.default.svc.cluster.local", dns.AAAA)
    assert outcome == NODATA and message.rCode == dns.OK and message.answers == []
    (soa,) = message.authority
    assert soa.type == dns.SOA and soa.name.name == b"cluster.local"
    assert soa.payload.minimum == TTL and soa.ttl == TTL and soa.payload.serial == 5


def test_nodata_for_empty_names(answerer):
    for name in (b"cluster.local", b"svc.cluster.local", b"default.svc.cluster.local",
                 b"headless.default.svc.cluster.local", b"_tcp.web.default.svc.cluster.local"):
        outcome, message = ask(answerer, name)
        assert outcome == NODATA, name
        assert message.rCode == dns.OK and message.answers == []
        assert message.authority[0].type == dns.SOA


def test_nxdomain_with_the_domains_soa(answerer):
    for name in (b"nope.default.svc.cluster.local", b"google.com.default.svc.cluster.local",
                 b"x.nowhere.svc.cluster.local", b"web.default.other.cluster.local"):
        outcome, message = ask(answerer, name)
        assert outcome == NXDOMAIN_ and message.rCode == dns.ENAME, name
        (soa,) = message.authority
        assert soa.name.name == b"cluster.local" and soa.payload.minimum == TTL
        assert soa.payload.mname.name == b"ns.dns.cluster.local"


def test_bare_name_nodata_soa_owns_the_name(answerer):
    outcome, message = ask(answerer, b"Lonely", dns.AAAA)
    assert outcome == NODATA
    assert message.authority[0].name.name == b"Lonely"


def test_names_not_ours_are_forwarded(answerer):
    for name in (b"example.com", b"web.default.svc.other.local", b"localhost", b""):
        assert answerer.answer(query(name), None, 4096) is None
        # Twice: the hot path remembers the decision too.
        assert answerer.answer(query(name), None, 4096) is None
    assert answerer.counts[FORWARDED] == 8


def test_set_table_replaces_every_cached_answer(answerer):
    _, message = ask(answerer, b"web.default.svc.cluster.local")
    assert addresses(message) == ["10.96.0.10"]
    answerer.set_table(NameTable.of([NameEntry("svc", "default", "web", ("10.96.0.99",))],
                                    generation=6))
    assert answerer.hot_entries == 0
    _, message = ask(answerer, b"web.default.svc.cluster.local")
    assert addresses(message) == ["10.96.0.99"]
    _, message = ask(answerer, b"nope.default.svc.cluster.local")
    assert message.authority[0].payload.serial == 6


# -- SRV and ANY


def test_srv_for_a_named_port(answerer):
    outcome, message = ask(answerer, b"_http._tcp.web.default.svc.cluster.local", dns.SRV)
    assert outcome == HIT
    (srv,) = message.answers
    assert srv.type == dns.SRV and srv.payload.port == 80
    assert srv.payload.target.name == b"web.default.svc.cluster.local"
    assert {rr.type for rr in message.additional} == {dns.A, dns.AAAA}
    _, message = ask(answerer, b"_DNS._UDP.web.default.svc.cluster.local", dns.SRV)
    assert message.answers[0].payload.port == 53
    # Wrong protocol, unknown port, A for an SRV name, SRV for a service name.
    outcome, message = ask(answerer, b"_http._udp.web.default.svc.cluster.local", dns.SRV)
    assert outcome == NXDOMAIN_
    outcome, message = ask(answerer, b"_http._tcp.web.default.svc.cluster.local", dns.A)
    assert outcome == NODATA and message.answers == []
    outcome, message = ask(answerer, b"web.default.svc.cluster.local", dns.SRV)
    assert outcome == NODATA


def test_any_gives_every_address(answerer):
    outcome, message = ask(answerer, b"web.default.svc.cluster.local", dns.ALL_RECORDS)
    assert outcome == HIT and addresses(message) == ["10.96.0.10", "fd00::10"]


# -- EDNS and truncation


def test_edns_opt_is_echoed_with_our_size_and_the_do_bit(answerer):
    for do in (False, True, False, True):
        _, message = ask(answerer, b"web.default.svc.cluster.local", edns=1232, do=do)
        (opt,) = message.additional
        assert opt.type == dns.OPT and opt.cls == 4096
        assert bool(opt.ttl & 0x8000) == do
    _, message = ask(answerer, b"web.default.svc.cluster.local")
    assert message.additional == []


def test_unknown_edns_version_gets_badvers(answerer):
    data = bytearray(query(b"web.default.svc.cluster.local", edns=1232))
    data[-5] = 1  # OPT: root, type, size, TTL = (extended rcode, version, flags), rdlength
    outcome, reply = answerer.respond(bytes(data), None, 4096)
    message = decode(reply)
    assert message.answers == [] and message.additional[0].ttl >> 24 == 1


def test_edns_options_take_the_general_path_and_are_answered(answerer):
    cookie = struct.pack("!HH", 10, 8) + b"\x01" * 8
    for _ in range(2):
        outcome, message = ask(answerer, b"web.default.svc.cluster.local", edns=1232,
                               extra_opt_data=cookie)
        assert outcome == HIT and addresses(message) == ["10.96.0.10"]
    assert answerer.hot_entries == 0


@pytest.mark.parametrize("edns, limit", [(None, 512), (1232, 1232), (65000, 4096),
                                         (100, 512)])
def test_truncation_to_the_clients_size(answerer, edns, limit):
    for _ in range(2):
        data = query(b"big.default.svc.cluster.local", edns=edns)
        outcome, reply = answerer.respond(data, None, 4096)
        assert outcome == TRUNCATED and len(reply) <= limit
        message = decode(reply)
        assert message.trunc == 1
        # As many whole answers as fit: one more would not.
        assert len(message.answers) == (limit - len(data) - (0 if edns else 0)) // 16
        assert addresses(message)[:2] == ["10.200.0.1", "10.200.0.2"]
    # TCP: no limit, every answer.
    outcome, reply = answerer.respond(data, None, None)
    message = decode(reply)
    assert outcome == HIT and message.trunc == 0 and len(message.answers) == 300


def test_server_cap_below_the_clients_size(answerer):
    data = query(b"big.default.svc.cluster.local", edns=4096)
    outcome, reply = answerer.respond(data, None, 1000)
    assert outcome == TRUNCATED and len(reply) <= 1000


def test_small_answers_are_not_truncated(answerer):
    outcome, reply = answerer.respond(query(b"frontend.prod.epg.cluster.local"), None, 512)
    assert outcome == HIT and decode(reply).trunc == 0


# -- unusual and malformed queries


def test_other_opcodes_get_notimp(answerer):
    data = bytearray(query(b"web.default.svc.cluster.local"))
    data[2] |= 2 << 3  # STATUS
    outcome, reply = answerer.respond(bytes(data), None, 4096)
    message = decode(reply)
    assert outcome == NOTIMP and message.rCode == dns.ENOTIMP and message.id == 4321


def test_several_questions_get_formerr(answerer):
    message = dns.Message(id=7)
    message.queries = [dns.Query(b"web.default.svc.cluster.local"),
                       dns.Query(b"lonely.default.pod.cluster.local")]
    outcome, reply = answerer.respond(message.toStr(), None, 4096)
    assert outcome == FORMERR and decode(reply).rCode == dns.EFORMAT


def test_other_classes_of_our_names_are_refused(answerer):
    outcome, message = ask(answerer, b"web.default.svc.cluster.local", cls=dns.CH)
    assert outcome == REFUSED and message.rCode == dns.EREFUSED
    assert answerer.answer(query(b"version.bind", dns.TXT, cls=dns.CH), None, 4096) is None


def test_responses_are_dropped_never_answered(answerer):
    data = bytearray(query(b"web.default.svc.cluster.local"))
    data[2] |= 0x80
    assert answerer.answer(bytes(data), None, 4096) is DROP
    assert answerer.counts[DROPPED] == 1


@pytest.mark.parametrize("data", [b"", b"\x12", b"\x12\x34\x01\x00\x00\x01"])
def test_short_packets_are_dropped(answerer, data):
    assert answerer.respond(data, None, 4096) == (DROPPED, None)
    assert answerer.answer(data, None, 4096) is DROP


@pytest.mark.parametrize("tail", [
    b"\x03web\xc0\x0c\x00\x01\x00\x01",  # pointer to itself, loops
    b"\x03web\xc0\x40\x00\x01\x00\x01",  # pointer forward, past the end
    b"\x03web\x07default",  # cut short in the name
    b"\x03web\x00\x00",  # cut short in the type
    b"\x80web\x00\x00\x01\x00\x01",  # unknown label type
    b"\x03web" * 70 + b"\x00\x00\x01\x00\x01",  # name longer than 255
])
def test_malformed_questions_get_formerr(answerer, tail):
    data = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + tail
    outcome, reply = answerer.respond(data, None, 4096)
    message = decode(reply)
    assert outcome == FORMERR and message.id == 0xBEEF and message.rCode == dns.EFORMAT


def test_additional_records_that_run_off_the_end_get_formerr(answerer):
    data = query(b"web.default.svc.cluster.local", edns=1232)[:-3]
    outcome, _ = answerer.respond(data, None, 4096)
    assert outcome == FORMERR
    # A count that promises records that are not there.
    data = bytearray(query(b"web.default.svc.cluster.local"))
    data[11] = 3
    assert answerer.respond(bytes(data), None, 4096)[0] == FORMERR


def test_question_pointing_into_itself_gets_formerr(answerer):
    data = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x03web\xc0\x10\x00\x01\x00\x01"
    # The pointer targets offset 16, the pointer itself: a loop.
    assert answerer.respond(data, None, 4096)[0] == FORMERR


def test_every_query_is_counted(answerer):
    answerer.answer(query(b"web.default.svc.cluster.local"), None, 4096)
    answerer.answer(query(b"web.default.svc.cluster.local"), None, 4096)
    answerer.answer(query(b"example.com"), None, 4096)
    answerer.answer(b"junk", None, 4096)
    answerer.answer(b"\x00" * 12 + b"\xff", None, 4096)
    assert answerer.counts == {HIT: 2, FORWARDED: 1, DROPPED: 1, FORMERR: 1}


# -- fuzzing: never raises; drop, forward, or a decodable reply with the query's ID


def check_reply(answerer, data):
    for max_udp in (4096, None, 512):
        result = answerer.answer(data, "prod", max_udp)
        if result is None or result is DROP:
            continue
        assert isinstance(result, bytes) and len(data) >= 12
        assert result[:2] == data[:2]
        message = decode(result)
        assert message.answer == 1
        if max_udp is not None:
            assert len(result) <= max(max_udp, 512)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(answerer, data):
    check_reply(answerer, data)


VALID = [query(b"web.default.svc.cluster.local"),
         query(b"Big.default.svc.cluster.local", edns=1232, do=True),
         query(b"_http._tcp.web.default.svc.cluster.local", dns.SRV),
         query(b"web-1.cache.prod.pod.cluster.local", dns.AAAA, edns=512),
         query(b"frontend", dns.ALL_RECORDS),
         query(b"nope.default.svc.cluster.local")]


@settings(max_examples=1500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(VALID),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 200), append=st.binary(max_size=20))
def test_fuzz_mutated_queries(answerer, base, edits, cut, append):
    data = bytearray(base)
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    data = bytes(data[:max(cut, 12)] if cut < len(data) else data) + append
    check_reply(answerer, data)
