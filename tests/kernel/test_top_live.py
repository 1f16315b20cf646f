"""`flowscope top` live on real probes: known traffic between two lab namespaces shows up as the rows
it should, in the plain output for scripts and in the TUI, and quitting detaches the probes.

The lab: namespaces fstop-...-a and fstop-...-b joined by the veth pair fstopA/fstopB (10.204.1.1 and
10.204.1.2); top runs in a, watching fstopA. UDP datagrams of 100 bytes are 142 bytes on the wire at tc
(Ethernet 14 + IPv4 20 + UDP 8).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel import traffic
from tests.kernel.lab import Lab, Netns, Port
from tests.kernel.pcap import Dumpcap
from tests.kernel.tc_flows import sender_report
from tests.ui.terminal import Terminal, restored

pytestmark = pytest.mark.kernel

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
READY_TIMEOUT = 120.0  # compiling the probes takes seconds, more on a busy machine


@pytest.fixture
def top_lab() -> Iterator[tuple[Lab, Netns, Netns, Port, Port]]:
    with Lab("fstop-", "10.204.0.0/16", "fd00:204::/64") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        left, right = lab.link(a, "fstopA", b, "fstopB", subnet=1)
        yield lab, a, b, left, right


def wait_for_probes(netns: Netns, process: subprocess.Popen, ifname: str = "fstopA") -> None:
    """Returns once top's tc programs are on the interface (it loaded and attached everything before that)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not netns.tc_filters(ifname, "egress"):
        assert process.poll() is None, f"top exited early ({process.returncode})"
        assert time.monotonic() < deadline, "top did not attach its probes in time"
        time.sleep(0.2)


def start_sinks(b: Netns, right: Port) -> None:
    for argv in (("udp-sink", right.ip4, "5353"), ("tcp-sink", right.ip4, "8080")):
        sink = b.popen(sys.executable, traffic.PATH, *argv, stdout=subprocess.PIPE)
        assert sink.stdout.readline().strip() == "ready"


def send_known_traffic(a: Netns, left: Port, right: Port) -> None:
    run = (sys.executable, traffic.PATH)
    a.run(*run, "udp-send", "--src", left.ip4, "--dst", right.ip4, "--sport", "40000", "--dport", "5353",
          "--size", "100", "--count", "50")  # fmt: skip
    a.run(*run, "tcp-send", "--src", left.ip4, "--sport", "41000", "--dst", right.ip4, "--dport", "8080",
          "--bytes", "200000")  # fmt: skip


def test_plain_output_has_the_rows_of_known_traffic(top_lab, tmp_path):
    _, a, b, left, right = top_lab
    start_sinks(b, right)
    top = a.popen(FLOWSCOPE, "top", "-o", "jsonl", "-i", "fstopA", "--rows", "100", "1", "6",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for_probes(a, top)
    with Dumpcap(a, "fstopA", tmp_path / "top.pcapng") as pcap:
        send_known_traffic(a, left, right)
        out, err = top.communicate(timeout=60)
    assert pcap.dropped == 0, "the packet capture dropped packets: it is no ground truth"
    wire = pcap.tcp_packets()
    assert top.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]

    def total(key: str, field: str) -> int:
        return sum(row[field] or 0 for row in rows if row["key"] == key)

    udp = f"UDP {left.ip4}:40000 -> {right.ip4}:5353"
    assert (total(udp, "packets"), total(udp, "bytes")) == (50, 50 * 142)
    request = f"TCP {left.ip4}:41000 -> {right.ip4}:8080"
    reply = f"TCP {right.ip4}:8080 -> {left.ip4}:41000"
    # What the packet capture on fstopA saw of the connection, each way (acknowledgements come back through
    # its ingress).
    for key, sport in ((request, 41000), (reply, 8080)):
        seen = wire[wire["src_port"] == sport]
        assert (total(key, "packets"), total(key, "bytes")) == (len(seen), int(seen["length"].sum())), key
    # connect (client) and accept (server) are one connection; both ends' closes are one close
    assert total(request, "connections") + total(reply, "connections") == 1
    assert total(request, "closes") + total(reply, "closes") == 1
    assert {row["group"] for row in rows} == {"flow"}
    assert not a.tc_filters("fstopA", "egress") and not a.tc_filters("fstopA", "ingress")


def test_tui_shows_the_flows_and_quitting_detaches_the_probes(top_lab):
    _, a, b, left, right = top_lab
    start_sinks(b, right)
    term = Terminal(a.command(FLOWSCOPE, "top", "-i", "fstopA", "--interval", "1"))
    try:
        wait_for_probes(a, term.process)
        sender = a.popen(sys.executable, traffic.PATH, "udp-send", "--src", left.ip4, "--dst", right.ip4,
                         "--sport", "40000", "--dport", "5353", "--size", "100", "--pps", "20", "--duration", "4",
                         stdout=subprocess.PIPE)  # fmt: skip
        term.read_until(f"UDP {left.ip4}:40000 → {right.ip4}:5353".encode(), timeout=30)
        term.read_until(b"tc_flows")  # the header names the active probes
        sent = sender_report(sender, timeout=30)["sent"]
        term.write(b"\r")  # the row's detail: what went to the peer over the last ten intervals, each datagram
        term.read_until_line(rf"^ {re.escape(right.ip4)}:5353 +→ +[0-9.]+ k?B +{sent} +0$")
        term.write(b"\x1b")
        term.read_until_line(r"^ group flow ")  # back on the main screen (a key at once would read as Alt+key)
        term.write(b"g")  # pod grouping: without Kubernetes, the ends show as their addresses
        term.read_until(b"group pod")
        term.write(b"q")
        assert term.wait() == 0
        restored(term)
        assert not a.tc_filters("fstopA", "egress") and not a.tc_filters("fstopA", "ingress")
    finally:
        term.close()
