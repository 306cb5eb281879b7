"""
Just enough of the DNS wire format (RFC 1035) to read queries and replies
without building objects: the header, names (with compression pointers),
questions and resource-record boundaries.

Every reader raises L{WireError} (and nothing else) on input it cannot
read, so that callers can turn any malformed packet into one outcome.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

HEADER = struct.Struct("!HHHHHH")
HEADER_SIZE = 12
TYPE_CLASS = struct.Struct("!HH")
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength

# Header flag bits (the second 16-bit word).
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
Z = 0x0040
AD = 0x0020
CD = 0x0010
RCODE_MASK = 0x000F

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_SRV, TYPE_OPT, TYPE_ANY = 1, 2, 6, 28, 33, 41, 255
CLASS_IN, CLASS_ANY = 1, 255

MAX_NAME = 255
# A name can hold at most 127 labels, so more jumps than that is a loop.
MAX_JUMPS = 128


class WireError(ValueError):
    """The bytes are not a DNS message we can read."""


class Question(NamedTuple):
    labels: tuple[bytes, ...]  # as asked, case kept
    qtype: int
    qclass: int
    end: int  # offset just past the question

    @property
    def name(self) -> str:
        # latin-1 maps every byte to one character, so no label can fail to decode
        # and the text round-trips to the same bytes.
        return ".".join(label.decode("latin-1") for label in self.labels)


class RR(NamedTuple):
    start: int
    rtype: int
    rclass: int
    ttl: int
    ttl_offset: int
    rdata_start: int
    end: int


def read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """The labels of the name at C{offset} and the offset just past it (not past a jump)."""
    labels = []
    end: Optional[int] = None
    length = 1
    jumps = 0
    position = offset
    size = len(data)
    while True:
        if position >= size:
            raise WireError("name runs past the end of the message")
        byte = data[position]
        if byte == 0:
            if end is None:
                end = position + 1
            return tuple(labels), end
        kind = byte & 0xC0
        if kind == 0xC0:
            if position + 1 >= size:
                raise WireError("compression pointer runs past the end of the message")
            target = ((byte & 0x3F) << 8) | data[position + 1]
            # Only backward pointers: a forward one or one to itself can loop.
            if target >= position:
                raise WireError("compression pointer does not point backwards")
            jumps += 1
            if jumps > MAX_JUMPS:
                raise WireError("too many compression pointers")
            if end is None:
                end = position + 2
            position = target
            continue
        if kind:
            raise WireError(f"unknown label type {byte:#x}")
        label = data[position + 1:position + 1 + byte]
        if len(label) != byte:
            raise WireError("label runs past the end of the message")
        length += byte + 1
        if length > MAX_NAME:
            raise WireError("name longer than 255 bytes")
        labels.append(label)
        position += byte + 1


def skip_name(data: bytes, offset: int) -> int:
    """The offset just past the name at C{offset}; pointers are not followed."""
    size = len(data)
    position = offset
    while True:
        if position >= size:
            raise WireError("name runs past the end of the message")
        byte = data[position]
        if byte == 0:
            return position + 1
        if byte & 0xC0 == 0xC0:
            if position + 2 > size:
                raise WireError("compression pointer runs past the end of the message")
            return position + 2
        if byte & 0xC0:
            raise WireError(f"unknown label type {byte:#x}")
        position += byte + 1
        if position - offset > MAX_NAME:
            raise WireError("name longer than 255 bytes")


def read_question(data: bytes, offset: int = HEADER_SIZE) -> Question:
    labels, end = read_name(data, offset)
    if end + 4 > len(data):
        raise WireError("question runs past the end of the message")
    qtype, qclass = TYPE_CLASS.unpack_from(data, end)
    return Question(labels, qtype, qclass, end + 4)


def read_rr(data: bytes, offset: int) -> RR:
    name_end = skip_name(data, offset)
    if name_end + 10 > len(data):
        raise WireError("record runs past the end of the message")
    rtype, rclass, ttl, rdlength = RR_FIXED.unpack_from(data, name_end)
    end = name_end + 10 + rdlength
    if end > len(data):
        raise WireError("record data runs past the end of the message")
    return RR(offset, rtype, rclass, ttl, name_end + 4, name_end + 10, end)


def read_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    if len(data) < HEADER_SIZE:
        raise WireError("shorter than a DNS header")
    return HEADER.unpack_from(data)


def records(data: bytes, offset: int, count: int) -> tuple[list[RR], int]:
    found = []
    for _ in range(count):
        rr = read_rr(data, offset)
        found.append(rr)
        offset = rr.end
    return found, offset


def question_key(data: bytes, question: Question, start: int = HEADER_SIZE) -> bytes:
    """The question's wire bytes with the name lower-cased: names compare case-insensitively.

    Only valid for a question without compression pointers (the usual case);
    otherwise the decoded labels are re-encoded.
    """
    name_end = question.end - 4
    if not _has_pointer(data, start, name_end):
        return data[start:name_end].lower() + data[name_end:question.end]
    return encode_name(question.labels).lower() + data[name_end:question.end]


def _has_pointer(data: bytes, start: int, end: int) -> bool:
    position = start
    while position < end:
        byte = data[position]
        if byte == 0:
            return False
        if byte & 0xC0:
            return True
        position += byte + 1
    return False


def encode_name(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def rcode_of(data: bytes) -> int:
    return data[3] & RCODE_MASK if len(data) >= 4 else -1


def error_response(data: bytes, rcode: int) -> bytes:
    """A bare header answering C{data} with C{rcode}; C{data} must hold a full header."""
    ident, flags = struct.unpack_from("!HH", data)
    flags = QR | (flags & (OPCODE_MASK | RD | CD)) | RA | rcode
    return HEADER.pack(ident, flags, 0, 0, 0, 0)
