"""
The netmaster role: follows the cluster through a source and keeps its
picture of it (kind -> key -> object) current.

What it has seen is compiled and published by the policy engine; until that
engine exists this role never claims to be in sync, so /readyz stays 503 and
says why.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from contiv.k8s.events import DELETED, Event, EventStream, Synced


class NetmasterService(Service):
    name = "netmaster"
    log = Logger()

    def __init__(self, source: Any, stream: EventStream, store: Any):
        self.source = source
        self.stream = stream
        self.store = store
        # kind -> key -> the object's Kubernetes JSON
        self.cluster: dict[str, dict[str, Any]] = {}
        self.events_seen = 0
        self.synced = False
        self._consuming: Optional[Deferred] = None

    def startService(self) -> Deferred:
        super().startService()
        self.source.start()
        self._consuming = Deferred.fromCoroutine(self._consume())
        self._consuming.addErrback(
            lambda f: self.log.failure("netmaster stopped consuming cluster events", f))
        return succeed(None)

    async def _consume(self) -> None:
        async for item in self.stream:
            if isinstance(item, Synced):
                self.synced = True
                self.log.info("netmaster has the whole cluster: {counts}",
                              counts=self.counts())
            elif isinstance(item, Event):
                self.apply(item)

    def apply(self, event: Event) -> None:
        self.events_seen += 1
        objects = self.cluster.setdefault(event.kind, {})
        if event.type == DELETED:
            objects.pop(event.key, None)
        else:
            objects[event.key] = event.object

    def counts(self) -> dict[str, int]:
        return {kind: len(objects) for kind, objects in sorted(self.cluster.items())}

    async def _stop(self) -> None:
        await self.source.stop()
        self.stream.close()
        if self._consuming is not None:
            await self._consuming

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    def status(self) -> dict[str, Any]:
        if not self.synced:
            state, detail = "listing", "waiting for the source's initial list"
        else:
            state, detail = "synced-source", ("the cluster is followed, but policy "
                                              "compilation and publishing are not "
                                              "implemented yet")
        return {
            "role": "netmaster",
            "state": state,
            "in_sync": False,
            "generation": None,
            "detail": detail,
            "objects": self.counts(),
            "events": self.events_seen,
            "source": self.source.status(),
        }
