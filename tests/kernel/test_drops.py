"""Drops from skb:kfree_skb, through `flowscope capture`: the running kernel's reason, the 5-tuple, where
the kernel dropped the packet, counted exactly per flow and joined into the flow tc saw."""

from __future__ import annotations

import sys

import pytest

from tests.kernel import traffic
from tests.kernel.tc_flows import TRANSPORT_NAMES, TRANSPORTS, run_traffic, start_sink, udp_frame
from tests.kernel.tracepoint_lab import (
    Pair,
    assert_balanced,
    capture,
    client_server,
    kernel_function,
    rows,
    total,
)

SIZE = 100  # UDP payload bytes
PROTOCOL = "UDP"


def wire_length(version: int, extension: int = 0) -> int:
    return udp_frame(version, SIZE, extension=extension)


def udp_send(pair: Pair, version: int, sport: int, dport: int, count: int, *extra: str) -> None:
    src, dst = pair.addresses(version)
    report = run_traffic(
        pair.client, "udp-send", "--src", src, "--dst", dst,
        "--sport", str(sport), "--dport", str(dport), "--size", str(SIZE), "--count", str(count), *extra,
    )  # fmt: skip
    assert report["sent"] == count and report["refused"] == 0, report


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", [4, 6])
def test_udp_to_a_closed_port_is_dropped_with_no_socket_on_its_flow(version: int, transport: str) -> None:
    with client_server() as pair:
        src, dst = pair.addresses(version)
        server_netns, server_ifindex = pair.netns_inode(pair.server), pair.server_port.ifindex
        run = capture(pair, transport)
        udp_send(pair, version, 40001, 9, count=5)
        result = run.stop()
    assert_balanced(result)
    assert result.summary["events_transport"] == TRANSPORT_NAMES[transport]
    flows = rows(result.flows, src, 40001, dst, 9, PROTOCOL)
    # The flow tc counted leaving the client carries the drops that happened in the server's namespace.
    assert total(flows, "packets") == 5
    assert total(flows, "drop_packets") == 5
    assert total(flows, "drop_bytes") == 5 * wire_length(version) == total(flows, "bytes")
    assert set(flows.loc[flows["drop_packets"] > 0, "drop_reason"]) == {"NO_SOCKET"}
    assert set(flows["ifname"]) == {"fstpC"} and set(flows["direction"]) == {"egress"}
    drops = rows(result.events, src, 40001, dst, 9, PROTOCOL)
    assert len(drops) == 5
    assert set(drops["kind"]) == {"drop"} and set(drops["drop_reason"]) == {"NO_SOCKET"}
    assert set(drops["bytes"]) == {wire_length(version)}
    assert set(drops["netns"]) == {server_netns}
    assert set(drops["ifindex"]) == {server_ifindex}
    assert drops["ifname"].isna().all()  # another namespace's interface number names nothing here
    assert all("udp" in kernel_function(location) for location in drops["location"])


def test_an_ipv6_packet_with_extension_headers_is_dropped_on_its_transport_5_tuple() -> None:
    with client_server() as pair:
        src, dst = pair.addresses(6)
        run = capture(pair, "ring")
        udp_send(pair, 6, 40004, 9, 3, "--hop-options")
        result = run.stop()
    assert_balanced(result)
    flows = rows(result.flows, src, 40004, dst, 9, PROTOCOL)  # UDP, not the hop-by-hop header's number 0
    assert total(flows, "drop_packets") == 3
    assert total(flows, "drop_bytes") == 3 * wire_length(6, extension=8) == total(flows, "bytes")  # hop-by-hop
    drops = rows(result.events, src, 40004, dst, 9, PROTOCOL)
    assert len(drops) == 3 and set(drops["drop_reason"]) == {"NO_SOCKET"}


@pytest.mark.parametrize("version", [4, 6])
def test_an_iptables_drop_rule_shows_as_netfilter_drop(version: int) -> None:
    with client_server() as pair:
        src, dst = pair.addresses(version)
        iptables = "iptables" if version == 4 else "ip6tables"
        pair.server.run(iptables, "-A", "INPUT", "-p", "udp", "--dport", "5555", "-j", "DROP")
        start_sink(pair.server, "udp-sink", dst, "5555")
        run = capture(pair, "ring")
        udp_send(pair, version, 40002, 5555, count=4)
        result = run.stop()
    assert_balanced(result)
    flows = rows(result.flows, src, 40002, dst, 5555, PROTOCOL)
    assert total(flows, "packets") == 4
    assert total(flows, "drop_packets") == 4
    assert total(flows, "drop_bytes") == 4 * wire_length(version)
    assert set(flows.loc[flows["drop_packets"] > 0, "drop_reason"]) == {"NETFILTER_DROP"}
    drops = rows(result.events, src, 40002, dst, 5555, PROTOCOL)
    assert len(drops) == 4 and set(drops["drop_reason"]) == {"NETFILTER_DROP"}
    # nf_hook_slow on most kernels; nft_do_chain where nftables drops by itself (6.18).
    assert all(kernel_function(location).startswith("nf") for location in drops["location"])


def test_a_drop_storm_is_counted_exactly_while_its_events_are_rate_limited() -> None:
    rate = 5  # drop events per second per CPU
    with client_server() as pair:
        src, dst = pair.addresses(4)
        run = capture(pair, "ring", "--drop-events-rate", str(rate))
        # One CPU sends, so the drops (in the softirq of the same CPU) draw from one CPU's token bucket.
        pair.client.run(
            "taskset", "-c", "0", sys.executable, traffic.PATH, "udp-send", "--src", src, "--dst", dst,
            "--sport", "40003", "--dport", "9", "--size", str(SIZE), "--count", "2000",
        )  # fmt: skip
        result = run.stop()
    assert_balanced(result)
    flows = rows(result.flows, src, 40003, dst, 9, PROTOCOL)
    assert total(flows, "packets") == 2000
    assert total(flows, "drop_packets") == 2000  # every drop counted in the kernel, none lost
    assert total(flows, "drop_bytes") == 2000 * wire_length(4)
    sent_events = len(rows(result.events, src, 40003, dst, 9, PROTOCOL))
    seconds = (result.batches[-1].time_end - result.batches[0].time_start).total_seconds()
    assert 1 <= sent_events <= rate * (1 + seconds)  # one second's burst, then the rate
    sampling = result.summary["coverage"]["drop_event_sampling"]
    assert sampling["lost"] >= 2000 - sent_events  # what was not sent is counted
