"""
A Kubernetes API server for tests: an in-memory object store that speaks the
real list/watch wire protocol over twisted.web.

- LIST with C{limit}/C{continue} (each paginated list is served from a
  snapshot, as the real server serves it from one etcd revision),
  C{labelSelector} and C{resourceVersion};
- WATCH (C{watch=true} or C{watch=1}) from a resourceVersion: replays the
  retained history after it, then streams live changes as newline-delimited
  JSON over chunked transfer; C{allowWatchBookmarks} and periodic BOOKMARKs;
  C{timeoutSeconds};
- 410 Gone for resourceVersions older than the retained window, as an ERROR
  watch event (what a real server does) or as an HTTP 410 (set C{gone_as}),
  and for continue tokens of a compacted list;
- Leases (coordination.k8s.io/v1) for leader election: GET, POST (create;
  409 AlreadyExists), PUT (update; 409 Conflict on a stale
  resourceVersion, 404 when absent), with the spec's types checked;
- test hooks: drop every watch (optionally half-way through the next event),
  stall (stop writing without closing), send a garbage line, refuse new
  watches, require and rotate a bearer token, answer Lease requests with an
  error or not at all.

It listens on 127.0.0.1 over plain TCP, or over TLS that requires a client
certificate from a test CA made by L{make_test_pki}.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import os
import re
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple

from twisted.internet import ssl, task
from twisted.internet.defer import Deferred
from twisted.web import resource, server

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# path -> (kind, apiVersion)
RESOURCE_PATHS = {
    "/api/v1/namespaces": ("Namespace", "v1"),
    "/api/v1/pods": ("Pod", "v1"),
    "/apis/networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", "networking.k8s.io/v1"),
    "/api/v1/services": ("Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
}
API_VERSIONS = {kind: api_version for kind, api_version in RESOURCE_PATHS.values()}

LEASE_API = "coordination.k8s.io/v1"
LEASE_PATH = re.compile(r"/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?")
_MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


def load_fixture(name: str) -> List[dict]:
    """The objects in C{fixtures/name}: one object, or the items of a C{kind: List}."""
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        data = json.load(f)
    if data.get("kind") == "List" or "items" in data:
        return data["items"]
    return [data]


# A small cluster: a namespace, pods, a policy, a Service and its EndpointSlice.
CLUSTER_FIXTURES = ("namespace.json", "pods.json", "networkpolicy.json", "service.json",
                    "endpointslice.json")


def cluster_objects() -> List[dict]:
    """Fresh copies of every object of L{CLUSTER_FIXTURES}."""
    return [obj for name in CLUSTER_FIXTURES for obj in load_fixture(name)]


def key_of(obj: dict) -> str:
    metadata = obj["metadata"]
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata['name']}" if namespace else metadata["name"]


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_selector(selector: str) -> List[Tuple[str, str, Optional[str]]]:
    """C{a=b,c!=d,e,!f} -> [(op, key, value)]: only what tests use of the real syntax."""
    requirements = []
    for part in filter(None, (p.strip() for p in selector.split(","))):
        if "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append(("!=", key.strip(), value.strip()))
        elif "==" in part or "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            requirements.append(("=", key.strip(), value.strip()))
        elif part.startswith("!"):
            requirements.append(("!", part[1:].strip(), None))
        else:
            requirements.append(("exists", part, None))
    return requirements


def matches(requirements: List[Tuple[str, str, Optional[str]]], obj: Optional[dict]) -> bool:
    if obj is None:
        return False
    labels = obj["metadata"].get("labels") or {}
    for op, key, value in requirements:
        if op == "exists" and key not in labels:
            return False
        if op == "!" and key in labels:
            return False
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
    return True


@dataclass
class Change:
    rv: int
    kind: str
    type: str
    obj: dict
    old: Optional[dict]


class Watch:
    """One open WATCH request."""

    def __init__(self, api: "FakeApiServer", request: Any, kind: str, selector: list,
                 bookmarks: bool):
        self.api = api
        self.request = request
        self.kind = kind
        self.selector = selector
        self.bookmarks = bookmarks
        self.stalled = False
        self.drop_midway = False
        self.open = True
        self.sent = 0
        self.timeout_call = None

    def event_for(self, change: Change) -> Optional[dict]:
        if not self.selector:
            return {"type": change.type, "object": change.obj}
        now = matches(self.selector, change.obj) and change.type != "DELETED"
        before = matches(self.selector, change.old)
        if change.type == "DELETED":
            return {"type": "DELETED", "object": change.obj} if before else None
        if now and before:
            return {"type": "MODIFIED", "object": change.obj}
        if now:
            return {"type": "ADDED", "object": change.obj}
        if before:
            return {"type": "DELETED", "object": change.obj}
        return None

    def send(self, event: dict) -> None:
        if not self.open or self.stalled:
            return
        line = _dumps(event) + b"\n"
        if self.drop_midway and event.get("type") != "BOOKMARK":
            self.request.write(line[: len(line) // 2])
            self.close(abort=True)
            return
        if self.api.split_writes and len(line) > 2:
            # Two chunks per event, cut inside the JSON: the client must join them.
            cut = len(line) // 3
            self.request.write(line[:cut])
            self.request.write(line[cut:])
        else:
            self.request.write(line)
        self.sent += 1

    def write_raw(self, data: bytes) -> None:
        if self.open and not self.stalled:
            self.request.write(data)

    def finish(self) -> None:
        """End the response cleanly (what C{timeoutSeconds} does)."""
        if self.open:
            self._forget()
            self.request.finish()

    def close(self, abort: bool = False) -> None:
        """Drop the connection under the response: the stream ends without its last chunk."""
        if self.open:
            self._forget()
            transport = self.request.channel.transport if self.request.channel else None
            if transport is not None:
                # loseConnection still flushes what was written (a half event).
                transport.loseConnection()

    def _forget(self) -> None:
        self.open = False
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.cancel()
        self.api.watches.discard(self)


class _Site(server.Site):
    """Remembers its connections so that C{stop()} can close them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.connections: set = set()

    def log(self, request: Any) -> None:
        """No access log: tests read C{FakeApiServer.requests} instead."""

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason: Any) -> None:
            self.connections.discard(protocol)
            lost(reason)

        protocol.connectionLost = connectionLost
        return protocol


class FakeApiServer(resource.Resource):
    """The API server; also the twisted.web resource that serves it."""

    isLeaf = True

    def __init__(self, reactor: Any, *, retained: int = 1000, bookmark_interval: float = 5.0,
                 gone_as: str = "event"):
        super().__init__()
        self.reactor = reactor
        self.rv = 100
        self.objects: Dict[str, Dict[str, dict]] = {kind: {} for kind in API_VERSIONS}
        self.history: Deque[Change] = deque()
        self.retained = retained
        # A watch from a resourceVersion below this has lost history: 410.
        self.floor = self.rv
        self.snapshots: Dict[str, Tuple[int, List[dict]]] = {}
        self.watches: set = set()
        self.gone_as = gone_as
        self.split_writes = False
        self.refuse_watches = False
        # path -> HTTP status that LISTs of it get instead of the list.
        self.refuse_lists: Dict[str, int] = {}
        self.token: Optional[str] = None
        self.requests: List[dict] = []
        # (namespace, name) -> Lease
        self.leases: Dict[Tuple[str, str], dict] = {}
        # HTTP status that Lease requests get instead of an answer; "hang"
        # leaves them unanswered until the hook is cleared.
        self.refuse_leases: Any = None
        self._hung: List[Any] = []
        self.bookmark_interval = bookmark_interval
        self._bookmarks = task.LoopingCall(self.send_bookmarks)
        self._bookmarks.clock = reactor
        self.site = _Site(self)
        self.site.displayTracebacks = False
        self.port = None
        self.url = ""

    # -- listening

    def listen_tcp(self) -> str:
        self.port = self.reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self._start_bookmarks()
        return self.url

    def listen_tls(self, pki: "TestPKI") -> str:
        with open(pki.ca_cert, "rb") as f:
            authority = ssl.Certificate.loadPEM(f.read())
        with open(pki.server_cert, "rb") as f, open(pki.server_key, "rb") as g:
            certificate = ssl.PrivateCertificate.loadPEM(f.read() + g.read())
        # With an authority given, the options require a client certificate it signed.
        options = certificate.options(authority)
        self.port = self.reactor.listenSSL(0, self.site, options, interface="127.0.0.1")
        self.url = f"https://127.0.0.1:{self.port.getHost().port}"
        self._start_bookmarks()
        return self.url

    def _start_bookmarks(self) -> None:
        if self.bookmark_interval and not self._bookmarks.running:
            self._bookmarks.start(self.bookmark_interval, now=False)

    async def _stop(self) -> None:
        if self._bookmarks.running:
            self._bookmarks.stop()
        for watch in list(self.watches):
            watch._forget()
        if self.port is not None:
            await self.port.stopListening()
        for protocol in list(self.site.connections):
            transport = getattr(getattr(protocol, "_channel", protocol), "transport", None)
            if transport is not None:
                transport.abortConnection()
        # abortConnection reports the loss on the next reactor turn.
        for _ in range(50):
            if not self.site.connections:
                break
            await task.deferLater(self.reactor, 0.01, lambda: None)

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    # -- the store

    def _stamp(self, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        kind = obj.get("kind")
        if kind not in API_VERSIONS:
            raise ValueError(f"unknown kind {kind!r}")
        obj.setdefault("apiVersion", API_VERSIONS[kind])
        metadata = obj.setdefault("metadata", {})
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", datetime.datetime.now(datetime.timezone.utc)
                            .strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.rv += 1
        metadata["resourceVersion"] = str(self.rv)
        return obj

    def _record(self, kind: str, type_: str, obj: dict, old: Optional[dict]) -> None:
        change = Change(self.rv, kind, type_, obj, old)
        self.history.append(change)
        while len(self.history) > self.retained:
            self.floor = self.history.popleft().rv
        for watch in list(self.watches):
            if watch.kind == kind:
                event = watch.event_for(change)
                if event is not None:
                    watch.send(event)

    def create(self, obj: dict) -> dict:
        obj = self._stamp(obj)
        key = key_of(obj)
        store = self.objects[obj["kind"]]
        if key in store:
            raise KeyError(f"{obj['kind']} {key} exists")
        store[key] = obj
        self._record(obj["kind"], "ADDED", obj, None)
        return obj

    def update(self, obj: dict) -> dict:
        kind = obj["kind"]
        key = key_of(obj)
        old = self.objects[kind][key]
        obj = copy.deepcopy(obj)
        obj["metadata"]["uid"] = old["metadata"]["uid"]
        obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        obj = self._stamp(obj)
        self.objects[kind][key] = obj
        self._record(kind, "MODIFIED", obj, old)
        return obj

    def delete(self, kind: str, key: str) -> dict:
        old = self.objects[kind].pop(key)
        obj = copy.deepcopy(old)
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._record(kind, "DELETED", obj, old)
        return obj

    def compact(self) -> None:
        """Forget all history (and list snapshots): older resourceVersions get 410."""
        self.history.clear()
        self.snapshots.clear()
        self.floor = self.rv

    # -- test hooks

    def drop_watches(self) -> None:
        for watch in list(self.watches):
            watch.close()

    def drop_watches_midway(self) -> None:
        """The next event each open watch sends is cut in half, then the connection drops."""
        for watch in self.watches:
            watch.drop_midway = True

    def stall(self) -> None:
        """Open watches stop writing (events and bookmarks) but stay connected."""
        for watch in self.watches:
            watch.stalled = True

    def send_garbage(self, data: bytes = b"{this is not json\n") -> None:
        for watch in list(self.watches):
            watch.write_raw(data)

    def send_bookmarks(self) -> None:
        for watch in list(self.watches):
            if watch.bookmarks:
                watch.send({"type": "BOOKMARK", "object": {
                    "kind": watch.kind, "apiVersion": API_VERSIONS[watch.kind],
                    "metadata": {"resourceVersion": str(self.rv)}}})

    def require_token(self, token: Optional[str]) -> None:
        """Requests must carry C{Authorization: Bearer token} (None: no auth)."""
        self.token = token

    rotate_token = require_token

    def watching(self, kind: Optional[str] = None) -> int:
        return sum(1 for w in self.watches if kind is None or w.kind == kind)

    # -- HTTP

    def _reply(self, request: Any, code: int, body: dict) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return _dumps(body)

    def _authorized(self, request: Any) -> bool:
        path = request.path.decode()
        args = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        authorization = request.getHeader(b"Authorization")
        self.requests.append({"path": path, "args": args, "authorization": authorization,
                              "method": request.method.decode()})
        return self.token is None or authorization == f"Bearer {self.token}".encode()

    def render_POST(self, request: Any) -> Any:
        return self._lease_request(request)

    def render_PUT(self, request: Any) -> Any:
        return self._lease_request(request)

    def render_GET(self, request: Any) -> Any:
        path = request.path.decode()
        args = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        if LEASE_PATH.fullmatch(path):
            return self._lease_request(request)
        if not self._authorized(request):
            return self._reply(request, 401, status(401, "Unauthorized", "Unauthorized"))
        if path not in RESOURCE_PATHS:
            return self._reply(request, 404, status(404, "NotFound", f"{path} not found"))
        kind, _ = RESOURCE_PATHS[path]
        if args.get("watch") in ("true", "1"):
            return self._watch(request, kind, args)
        if path in self.refuse_lists:
            code = self.refuse_lists[path]
            return self._reply(request, code, status(code, "ServiceUnavailable", "refused"))
        return self._list(request, kind, args)

    # -- Leases

    def release_hung_leases(self) -> None:
        """Answer the Lease requests left hanging with 503 (and stop hanging new ones)."""
        self.refuse_leases = None
        hung, self._hung = self._hung, []
        for request in hung:
            if not request.finished and not request._disconnected:
                request.write(self._reply(request, 503, status(503, "ServiceUnavailable",
                                                               "was hanging")))
                request.finish()

    def _lease_request(self, request: Any) -> Any:
        if not self._authorized(request):
            return self._reply(request, 401, status(401, "Unauthorized", "Unauthorized"))
        match = LEASE_PATH.fullmatch(request.path.decode())
        method = request.method.decode()
        if match is None:
            return self._reply(request, 405, status(405, "MethodNotAllowed",
                                                    f"{method} not allowed here"))
        if self.refuse_leases == "hang":
            self._hung.append(request)
            return server.NOT_DONE_YET
        if self.refuse_leases is not None:
            code = int(self.refuse_leases)
            return self._reply(request, code, status(code, "ServiceUnavailable", "refused"))
        namespace, name = match.group(1), match.group(2)
        what = f'leases.coordination.k8s.io "{name}"'
        if method == "GET":
            if name is None:
                items = [v for (ns, _), v in sorted(self.leases.items()) if ns == namespace]
                return self._reply(request, 200, {"kind": "LeaseList", "apiVersion": LEASE_API,
                                                  "metadata": {"resourceVersion": str(self.rv)},
                                                  "items": items})
            lease = self.leases.get((namespace, name))
            if lease is None:
                return self._reply(request, 404, status(404, "NotFound", f"{what} not found"))
            return self._reply(request, 200, lease)
        try:
            body = json.loads(request.content.read())
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return self._reply(request, 400, status(400, "BadRequest", f"body: {e}"))
        problem = self._lease_problem(body, namespace)
        if problem:
            return self._reply(request, 422, status(422, "Invalid", problem))
        metadata = body["metadata"]
        if method == "POST":
            if name is not None:
                return self._reply(request, 405, status(405, "MethodNotAllowed",
                                                        "POST to the collection"))
            key = (namespace, metadata["name"])
            if key in self.leases:
                return self._reply(request, 409, status(
                    409, "AlreadyExists",
                    f'leases.coordination.k8s.io "{metadata["name"]}" already exists'))
            lease = self._stamp_lease(body, namespace, None)
            self.leases[key] = lease
            return self._reply(request, 201, lease)
        if method == "PUT":
            if name is None or metadata["name"] != name:
                return self._reply(request, 400, status(
                    400, "BadRequest", "the name in the body does not match the URL"))
            old = self.leases.get((namespace, name))
            if old is None:
                return self._reply(request, 404, status(404, "NotFound", f"{what} not found"))
            given = metadata.get("resourceVersion")
            if given and given != old["metadata"]["resourceVersion"]:
                return self._reply(request, 409, status(
                    409, "Conflict", f"Operation cannot be fulfilled on {what}: the object has "
                    "been modified; please apply your changes to the latest version and try "
                    "again"))
            lease = self._stamp_lease(body, namespace, old)
            self.leases[(namespace, name)] = lease
            return self._reply(request, 200, lease)
        return self._reply(request, 405, status(405, "MethodNotAllowed", method))

    @staticmethod
    def _lease_problem(body: dict, namespace: str) -> Optional[str]:
        metadata = body.get("metadata")
        if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) \
                or not metadata["name"]:
            return "metadata.name: Required value"
        if metadata.get("namespace") not in (None, namespace):
            return "metadata.namespace: does not match the URL"
        if body.get("kind") not in (None, "Lease") or \
                body.get("apiVersion") not in (None, LEASE_API):
            return "kind/apiVersion: not a coordination.k8s.io/v1 Lease"
        spec = body.get("spec") or {}
        if not isinstance(spec, dict):
            return "spec: not an object"
        for field in ("leaseDurationSeconds", "leaseTransitions"):
            value = spec.get(field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                return f"spec.{field}: must be a non-negative integer, got {value!r}"
        if spec.get("leaseDurationSeconds") == 0:
            return "spec.leaseDurationSeconds: must be greater than 0"
        holder = spec.get("holderIdentity")
        if holder is not None and not isinstance(holder, str):
            return f"spec.holderIdentity: must be a string, got {holder!r}"
        for field in ("acquireTime", "renewTime"):
            value = spec.get(field)
            if value is not None and not (isinstance(value, str) and _MICRO_TIME.fullmatch(value)):
                return f"spec.{field}: not an RFC 3339 time: {value!r}"
        return None

    def _stamp_lease(self, body: dict, namespace: str, old: Optional[dict]) -> dict:
        lease = copy.deepcopy(body)
        lease["kind"], lease["apiVersion"] = "Lease", LEASE_API
        metadata = lease["metadata"]
        metadata["namespace"] = namespace
        if old is None:
            metadata["uid"] = str(uuid.uuid4())
            metadata["creationTimestamp"] = datetime.datetime.now(
                datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            metadata["uid"] = old["metadata"]["uid"]
            metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        self.rv += 1
        metadata["resourceVersion"] = str(self.rv)
        return lease

    def _gone(self, request: Any, message: str) -> bytes:
        return self._reply(request, 410, status(410, "Expired", message))

    def _list(self, request: Any, kind: str, args: Dict[str, str]) -> bytes:
        limit = int(args.get("limit") or 0)
        token = args.get("continue")
        if token:
            snapshot_id, offset = json.loads(base64.urlsafe_b64decode(token.encode()))
            if snapshot_id not in self.snapshots:
                return self._gone(request, "The provided continue parameter is too old to "
                                           "display a consistent list result.")
            rv, items = self.snapshots[snapshot_id]
        else:
            requested = args.get("resourceVersion")
            if requested not in (None, "", "0") and int(requested) < self.floor:
                return self._gone(request, f"too old resource version: {requested} "
                                           f"({self.floor})")
            selector = parse_selector(args.get("labelSelector", ""))
            rv = self.rv
            items = [obj for _, obj in sorted(self.objects[kind].items())
                     if matches(selector, obj)]
            snapshot_id, offset = uuid.uuid4().hex, 0
        page = items[offset:offset + limit] if limit else items[offset:]
        metadata: Dict[str, Any] = {"resourceVersion": str(rv)}
        end = offset + len(page)
        if end < len(items):
            self.snapshots[snapshot_id] = (rv, items)
            metadata["continue"] = base64.urlsafe_b64encode(
                json.dumps([snapshot_id, end]).encode()).decode()
            metadata["remainingItemCount"] = len(items) - end
        else:
            self.snapshots.pop(snapshot_id, None)
        # Like the real server, list items carry neither kind nor apiVersion.
        body = {"kind": f"{kind}List", "apiVersion": API_VERSIONS[kind], "metadata": metadata,
                "items": [{k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
                          for obj in page]}
        return self._reply(request, 200, body)

    def _watch(self, request: Any, kind: str, args: Dict[str, str]) -> Any:
        if self.refuse_watches:
            return self._reply(request, 503, status(503, "ServiceUnavailable", "try later"))
        requested = args.get("resourceVersion") or "0"
        gone = requested != "0" and int(requested) < self.floor
        if gone and self.gone_as == "status":
            return self._gone(request, f"too old resource version: {requested} ({self.floor})")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-cache, private")
        watch = Watch(self, request, kind, parse_selector(args.get("labelSelector", "")),
                      args.get("allowWatchBookmarks") in ("true", "1"))
        # Headers go out now, as the real server flushes them before any event.
        request.write(b"")
        if gone:
            request.write(_dumps({"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {requested} ({self.floor})")}) + b"\n")
            request.finish()
            return server.NOT_DONE_YET
        self.watches.add(watch)
        request.notifyFinish().addBoth(lambda _: watch._forget())
        if requested == "0":
            for _, obj in sorted(self.objects[kind].items()):
                event = watch.event_for(Change(self.rv, kind, "ADDED", obj, None))
                if event is not None:
                    watch.send(event)
        else:
            for change in list(self.history):
                if change.kind == kind and change.rv > int(requested):
                    event = watch.event_for(change)
                    if event is not None:
                        watch.send(event)
        timeout = args.get("timeoutSeconds")
        if timeout and watch.open:
            watch.timeout_call = self.reactor.callLater(float(timeout), watch.finish)
        return server.NOT_DONE_YET


# -- TLS material


@dataclass(frozen=True)
class TestPKI:
    __test__ = False  # not a pytest test class

    directory: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_test_pki(directory: str, *, hostname: str = "localhost",
                  ip: str = "127.0.0.1") -> TestPKI:
    """A test CA, a server certificate for C{ip}/C{hostname}, and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def name(common_name: str, organisation: Optional[str] = None) -> x509.Name:
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organisation:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
        return x509.Name(attributes)

    def write(filename: str, data: bytes) -> str:
        path = os.path.join(directory, filename)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def key_pem(private_key: Any) -> bytes:
        return private_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption())

    ca_key = key()
    ca_name = name("contiv-test-ca")
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage: Any, san: Optional[list], organisation: Optional[str] = None):
        leaf_key = key()
        builder = (x509.CertificateBuilder()
                   .subject_name(name(common_name, organisation)).issuer_name(ca_name)
                   .public_key(leaf_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return leaf_key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf("kube-apiserver", ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.DNSName(hostname),
                                    x509.IPAddress(ipaddress.ip_address(ip))])
    client_key, client_cert = leaf("contiv-netmaster", ExtendedKeyUsageOID.CLIENT_AUTH, None,
                                   organisation="contiv")
    pem = serialization.Encoding.PEM
    return TestPKI(
        directory=directory,
        ca_cert=write("ca.crt", ca.public_bytes(pem)),
        ca_key=write("ca.key", key_pem(ca_key)),
        server_cert=write("server.crt", server_cert.public_bytes(pem)),
        server_key=write("server.key", key_pem(server_key)),
        client_cert=write("client.crt", client_cert.public_bytes(pem)),
        client_key=write("client.key", key_pem(client_key)),
    )


def write_kubeconfig(path: str, server_url: str, *, token: Optional[str] = None,
                     token_file: Optional[str] = None, pki: Optional[TestPKI] = None,
                     context: str = "test") -> str:
    """A kubeconfig for C{server_url} with the given credentials."""
    import yaml

    cluster: Dict[str, Any] = {"server": server_url}
    user: Dict[str, Any] = {}
    if pki is not None:
        cluster["certificate-authority"] = pki.ca_cert
        user["client-certificate"] = pki.client_cert
        user["client-key"] = pki.client_key
    if token is not None:
        user["token"] = token
    if token_file is not None:
        user["tokenFile"] = token_file
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "fake", "cluster": cluster}],
        "users": [{"name": "netmaster", "user": user}],
        "contexts": [{"name": context, "context": {"cluster": "fake", "user": "netmaster"}}],
        "current-context": context,
    }
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return path
