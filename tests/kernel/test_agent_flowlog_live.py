"""The agent with real probes and its default output, the Parquet flow log: every flow of the lab's traffic is
in the log with the exact packet and byte counts sent, and the flow log's records are all settled as written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowscope.analysis.flowlog import read_flowlog
from flowscope.pipeline.status import fetch
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import flow_totals, start_sink, two_hosts, udp_frame, udp_id
from tests.waiting import wait_for

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
FLOWS, COUNT, PAYLOAD = 12, 40, 200

pytestmark = pytest.mark.timeout(300)


def status(socket_path: Path) -> dict:
    code, body = fetch(str(socket_path))
    assert code == 200
    return json.loads(body)


def test_the_agent_logs_the_lab_traffic_exactly(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    start_sink(hosts.b, "udp-sink", b4, "7001")
    sock = tmp_path / "agent.sock"
    agent = hosts.a.popen(
        FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock),
        "--data-dir", str(tmp_path / "log"),
        stderr=subprocess.PIPE, env={**os.environ, "FLOWSCOPE_GRPC_ENABLED": "0"},
    )  # fmt: skip
    try:
        wait_for(lambda: sock.exists() and status(sock)["intervals"] >= 1, 120, "the agent's first interval")
        report = hosts.udp("a", 4, 21000, 7001, PAYLOAD, COUNT, "--flows", str(FLOWS))
        drained = status(sock)["intervals"] + 2  # every packet sent is in an interval drained after this
        wait_for(lambda: status(sock)["intervals"] >= drained, 60, "two more intervals")
        agent.send_signal(signal.SIGTERM)
        _, errors = agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.wait()
    assert agent.returncode == 0, errors
    assert report["per_flow"] == COUNT
    totals = flow_totals(read_flowlog(tmp_path / "log"), "fstcA", {a4, b4})
    frame = udp_frame(4, PAYLOAD)
    assert totals == {udp_id("egress", 4, a4, 21000 + n, b4, 7001): (COUNT, COUNT * frame) for n in range(FLOWS)}
    assert "lost nothing" in errors.splitlines()[-1], errors
