"""The agent with real probes and its default output, the Parquet flow log: every flow of the lab's traffic is
in the log with the exact packet and byte counts sent, and the flow log's records are all settled as written."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.agent_runs import FLOWSCOPE, assert_agent_logs_lab_traffic, status
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import two_hosts
from tests.waiting import wait_for

FLOWS, COUNT, PAYLOAD = 12, 40, 200

pytestmark = pytest.mark.timeout(300)


def terminate(agent: subprocess.Popen) -> None:
    agent.send_signal(signal.SIGTERM)


def logs_lab_traffic_losing_nothing(
    hosts: Any, tmp_path: Path, start: Callable[[], subprocess.Popen], stop: Callable[[subprocess.Popen], None]
) -> None:
    """The agent `start` runs (status socket tmp_path/agent.sock, flow log under tmp_path/log) logs the lab's
    traffic exactly and says at its stop that it lost nothing."""
    errors = assert_agent_logs_lab_traffic(
        hosts, start, stop, tmp_path / "agent.sock", tmp_path / "log", flows=FLOWS, count=COUNT, payload=PAYLOAD
    )
    assert "lost nothing" in errors.splitlines()[-1], errors


def test_the_agent_logs_the_lab_traffic_exactly(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    sock = tmp_path / "agent.sock"
    argv = [FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock)]
    argv += ["--data-dir", str(tmp_path / "log")]
    environment = {**os.environ, "FLOWSCOPE_GRPC_ENABLED": "0"}
    logs_lab_traffic_losing_nothing(
        hosts, tmp_path, lambda: hosts.a.popen(*argv, stderr=subprocess.PIPE, env=environment), terminate
    )


def test_with_its_default_outputs_every_output_gets_every_record(tc_lab: Lab, tmp_path: Path) -> None:
    # the flow log and the gRPC API, each on its thread: each is handed every record and delivers it
    hosts = two_hosts(tc_lab)
    sock = tmp_path / "agent.sock"
    argv = [FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock),
            "--data-dir", str(tmp_path / "log"), "--grpc-socket", str(tmp_path / "api.sock"),
            "--hubble-socket", str(tmp_path / "hubble.sock")]  # fmt: skip
    before_stop: list[dict] = []

    def stop(agent: subprocess.Popen) -> None:
        # between two intervals, when neither output is writing one (a record being written is in no count)
        wait_for(lambda: len(set(handed(status(sock)).values())) == 1, 30, "both outputs to settle an interval")
        before_stop.append(status(sock))
        terminate(agent)

    logs_lab_traffic_losing_nothing(hosts, tmp_path, lambda: hosts.a.popen(*argv, stderr=subprocess.PIPE), stop)
    sinks = before_stop[0]["sinks"]
    assert sorted(sinks) == ["flowlog", "grpc"]
    counts = {
        name: (handed(before_stop[0])[name], s["delivered"] + s["pending"], s["lost"]) for name, s in sinks.items()
    }
    records = counts["grpc"][0]
    assert records >= FLOWS  # the lab's flows, and whatever else the interface carried (ARP, neighbour discovery)
    assert counts == {"flowlog": (records, records, 0), "grpc": (records, records, 0)}, counts


def handed(state: dict) -> dict[str, int]:
    """The records each output was handed and has settled or holds: a sink's counts are of settled records, and
    the flow log's settle as its file completes (pending until then)."""
    return {name: sink["produced"] + sink["pending"] for name, sink in state["sinks"].items()}
