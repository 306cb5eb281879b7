"""The watch wire format: line splitting, pausing, idleness."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from contiv.k8s.client import LineDecoder, LineTooLong, WatchIdle, _WatchBody


def events(count: int) -> list:
    return [json.dumps({"type": "ADDED", "object": {"metadata": {"name": f"p{i}", "x": "y" * i}}})
            .encode() for i in range(count)]


def test_one_event_split_across_chunks() -> None:
    decoder = LineDecoder()
    line = events(1)[0] + b"\n"
    assert decoder.feed(line[:5]) == []
    assert decoder.feed(line[5:20]) == []
    assert decoder.pending == 20
    assert decoder.feed(line[20:]) == [line[:-1]]
    assert decoder.pending == 0


def test_several_events_in_one_chunk_and_a_partial_one() -> None:
    decoder = LineDecoder()
    a, b, c = events(3)
    assert decoder.feed(a + b"\n" + b + b"\n" + c[:7]) == [a, b]
    assert decoder.feed(c[7:] + b"\n") == [c]


def test_blank_lines_are_skipped() -> None:
    assert LineDecoder().feed(b"\n\r\n{}\n  \n") == [b"{}"]


def test_a_line_without_end_is_refused() -> None:
    decoder = LineDecoder(max_line=100)
    decoder.feed(b"x" * 60)
    with pytest.raises(LineTooLong):
        decoder.feed(b"x" * 60)


@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=30), st.integers(1, 12))
def test_any_chunking_yields_the_same_lines(cuts: list, count: int) -> None:
    lines = events(count)
    stream = b"".join(line + b"\n" for line in lines)
    points = sorted({min(c, len(stream)) for c in cuts})
    decoder = LineDecoder()
    out = []
    start = 0
    for point in points + [len(stream)]:
        out.extend(decoder.feed(stream[start:point]))
        start = point
    assert out == lines
    assert decoder.pending == 0


class FakeTransport:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


def connected_body(on_line, clock, idle=None):
    body = _WatchBody(on_line, clock, idle)
    transport = FakeTransport()
    body.makeConnection(transport)
    return body, transport


def test_a_waiting_consumer_pauses_the_connection_until_it_is_ready() -> None:
    clock = task.Clock()
    seen = []
    gates = {}

    def on_line(line):
        seen.append(line)
        if line == b"2":
            gates[line] = Deferred()
            return gates[line]
        return None

    body, transport = connected_body(on_line, clock)
    body.dataReceived(b"1\n2\n3\n4")
    assert seen == [b"1", b"2"]
    assert transport.paused
    gates[b"2"].callback(None)
    assert seen == [b"1", b"2", b"3"]
    assert not transport.paused
    body.dataReceived(b"\n")
    assert seen == [b"1", b"2", b"3", b"4"]


def test_lines_before_a_drop_are_delivered_and_the_drop_reported() -> None:
    clock = task.Clock()
    seen = []
    body, _ = connected_body(lambda line: seen.append(line), clock)
    body.dataReceived(b"1\n2\n{\"half")
    body.connectionLost(Failure(ConnectionLost()))
    assert seen == [b"1", b"2"]
    failures = []
    body.finished.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionLost)


def test_clean_end_fires_with_nothing() -> None:
    body, _ = connected_body(lambda line: None, task.Clock())
    body.connectionLost(Failure(ResponseDone()))
    results = []
    body.finished.addCallback(results.append)
    assert results == [None]


def test_idle_connection_is_closed() -> None:
    clock = task.Clock()
    body, transport = connected_body(lambda line: None, clock, idle=10)
    clock.advance(9)
    body.dataReceived(b'{"type":"BOOKMARK"}\n')
    clock.advance(9)
    assert not transport.stopped
    clock.advance(2)
    assert transport.stopped
    failures = []
    body.finished.addErrback(failures.append)
    assert failures[0].check(WatchIdle)
    assert clock.getDelayedCalls() == []


def test_paused_time_is_not_idle_time() -> None:
    clock = task.Clock()
    gate = Deferred()
    body, transport = connected_body(lambda line: gate, clock, idle=10)
    body.dataReceived(b"1\n")
    clock.advance(60)
    assert not transport.stopped
    gate.callback(None)
    clock.advance(11)
    assert transport.stopped


def test_an_error_from_the_consumer_ends_the_watch() -> None:
    def on_line(line):
        raise ValueError("boom")

    body, transport = connected_body(on_line, task.Clock())
    body.dataReceived(b"x\n")
    failures = []
    body.finished.addErrback(failures.append)
    assert failures[0].check(ValueError)
    assert transport.stopped
