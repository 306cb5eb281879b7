"""The bounded event stream: order, backpressure, close."""

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial import unittest

from contiv.k8s.events import ADDED, Event, EventStream, StreamClosed, Synced, object_key


class EventStreamTests(unittest.SynchronousTestCase):
    def test_first_in_first_out(self):
        stream = EventStream(maxsize=4)
        for i in range(3):
            self.successResultOf(stream.put(i))
        self.assertEqual([self.successResultOf(stream.get()) for _ in range(3)], [0, 1, 2])

    def test_put_waits_while_full(self):
        stream = EventStream(maxsize=2)
        self.successResultOf(stream.put("a"))
        self.successResultOf(stream.put("b"))
        waiting = stream.put("c")
        self.assertNoResult(waiting)
        self.assertEqual(len(stream), 2)
        self.assertEqual(self.successResultOf(stream.get()), "a")
        self.successResultOf(waiting)
        self.assertEqual([self.successResultOf(stream.get()) for _ in range(2)], ["b", "c"])

    def test_get_waits_for_put(self):
        stream = EventStream()
        got = stream.get()
        self.assertNoResult(got)
        stream.put("x")
        self.assertEqual(self.successResultOf(got), "x")

    def test_close_drains_then_ends(self):
        stream = EventStream(maxsize=1)
        stream.put(Synced())
        blocked = stream.put("late")
        stream.close()
        self.failureResultOf(blocked, CancelledError)
        self.assertIsInstance(self.successResultOf(stream.get()), Synced)
        self.failureResultOf(stream.get(), StreamClosed)
        self.assertRaises(StreamClosed, stream.put, "after")

    def test_async_iteration_ends_on_close(self):
        stream = EventStream()
        seen = []

        async def consume():
            async for item in stream:
                seen.append(item)

        done = Deferred.fromCoroutine(consume())
        stream.put(1)
        stream.put(2)
        self.assertNoResult(done)
        stream.close()
        self.successResultOf(done)
        self.assertEqual(seen, [1, 2])

    def test_cancelled_get_is_forgotten(self):
        stream = EventStream()
        got = stream.get()
        got.cancel()
        self.failureResultOf(got, CancelledError)
        stream.put("x")
        self.assertEqual(self.successResultOf(stream.get()), "x")

    def test_object_key(self):
        self.assertEqual(object_key({"metadata": {"name": "web", "namespace": "prod"}}),
                         "prod/web")
        self.assertEqual(object_key({"metadata": {"name": "prod"}}), "prod")
        event = Event(ADDED, "Namespace", "prod", {"metadata": {"name": "prod"}})
        self.assertEqual(event.key, "prod")
