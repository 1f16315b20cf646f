"""The agent with real probes and its default output, the Parquet flow log: every flow of the lab's traffic is
in the log with the exact packet and byte counts sent, and the flow log's records are all settled as written."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.kernel.agent_runs import FLOWSCOPE, assert_agent_logs_lab_traffic
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import two_hosts

FLOWS, COUNT, PAYLOAD = 12, 40, 200

pytestmark = pytest.mark.timeout(300)


def test_the_agent_logs_the_lab_traffic_exactly(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    sock = tmp_path / "agent.sock"
    argv = [FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock)]
    argv += ["--data-dir", str(tmp_path / "log")]
    environment = {**os.environ, "FLOWSCOPE_GRPC_ENABLED": "0"}
    errors = assert_agent_logs_lab_traffic(
        hosts,
        lambda: hosts.a.popen(*argv, stderr=subprocess.PIPE, env=environment),
        lambda agent: agent.send_signal(signal.SIGTERM),
        sock,
        tmp_path / "log",
        flows=FLOWS,
        count=COUNT,
        payload=PAYLOAD,
    )
    assert "lost nothing" in errors.splitlines()[-1], errors
