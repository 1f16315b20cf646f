"""--drop-map-size and --tcp-map-size of one entry on the real kernel: more flows drop packets (or send
resets) than the map holds, and what did not fit is counted as lost in the coverage. The maps are
machine-wide (other drops and resets on the node compete for the entry), so the exact figure is the
kernel's own count of our traffic (the server namespace's UdpNoPorts, TcpOutRsts); each of those is either
on our flows or among the lost."""

from __future__ import annotations

from tests.kernel.lab import Netns
from tests.kernel.tc_flows import run_traffic
from tests.kernel.tracepoint_lab import assert_balanced, capture, client_server, rows, total

FLOWS, PER_FLOW = 8, 5


def snmp(netns: Netns, protocol: str, name: str) -> int:
    """A counter of the namespace's /proc/net/snmp (Udp: and Tcp: lines count IPv4 and IPv6 alike)."""
    lines = [line.split() for line in netns.run("cat", "/proc/net/snmp").stdout.splitlines()]
    names, values = (line for line in lines if line[0] == f"{protocol}:")
    return int(values[names.index(name)])


def test_drops_that_find_a_full_drop_map_are_counted_as_lost() -> None:
    with client_server() as pair:
        client, server = pair.addresses(4)
        no_ports_before = snmp(pair.server, "Udp", "NoPorts")
        run = capture(pair, "ring", "--drop-map-size", "1")
        sent = run_traffic(
            pair.client, "udp-send", "--src", client, "--dst", server, "--sport", "40100", "--dport", "9",
            "--size", "100", "--count", str(PER_FLOW), "--flows", str(FLOWS),
        )  # fmt: skip
        result = run.stop()
        dropped = snmp(pair.server, "Udp", "NoPorts") - no_ports_before
    assert_balanced(result)
    assert sent["sent"] == dropped == FLOWS * PER_FLOW and sent["refused"] == 0
    ours = [rows(result.flows, client, 40100 + flow, server, 9, "UDP") for flow in range(FLOWS)]
    assert sum(total(flow, "packets") for flow in ours) == dropped  # the flow map has room: all seen
    counted = sum(total(flow, "drop_packets") for flow in ours)
    drop_map = result.summary["coverage"]["drop_map"]
    assert counted < dropped  # one entry per interval cannot hold eight flows sent within a few intervals
    assert drop_map["lost"] >= dropped - counted, drop_map


def test_resets_that_find_a_full_tcp_map_are_counted_as_lost() -> None:
    with client_server() as pair:
        client, server = pair.addresses(4)
        resets_before = snmp(pair.server, "Tcp", "OutRsts")
        run = capture(pair, "ring", "--tcp-map-size", "1")
        attempts = pair.socket_traffic(
            pair.client, "refused", "--src", client, "--dst", server, "--dport", "7", "--count", str(FLOWS)
        )
        result = run.stop()
        resets = snmp(pair.server, "Tcp", "OutRsts") - resets_before
    assert_balanced(result)
    assert attempts["refused"] and resets == FLOWS
    counted = sum(total(rows(result.flows, server, 7, client, sport, "TCP"), "resets") for sport in attempts["sports"])
    tcp_map = result.summary["coverage"]["tcp_map"]
    assert counted < FLOWS  # one entry per interval cannot hold eight flows sent within a few intervals
    assert tcp_map["lost"] >= FLOWS - counted, tcp_map
