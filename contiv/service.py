"""
Service-tree building blocks with asynchronous start.

Twisted's stock C{MultiService} ignores the Deferreds that its children's
C{startService} returns, so a child that fails to bind its port is logged and
forgotten while the daemon carries on half-started. L{OrderedService} starts
its children one at a time, waits for each, and on a failure stops the ones
already started (in reverse) and fails its own start with the child's name.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure


class StartError(Exception):
    """
    An expected reason not to start (a port taken, a file missing) whose
    message says everything: logged as one line, without a traceback.
    """


class ChildStartError(Exception):
    """A child service of an L{OrderedService} failed to start."""

    def __init__(self, child_name: str, reason: Failure):
        self.child_name = child_name
        self.reason = reason
        super().__init__(f"{child_name} failed to start: {reason.getErrorMessage()}")


def _describe(child: IService) -> str:
    return getattr(child, "name", None) or type(child).__name__


class OrderedService(MultiService):
    """Starts children in order, awaiting each; stops them in reverse, awaiting each."""

    log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self._started: list[IService] = []
        self._starting: Optional[Deferred] = None

    def startService(self) -> Deferred:
        Service.startService(self)
        self._starting = Deferred.fromCoroutine(self._start_children())
        return self._starting

    async def _start_children(self) -> None:
        for child in list(self):
            try:
                await maybeDeferred(child.startService)
            except Exception:
                failure = Failure()
                if failure.check(StartError, ChildStartError):
                    self.log.error("{child} failed to start: {error}", child=_describe(child),
                                   error=failure.getErrorMessage())
                else:
                    self.log.failure("{child} failed to start", failure,
                                     child=_describe(child))
                # The child may have begun something (a timer, a half-open
                # connection) before failing: stop it too.
                await self._stop_one(child)
                await self._stop_started()
                self.running = False
                raise ChildStartError(_describe(child), failure)
            self._started.append(child)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            # Stopping while a child is still starting: let it finish (or
            # fail) so that nothing it opened is left behind.
            try:
                await self._starting
            except Exception:
                pass
        await self._stop_started()

    async def _stop_started(self) -> None:
        while self._started:
            await self._stop_one(self._started.pop())

    async def _stop_one(self, child: IService) -> None:
        try:
            await maybeDeferred(child.stopService)
        except Exception:
            self.log.failure("{child} failed to stop cleanly", child=_describe(child))

    def addService(self, service: IService) -> None:
        if self.running:
            raise RuntimeError("children are added before an OrderedService starts")
        super().addService(service)


class ListenError(StartError):
    """An endpoint could not listen; the message names the endpoint."""


class ListeningService(Service):
    """
    Listens on an endpoint while running. Unlike Twisted's
    C{StreamServerEndpointService}, C{startService} returns the listen
    Deferred, so a port that is taken fails the start instead of being logged.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, description: str):
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port: Optional[IListeningPort] = None

    def startService(self) -> Deferred:
        super().startService()

        def listening(port: IListeningPort) -> None:
            self.port = port
            self.log.info("{name} listening on {description}", name=self.name,
                          description=self.description)

        def failed(failure: Failure) -> None:
            raise ListenError(f"cannot listen on {self.description}: "
                              f"{failure.getErrorMessage()}")

        return self.endpoint.listen(self.factory).addCallbacks(listening, failed)

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return maybeDeferred(port.stopListening)
        return None
