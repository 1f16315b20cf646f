"""The agent with real probes writes to a real ClickHouse: every flow of the lab's traffic arrives with its
exact packet and byte counts. The server runs inside the lab namespace beside the agent (its loopback is the
agent's), so no traffic leaves the namespaces the test made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowscope.pipeline.status import fetch
from tests.integration.servers import ClickHouse
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import start_sink, two_hosts, udp_frame
from tests.waiting import wait_for

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
FLOWS, COUNT, PAYLOAD = 12, 40, 200

pytestmark = pytest.mark.timeout(300)


def status(socket_path: Path) -> dict:
    code, body = fetch(str(socket_path))
    assert code == 200
    return json.loads(body)


def test_the_agent_writes_the_lab_traffic_to_clickhouse_exactly(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    server = ClickHouse(tmp_path / "clickhouse", prefix=hosts.a.command()).start()
    try:
        start_sink(hosts.b, "udp-sink", b4, "7001")
        sock = tmp_path / "agent.sock"
        agent = hosts.a.popen(
            FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock),
            "--clickhouse", server.url(database="lab"), "--clickhouse-batch-age", "0",
            stderr=subprocess.PIPE, env={**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0"},
        )  # fmt: skip
        wait_for(lambda: sock.exists() and status(sock)["intervals"] >= 1, 120, "the agent's first interval")
        report = hosts.udp("a", 4, 21000, 7001, PAYLOAD, COUNT, "--flows", str(FLOWS))
        drained = status(sock)["intervals"] + 2  # every packet sent is in an interval drained after this
        wait_for(lambda: status(sock)["intervals"] >= drained, 60, "two more intervals")
        agent.send_signal(signal.SIGTERM)
        _, errors = agent.communicate(timeout=60)
        assert agent.returncode == 0, errors
        totals = server.query(
            "SELECT src_port, sum(packets), sum(bytes) FROM lab.flows WHERE ifname = 'fstcA' AND direction = 'egress' "
            f"AND src_ip = '{a4}' AND dst_ip = '{b4}' AND dst_port = 7001 GROUP BY src_port ORDER BY src_port"
        )
        assert report["per_flow"] == COUNT
        frame = udp_frame(4, PAYLOAD)
        assert totals == "".join(f"{21000 + n}\t{COUNT}\t{COUNT * frame}\n" for n in range(FLOWS))
        assert "lost nothing" in errors.splitlines()[-1], errors
    finally:
        server.stop()
