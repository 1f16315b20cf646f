"""Which interfaces capture watches: by default every interface that is up except lo; `-i lo` watches
loopback, where each packet passes egress and then ingress of the same interface."""

from __future__ import annotations

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import (
    Hosts,
    assert_flow_map_balanced,
    flow_totals,
    flowscope_filters,
    run_traffic,
    start_sink,
    udp_frame,
    udp_id,
)


def test_by_default_every_interface_that_is_up_except_lo(tc_lab: Lab) -> None:
    a, b, c = tc_lab.namespace("a"), tc_lab.namespace("b"), tc_lab.namespace("c")
    port_ab, port_b = tc_lab.link(a, "fstcA", b, "fstcB", subnet=1)
    port_ac, port_c = tc_lab.link(a, "fstcC", c, "fstcCc", subnet=2)
    a.run("ip", "link", "add", "fstcD", "type", "veth", "peer", "name", "fstcE")  # both ends stay down
    to_b, to_c = Hosts(tc_lab, a, b, port_ab, port_b), Hosts(tc_lab, a, c, port_ac, port_c)
    start_sink(b, "udp-sink", port_b.ip4, "7001")
    start_sink(c, "udp-sink", port_c.ip6, "7001")
    run = Capture.start(a, [], 0.5)
    watched = {name for name in ("lo", "fstcA", "fstcC", "fstcD", "fstcE") if flowscope_filters(a, name)}
    assert watched == {"fstcA", "fstcC"}
    to_b.udp("a", 4, 5001, 7001, 10, 8)
    to_c.udp("a", 6, 5001, 7001, 20, 6)
    result = run.stop()

    assert flow_totals(result.flows, "fstcA", {port_ab.ip4, port_b.ip4}) == {
        udp_id("egress", 4, port_ab.ip4, 5001, port_b.ip4, 7001): (8, 8 * udp_frame(4, 10))
    }
    assert flow_totals(result.flows, "fstcC", {port_ac.ip6, port_c.ip6}) == {
        udp_id("egress", 6, port_ac.ip6, 5001, port_c.ip6, 7001): (6, 6 * udp_frame(6, 20))
    }
    assert_flow_map_balanced(result)
    assert not any(flowscope_filters(a, name) for name in ("fstcA", "fstcC"))


def test_loopback_when_asked_for(tc_lab: Lab) -> None:
    """lo has an Ethernet header too (of zeros); a datagram to 127.0.0.1 leaves and enters lo once each."""
    a = tc_lab.namespace("a")
    start_sink(a, "udp-sink", "127.0.0.1", "7001")
    start_sink(a, "udp-sink", "::1", "7001")
    run = Capture.start(a, ["lo"], 0.5)
    for address, count, size in (("127.0.0.1", 9, 300), ("::1", 4, 64)):
        report = run_traffic(
            a, "udp-send", "--src", address, "--dst", address, "--sport", "5001", "--dport", "7001",
            "--size", str(size), "--count", str(count),
        )  # fmt: skip
        assert report["refused"] == 0
    result = run.stop()

    expected = {}
    for address, version, count, size in (("127.0.0.1", 4, 9, 300), ("::1", 6, 4, 64)):
        for direction in ("egress", "ingress"):
            expected[udp_id(direction, version, address, 5001, address, 7001)] = (
                count,
                count * udp_frame(version, size),
            )
    assert flow_totals(result.flows, "lo", {"127.0.0.1", "::1"}) == expected
    assert_flow_map_balanced(result)
