"""tc flow accounting of UDP (and other port-carrying protocols) with known datagram sizes: exact packets
and bytes per flow and direction, over IPv4 and IPv6, through a bridge, with 802.1Q tags, fragments,
IPv6 extension headers and SCTP, with the ring buffer and with perf buffers."""

from __future__ import annotations

import pytest

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import (
    TRANSPORT_NAMES,
    TRANSPORTS,
    Hosts,
    assert_flow_map_balanced,
    flow_totals,
    start_sink,
    two_hosts,
    udp_frame,
    udp_id,
)

# (sending side, source port, destination port, payload bytes, datagrams)
UDP_FLOWS = [
    ("a", 5001, 7001, 100, 30),
    ("a", 5002, 7002, 1000, 20),
    ("a", 5003, 7001, 0, 5),  # an empty datagram: headers only
    ("b", 7003, 5103, 1, 25),
    ("b", 7004, 5104, 1400, 12),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", [4, 6])
def test_udp_packets_and_bytes_are_exact(tc_lab: Lab, version: int, transport: str) -> None:
    hosts = two_hosts(tc_lab)
    start_sink(hosts.b, "udp-sink", hosts.address("b", version), "7001", "7002")
    start_sink(hosts.a, "udp-sink", hosts.address("a", version), "5103", "5104")
    run = Capture.start(hosts.a, ["fstcA"], 0.5, *TRANSPORTS[transport])
    for side, sport, dport, size, count in UDP_FLOWS:
        hosts.udp(side, version, sport, dport, size, count)
    result = run.stop()

    a, b = hosts.address("a", version), hosts.address("b", version)
    expected = {}
    for side, sport, dport, size, count in UDP_FLOWS:
        src, dst, direction = (a, b, "egress") if side == "a" else (b, a, "ingress")
        expected[udp_id(direction, version, src, sport, dst, dport)] = (count, count * udp_frame(version, size))
    assert flow_totals(result.flows, "fstcA", {a, b}) == expected
    mine = result.flows[result.flows["ifname"] == "fstcA"]
    assert set(mine["ifindex"]) == {hosts.port_a.ifindex}
    udp = mine[mine["protocol"] == "UDP"]
    assert set(udp["ip_version"]) == {version}
    assert udp["tcp_flags"].isna().all() and udp["icmp_type"].isna().all()
    assert_flow_map_balanced(result)
    assert result.summary["events_transport"] == TRANSPORT_NAMES[transport]
    assert result.summary["interrupted"] is True


def test_bridge_ports_count_each_hop(tc_lab: Lab) -> None:
    """Two hosts behind a bridge; capture watches both bridge ports: a datagram from a to b enters the
    bridge at a's port (ingress) and leaves it at b's port (egress), with the same length."""
    a, b, switch = tc_lab.namespace("a"), tc_lab.namespace("b"), tc_lab.namespace("s")
    port_a, switch_a = tc_lab.veth(a, "fstcA", switch, "fstcSa")
    port_b, switch_b = tc_lab.veth(b, "fstcB", switch, "fstcSb")
    tc_lab.bridge(switch, "fstcBr", (switch_a, switch_b))
    tc_lab.address_pair(port_a, port_b, subnet=2)
    hosts = Hosts(tc_lab, a, b, port_a, port_b)
    start_sink(b, "udp-sink", port_b.ip4, "7001")
    start_sink(b, "udp-sink", port_b.ip6, "7001")
    start_sink(a, "udp-sink", port_a.ip4, "5101")
    run = Capture.start(switch, ["fstcSa", "fstcSb"], 0.5)
    hosts.udp("a", 4, 5001, 7001, 200, 40)
    hosts.udp("a", 6, 5001, 7001, 300, 30)
    hosts.udp("b", 4, 7002, 5101, 50, 10)
    result = run.stop()

    v4, v6 = udp_frame(4, 200), udp_frame(6, 300)
    addresses = {port_a.ip4, port_b.ip4, port_a.ip6, port_b.ip6}
    assert flow_totals(result.flows, "fstcSa", addresses) == {
        udp_id("ingress", 4, port_a.ip4, 5001, port_b.ip4, 7001): (40, 40 * v4),
        udp_id("ingress", 6, port_a.ip6, 5001, port_b.ip6, 7001): (30, 30 * v6),
        udp_id("egress", 4, port_b.ip4, 7002, port_a.ip4, 5101): (10, 10 * udp_frame(4, 50)),
    }
    assert flow_totals(result.flows, "fstcSb", addresses) == {
        udp_id("egress", 4, port_a.ip4, 5001, port_b.ip4, 7001): (40, 40 * v4),
        udp_id("egress", 6, port_a.ip6, 5001, port_b.ip6, 7001): (30, 30 * v6),
        udp_id("ingress", 4, port_b.ip4, 7002, port_a.ip4, 5101): (10, 10 * udp_frame(4, 50)),
    }
    assert_flow_map_balanced(result)
