"""
Answers from the name table, as wire bytes: no sockets here.

Two paths. The hot one serves the common query (one question, class IN, A or
AAAA, at most a plain EDNS OPT) from responses encoded once and kept by
(lower-cased question, the rest of the query after the name, the header
words after the ID, the asker's namespace for a bare name, the UDP cap):
only the ID and the question's case differ between queries that share a key,
so a reply is the query's ID + the cached header + the query's own question +
the cached records. Answer records point (compression) at the question, so
they echo the asker's case for free. The general path reads the query with
L{contiv.dns.wire}, builds the reply with C{twisted.names.dns}, and fills the
hot cache when the query was a common one.

A query's key can only be found in the hot cache if the general path put it
there, and it does so only for queries it checked were common ones: so the
hot path needs no checks of its own beyond walking the name.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Optional, Union

from twisted.logger import Logger
from twisted.names import dns

from contiv.dns import wire
from contiv.dns.names import EMPTY, FORWARD, FOUND, NXDOMAIN, NameTable, Resolution

# Outcomes, also the "result" label of the query counter.
HIT = "hit"
NODATA = "nodata"
NXDOMAIN_ = "nxdomain"
FORWARDED = "forwarded"
TRUNCATED = "truncated"
FORMERR = "formerr"
NOTIMP = "notimp"
REFUSED = "refused"
DROPPED = "dropped"
OUTCOMES = (HIT, NODATA, NXDOMAIN_, FORWARDED, TRUNCATED, FORMERR, NOTIMP, REFUSED, DROPPED)

# What we advertise in our OPT, and the most a UDP reply may hold whatever the
# client advertises (larger datagrams fragment, and fragments get lost).
EDNS_PAYLOAD = 4096
MIN_UDP = 512
# No DNS message can be longer than TCP's 16-bit length prefix allows.
MAX_MESSAGE = 65535
HOT_TYPES = (wire.TYPE_A, wire.TYPE_AAAA)
BADVERS = 16


class Dropped:
    """The type of L{DROP}: say nothing (as opposed to None, forward the query)."""

    _instance: Optional["Dropped"] = None

    def __new__(cls) -> "Dropped":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DROP"

    def __bool__(self) -> bool:
        return False


DROP = Dropped()


class Reply(NamedTuple):
    """An outcome (one of L{OUTCOMES}) and the reply's bytes (None: forward or drop)."""

    outcome: str
    data: Optional[bytes]


_DROP_REPLY = Reply(DROPPED, None)
_FORWARD_REPLY = Reply(FORWARDED, None)


def _hot_key(query: bytes, client_namespace: Optional[str],
             max_udp: Optional[int]) -> Optional[tuple]:
    """The hot-cache key of C{query}, or None when its name has a pointer or is cut short."""
    i = 12
    labels = 0
    try:
        n = query[12]
        while n:
            if n > 63:
                return None
            i += n + 1
            labels += 1
            n = query[i]
    except IndexError:
        return None
    # query[i + 1:] is the type, class and anything after the question (the OPT);
    # query[2:12], the flags and the section counts.
    return (query[12:i].lower(), query[i + 1:], query[2:12],
            client_namespace if labels == 1 else None, max_udp)


class Answerer:
    """
    Replies for the names that C{table} decides; None for the others (forward them).

    C{counts}: queries by outcome, since creation.
    """

    log = Logger()

    def __init__(self, table: NameTable, ttl: int = 30, *, hot_cache_size: int = 200_000,
                 edns_payload: int = EDNS_PAYLOAD) -> None:
        self.ttl = ttl
        self.hot_cache_size = hot_cache_size
        self.edns_payload = edns_payload
        self.counts: Counter[str] = Counter()
        self._hot: dict[tuple, tuple[str, Optional[bytes], Optional[bytes]]] = {}
        self.table = table
        self.set_table(table)

    def set_table(self, table: NameTable) -> None:
        """Answer from C{table} from now on; every cached reply came from the old one."""
        self.table = table
        self._hot = {}
        domain = table.domain.encode("ascii", "replace")
        self._domain = domain
        self._serial = (table.generation or 1) & 0xFFFFFFFF

    @property
    def hot_entries(self) -> int:
        return len(self._hot)

    def answer(self, query: bytes, client_namespace: Optional[str],
               max_udp: Optional[int] = None) -> Union[bytes, None, Dropped]:
        """
        The reply to C{query}: bytes; None when the name is not ours (forward
        the query); L{DROP} when nothing should be sent (unreadable, or not a query).

        C{max_udp}: the query came over UDP and no reply may be longer (the
        client's own limit applies too); None: it came over TCP.
        """
        outcome, data = self.respond(query, client_namespace, max_udp)
        if data is not None:
            return data
        return DROP if outcome == DROPPED else None

    def respond(self, query: bytes, client_namespace: Optional[str],
                max_udp: Optional[int] = None) -> Reply:
        """Like L{answer}, with the outcome: what the server counts."""
        key = _hot_key(query, client_namespace, max_udp)
        if key is not None:
            cached = self._hot.get(key)
            if cached is not None:
                outcome, head, rest = cached
                self.counts[outcome] += 1
                if rest is None:
                    return _FORWARD_REPLY
                # query[12:len(key[0]) + 17]: the question as asked, same length as cached.
                return Reply(outcome, query[:2] + head + query[12:len(key[0]) + 17] + rest)
        try:
            reply = self._general(query, client_namespace, max_udp, key)
        except Exception:
            # A bug must not take the server down with one odd packet; FORMERR
            # is wrong but harmless, and the log says what happened.
            self.log.failure("cannot answer a {size}-byte query", size=len(query))
            reply = Reply(FORMERR, wire.error_response(query, wire.FORMERR)) \
                if len(query) >= wire.HEADER_SIZE else _DROP_REPLY
        self.counts[reply.outcome] += 1
        return reply

    # -- the general path

    def _general(self, query: bytes, client_namespace: Optional[str],
                 max_udp: Optional[int], key: Optional[tuple]) -> Reply:
        if len(query) < wire.HEADER_SIZE or len(query) > MAX_MESSAGE:
            return _DROP_REPLY
        ident, flags, qdcount, ancount, nscount, arcount = wire.read_header(query)
        if flags & wire.QR:
            # Never answer a response: two servers could bounce it forever.
            return _DROP_REPLY
        if flags & wire.OPCODE_MASK:
            return Reply(NOTIMP, wire.error_response(query, wire.NOTIMP))
        if qdcount != 1:
            # RFC 9619: a query has exactly one question.
            return Reply(FORMERR, wire.error_response(query, wire.FORMERR))
        try:
            question = wire.read_question(query)
            _, offset = wire.records(query, question.end, ancount + nscount)
            additional, offset = wire.records(query, offset, arcount)
        except wire.WireError:
            return Reply(FORMERR, wire.error_response(query, wire.FORMERR))
        opts = [rr for rr in additional if rr.rtype == wire.TYPE_OPT]
        if len(opts) > 1 or (opts and query[opts[0].start] != 0):
            return Reply(FORMERR, wire.error_response(query, wire.FORMERR))
        opt = opts[0] if opts else None
        if any(b"." in label for label in question.labels):
            # A label holding a dot cannot be one of our names, and twisted's
            # name encoder would split it.
            return _FORWARD_REPLY
        resolution = self.table.resolve(question.name, client_namespace)
        if resolution.outcome == FORWARD:
            if key is not None and self._common(query, question, ancount, nscount,
                                                additional, offset):
                self._remember(key, FORWARDED, None, None)
            return _FORWARD_REPLY

        message = self._message(ident, flags, question, opt)
        if opt is not None and (opt.ttl >> 16) & 0xFF != 0:
            # We speak EDNS version 0 only (RFC 6891 6.1.3).
            message.additional[0].ttl |= (BADVERS >> 4) << 24
            return Reply(FORMERR, message.toStr())
        if question.qclass not in (wire.CLASS_IN, wire.CLASS_ANY):
            message.rCode = wire.REFUSED
            return Reply(REFUSED, message.toStr())

        outcome = self._fill(message, question, resolution)
        data = message.toStr()
        limit = None
        if max_udp is not None:
            client = max(MIN_UDP, opt.rclass) if opt is not None else MIN_UDP
            limit = min(client, max_udp)
        if limit is not None and len(data) > limit:
            data = self._truncate(message, limit)
            outcome = TRUNCATED
        if key is not None and question.qtype in HOT_TYPES \
                and question.qclass == wire.CLASS_IN and data[4:6] == b"\x00\x01" \
                and self._common(query, question, ancount, nscount, additional, offset):
            self._remember(key, outcome, data[2:12], data[question.end:])
        return Reply(outcome, data)

    @staticmethod
    def _common(query: bytes, question: wire.Question, ancount: int, nscount: int,
                additional: list, offset: int) -> bool:
        """A query the hot path may serve: nothing but the question and a plain OPT."""
        if ancount or nscount or offset != len(query):
            return False
        if not additional:
            return True
        if len(additional) != 1:
            return False
        opt = additional[0]
        return opt.rtype == wire.TYPE_OPT and opt.end - opt.start == 11 \
            and (opt.ttl >> 16) & 0xFF == 0

    def _remember(self, key: tuple, outcome: str, head: Optional[bytes],
                  rest: Optional[bytes]) -> None:
        if len(self._hot) >= self.hot_cache_size:
            # Random names (typos, scans) would otherwise grow it without bound;
            # refilling costs one general-path answer per live name.
            self._hot.clear()
        self._hot[key] = (outcome, head, rest)

    def _message(self, ident: int, flags: int, question: wire.Question,
                 opt: Optional[wire.RR]) -> dns.Message:
        message = dns.Message(id=ident, answer=1, opCode=dns.OP_QUERY, auth=1,
                              recDes=1 if flags & wire.RD else 0, recAv=1, maxSize=0)
        message.checkingDisabled = 1 if flags & wire.CD else 0
        message.queries = [dns.Query(b".".join(question.labels), question.qtype,
                                     question.qclass)]
        if opt is not None:
            # RFC 3225: the DO bit is copied from the query.
            message.additional.append(dns.RRHeader(
                b"", dns.OPT, self.edns_payload, opt.ttl & 0x8000, dns.UnknownRecord(b"")))
        return message

    def _fill(self, message: dns.Message, question: wire.Question,
              resolution: Resolution) -> str:
        qname = b".".join(question.labels)
        qtype = question.qtype
        entry = resolution.entry
        answers: list[dns.RRHeader] = []
        extra: list[dns.RRHeader] = []
        if resolution.outcome == FOUND and entry is not None:
            if resolution.port is None:
                if qtype in (wire.TYPE_A, wire.TYPE_ANY):
                    answers += self._addresses(qname, entry.ipv4, dns.A, dns.Record_A)
                if qtype in (wire.TYPE_AAAA, wire.TYPE_ANY):
                    answers += self._addresses(qname, entry.ipv6, dns.AAAA, dns.Record_AAAA)
            elif qtype in (wire.TYPE_SRV, wire.TYPE_ANY):
                target = f"{entry.name}.{entry.namespace}.svc.{self.table.domain}".encode(
                    "ascii", "replace")
                answers.append(dns.RRHeader(qname, dns.SRV, dns.IN, self.ttl, dns.Record_SRV(
                    0, 100, resolution.port.port, target, ttl=self.ttl)))
                extra += self._addresses(target, entry.ipv4, dns.A, dns.Record_A)
                extra += self._addresses(target, entry.ipv6, dns.AAAA, dns.Record_AAAA)
        if answers:
            message.answers = answers
            # Before the OPT, which by convention comes last.
            message.additional[:0] = extra
            return HIT
        message.authority = [self._soa(qname)]
        if resolution.outcome == NXDOMAIN:
            message.rCode = dns.ENAME
            return NXDOMAIN_
        assert resolution.outcome in (FOUND, EMPTY), resolution
        return NODATA

    def _addresses(self, owner: bytes, addresses: tuple[str, ...], rtype: int,
                   record: type) -> list[dns.RRHeader]:
        return [dns.RRHeader(owner, rtype, dns.IN, self.ttl, record(a, ttl=self.ttl))
                for a in addresses]

    def _soa(self, qname: bytes) -> dns.RRHeader:
        # A bare name is answered as if it were its own zone: the SOA must own
        # (be a suffix of) the question for resolvers to cache the negative answer.
        lowered = qname.lower()
        in_domain = lowered == self._domain or lowered.endswith(b"." + self._domain)
        zone = self._domain if in_domain else qname
        return dns.RRHeader(zone, dns.SOA, dns.IN, self.ttl, dns.Record_SOA(
            mname=b"ns.dns." + self._domain, rname=b"hostmaster." + self._domain,
            serial=self._serial, refresh=7200, retry=1800, expire=86400, minimum=self.ttl,
            ttl=self.ttl))

    @staticmethod
    def _truncate(message: dns.Message, limit: int) -> bytes:
        """As many whole answers as fit in C{limit}, with TC set (RFC 2181 9)."""
        message.trunc = 1
        message.authority = []
        message.additional = [rr for rr in message.additional if rr.type == dns.OPT]
        answers = message.answers
        low, high = 0, len(answers)  # fits(low) holds; find the largest that does
        while low < high:
            middle = (low + high + 1) // 2
            message.answers = answers[:middle]
            if len(message.toStr()) <= limit:
                low = middle
            else:
                high = middle - 1
        message.answers = answers[:low]
        data = message.toStr()
        if len(data) > limit:
            # Even the question and OPT do not fit (a tiny max_udp): header alone.
            message.queries, message.additional = [], []
            data = message.toStr()
        return data
