"""
The datapath manager against a fake switch that keeps a flow table the way
OVS does for bundles: all or nothing, adds replacing flows of the same
identity, deletes by identity and cookie, deletes by cookie mask.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from contiv.datapath.manager import MARK, ChangeRejected, DatapathManager, cookie_for, round_of
from contiv.openflow.flowmod import ADD, DELETE, DELETE_STRICT, MODIFY_STRICT
from contiv.datapath.pipeline import DNS_INTERCEPT, DNS_METER_ID
from contiv.openflow.ofp import decode, ofproto, parser
from contiv.openflow.packetio import reply_out
from contiv.openflow.protocol import OpenFlowError, PipelineError
from contiv.policy.types import (INGRESS, CompiledPolicy, Group, GroupSelector, LabelSelector,
                                 LocalPod, Member, NodeIndex, PortRule, Rule)
from contiv.store.layout import NodeState


def identity(message):
    return (message.table_id, message.priority,
            tuple(sorted((k, v) for k, v in message.match.items())))


class FakeSwitch:
    """What the manager uses of OpenFlowProtocol, over a dict of flows."""

    def __init__(self):
        self.flows = {}  # identity -> (cookie, instructions)
        self.on_disconnect = None
        self.xid = 0
        self.bundles = {}
        self.refuse = None  # predicate on a decoded flow-mod: OVS rejects it
        self.bundle_count = 0

    def next_xid(self):
        self.xid += 1
        return self.xid

    def flow_stats(self, cookie=0, cookie_mask=0):
        return succeed([SimpleNamespace(cookie=c) for c, _ in self.flows.values()
                        if c & cookie_mask == cookie & cookie_mask])

    def open_bundle(self):
        self.bundle_count += 1
        self.bundles[self.bundle_count] = []
        return succeed(self.bundle_count)

    def add_many_to_bundle(self, bundle, encoded):
        first = None
        for data in encoded:
            xid = self.next_xid()
            first = first or xid
            self.bundles[bundle].append((xid, decode(data)))
        return first

    def commit_bundle(self, bundle):
        messages = self.bundles.pop(bundle)
        errors = [OpenFlowError(2, 10, "OFPET_BAD_ACTION", "OFPBAC_MATCH_INCONSISTENT",
                                xid=xid) for xid, m in messages if self.refuse and self.refuse(m)]
        if errors:
            return fail(PipelineError(errors, f"bundle {bundle}, not committed"))
        for _, message in messages:
            self.apply(message)
        return succeed(None)

    def apply(self, message):
        key = identity(message)
        if message.command == ADD:
            self.flows[key] = (message.cookie, message.instructions)
        elif message.command == MODIFY_STRICT:
            cookie, _ = self.flows[key]
            assert cookie & message.cookie_mask == message.cookie & message.cookie_mask
            self.flows[key] = (cookie, message.instructions)
        elif message.command == DELETE_STRICT:
            cookie, _ = self.flows[key]
            assert cookie & message.cookie_mask == message.cookie & message.cookie_mask
            del self.flows[key]
        elif message.command == DELETE:
            self.flows = {k: v for k, v in self.flows.items()
                          if v[0] & message.cookie_mask != message.cookie & message.cookie_mask}

    def send_raw(self, data):
        for one in data:
            self.apply(decode(one))

    def barrier(self, since=None):
        return succeed(self.next_xid())


class FakeSettings:
    def __init__(self):
        self.round = 0
        self.secured = 0

    def secure(self):
        self.secured += 1
        return succeed(None)

    def identify(self, datapath_id):
        return succeed("br0")

    def next_round(self, seen=0):
        self.round = max(self.round, seen) + 1
        return succeed(self.round)


def state(generation, peers=("10.0.0.2",), port=80):
    local = Group(GroupSelector("default", None, LabelSelector((("app", "web"),))).id,
                  (Member("10.0.0.1", "default/web"),))
    peer = Group(GroupSelector("default", None, LabelSelector((("app", "client"),))).id,
                 tuple(Member(ip, f"default/client-{i}") for i, ip in enumerate(peers)))
    policy = CompiledPolicy("default", "allow", local.id, (INGRESS,), (
        Rule(INGRESS, (peer.id,), (), False, (PortRule("TCP", port),)),))
    index = NodeIndex("node-1", (policy.id,), tuple(sorted((local.key, peer.key))),
                      (LocalPod("default/web", ("10.0.0.1",)),))
    return NodeState(generation, index, {policy.id: policy},
                     {local.key: local, peer.key: peer})


class DatapathManagerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.settings = FakeSettings()
        self.switch = FakeSwitch()
        self.manager = DatapathManager(self.clock, self.settings)

    def ours(self):
        return {k: v for k, v in self.switch.flows.items() if v[0] & 0xFFFFFFFF == MARK}

    def test_install_then_apply_only_the_difference(self):
        self.manager.update(state(1))
        self.successResultOf(self.manager.connected(self.switch))
        self.assertEqual(self.manager.applied_generation, 1)
        self.assertEqual(self.settings.secured, 1)
        installed = dict(self.switch.flows)
        self.assertEqual({round_of(c) for c, _ in installed.values()}, {1})

        self.successResultOf(self.manager.update(state(2, peers=("10.0.0.2", "10.0.0.3"))))
        self.assertEqual(self.manager.applied_generation, 2)
        self.assertEqual(self.switch.bundle_count, 2)  # the install, then one change
        added = set(self.switch.flows) - set(installed)
        self.assertEqual(len(added), 1)  # one peer address: one flow
        self.assertEqual(set(installed) - set(self.switch.flows), set())

    def test_changed_flows_are_added_over_their_old_selves(self):
        self.manager.update(state(1))
        self.successResultOf(self.manager.connected(self.switch))
        sent = []
        apply = self.switch.apply
        self.switch.apply = lambda message: (sent.append(message.command), apply(message))
        # A new port: a new conjunction id, so the local pod's clause flow changes.
        self.successResultOf(self.manager.update(state(2, port=81)))
        self.assertNotIn(MODIFY_STRICT, sent)
        self.assertIn(DELETE_STRICT, sent)  # the old port and conj_id flows
        wanted = {flow.identity: flow for flow in self.manager.pipeline.flows.values()}
        self.assertEqual(self.manager.installed, wanted)
        self.assertEqual(len(self.switch.flows), len(wanted))

    def test_rejected_change_applies_nothing_and_is_reported(self):
        self.manager.update(state(1))
        self.successResultOf(self.manager.connected(self.switch))
        before = dict(self.switch.flows)
        self.switch.refuse = lambda m: m.command == ADD and \
            dict(m.match.items()).get("tcp_dst") == 81
        self.successResultOf(self.manager.update(state(2, port=81)))
        self.assertEqual(self.switch.flows, before)
        self.assertEqual(self.manager.applied_generation, 1)
        self.assertIn("OFPBAC_MATCH_INCONSISTENT", self.manager.last_error)
        self.assertIn("tcp_dst", self.manager.last_error)  # names the refused flow
        # The next good generation goes through, computed against what is installed.
        self.switch.refuse = None
        self.successResultOf(self.manager.update(state(3, port=82)))
        self.assertEqual(self.manager.applied_generation, 3)
        self.assertIsNone(self.manager.last_error)

    def test_reconnect_installs_a_new_round_then_deletes_the_old(self):
        foreign = ((0, 5, (("eth_type", 0x0800),)), (0x1234, []))
        self.switch.flows[foreign[0]] = foreign[1]
        self.manager.update(state(1))
        self.successResultOf(self.manager.connected(self.switch))
        first = self.ours()
        # Something stale of round 1 that the new pipeline does not have.
        stale = (50, 7, (("eth_type", 0x0800),))
        self.switch.flows[stale] = (cookie_for(1), [])
        self.successResultOf(self.manager.connected(self.switch))  # netplugin restarted
        self.assertEqual({round_of(c) for c, _ in self.ours().values()}, {2})
        self.assertEqual(set(self.ours()), set(first))
        self.assertNotIn(stale, self.switch.flows)
        self.assertEqual(self.switch.flows[foreign[0]], foreign[1])  # never touched

    def test_reinstall_is_a_new_round_with_the_same_flows(self):
        self.manager.update(state(1))
        self.successResultOf(self.manager.connected(self.switch))
        first = self.ours()
        # A flow of ours that someone deleted by hand: the reinstall brings it back.
        removed = next(iter(first))
        del self.switch.flows[removed]
        self.successResultOf(self.manager.reinstall())
        self.assertEqual({round_of(c) for c, _ in self.ours().values()}, {2})
        self.assertEqual(set(self.ours()), set(first))
        self.assertEqual(self.manager.applied_generation, 1)

    def test_ovs_restart_reinstalls_everything(self):
        self.manager.update(state(1))
        self.successResultOf(self.manager.connected(self.switch))
        count = len(self.switch.flows)
        fresh = FakeSwitch()  # OVS restarted: no flows
        self.successResultOf(self.manager.connected(fresh))
        self.assertEqual(len(fresh.flows), count)
        self.assertEqual(self.manager.applied_generation, 1)

    def test_nothing_before_a_state_or_a_connection(self):
        self.successResultOf(self.manager.connected(self.switch))
        self.assertEqual(self.switch.flows, {})
        self.assertIsNone(self.manager.applied_generation)
        manager = DatapathManager(self.clock, FakeSettings())
        self.successResultOf(manager.update(state(1)))
        self.assertIsNone(manager.applied_generation)

    def test_change_rejected_names_culprits(self):
        error = ChangeRejected(RuntimeError("boom"), ["flow-a (X)"])
        self.assertIn("nothing of it applied", str(error))
        self.assertIn("flow-a", str(error))


class BrokenPipelineTests(unittest.TestCase):
    def test_a_failed_pipeline_update_is_recovered_by_a_full_comparison(self):
        clock, switch = Clock(), FakeSwitch()
        manager = DatapathManager(clock, FakeSettings())
        manager.update(state(1))
        self.successResultOf(manager.connected(switch))
        original = manager.pipeline.update

        def fails_once(new_state):
            manager.pipeline.update = original
            raise RuntimeError("generator bug")

        manager.pipeline.update = fails_once
        self.successResultOf(manager.update(state(2, port=81)))
        self.assertIn("generator bug", manager.last_error)
        self.assertEqual(manager.applied_generation, 1)
        self.successResultOf(manager.update(state(3, port=82)))
        self.assertEqual(manager.applied_generation, 3)
        # The bridge holds exactly what a fresh pipeline wants for generation 3.
        fresh = DatapathManager(Clock(), FakeSettings())
        fresh.update(state(3, port=82))
        other = FakeSwitch()
        self.successResultOf(fresh.connected(other))
        ports = {dict(k[2]).get("tcp_dst") for k in switch.flows} - {None}
        self.assertEqual(ports, {dict(k[2]).get("tcp_dst") for k in other.flows} - {None})
        self.assertEqual(len(switch.flows), len(other.flows))


class DnsSwitch(FakeSwitch):
    """A FakeSwitch that also takes SET_ASYNC, meters and packet-outs."""

    def __init__(self, meters=None, refuse_meters=False):
        super().__init__()
        self.meters = {} if meters is None else meters
        self.refuse_meters = refuse_meters
        self.async_masks = None
        self.packet_outs = []
        self._errors = []

    def set_async(self, packet_in_mask):
        self.async_masks = packet_in_mask
        return succeed(None)

    def send(self, message):
        xid = self.next_xid()
        if isinstance(message, parser.OFPMeterMod):
            if self.refuse_meters:
                self._errors.append(OpenFlowError(12, 11, "OFPET_METER_MOD_FAILED",
                                                  "OFPMMFC_OUT_OF_METERS", xid=xid))
            elif message.command == ofproto.OFPMC_ADD and message.meter_id in self.meters:
                self._errors.append(OpenFlowError(12, 1, "OFPET_METER_MOD_FAILED",
                                                  "OFPMMFC_METER_EXISTS", xid=xid))
            else:
                self.meters[message.meter_id] = message
        return xid

    def barrier(self, since=None):
        errors, self._errors = self._errors, []
        if errors:
            return fail(PipelineError(errors))
        return succeed(self.next_xid())

    def send_quiet(self, message):
        self.packet_outs.append(message)
        return self.next_xid()


def instructions_of(switch, table):
    return [instructions for (t, _, _), (_, instructions) in switch.flows.items() if t == table]


class DnsInterceptTests(unittest.TestCase):
    def test_meter_installed_before_the_flows_that_use_it(self):
        switch = DnsSwitch()
        manager = DatapathManager(Clock(), FakeSettings(), dns_intercept=True, dns_rate=500,
                                  dns_burst=50)
        manager.update(state(1))
        self.successResultOf(manager.connected(switch))
        self.assertEqual(switch.async_masks, 1 << ofproto.OFPR_ACTION)
        meter = switch.meters[DNS_METER_ID]
        (band,) = meter.bands
        self.assertEqual((band.rate, band.burst_size), (500, 50))
        self.assertTrue(meter.flags & ofproto.OFPMF_PKTPS)
        metered = [i for i in instructions_of(switch, DNS_INTERCEPT) if len(i) == 2]
        self.assertEqual(len(metered), 2)  # IPv4 and IPv6
        self.assertTrue(all(i[0].meter_id == DNS_METER_ID for i in metered))
        self.assertTrue(manager.dns_metered)
        self.assertEqual(manager.status()["dns_intercept"]["limited_by"], "ovs meter 1")
        # netplugin restarted: the meter is there already, and is modified
        again = DnsSwitch(meters=switch.meters)
        again.flows = dict(switch.flows)
        manager.dns_rate = 800
        self.successResultOf(manager.connected(again))
        self.assertEqual(again.meters[DNS_METER_ID].bands[0].rate, 800)
        self.assertEqual(again.meters[DNS_METER_ID].command, ofproto.OFPMC_MODIFY)
        self.assertIsNone(manager.last_error)

    def test_refused_meters_mean_a_software_limit(self):
        switch = DnsSwitch(refuse_meters=True)
        manager = DatapathManager(Clock(), FakeSettings(), dns_intercept=True)
        manager.update(state(1))
        self.successResultOf(manager.connected(switch))
        self.assertEqual(manager.applied_generation, 1)
        self.assertFalse(manager.dns_metered)
        self.assertIn("OFPMMFC_OUT_OF_METERS",
                      manager.status()["dns_intercept"]["limited_by"])
        self.assertIn("software", manager.status()["dns_intercept"]["limited_by"])
        to_controller = instructions_of(switch, DNS_INTERCEPT)
        self.assertTrue(to_controller)
        self.assertTrue(all(len(i) == 1 and i[0].actions[0].port == ofproto.OFPP_CONTROLLER
                            for i in to_controller if i and hasattr(i[0], "actions")))

    def test_packet_out_goes_quietly_and_not_without_a_connection(self):
        manager = DatapathManager(Clock(), FakeSettings(), dns_intercept=True)
        message = reply_out(b"frame", 3)
        self.assertFalse(manager.packet_out(message))
        switch = DnsSwitch()
        self.successResultOf(manager.connected(switch))
        self.assertTrue(manager.packet_out(message))
        self.assertEqual(switch.packet_outs, [message])
        switch.on_disconnect(None)
        self.assertFalse(manager.packet_out(message))
