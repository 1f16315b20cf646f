"""tc flow accounting of TCP against a packet capture (dumpcap) on the same interface: per direction,
packets, bytes and the OR of TCP flags equal what the capture recorded.

flowscope counts skbs as tc sees them (bytes = skb->len), and segmentation decides what an skb is:
- "gso" (the veth default): TCP hands the device super-packets of up to 64 KiB, which the device passes
  on whole; tc and the packet capture both see those skbs, larger than the MTU.
- "segments": the stack builds one wire segment per skb (gso_max_segs 1, offloads off); tc and the
  capture see wire-sized packets.
- "software-gso": the device cannot segment (offloads off), yet TCP still builds super-packets (it always
  does) and the kernel segments them in software after tc and before packet sockets. tc counts the
  super-packet; the capture counts its segments, each carrying its own copy of the headers. The test
  checks exactly that relation, so the meaning of `packets` stays pinned down.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab
from tests.kernel.pcap import Dumpcap
from tests.kernel.tc_flows import (
    ETHERNET,
    IP_HEADER,
    TRANSPORTS,
    assert_flow_map_balanced,
    flow_totals,
    run_traffic,
    start_sink,
    two_hosts,
)

MTU_FRAME = 1514
FIN, SYN = 0x01, 0x02
TRANSFER = 3_000_000
TCP_HEADER = 32  # 20 bytes and the timestamps option, on every segment of an established Linux connection


def tcp_run(lab: Lab, tmp_path: Path, version: int, segmentation: str, transport: str):
    """Sends TRANSFER bytes from a to b over TCP, with capture and dumpcap both on fstcA."""
    hosts = two_hosts(lab)
    for port in (hosts.port_a, hosts.port_b):
        lab.offloads(port, segmentation == "gso")
        if segmentation == "segments":
            lab.one_segment_per_skb(port)
    a, b = hosts.address("a", version), hosts.address("b", version)
    start_sink(hosts.b, "tcp-sink", b, "8080")
    with Dumpcap(hosts.a, "fstcA", tmp_path / "fstcA.pcapng") as pcap:
        run = Capture.start(hosts.a, ["fstcA"], 0.5, *TRANSPORTS[transport])
        argv = ["tcp-send", "--src", a, "--sport", "40001", "--dst", b, "--dport", "8080", "--bytes", str(TRANSFER)]
        assert run_traffic(hosts.a, *argv)["sent"] == TRANSFER
        result = run.stop()  # the sender returned after the FIN exchange: nothing of the connection is in flight
    assert pcap.dropped == 0, "the packet capture dropped packets: it is no ground truth"
    truth = pcap.tcp_packets()
    truth = truth[truth["src_ip"].isin({a, b}) & truth["dst_ip"].isin({a, b})]
    # a capture that missed the start or the end of the connection is no ground truth either: say which
    ends = {(src, flags & mask) for src, flags in zip(truth["src_ip"], truth["flags"], strict=True)
            for mask in (SYN, FIN) if flags & mask}  # fmt: skip
    missing = {(a, SYN), (b, SYN), (a, FIN), (b, FIN)} - ends
    assert not missing, f"the packet capture lacks {sorted(missing)} (SYN {SYN}, FIN {FIN}): it is no ground truth"
    return a, b, result, truth


def capture_totals(truth, a: str) -> dict[tuple, tuple[int, int]]:
    totals = {}
    for (src_ip, src_port, dst_ip, dst_port), group in truth.groupby(["src_ip", "src_port", "dst_ip", "dst_port"]):
        direction = "egress" if src_ip == a else "ingress"
        totals[(direction, "TCP", src_ip, src_port, dst_ip, dst_port, None, None)] = (
            len(group),
            int(group["length"].sum()),
        )
    return totals


@pytest.mark.parametrize(
    ("version", "segmentation", "transport"),
    [
        (4, "gso", "ring"),
        (4, "segments", "ring"),
        (6, "gso", "ring"),
        (6, "segments", "ring"),
        (4, "segments", "perf"),
        (6, "gso", "perf"),
    ],
)
def test_tcp_matches_the_packet_capture(
    tc_lab: Lab, tmp_path: Path, version: int, segmentation: str, transport: str
) -> None:
    a, b, result, truth = tcp_run(tc_lab, tmp_path, version, segmentation, transport)
    expected = capture_totals(truth, a)
    assert len(expected) == 2 and sum(packets for packets, _ in expected.values()) > 100
    assert flow_totals(result.flows, "fstcA", {a, b}) == expected
    print(
        f"IPv{version} {segmentation} {transport}: "
        + "; ".join(f"{k[0]} {v[0]} packets {v[1]} bytes" for k, v in expected.items())
    )

    largest = truth.loc[truth["src_ip"] == a, "length"].max()
    assert (largest > MTU_FRAME) if segmentation == "gso" else (largest <= MTU_FRAME), f"largest frame {largest}"

    rows = result.flows[(result.flows["ifname"] == "fstcA") & (result.flows["protocol"] == "TCP")]
    for direction, src in (("egress", a), ("ingress", b)):
        flags = 0
        for value in truth.loc[truth["src_ip"] == src, "flags"]:
            flags |= value
        seen = 0
        # Rows that other probes add for this flow (an RTT sample in an interval without packets) have none.
        for value in rows.loc[(rows["direction"] == direction) & (rows["src_ip"] == src), "tcp_flags"].dropna():
            seen |= int(value)
        assert seen == flags, f"{direction}: flags {seen:#x}, capture {flags:#x}"
        assert flags & 0x13 == 0x13  # SYN, FIN and ACK were seen each way
    assert_flow_map_balanced(result)


@pytest.mark.parametrize("version", [4, 6])
def test_segments_made_after_tc_are_one_packet_to_tc(tc_lab: Lab, tmp_path: Path, version: int) -> None:
    a, b, result, truth = tcp_run(tc_lab, tmp_path, version, "software-gso", "ring")
    expected = capture_totals(truth, a)
    got = flow_totals(result.flows, "fstcA", {a, b})
    assert got.keys() == expected.keys() and len(got) == 2
    data_flow = next(key for key in got if key[0] == "egress")
    ack_flow = next(key for key in got if key[0] == "ingress")
    assert got[ack_flow] == expected[ack_flow]  # b's ACKs are single segments
    (skbs, skb_bytes), (segments, wire_bytes) = got[data_flow], expected[data_flow]
    assert skbs < segments / 4, f"{skbs} skbs for {segments} segments: TCP built no super-packets"
    # Each segment cut out of a super-packet carries its own Ethernet, IP and TCP headers.
    assert wire_bytes - skb_bytes == (segments - skbs) * (ETHERNET + IP_HEADER[version] + TCP_HEADER)
    print(f"IPv{version}: tc {skbs} skbs {skb_bytes} bytes; capture {segments} segments {wire_bytes} bytes")
    assert_flow_map_balanced(result)
