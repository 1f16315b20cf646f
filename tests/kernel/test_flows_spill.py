"""A full flow map loses no flow: with the map shrunk to 16 entries and 1000 flows, the packets that find it
full are counted and spilled through the event ring (or perf buffers), and every flow's packets and bytes
still come out exact."""

from __future__ import annotations

import pytest

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import (
    TRANSPORTS,
    assert_flow_map_balanced,
    flow_totals,
    sender_report,
    start_sender,
    start_sink,
    two_hosts,
    udp_frame,
    udp_id,
)

MAP_SIZE = 16
FLOWS = 1000
PER_FLOW = 3
PAYLOAD = 50
FIRST_PORT = 20000


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_full_map_spills_and_loses_nothing(tc_lab: Lab, transport: str) -> None:
    hosts = two_hosts(tc_lab)
    a, b = hosts.address("a", 4), hosts.address("b", 4)
    start_sink(hosts.b, "udp-sink", b, "7001")
    run = Capture.start(hosts.a, ["fstcA"], 0.5, "--flow-map-size", str(MAP_SIZE), *TRANSPORTS[transport])
    # Round-robin over the flows, paced so that the perf buffers (64 pages per CPU, read every 100 ms)
    # never fill: this test is about the map, not about a full event buffer.
    report = hosts.udp("a", 4, FIRST_PORT, 7001, PAYLOAD, PER_FLOW, "--flows", str(FLOWS), "--pps", "5000")
    assert report["sent"] == FLOWS * PER_FLOW
    result = run.stop()

    frame = udp_frame(4, PAYLOAD)
    expected = {udp_id("egress", 4, a, FIRST_PORT + n, b, 7001): (PER_FLOW, PER_FLOW * frame) for n in range(FLOWS)}
    assert flow_totals(result.flows, "fstcA", {a, b}) == expected
    assert_flow_map_balanced(result, lost=0)

    # The map holds at most MAP_SIZE flows per interval, so all but that many flows' packets were spilled.
    spilled = [counts["delivered"] for counts in result.coverage("events:flow_spill")]
    intervals = len(result.batches)
    print(f"{intervals} intervals, spilled per interval {spilled}, flow_map {result.coverage('flow_map')}")
    assert sum(spilled) >= FLOWS * PER_FLOW - MAP_SIZE * PER_FLOW * intervals > 0
    assert all(counts["lost"] == 0 for counts in result.coverage("events:flow_spill"))
    # Spills are folded into flows: no spill event reaches the output as an event of its own.
    assert not any(line.startswith('{"type":"event"') and '"flow_spill"' in line for line in result.lines)


@pytest.mark.parametrize(("transport", "one_page"), [("ring", ("--ring-pages", "1")), ("perf", ("--perf-pages", "1"))])
def test_spills_a_full_event_buffer_refuses_are_counted_as_lost(
    tc_lab: Lab, transport: str, one_page: tuple[str, str]
) -> None:
    """With a one-page event buffer (32 spills in the ring, 30 per CPU in perf buffers) and datagrams sent
    as fast as two senders can, many spills find the buffer full. Each one refused is counted as a lost
    packet: what reached the output plus what was counted lost is every datagram sent, exactly."""
    hosts = two_hosts(tc_lab)
    a, b = hosts.address("a", 4), hosts.address("b", 4)
    start_sink(hosts.b, "udp-sink", b, "7001")
    start_sink(hosts.a, "udp-sink", a, "7001")
    run = Capture.start(
        hosts.a, ["fstcA"], 0.5, "--flow-map-size", str(MAP_SIZE), *one_page, *TRANSPORTS[transport]
    )  # fmt: skip
    # Both hosts send at once, unpaced, so that spills come from both CPUs faster than they are read.
    senders = [
        start_sender(
            netns, "udp-send", "--src", src, "--dst", dst, "--sport", str(FIRST_PORT),
            "--dport", "7001", "--size", str(PAYLOAD), "--count", str(PER_FLOW), "--flows", str(FLOWS),
        )
        for netns, src, dst in ((hosts.a, a, b), (hosts.b, b, a))
    ]  # fmt: skip
    reports = [sender_report(sender) for sender in senders]
    result = run.stop()

    sent = sum(report["sent"] for report in reports)
    assert sent == 2 * FLOWS * PER_FLOW and all(report["refused"] == 0 for report in reports)
    lost = assert_flow_map_balanced(result, lost=None)
    delivered = flow_totals(result.flows, "fstcA", {a, b})
    frame = udp_frame(4, PAYLOAD)
    assert all(packets <= PER_FLOW and size == packets * frame for packets, size in delivered.values())
    delivered_packets = sum(packets for packets, _ in delivered.values())
    print(f"sent {sent}: delivered {delivered_packets}, lost {lost}")
    assert lost > 0 and delivered_packets + lost == sent
    spill_events = result.coverage("events:flow_spill")
    assert sum(counts["lost"] for counts in spill_events) == lost
