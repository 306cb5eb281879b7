"""
The operations listener: /healthz, /readyz and /metrics.

/readyz must tell the truth: 200 only when every role of this process says
it is in sync, and the body says what each role has applied, so that a
rollout waits for the datapath and not just for the process.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

StatusSource = Callable[[], Mapping[str, Mapping]]


class HealthResource(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class ReadyResource(Resource):
    isLeaf = True

    def __init__(self, statuses: StatusSource):
        super().__init__()
        self._statuses = statuses

    def render_GET(self, request: Request) -> bytes:
        roles = {name: dict(status) for name, status in self._statuses().items()}
        ready = bool(roles) and all(status.get("in_sync") for status in roles.values())
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"application/json")
        body = {"ready": ready, "roles": roles}
        return json.dumps(body, sort_keys=True, default=str).encode() + b"\n"


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, registries: Iterable[CollectorRegistry]):
        super().__init__()
        self._registries = tuple(registries)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return b"".join(generate_latest(registry) for registry in self._registries)


def make_site(statuses: StatusSource, registries: Iterable[CollectorRegistry]) -> Site:
    root = Resource()
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(statuses))
    root.putChild(b"metrics", MetricsResource(registries))
    site = Site(root)
    # Probes hit these endpoints every few seconds; an access log line per
    # probe would drown the daemon's own messages.
    site.log = lambda request: None
    return site
