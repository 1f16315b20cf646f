"""How the tc probe reads headers: 802.1Q and 802.1ad tags, IP fragments, IPv6 extension headers, SCTP.
Every figure is exact and follows from the frames the test builds or the datagrams it sends."""

from __future__ import annotations

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import (
    ETHERNET,
    IP_HEADER,
    assert_flow_map_balanced,
    flow_totals,
    run_traffic,
    start_sink,
    two_hosts,
    udp_frame,
    udp_id,
)

SCTP = 132
MTU = 1500


def test_vlan_tags_in_the_frame_are_skipped(tc_lab: Lab) -> None:
    """Frames with no tag, an 802.1Q tag, and 802.1ad + 802.1Q tags, sent from both ends through packet
    sockets. Egress, tc sees the frame as built: its 5-tuple is behind the tags, and its length includes
    them. Ingress, the kernel moves the outer tag into the skb's metadata before tc runs (skb_vlan_untag),
    so the frame is 4 bytes shorter and only an inner 802.1Q tag is left in it."""
    hosts = two_hosts(tc_lab)
    for netns, port in ((hosts.a, hosts.port_a), (hosts.b, hosts.port_b)):
        for address in (port.ip4, port.ip6):
            start_sink(netns, "udp-sink", address, "9")
    run = Capture.start(hosts.a, ["fstcA"], 0.5)
    expected = {}
    payload, count = 100, 3
    for side, netns, port, peer in (
        ("a", hosts.a, hosts.port_a, hosts.port_b),
        ("b", hosts.b, hosts.port_b, hosts.port_a),
    ):
        for tags in ([], [100], [10, 20]):
            for version in (4, 6):
                src, dst = (port.ip4, peer.ip4) if version == 4 else (port.ip6, peer.ip6)
                sport = 6000 + len(tags)
                vlans = [item for vid in tags for item in ("--vlan", str(vid))]
                report = run_traffic(
                    netns, "eth-send", "--ifname", port.name, "--src-mac", port.mac, "--dst-mac", peer.mac,
                    "--src", src, "--dst", dst, "--sport", str(sport), "--dport", "9",
                    "--size", str(payload), "--count", str(count), *vlans,
                )  # fmt: skip
                assert report["frame"] == udp_frame(version, payload, vlan_tags=len(tags))
                seen_tags = len(tags) if side == "a" else max(len(tags) - 1, 0)
                direction = "egress" if side == "a" else "ingress"
                bytes_seen = count * udp_frame(version, payload, vlan_tags=seen_tags)
                expected[udp_id(direction, version, src, sport, dst, 9)] = (count, bytes_seen)
    result = run.stop()
    addresses = {hosts.port_a.ip4, hosts.port_b.ip4, hosts.port_a.ip6, hosts.port_b.ip6}
    assert flow_totals(result.flows, "fstcA", addresses) == expected
    assert_flow_map_balanced(result)


def test_fragments_count_under_their_flow_and_a_portless_one(tc_lab: Lab) -> None:
    """Datagrams larger than the MTU leave as fragments; only the first carries the UDP header, so the
    others are counted under the same addresses and protocol without ports (null, not 0)."""
    hosts = two_hosts(tc_lab)
    for address in (hosts.port_b.ip4, hosts.port_b.ip6):
        start_sink(hosts.b, "udp-sink", address, "7001")
    run = Capture.start(hosts.a, ["fstcA"], 0.5)
    payload, count = 3000, 4
    hosts.udp("a", 4, 5001, 7001, payload, count)
    hosts.udp("a", 6, 5001, 7001, payload, count)
    result = run.stop()

    expected = {}
    for version, fragment_header in ((4, 0), (6, 8)):
        # Fragment payloads are multiples of 8 bytes that fit the MTU after the IP (and fragment) header.
        per_fragment = (MTU - IP_HEADER[version] - fragment_header) // 8 * 8
        datagram = 8 + payload
        sizes = [per_fragment] * (datagram // per_fragment) + (
            [datagram % per_fragment] if datagram % per_fragment else []
        )
        frames = [ETHERNET + IP_HEADER[version] + fragment_header + size for size in sizes]
        assert len(frames) == 3
        a, b = hosts.address("a", version), hosts.address("b", version)
        expected[udp_id("egress", version, a, 5001, b, 7001)] = (count, count * frames[0])
        expected[udp_id("egress", version, a, None, b, None)] = (2 * count, count * sum(frames[1:]))
    addresses = {hosts.port_a.ip4, hosts.port_b.ip4, hosts.port_a.ip6, hosts.port_b.ip6}
    assert flow_totals(result.flows, "fstcA", addresses) == expected
    assert_flow_map_balanced(result)


def test_sctp_ports_and_ipv6_extension_headers(tc_lab: Lab) -> None:
    """SCTP packets (raw IP protocol 132; SCTP puts its ports where UDP does) and UDP behind an IPv6
    hop-by-hop options header, which the probe walks past to reach the ports."""
    hosts = two_hosts(tc_lab)
    for address in (hosts.port_b.ip4, hosts.port_b.ip6):
        start_sink(hosts.b, "raw-sink", "--proto", str(SCTP), address)
    start_sink(hosts.b, "udp-sink", hosts.port_b.ip6, "7001")
    run = Capture.start(hosts.a, ["fstcA"], 0.5)
    for version, size, count in ((4, 64, 6), (6, 200, 4)):
        run_traffic(
            hosts.a, "raw-send", "--proto", str(SCTP), "--dst", hosts.address("b", version),
            "--sport", "2905", "--dport", "3868", "--size", str(size), "--count", str(count),
        )  # fmt: skip
    hosts.udp("a", 6, 5001, 7001, 500, 9, "--hop-options")
    result = run.stop()

    a4, b4, a6, b6 = hosts.port_a.ip4, hosts.port_b.ip4, hosts.port_a.ip6, hosts.port_b.ip6
    assert flow_totals(result.flows, "fstcA", {a4, b4, a6, b6}) == {
        ("egress", "SCTP", a4, 2905, b4, 3868, None, None): (6, 6 * (ETHERNET + 20 + 64)),
        ("egress", "SCTP", a6, 2905, b6, 3868, None, None): (4, 4 * (ETHERNET + 40 + 200)),
        udp_id("egress", 6, a6, 5001, b6, 7001): (9, 9 * udp_frame(6, 500, extension=8)),
    }
    assert_flow_map_balanced(result)
