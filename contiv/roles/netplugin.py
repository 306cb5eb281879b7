"""
The netplugin role: polls the store for this node's share and keeps the
local OVS bridge's flows equal to its pipeline.

It is in sync only when the newest complete generation it has read is the
one the bridge confirmed (bundle commit). Without a bridge (no
openflow.connect) it can read the store but enforces nothing, and says so.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from contiv.dns.names import NameTable
from contiv.store.layout import NameReader, Reader


class NetpluginService(MultiService):
    name = "netplugin"
    log = Logger()

    def __init__(self, node: str, store: Any, *, clock: Any, prefix: str = "contiv/",
                 datapath: Any = None, openflow_client: Any = None,
                 poll_interval: float = 0.1, dns_domain: str = "cluster.local",
                 on_names: Optional[Callable[[NameTable], None]] = None):
        """
        C{on_names}: called with every new complete DNS name table (the DNS
        server's); without it the name table is not read at all.
        """
        super().__init__()
        self.node = node
        self.store = store
        self.clock = clock
        self.reader = Reader(store, node, prefix=prefix)
        self.on_names = on_names
        self.names_reader = (NameReader(store, prefix=prefix, domain=dns_domain)
                             if on_names is not None else None)
        self.datapath = datapath
        self.openflow_client = openflow_client
        if openflow_client is not None:
            openflow_client.setServiceParent(self)
        self._poller = LoopingCall(self._poll)
        self._poller.clock = clock
        self.poll_interval = poll_interval
        self._polling: Optional[Deferred] = None

    def startService(self) -> Deferred:
        super().startService()
        self._poller.start(self.poll_interval, now=True)
        self.log.info("netplugin started for node {node}", node=self.node)
        return succeed(None)

    def stopService(self) -> Deferred:
        if self._poller.running:
            self._poller.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()

    def _poll(self) -> Deferred:
        d = Deferred.fromCoroutine(self._poll_once())
        # A failed poll must not end the LoopingCall: the reader keeps the
        # last complete state and says why in its problem.
        return d.addErrback(lambda f: self.log.failure("polling the store failed", f))

    async def _poll_once(self) -> None:
        state = await self.reader.poll()
        if state is not None and self.datapath is not None:
            self.datapath.update(state)
        if self.names_reader is not None:
            table = await self.names_reader.poll()
            if table is not None:
                self.on_names(table)  # type: ignore[misc]

    @property
    def names_in_sync(self) -> bool:
        """True when the DNS server (if any) answers from the newest name table."""
        names = self.names_reader
        return names is None or (names.complete and names.problem is None)

    @property
    def in_sync(self) -> bool:
        read = self.reader.state
        return (self.datapath is not None and read is not None
                and self.reader.problem is None
                and self.datapath.applied_generation == read.generation
                and self.names_in_sync)

    def _store_problem(self) -> Optional[str]:
        """Why the newest node share or name table could not be read, if it could not."""
        names = self.names_reader
        return self.reader.problem or (names.problem if names is not None else None)

    def status(self) -> dict[str, Any]:
        read = self.reader.state
        store_problem = self._store_problem()
        if self.datapath is None:
            state, detail = "no-datapath", ("no bridge is configured (openflow.connect): "
                                            "nothing is enforced")
        elif read is None:
            state, detail = "waiting-for-store", self.reader.problem or \
                "no complete generation read yet"
        elif self.datapath.protocol is None:
            state, detail = "bridge-disconnected", "waiting for the OpenFlow connection"
        elif self.in_sync:
            state, detail = "applied", "the newest generation is confirmed by the bridge"
        elif self.datapath.last_error:
            state, detail = "bridge-error", self.datapath.last_error
        elif store_problem is not None:
            # Not "applying": the store is down or incomplete, and the bridge
            # keeps the last complete state read until it is whole again.
            applied = self.datapath.applied_generation
            state, detail = "store-error", store_problem + (
                f"; enforcing generation {applied}" if applied is not None else "")
        else:
            state, detail = "applying", "a change is being applied"
        status = {
            "role": "netplugin",
            "node": self.node,
            "state": state,
            "in_sync": self.in_sync,
            "generation": self.datapath.applied_generation if self.datapath else None,
            "read_generation": read.generation if read is not None else None,
            "detail": detail,
            "store_problem": self.reader.problem,
        }
        if self.names_reader is not None:
            names = self.names_reader
            status["dns_names"] = {"generation": names.table.generation,
                                   "names": len(names.table), "in_sync": self.names_in_sync,
                                   "problem": names.problem}
        if self.datapath is not None:
            status["datapath"] = self.datapath.status()
        return status
