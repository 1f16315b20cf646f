"""tc flow accounting of ICMP and ICMPv6: echo requests and replies, and the errors a closed port sends back,
each counted exactly under its type and code, with no ports."""

from __future__ import annotations

import pytest

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import (
    ETHERNET,
    IP_HEADER,
    TRANSPORTS,
    assert_flow_map_balanced,
    flow_totals,
    run_traffic,
    two_hosts,
    udp_frame,
    udp_id,
)

ICMP_HEADER = 8
# (protocol, echo request, echo reply, port unreachable (type, code)) per IP version
ICMP = {4: ("ICMP", 8, 0, (3, 3)), 6: ("ICMPv6", 128, 129, (1, 4))}


def icmp_id(direction: str, version: int, src: str, dst: str, kind: int, code: int) -> tuple:
    return (direction, ICMP[version][0], src, None, dst, None, kind, code)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_icmp_echo_and_errors_are_exact(tc_lab: Lab, transport: str) -> None:
    hosts = two_hosts(tc_lab)
    # Every error is sent: no per-destination rate limit in b (the defaults allow about one per second).
    hosts.b.sysctl("net.ipv4.icmp_ratelimit", "0")
    hosts.b.sysctl("net.ipv6.icmp.ratelimit", "0")
    run = Capture.start(hosts.a, ["fstcA"], 0.5, *TRANSPORTS[transport])
    echoes = {4: (7, 64), 6: (5, 1000)}  # (requests, ICMP message bytes)
    for version, (count, size) in echoes.items():
        report = run_traffic(
            hosts.a, "icmp-echo", "--dst", hosts.address("b", version), "--count", str(count), "--size", str(size)
        )
        assert report["replies"] == count
    closed_port, payload, datagrams = 9999, 100, 10
    for version in (4, 6):
        hosts.udp("a", version, 5001, closed_port, payload, datagrams)
    result = run.stop()

    expected = {}
    for version, (count, size) in echoes.items():
        _protocol, request, reply, (unreachable, code) = ICMP[version]
        a, b = hosts.address("a", version), hosts.address("b", version)
        echo_frame = ETHERNET + IP_HEADER[version] + size
        expected[icmp_id("egress", version, a, b, request, 0)] = (count, count * echo_frame)
        expected[icmp_id("ingress", version, b, a, reply, 0)] = (count, count * echo_frame)
        expected[udp_id("egress", version, a, 5001, b, closed_port)] = (
            datagrams,
            datagrams * udp_frame(version, payload),
        )
        # The error quotes the whole offending packet (IP header onwards): it is small enough for both limits.
        quoted = IP_HEADER[version] + 8 + payload
        error_frame = ETHERNET + IP_HEADER[version] + ICMP_HEADER + quoted
        expected[icmp_id("ingress", version, b, a, unreachable, code)] = (datagrams, datagrams * error_frame)
    addresses = {hosts.port_a.ip4, hosts.port_b.ip4, hosts.port_a.ip6, hosts.port_b.ip6}
    assert flow_totals(result.flows, "fstcA", addresses) == expected
    icmp = result.flows[(result.flows["ifname"] == "fstcA") & result.flows["protocol"].isin(["ICMP", "ICMPv6"])]
    assert icmp["src_port"].isna().all() and icmp["dst_port"].isna().all() and icmp["tcp_flags"].isna().all()
    assert_flow_map_balanced(result)
