"""/healthz, /readyz and /metrics through a real twisted.web resource tree."""

import json

from treq.testing import StubTreq
from twisted.trial import unittest

from contiv import metrics
from contiv.http import make_site


def client(statuses):
    site = make_site(lambda: statuses, [metrics.REGISTRY, metrics.instance_registry(
        lambda: statuses)])
    return StubTreq(site.resource)


class HTTPTests(unittest.TestCase):
    def get(self, statuses, path):
        treq = client(statuses)
        response = self.successResultOf(treq.get("http://contiv" + path))
        body = self.successResultOf(response.content())
        return response, body

    def test_healthz(self):
        response, body = self.get({}, "/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"ok\n")

    def test_readyz_all_in_sync(self):
        statuses = {"netmaster": {"in_sync": True, "generation": 7},
                    "netplugin": {"in_sync": True, "generation": 7}}
        response, body = self.get(statuses, "/readyz")
        self.assertEqual(response.code, 200)
        document = json.loads(body)
        self.assertTrue(document["ready"])
        self.assertEqual(document["roles"]["netplugin"]["generation"], 7)

    def test_readyz_one_role_behind(self):
        statuses = {"netmaster": {"in_sync": True, "generation": 8},
                    "netplugin": {"in_sync": False, "generation": 7, "detail": "applying"}}
        response, body = self.get(statuses, "/readyz")
        self.assertEqual(response.code, 503)
        document = json.loads(body)
        self.assertFalse(document["ready"])
        self.assertEqual(document["roles"]["netplugin"]["detail"], "applying")

    def test_readyz_no_roles_is_not_ready(self):
        response, _ = self.get({}, "/readyz")
        self.assertEqual(response.code, 503)

    def test_metrics(self):
        statuses = {"netmaster": {"in_sync": True, "generation": 3},
                    "netplugin": {"in_sync": False, "generation": None}}
        response, body = self.get(statuses, "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain"))
        text = body.decode()
        self.assertIn('contiv_role_in_sync{role="netmaster"} 1.0', text)
        self.assertIn('contiv_role_in_sync{role="netplugin"} 0.0', text)
        self.assertIn('contiv_role_generation{role="netmaster"} 3.0', text)
        self.assertNotIn('contiv_role_generation{role="netplugin"}', text)
        self.assertIn("process_resident_memory_bytes", text)
        self.assertIn('contiv_build_info{version=', text)
