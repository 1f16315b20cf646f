"""Packet-capture ground truth: dumpcap records an interface inside a lab namespace, tshark reads it back.

Packet sockets see the same skbs as tc on the same interface (egress: after tc, before the driver; ingress:
before tc), so per-flow packets and frame lengths from the capture are what flowscope must report.

    with Dumpcap(netns, "fstcA", tmp_path / "a.pcapng") as pcap:
        ... traffic ...
    packets = pcap.tcp_packets()   # one row per TCP packet: addresses, ports, frame length, flags
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pandas as pd

from tests.kernel.lab import Netns


class Dumpcap:
    def __init__(self, netns: Netns, ifname: str, path: Path, snaplen: int = 128) -> None:
        self.netns, self.ifname, self.path = netns, ifname, path
        # A short snapshot is enough (frame.len keeps the real length); a large buffer keeps up with bursts.
        argv = ["dumpcap", "-i", ifname, "-w", str(path), "-s", str(snaplen), "-B", "64", "-q"]
        self.process = netns.popen(*argv, stderr=subprocess.PIPE)
        # dumpcap prints "Capturing on" before it opens the interface and "File:" once the interface is open
        # and the file created: only packets after "File:" are sure to be captured.
        said = [self.process.stderr.readline()]
        if said[0].startswith("Capturing on"):
            said.append(self.process.stderr.readline())
        if not said[-1].startswith("File:"):
            self.process.kill()
            raise AssertionError(f"dumpcap did not start: {''.join(said)}{self.process.stderr.read()}")
        self.received = self.dropped = -1

    def __enter__(self) -> Dumpcap:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ends the capture; records how many packets the interface delivered and dropped."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        _out, err = self.process.communicate(timeout=60)
        match = re.search(r"received/dropped on interface '[^']+': (\d+)/(\d+)", err)
        if match is None:
            raise AssertionError(f"dumpcap ended without statistics: {err}")
        self.received, self.dropped = int(match[1]), int(match[2])

    def fields(self, display_filter: str, *names: str) -> pd.DataFrame:
        """One row per packet matching `display_filter`, one text column per tshark field."""
        argv = ["tshark", "-r", str(self.path), "-Y", display_filter, "-T", "fields", "-E", "separator=|"]
        for name in names:
            argv += ["-e", name]
        result = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
        rows = [line.split("|") for line in result.stdout.splitlines()]
        return pd.DataFrame(rows, columns=list(names), dtype=object)

    def tcp_packets(self) -> pd.DataFrame:
        """TCP packets: src_ip, src_port, dst_ip, dst_port, length (frame bytes), flags (FIN..CWR, AE)."""
        raw = self.fields(
            "tcp", "ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst", "tcp.dstport", "frame.len", "tcp.flags"
        )
        return pd.DataFrame(
            {
                "src_ip": raw["ip.src"].where(raw["ip.src"] != "", raw["ipv6.src"]),
                "src_port": raw["tcp.srcport"].astype(int),
                "dst_ip": raw["ip.dst"].where(raw["ip.dst"] != "", raw["ipv6.dst"]),
                "dst_port": raw["tcp.dstport"].astype(int),
                "length": raw["frame.len"].astype(int),
                "flags": raw["tcp.flags"].map(lambda text: int(text, 16) & 0x1FF),  # the 9 bits tc reports
            }
        )
