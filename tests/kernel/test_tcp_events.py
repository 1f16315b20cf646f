"""Resets, retransmits and RTT from the tcp:* tracepoints, through `flowscope capture`, counted in the
kernel and joined into the flow of the right direction."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pandas as pd
import pytest

from tests.kernel.capture import CaptureResult
from tests.kernel.tc_flows import TRANSPORTS, sender_report
from tests.kernel.tracepoint_lab import (
    assert_balanced,
    capture,
    client_server,
    rows,
    tcp_retrans_segs,
    total,
)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", [4, 6])
def test_tcp_to_a_closed_port_counts_one_reset_on_the_rst_flow(version: int, transport: str) -> None:
    with client_server() as pair:
        client, server = pair.addresses(version)
        run = capture(pair, transport)
        attempt = pair.socket_traffic(pair.client, "refused", "--src", client, "--dst", server, "--dport", "7")
        result = run.stop()
    assert_balanced(result)
    assert attempt["refused"]
    sport = attempt["sport"]
    rst = rows(result.flows, server, 7, client, sport, "TCP")
    # Both ends are on this node: the server's tcp_send_reset and the client's tcp_receive_reset fire for
    # the same RST, which counts once, on the flow it travelled (server -> client).
    assert total(rst, "packets") == 1
    assert total(rst, "resets") == 1
    syn = rows(result.flows, client, sport, server, 7, "TCP")
    assert total(syn, "packets") == 1
    assert total(syn, "resets") == 0
    assert total(syn, "drop_packets") == 1 and set(syn["drop_reason"].dropna()) == {"NO_SOCKET"}
    resets = rows(result.events, server, 7, client, sport, "TCP")
    resets = resets[resets["kind"] == "reset"]
    assert len(resets) == 1
    assert resets["reset_reason"].iloc[0] == "NO_SOCKET"


@dataclass
class LossyTransfer:
    result: CaptureResult
    sent: dict  # the client's report: sport, TCP_INFO's total_retrans
    retransmitted: int  # the client namespace's TcpRetransSegs, over the transfer
    dropped_by_rule: int  # the iptables rule's counter
    data: pd.DataFrame  # the flow rows of the data direction
    retransmit_events: pd.DataFrame  # the retransmit events of the data direction


def lossy_transfer(version: int, *capture_extra: str) -> LossyTransfer:
    """300 kB over one connection while an iptables rule drops every fifth data segment, captured with
    `capture_extra`; the client's skbs are one segment each, so each retransmit event is one segment."""
    with client_server() as pair:
        client, server = pair.addresses(version)
        iptables = "iptables" if version == 4 else "ip6tables"
        # Every fifth data segment (never a handshake or pure ACK: those are short) to the server is lost.
        pair.server.run(
            iptables, "-A", "INPUT", "-p", "tcp", "--dport", "5001", "-m", "length", "--length", "1000:65535",
            "-m", "statistic", "--mode", "nth", "--every", "5", "--packet", "0", "-j", "DROP",
        )  # fmt: skip
        pair.lab.one_segment_per_skb(pair.client_port)
        listener = pair.start_server(server, 5001)
        retransmitted_before = tcp_retrans_segs(pair.client)
        run = capture(pair, "ring", *capture_extra)
        sent = pair.socket_traffic(pair.client, "client", "--src", client, "--dst", server, "--dport", "5001",
                                   "--bytes", str(300_000))  # fmt: skip
        listener.wait(timeout=30)

        def rule_drops() -> int:
            return int(pair.server.run(iptables, "-L", "INPUT", "-v", "-x", "-n").stdout.splitlines()[2].split()[0])

        # A late (spurious) retransmission can still meet the rule after the receiver has read everything:
        # stop only once the rule's counter has been still for a while, so both count the same segments.
        dropped_by_rule, previous = rule_drops(), -1
        while dropped_by_rule != previous:
            time.sleep(1.0)
            previous, dropped_by_rule = dropped_by_rule, rule_drops()
        result = run.stop()
        assert rule_drops() == dropped_by_rule
        retransmitted = tcp_retrans_segs(pair.client) - retransmitted_before
    assert_balanced(result)
    assert sent["total_retrans"] > 0 and dropped_by_rule > 0
    assert retransmitted == sent["total_retrans"]  # the one connection of the client's namespace
    events = rows(result.events, client, sent["sport"], server, 5001, "TCP")
    return LossyTransfer(
        result, sent, retransmitted, dropped_by_rule, rows(result.flows, client, sent["sport"], server, 5001, "TCP"),
        events[events["kind"] == "retransmit"],
    )  # fmt: skip


@pytest.mark.parametrize("version", [4, 6])
def test_retransmits_of_dropped_data_segments_are_counted_on_the_data_flow(version: int) -> None:
    transfer = lossy_transfer(version)
    assert total(transfer.data, "retransmits") == transfer.retransmitted
    # One event per retransmitted segment: none sampled out at the capture's rate.
    assert len(transfer.retransmit_events) == transfer.retransmitted
    assert set(transfer.retransmit_events["state"]) <= {"ESTABLISHED", "FIN_WAIT1", "CLOSING"}
    client, server = transfer.data["src_ip"].iloc[0], transfer.data["dst_ip"].iloc[0]
    acks = rows(transfer.result.flows, server, 5001, client, transfer.sent["sport"], "TCP")
    assert total(acks, "retransmits") == 0
    # The receiver may drop some segments of its own too (e.g. a retransmit of data it already had).
    netfilter = transfer.data["drop_reason"].eq("NETFILTER_DROP").fillna(False).astype(bool)
    assert total(transfer.data[netfilter], "drop_packets") == transfer.dropped_by_rule
    print(f"retransmits {transfer.retransmitted}, segments dropped by the rule {transfer.dropped_by_rule}")


def test_tcp_events_rate_limits_the_events_while_every_retransmit_is_still_counted() -> None:
    rate = 1  # events per second per CPU, shared with every other TCP event on the machine
    transfer = lossy_transfer(4, "--tcp-events-rate", str(rate))
    assert total(transfer.data, "retransmits") == transfer.retransmitted
    batches = transfer.result.batches
    seconds = (batches[-1].time_end - batches[0].time_start).total_seconds()
    # Each CPU's bucket starts full (one second's worth) and then refills at the rate.
    allowed = os.cpu_count() * rate * (1 + seconds)
    assert len(transfer.retransmit_events) <= allowed < transfer.retransmitted, (seconds, transfer.retransmitted)
    sampling = transfer.result.summary["coverage"]["tcp_event_sampling"]
    assert sampling["lost"] >= transfer.retransmitted - len(transfer.retransmit_events)


@pytest.mark.parametrize("version", [4, 6])
def test_rtt_is_sampled_on_both_directions_of_a_connection(version: int) -> None:
    with client_server() as pair:
        client, server = pair.addresses(version)
        listener = pair.start_server(server, 5003)
        run = capture(pair, "ring")
        sent = pair.socket_traffic(pair.client, "client", "--src", client, "--dst", server, "--dport", "5003",
                                   "--bytes", "20000", "--chunk", "1000", "--pause", "0.05",
                                   "--wait-acked")  # fmt: skip
        (accepted,) = sender_report(listener, timeout=30)["connections"]
        result = run.stop()
    assert_balanced(result)
    data = rows(result.flows, client, sent["sport"], server, 5003, "TCP")
    reply = rows(result.flows, server, 5003, client, sent["sport"], "TCP")
    # The server sends no data, so its socket's smoothed RTT is the handshake's until it closes: every sample
    # of the reply direction is exactly what TCP_INFO said of that socket.
    assert len(reply["rtt_us"].dropna()) > 0
    assert set(reply["rtt_us"].dropna()) == {accepted["rtt_us"]}, accepted
    # The client's smoothed RTT changes only when an ACK acknowledges new data. Each chunk is one segment and
    # the client reads TCP_INFO once it is acknowledged, so the client saw every value its socket's RTT took;
    # tcp_probe samples a socket before it processes the segment, so each sample is one of those values.
    sampled = data["rtt_us"].dropna()
    assert len(sampled) > 0
    assert set(sampled) <= set(sent["rtt_us_seen"]), (list(sampled), sent)
