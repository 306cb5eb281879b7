"""The service tree: start in order, stop in reverse, failures reported."""

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.internet import endpoints
from twisted.trial import unittest

from contiv.service import ChildStartError, ListenError, ListeningService, OrderedService


class Recorder(Service):
    def __init__(self, name, journal, start_result=None, stop_result=None):
        self.setName(name)
        self.journal = journal
        self.start_result = start_result
        self.stop_result = stop_result

    def startService(self):
        super().startService()
        self.journal.append(("start", self.name))
        return self.start_result

    def stopService(self):
        super().stopService()
        self.journal.append(("stop", self.name))
        return self.stop_result


class OrderedServiceTests(unittest.SynchronousTestCase):
    def test_start_in_order_stop_in_reverse(self):
        journal = []
        root = OrderedService()
        for name in ("a", "b", "c"):
            Recorder(name, journal).setServiceParent(root)
        self.successResultOf(root.startService())
        self.successResultOf(root.stopService())
        self.assertEqual(journal, [("start", "a"), ("start", "b"), ("start", "c"),
                                   ("stop", "c"), ("stop", "b"), ("stop", "a")])

    def test_waits_for_each_start(self):
        journal = []
        gate = Deferred()
        root = OrderedService()
        Recorder("slow", journal, start_result=gate).setServiceParent(root)
        Recorder("next", journal).setServiceParent(root)
        started = root.startService()
        self.assertEqual(journal, [("start", "slow")])
        self.assertNoResult(started)
        gate.callback(None)
        self.successResultOf(started)
        self.assertEqual(journal, [("start", "slow"), ("start", "next")])

    def test_failed_child_stops_started_ones_and_fails_start(self):
        journal = []
        root = OrderedService()
        Recorder("a", journal).setServiceParent(root)
        Recorder("b", journal, start_result=fail(RuntimeError("port taken"))) \
            .setServiceParent(root)
        Recorder("c", journal).setServiceParent(root)
        failure = self.failureResultOf(root.startService(), ChildStartError)
        self.assertEqual(failure.value.child_name, "b")
        self.assertIn("port taken", str(failure.value))
        self.assertEqual(journal, [("start", "a"), ("start", "b"), ("stop", "b"),
                                   ("stop", "a")])
        self.assertFalse(root.running)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_expected_start_error_is_not_a_traceback(self):
        root = OrderedService()
        Recorder("http", [], start_result=fail(ListenError("cannot listen on tcp:80"))) \
            .setServiceParent(root)
        failure = self.failureResultOf(root.startService(), ChildStartError)
        self.assertEqual(str(failure.value), "http failed to start: cannot listen on tcp:80")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stop_errors_do_not_stop_the_rest(self):
        journal = []
        root = OrderedService()
        Recorder("a", journal).setServiceParent(root)
        Recorder("b", journal, stop_result=fail(RuntimeError("stuck"))).setServiceParent(root)
        self.successResultOf(root.startService())
        self.successResultOf(root.stopService())
        self.assertEqual(journal[-2:], [("stop", "b"), ("stop", "a")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_during_start_waits_for_it(self):
        journal = []
        gate = Deferred()
        root = OrderedService()
        Recorder("a", journal).setServiceParent(root)
        Recorder("b", journal, start_result=gate).setServiceParent(root)
        root.startService()
        stopped = root.stopService()
        self.assertNoResult(stopped)
        gate.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(journal[-2:], [("stop", "b"), ("stop", "a")])


class ListeningServiceTests(unittest.SynchronousTestCase):
    def test_listen_failure_fails_start_naming_endpoint(self):
        class Refusing:
            def listen(self, factory):
                return fail(CannotListenError("127.0.0.1", 80, OSError("in use")))

        service = ListeningService(Refusing(), object(), "tcp:80:interface=127.0.0.1")
        failure = self.failureResultOf(service.startService(), ListenError)
        self.assertIn("cannot listen on tcp:80:interface=127.0.0.1", str(failure.value))

    def test_listens_and_stops(self):
        reactor = MemoryReactor()
        service = ListeningService(endpoints.TCP4ServerEndpoint(reactor, 0), object(), "tcp:0")
        self.successResultOf(service.startService())
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIsNotNone(service.port)
        service.stopService()
        self.assertIsNone(service.port)
