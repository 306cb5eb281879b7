"""
The OpenFlow connection kept up: a Service around Twisted's ClientService that
connects to ``openflow.connect`` (``unix:`` to the bridge's .mgmt socket, or
``tcp:``), retries with backoff, and hands out a connection only once the
OpenFlow 1.3 handshake is done. ``on_connect`` runs after every (re)connection,
because a restarted OVS comes back with empty flow tables.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from contiv.openflow.protocol import OpenFlowProtocol

__all__ = ["OpenFlowClient", "OpenFlowFactory"]


class OpenFlowFactory(Factory):
    """Builds OpenFlowProtocols with the client's clock, timers and callbacks."""

    noisy = False  # the client logs each connection itself

    def __init__(self, clock: Any, on_built: Optional[Callable[[OpenFlowProtocol], Any]] = None,
                 **protocol_options: Any) -> None:
        self.clock = clock
        self.on_built = on_built
        self.protocol_options = protocol_options

    def buildProtocol(self, addr: Any) -> OpenFlowProtocol:
        protocol = OpenFlowProtocol(self.clock, **self.protocol_options)
        protocol.factory = self
        if self.on_built is not None:
            self.on_built(protocol)
        return protocol


class OpenFlowClient(Service):
    """
    Keeps one OpenFlow 1.3 connection to a switch up. ``whenConnected()``
    fires with a protocol whose handshake is done; ``protocol`` is the current
    one or None.
    """

    log = Logger()

    def __init__(self, reactor: Any, endpoint_description: str, *,
                 on_connect: Optional[Callable[[OpenFlowProtocol], Any]] = None,
                 on_packet_in: Optional[Callable[[Any], Any]] = None,
                 clock: Any = None, echo_interval: float = 5.0, echo_timeout: float = 15.0,
                 retry_policy: Optional[Callable[[int], float]] = None) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.endpoint_description = endpoint_description
        self.on_connect = on_connect
        self.on_packet_in = on_packet_in
        self.protocol: Optional[OpenFlowProtocol] = None
        self.connections = 0
        self.handshake_failures = 0
        if retry_policy is None:
            # backoffPolicy's default jitter adds up to a whole second, ten
            # times the first delay; a tenth of a second spreads reconnects
            # enough on one node.
            retry_policy = backoffPolicy(initialDelay=0.1, maxDelay=5,
                                         jitter=lambda: random.uniform(0, 0.1))
        base_policy = retry_policy

        def policy(attempt: int) -> float:
            # ClientService counts a connection that was made as a success, so
            # a switch that fails every handshake would be retried at the
            # first delay forever; failed handshakes count as attempts here.
            return base_policy(attempt + self.handshake_failures)

        factory = OpenFlowFactory(self.clock, on_built=self._built,
                                  echo_interval=echo_interval, echo_timeout=echo_timeout,
                                  on_packet_in=on_packet_in)
        # No prepareConnection: ClientService (Twisted 26) raises NoTransition
        # when a connection that prepareConnection rejected, or that closes
        # while it runs, is lost; the handshake is waited for here instead.
        self._service = ClientService(clientFromString(reactor, endpoint_description), factory,
                                      retryPolicy=policy, clock=self.clock)

    def whenConnected(self, failAfterFailures: Optional[int] = None) -> Deferred:
        """Fires with a ready OpenFlowProtocol (now, or once one is connected)."""
        return Deferred.fromCoroutine(self._when_connected(failAfterFailures))

    async def _when_connected(self, failAfterFailures: Optional[int]) -> OpenFlowProtocol:
        while True:
            protocol = await self._service.whenConnected(failAfterFailures=failAfterFailures)
            try:
                ready = await protocol.when_ready()
            except Exception:
                # This one failed its handshake or was lost: the next one.
                await protocol.when_closed()
                continue
            # A turn of the clock, so that a caller may stop the service from
            # its callback without re-entering ClientService's state machine.
            await deferLater(self.clock, 0, lambda: None)
            return ready

    def startService(self) -> None:
        super().startService()
        self.log.info("connecting to OpenFlow switch at {endpoint}",
                      endpoint=self.endpoint_description)
        self._service.startService()

    def stopService(self) -> Deferred:
        super().stopService()
        return self._service.stopService()

    def _built(self, protocol: OpenFlowProtocol) -> None:
        protocol.when_ready().addCallbacks(self._ready, self._handshake_failed)
        protocol.when_closed().addCallback(self._closed, protocol)

    def _ready(self, protocol: OpenFlowProtocol) -> None:
        self.handshake_failures = 0
        self.protocol = protocol
        self.connections += 1
        self.log.info("OpenFlow switch at {endpoint} connected (datapath {datapath_id:016x}, "
                      "connection {count})", endpoint=self.endpoint_description,
                      datapath_id=protocol.datapath_id, count=self.connections)
        if self.on_connect is not None:
            # Not awaited by anyone: replaying a large state must not hold back
            # whenConnected() callers; its failure is logged, and the
            # connection stays.
            maybeDeferred(self.on_connect, protocol).addErrback(self._on_connect_failed)

    def _handshake_failed(self, failure: Failure) -> None:
        if self.protocol is None:  # a ready connection that was lost is not a failed handshake
            self.handshake_failures += 1
            self.log.error("OpenFlow handshake with {endpoint} failed, will retry: {error}",
                           endpoint=self.endpoint_description,
                           error=failure.getErrorMessage())

    def _on_connect_failed(self, failure: Failure) -> None:
        self.log.failure("on_connect for OpenFlow switch at {endpoint} failed", failure,
                         endpoint=self.endpoint_description)

    def _closed(self, _: None, protocol: OpenFlowProtocol) -> None:
        if self.protocol is protocol:
            self.protocol = None
