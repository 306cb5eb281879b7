"""
A Kubernetes API client on treq: paginated LIST and streaming WATCH.

It knows the wire protocol and nothing about what the objects mean: LIST
returns one decoded page, WATCH hands every complete line of the chunked
stream to a callback. The callback may return a Deferred, and while that
Deferred waits (the event stream is full) the connection is paused, so a
slow consumer makes the server wait instead of making this process buffer.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

import treq
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .apiconfig import ApiConfig

USER_AGENT = b"contiv-netmaster"

# One event is one object; the largest Kubernetes objects are about 1.5 MB
# (etcd's limit). A line longer than this is not an event but a broken stream.
MAX_LINE = 16 * 1024 * 1024


class ApiError(Exception):
    """The API server answered with an error status (HTTP or a watch ERROR event)."""

    def __init__(self, code: int, reason: str = "", message: str = "", path: str = ""):
        self.code = code
        self.reason = reason
        self.message = message
        self.path = path
        super().__init__(f"{path}: HTTP {code} {reason}: {message}".strip())

    @property
    def gone(self) -> bool:
        """The resourceVersion (or continue token) is older than the server keeps."""
        return self.code == 410

    @classmethod
    def from_status(cls, status: Any, code: int, path: str) -> "ApiError":
        if isinstance(status, dict) and status.get("kind") == "Status":
            return cls(int(status.get("code") or code), str(status.get("reason") or ""),
                       str(status.get("message") or ""), path)
        return cls(code, "", "", path)


class WatchIdle(Exception):
    """The watch sent nothing, not even a bookmark, for longer than allowed."""


class LineTooLong(Exception):
    """The stream sent more than L{MAX_LINE} bytes without a newline."""


class LineDecoder:
    """
    Splits a chunked byte stream into newline-terminated lines. A line may
    arrive in any number of pieces and one piece may hold many lines; a piece
    without a newline is kept as a fragment instead of being joined to the
    buffer each time, so a large event in small pieces costs linear time.
    """

    def __init__(self, max_line: int = MAX_LINE):
        self._max_line = max_line
        self._fragments: List[bytes] = []
        self._pending = 0

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back."""
        return self._pending

    def feed(self, data: bytes) -> List[bytes]:
        if b"\n" not in data:
            if data:
                self._fragments.append(data)
                self._pending += len(data)
                if self._pending > self._max_line:
                    raise LineTooLong(f"{self._pending} bytes without a newline")
            return []
        if self._fragments:
            self._fragments.append(data)
            data = b"".join(self._fragments)
            self._fragments = []
        lines = data.split(b"\n")
        rest = lines.pop()
        if rest:
            self._fragments.append(rest)
        self._pending = len(rest)
        if self._pending > self._max_line:
            raise LineTooLong(f"{self._pending} bytes without a newline")
        return [line for line in lines if line.strip()]


class _WatchBody(Protocol):
    """
    Receives a watch response body and feeds its lines, one at a time, to
    C{on_line}. Pauses the connection while C{on_line}'s Deferred waits; the
    idle timer only runs while we are reading, as a paused stream is our
    doing and not the server's.
    """

    def __init__(self, on_line: Callable[[bytes], Optional[Deferred]], clock: Any,
                 idle_timeout: Optional[float]):
        self._on_line = on_line
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._decoder = LineDecoder()
        self._lines: Deque[bytes] = deque()
        self._waiting = False
        self._lost: Optional[Failure] = None
        self._idle_call = None
        self.lines_seen = 0
        self.finished: Deferred = Deferred(self._cancel)
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._arm_idle()
        try:
            self._lines.extend(self._decoder.feed(data))
        except LineTooLong as error:
            self._abort(error)
            return
        self._drain()

    def _drain(self) -> None:
        while self._lines and not self._waiting and not self.finished.called:
            line = self._lines.popleft()
            self.lines_seen += 1
            try:
                waiting = self._on_line(line)
            except Exception as error:
                self._abort(error)
                return
            if waiting is not None and not waiting.called:
                self._waiting = True
                self._disarm_idle()
                if self._lost is None:
                    self.transport.pauseProducing()
                waiting.addCallbacks(self._resume, self._consumer_failed)
                return
        if self._lost is not None and not self._lines:
            self._finish()

    def _resume(self, _: Any) -> None:
        self._waiting = False
        if self.finished.called:
            return
        if self._lost is None:
            self._arm_idle()
            self.transport.resumeProducing()
        self._drain()

    def _consumer_failed(self, failure: Failure) -> None:
        self._waiting = False
        if not self.finished.called:
            self._abort(failure.value)

    def connectionLost(self, reason: Failure = None) -> None:
        self._disarm_idle()
        # Lines that arrived complete before the end are real events; the
        # consumer gets them before it hears that the stream ended.
        self._lost = reason
        if not self._waiting:
            self._drain()
        if not self.closed.called:
            self.closed.callback(None)

    def _finish(self) -> None:
        if self.finished.called:
            return
        reason = self._lost
        if reason is None or reason.check(ResponseDone):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def _abort(self, error: BaseException) -> None:
        self._disarm_idle()
        if not self.finished.called:
            self.finished.errback(Failure(error))
        self.close()

    def close(self) -> None:
        if self._lost is None and self.transport is not None:
            # Closes the TCP connection under the HTTP response.
            self.transport.stopProducing()

    def _cancel(self, _: Deferred) -> None:
        self._disarm_idle()
        self.close()

    def _arm_idle(self) -> None:
        if self._idle_timeout is None:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout)
        else:
            self._idle_call = self._clock.callLater(self._idle_timeout, self._idle)

    def _disarm_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle(self) -> None:
        self._idle_call = None
        self._abort(WatchIdle(f"nothing received for {self._idle_timeout} seconds"))


@implementer(IPolicyForHTTPS)
class _ApiTLSPolicy:
    """Trust exactly the configured CA (or the platform's) and present our client certificate."""

    def __init__(self, config: ApiConfig):
        self._config = config
        self._trust = None
        if config.ca_pem:
            certificates = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(config.ca_pem)]
            self._trust = ssl.trustRootFromCertificates(certificates)
        self._client_certificate = None
        if config.client_cert_pem and config.client_key_pem:
            self._client_certificate = ssl.PrivateCertificate.loadPEM(
                config.client_cert_pem + b"\n" + config.client_key_pem)

    def creatorForNetloc(self, hostname: bytes, port: int):
        name = self._config.tls_server_name or hostname.decode("ascii")
        if not self._config.verify_tls:
            return _UnverifiedTLS(self._client_certificate)
        extra = {}
        if self._client_certificate is not None:
            extra["clientCertificate"] = self._client_certificate
        return ssl.optionsForClientTLS(
            name, trustRoot=self._trust or ssl.platformTrust(), **extra)


class _UnverifiedTLS:
    """C{insecure-skip-tls-verify: true}: encryption without authentication, as kubectl does."""

    def __init__(self, client_certificate: Any):
        options = ssl.CertificateOptions(
            verify=False,
            **({"certificate": client_certificate.original,
                "privateKey": client_certificate.privateKey.original}
               if client_certificate is not None else {}))
        self._context = options.getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


def _pem_blocks(pem: bytes) -> List[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block.strip() + b"\n" + marker + b"\n"
            for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


Params = Sequence[Tuple[str, str]]


class ApiClient:
    """
    LIST and WATCH against one API server. C{reactor} supplies both the
    network and the clock (idle timers); it is never imported here.
    """

    log = Logger()

    def __init__(self, reactor: Any, config: ApiConfig, *, request_timeout: float = 60.0,
                 connect_timeout: float = 30.0, clock: Any = None):
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.config = config
        self._request_timeout = request_timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        # Five watches and their lists run side by side; keep their
        # connections for reuse instead of reconnecting after every list.
        self._pool.maxPersistentPerHost = 8
        agent_options = {"pool": self._pool, "connectTimeout": connect_timeout}
        if config.uses_tls:
            agent_options["contextFactory"] = _ApiTLSPolicy(config)
        self._http = treq.client.HTTPClient(Agent(reactor, **agent_options))
        self._bodies: set = set()

    def _headers(self, accept: bytes = b"application/json") -> dict:
        headers = {b"Accept": [accept], b"User-Agent": [USER_AGENT]}
        if self.config.token_source is not None:
            authorization = self.config.token_source.authorization()
            if authorization:
                headers[b"Authorization"] = [authorization.encode("latin-1")]
        return headers

    async def _get(self, path: str, params: Params, *, unbuffered: bool) -> Any:
        return await self.request("GET", path, params=params, unbuffered=unbuffered)

    async def request(self, method: str, path: str, *, params: Params = (),
                      body: Optional[dict] = None, unbuffered: bool = False,
                      timeout: Optional[float] = None) -> Any:
        """
        One request with this client's credentials (C{body} sent as JSON): the
        treq response, whatever its status. C{timeout}: the request's own, if
        shorter than the client's.
        """
        url = self.config.server + path
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            headers = self._headers()
            if data is not None:
                headers[b"Content-Type"] = [b"application/json"]
            response = await self._http.request(
                method, url, params=list(params), data=data, headers=headers,
                unbuffered=unbuffered, timeout=timeout or self._request_timeout,
                reactor=self._reactor)
            if response.code == 401 and attempt == 1 and self.config.token_source is not None:
                # Rotated under us (projected token, expired exec credential):
                # read it again and retry once before calling it a failure.
                await treq.content(response)
                self.log.info("API server refused the token for {path}; re-reading it",
                              path=path)
                self.config.token_source.invalidate()
                continue
            return response
        raise AssertionError("unreachable")

    async def error(self, response: Any, path: str) -> ApiError:
        """The L{ApiError} that a failed response's Status body describes."""
        return await self._error(response, path)

    async def _error(self, response: Any, path: str) -> ApiError:
        body = await treq.content(response)
        try:
            status = json.loads(body)
        except ValueError:
            status = None
        error = ApiError.from_status(status, response.code, path)
        if not error.message:
            error.message = body[:200].decode("utf-8", "replace")
        return error

    async def list(self, path: str, *, limit: Optional[int] = None,
                   continue_: Optional[str] = None, label_selector: Optional[str] = None,
                   resource_version: Optional[str] = None) -> dict:
        """One page of a LIST: the decoded C{...List} object."""
        params = []
        if limit:
            params.append(("limit", str(limit)))
        if continue_:
            params.append(("continue", continue_))
        if label_selector:
            params.append(("labelSelector", label_selector))
        if resource_version is not None:
            params.append(("resourceVersion", resource_version))
        response = await self._get(path, params, unbuffered=False)
        if response.code != 200:
            raise await self._error(response, path)
        body = await treq.content(response)
        try:
            page = json.loads(body)
        except ValueError as error:
            raise ApiError(response.code, "BadBody", f"LIST body is not JSON: {error}", path)
        if not isinstance(page, dict) or not isinstance(page.get("items", []), (list, type(None))):
            raise ApiError(response.code, "BadBody", "LIST body is not a list object", path)
        return page

    async def watch(self, path: str, *, resource_version: Optional[str],
                    on_line: Callable[[bytes], Optional[Deferred]],
                    timeout_seconds: Optional[int] = None,
                    idle_timeout: Optional[float] = None,
                    label_selector: Optional[str] = None,
                    allow_bookmarks: bool = True,
                    on_connected: Optional[Callable[[], None]] = None) -> int:
        """
        Stream a WATCH until the server ends it. Returns the number of lines
        seen when it ends cleanly (C{timeoutSeconds}); raises L{ApiError} for
        an error status, L{WatchIdle} when the server went quiet, and the
        connection's error when it dropped. Whatever C{on_line} raises ends
        the watch and is raised here.
        """
        params = [("watch", "true")]
        if resource_version:
            params.append(("resourceVersion", resource_version))
        if allow_bookmarks:
            params.append(("allowWatchBookmarks", "true"))
        if timeout_seconds:
            params.append(("timeoutSeconds", str(int(timeout_seconds))))
        if label_selector:
            params.append(("labelSelector", label_selector))
        response = await self._get(path, params, unbuffered=True)
        if response.code != 200:
            raise await self._error(response, path)
        if on_connected is not None:
            on_connected()
        body = _WatchBody(on_line, self._clock, idle_timeout)
        self._bodies.add(body)
        body.closed.addBoth(lambda _: self._bodies.discard(body))
        response.deliverBody(body)
        try:
            await body.finished
        except CancelledError:
            body.close()
            raise
        return body.lines_seen

    async def _close(self) -> None:
        bodies = list(self._bodies)
        for body in bodies:
            body.close()
        for body in bodies:
            await body.closed
        await self._pool.closeCachedConnections()

    def close(self) -> Deferred:
        """Close every watch and idle connection; fires when they are closed."""
        return Deferred.fromCoroutine(self._close())
