"""The agent with real probes and its default output, the Parquet flow log: every flow of the lab's traffic is
in the log with the exact packet and byte counts sent, and the flow log's records are all settled as written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowscope.analysis.flowlog import read_flowlog
from tests.kernel.agent_runs import agent_with_udp_traffic
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import flow_totals, start_sink, two_hosts, udp_frame, udp_id

FLOWS, COUNT, PAYLOAD = 12, 40, 200

pytestmark = pytest.mark.timeout(300)


def test_the_agent_logs_the_lab_traffic_exactly(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    start_sink(hosts.b, "udp-sink", b4, "7001")
    report, errors = agent_with_udp_traffic(
        hosts, tmp_path, FLOWS, COUNT, PAYLOAD, "--data-dir", str(tmp_path / "log"),
        env={**os.environ, "FLOWSCOPE_GRPC_ENABLED": "0"},
    )  # fmt: skip
    assert report["per_flow"] == COUNT
    totals = flow_totals(read_flowlog(tmp_path / "log"), "fstcA", {a4, b4})
    frame = udp_frame(4, PAYLOAD)
    assert totals == {udp_id("egress", 4, a4, 21000 + n, b4, 7001): (COUNT, COUNT * frame) for n in range(FLOWS)}
    assert "lost nothing" in errors.splitlines()[-1], errors
