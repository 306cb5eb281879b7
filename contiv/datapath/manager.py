"""
Keeps the bridge's flow tables equal to the pipeline of the newest complete
node state.

Every change goes to OVS as one atomic, ordered bundle: the difference
between the flows installed and the flows wanted (deletes, then adds; a
changed flow is added over its old self), so no packet ever meets half a
policy. A bundle OVS rejects applies nothing; the flows installed stay as they
were and the error is reported.

Flows carry a cookie: the round number in the high 32 bits, contiv's mark in
the low 32. On every (re)connection -- netplugin restarted, OVS restarted --
a new round is taken from OVSDB and the whole pipeline is installed with it
(an add replaces an old-round flow of the same identity in place), and only
once that is confirmed are the flows of older rounds deleted, by cookie. The
bridge is never flushed and flows without contiv's mark are never touched.

With DNS interception on, every (re)connection also asks OVS for packet-ins
(SET_ASYNC: a management-socket connection gets none otherwise) and installs
the meter that bounds them before any flow refers to it; if OVS refuses
meters, the pipeline goes without and C{dns_metered} is False, which tells
the interceptor to limit in software. C{packet_out} is how the interceptor
answers and re-injects.
"""

from __future__ import annotations

from collections import Counter as CountBy
from typing import Any, Optional

from prometheus_client import Counter, Gauge, Histogram
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from contiv.datapath.flows import Flow
from contiv.datapath.pipeline import DNS_METER_ID, ConjunctionIds, IncrementalPipeline
from contiv.metrics import REGISTRY
from contiv.openflow.flowmod import ADD, DELETE_STRICT, MODIFY_STRICT, FlowEncoder, \
    delete_by_cookie
from contiv.openflow.ofp import ofproto
from contiv.openflow.packetio import meter_mod
from contiv.openflow.protocol import NotConnected, PipelineError

MARK = 0x00C0_7100
MARK_MASK = 0xFFFF_FFFF
ALL_BITS = 0xFFFF_FFFF_FFFF_FFFF

FLOWS = Gauge("contiv_datapath_flows", "flows contiv has installed in the bridge",
              registry=REGISTRY)
CHANGES = Counter("contiv_datapath_flow_mods", "flow-mods sent in bundles, by command",
                  ["command"], registry=REGISTRY)
REJECTED = Counter("contiv_datapath_rejected_changes",
                   "changes OVS rejected (rolled back whole)", registry=REGISTRY)
APPLY_SECONDS = Histogram("contiv_datapath_apply_seconds",
                          "time to compute, send and confirm one change",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1, 2.5, 5, 10, 30), registry=REGISTRY)


def cookie_for(round_number: int) -> int:
    return ((round_number & 0xFFFF_FFFF) << 32) | MARK


def round_of(cookie: int) -> Optional[int]:
    return cookie >> 32 if cookie & MARK_MASK == MARK else None


# About what a unix socket's buffer takes in one write: measured on OVS 3.1,
# 1,500-flow chunks let OVS install while Python encodes (300,000 flows in
# 1.6 s against 1.9 s in one piece); 5,000 or 10,000 were no better than one.
CHUNK = 1_500


async def add_in_chunks(protocol: Any, bundle: int, encoder: FlowEncoder,
                        changes: list[tuple[int, Flow]], clock: Any,
                        chunk: int = CHUNK) -> Optional[int]:
    """
    Encode a change into an open bundle a chunk at a time, giving the reactor
    a turn to write each chunk before encoding the next, so that OVS works on
    one chunk on the other core meanwhile. Returns the first message's xid.
    """
    encode = encoder.encode
    first = None
    for start in range(0, len(changes), chunk):
        if start:
            await deferLater(clock, 0, lambda: None)
        xid = protocol.add_many_to_bundle(
            bundle, [encode(flow, command, 0) for command, flow in changes[start:start + chunk]])
        if first is None:
            first = xid
    return first


class ChangeRejected(Exception):
    """OVS refused a bundle; nothing of it applied. Names the flows it refused."""

    def __init__(self, error: Exception, culprits: list[str]):
        self.error = error
        self.culprits = culprits
        named = f"; refused: {'; '.join(culprits[:3])}" if culprits else ""
        super().__init__(f"OVS rejected the change, nothing of it applied: {error}{named}")


def _culprits(error: Exception, first: Optional[int], changes: list) -> list[str]:
    """The flows whose xids the errors carry (xids were handed out in order)."""
    if first is None:
        return []
    named = []
    for one in getattr(error, "errors", [error]):
        xid = getattr(one, "xid", None)
        if xid is None:
            continue
        position = (xid - first) & 0xFFFF_FFFF
        if position < len(changes):
            command, flow = changes[position]
            named.append(f"{flow} ({getattr(one, 'code_name', one)})")
    return named


class DatapathManager:
    log = Logger()

    def __init__(self, clock: Any, settings: Any, *, zone: int = 1,
                 dns_intercept: bool = False, dns_rate: int = 2000, dns_burst: int = 200):
        self.clock = clock
        self.settings = settings
        self.zone = zone
        self.dns_intercept = dns_intercept
        # DNS packet-ins per second the bridge lets through to us (per node:
        # one meter for every pod), and the burst above that rate it allows.
        self.dns_rate = dns_rate
        self.dns_burst = dns_burst
        self.dns_meter: Optional[int] = None  # the meter in the pipeline, when OVS took it
        self.dns_meter_error: Optional[str] = None
        self.encoder = FlowEncoder()
        self.conjunction_ids = ConjunctionIds()
        self.pipeline = IncrementalPipeline(zone=zone, dns_intercept=dns_intercept,
                                            conjunction_ids=self.conjunction_ids)
        self._resync = False
        self.protocol: Any = None
        self.round: Optional[int] = None
        self.installed: dict[tuple, Flow] = {}
        self.state: Any = None
        self.applied_generation: Optional[int] = None
        self.last_error: Optional[str] = None
        self._fresh_connection = False
        self._running: Optional[Deferred] = None
        self._again = False

    # -- inputs

    def connected(self, protocol: Any) -> Deferred:
        """A (re)connection: whatever was installed may be gone (OVS restarted)."""
        self.protocol = protocol
        self._fresh_connection = True
        self.applied_generation = None
        if protocol.on_disconnect is None:
            protocol.on_disconnect = lambda reason: self._lost(protocol)
        return self._kick()

    def _lost(self, protocol: Any) -> None:
        if self.protocol is protocol:
            self.protocol = None
            self.applied_generation = None

    def reinstall(self) -> Deferred:
        """
        Install the whole pipeline again as a new round, then delete the older
        rounds, as after a reconnection: for an operator who distrusts what the
        bridge holds (from the manhole). Traffic sees no gap.
        """
        self._fresh_connection = True
        return self._kick()

    def update(self, state: Any) -> Deferred:
        """A newer complete node state from the store."""
        self.state = state
        return self._kick()

    # -- the loop: one change at a time, the newest state wins

    def _kick(self) -> Deferred:
        if self._running is not None:
            self._again = True
            return self._running
        running = Deferred.fromCoroutine(self._loop())
        self._running = None if running.called else running
        return running

    async def _loop(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self._apply()
                except Exception as e:
                    self.last_error = str(e)
                    self.log.error("applying generation {generation} to the bridge failed: "
                                   "{error}", generation=getattr(self.state, "generation", None),
                                   error=e)
                if not self._again:
                    return
        finally:
            self._running = None

    async def _apply(self) -> None:
        protocol, state = self.protocol, self.state
        if protocol is None or state is None:
            return
        started = self.clock.seconds()
        if self._fresh_connection:
            await self._install_round(protocol, state)
        else:
            await self._install_difference(protocol, state)
        self.applied_generation = state.generation
        self.last_error = None
        APPLY_SECONDS.observe(self.clock.seconds() - started)

    def _wanted(self, state: Any) -> set[tuple]:
        """Bring the pipeline to this state; the identities whose flow changed."""
        return self.pipeline.update(state)

    async def _install_round(self, protocol: Any, state: Any) -> None:
        ours = await protocol.flow_stats(cookie=MARK, cookie_mask=MARK_MASK)
        rounds = {round_of(stats.cookie) for stats in ours}
        await self.settings.identify(getattr(protocol, "datapath_id", None))
        await self.settings.secure()
        self.round = await self.settings.next_round(max(rounds, default=0) or 0)
        if self.dns_intercept:
            await self._prepare_dns(protocol)
        # A new round is a new cookie on every flow: start the pipeline afresh.
        self.pipeline = self._fresh_pipeline(cookie_for(self.round))
        self._wanted(state)
        wanted = dict(self.pipeline.flows)
        await self._bundle(protocol, [(ADD, flow) for flow in wanted.values()])
        # The new round is in place: only now may the old rounds go.
        if rounds:
            protocol.send_raw([delete_by_cookie(cookie_for(old), ALL_BITS,
                                                protocol.next_xid()) for old in sorted(rounds)])
            await protocol.barrier()
        self.installed = wanted
        self._resync = False
        self._fresh_connection = False
        FLOWS.set(len(wanted))
        self.log.info("installed round {round}: {flows} flows for generation {generation}; "
                      "deleted rounds {old}", round=self.round, flows=len(wanted),
                      generation=state.generation, old=sorted(rounds))

    async def _install_difference(self, protocol: Any, state: Any) -> None:
        try:
            touched = self._wanted(state)
        except Exception:
            # A half-applied update leaves the pipeline's merged flows behind
            # its contributions: start it afresh and compare everything next time.
            self.pipeline = self._fresh_pipeline(cookie_for(self.round or 0))
            self._resync = True
            raise
        wanted = self.pipeline.flows
        installed = self.installed
        if self._resync:
            # The last change was rejected: the pipeline moved on, the bridge
            # did not. Compare everything once.
            touched = installed.keys() | wanted.keys()
        changes = []
        replaced = 0
        for identity in touched:
            old, new = installed.get(identity), wanted.get(identity)
            if new is None:
                if old is not None:
                    changes.append((DELETE_STRICT, old))
            elif old != new:
                # A changed flow is added over its old self, not modified: an
                # OpenFlow 1.3 add of the same identity replaces the flow (its
                # counters kept), and OVS 3.1 takes that about ten times faster
                # than MODIFY_STRICT (200 conjunction flows of an 11,600-flow
                # table: 4 ms against 55 ms), which was most of an event's p99.
                replaced += old is not None
                changes.append((ADD, new))
        if changes:
            try:
                await self._bundle(protocol, changes, replaced)
            except Exception:
                self._resync = True
                raise
        self._resync = False
        # Updated in place with what changed, not copied from the pipeline's:
        # an event costs what it changed, not the node's every flow.
        for command, flow in changes:
            if command == DELETE_STRICT:
                del installed[flow.identity]
            else:
                installed[flow.identity] = flow
        FLOWS.set(len(wanted))

    async def _bundle(self, protocol: Any, changes: list[tuple[int, Flow]],
                      replaced: int = 0) -> None:
        """
        One atomic, ordered bundle: deletes first, so that no add meets a stale
        twin. C{replaced} of the adds replace a flow (counted as modifies).
        """
        order = {DELETE_STRICT: 0, MODIFY_STRICT: 1, ADD: 2}
        changes.sort(key=lambda change: order[change[0]])
        bundle = await protocol.open_bundle()
        first = await add_in_chunks(protocol, bundle, self.encoder, changes, self.clock)
        try:
            await protocol.commit_bundle(bundle)
        except Exception as e:
            REJECTED.inc()
            raise ChangeRejected(e, _culprits(e, first, changes)) from None
        sent = CountBy(command for command, _ in changes)
        sent[ADD] -= replaced
        sent[MODIFY_STRICT] += replaced
        for command, name in ((ADD, "add"), (MODIFY_STRICT, "modify"),
                              (DELETE_STRICT, "delete")):
            if sent[command]:
                CHANGES.labels(name).inc(sent[command])

    def _fresh_pipeline(self, cookie: int) -> IncrementalPipeline:
        return IncrementalPipeline(zone=self.zone, dns_intercept=self.dns_intercept,
                                   cookie=cookie, conjunction_ids=self.conjunction_ids,
                                   dns_meter=self.dns_meter)

    # -- DNS interception

    async def _prepare_dns(self, protocol: Any) -> None:
        """
        Packet-ins on, and the meter in place (added, or changed if a previous
        run left one) before the pipeline that refers to it is installed.
        """
        await protocol.set_async(packet_in_mask=1 << ofproto.OFPR_ACTION)
        self.dns_meter, self.dns_meter_error = DNS_METER_ID, None
        for command in (ofproto.OFPMC_ADD, ofproto.OFPMC_MODIFY):
            xid = protocol.send(meter_mod(DNS_METER_ID, self.dns_rate, self.dns_burst,
                                          command=command))
            try:
                await protocol.barrier(since=xid)
                break
            except PipelineError as e:
                if command == ofproto.OFPMC_ADD and e.code_name == "OFPMMFC_METER_EXISTS":
                    continue
                self.dns_meter, self.dns_meter_error = None, str(e)
                self.log.warn("OVS refused the DNS meter ({error}): DNS packet-ins are "
                              "limited in software instead", error=e)
                break

    @property
    def dns_metered(self) -> bool:
        """Whether the bridge itself bounds DNS packet-ins (else the interceptor must)."""
        return self.dns_meter is not None

    def packet_out(self, message: Any) -> bool:
        """
        Send a packet-out (see L{contiv.openflow.packetio}) without waiting;
        False when there is no connection to send it on. Its error, if OVS
        has one, is logged and counted, never blamed on a change.
        """
        protocol = self.protocol
        if protocol is None:
            return False
        try:
            protocol.send_quiet(message)
        except NotConnected:
            return False
        return True

    # -- reporting

    def status(self) -> dict[str, Any]:
        status = {"round": self.round, "flows": len(self.installed),
                  "connected": self.protocol is not None,
                  "applied_generation": self.applied_generation, "error": self.last_error}
        if self.dns_intercept:
            if self.dns_meter is not None:
                limit = f"ovs meter {self.dns_meter}"
            elif self.dns_meter_error is not None:
                limit = f"software (OVS refused the meter: {self.dns_meter_error})"
            else:
                limit = "not yet connected"
            status["dns_intercept"] = {"rate": self.dns_rate, "burst": self.dns_burst,
                                       "limited_by": limit}
        return status
