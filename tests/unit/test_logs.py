import io
import json

from twisted.logger import Logger
from twisted.trial import unittest

from contiv.logs import json_observer


class JSONLogTests(unittest.SynchronousTestCase):
    def test_named_fields_and_message(self):
        out = io.StringIO()
        log = Logger(namespace="contiv.test", observer=json_observer(out))
        log.warn("flow-mod rejected by {bridge}: {error}", bridge="br0", error="bad match")
        record = json.loads(out.getvalue())
        self.assertEqual(record["msg"], "flow-mod rejected by br0: bad match")
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "contiv.test")
        self.assertEqual(record["bridge"], "br0")
        self.assertEqual(record["error"], "bad match")
        self.assertTrue(out.getvalue().endswith("\n"))
        self.assertEqual(out.getvalue().count("\n"), 1)

    def test_failure_and_unserialisable_fields(self):
        out = io.StringIO()
        log = Logger(namespace="contiv.test", observer=json_observer(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("compiling {policy} failed", policy=object())
        record = json.loads(out.getvalue())
        self.assertIn("compiling <object object", record["msg"])
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIsInstance(record["policy"], str)
