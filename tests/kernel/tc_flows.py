"""What the tc flow tests share: the two-host topology, traffic helpers, frame sizes, and the checks of what
capture wrote (per-flow totals, loss accounting).

Topology (names of this area: namespaces fstc-*, interfaces fstc*, 10.201.0.0/16, fd00:201::/64):

    fstc-<run>-a: fstcA 10.201.1.1 fd00:201::1:1  <-- veth -->  fstc-<run>-b: fstcB 10.201.1.2 fd00:201::1:2

capture runs in namespace a with tc on fstcA: a's packets to b are egress, b's packets to a are ingress.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flowscope.analysis.flowlog import read_flowlog
from flowscope.pipeline.status import fetch
from tests.kernel import traffic
from tests.kernel.capture import CaptureResult
from tests.kernel.lab import Lab, Netns, Port
from tests.waiting import wait_for

TRANSPORTS = {"ring": (), "perf": ("--perf-buffer",)}
TRANSPORT_NAMES = {"ring": "ring buffer", "perf": "perf buffer"}
ETHERNET = 14
IP_HEADER = {4: 20, 6: 40}
UDP_HEADER = 8

# One flow, one direction: what a row of capture's output is summed by.
FlowId = tuple  # (direction, protocol, src_ip, src_port, dst_ip, dst_port, icmp_type, icmp_code)
ID_COLUMNS = ["direction", "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "icmp_type", "icmp_code"]


def udp_frame(version: int, payload: int, vlan_tags: int = 0, extension: int = 0) -> int:
    """Bytes of one UDP datagram as tc sees it (skb->len: Ethernet header included)."""
    return ETHERNET + 4 * vlan_tags + IP_HEADER[version] + extension + UDP_HEADER + payload


@dataclass
class Hosts:
    lab: Lab
    a: Netns
    b: Netns
    port_a: Port  # fstcA, watched by capture
    port_b: Port

    def address(self, side: str, version: int) -> str:
        port = self.port_a if side == "a" else self.port_b
        return port.ip4 if version == 4 else port.ip6

    def udp(self, side: str, version: int, sport: int, dport: int, size: int, count: int, *extra: str) -> dict:
        """Sends `count` datagrams of `size` payload bytes from `side` to the other host."""
        src, dst = ("a", "b") if side == "a" else ("b", "a")
        argv = ["udp-send", "--src", self.address(src, version), "--dst", self.address(dst, version)]
        argv += ["--sport", str(sport), "--dport", str(dport), "--size", str(size), "--count", str(count), *extra]
        report = run_traffic(self.a if side == "a" else self.b, *argv)
        assert report["refused"] == 0, f"the sending socket refused datagrams: {report}"
        return report


def run_traffic(netns: Netns, *argv: str, timeout: float = 120.0, script: str = traffic.PATH) -> dict:
    """Runs a sender of tests/kernel/traffic.py (or of another script that reports one JSON line last, such
    as socket_traffic.py) in `netns`; returns what it reports."""
    result = netns.run(sys.executable, script, *argv, timeout=timeout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_sink(netns: Netns, *argv: str, script: str = traffic.PATH) -> subprocess.Popen:
    """Starts a sink of tests/kernel/traffic.py (or a server of another script that prints "ready" once
    bound) in `netns`; returns once it is bound."""
    process = netns.popen(sys.executable, script, *argv, stdout=subprocess.PIPE)
    if process.stdout.readline().strip() != "ready":
        raise AssertionError(f"traffic sink {argv} did not start")
    return process


def start_sender(netns: Netns, *argv: str) -> subprocess.Popen:
    """Starts a sender of tests/kernel/traffic.py in `netns` in the background; `sender_report` waits for it."""
    return netns.popen(sys.executable, traffic.PATH, *argv, stdout=subprocess.PIPE)


def sender_report(process: subprocess.Popen, timeout: float = 120.0) -> dict:
    """Waits for a sender started with `start_sender` to end; returns what it reports."""
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{process.args} exited {process.returncode}"
    return json.loads(out.strip().splitlines()[-1])


def two_hosts(lab: Lab, subnet: int = 1) -> Hosts:
    a, b = lab.namespace("a"), lab.namespace("b")
    port_a, port_b = lab.link(a, "fstcA", b, "fstcB", subnet=subnet)
    return Hosts(lab, a, b, port_a, port_b)


def flow_totals(flows: pd.DataFrame, ifname: str, addresses: set[str]) -> dict[FlowId, tuple[int, int]]:
    """(packets, bytes) over every interval, per direction and flow, of the rows on `ifname` between two
    of `addresses` (so that multicast listener reports and other hosts' flows are left out)."""
    rows = flows[(flows["ifname"] == ifname) & flows["src_ip"].isin(addresses) & flows["dst_ip"].isin(addresses)]
    ids = rows[ID_COLUMNS].astype(object).where(rows[ID_COLUMNS].notna(), None)
    summed = pd.concat([ids, rows[["packets", "bytes"]]], axis=1).groupby(ID_COLUMNS, dropna=False).sum()
    return {
        tuple(None if pd.isna(v) else v for v in index): (int(p), int(b))
        for index, p, b in zip(summed.index, summed["packets"], summed["bytes"], strict=True)
    }


def udp_id(direction: str, version: int, src: str, sport: int, dst: str, dport: int) -> FlowId:
    return (direction, "UDP", src, sport, dst, dport, None, None)


def assert_flow_map_balanced(result: CaptureResult, lost: int | None = 0) -> int:
    """In every interval, the tc programs' packets = packets delivered (map + spills) + packets lost; and
    `lost` in all (0: nothing lost; None: any number). Spill events likewise: sent + lost = delivered + lost.
    The packets delivered are those the flow rows carry, so the accounting cannot pass on counts of zero.
    Returns the packets lost."""
    assert result.returncode == 0, result.stderr
    intervals = result.coverage("flow_map")
    assert intervals, "capture wrote no interval"
    for number, counts in enumerate(intervals):
        assert counts["produced"] == counts["delivered"] + counts["lost"], f"interval {number}: {counts}"
    delivered = sum(counts["delivered"] for counts in intervals)
    assert delivered == int(result.flows["packets"].fillna(0).sum()) > 0, intervals
    for number, counts in enumerate(result.coverage("events:flow_spill")):
        assert counts["produced"] == counts["delivered"] + counts["lost"], f"interval {number}: {counts}"
    total_lost = sum(counts["lost"] for counts in intervals)
    assert lost is None or total_lost == lost
    assert "flow_map" not in result.summary["unbalanced_sources"]
    return total_lost


def filters(netns: Netns, ifname: str) -> list[dict]:
    """Every filter on the interface's clsact hooks, with the hook it is on."""
    return [
        {"hook": hook, **entry}
        for hook in ("ingress", "egress")
        for entry in netns.tc_filters(ifname, hook)
        if "options" in entry  # the other entries only announce a priority
    ]


def flowscope_filters(netns: Netns, ifname: str) -> list[tuple[str, str]]:
    """(hook, name) of the filters flowscope attached, sorted."""
    found = [(entry["hook"], entry["options"].get("bpf_name", "")) for entry in filters(netns, ifname)]
    return sorted((hook, name) for hook, name in found if name.startswith("flowscope:"))


def _status(socket_path: Path) -> dict:
    code, body = fetch(str(socket_path))
    assert code == 200
    return json.loads(body)


def assert_agent_logs_lab_traffic(
    hosts: Hosts,
    start: Callable[[], subprocess.Popen],
    stop: Callable[[subprocess.Popen], None],
    status_socket: Path,
    data_dir: Path,
    flows: int = 6,
    count: int = 30,
    payload: int = 300,
) -> str:
    """Starts an agent (watching hosts.a's fstcA: in the namespace, its image, an installed root), sends `flows`
    UDP flows of `count` datagrams through it, stops it and finds exactly those packets and L2 bytes in its
    flow log under data_dir; returns what the process wrote to stderr."""
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    start_sink(hosts.b, "udp-sink", b4, "7001")
    agent = start()
    try:
        wait_for(lambda: status_socket.exists() and _status(status_socket)["intervals"] >= 1, 300, "a first interval")
        report = hosts.udp("a", 4, 22000, 7001, payload, count, "--flows", str(flows))
        drained = _status(status_socket)["intervals"] + 2  # every packet sent is in an interval drained after this
        wait_for(lambda: _status(status_socket)["intervals"] >= drained, 60, "two more intervals")
        stop(agent)
        _, errors = agent.communicate(timeout=120)
    finally:
        agent.kill()
        agent.wait()
    assert agent.returncode == 0, errors
    assert report["per_flow"] == count
    totals = flow_totals(read_flowlog(data_dir), "fstcA", {a4, b4})
    frame = udp_frame(4, payload)
    expected = {udp_id("egress", 4, a4, 22000 + n, b4, 7001): (count, count * frame) for n in range(flows)}
    assert totals == expected, errors
    return errors or ""
