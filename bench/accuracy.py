"""Accuracy: flowscope's per-flow packet and byte counts against a packet capture of the same interface.

A capture (dumpcap) runs on fsb0a for the whole time flowscope is attached there, while a mixed workload
crosses it: bulk TCP (IPv4), UDP at 200 Mbit/s (IPv6), many short TCP connections (IPv4 and IPv6), and
UDP to a closed port (answered by ICMP port unreachable). The agent drains every 0.5 s, so flows
straddle many generation flips. Both sides are summed per flow (direction, protocol, addresses, ports
or ICMP type/code) and compared; every flow whose packets or bytes differ, or that only one side saw,
is a mismatch. The lab link carries nothing else (static neighbours, no IPv6 autoconfiguration), and
the capture starts before the probes attach and ends after they detach.
"""

from __future__ import annotations

import argparse
import io
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench import lab

FLOW_KEY = ["direction", "ip_version", "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "icmp_type", "icmp_code"]
TSHARK_FIELDS = (
    "eth.src", "ip.src", "ip.dst", "ip.proto", "ipv6.src", "ipv6.dst", "ipv6.nxt", "tcp.srcport", "tcp.dstport",
    "udp.srcport", "udp.dstport", "icmp.type", "icmp.code", "icmpv6.type", "icmpv6.code", "frame.len",
)  # fmt: skip
# A new link sends its unsolicited MLD reports (source ::) during its first ~2 s; they would fall before
# the probes attach, so the comparison starts once the link is quiet.
LINK_SETTLE_SECONDS = 2.5
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}


def start_capture(path: Path) -> subprocess.Popen:
    capture = subprocess.Popen(
        ["dumpcap", "-i", lab.VETH_CLIENT, "-P", "-s", "128", "-B", "64", "-w", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not (path.exists() and path.stat().st_size >= 24):  # the pcap header: dumpcap is capturing
        if capture.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dumpcap did not start: {capture.stderr.read() if capture.stderr else ''}")
        time.sleep(0.05)
    time.sleep(0.2)
    return capture


def stop_capture(capture: subprocess.Popen) -> dict[str, int]:
    """Stops dumpcap; returns what it says it received and dropped."""
    capture.send_signal(signal.SIGINT)
    _out, err = capture.communicate(timeout=10)
    received = dropped = 0
    for line in err.splitlines():
        # "Packets received/dropped on interface 'fsb0a': 1234/0 (pcap:0/dumpcap:0/flushed:0/ps_ifdrop:0) (100.0%)"
        if "received/dropped" in line:
            counts = line.split(":", 1)[1].split()[0]
            received, dropped = (int(n) for n in counts.split("/"))
    return {"received": received, "dropped": dropped}


def capture_flows(path: Path) -> pd.DataFrame:
    """Per-flow sums of the capture, in flowscope's flow-key columns."""
    fields = [argument for field in TSHARK_FIELDS for argument in ("-e", field)]
    output = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=,", "-E", "occurrence=f", *fields],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    packets = pd.read_csv(io.StringIO(output), names=[f.replace(".", "_") for f in TSHARK_FIELDS], dtype=str)
    v6 = packets["ipv6_src"].notna()
    # IPv6: the upper-layer protocol behind any extension headers (ipv6.nxt names only the first header).
    # An ICMPv6 error quotes a packet, so ICMPv6 is checked before the quoted TCP or UDP header.
    v6_protocol = packets["ipv6_nxt"].astype(float)
    v6_protocol = v6_protocol.mask(packets["udp_srcport"].notna(), 17).mask(packets["tcp_srcport"].notna(), 6)
    v6_protocol = v6_protocol.mask(packets["icmpv6_type"].notna(), 58)
    protocol_number = packets["ip_proto"].astype(float).where(~v6, v6_protocol)
    tcp, udp = protocol_number == 6, protocol_number == 17
    icmp_type = packets["icmp_type"].where(~v6, packets["icmpv6_type"])
    icmp_code = packets["icmp_code"].where(~v6, packets["icmpv6_code"])
    icmp = protocol_number.isin((1, 58))
    frame = pd.DataFrame(
        {
            "direction": (packets["eth_src"] == lab.CLIENT_MAC).map({True: "egress", False: "ingress"}),
            "ip_version": pd.Series(6, index=packets.index).where(v6, 4).where(protocol_number.notna()),
            "protocol": protocol_number.map(lambda n: PROTOCOLS.get(int(n), str(int(n))) if n == n else None),
            "src_ip": packets["ip_src"].where(~v6, packets["ipv6_src"]),
            "dst_ip": packets["ip_dst"].where(~v6, packets["ipv6_dst"]),
            "src_port": packets["tcp_srcport"].where(tcp, packets["udp_srcport"].where(udp)),
            "dst_port": packets["tcp_dstport"].where(tcp, packets["udp_dstport"].where(udp)),
            "icmp_type": icmp_type.where(icmp),
            "icmp_code": icmp_code.where(icmp),
            "packets": 1,
            "bytes": packets["frame_len"].astype(int),
        }
    )
    return summed(frame)


def summed(frame: pd.DataFrame) -> pd.DataFrame:
    """Sums packets and bytes per flow key; key values as text so both sides compare alike."""
    keyed = frame[[*FLOW_KEY, "packets", "bytes"]].copy()
    for column in FLOW_KEY:
        keyed[column] = keyed[column].map(
            lambda v: "-" if pd.isna(v) else str(int(v)) if isinstance(v, float) else str(v)
        )
    return keyed.groupby(FLOW_KEY, as_index=False)[["packets", "bytes"]].sum()


def workload(udp_seconds: float, tcp_seconds: float, connections: int) -> dict:
    done = {}
    lab.iperf3(lab.SERVER_V4, tcp_seconds)
    done["tcp_bulk_v4_s"] = tcp_seconds
    lab.iperf3(lab.SERVER_V6, udp_seconds, "-u", "-b", "200M", "-l", "1200")
    done["udp_v6_s"] = udp_seconds
    done["short_connections_v4"] = lab.short_connections(lab.SERVER_V4, connections // 2)
    done["short_connections_v6"] = lab.short_connections(lab.SERVER_V6, connections - connections // 2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(20):
            sender.sendto(b"nobody listens here", (lab.SERVER_V4, 9))  # ICMP port unreachable comes back
    done["udp_to_closed_port"] = 20
    time.sleep(0.3)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=400, help="short TCP connections (half IPv4, half IPv6)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of bulk TCP and of UDP")
    args = parser.parse_args()
    lab.require_tools("iperf3", "dumpcap", "tshark")
    from flowscope.kernel.loader import LoadOptions

    started = time.monotonic()
    frames: list[pd.DataFrame] = []
    with (
        lab.lab(),
        lab.iperf3_server(),
        lab.echo_server(),
        tempfile.TemporaryDirectory(prefix="fsbench-") as directory,
    ):
        time.sleep(LINK_SETTLE_SECONDS)
        pcap = Path(directory) / "accuracy.pcap"
        capture = start_capture(pcap)
        try:
            with lab.Agent(
                LoadOptions(interfaces=[lab.VETH_CLIENT]), interval=0.5, on_batch=lambda b: frames.append(b.flows)
            ) as agent:
                done = workload(args.seconds, args.seconds, args.connections)
                agent.stop()
        finally:
            counts = stop_capture(capture)
        truth = capture_flows(pcap)
    flows = pd.concat(frames, ignore_index=True)
    # Rows without tc packets are drops and TCP events seen by the tracepoints, which watch the whole
    # host (other namespaces included), not this interface: the capture has nothing to compare them with.
    counted = flows["packets"].fillna(0) > 0
    tracepoint_only = flows[~counted]
    seen = summed(flows[counted].astype({"packets": "int64", "bytes": "int64"}))
    merged = truth.merge(seen, on=FLOW_KEY, how="outer", suffixes=("_capture", "_flowscope"), indicator=True)
    differs = (merged["_merge"] != "both") | (merged["packets_capture"] != merged["packets_flowscope"])
    differs |= merged["bytes_capture"] != merged["bytes_flowscope"]
    mismatches = merged[differs]
    result = {
        "workload": done,
        "capture": counts,
        "flows_in_capture": len(truth),
        "flows_in_flowscope": len(seen),
        "packets_in_capture": int(truth["packets"].sum()),
        "packets_in_flowscope": int(seen["packets"].sum()),
        "bytes_in_capture": int(truth["bytes"].sum()),
        "bytes_in_flowscope": int(seen["bytes"].sum()),
        "intervals": agent.batches,
        "mismatched_flows": len(mismatches),
        "rows_without_tc_packets": len(tracepoint_only),
        "their_interfaces": tracepoint_only["ifname"].fillna("-").value_counts().to_dict(),
        "mismatches": mismatches.drop(columns="_merge").astype(str).head(20).to_dict(orient="records"),
        "coverage": agent.coverage.to_dict(),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    lab.log(
        f"accuracy: {result['flows_in_capture']} flows / {result['packets_in_capture']} packets in the capture, "
        f"{result['flows_in_flowscope']} / {result['packets_in_flowscope']} in flowscope over {agent.batches} "
        f"intervals; mismatched flows: {len(mismatches)}; capture dropped {counts['dropped']}"
    )
    lab.save("accuracy", result)


if __name__ == "__main__":
    main()
