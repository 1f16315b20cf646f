"""No count is lost at a drain boundary: traffic runs without pause across many 0.2 s intervals while capture
flips generations and drains maps, and the totals over all intervals are exact, with every interval's loss
accounting balanced. With a 16-entry map, spills cross the boundaries too (each is charged to the interval
whose generation it was sent in)."""

from __future__ import annotations

import signal

import pandas as pd
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

INTERVAL = 0.2
DRAINS = 12  # intervals drained while the traffic runs
FLOWS = 20  # per direction
PPS = 3000  # per direction, over all its flows
PAYLOAD = {4: 80, 6: 700}


def counted(flows: pd.DataFrame, port: int) -> bool:
    return bool(((flows["ifname"] == "fstcA") & (flows["src_port"] == port) & (flows["packets"] > 0)).any())


@pytest.mark.parametrize("map_size", [65536, 16])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_continuous_traffic_across_drains_is_exact(tc_lab: Lab, transport: str, map_size: int) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4, a6, b6 = hosts.port_a.ip4, hosts.port_b.ip4, hosts.port_a.ip6, hosts.port_b.ip6
    start_sink(hosts.b, "udp-sink", b4, "7001")
    start_sink(hosts.a, "udp-sink", a6, "5001")
    run = Capture.start(
        hosts.a, ["fstcA"], INTERVAL, "--flow-map-size", str(map_size), *TRANSPORTS[transport]
    )  # fmt: skip
    # a -> b over IPv4 (egress) and b -> a over IPv6 (ingress), at the same time
    streams = {4: (hosts.a, a4, b4, 21000, 7001, "egress"), 6: (hosts.b, b6, a6, 22000, 5001, "ingress")}
    senders = {
        version: start_sender(
            netns, "udp-send", "--src", src, "--dst", dst, "--sport", str(sport), "--dport", str(dport),
            "--size", str(PAYLOAD[version]), "--flows", str(FLOWS), "--pps", str(PPS), "--duration", "300",
        )
        for version, (netns, src, dst, sport, dport, _direction) in streams.items()
    }  # fmt: skip
    run.wait_intervals(run.intervals_written() + DRAINS)
    for process in senders.values():
        process.send_signal(signal.SIGINT)  # the senders end their round: every flow has sent as many
    reports = {version: sender_report(process) for version, process in senders.items()}
    for report in reports.values():
        assert report["refused"] == 0, report
    result = run.stop()

    expected = {}
    for version, (_netns, src, dst, sport, dport, direction) in streams.items():
        per_flow = reports[version]["per_flow"]
        frame = udp_frame(version, PAYLOAD[version])
        for n in range(FLOWS):
            expected[udp_id(direction, version, src, sport + n, dst, dport)] = (per_flow, per_flow * frame)
    assert_flow_map_balanced(result, lost=0)
    assert flow_totals(result.flows, "fstcA", {a4, b4, a6, b6}) == expected

    # The traffic really spanned the drains: each flow shows up in at least that many intervals.
    carried = [
        sum(1 for batch in result.batches if counted(batch.flows, port))
        for port in (*range(21000, 21000 + FLOWS), *range(22000, 22000 + FLOWS))
    ]
    assert min(carried) >= DRAINS, carried
    produced = [counts["produced"] for counts in result.coverage("flow_map")]
    spilled = [counts["delivered"] for counts in result.coverage("events:flow_spill")]
    print(f"{reports[4]['per_flow']} and {reports[6]['per_flow']} datagrams per flow; {len(result.batches)} intervals;")
    print(f"packets per interval {produced}; spilled {spilled}")
    if map_size == 16:
        assert sum(1 for n in spilled if n) >= DRAINS, f"spills in too few intervals: {spilled}"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stuck_output_does_not_stall_the_event_readers(tc_lab: Lab, transport: str) -> None:
    """Nobody reads capture's output for a while: its writes block, but not its drains: the pipeline queues
    the intervals for the output (up to 64) and keeps draining the 16-entry map and the spills, so once the
    output moves again every packet is there, none lost."""
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    start_sink(hosts.b, "udp-sink", b4, "7001")
    run = Capture.start(hosts.a, ["fstcA"], INTERVAL, "--flow-map-size", "16", *TRANSPORTS[transport])
    paused = pd.Timestamp.now(tz="UTC")
    run.pause_reading()
    flows = 100  # 84 of them spill whenever the map is full
    report = hosts.udp("a", 4, 21000, 7001, 80, 360, "--flows", str(flows), "--pps", "6000")
    resumed = pd.Timestamp.now(tz="UTC")
    run.resume_reading()
    result = run.stop()

    per_flow = report["per_flow"]
    frame = udp_frame(4, 80)
    assert_flow_map_balanced(result, lost=0)
    assert flow_totals(result.flows, "fstcA", {a4, b4}) == {
        udp_id("egress", 4, a4, 21000 + n, b4, 7001): (per_flow, per_flow * frame) for n in range(flows)
    }
    # The drains went on while the output was stuck (the traffic takes 6 s: dozens of 0.2-s intervals), and
    # the output's queue lost nothing.
    drained_meanwhile = sum(1 for batch in result.batches if paused <= batch.time_end <= resumed)
    output = result.coverage("sink:jsonl")
    assert drained_meanwhile >= 2, drained_meanwhile
    assert sum(c["lost"] for c in output) == 0 and sum(c["delivered"] for c in output) > 0, output
    print(f"{per_flow} datagrams x {flows} flows; {drained_meanwhile} intervals drained while the output was stuck")
