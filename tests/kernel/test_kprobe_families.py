"""The kprobe variants of the drop, TCP and connection probes against their tracepoint families: two
captures watch the same traffic at once, one with the tracepoint families and one with --prefer-kprobes,
and each counts exactly what the kernel's own counters say: drops per reason (the iptables rule's counter),
retransmits (the namespace's TcpRetransSegs), the one reset of a refused connect, and connect / accept /
close with the pids of their ends. Runs where the kernel has kprobes: the kernel matrix's guests (this
machine's kernel has none)."""

from __future__ import annotations

import time

import pytest

from flowscope.kernel.features import probe_features
from flowscope.kernel.loader import LoadOptions, plan_families
from tests.kernel.lab import Netns
from tests.kernel.tc_flows import start_sink
from tests.kernel.test_drops import udp_send
from tests.kernel.tracepoint_lab import Pair, assert_balanced, capture, client_server, rows, tcp_retrans_segs, total

KPROBE_FAMILIES = {"skb_drop_kprobe", "tcp_events_kprobe", "sock_state_kprobe"}
TRACEPOINT_FAMILIES = {"skb_drop", "tcp_events", "sock_state"}


def kprobe_families_or_skip() -> None:
    statuses = {s.family.name: s for s in plan_families(probe_features(), LoadOptions(prefer_kprobes=True))}
    unavailable = [f"{name}: {statuses[name].reason}" for name in sorted(KPROBE_FAMILIES) if not statuses[name].active]
    if unavailable:
        pytest.skip(f"this kernel cannot run the kprobe variants ({'; '.join(unavailable)})")


def rule_packets(netns: Netns, iptables: str, rule: int) -> int:
    """Packets the `rule`-th rule (from 1) of the INPUT chain has matched."""
    listing = netns.run(iptables, "-L", "INPUT", "-v", "-x", "-n").stdout.splitlines()
    return int(listing[1 + rule].split()[0])


def settled(pair: Pair, iptables: str, rule: int) -> int:
    """The rule's counter once it has been still for a second: a late (spurious) retransmission can still
    meet the rule after the receiver has read everything."""
    count, previous = rule_packets(pair.server, iptables, rule), -1
    while count != previous:
        time.sleep(1.0)
        previous, count = count, rule_packets(pair.server, iptables, rule)
    return count


@pytest.mark.kernel_matrix
@pytest.mark.parametrize("version", [4, 6])
def test_the_kprobe_variants_count_exactly_what_the_tracepoint_families_count(version: int) -> None:
    kprobe_families_or_skip()
    with client_server() as pair:
        client, server = pair.addresses(version)
        iptables = "iptables" if version == 4 else "ip6tables"
        pair.server.run(iptables, "-A", "INPUT", "-p", "udp", "--dport", "5555", "-j", "DROP")
        # Every fifth data segment to the server is lost (never a handshake or a pure ACK: those are short).
        pair.server.run(
            iptables, "-A", "INPUT", "-p", "tcp", "--dport", "5001", "-m", "length", "--length", "1000:65535",
            "-m", "statistic", "--mode", "nth", "--every", "5", "--packet", "0", "-j", "DROP",
        )  # fmt: skip
        start_sink(pair.server, "udp-sink", server, "5555")
        listener = pair.start_server(server, 5001)
        with open(f"/proc/{listener.pid}/comm", encoding="utf-8") as comm:
            server_comm = comm.read().strip()
        retransmitted_before = tcp_retrans_segs(pair.client)
        runs = {"tracepoints": capture(pair, "ring"), "kprobes": capture(pair, "ring", "--prefer-kprobes")}
        udp_send(pair, version, 40001, 9, count=5)
        udp_send(pair, version, 40002, 5555, count=4)
        refused = pair.socket_traffic(pair.client, "refused", "--src", client, "--dst", server, "--dport", "7")
        sent = pair.socket_traffic(pair.client, "client", "--src", client, "--dst", server, "--dport", "5001",
                                   "--bytes", "300000")  # fmt: skip
        listener.wait(timeout=60)
        dropped_by_tcp_rule = settled(pair, iptables, 2)
        results = {name: run.stop() for name, run in runs.items()}
        retransmitted = tcp_retrans_segs(pair.client) - retransmitted_before
        dropped_by_udp_rule = rule_packets(pair.server, iptables, 1)
    assert refused["refused"] and dropped_by_udp_rule == 4
    assert retransmitted > 0 and dropped_by_tcp_rule > 0
    for name, result in results.items():
        assert_balanced(result)
        active = {probe["name"] for probe in result.summary["probes"] if probe["active"]}
        assert active & (KPROBE_FAMILIES | TRACEPOINT_FAMILIES) == (
            KPROBE_FAMILIES if name == "kprobes" else TRACEPOINT_FAMILIES
        ), name
        flows, events = result.flows, result.events
        no_socket = rows(flows, client, 40001, server, 9, "UDP")
        assert (total(no_socket, "drop_packets"), set(no_socket["drop_reason"].dropna())) == (5, {"NO_SOCKET"}), name
        netfilter = rows(flows, client, 40002, server, 5555, "UDP")
        assert (total(netfilter, "drop_packets"), set(netfilter["drop_reason"].dropna())) == (
            dropped_by_udp_rule,
            {"NETFILTER_DROP"},
        ), name
        rst = rows(flows, server, 7, client, refused["sport"], "TCP")
        assert total(rst, "resets") == 1, name
        data = rows(flows, client, sent["sport"], server, 5001, "TCP")
        assert total(data, "retransmits") == retransmitted, name
        by_rule = data["drop_reason"].eq("NETFILTER_DROP").fillna(False).astype(bool)
        assert total(data[by_rule], "drop_packets") == dropped_by_tcp_rule, name
        outbound = rows(events, client, sent["sport"], server, 5001, "TCP")
        inbound = rows(events, server, 5001, client, sent["sport"], "TCP")
        outbound = outbound[outbound["kind"].isin(("connect", "accept", "close"))]
        inbound = inbound[inbound["kind"].isin(("connect", "accept", "close"))]
        assert list(outbound["kind"]) == ["connect", "close"] and set(outbound["pid"]) == {sent["pid"]}, name
        assert list(inbound["kind"]) == ["accept", "close"] and set(inbound["pid"]) == {listener.pid}, name
        assert set(inbound["comm"]) == {server_comm}, name
        attempt = rows(events, client, refused["sport"], server, 7, "TCP")
        closes = attempt[attempt["kind"] == "close"]
        assert list(closes["state"]) == ["SYN_SENT"] and set(closes["pid"]) == {refused["pid"]}, name
