"""
One OpenFlow 1.3 connection to a switch (OVS), as a Twisted protocol.

The controller side of the channel: HELLO with version negotiation (1.3 or a
clear error), FEATURES, echo keepalive in both directions, replies matched to
requests by xid, errors decoded to names, barriers, multipart flow-stats,
ONF bundles (the OpenFlow 1.3 spelling of atomic updates) and asynchronous
messages for a service connection (SET_ASYNC, packet-in).

Pipelining is the fast path: ``send``/``send_raw``/``add_to_bundle`` write and
return at once, with no Deferred per message. OVS handles one connection's
messages strictly in order and answers a barrier only after every reply and
error for the messages before it, so an error for a pipelined message is
recorded by xid and handed to the next ``barrier()`` (or ``errors_since``):
100k flow-mods and one barrier tell which of them failed.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Callable, Iterable, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from contiv.openflow.ofp import (DATAPATH, HEADER, HEADER_SIZE, OFP_VERSION, decode, encode,
                                 error_names, ofproto, ofproto_common, parser, set_xid)

__all__ = ["OpenFlowProtocol", "OpenFlowError", "PipelineError", "VersionMismatch",
           "HandshakeTimeout", "NotConnected", "BUNDLE_ATOMIC", "BUNDLE_ORDERED"]

BUNDLE_ATOMIC = ofproto.ONF_BF_ATOMIC
BUNDLE_ORDERED = ofproto.ONF_BF_ORDERED

_XID_MASK = 0xFFFFFFFF
_MAX_QUIET = 65536
_HELLO_ELEM = struct.Struct("!HH")
_ERROR_BODY = struct.Struct("!HH")
# experimenter id, exp_type, bundle_id, pad, flags: the ONF bundle-add header
# after the OpenFlow header (os-ken's OFP_EXPERIMENTER_HEADER + ONF_BUNDLE_ADD_MSG).
_BUNDLE_ADD = struct.Struct("!IIIHH")
_BUNDLE_ADD_SIZE = HEADER_SIZE + _BUNDLE_ADD.size

_T_HELLO = ofproto.OFPT_HELLO
_T_ERROR = ofproto.OFPT_ERROR
_T_ECHO_REQUEST = ofproto.OFPT_ECHO_REQUEST
_T_ECHO_REPLY = ofproto.OFPT_ECHO_REPLY
_T_EXPERIMENTER = ofproto.OFPT_EXPERIMENTER
_T_PACKET_IN = ofproto.OFPT_PACKET_IN
_T_MULTIPART_REPLY = ofproto.OFPT_MULTIPART_REPLY
_T_BARRIER_REPLY = ofproto.OFPT_BARRIER_REPLY
_REPLY_MORE = ofproto.OFPMPF_REPLY_MORE
_MULTIPART_FLAGS = struct.Struct("!HH")  # type, flags, right after the header

VERSION_NAMES = {1: "1.0", 2: "1.1", 3: "1.2", 4: "1.3", 5: "1.4", 6: "1.5", 7: "1.6"}


def _version_name(version: int) -> str:
    return f"OpenFlow {VERSION_NAMES.get(version, '?')} (0x{version:02x})"


_MSG_TYPE_NAMES = {value: name for name, value in reversed(list(vars(ofproto).items()))
                   if name.startswith("OFPT_") and isinstance(value, int)}


def _msg_type_name(msg_type: int) -> str:
    return _MSG_TYPE_NAMES.get(msg_type, f"OFPT_UNKNOWN_{msg_type}")


class OpenFlowError(Exception):
    """
    An OFPT_ERROR from the switch. ``data`` holds (at least the start of) the
    message that caused it; ``xid`` is that message's xid. For an experimenter
    error ``code`` is its exp_type.
    """

    def __init__(self, type_: int, code: int, type_name: str, code_name: str,
                 data: bytes = b"", xid: Optional[int] = None,
                 experimenter: Optional[int] = None) -> None:
        super().__init__(type_, code, type_name, code_name, data)
        self.type = type_
        self.code = code
        self.type_name = type_name
        self.code_name = code_name
        self.data = bytes(data)
        self.xid = xid
        self.experimenter = experimenter

    @classmethod
    def from_message(cls, msg: Any) -> "OpenFlowError":
        experimenter = getattr(msg, "experimenter", None)
        code = msg.exp_type if msg.type == ofproto.OFPET_EXPERIMENTER else msg.code
        type_name, code_name = error_names(msg.type, code, experimenter)
        return cls(msg.type, code, type_name, code_name, msg.data or b"", msg.xid,
                   experimenter)

    @property
    def request_type_name(self) -> Optional[str]:
        """The OFPT_ name of the message that was rejected, when data holds its header."""
        if len(self.data) < HEADER_SIZE:
            return None
        return _msg_type_name(self.data[1])

    def __str__(self) -> str:
        about = f" to {self.request_type_name}" if self.request_type_name else ""
        return (f"{self.type_name}/{self.code_name} (type {self.type}, code {self.code})"
                f"{about}, xid {self.xid}")


class PipelineError(OpenFlowError):
    """
    Errors for pipelined messages, reported by the barrier or bundle commit
    that followed them. Reads as its first error; ``errors`` holds them all in
    the order the switch sent them.
    """

    def __init__(self, errors: list[OpenFlowError], what: str = "pipelined messages") -> None:
        first = errors[0]
        super().__init__(first.type, first.code, first.type_name, first.code_name, first.data,
                         first.xid, first.experimenter)
        self.errors = list(errors)
        self.what = what

    def __str__(self) -> str:
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        return f"{len(self.errors)} error(s) for {self.what}: {self.errors[0]}{more}"


class VersionMismatch(Exception):
    """The switch cannot speak OpenFlow 1.3."""

    def __init__(self, offered: list[int]) -> None:
        self.offered = list(offered)
        names = ", ".join(_version_name(v) for v in self.offered) or "nothing"
        super().__init__(f"OpenFlow 1.3 (0x04) is required; the switch offered {names}")


class HandshakeTimeout(Exception):
    """No HELLO or FEATURES reply in time."""


class NotConnected(ConnectionLost):
    """The connection is not (or no longer) up."""


class _Pending:
    __slots__ = ("deferred", "parts")

    def __init__(self, deferred: Deferred, multipart: bool) -> None:
        self.deferred = deferred
        self.parts: Optional[list] = [] if multipart else None


class _Bundle:
    __slots__ = ("flags", "first_xid")

    def __init__(self, flags: int, first_xid: int) -> None:
        self.flags = flags
        self.first_xid = first_xid


Message = Any  # an os-ken message object
Raw = Union[bytes, bytearray, memoryview]


class OpenFlowProtocol(Protocol):
    """
    The controller end of one OpenFlow 1.3 connection.

    ``handshake`` fires with the protocol itself once HELLO and FEATURES are
    done (``version``, ``datapath_id``, ``features`` are then set), or fails
    with ``VersionMismatch``, ``HandshakeTimeout``, ``OpenFlowError`` or
    ``ConnectionLost``.
    """

    log = Logger()

    def __init__(self, clock: Any, *, echo_interval: float = 5.0, echo_timeout: float = 15.0,
                 abort_grace: float = 5.0,
                 on_packet_in: Optional[Callable[[Message], Any]] = None,
                 on_disconnect: Optional[Callable[[Failure], Any]] = None,
                 max_recorded_errors: int = 100_000) -> None:
        self.clock = clock
        self.echo_interval = echo_interval
        self.echo_timeout = echo_timeout
        self.abort_grace = abort_grace
        self.on_packet_in = on_packet_in
        self.on_disconnect = on_disconnect
        self.version: Optional[int] = None
        self.datapath_id: Optional[int] = None
        self.features: Optional[Message] = None
        self.connected = False
        self.peer = "?"
        self.errors_dropped = 0
        self.quiet_errors = 0
        self._buffer = bytearray()
        self._xid = 0
        self._pending: dict[int, _Pending] = {}
        # Errors for messages that had no Deferred, in arrival order (which is
        # xid order: the switch handles a connection's messages in order).
        self._errors: deque[OpenFlowError] = deque(maxlen=max_recorded_errors)
        self._bundles: dict[int, _Bundle] = {}
        # xids of send_quiet() messages whose error may still come, oldest first.
        self._quiet: dict[int, None] = {}
        self._bundle_id = 0
        self._last_received = 0.0
        self._echo_sent: Optional[float] = None
        self._timer: Any = None
        self._abort_call: Any = None
        self._ready = False
        self._handshake_failure: Optional[Failure] = None
        self._ready_waiters: list[Deferred] = []
        self._closed = False
        self._closed_waiters: list[Deferred] = []
        self._hello_seen = False

    # -- connection lifecycle -------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.peer = str(self.transport.getPeer())
        self._last_received = self.clock.seconds()
        self._write(self._hello_bytes(self.next_xid()))
        # The keepalive timer stands in for a handshake timer until FEATURES
        # is answered: a switch that never says HELLO is as dead as one that
        # stops answering echoes.
        self._timer = self.clock.callLater(self.echo_timeout, self._handshake_timed_out)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[override]
        self.connected = False
        self._ready = False
        for call in (self._timer, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._abort_call = None
        lost = NotConnected(f"OpenFlow connection to {self.peer} lost"
                            + (f": {reason.getErrorMessage()}" if reason is not None else ""))
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.deferred.errback(Failure(lost))
        self._bundles.clear()
        self._handshake_finished(Failure(lost))
        self._closed = True
        closed, self._closed_waiters = self._closed_waiters, []
        for waiter in closed:
            waiter.callback(None)
        self.log.info("OpenFlow connection to {peer} closed: {reason}", peer=self.peer,
                      reason=reason.getErrorMessage() if reason is not None else "closed")
        if self.on_disconnect is not None:
            try:
                self.on_disconnect(reason)
            except Exception:
                self.log.failure("on_disconnect callback for {peer} failed", peer=self.peer)

    def drop(self, why: str) -> None:
        """Close the connection; abort it if it has not closed after abort_grace."""
        if not self.connected or self.transport is None:
            return
        self.log.warn("dropping OpenFlow connection to {peer}: {why}", peer=self.peer, why=why)
        self.transport.loseConnection()
        # loseConnection waits for the write buffer to drain, which a dead peer
        # never lets happen.
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(self.abort_grace, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if self.connected and self.transport is not None:
            self.transport.abortConnection()

    # -- framing and dispatch -------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.clock.seconds()
        if self._echo_sent is not None:
            # Any message is proof of life, not only an echo reply (which may
            # queue behind a large multipart answer); the timer, set for the
            # echo's deadline, goes back to counting idle time.
            self._echo_sent = None
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
                self._arm_keepalive()
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        offset = 0
        unpack = HEADER.unpack_from
        while size - offset >= HEADER_SIZE:
            version, msg_type, length, xid = unpack(buffer, offset)
            if length < HEADER_SIZE:
                del buffer[:]
                self.drop(f"message with impossible length {length}")
                return
            if size - offset < length:
                break
            message = bytes(buffer[offset:offset + length])
            offset += length
            try:
                self._dispatch(version, msg_type, xid, message)
            except Exception:
                self.log.failure("handling OpenFlow message type {msg_type} xid {xid} from "
                                 "{peer} failed", msg_type=msg_type, xid=xid, peer=self.peer)
            if not self.connected:
                break
        # One deletion per read, not one per message: large multipart replies
        # arrive as many messages in one read.
        del buffer[:offset]

    def _dispatch(self, version: int, msg_type: int, xid: int, message: bytes) -> None:
        if not self._hello_seen:
            if msg_type != _T_HELLO:
                self._fail_handshake(
                    HandshakeTimeout(f"expected HELLO, got message type {msg_type}"))
                return
            self._hello_seen = True
            self._negotiate(version, message)
            return
        if version != OFP_VERSION:
            self.log.warn("ignoring a version 0x{version:02x} message from {peer}",
                          version=version, peer=self.peer)
            return
        if msg_type == _T_ECHO_REQUEST:
            self._write(HEADER.pack(OFP_VERSION, _T_ECHO_REPLY, len(message), xid)
                        + message[HEADER_SIZE:])
        elif msg_type == _T_ECHO_REPLY:
            # dataReceived already counted it as life; only a request() waits for it.
            entry = self._pending.pop(xid, None)
            if entry is not None:
                entry.deferred.callback(decode(message))
        elif msg_type == _T_ERROR:
            self._error(decode(message))
        elif msg_type == _T_MULTIPART_REPLY:
            self._multipart_reply(xid, message)
        elif msg_type == _T_BARRIER_REPLY:
            self._barrier_reply(xid)
        elif msg_type == _T_PACKET_IN:
            self._packet_in(decode(message))
        else:
            entry = self._pending.pop(xid, None)
            if entry is not None:
                entry.deferred.callback(decode(message))
            else:
                self.log.debug("unsolicited OpenFlow message type {msg_type} xid {xid} from "
                               "{peer}", msg_type=msg_type, xid=xid, peer=self.peer)

    def _error(self, msg: Message) -> None:
        error = OpenFlowError.from_message(msg)
        entry = self._pending.pop(msg.xid, None)
        if entry is not None:
            entry.deferred.errback(Failure(error))
        elif self._quiet.pop(msg.xid, 0) is None:
            self.quiet_errors += 1
            self.log.debug("OpenFlow error from {peer} for a quiet message: {error}",
                           peer=self.peer, error=error)
        elif not self._ready and msg.type == ofproto.OFPET_HELLO_FAILED:
            self._fail_handshake(error)
        else:
            if len(self._errors) == self._errors.maxlen:
                self.errors_dropped += 1
                if self.errors_dropped == 1:
                    self.log.error("more than {limit} OpenFlow errors from {peer} not "
                                   "collected by a barrier: dropping the oldest",
                                   limit=self._errors.maxlen, peer=self.peer)
            self._errors.append(error)

    def _multipart_reply(self, xid: int, message: bytes) -> None:
        entry = self._pending.get(xid)
        if entry is None:
            self.log.debug("multipart reply xid {xid} from {peer} matches no request",
                           xid=xid, peer=self.peer)
            return
        part = decode(message)
        _, flags = _MULTIPART_FLAGS.unpack_from(message, HEADER_SIZE)
        if entry.parts is None:  # a multipart reply to request() of a non-multipart message
            entry.parts = []
        entry.parts.append(part)
        if not flags & _REPLY_MORE:
            del self._pending[xid]
            entry.deferred.callback(entry.parts)

    def _barrier_reply(self, xid: int) -> None:
        entry = self._pending.pop(xid, None)
        # Every request sent before the barrier has had its reply or error by
        # now; those still pending were messages the switch does not answer
        # (a flow-mod sent with request()), acknowledged by this barrier.
        earlier = []
        for pending_xid in self._pending:
            if self._age(pending_xid) > self._age(xid):
                earlier.append(pending_xid)
        for pending_xid in earlier:
            self._pending.pop(pending_xid).deferred.callback(None)
        if entry is not None:
            entry.deferred.callback(xid)
        else:
            self.log.debug("barrier reply xid {xid} from {peer} matches no request", xid=xid,
                           peer=self.peer)

    def _packet_in(self, msg: Message) -> None:
        if self.on_packet_in is None:
            self.log.debug("packet-in from {peer} with no handler", peer=self.peer)
            return
        try:
            self.on_packet_in(msg)
        except Exception:
            self.log.failure("packet-in handler for {peer} failed", peer=self.peer)

    # -- handshake ------------------------------------------------------------

    @staticmethod
    def _hello_bytes(xid: int) -> bytes:
        bitmap = struct.pack("!I", 1 << OFP_VERSION)
        element = _HELLO_ELEM.pack(ofproto.OFPHET_VERSIONBITMAP,
                                   _HELLO_ELEM.size + len(bitmap)) + bitmap
        return HEADER.pack(OFP_VERSION, _T_HELLO, HEADER_SIZE + len(element), xid) + element

    @staticmethod
    def _offered_versions(version: int, message: bytes) -> tuple[list[int], bool]:
        """The versions a HELLO offers, and whether it said so with a bitmap."""
        offset = HEADER_SIZE
        while offset + _HELLO_ELEM.size <= len(message):
            elem_type, elem_len = _HELLO_ELEM.unpack_from(message, offset)
            if elem_len < _HELLO_ELEM.size:
                break
            if elem_type == ofproto.OFPHET_VERSIONBITMAP:
                versions = []
                for index in range((elem_len - _HELLO_ELEM.size) // 4):
                    (bits,) = struct.unpack_from("!I", message,
                                                 offset + _HELLO_ELEM.size + 4 * index)
                    versions.extend(32 * index + bit for bit in range(32) if bits >> bit & 1)
                return versions, True
            offset += (elem_len + 7) // 8 * 8
        return [version], False

    def _negotiate(self, version: int, message: bytes) -> None:
        offered, bitmap = self._offered_versions(version, message)
        # Without a bitmap a peer speaks every version up to its header's.
        if OFP_VERSION in offered or (not bitmap and version >= OFP_VERSION):
            self.version = OFP_VERSION
            self.log.debug("OpenFlow 1.3 agreed with {peer}", peer=self.peer)
            Deferred.fromCoroutine(self._features())
            return
        error = VersionMismatch(offered)
        text = str(error).encode("ascii", "replace")
        body = _ERROR_BODY.pack(ofproto.OFPET_HELLO_FAILED, ofproto.OFPHFC_INCOMPATIBLE) + text
        # In the peer's own version, so that it can read why.
        self._write(HEADER.pack(version, _T_ERROR, HEADER_SIZE + len(body), 0) + body)
        self._fail_handshake(error)

    async def _features(self) -> None:
        try:
            features = await self.request(parser.OFPFeaturesRequest(DATAPATH))
        except Exception as e:
            self._fail_handshake(e)
            return
        self.features = features
        self.datapath_id = features.datapath_id
        self._ready = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._last_received = self.clock.seconds()
        self._arm_keepalive()
        self.log.info("OpenFlow 1.3 connection to {peer} ready: datapath {datapath_id:016x}, "
                      "{n_tables} tables", peer=self.peer, datapath_id=self.datapath_id,
                      n_tables=features.n_tables)
        self._handshake_finished(self)

    def _fail_handshake(self, error: Exception) -> None:
        self._handshake_finished(Failure(error))
        self.drop(f"handshake failed: {error}")

    def _handshake_finished(self, result: Union["OpenFlowProtocol", Failure]) -> None:
        if isinstance(result, Failure) and self._handshake_failure is None:
            # Also after a good handshake: a lost connection is not ready.
            self._handshake_failure = result
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @property
    def handshake(self) -> Deferred:
        """
        Fires with this protocol once HELLO and FEATURES are done, or fails
        (VersionMismatch, HandshakeTimeout, OpenFlowError, ConnectionLost). A
        new Deferred at every access, so that each waiter gets the result
        and a failure nobody waits for is not reported as unhandled.
        """
        return self.when_ready()

    def when_closed(self) -> Deferred:
        """Fires (with None) once the connection is closed."""
        if self._closed:
            return succeed(None)
        d = Deferred()
        self._closed_waiters.append(d)
        return d

    def when_ready(self) -> Deferred:
        """The same as ``handshake``."""
        if self._handshake_failure is not None:
            return fail(self._handshake_failure)
        if self._ready:
            return succeed(self)
        d = Deferred()
        self._ready_waiters.append(d)
        return d

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._fail_handshake(HandshakeTimeout(
            f"no OpenFlow handshake with {self.peer} within {self.echo_timeout} s"))

    # -- keepalive ------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if self._echo_sent is not None:
            deadline = self._echo_sent + self.echo_timeout
        else:
            deadline = self._last_received + self.echo_interval
        self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()),
                                           self._keepalive)

    def _keepalive(self) -> None:
        self._timer = None
        if not self.connected:
            return
        now = self.clock.seconds()
        if self._echo_sent is not None:
            if now - self._echo_sent >= self.echo_timeout:
                self.drop(f"no echo reply within {self.echo_timeout} s")
                return
        elif now - self._last_received >= self.echo_interval:
            self._write(HEADER.pack(OFP_VERSION, _T_ECHO_REQUEST, HEADER_SIZE,
                                    self.next_xid()))
            self._echo_sent = now
        self._arm_keepalive()

    # -- sending --------------------------------------------------------------

    def next_xid(self) -> int:
        """A fresh xid, for a message the caller encodes itself (send_raw)."""
        self._xid = (self._xid + 1) & _XID_MASK
        return self._xid

    def _age(self, xid: int) -> int:
        """How many xids ago xid was handed out; wraps around at 2**32."""
        return (self._xid - xid) & _XID_MASK

    def _write(self, data: Raw) -> None:
        self.transport.write(data)

    def _check_connected(self) -> None:
        if not self.connected:
            raise NotConnected(f"OpenFlow connection to {self.peer} is not up")

    def send(self, msg: Message) -> int:
        """Write one message without waiting for anything; returns its xid."""
        self._check_connected()
        xid = self.next_xid()
        self._write(encode(msg, xid))
        return xid

    def send_quiet(self, msg: Message) -> int:
        """
        Write one message whose error, if any, is counted (C{quiet_errors})
        and logged but never reported by a barrier: packet-outs, sent while
        bundles are open, must not fail an unrelated change.
        """
        xid = self.send(msg)
        quiet = self._quiet
        quiet[xid] = None
        # Bounded: the switch answers in order and fast, so an xid this old
        # has had its error, if it was to have one (then it is recorded).
        if len(quiet) > _MAX_QUIET:
            del quiet[next(iter(quiet))]
        return xid

    def send_many(self, msgs: Iterable[Message]) -> Optional[int]:
        """Write messages in one chunk with consecutive xids; returns the first xid."""
        self._check_connected()
        first = None
        chunks = []
        for msg in msgs:
            xid = self.next_xid()
            if first is None:
                first = xid
            chunks.append(encode(msg, xid))
        if chunks:
            self.transport.writeSequence(chunks)
        return first

    def send_raw(self, data: Union[Raw, Iterable[Raw]]) -> None:
        """
        Write pre-encoded messages: bytes (one or more whole messages) or an
        iterable of them, written as one sequence. Their xids are the caller's
        (from next_xid()), so that errors can be matched to them.
        """
        self._check_connected()
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._write(data)
        else:
            self.transport.writeSequence(list(data))

    def request(self, msg: Message) -> Deferred:
        """
        Send a message and fire with its reply (for a multipart request: the
        list of reply parts), or fail with OpenFlowError. A message the switch
        never answers (a flow-mod) fires with None at the next barrier reply.
        """
        if not self.connected:
            return fail(NotConnected(f"OpenFlow connection to {self.peer} is not up"))
        xid = self.next_xid()
        d = Deferred()
        self._pending[xid] = _Pending(d, isinstance(msg, parser.OFPMultipartRequest))
        self._write(encode(msg, xid))
        return d

    def errors_since(self, xid: int, before: Optional[int] = None) -> list[OpenFlowError]:
        """
        Take the recorded errors for messages from xid on (and before
        ``before``, when given) that had no Deferred. They are removed, so each
        is reported once.
        """
        return self._take_errors(xid, before)

    def _take_errors(self, since: Optional[int], before: Optional[int]) -> list[OpenFlowError]:
        if not self._errors:
            return []
        window = self._age(since) if since is not None else _XID_MASK
        limit = self._age(before) if before is not None else -1
        taken, kept = [], []
        for error in self._errors:
            age = self._age(error.xid)
            (taken if limit < age <= window else kept).append(error)
        if taken:
            self._errors = deque(kept, maxlen=self._errors.maxlen)
        return taken

    def barrier(self, since: Optional[int] = None) -> Deferred:
        """
        Fire (with the barrier's xid) once the switch has handled everything
        sent before, or fail with PipelineError holding the errors for earlier
        pipelined messages: those from xid ``since`` on, or every one not yet
        taken.
        """
        if not self.connected:
            return fail(NotConnected(f"OpenFlow connection to {self.peer} is not up"))
        d = self.request(parser.OFPBarrierRequest(DATAPATH))

        def check(xid: int) -> int:
            errors = self._take_errors(since, before=xid)
            if errors:
                raise PipelineError(errors, f"messages before barrier xid {xid}")
            return xid
        return d.addCallback(check)

    # -- multipart ------------------------------------------------------------

    def flow_stats(self, table_id: int = ofproto.OFPTT_ALL, cookie: int = 0,
                   cookie_mask: int = 0, match: Optional[Message] = None) -> Deferred:
        """Every flow (of a table, of a cookie) as os-ken OFPFlowStats, all parts collected."""
        msg = parser.OFPFlowStatsRequest(DATAPATH, 0, table_id, ofproto.OFPP_ANY,
                                         ofproto.OFPG_ANY, cookie, cookie_mask,
                                         match if match is not None else parser.OFPMatch())
        return self.request(msg).addCallback(
            lambda parts: [stats for part in parts for stats in part.body])

    # -- asynchronous messages ------------------------------------------------

    def set_async(self, packet_in_mask: int = (1 << ofproto.OFPR_NO_MATCH
                                               | 1 << ofproto.OFPR_ACTION),
                  port_status_mask: int = 0, flow_removed_mask: int = 0) -> Deferred:
        """
        Ask for asynchronous messages (as master/equal; nothing as slave). A
        connection to OVS's .mgmt socket gets none until it does. Fires once a
        barrier confirms it.
        """
        try:
            xid = self.send(parser.OFPSetAsync(DATAPATH, [packet_in_mask, 0],
                                               [port_status_mask, 0],
                                               [flow_removed_mask, 0]))
        except NotConnected as e:
            return fail(e)
        return self.barrier(since=xid)

    # -- bundles (ONF extension 230 for OpenFlow 1.3) -------------------------

    def _bundle_ctrl(self, bundle_id: int, type_: int, flags: int) -> Deferred:
        return self.request(parser.ONFBundleCtrlMsg(DATAPATH, bundle_id, type_, flags, []))

    def open_bundle(self, flags: int = BUNDLE_ATOMIC | BUNDLE_ORDERED) -> Deferred:
        """Open a bundle; fires with its id."""
        if not self.connected:
            return fail(NotConnected(f"OpenFlow connection to {self.peer} is not up"))
        self._bundle_id = (self._bundle_id + 1) & _XID_MASK
        bundle_id = self._bundle_id
        self._bundles[bundle_id] = _Bundle(flags, (self._xid + 1) & _XID_MASK)
        d = self._bundle_ctrl(bundle_id, ofproto.ONF_BCT_OPEN_REQUEST, flags)

        def opened(reply: Message) -> int:
            if getattr(reply, "type", None) != ofproto.ONF_BCT_OPEN_REPLY:
                raise OpenFlowError(ofproto.OFPET_EXPERIMENTER, ofproto.ONFERR_ET_BAD_TYPE,
                                    "OFPET_EXPERIMENTER", "unexpected reply to bundle open",
                                    xid=getattr(reply, "xid", None))
            return bundle_id

        def failed(failure: Failure) -> Failure:
            self._bundles.pop(bundle_id, None)
            return failure
        return d.addCallbacks(opened, failed)

    def add_to_bundle(self, bundle_id: int, msg: Union[Message, Raw]) -> int:
        """
        Add one message (an os-ken message, or its encoding whose xid is
        replaced) to an open bundle, without waiting; returns the xid that the
        switch's error for it would carry.
        """
        self._check_connected()
        bundle = self._bundles.get(bundle_id)
        if bundle is None:
            raise KeyError(f"bundle {bundle_id} is not open on this connection")
        xid = self.next_xid()
        # The inner message must carry the outer xid (bundle extension 3.3).
        inner = set_xid(bytes(msg), xid) if isinstance(msg, (bytes, bytearray, memoryview)) \
            else encode(msg, xid)
        self._write(HEADER.pack(OFP_VERSION, _T_EXPERIMENTER, _BUNDLE_ADD_SIZE + len(inner), xid)
                    + _BUNDLE_ADD.pack(ofproto_common.ONF_EXPERIMENTER_ID,
                                       ofproto.ONF_ET_BUNDLE_ADD_MESSAGE, bundle_id, 0,
                                       bundle.flags)
                    + inner)
        return xid

    def add_many_to_bundle(self, bundle_id: int, encoded: Iterable[Raw]) -> Optional[int]:
        """
        Add pre-encoded messages to an open bundle in one write, each with a
        fresh xid; returns the first xid. A change of 300,000 flows is one
        write of a few tens of megabytes, not 300,000 small ones.
        """
        self._check_connected()
        bundle = self._bundles.get(bundle_id)
        if bundle is None:
            raise KeyError(f"bundle {bundle_id} is not open on this connection")
        first = None
        chunks = []
        add_header = _BUNDLE_ADD.pack(ofproto_common.ONF_EXPERIMENTER_ID,
                                      ofproto.ONF_ET_BUNDLE_ADD_MESSAGE, bundle_id, 0,
                                      bundle.flags)
        outer = HEADER.pack
        for inner in encoded:
            xid = self.next_xid()
            if first is None:
                first = xid
            # The inner message carries the outer xid (bundle extension 3.3).
            chunks.append(outer(OFP_VERSION, _T_EXPERIMENTER, _BUNDLE_ADD_SIZE + len(inner),
                                xid) + add_header + set_xid(inner, xid))
        if chunks:
            self.transport.writeSequence(chunks)
        return first

    def commit_bundle(self, bundle_id: int, flags: Optional[int] = None) -> Deferred:
        """
        Commit a bundle (with the flags it was opened with, by default). Fails
        with PipelineError when any message added to it was rejected (then the
        bundle is discarded, not committed, so nothing of it applies) or the
        commit itself failed (its error comes last in ``errors``).
        """
        return Deferred.fromCoroutine(self._commit_bundle(bundle_id, flags))

    async def _commit_bundle(self, bundle_id: int, flags: Optional[int]) -> None:
        bundle = self._bundles.pop(bundle_id, None)
        if bundle is None:
            raise KeyError(f"bundle {bundle_id} is not open on this connection")
        flags = bundle.flags if flags is None else flags
        # A message that OVS rejects when it is added is left out of the bundle,
        # and the commit would then apply the rest: the barrier brings those
        # errors in first, so a bundle is all or nothing from here too.
        try:
            await self.barrier(since=bundle.first_xid)
        except PipelineError as e:
            try:
                await self._bundle_ctrl(bundle_id, ofproto.ONF_BCT_DISCARD_REQUEST, flags)
            except OpenFlowError as discard_error:
                self.log.debug("discarding bundle {bundle_id} after rejected messages: "
                               "{error}", bundle_id=bundle_id, error=discard_error)
            raise PipelineError(e.errors, f"bundle {bundle_id}, not committed")
        commit_xid = (self._xid + 1) & _XID_MASK
        try:
            await self._bundle_ctrl(bundle_id, ofproto.ONF_BCT_COMMIT_REQUEST, flags)
        except OpenFlowError as e:
            # OVS reports the message that failed at commit time with its own
            # xid before the commit's error.
            causes = self.errors_since(bundle.first_xid, before=commit_xid)
            raise PipelineError([*causes, e], f"bundle {bundle_id}, commit failed")

    def discard_bundle(self, bundle_id: int) -> Deferred:
        """Throw an open bundle away."""
        bundle = self._bundles.pop(bundle_id, None)
        flags = bundle.flags if bundle is not None else BUNDLE_ATOMIC | BUNDLE_ORDERED
        return self._bundle_ctrl(bundle_id, ofproto.ONF_BCT_DISCARD_REQUEST, flags) \
            .addCallback(lambda _: None)
