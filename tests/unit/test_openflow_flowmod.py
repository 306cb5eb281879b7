"""Template-encoded flow-mods are byte for byte os-ken's, and decode back to the flow."""

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from contiv.datapath.flows import (CONTROLLER, CT_EST, CT_INV, CT_TRK, NORMAL, Conjunction,
                                   Ct, Goto, Meter, Output, flow)
from contiv.openflow.flowmod import (ADD, DELETE, DELETE_STRICT, MODIFY_STRICT, FlowEncoder,
                                     cidr_match, delete_by_cookie, to_message)
from contiv.openflow.ofp import decode, encode, ofproto

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
port = st.integers(0, 65535)


@st.composite
def flows(draw):
    family = draw(st.sampled_from(["v4", "v6"]))
    match = {"eth_type": 0x0800 if family == "v4" else 0x86DD}
    address = ipv4 if family == "v4" else ipv6
    prefix = "ipv4" if family == "v4" else "ipv6"
    bits = 32 if family == "v4" else 128
    for side in ("src", "dst"):
        if draw(st.booleans()):
            length = draw(st.integers(1, bits))
            network = ipaddress.ip_network(f"{draw(address)}/{length}", strict=False)
            match[f"{prefix}_{side}"] = cidr_match(str(network))
    protocol = draw(st.sampled_from([None, 6, 17, 132]))
    if protocol is not None:
        match["ip_proto"] = protocol
        field = {6: "tcp_dst", 17: "udp_dst", 132: "sctp_dst"}[protocol]
        if draw(st.booleans()):
            match[field] = draw(port)
        elif draw(st.booleans()):
            mask = (0xFFFF << draw(st.integers(0, 15))) & 0xFFFF
            match[field] = (draw(port) & mask, mask)
    if draw(st.booleans()):
        match["ct_state"] = draw(st.sampled_from([(CT_TRK | CT_EST, CT_TRK | CT_EST),
                                                  (CT_TRK | CT_INV, CT_TRK | CT_INV)]))
    if draw(st.booleans()):
        match["conj_id"] = draw(st.integers(0, 2**32 - 1))
    actions = []
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.integers(2, 4))
        actions.append(Conjunction(draw(st.integers(1, 2**32 - 1)),
                                   draw(st.integers(1, n)), n))
    if draw(st.booleans()):
        actions.append(Ct(zone=draw(st.integers(0, 65535)), commit=draw(st.booleans()),
                          table=draw(st.sampled_from([None, 10, 70]))))
    if draw(st.booleans()):
        actions.append(Output(draw(st.sampled_from([NORMAL, CONTROLLER, 1, 65000]))))
    if draw(st.booleans()):
        actions.append(Goto(draw(st.integers(1, 250))))
    return flow(draw(st.integers(0, 250)), draw(st.integers(0, 65535)), tuple(actions),
                cookie=draw(st.integers(0, 2**64 - 1)), **match)


@settings(max_examples=300, deadline=None)
@given(flows(), st.sampled_from([ADD, MODIFY_STRICT, DELETE_STRICT]),
       st.integers(0, 2**32 - 1))
def test_template_encoding_is_os_kens(one, command, xid):
    encoder = FlowEncoder()
    # Encode once to build the template, then a second flow of the same
    # shape: its bytes must come from the template, equal to os-ken's.
    encoder.encode(one, command, 1)
    assert encoder.encode(one, command, xid) == encode(to_message(one, command), xid)
    # ...and from a template, not from the os-ken fallback.
    assert all(template is not None for template in encoder._templates.values())


def test_round_trip_through_os_ken_decoder():
    one = flow(30, 120, (Conjunction(77, 2, 3), Goto(40)), cookie=0x5_000000C0,
               eth_type=0x0800, ipv4_dst=("10.1.0.0", "255.255.0.0"), ip_proto=6,
               tcp_dst=(8080, 0xFFF0))
    message = decode(FlowEncoder().encode(one, ADD, 99))
    assert message.xid == 99
    assert message.table_id == 30 and message.priority == 120
    assert message.cookie == 0x5_000000C0
    assert dict(message.match.items()) == {"eth_type": 0x0800,
                                           "ipv4_dst": ("10.1.0.0", "255.255.0.0"),
                                           "ip_proto": 6, "tcp_dst": (8080, 0xFFF0)}
    apply, goto = message.instructions
    (conjunction,) = apply.actions
    assert (conjunction.id, conjunction.clause, conjunction.n_clauses) == (77, 1, 3)
    assert goto.table_id == 40


def test_ct_and_output():
    one = flow(70, 10, (Ct(zone=1, commit=True), Output(NORMAL)), eth_type=0x86DD)
    message = decode(FlowEncoder().encode(one, ADD, 1))
    ct, output = message.instructions[0].actions
    assert ct.flags == 1 and ct.zone_ofs_nbits == 1
    assert output.port == ofproto.OFPP_NORMAL


def test_masked_value_outside_mask_is_masked():
    one = flow(30, 1, (), eth_type=0x0800, ip_proto=17, udp_dst=(0x1234, 0xFF00))
    message = decode(FlowEncoder().encode(one, ADD, 1))
    assert message.match["udp_dst"] == (0x1200, 0xFF00)


def test_delete_by_cookie():
    message = decode(delete_by_cookie(0x7_000000C0, 0xFFFFFFFF_FFFFFFFF, 5))
    assert message.command == DELETE
    assert (message.cookie, message.cookie_mask) == (0x7_000000C0, 0xFFFFFFFF_FFFFFFFF)
    assert message.table_id == ofproto.OFPTT_ALL


def test_cidr_match():
    assert cidr_match("10.0.0.7/32") == "10.0.0.7"
    assert cidr_match("10.0.0.7/24") == ("10.0.0.0", "255.255.255.0")
    assert cidr_match("fd00::/16") == ("fd00::", "ffff::")


@pytest.mark.parametrize("command", [ADD, MODIFY_STRICT, DELETE_STRICT])
def test_many_conjunctions_encode_from_a_template(command):
    # A clause flow shared by many rules: its actions are located in one go.
    many = flow(50, 100, tuple(Conjunction(1000 + i, 1 + i % 3, 3) for i in range(60)),
                cookie=5, eth_type=0x0800, ipv4_dst="10.1.2.3")
    encoder = FlowEncoder()
    assert encoder.encode(many, command, 7) == encode(to_message(many, command), 7)
    assert all(template is not None for template in encoder._templates.values())


@pytest.mark.parametrize("command", [ADD, MODIFY_STRICT, DELETE_STRICT])
def test_meter_and_dns_steering_flows_encode_from_a_template(command):
    encoder = FlowEncoder()
    metered = flow(20, 200, (Meter(1), Output(CONTROLLER)), eth_type=0x0800, ip_proto=17,
                   udp_dst=53)
    steering = flow(10, 250, (Goto(20),), eth_type=0x86DD, ipv6_src="fd00::5", ip_proto=17,
                    udp_dst=53, ct_state=(CT_TRK, CT_TRK | CT_INV), reg0=(0, 1))
    for one in (metered, steering):
        encoder.encode(one, command, 1)
        assert encoder.encode(one, command, 7) == encode(to_message(one, command), 7)
    assert all(template is not None for template in encoder._templates.values())
    if command == ADD:
        message = decode(encoder.encode(flow(20, 200, (Meter(9), Output(CONTROLLER)),
                                             eth_type=0x86DD, ip_proto=17, udp_dst=53),
                                        command, 2))
        meter, apply = message.instructions
        assert meter.meter_id == 9
        assert apply.actions[0].port == ofproto.OFPP_CONTROLLER
        assert apply.actions[0].max_len == ofproto.OFPCML_NO_BUFFER
        steer = decode(encoder.encode(steering, command, 3))
        assert steer.match["reg0"] == (0, 1)
