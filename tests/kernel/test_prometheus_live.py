"""The agent with real probes, scraped by a real Prometheus: the lab's traffic and its drops arrive with their
exact packet, byte and drop counts (what the sender sent, the frame's size, and the agent namespace's own
UdpNoPorts counter), every expression of the dashboards and rules gives numbers, and the live /metrics passes
`promtool check metrics`. The traffic comes in from b (ingress on fstcA), so its local end is a's address, which
the metadata names a pod (a local process's own egress is named by its socket, a host process with no pod).
Prometheus runs inside the lab namespace beside the agent (its loopback is the agent's), so no traffic leaves the
namespaces the test made; the lab's addresses are named pods of a namespace of this test's own (a metadata file),
so drops that other tests cause elsewhere in the kernel are told apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowscope.pipeline.status import fetch
from tests.integration.servers import Prometheus, free_port
from tests.integration.test_prometheus import RULES, expressions_give_numbers
from tests.kernel.lab import Lab, Netns
from tests.kernel.tc_flows import start_sink, two_hosts, udp_frame
from tests.waiting import wait_for

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
FLOWS, COUNT, PAYLOAD, CLOSED = 6, 30, 200, 17  # CLOSED datagrams go to a port nobody listens on
SCRAPE = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())"

pytestmark = pytest.mark.timeout(300)


def status(socket_path: Path) -> dict:
    code, body = fetch(str(socket_path))
    assert code == 200
    return json.loads(body)


def udp_no_ports(netns: Netns) -> int:
    """The namespace's Udp NoPorts (/proc/net/snmp): datagrams that found no socket."""
    lines = [line.split() for line in netns.run("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["NoPorts"])


def test_prometheus_holds_the_lab_traffic_and_drops_exactly(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    namespace = f"lab{os.getpid()}"
    metadata = tmp_path / "metadata.yaml"
    metadata.write_text(yaml.safe_dump({"pods": [
        {"namespace": namespace, "name": "client-0", "workload": "client", "ips": [a4]},
        {"namespace": namespace, "name": "server-0", "workload": "server", "ips": [b4]},
    ]}))  # fmt: skip
    sock, address = tmp_path / "agent.sock", f"127.0.0.1:{free_port()}"
    start_sink(hosts.a, "udp-sink", a4, "7001")
    agent = hosts.a.popen(
        FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock),
        "--metadata", str(metadata), "--metrics-addr", address, stderr=subprocess.PIPE,
        env={**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0", "FLOWSCOPE_GRPC_ENABLED": "0"},
    )  # fmt: skip
    prometheus = None
    try:
        wait_for(lambda: sock.exists() and status(sock)["intervals"] >= 1, 120, "the agent's first interval")
        prometheus = Prometheus(tmp_path / "prometheus", [address], rule_files=[RULES], prefix=hosts.a.command())
        prometheus.start()
        before = udp_no_ports(hosts.a)
        report = hosts.udp("b", 4, 21000, 7001, PAYLOAD, COUNT, "--flows", str(FLOWS))
        closed = hosts.udp("b", 4, 22000, 9, PAYLOAD, CLOSED)
        assert (report["per_flow"], closed["sent"]) == (COUNT, CLOSED)
        assert udp_no_ports(hosts.a) - before == CLOSED  # the kernel's own count of what it dropped
        drained = status(sock)["intervals"] + 2  # every packet sent is in an interval drained after this
        wait_for(lambda: status(sock)["intervals"] >= drained, 60, "two more intervals")
        wait_for(lambda: (prometheus.value("flowscope_intervals_total") or 0) >= drained, 60, "a scrape after them")
        client = f'namespace="{namespace}", workload="client"'
        sent = FLOWS * COUNT + CLOSED
        frame = udp_frame(4, PAYLOAD)
        assert prometheus.value(f'flowscope_workload_packets_total{{direction="ingress", {client}}}') == sent
        assert prometheus.value(f'flowscope_workload_bytes_total{{direction="ingress", {client}}}') == sent * frame
        assert prometheus.value(f'flowscope_workload_drops_total{{reason="NO_SOCKET", {client}}}') == CLOSED
        assert prometheus.value(f'flowscope_workload_drop_bytes_total{{reason="NO_SOCKET", {client}}}') == (
            CLOSED * frame
        )
        assert prometheus.value('flowscope_probe_active{probe="tc_flows"}') == 1
        expressions_give_numbers(prometheus)
        # the live exposition (identity, kernel maps, probes) is as clean as the replay's
        text = hosts.a.run(sys.executable, "-c", SCRAPE, f"http://{address}/metrics").stdout
        assert "flowscope_map_fill_ratio{" in text and "flowscope_identity_resolved_total{" in text
        checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
        agent.send_signal(signal.SIGTERM)
        _, errors = agent.communicate(timeout=60)
        assert agent.returncode == 0, errors
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
        if prometheus is not None:
            prometheus.stop()
