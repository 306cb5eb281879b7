"""For trial tests on the real reactor: a child process's output and end, sleeping, waiting."""

from __future__ import annotations

from typing import Any, Callable

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


def within(d: Deferred, timeout: float) -> Deferred:
    return d.addTimeout(timeout, reactor)


async def eventually(predicate: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll C{predicate} every 50 ms until it is true (its value) or C{timeout} passes."""
    deadline = reactor.seconds() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.05)


async def converge(reader: Any, predicate: Callable[[Any], Any], what: str,
                   timeout: float = 20, interval: float = 0.05) -> Any:
    """Poll a store reader until its state satisfies C{predicate}; the state."""
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        await reader.poll()
        if reader.state is not None and predicate(reader.state):
            return reader.state
        await sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; reader problem: {reader.problem}")
