"""Shared set-up of the drop, TCP and connection-event kernel tests: two lab namespaces (client, server)
joined by one veth pair, `flowscope capture` running in the client namespace with tc on the client's end,
and helpers that pick the rows of one 5-tuple out of what capture wrote.

Names and addresses of this area: namespaces fstp-*, interfaces fstp*, 10.202.0.0/16 and fd00:202::/64.
The probes here are machine-wide (tracepoints), so tests select rows by their own 5-tuples.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd

from tests.kernel import socket_traffic
from tests.kernel.capture import Capture, CaptureResult
from tests.kernel.lab import Lab, Netns, Port
from tests.kernel.tc_flows import TRANSPORTS, run_traffic, start_sink

PREFIX = "fstp-"
IPV4_NET = "10.202.0.0/16"
IPV6_NET = "fd00:202::/64"


@dataclass
class Pair:
    lab: Lab
    client: Netns
    server: Netns
    client_port: Port  # fstpC, where capture's tc probe runs
    server_port: Port  # fstpS

    def addresses(self, version: int) -> tuple[str, str]:
        """(client, server) addresses of one family."""
        if version == 4:
            return self.client_port.ip4, self.server_port.ip4
        return self.client_port.ip6, self.server_port.ip6

    def netns_inode(self, netns: Netns) -> int:
        return int(netns.run("stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout)

    def socket_traffic(self, netns: Netns, *argv: str, timeout: float = 60.0) -> dict:
        """Runs a socket_traffic command in `netns`; returns what it reports."""
        return run_traffic(netns, *argv, timeout=timeout, script=socket_traffic.PATH)

    def start_server(self, address: str, port: int, connections: int = 1) -> subprocess.Popen:
        """A socket_traffic server in the server namespace, listening once this returns."""
        argv = ["server", address, str(port), "--connections", str(connections)]
        return start_sink(self.server, *argv, script=socket_traffic.PATH)


@contextmanager
def client_server(subnet: int = 1) -> Iterator[Pair]:
    with Lab(PREFIX, IPV4_NET, IPV6_NET) as lab:
        client, server = lab.namespace("client"), lab.namespace("server")
        client_port, server_port = lab.link(client, "fstpC", server, "fstpS", subnet=subnet)
        lab.offloads(client_port, False)  # one skb is one segment: counts compare with what sockets saw
        lab.offloads(server_port, False)
        yield Pair(lab, client, server, client_port, server_port)


# The raw tracepoints the tracepoint families hook, on every kernel of the matrix (the design's list).
RAW_TRACEPOINTS = {"kfree_skb", "inet_sock_set_state", "tcp_probe", "tcp_retransmit_skb", "tcp_send_reset"}
RAW_TRACEPOINTS |= {"tcp_receive_reset"}

# The drop and TCP probes see the whole machine: room in their tables, and event rates no other workload
# dropping packets meanwhile can use up (a test that is about the rate limit sets its own).
TABLES = ("--drop-map-size", "131072", "--tcp-map-size", "131072", "--drop-events-rate", "1000000")
TABLES += ("--tcp-events-rate", "1000000")


def capture(pair: Pair, transport: str, *extra: str) -> Capture:
    return Capture.start(pair.client, ["fstpC"], 0.5, *TRANSPORTS[transport], *TABLES, *extra)


def rows(frame: pd.DataFrame, src: str, sport: int | None, dst: str, dport: int | None, protocol: str) -> pd.DataFrame:
    """Rows of one 5-tuple (ports None: any), in the order capture wrote them."""
    mask = (
        (frame["src_ip"] == src)
        & (frame["dst_ip"] == dst)
        & (frame["protocol"] == protocol)
        & ((frame["src_port"] == sport) if sport is not None else True)
        & ((frame["dst_port"] == dport) if dport is not None else True)
    )
    return frame[mask.fillna(False).astype(bool)].reset_index(drop=True)


def total(frame: pd.DataFrame, column: str) -> int:
    return int(frame[column].fillna(0).sum())


def kernel_function(location: str) -> str:
    """The function of a "name+0xoffset" location, checked to be a function of the running kernel."""
    name, marker, offset = location.partition("+0x")
    assert name and marker and offset and all(digit in "0123456789abcdef" for digit in offset.lower()), location
    with open("/proc/kallsyms", encoding="utf-8") as symbols:
        assert any(line.split()[2] == name for line in symbols if line.split()[1] in "tT"), location
    return name


def tcp_retrans_segs(netns: Netns) -> int:
    """The namespace's TcpRetransSegs (/proc/net/snmp, for IPv4 and IPv6 alike)."""
    lines = [line.split() for line in netns.run("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Tcp:")]
    names, values = lines
    return int(values[names.index("RetransSegs")])


def assert_balanced(result: CaptureResult) -> None:
    assert result.returncode == 0, result.stderr
    assert result.summary["unbalanced_sources"] == [], result.summary["coverage"]
