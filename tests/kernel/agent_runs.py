"""`flowscope agent` with real probes in a lab namespace, fed UDP flows by the lab's traffic tool: the run the
agent's kernel tests share (each checks what one output wrote)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from flowscope.pipeline.status import fetch
from tests.waiting import wait_for

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))


def status(socket_path: Path) -> dict:
    code, body = fetch(str(socket_path))
    assert code == 200
    return json.loads(body)


def agent_with_udp_traffic(
    hosts: Any, tmp_path: Path, flows: int, count: int, payload: int, *agent_args: str, env: dict[str, str]
) -> tuple[dict, str]:
    """Runs the agent on fstcA in namespace a, sends `flows` UDP flows of `count` packets from a to b's sink on
    port 7001, waits until two more intervals are drained, stops the agent with SIGTERM; returns the traffic
    tool's report and the agent's stderr (asserting it exited 0)."""
    sock = tmp_path / "agent.sock"
    agent = hosts.a.popen(
        FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock), *agent_args,
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: sock.exists() and status(sock)["intervals"] >= 1, 120, "the agent's first interval")
        report = hosts.udp("a", 4, 21000, 7001, payload, count, "--flows", str(flows))
        drained = status(sock)["intervals"] + 2  # every packet sent is in an interval drained after this
        wait_for(lambda: status(sock)["intervals"] >= drained, 60, "two more intervals")
        agent.send_signal(signal.SIGTERM)
        _, errors = agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.wait()
    assert agent.returncode == 0, errors
    return report, errors
