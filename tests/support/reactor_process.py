"""For trial tests on the real reactor: a child process's output and end, and sleeping."""

from __future__ import annotations

from twisted.internet import protocol, reactor, task
from twisted.internet.defer import Deferred


class Collector(protocol.ProcessProtocol):
    """Keeps a child's stdout and stderr; C{ended} fires with its exit reason."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)
